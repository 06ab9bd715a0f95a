# make test: set up .venv if needed, then lint and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format clean demo demo-mlp demo-shift demo-forgetting demo-rank-sweep demo-two-adapters demo-seeds results readme test-time

# constraints.txt pins the versions the committed records were measured with (pip freeze of that venv).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c constraints.txt
	touch $(STAMP)

# The test extra (peft, transformers) goes into a folder that only the tests put on the path:
# installed beside Lightning, transformers is imported by torchmetrics at every `import lightning`.
TEST_LIBS := $(VENV)/test-libs
TEST_STAMP := $(VENV)/.installed-test
$(TEST_STAMP): $(STAMP)
	$(BIN)/python .ci/install_test_extra.py $(TEST_LIBS)
	touch $(TEST_STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The optional test libraries (peft, transformers) are installed above, so their tests must run.
test: lint $(TEST_STAMP)
	PYTHONPATH=$(TEST_LIBS) LIGHTNING_LORA_REQUIRE_EXTRAS=1 $(BIN)/pytest

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

# The experiments (README "Results"). DATA_DIR: a folder holding MNIST/raw/. Every run gets a new
# version folder under runs/<name>/; a fine-tune starts from the latest pretraining run, and the
# report reads the latest fine-tune (nothing earlier is overwritten or removed). A user's run writes
# its record to runs/records/ (git-ignored); `make results` runs them all into benchmarks/results/,
# the committed records, and regenerates the README's tables from them.
DATA_DIR ?= data
EXPERIMENTS := $(BIN)/python -m lightning_lora.experiments
RESULTS ?= runs/records

# Experiment 1: pretrain RichBoyNet, LoRA on digit 9, test adapter on/off, report.
demo: $(STAMP)
	$(EXPERIMENTS).pipeline demo --data-dir $(DATA_DIR) --results $(RESULTS)

# Experiment 2: MLP 784-128-256-10, rank-4 LoRA, merged versus unmerged.
demo-mlp: $(STAMP)
	$(EXPERIMENTS).pipeline demo-mlp --data-dir $(DATA_DIR) --results $(RESULTS)

# Experiment 3: a rank-1 shift of a linear model's weights, recovered by a rank-1 adapter.
demo-shift: $(STAMP)
	$(EXPERIMENTS).pipeline demo-shift --data-dir $(DATA_DIR) --results $(RESULTS)

# Experiment 4: forgetting, and replay / distillation against it (on the demo's base and digit).
demo-forgetting: $(STAMP)
	$(EXPERIMENTS).forgetting --data-dir $(DATA_DIR) --results $(RESULTS)

# Experiment 5: LoRA ranks 1-64 and full fine-tuning on rotated digits: learning vs forgetting.
demo-rank-sweep: $(STAMP)
	$(EXPERIMENTS).rank_sweep --data-dir $(DATA_DIR) --results $(RESULTS)

# Experiment 6: a digit-9 and a digit-4 adapter on one base, served per sample in one batch, and merged.
demo-two-adapters: $(STAMP)
	$(EXPERIMENTS).two_adapters --data-dir $(DATA_DIR) --results $(RESULTS)

# The demo once per seed (5 seeds): each headline number's mean and range.
demo-seeds: $(STAMP)
	$(EXPERIMENTS).pipeline demo-seeds --data-dir $(DATA_DIR) --results $(RESULTS)

# Every experiment again, into the committed records, then the README from them (about 15 minutes).
results: $(STAMP)
	$(MAKE) demo demo-mlp demo-shift demo-forgetting demo-rank-sweep demo-two-adapters demo-seeds RESULTS=benchmarks/results
	$(MAKE) readme

# Only the README's results tables and timings, regenerated from benchmarks/results/*.json.
readme: $(STAMP)
	$(EXPERIMENTS).readme

# Time the test suite for the README (the same run as `make test`).
test-time: lint $(TEST_STAMP)
	PYTHONPATH=$(TEST_LIBS) LIGHTNING_LORA_REQUIRE_EXTRAS=1 $(EXPERIMENTS).pipeline test-suite --results benchmarks/results
