# opd — run `make help` for the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PYTHONHASHSEED := 0

.DEFAULT_GOAL := help
.PHONY: help install test test-all demo eval pretrain bench-rewards prompts mini-teachers mini-table1 lint clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# One OpenCV: opencv-python, which rapidocr-onnxruntime requires. easyocr (its engine's other requirements
# are in the dev extra) goes in with --no-deps, without its opencv-python-headless, which writes the same
# cv2 files; a venv that already has both loses both first, and the dev install brings opencv-python back.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	if $(BIN)/python -m pip show -qq opencv-python-headless >/dev/null 2>&1; then \
	  $(BIN)/python -m pip uninstall -q -y opencv-python-headless opencv-python; fi
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps easyocr
	$(BIN)/python -c "import importlib.metadata as md, torch, torchvision, diffusers, hydra, lightning, peft, rapidocr_onnxruntime, easyocr, cv2; \
	  cvs = sorted({d.metadata['Name'].lower().replace('_', '-') for d in md.distributions() if d.metadata['Name'].lower().startswith('opencv')}); \
	  assert cvs == ['opencv-python'], f'one OpenCV expected, found {cvs}'; \
	  print('installed: torch', torch.__version__, '| diffusers', diffusers.__version__, '| OpenCV', cv2.__version__)"
	touch $(STAMP)

install: $(STAMP)  ## create .venv/ with everything opd needs (pinned torch 2.14.1)

test: $(STAMP)  ## run the fast CPU test suite (installs first if needed)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)  ## run every CPU test, slow ones included
	$(BIN)/python -m pytest -q -m "not gpu"

demo: $(STAMP)  ## the main job: MOPD distils the three shipped mini teachers into one student (CPU: a short run; GPU: the full one) and ends by comparing student and base
	@if $(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  exp="experiment=mini/mopd_cfg_free trainer=gpu"; \
	else exp="experiment=mini/mopd_demo"; fi; \
	$(BIN)/python -m opd.train $$exp hydra.run.dir=outputs/demo overwrite=true $(ARGS) && \
	echo "demo: KL curves outputs/demo/curves.png | student previews outputs/demo/images/ (step 0 = base) | verdict outputs/demo/eval/verdict.txt | student (row 'trained') vs base and teachers outputs/demo/eval/results.md, grids in outputs/demo/eval/grids/"

eval: $(STAMP)  ## full mini-world evaluation (all test prompts, 40 steps; a GPU makes it minutes). Pass ARGS="+checkpoints.x=<adapter>" (adds a row; ~checkpoints.base drops the base)
	$(BIN)/python -m opd.evaluate $(ARGS)

pretrain: $(STAMP)  ## pre-train the mini base model (GPU): ARGS="trainer=gpu"
	$(BIN)/python -m opd.train experiment=pretrain_mini $(ARGS)

bench-rewards: $(STAMP)  ## images/s of the mini rewards on this machine
	$(BIN)/python -m opd.bench_rewards

prompts: $(STAMP)  ## fetch the SD3.5 prompt sets (Flow-GRPO's PickScore, OCR, GenEval; pinned by commit, checked by checksum) into data/ (docs/prompts.md)
	$(BIN)/python -m opd.data.fetch_prompts --data-dir "$(or $(OPD_ROOT),$(CURDIR))/data" $(ARGS)

# ---- result chains: ordered runs as file targets (the adapter each run exports, then its evaluation).
# Independent runs train side by side under `make -j`, or as one Hydra multirun (`opd.train -m`)
# through the launcher conf/hydra/launcher/$(LAUNCHER).yaml. TRAIN_ARGS / EVAL_ARGS come last in every
# command, so they override a rule's own values (a dry run: TRAIN_ARGS="trainer.max_time=00:00:01:00").
# A run that died leaves its folder behind: resume it with TRAIN_ARGS="ckpt_path=last", or start
# over with TRAIN_ARGS="overwrite=true".
# The grouped targets (`&:`) need GNU make >= 4.3.
RUNS         ?= runs/table1
TEACHER_RUNS ?= runs/teachers
# the teachers the students distil, and the base model every run starts from
TEACHERS     ?= models/mini_teachers
BASE         ?= models/mini_base/config.json
# the earlier table whose rows make mini-table1 does not run again (teachers' training, SOPD)
PREVIOUS     ?= docs/results/archive/mini_table1_v1/round1
TRAINER      ?= trainer=gpu
# the multiruns' launcher: conf/hydra/launcher/local.yaml (runs side by side) when its joblib plugin is
# installed, else Hydra's basic one (one run after another)
LAUNCHER     ?= $(shell $(BIN)/python -c 'import hydra_plugins.hydra_joblib_launcher' 2>/dev/null && test -f conf/hydra/launcher/local.yaml && echo local)
OCR_WORKERS  ?= 4
# where the runs trained, written into runs.json and the cards
DEVICE       ?=
TRAIN_ARGS   ?=
EVAL_ARGS    ?=
PYM          := $(BIN)/python -m
ADAPTER      := adapter/pytorch_lora_weights.safetensors
# eval=null: the chains below evaluate every adapter in a folder of its own (val/ or eval/), with shared settings
RUN_ARGS      = $(TRAINER) logger=csv trainer.enable_progress_bar=false trainer.max_steps=1000000 eval=null
TRAIN         = $(PYM) opd.train $(RUN_ARGS)
MULTIRUN      = $(PYM) opd.train -m $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER)) $(RUN_ARGS)
EVAL          = $(PYM) opd.evaluate '~checkpoints' batch_size=160 +eval_tasks.ocr.rewards.ocr.num_workers=$(OCR_WORKERS)
# candidates are compared on the val prompts of every task (held out from training, never the test sets)
VAL           = eval_tasks.geneval.prompts.split=val eval_tasks.ocr.prompts.split=val eval_tasks.aesthetic.prompts.split=val
# in a recipe: the run folder of the adapter being made
RUN           = $(patsubst %/$(ADAPTER),%,$@)
# the CFG scale an evaluation samples at (set per target below: DiffusionNFT-trained runs are CFG-free)
GUIDANCE      = 4.5
SHIPPED      := $(foreach s,aesthetic ocr geneval,$(TEACHERS)/$(s)/pytorch_lora_weights.safetensors)
# $(call evaluate,<run folder>,<evaluation folder>[,<overrides>]): the run's adapter as checkpoint <run name>
evaluate      = $(EVAL) +checkpoints.$(notdir $1)=$1/adapter guidance_scale=$(GUIDANCE) $3 hydra.run.dir=$2 $(EVAL_ARGS)

$(RUNS)/%/eval/results.json: $(RUNS)/%/$(ADAPTER) | $(STAMP)
	$(call evaluate,$(RUNS)/$*,$(@D))
$(RUNS)/%/val/results.json: $(RUNS)/%/$(ADAPTER) | $(STAMP)
	$(call evaluate,$(RUNS)/$*,$(@D),$(VAL))

# -- make mini-teachers: the v2 teachers' recipe (docs/results/mini_teachers_v2) ---------------------------
# One DiffusionNFT run per skill (CFG-free; the recipe that learnt on val in rounds 1 and 2), each for a fixed
# number of optimiser steps (not minutes: the same run on any GPU) with an EMA adapter snapshot every
# SNAPSHOT_EVERY steps. Every snapshot and the final adapter are scored on the skill's val prompts, and the best
# one is the teacher (early stopping on val; pick_teachers' RUN/*). A run stopped on the way resumes from its
# last checkpoint (AdamW, EMA and step restored) when make runs again.
TEACHER_SKILLS  := ocr geneval aesthetic
TEACHER_EXP_ocr       := mini/teacher_ocr_nft
TEACHER_EXP_geneval   := mini/teacher_geneval
TEACHER_EXP_aesthetic := mini/teacher_aesthetic_nft
TEACHER_ARGS_ocr      := +reward.ocr.num_workers=$(OCR_WORKERS)
TEACHER_STEPS_ocr       ?= 100
TEACHER_STEPS_geneval   ?= 500
TEACHER_STEPS_aesthetic ?= 500
SNAPSHOT_EVERY ?= 25
# val scoring of the snapshots: 1 image per prompt, the swapped-prompt control on 16 pairs, no cover search
SNAPSHOT_EVAL   = images_per_prompt=1 controls.cover=null controls.sensitivity_pairs=16
TEACHER_ADAPTERS := $(foreach s,$(TEACHER_SKILLS),$(TEACHER_RUNS)/$(s)_nft/$(ADAPTER))
TEACHER_VALS     := $(foreach s,$(TEACHER_SKILLS),$(TEACHER_RUNS)/$(s)_nft/val/results.json)
# ckpt_path=last where the run folder holds a checkpoint (a stopped run goes on)
resume = $(if $(wildcard $1/checkpoints/last.ckpt),ckpt_path=last)

$(TEACHER_ADAPTERS): $(TEACHER_RUNS)/%_nft/$(ADAPTER): $(BASE) | $(STAMP)
	$(TRAIN) experiment=$(TEACHER_EXP_$*) $(TEACHER_ARGS_$*) trainer.max_steps=$(TEACHER_STEPS_$*) trainer.max_time=null \
	  callbacks.adapter_snapshots.every_n_steps=$(SNAPSHOT_EVERY) hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
# every snapshot (checkpoint step_NNNNNN) and the final adapter (checkpoint final) on its own task's val prompts
$(TEACHER_VALS): $(TEACHER_RUNS)/%_nft/val/results.json: $(TEACHER_RUNS)/%_nft/$(ADAPTER) | $(STAMP)
	$(EVAL) $(VAL) $(SNAPSHOT_EVAL) $(foreach t,$(filter-out $*,$(TEACHER_SKILLS)),'~eval_tasks.$(t)') \
	  '+checkpoints.final={adapter:$(<D),guidance_scale:1.0}' \
	  $$(for d in $(TEACHER_RUNS)/$*_nft/exports/step_*; do [ -d "$$d" ] && printf " +checkpoints.%s={adapter:%s,guidance_scale:1.0}" "$${d##*/}" "$$d"; done) \
	  hydra.run.dir=$(@D) $(EVAL_ARGS)
# each skill's best snapshot on its own headline metric → $(TEACHER_RUNS)/teachers/<skill>, picked.json
$(TEACHER_RUNS)/picked.json: $(TEACHER_VALS) | $(STAMP)
	$(PYM) opd.results.pick_teachers --root $(TEACHER_RUNS) --dest $(TEACHER_RUNS)/teachers \
	  $(foreach s,$(TEACHER_SKILLS),'$(s)=$(s)_nft/*')
# the picked teachers on the test prompts (every control, 4 images per prompt), each at its own CFG scale
$(TEACHER_RUNS)/teacher_%/eval/results.json: $(TEACHER_RUNS)/picked.json | $(STAMP)
	$(EVAL) "$$($(PYM) opd.results.pick_teachers --root $(TEACHER_RUNS) --checkpoint $*)" hydra.run.dir=$(@D) $(EVAL_ARGS)
$(TEACHER_RUNS)/cards/results.md: $(foreach s,$(TEACHER_SKILLS),$(TEACHER_RUNS)/teacher_$(s)/eval/results.json) | $(STAMP)
	$(PYM) opd.results.teacher_cards --runs $(TEACHER_RUNS) --teachers $(TEACHER_RUNS)/teachers --results $(@D) --device "$(DEVICE)"

mini-teachers: $(TEACHER_RUNS)/cards/results.md  ## train, pick on val and card the mini teachers (GPU; make -j3 mini-teachers): TEACHER_RUNS=runs/teachers
	@echo "mini-teachers: adapters in $(TEACHER_RUNS)/teachers/, cards and results page in $(TEACHER_RUNS)/cards/ (and $(TEACHER_RUNS)/teachers/*/README.md)"

# -- make mini-table1: the mini Table 1 (round 2 and its phase 2, docs/results/archive/mini_table1_v1) ---------
# the OCR teacher: shipped, or continued for 8 min; the better on training prompts is evaluated on test
$(RUNS)/ocr_shipped/$(ADAPTER): $(TEACHERS)/ocr/pytorch_lora_weights.safetensors
	mkdir -p $(@D) && cp $< $@
$(RUNS)/ocr_nft_more/$(ADAPTER): $(TEACHERS)/ocr/pytorch_lora_weights.safetensors | $(STAMP)
	$(TRAIN) experiment=mini/teacher_ocr_nft +reward.ocr.num_workers=$(OCR_WORKERS) ++module.init_adapter=$(TEACHERS)/ocr \
	  trainer.max_time=00:00:08:00 hydra.run.dir=$(RUN) $(TRAIN_ARGS)
$(RUNS)/picked.json: $(RUNS)/ocr_shipped/val/results.json $(RUNS)/ocr_nft_more/val/results.json | $(STAMP)
	$(PYM) opd.results.pick_teachers --root $(RUNS) --dest $(RUNS)/teachers ocr=ocr_shipped,ocr_nft_more
$(RUNS)/teacher_ocr/eval/results.json: $(RUNS)/picked.json | $(STAMP)
	$(EVAL) "$$($(PYM) opd.results.pick_teachers --root $(RUNS) --checkpoint ocr)" hydra.run.dir=$(@D) $(EVAL_ARGS)
# MOPD from the shipped teachers, 16 min each: rank 16 with balanced vs summed KLs (one multirun,
# $(RUNS)/mopd_{balanced,sum}), and the experiment's defaults (rank 64, balanced)
$(RUNS)/mopd_balanced/$(ADAPTER) $(RUNS)/mopd_sum/$(ADAPTER) &: $(SHIPPED) $(BASE) | $(STAMP)
	$(MULTIRUN) experiment=mini/mopd_aesthetic_ocr_geneval module.teacher_weighting=balanced,sum module.lora.rank=16 module.lora.alpha=32 \
	  hydra.sweep.dir=$(RUNS) 'hydra.sweep.subdir=mopd_$${module.teacher_weighting}' $(TRAIN_ARGS)
$(RUNS)/mopd_balanced_r64/$(ADAPTER): $(SHIPPED) $(BASE) | $(STAMP)
	$(TRAIN) experiment=mini/mopd_aesthetic_ocr_geneval hydra.run.dir=$(RUN) $(TRAIN_ARGS)
# multi-reward RL for the same 16 min, and cascade RL, all DiffusionNFT (aesthetic → OCR → GenEval)
$(RUNS)/multi_reward_nft/$(ADAPTER): $(BASE) | $(STAMP)
	$(TRAIN) experiment=mini/multi_reward_nft +reward.ocr.num_workers=$(OCR_WORKERS) trainer.max_time=00:00:16:00 hydra.run.dir=$(RUN) $(TRAIN_ARGS)
$(RUNS)/cascade_aesthetic/$(ADAPTER): $(BASE) | $(STAMP)
	$(TRAIN) experiment=mini/cascade_aesthetic trainer.max_time=00:00:04:30 hydra.run.dir=$(RUN) $(TRAIN_ARGS)
$(RUNS)/cascade_ocr/$(ADAPTER): $(RUNS)/cascade_aesthetic/$(ADAPTER) | $(STAMP)
	$(TRAIN) experiment=mini/cascade_ocr +reward.ocr.num_workers=$(OCR_WORKERS) module.init_adapter=$(<D) trainer.max_time=00:00:04:30 hydra.run.dir=$(RUN) $(TRAIN_ARGS)
$(RUNS)/cascade_geneval/$(ADAPTER): $(RUNS)/cascade_ocr/$(ADAPTER) | $(STAMP)
	$(TRAIN) experiment=mini/cascade_geneval module.init_adapter=$(<D) trainer.max_time=00:00:04:30 hydra.run.dir=$(RUN) $(TRAIN_ARGS)
# phase 2: the two balanced MOPD students and multi-reward RL continued 4.5 min at a third of their lr
$(RUNS)/mopd_r64_p2/$(ADAPTER): $(RUNS)/mopd_balanced_r64/$(ADAPTER) | $(STAMP)
	$(TRAIN) experiment=mini/mopd_phase2 module.init_adapter=$(<D) hydra.run.dir=$(RUN) $(TRAIN_ARGS)
$(RUNS)/mopd_r16_p2/$(ADAPTER): $(RUNS)/mopd_balanced/$(ADAPTER) | $(STAMP)
	$(TRAIN) experiment=mini/mopd_phase2 module.lora.rank=16 module.lora.alpha=32 module.init_adapter=$(<D) hydra.run.dir=$(RUN) $(TRAIN_ARGS)
$(RUNS)/multi_p2/$(ADAPTER): $(RUNS)/multi_reward_nft/$(ADAPTER) | $(STAMP)
	$(TRAIN) experiment=mini/multi_reward_nft +reward.ocr.num_workers=$(OCR_WORKERS) ++module.init_adapter=$(<D) \
	  module.optimizer.lr=3e-4 trainer.max_time=00:00:04:30 hydra.run.dir=$(RUN) $(TRAIN_ARGS)
$(foreach r,ocr_shipped ocr_nft_more,$(RUNS)/$(r)/val/results.json) $(foreach r,multi_reward_nft multi_p2 cascade_geneval,$(RUNS)/$(r)/eval/results.json): GUIDANCE = 1.0
TABLE1_EVALS := $(foreach r,teacher_ocr mopd_balanced mopd_sum mopd_balanced_r64 mopd_r16_p2 mopd_r64_p2 multi_reward_nft multi_p2 cascade_geneval,$(RUNS)/$(r)/eval/results.json)
TABLE1_STAGES := {"mopd": ["mopd_balanced_r64", "mopd_r64_p2"], "multi_reward_rl": ["multi_reward_nft", "multi_p2"]}
TABLE1_EXTRA := {"mopd_r16": {"label": "MOPD student, rank 16", "stages": ["mopd_balanced", "mopd_r16_p2"]}, \
  "mopd_r16_16min": {"label": "MOPD student, rank 16, after 16 min", "stages": ["mopd_balanced"]}, \
  "mopd_r64_16min": {"label": "MOPD student after 16 min (before the lr-1e-4 phase)", "stages": ["mopd_balanced_r64"]}, \
  "mopd_sum": {"label": "MOPD, summed KLs (the paper rule), rank 16, 16 min", "stages": ["mopd_sum"]}, \
  "multi_reward_16min": {"label": "multi-reward RL after 16 min", "stages": ["multi_reward_nft"], "teachers": []}}
$(RUNS)/table/results.md: $(TABLE1_EVALS) | $(STAMP)
	$(PYM) opd.results.table1 --runs $(RUNS) --out $(@D) --previous $(PREVIOUS) --device "$(DEVICE)" \
	  --stages '$(TABLE1_STAGES)' --extra '$(TABLE1_EXTRA)' --also geneval/geneval_mini ocr/ocr

mini-table1: $(RUNS)/table/results.md  ## the mini Table 1 from the shipped teachers (GPU; make -j8 mini-table1): RUNS=runs/table1 DEVICE="..."
	@echo "mini-table1: $(RUNS)/table/results.md (runs.json, curves.png beside it); ship the student with python -m opd.results.ship_adapter $(RUNS)/mopd_r64_p2/adapter <dest>"

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check src tests

clean:  ## remove caches and run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache
