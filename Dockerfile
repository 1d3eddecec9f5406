# The image of the Kubeflow components and of the KubeRay RayJob: sqgan installed with the project's pins on
# Ray's own image. Its tag must match the pinned Ray and Python (tests/test_dockerfile.py checks it against
# constraints.txt and pyproject.toml).
#   docker build -t REGISTRY/sqgan:$(git rev-parse --short HEAD) .              # GPU nodes
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu -t REGISTRY/sqgan:TAG-cpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

WORKDIR /home/ray/sqgan
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    RAY_AUTH_MODE=disabled RAY_TRAIN_V2_ENABLED=1 DVC_NO_ANALYTICS=1

# torch first and pinned, so nothing pulls another build; then sqgan with every pin.
COPY --chown=ray:users constraints.txt pyproject.toml README.md ./
RUN pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1
COPY --chown=ray:users src ./src
RUN pip install -c constraints.txt . && sqgan --help > /dev/null

# The project files the stages read (params, DVC stages, pipelines); data and runs come from volumes or storage.
COPY --chown=ray:users params.yaml dvc.yaml ./
COPY --chown=ray:users experiments ./experiments
