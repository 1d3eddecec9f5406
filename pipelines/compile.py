"""Compile every pipeline into pipelines/compiled/ (`make pipelines`); `--check` only compares, for CI."""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

from kfp import compiler

from pipelines.sqgan import DATASETS, EXPERIMENT_FILE, FACTORIES, compiled_name, experiment_pipeline

COMPILED = Path(__file__).resolve().parent / "compiled"


def compile_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, factory in FACTORIES.items():
        for dataset in DATASETS:
            path = folder / compiled_name(kind, dataset)
            compiler.Compiler().compile(factory(dataset), str(path))
            written.append(path)
    compiler.Compiler().compile(experiment_pipeline(), str(folder / EXPERIMENT_FILE))
    written.append(folder / EXPERIMENT_FILE)
    return written


def stale(folder: Path = COMPILED) -> list[str]:
    """The compiled files that differ from what the pipelines compile to now (or are missing or extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in compile_all(Path(tmp))}
    have = {p.name: p.read_text() for p in folder.glob("*.yaml")} if folder.is_dir() else {}
    out = []
    for name in sorted(fresh.keys() | have.keys()):
        if fresh.get(name) != have.get(name):
            diff = difflib.unified_diff((have.get(name) or "").splitlines(), (fresh.get(name) or "").splitlines(),
                                        f"committed/{name}", f"compiled/{name}", lineterm="", n=1)
            out.append("\n".join(list(diff)[:20]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 when pipelines/compiled/ is out of date")
    args = ap.parse_args()
    if args.check:
        diffs = stale()
        for d in diffs:
            print(d)
        if diffs:
            print(f"{len(diffs)} compiled pipeline(s) out of date: run `make pipelines` and commit "
                  f"pipelines/compiled/", file=sys.stderr)
        return 1 if diffs else 0
    import shutil

    with tempfile.TemporaryDirectory(dir=COMPILED.parent) as tmp:  # all or nothing
        compile_all(Path(tmp) / "compiled")
        old = COMPILED.with_name(".compiled-old")
        if COMPILED.exists():
            COMPILED.rename(old)
        (Path(tmp) / "compiled").rename(COMPILED)
        shutil.rmtree(old, ignore_errors=True)
    print(f"{len(list(COMPILED.glob('*.yaml')))} pipelines → {COMPILED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
