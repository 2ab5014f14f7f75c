# opd — run `make help` for the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PYTHONHASHSEED := 0

.DEFAULT_GOAL := help
.PHONY: help install test test-all demo eval pretrain bench-rewards prompts mini-teachers mini-table1 mini-table1-dense mini-table1-records lint clean

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
# Independent runs train side by side under `make -j`. TRAIN_ARGS / EVAL_ARGS come last in every
# command, so they override a rule's own values (a dry run: TRAIN_ARGS="trainer.max_steps=2").
# A run that stopped (a machine's time limit, a crash) leaves its folder behind with its checkpoints:
# running make again resumes it (ckpt_path=last); TRAIN_ARGS="overwrite=true" starts it over.
# the teachers' runs and the table's in one folder: the table's rows read the teachers' logs and compute
RUNS         ?= runs/mini
TEACHER_RUNS ?= $(RUNS)
# the base model every run starts from
BASE         ?= models/mini_base/config.json
TRAINER      ?= trainer=gpu
OCR_WORKERS  ?= 4
# processes per run for the mini judges (GenEval-mini, aesthetic v2), whose per-image Python holds the GIL;
# 1 scores in the run's own process (opd.rewards.workers; the same scores either way)
JUDGE_WORKERS ?= 1
# $(call judges,<key prefix>,<reward names>): the overrides that give those rewards JUDGE_WORKERS processes
judges        = $(foreach r,$2,+$1$(r).num_workers=$(JUDGE_WORKERS))
# where the runs trained, written into runs.json and the cards
DEVICE       ?=
TRAIN_ARGS   ?=
EVAL_ARGS    ?=
PYM          := $(BIN)/python -m
ADAPTER      := adapter/pytorch_lora_weights.safetensors
# eval=null: the chains below evaluate every adapter in a folder of its own (val/ or eval/), with shared settings;
# a log row every step: compute budgets (opd.results.compute) read a run's compute at its last step or at a snapshot
RUN_ARGS      = $(TRAINER) logger=csv trainer.log_every_n_steps=1 trainer.enable_progress_bar=false trainer.max_steps=1000000 eval=null
TRAIN         = $(PYM) opd.train $(RUN_ARGS)
EVAL          = $(PYM) opd.evaluate '~checkpoints' batch_size=160 +eval_tasks.ocr.rewards.ocr.num_workers=$(OCR_WORKERS) \
                $(call judges,eval_tasks.geneval.rewards.,geneval_mini) $(call judges,eval_tasks.aesthetic.rewards.,aesthetic_mini)
# candidates are compared on the val prompts of every task (held out from training, never the test sets)
VAL           = eval_tasks.geneval.prompts.split=val eval_tasks.ocr.prompts.split=val eval_tasks.aesthetic.prompts.split=val
# in a recipe: the run folder of the adapter being made
RUN           = $(patsubst %/$(ADAPTER),%,$@)
# the CFG scale an evaluation samples at (set per target below: DiffusionNFT-trained runs are CFG-free)
GUIDANCE      = 4.5
# $(call evaluate,<run folder>,<evaluation folder>[,<overrides>]): the run's adapter as checkpoint <run name>
evaluate      = $(EVAL) +checkpoints.$(notdir $1)=$1/adapter guidance_scale=$(GUIDANCE) $3 hydra.run.dir=$2 $(EVAL_ARGS)

$(RUNS)/%/eval/results.json: $(RUNS)/%/$(ADAPTER) | $(STAMP)
	$(call evaluate,$(RUNS)/$*,$(@D))
$(RUNS)/%/val/results.json: $(RUNS)/%/$(ADAPTER) | $(STAMP)
	$(call evaluate,$(RUNS)/$*,$(@D),$(VAL))

# -- make mini-teachers: the mini teachers (docs/results/mini_teachers_v3) ---------------------------------
# One DiffusionNFT run per skill (CFG-free; the recipe that learnt on val in rounds 1 and 2), each for a fixed
# number of optimiser steps (not minutes: the same run on any GPU) with an EMA adapter snapshot every
# SNAPSHOT_EVERY_<skill> steps. Every snapshot and the final adapter are scored on the skill's val prompts, and the best
# one is the teacher (early stopping on val; pick_teachers' RUN/*). A run stopped on the way resumes from its
# last checkpoint (AdamW, EMA and step restored) when make runs again.
TEACHER_SKILLS  := ocr geneval aesthetic
TEACHER_EXP_ocr       := mini/teacher_ocr_nft
TEACHER_EXP_geneval   := mini/teacher_geneval
TEACHER_EXP_aesthetic := mini/teacher_aesthetic_nft
TEACHER_ARGS_ocr      := +reward.ocr.num_workers=$(OCR_WORKERS)
TEACHER_ARGS_geneval   = $(call judges,reward.,geneval_mini)
TEACHER_ARGS_aesthetic = $(call judges,reward.,aesthetic_mini)
TEACHER_STEPS_ocr       ?= 100
# (v3: the GenEval and aesthetic runs learnt for about 300 steps, then fell apart while their KL to the base grew;
# val peaked at steps 350 and 200 and early stopping kept those snapshots. docs/results/mini_teachers_v3)
TEACHER_STEPS_geneval   ?= 500
TEACHER_STEPS_aesthetic ?= 500
# a snapshot every 10 % of the GenEval and aesthetic runs (10 val evaluations each), every quarter of OCR's short one
SNAPSHOT_EVERY_ocr       ?= 25
SNAPSHOT_EVERY_geneval   ?= 50
SNAPSHOT_EVERY_aesthetic ?= 50
# A second candidate run <skill>_nftkl for the skills in KL_SKILLS: the same recipe with DiffusionNFT's velocity
# penalty towards the base (objective.kl_weight, the reference's 1e-4) at TEACHER_KL. At 1e-4 it is nothing next to
# the policy loss (KL ~0.01 while learning, 0.5-3.5 when v3 fell apart). At 1 (v4, KL_SKILLS="geneval aesthetic")
# it held both runs at the base's level on val (docs/results/mini_teachers_v3), so no skill runs it by default;
# its snapshots compete with the _nft run's on val: e.g. make mini-teachers KL_SKILLS=geneval TEACHER_KL=0.05.
KL_SKILLS       ?=
TEACHER_KL      ?= 1.0
# KL_RUNS: more such candidates, each named with its own weight, <skill>_nftkl<weight>: a sweep between the
# reference's 1e-4 and v4's 1, e.g. make mini-teachers KL_RUNS="geneval_nftkl0.1 geneval_nftkl0.01"
KL_RUNS         ?=
# CFG_SKILLS: a candidate run <skill>_nftcfgd per skill named: the same DiffusionNFT recipe, started from a CFG-free
# LoRA that first learnt the base's CFG 4.5 means on the skill's training prompts (<skill>_cfgd: DiffusionOPD with
# the base model as its teacher, CFG_DISTILL_STEPS rounds, the teachers' rank), so that the RL starts near the
# guided base (GenEval-mini 0.207, aesthetic 0.253 on val) instead of the base at CFG 1 (0.143, 0.134). Its
# compute and card count both runs (opd.results.compute follows module.init_adapter).
CFG_SKILLS        ?=
CFG_DISTILL_STEPS ?= 100
CFG_DISTILL_LR    ?= 1e-3
# val scoring of the snapshots: 1 image per prompt, the swapped-prompt control on 16 pairs, no cover search
SNAPSHOT_EVAL   = images_per_prompt=1 controls.cover=null controls.sensitivity_pairs=16
TEACHER_CANDIDATES := $(TEACHER_SKILLS:%=%_nft) $(KL_SKILLS:%=%_nftkl) $(KL_RUNS) $(CFG_SKILLS:%=%_nftcfgd)
TEACHER_ADAPTERS := $(TEACHER_CANDIDATES:%=$(TEACHER_RUNS)/%/$(ADAPTER))
TEACHER_VALS     := $(TEACHER_CANDIDATES:%=$(TEACHER_RUNS)/%/val/results.json)
# the skill of a candidate run <skill>_<variant>
comma := ,
empty :=
space := $(empty) $(empty)
skill_of = $(firstword $(subst _, ,$1))
# the KL weight of a candidate run: <skill>_nftkl<weight> its own, <skill>_nftkl TEACHER_KL, <skill>_nft none
kl_of    = $(if $(findstring _nftkl,$1),$(or $(subst $(call skill_of,$1)_nftkl,,$1),$(TEACHER_KL)))
$(foreach r,$(KL_RUNS),$(if $(and $(filter $(call skill_of,$r),$(TEACHER_SKILLS)),$(findstring _nftkl,$r),\
  $(subst $(call skill_of,$r)_nftkl,,$r)),,$(error KL_RUNS: "$r" is not <skill>_nftkl<weight> with a skill of $(TEACHER_SKILLS), e.g. geneval_nftkl0.1)))
# ckpt_path=last where the run folder holds a checkpoint (a stopped run goes on)
resume = $(if $(wildcard $1/checkpoints/last.ckpt),ckpt_path=last)

$(TEACHER_ADAPTERS): $(TEACHER_RUNS)/%/$(ADAPTER): $(BASE) | $(STAMP)
	$(TRAIN) experiment=$(TEACHER_EXP_$(call skill_of,$*)) $(TEACHER_ARGS_$(call skill_of,$*)) \
	  $(if $(call kl_of,$*),objective.kl_weight=$(call kl_of,$*)) trainer.max_steps=$(TEACHER_STEPS_$(call skill_of,$*)) \
	  $(if $(findstring _nftcfgd,$*),module.init_adapter=$(TEACHER_RUNS)/$(call skill_of,$*)_cfgd/adapter) \
	  trainer.max_time=null callbacks.adapter_snapshots.every_n_steps=$(SNAPSHOT_EVERY_$(call skill_of,$*)) \
	  hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
# the CFG-distilled start of a <skill>_nftcfgd run: the base at CFG 4.5 distilled into a CFG-free LoRA of the teachers' rank
$(foreach s,$(CFG_SKILLS),$(eval $(TEACHER_RUNS)/$(s)_nftcfgd/$(ADAPTER): $(TEACHER_RUNS)/$(s)_cfgd/$(ADAPTER)))
$(CFG_SKILLS:%=$(TEACHER_RUNS)/%_cfgd/$(ADAPTER)): $(TEACHER_RUNS)/%_cfgd/$(ADAPTER): $(BASE) | $(STAMP)
	$(TRAIN) experiment=mini/sopd_$* sampler.guidance_scale=1.0 teacher.$*.adapter=null teacher.$*.guidance_scale=4.5 \
	  module.lora.rank=16 module.lora.alpha=32 module.optimizer.lr=$(CFG_DISTILL_LR) trainer.max_steps=$(CFG_DISTILL_STEPS) \
	  trainer.max_time=null hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
# every snapshot (checkpoint step_NNNNNN) and the final adapter (checkpoint final) on its own task's val prompts
$(TEACHER_VALS): $(TEACHER_RUNS)/%/val/results.json: $(TEACHER_RUNS)/%/$(ADAPTER) | $(STAMP)
	$(EVAL) $(VAL) $(SNAPSHOT_EVAL) $(foreach t,$(filter-out $(call skill_of,$*),$(TEACHER_SKILLS)),'~eval_tasks.$(t)') \
	  '+checkpoints.final={adapter:$(<D),guidance_scale:1.0}' \
	  $$(for d in $(TEACHER_RUNS)/$*/exports/step_*; do [ -d "$$d" ] && printf " +checkpoints.%s={adapter:%s,guidance_scale:1.0}" "$${d##*/}" "$$d"; done) \
	  hydra.run.dir=$(@D) $(EVAL_ARGS)
# each skill's best snapshot among its candidate runs on its own headline metric → $(TEACHER_RUNS)/teachers/<skill>, picked.json
# (TEACHERS=shipped: the shipped teachers as they are, no teacher runs; see make mini-table1)
TEACHERS         ?= trained
SHIPPED_TEACHERS ?= models/mini_teachers
ifeq ($(TEACHERS),shipped)
$(TEACHER_RUNS)/picked.json: | $(STAMP)
	$(PYM) opd.results.pick_teachers --root $(TEACHER_RUNS) --shipped $(SHIPPED_TEACHERS) $(TEACHER_SKILLS)
else
$(TEACHER_RUNS)/picked.json: $(TEACHER_VALS) | $(STAMP)
	$(PYM) opd.results.pick_teachers --root $(TEACHER_RUNS) --dest $(TEACHER_RUNS)/teachers \
	  $(foreach s,$(TEACHER_SKILLS),'$(s)=$(subst $(space),$(comma),$(patsubst %,%/*,$(filter $(s)_%,$(TEACHER_CANDIDATES))))')
endif
# the picked teachers on the test prompts (every control, 4 images per prompt), each at its own CFG scale
$(TEACHER_RUNS)/teacher_%/eval/results.json: $(TEACHER_RUNS)/picked.json | $(STAMP)
	$(EVAL) "$$($(PYM) opd.results.pick_teachers --root $(TEACHER_RUNS) --checkpoint $*)" hydra.run.dir=$(@D) $(EVAL_ARGS)
$(TEACHER_RUNS)/cards/results.md: $(foreach s,$(TEACHER_SKILLS),$(TEACHER_RUNS)/teacher_$(s)/eval/results.json) | $(STAMP)
	$(PYM) opd.results.teacher_cards --runs $(TEACHER_RUNS) --teachers $(TEACHER_RUNS)/teachers --results $(@D) --device "$(DEVICE)"

mini-teachers: $(TEACHER_RUNS)/cards/results.md  ## train, pick on val and card the mini teachers (GPU; make -j3 mini-teachers): RUNS=runs/mini DEVICE="..."
	@echo "mini-teachers: adapters in $(TEACHER_RUNS)/teachers/, cards and results page in $(TEACHER_RUNS)/cards/ (and $(TEACHER_RUNS)/teachers/*/README.md)"

# -- make mini-table1: the mini Table 1 v2 (docs/results/mini_table1) --------------------------------------
# Distils the teachers of make mini-teachers (same folder: their runs' compute counts in the baseline "at
# MOPD's total compute"). Every student is CFG-free like its teachers (mini/mopd_cfg_free; one CFG 4.5 student
# is a comparison row) and trains MOPD_STEPS rounds. Equal tuning budget: the MOPD student and multi-reward RL
# (DiffusionNFT, the student's LoRA rank) each try TUNE_LRS with seed 0, scored on val (mean of the three
# headlines); every later run of the method uses its pick. MOPD (summed and balanced KLs, each with our sum
# over steps and the authors' mean) and multi-reward RL run SEEDS seeds each; multi-reward RL stops at the
# compute of the MOPD run of the same seed (multi_own) and of that run plus its three teachers (multi_total).
# Cascade RL (aesthetic → OCR → GenEval) spends a third of MOPD's compute per stage. All on test at their CFG.
# Shortcuts: TEACHERS=shipped distils the shipped teachers (models/mini_teachers, CFG 1) without make mini-teachers
# (their training compute, for multi-reward RL at MOPD's total compute, is each one's training.json);
# MOPD_LR=1e-3 MULTI_LR=1e-3 skip the tuning runs (the table's picks on val).
MOPD_LR      ?=
MULTI_LR     ?=
SEEDS        ?= 0 1 2
TUNE_LRS     ?= 3e-4 1e-3
MOPD_STEPS   ?= 300
PICKED        = $(TEACHER_RUNS)/picked.json
MOPD_VARIANTS := sum sum_mean balanced balanced_mean
# $(call teachers_of,<skills>): the picked teachers as opd.train overrides
teachers_of   = $$($(PYM) opd.results.pick_teachers --root $(TEACHER_RUNS) --overrides $1)
# $(call budget,<runs>[,<options>]): the model TFLOP those runs spent (opd.results.compute)
budget        = callbacks.compute_budget.max_model_tflop=$$($(PYM) opd.results.compute $1 $2)
STUDENT       = $(TRAIN) trainer.max_steps=$(MOPD_STEPS) trainer.max_time=null
# the baselines train a LoRA of the student's rank
LORA64        = module.lora.rank=64 module.lora.alpha=128
MULTI         = $(TRAIN) experiment=mini/multi_reward_nft +reward.ocr.num_workers=$(OCR_WORKERS) \
                $(call judges,reward.,geneval_mini aesthetic_mini) trainer.max_time=null $(LORA64)
# a cascade stage: multi-reward RL's learning rate, a third of MOPD's compute (seed 0)
CASCADE       = $(TRAIN) trainer.max_time=null $(LORA64) module.optimizer.lr=$$(cat $(RUNS)/multi_lr.txt) \
                $(call budget,$(RUNS)/mopd_sum_seed0,--scale 0.33333)
ALL_SKILLS    = geneval ocr aesthetic
seed_of       = $(lastword $(subst _seed, ,$1))
TUNE_MOPD    := $(foreach lr,$(TUNE_LRS),$(RUNS)/tune_mopd_lr$(lr))
TUNE_MULTI   := $(foreach lr,$(TUNE_LRS),$(RUNS)/tune_multi_lr$(lr))
MOPD_RUNS    := $(foreach v,$(MOPD_VARIANTS),$(foreach n,$(SEEDS),$(RUNS)/mopd_$(v)_seed$(n)))
MULTI_RUNS   := $(foreach b,own total,$(foreach n,$(SEEDS),$(RUNS)/multi_$(b)_seed$(n)))
SOPD_RUNS    := $(foreach s,$(ALL_SKILLS),$(RUNS)/sopd_$(s))
CASCADE_RUNS := $(foreach s,aesthetic ocr geneval,$(RUNS)/cascade_$(s))

$(TUNE_MOPD:%=%/$(ADAPTER)): $(RUNS)/tune_mopd_lr%/$(ADAPTER): $(PICKED) | $(STAMP)
	$(STUDENT) experiment=mini/mopd_cfg_free $(call teachers_of,$(ALL_SKILLS)) module.optimizer.lr=$* seed=0 \
	  hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
$(TUNE_MULTI:%=%/$(ADAPTER)): $(RUNS)/tune_multi_lr%/$(ADAPTER): $(RUNS)/tune_mopd_lr%/$(ADAPTER) | $(STAMP)
	$(MULTI) module.optimizer.lr=$* seed=0 $(call budget,$(RUNS)/tune_mopd_lr$*) hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
ifeq ($(MOPD_LR),)
$(RUNS)/mopd_lr.txt: $(TUNE_MOPD:%=%/val/results.json) | $(STAMP)
	$(PYM) opd.results.pick_setting --out $@ $(foreach lr,$(TUNE_LRS),$(RUNS)/tune_mopd_lr$(lr)=$(lr))
else
$(RUNS)/mopd_lr.txt:
	mkdir -p $(@D) && echo $(MOPD_LR) > $@
endif
ifeq ($(MULTI_LR),)
$(RUNS)/multi_lr.txt: $(TUNE_MULTI:%=%/val/results.json) | $(STAMP)
	$(PYM) opd.results.pick_setting --out $@ $(foreach lr,$(TUNE_LRS),$(RUNS)/tune_multi_lr$(lr)=$(lr))
else
$(RUNS)/multi_lr.txt:
	mkdir -p $(@D) && echo $(MULTI_LR) > $@
endif
# mopd_<weighting>[_mean]_seed<N>: teacher_weighting sum or balanced; _mean: the authors' mean over steps and teachers
$(MOPD_RUNS:%=%/$(ADAPTER)): $(RUNS)/mopd_%/$(ADAPTER): $(RUNS)/mopd_lr.txt | $(STAMP)
	$(STUDENT) experiment=mini/mopd_cfg_free $(call teachers_of,$(ALL_SKILLS)) module.optimizer.lr=$$(cat $<) \
	  module.teacher_weighting=$(firstword $(subst _, ,$*)) objective.step_reduction=$(if $(findstring _mean_,$*),mean,sum) \
	  seed=$(call seed_of,$*) hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
# the same student with CFG 4.5 (the teachers stay CFG-free), summed KLs
$(RUNS)/mopd_cfg_seed0/$(ADAPTER): $(RUNS)/mopd_lr.txt | $(STAMP)
	$(STUDENT) experiment=mini/mopd_aesthetic_ocr_geneval $(call teachers_of,$(ALL_SKILLS)) module.optimizer.lr=$$(cat $<) \
	  module.teacher_weighting=sum seed=0 hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
$(SOPD_RUNS:%=%/$(ADAPTER)): $(RUNS)/sopd_%/$(ADAPTER): $(RUNS)/mopd_lr.txt | $(STAMP)
	$(STUDENT) experiment=mini/sopd_$* sampler.guidance_scale=1.0 $(call teachers_of,$*) module.optimizer.lr=$$(cat $<) seed=0 \
	  hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
# multi-reward RL at the compute of the MOPD run of its seed (own) or of that run and the teachers (total)
$(MULTI_RUNS:%=%/$(ADAPTER)): $(RUNS)/multi_%/$(ADAPTER): $(RUNS)/multi_lr.txt $(foreach n,$(SEEDS),$(RUNS)/mopd_sum_seed$(n)/$(ADAPTER)) | $(STAMP)
	$(MULTI) module.optimizer.lr=$$(cat $<) seed=$(call seed_of,$*) \
	  $(call budget,$(RUNS)/mopd_sum_seed$(call seed_of,$*),$(if $(findstring total,$*),--picked $(PICKED))) \
	  hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
# cascade RL: each stage a third of MOPD's compute (seed 0), continuing the last; groups of equal rewards skipped
$(RUNS)/cascade_aesthetic/$(ADAPTER): $(RUNS)/multi_lr.txt $(RUNS)/mopd_sum_seed0/$(ADAPTER) | $(STAMP)
	$(CASCADE) experiment=mini/cascade_aesthetic $(call judges,reward.,aesthetic_mini) hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
$(RUNS)/cascade_ocr/$(ADAPTER): $(RUNS)/cascade_aesthetic/$(ADAPTER) | $(STAMP)
	$(CASCADE) experiment=mini/cascade_ocr +reward.ocr.num_workers=$(OCR_WORKERS) module.init_adapter=$(<D) \
	  hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
$(RUNS)/cascade_geneval/$(ADAPTER): $(RUNS)/cascade_ocr/$(ADAPTER) | $(STAMP)
	$(CASCADE) experiment=mini/cascade_geneval $(call judges,reward.,geneval_mini) module.init_adapter=$(<D) hydra.run.dir=$(RUN) $(call resume,$(RUN)) $(TRAIN_ARGS)
# every row's evaluation on test (and the tuning runs' on val) at its own CFG: 1, except the CFG student
$(foreach r,$(TUNE_MOPD) $(TUNE_MULTI),$(r)/val/results.json) $(foreach r,$(MOPD_RUNS) $(MULTI_RUNS) $(SOPD_RUNS) $(CASCADE_RUNS),$(r)/eval/results.json): GUIDANCE = 1.0
TABLE1_EVALS := $(foreach r,$(MOPD_RUNS) $(MULTI_RUNS) $(SOPD_RUNS) $(RUNS)/cascade_geneval $(RUNS)/mopd_cfg_seed0,$(r)/eval/results.json) \
                $(foreach s,$(ALL_SKILLS),$(TEACHER_RUNS)/teacher_$(s)/eval/results.json)
TABLE1_STAGES := {"mopd": ["mopd_sum"], "multi_reward_rl": ["multi_own"]}
# (single-quoted in the recipe: no apostrophes in these labels)
TABLE1_EXTRA := {"mopd_sum_mean": {"label": "MOPD, summed KLs, mean over steps and teachers (as the reference script)"}, \
  "mopd_balanced": {"label": "MOPD, balanced KLs"}, \
  "mopd_balanced_mean": {"label": "MOPD, balanced KLs, mean over steps and teachers (as the reference script)"}, \
  "mopd_cfg": {"label": "MOPD, CFG 4.5 student (summed KLs)"}, \
  "multi_total": {"label": "multi-reward RL at the compute of MOPD and its teachers", "teachers": []}}
$(RUNS)/table/results.md: $(TABLE1_EVALS) | $(STAMP)
	$(PYM) opd.results.table1 --runs $(RUNS) --out $(@D) --device "$(DEVICE)" \
	  --stages '$(TABLE1_STAGES)' --extra '$(TABLE1_EXTRA)' --also geneval/geneval_mini ocr/ocr

# make mini-table1-dense: the shares of the teachers' gains again, from DENSE images a prompt. Most of a share's
# interval is image-level noise (docs/results/mini_table1): base, the teachers of DENSE_TASKS (their own task
# each) and every MOPD variant's seeds sample DENSE images per prompt on DENSE_TASKS (images 0-3 are the table's own:
# a noise seed per prompt and image), without controls; the table then takes each share from these evaluations.
DENSE        ?= 16
DENSE_TASKS  ?= geneval aesthetic
# $(call dense,<tasks>): an evaluation of DENSE images per prompt on <tasks> only, no controls
dense         = $(EVAL) images_per_prompt=$(DENSE) controls.cover=null controls.swapped=false controls.sensitivity_pairs=0 \
                $(foreach t,$(filter-out $1,$(ALL_SKILLS)),'~eval_tasks.$(t)')
DENSE_EVALS  := $(RUNS)/base/dense/results.json $(foreach s,$(DENSE_TASKS),$(TEACHER_RUNS)/teacher_$(s)/dense/results.json) \
                $(MOPD_RUNS:%=%/dense/results.json)
$(RUNS)/base/dense/results.json: | $(STAMP)
	$(call dense,$(DENSE_TASKS)) '+checkpoints.base={adapter:null,guidance_scale:4.5}' hydra.run.dir=$(@D) $(EVAL_ARGS)
$(TEACHER_RUNS)/teacher_%/dense/results.json: $(PICKED) | $(STAMP)
	$(call dense,$*) "$$($(PYM) opd.results.pick_teachers --root $(TEACHER_RUNS) --checkpoint $*)" hydra.run.dir=$(@D) $(EVAL_ARGS)
$(MOPD_RUNS:%=%/dense/results.json): $(RUNS)/mopd_%/dense/results.json: $(RUNS)/mopd_%/$(ADAPTER) | $(STAMP)
	$(call dense,$(DENSE_TASKS)) +checkpoints.mopd_$*=$(RUNS)/mopd_$*/adapter guidance_scale=1.0 \
	  hydra.run.dir=$(@D) $(EVAL_ARGS)
$(RUNS)/table_dense/results.md: $(TABLE1_EVALS) $(DENSE_EVALS) | $(STAMP)
	$(PYM) opd.results.table1 --runs $(RUNS) --out $(@D) --device "$(DEVICE)" --dense-base $(RUNS)/base/dense \
	  --stages '$(TABLE1_STAGES)' --extra '$(TABLE1_EXTRA)' --also geneval/geneval_mini ocr/ocr
mini-table1-dense: $(RUNS)/table_dense/results.md  ## mini-table1 with the shares of the teachers' gains from DENSE=16 images a prompt (GPU)
	@echo "mini-table1-dense: $(RUNS)/table_dense/results.md"

# the committed table rebuilt from its run records alone (python -m opd.results.records keeps them), no GPU
RECORDS      ?= docs/results/mini_table1
mini-table1-records: | $(STAMP)  ## rebuild the committed mini Table 1 ($(RECORDS)/table) from its run records ($(RECORDS)/runs): DEVICE="..."
	$(PYM) opd.results.table1 --runs $(RECORDS)/runs --out $(RECORDS)/table --previous $(RECORDS)/table \
	  --dense-base $(RECORDS)/runs/base/dense --device "$(DEVICE)" \
	  --stages '$(TABLE1_STAGES)' --extra '$(TABLE1_EXTRA)' --also geneval/geneval_mini ocr/ocr

mini-table1: $(RUNS)/table/results.md  ## the mini Table 1 v2 from make mini-teachers' teachers (GPU; make -j4 mini-table1): RUNS=runs/mini DEVICE="..."
	@echo "mini-table1: $(RUNS)/table/results.md (runs.json, curves.png beside it); ship the student and its card with python -m opd.results.student_card --runs $(RUNS) --table $(RUNS)/table --run mopd_sum_seed0 --dest <dest>"


lint: $(STAMP)  ## ruff
	$(BIN)/ruff check src tests

clean:  ## remove caches and run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache
