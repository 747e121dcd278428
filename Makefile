# The two commands of the README. Both set everything up in .venv first (idempotent).
.PHONY: setup train test

export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/metabolic/torch_extensions

setup:
	@bash scripts/setup.sh

train: setup
	.venv/bin/metabolic train configs/fmnist_cnn.yaml resume=true $(ARGS)

test: setup
	bash scripts/run_tests.sh $(ARGS)
