"""Kubeflow Pipelines v2 components: one per sqgan stage, each a thin call of `sqgan.commands.kfp_tasks` (which runs
the same stage function as the CLI and DVC). No stage logic lives here: a component only moves KFP artifacts in and out.

Every component runs in one image, named here and nowhere else: build it from the repository's Dockerfile, push it,
set IMAGE to its name, and `make pipelines` to recompile.
"""

IMAGE = "sqgan:0.1.0"  # `docker build -t sqgan:0.1.0 .`; with a registry: REGISTRY/sqgan:0.1.0
