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

# The experiments (README "Results"). DATA_DIR: a folder holding MNIST/raw/.
DATA_DIR ?= data
LL := $(BIN)/lightning-lora
QUIET := --trainer.enable_progress_bar false

# Experiment 1: pretrain RichBoyNet, LoRA on digit 9, test adapter on/off, report.
demo: $(STAMP)
	rm -rf runs/pretrain/demo runs/finetune_lora/demo
	$(LL) fit -c configs/pretrain.yaml --data.data_dir $(DATA_DIR) --trainer.logger.init_args.version demo $(QUIET)
	$(LL) fit -c configs/finetune_lora.yaml --data.data_dir $(DATA_DIR) --trainer.logger.init_args.version demo $(QUIET)
	$(LL) test -c configs/finetune_lora.yaml --data.data_dir $(DATA_DIR) --trainer.logger.init_args.version demo \
		--ckpt_path runs/finetune_lora/checkpoints/last.ckpt $(QUIET)
	$(LL) report --base runs/pretrain/checkpoints/last.ckpt --finetuned runs/finetune_lora/checkpoints/last.ckpt \
		--data-dir $(DATA_DIR) --out runs/finetune_lora/demo

# Experiment 2: MLP 784-128-256-10, rank-4 LoRA, merged versus unmerged.
demo-mlp: $(STAMP)
	rm -rf runs/mlp_pretrain/demo runs/mlp_finetune_lora/demo
	$(LL) fit -c configs/mlp_pretrain.yaml --data.data_dir $(DATA_DIR) --trainer.logger.init_args.version demo $(QUIET)
	$(LL) fit -c configs/mlp_finetune_lora.yaml --data.data_dir $(DATA_DIR) --trainer.logger.init_args.version demo $(QUIET)
	$(LL) merge --ckpt runs/mlp_finetune_lora/checkpoints/last.ckpt --out runs/mlp_finetune_lora/demo/merged.pt2
	$(LL) report --base runs/mlp_pretrain/checkpoints/last.ckpt --finetuned runs/mlp_finetune_lora/checkpoints/last.ckpt \
		--merged runs/mlp_finetune_lora/demo/merged.pt2 --data-dir $(DATA_DIR) --out runs/mlp_finetune_lora/demo

# Experiment 3: a rank-1 shift of a linear model's weights, recovered by a rank-1 adapter.
demo-shift: $(STAMP)
	rm -rf runs/shift_pretrain/demo runs/shift_finetune_lora/demo
	$(LL) fit -c configs/shift_pretrain.yaml --trainer.logger.init_args.version demo $(QUIET)
	$(LL) fit -c configs/shift_finetune_lora.yaml --trainer.logger.init_args.version demo $(QUIET)
	$(LL) report --base runs/shift_pretrain/checkpoints/last.ckpt \
		--finetuned runs/shift_finetune_lora/checkpoints/last.ckpt --out runs/shift_finetune_lora/demo
