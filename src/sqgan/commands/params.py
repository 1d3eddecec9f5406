"""`sqgan config show|validate`: the resolved params, each key with its doc and allowed values, or a check of them
(the schema and its loader are `sqgan.config`; a bad key never gets this far: loading names it)."""

from __future__ import annotations

from pathlib import Path

from sqgan.config import Params, describe


def show(params: Params) -> str:
    return describe(params)


def validated(params_file: Path | None, no_params_file: bool) -> str:
    """The line `config validate` prints for params that loaded."""
    return f"{'built-in defaults' if no_params_file else params_file or 'params.yaml'}: ok"
