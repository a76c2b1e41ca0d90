# The README's commands. Each one sets up .venv first (idempotent, offline-safe).
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup course test lab
setup:
	bash scripts/setup.sh

course: setup
	$(VENV)/bin/lora-nb course --workspace runs/course

test: setup
	$(VENV)/bin/python -m pytest -q --durations=15

lab: setup
	$(VENV)/bin/jupyter lab notebooks
