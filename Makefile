# opd — run `make help` for the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PYTHONHASHSEED := 0

.DEFAULT_GOAL := help
.PHONY: help install test test-all demo eval pretrain bench-rewards lint clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision, diffusers, hydra, lightning, peft, rapidocr_onnxruntime; print('installed: torch', torch.__version__, '| diffusers', diffusers.__version__)"
	touch $(STAMP)

install: $(STAMP)  ## create .venv/ with everything opd needs (pinned torch 2.14.1)

test: $(STAMP)  ## run the fast CPU test suite (installs first if needed)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)  ## run every CPU test, slow ones included
	$(BIN)/python -m pytest -q -m "not gpu"

demo: $(STAMP)  ## the main job: MOPD distils the three shipped mini teachers into one student (CPU: a short run; GPU: the full one), then compares student and base
	@if $(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  exp="experiment=mini/mopd_aesthetic_ocr_geneval trainer=gpu"; ev=""; \
	else exp="experiment=mini/mopd_demo"; ev="max_prompts=8 num_steps=20 images_per_prompt=1"; fi; \
	$(BIN)/python -m opd.train $$exp hydra.run.dir=outputs/demo $(ARGS) && \
	$(BIN)/python -m opd.evaluate +checkpoints.student=outputs/demo/adapter $$ev hydra.run.dir=outputs/demo/eval && \
	echo "demo: KL curves outputs/demo/curves.png | student previews outputs/demo/images/ (step 0 = base) | student vs base outputs/demo/eval/results.md, grids in outputs/demo/eval/grids/"

eval: $(STAMP)  ## full mini-world evaluation (all test prompts, 40 steps; a GPU makes it minutes). Pass ARGS="checkpoints.x=..."
	$(BIN)/python -m opd.evaluate $(ARGS)

pretrain: $(STAMP)  ## pre-train the mini base model (GPU): ARGS="trainer=gpu"
	$(BIN)/python -m opd.train experiment=pretrain_mini $(ARGS)

bench-rewards: $(STAMP)  ## images/s of the mini rewards on this machine
	$(BIN)/python -m opd.bench_rewards

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check src tests

clean:  ## remove caches and run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache
