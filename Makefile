# `make test`, `make main` and `make demo` each set up .venv on a fresh machine, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all main demo clean

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests --durations=25

test-all: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q tests --runslow

# The main job: the built-in digits teacher's baselines, a 4-step LCM-LoRA distilled from it, both evaluated,
# the leaderboard printed and its HTML page written (runs/bench-quick/leaderboard.html).
main: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/distill bench experiments/bench_digits_quick.yaml

# A two-minute smoke run on a tiny random teacher (noise-like images: it proves the plumbing, not quality).
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/distill train experiments/demo.yaml
	HF_HUB_OFFLINE=1 $(BIN)/distill generate runs/demo --steps 4 --prompts experiments/prompts/digits.txt \
		--out runs/demo/samples

clean:
	rm -rf $(VENV) runs
