# sqgan — `make demo` runs the main job on the embedded demo data (offline); `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export RAY_AUTH_MODE := disabled
export RAY_TRAIN_V2_ENABLED := 1
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_PORT ?= 5000

.PHONY: setup demo test ui bench bench-learning bench-gpu lint pipelines clean

setup: $(STAMP)

# Idempotent: re-runs only when the pins change. torch comes first, pinned, so nothing pulls another build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	@test -d .dvc || { echo "error: .dvc/ missing; run from a clone of the sqgan repository"; exit 1; }
	$(BIN)/dvc repro train
	@echo
	@$(BIN)/sqgan summary runs/demo

test: setup
	$(BIN)/python -m pytest -q

ui: setup
	@echo "MLflow dashboard on http://127.0.0.1:$(MLFLOW_PORT) (Ctrl-C stops it)"
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

bench: setup
	$(BIN)/python benchmarks/quant_overhead.py
	$(BIN)/python benchmarks/quant_overhead.py --arch stylegan2 --resolution 64 --batch 16 --only plain --only fq+sq --only 'fq+sq mixdl step' --set model.channel_base=4096 --set model.channel_max=128
	$(BIN)/python benchmarks/quant_overhead.py --arch biggan --only plain --only fq --set model.conditional=true --set model.num_classes=10 --set 'fq.layers=[0,1,2,3]' --set model.g_channels=16 --set model.d_channels=16
	$(BIN)/python benchmarks/backbone_speed.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/ray_overhead.py
	$(BIN)/python benchmarks/bookkeeping.py
	$(BIN)/python benchmarks/experiment_overhead.py
	$(BIN)/python benchmarks/metrics_pipeline.py
	$(BIN)/python benchmarks/metrics_pipeline.py --inception --n 300 --rounds 2
	$(BIN)/python benchmarks/truncation.py --resolution 32 --channel-base 2048 --channel-max 128 --sq --n-sample 256
	$(BIN)/python benchmarks/gpu.py --quick --out benchmarks/results/gpu-quick
	$(MAKE) bench-learning

# The GPU benchmark at full size (StyleGAN2 256², batch 32; float32 / bf16 × plain / FQ + SQ / + QCR): run it the
# moment a GPU is there; it writes benchmarks/results/gpu/gpu.json and gpu.md.
bench-gpu: setup
	$(BIN)/python benchmarks/gpu.py --out benchmarks/results/gpu

# Does every backbone and method learn? The ground-truth mode benchmark (K = 16 known modes; exits 1 when a row misses
# its target) and the learning ablation on the demo data (~1.5 h together on 2 CPU cores).
bench-learning: setup
	$(BIN)/python benchmarks/modes.py
	$(BIN)/python benchmarks/ablation.py

# Kubeflow: compile pipelines/*.py into pipelines/compiled/ (tests/test_kfp.py fails while the committed YAML is stale).
pipelines: setup
	$(BIN)/python -m pipelines.compile

lint: setup
	$(BIN)/ruff check src tests benchmarks components pipelines

clean:
	rm -rf runs ray_results mlartifacts mlflow.db .pytest_cache
