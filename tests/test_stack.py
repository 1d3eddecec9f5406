"""The pinned stack (constraints.txt) imports together: Ray, MLflow, DVC and the Kubeflow Pipelines SDK share
protobuf, which kfp 2.x caps below 7 (the re-resolution moved protobuf 7.36.2 → 6.33.6)."""

from __future__ import annotations

import importlib
from importlib.metadata import version

import pytest


@pytest.mark.parametrize("module", ["ray.train", "ray.tune", "mlflow.server", "mlflow.tracking", "dvc.repo",
                                    "kfp.dsl", "kfp.compiler", "kfp.local", "kubernetes.client", "open_clip",
                                    "transformers", "optuna", "torch_fidelity", "kornia"])
def test_the_pinned_stack_imports_together(module):
    importlib.import_module(module)


def test_protobuf_fits_kfp():
    from packaging.requirements import Requirement

    kfp_protobuf = [Requirement(r) for r in __import__("importlib.metadata").metadata.requires("kfp")
                    if r.startswith("protobuf")]
    assert kfp_protobuf and all(req.specifier.contains(version("protobuf")) for req in kfp_protobuf)
