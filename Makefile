# One target per stage; each installs first when .venv is missing or out of date.
#   make pretrain | sft | reward | ppo | dpo | grpo | rlhf | all     ARGS="hydra overrides"  NPROC=N  ACCELERATE_CONFIG=file
#   make chat MODEL=ppo:latest                                        talk to a checkpoint
#   make eval MODEL=ppo:latest [TASKS=t1,t2]                          lm-eval benchmarks, recorded on the entry
#   make test | test-all | bench | install                TORCH=torch (a CUDA build) on a GPU machine

SHELL := /bin/bash
PYTHON ?= python3
# The CPU build by default (small, and what a laptop or CI needs); `make install TORCH=torch` for CUDA.
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
NPROC ?= 1
ACCELERATE_CONFIG ?=

# accelerate gives each process one CPU thread unless told otherwise: share the cores out.
THREADS := $(shell n=$$(( $$(nproc) / $(NPROC) )); echo $$(( n > 0 ? n : 1 )))

ifeq ($(ACCELERATE_CONFIG),)
  ifeq ($(NPROC),1)
    LAUNCH_FLAGS := --num_processes 1
  else
    LAUNCH_FLAGS := --multi_gpu --num_processes $(NPROC)
  endif
  LAUNCH_FLAGS += --num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process $(THREADS)
else
  LAUNCH_FLAGS := --config_file $(ACCELERATE_CONFIG) $(if $(filter command line environment,$(origin NPROC)),--num_processes $(NPROC)) \
    --num_cpu_threads_per_process $(THREADS)
endif
LAUNCH := $(VENV)/bin/accelerate launch --quiet $(LAUNCH_FLAGS) -m
# One process on its own needs no launcher: the environment `accelerate launch` would give it, and the stage
# module at once, without a second interpreter importing torch before it.
ifeq ($(ACCELERATE_CONFIG)$(NPROC),1)
  LAUNCH := env OMP_NUM_THREADS=$(THREADS) ACCELERATE_MIXED_PRECISION=no ACCELERATE_DYNAMO_BACKEND=no $(PY) -m
endif
# Hydra takes -m (--multirun) only before the overrides: move it there wherever ARGS has it.
STAGE_ARGS = $(filter -m --multirun,$(ARGS)) $(filter-out -m --multirun,$(ARGS))

.PHONY: install lock pretrain sft reward ppo dpo grpo rlhf all chat eval compare report test test-all test-faults bench overopt registry clean-venv

install: $(STAMP)

# Installs take the exact versions of the lock, constraints.txt: those the whole test suite last passed with
# (torch aside: TORCH picks the build). LOCK=none installs the newest versions pyproject.toml's ranges allow;
# `make lock` writes the lock from the installed ones, once `make test-all` passes on them.
LOCK ?= constraints.txt
PIP := $(PY) -m pip install --quiet --disable-pip-version-check $(if $(filter none,$(LOCK)),,--constraint $(LOCK))

# The [eval] extra (lm-eval), for make eval and the whole test suite.
EVAL_STAMP := $(VENV)/.installed-eval
$(EVAL_STAMP): $(STAMP)
	$(PIP) -e ".[dev,eval]"
	touch $(EVAL_STAMP)

$(STAMP): pyproject.toml Makefile $(filter-out none,$(LOCK))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev]"
	touch $(STAMP)

lock:
	( echo "# The versions \`make test-all\` passed with (torch aside): make install's constraints. Refresh: make install" \
	  "LOCK=none, make test-all, make lock."; \
	  $(PY) scripts/lock.py ) > $(LOCK)

pretrain: install
	$(LAUNCH) stages.pretrain $(STAGE_ARGS)

sft: install
	$(LAUNCH) stages.sft $(STAGE_ARGS)

reward: install
	$(LAUNCH) reward_model.train $(STAGE_ARGS)

ppo: install
	$(LAUNCH) stages.ppo $(STAGE_ARGS)

# The other alignment methods on the same SFT start: DPO from preference pairs; GRPO (or algorithm=rloo)
# against the reward model and/or reward functions.
dpo: install
	$(LAUNCH) stages.dpo $(STAGE_ARGS)

grpo: install
	$(LAUNCH) stages.grpo $(STAGE_ARGS)

rlhf: reward ppo

# The whole pipeline as one run: every stage under one PIPELINE_ID (its wandb group), each finding its
# input in the registry, then the summary table and the report (PIPELINE_HOME/pipelines/PIPELINE_ID/).
# STAGES="pretrain sft reward ppo dpo grpo rloo" adds the other alignment methods, compared in the report.
# BENCHMARKS=demo (or lm-eval task names) evaluates every model of the run on them before the report: the
# alignment tax, in the report's benchmark table.
STAGES ?= pretrain sft reward ppo
BENCHMARKS ?=
all: install $(if $(BENCHMARKS),$(EVAL_STAMP))
	$(PY) -m pipeline.all --launch "$(LAUNCH)" --stages "$(STAGES)" $(if $(BENCHMARKS),--benchmarks $(BENCHMARKS)) \
		-- $(ARGS)

# Talk to a checkpoint: MODEL=ppo:latest (a registry reference, a directory or a hub id); ARGS="--prompt ..." for one
# answer, ARGS="--prompts in.jsonl --out out.jsonl" for a file of prompts (python -m pipeline.chat --help).
MODEL ?= ppo:latest
chat: install
	$(PY) -m pipeline.chat --model $(MODEL) $(ARGS)

# Standard benchmarks through lm-evaluation-harness on a checkpoint, recorded on its entry: MODEL=ppo:latest,
# TASKS=t1,t2 (default: the demo's own tasks, offline), LIMIT=N items per task (python -m pipeline.evaluate --help).
TASKS ?= demo
LIMIT ?=
eval: $(EVAL_STAMP)
	$(PY) -m pipeline.evaluate --model $(MODEL) --tasks $(TASKS) $(if $(LIMIT),--limit $(LIMIT)) $(ARGS)

# The alignment entries tuned from one SFT entry, side by side: SFT=sft:latest (a table and gold_by_method.png).
SFT ?= sft:latest
compare: install
	$(PY) -m pipeline.compare $(SFT)

# The report of a pipeline run: PIPELINE_ID=... (default: the newest).
report: install
	$(PY) -m pipeline.report $(PIPELINE_ID)

# Test files run on TEST_WORKERS processes (pytest-xdist; a file's tests stay together, sharing its fixtures).
TEST_WORKERS ?= 2

# The fast lane for the edit-test loop: no test marked slow (those run a stage).
test: install
	$(PY) -m pytest -q -m "not slow and not faults" -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The whole suite: every stage run for real at micro sizes, the pipeline end to end (what CI runs).
test-all: $(EVAL_STAMP)
	$(PY) -m pytest -q -m "not faults" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Fault injection: every stage killed after its first save and resumed to the uninterrupted run's model, and killed at
# ten random points of its life, the registry checked after each, then rerun to completion (long).
test-faults: install
	$(PY) -m pytest -q -m faults $(PYTEST_ARGS)

# Speed against a bare PyTorch loop and the machine's matmul peak: a table and $PIPELINE_HOME/bench.json.
bench: install
	$(PY) -m bench.run $(ARGS)

# Reward over-optimisation (bench/overopt.py): long PPO and GRPO runs against a reward ensemble, unguarded and with
# the conservative reward, on two seeds; $PIPELINE_HOME/overopt.json and overopt.png. Needs `make sft` first.
overopt: install
	$(PY) -m bench.overopt $(ARGS)

registry: install
	$(PY) -m pipeline.registry list

clean-venv:
	rm -rf $(VENV)
