# make test: set up .venv if needed, then lint and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format clean demo demo-mlp demo-shift

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,test]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The optional test libraries (peft, transformers) are installed above, so their tests must run.
test: lint
	LIGHTNING_LORA_REQUIRE_EXTRAS=1 $(BIN)/pytest

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

# The experiments (README "Results"). DATA_DIR: a folder holding MNIST/raw/. Every run gets a new
# version folder under runs/<name>/; a fine-tune starts from the latest pretraining run, and the
# report reads the latest fine-tune (nothing earlier is overwritten or removed).
DATA_DIR ?= data
LL := $(BIN)/lightning-lora

# Experiment 1: pretrain RichBoyNet, LoRA on digit 9, test adapter on/off, report.
demo: $(STAMP)
	$(LL) fit -c configs/pretrain.yaml --data.data_dir $(DATA_DIR)
	$(LL) fit -c configs/finetune_lora.yaml --data.data_dir $(DATA_DIR)
	$(LL) test -c configs/finetune_lora.yaml --data.data_dir $(DATA_DIR) --ckpt_path runs/finetune_lora
	$(LL) report --finetuned runs/finetune_lora --data-dir $(DATA_DIR)

# Experiment 2: MLP 784-128-256-10, rank-4 LoRA, merged versus unmerged.
demo-mlp: $(STAMP)
	$(LL) fit -c configs/mlp_pretrain.yaml --data.data_dir $(DATA_DIR)
	$(LL) fit -c configs/mlp_finetune_lora.yaml --data.data_dir $(DATA_DIR)
	$(LL) merge --ckpt runs/mlp_finetune_lora --out runs/mlp_finetune_lora/merged.safetensors
	$(LL) report --finetuned runs/mlp_finetune_lora --merged runs/mlp_finetune_lora/merged.safetensors \
		--data-dir $(DATA_DIR)

# Experiment 3: a rank-1 shift of a linear model's weights, recovered by a rank-1 adapter.
demo-shift: $(STAMP)
	$(LL) fit -c configs/shift_pretrain.yaml
	$(LL) fit -c configs/shift_finetune_lora.yaml
	$(LL) report --finetuned runs/shift_finetune_lora
