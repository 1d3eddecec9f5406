"""The Dockerfile (it cannot be built here: no container engine) carries the pins it must: Ray's image at the
pinned Ray and Python, torch pinned, sqgan installed with constraints.txt."""

from __future__ import annotations

import re

from conftest import ROOT


def _pin(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def test_dockerfile_base_image_matches_the_pinned_ray_and_python():
    text = (ROOT / "Dockerfile").read_text()
    default = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, flags=re.M)
    assert default and re.search(r"^FROM \$\{RAY_IMAGE\}$", text, flags=re.M)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cpu)", default.group(1))
    assert m, default.group(1)
    assert m.group(1) == _pin("ray")
    requires = re.search(r'requires-python = ">=(\d)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert (m.group(2), m.group(3)) == requires.groups()
    cluster = (ROOT / "k8s" / "rayjob.yaml").read_text()
    assert f"image: {default.group(1)}" in cluster  # the RayJob and the image agree on the base


def test_dockerfile_installs_torch_pinned_then_sqgan_with_the_constraints():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    assert runs[0] == "RUN pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1"
    assert _pin("torch") == "2.14.1" and _pin("torchvision") == "0.29.1"
    assert runs[1].startswith("RUN pip install -c constraints.txt .")
    copies = " ".join(ln for ln in lines if ln.startswith("COPY "))
    for needed in ("constraints.txt", "pyproject.toml", "src", "params.yaml"):
        assert needed in copies, needed
