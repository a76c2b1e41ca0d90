# The README's commands. Each one sets up .venv first (idempotent, offline-safe).
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup course test lab
setup:
	bash scripts/setup.sh

# One torch thread per notebook: the toy model trains no faster on two (docs/performance.md, "The course's own job").
COURSE_THREADS ?= 1
course: setup
	OMP_NUM_THREADS=$(COURSE_THREADS) $(VENV)/bin/lora-nb course --workspace runs/course

# The suite runs in TEST_WORKERS processes of one torch thread each (kernels and subprocesses included).
TEST_WORKERS ?= 2
test: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

lab: setup
	$(VENV)/bin/jupyter lab notebooks
