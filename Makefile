.PHONY: setup demo test bench
VENV := .venv/bin

setup:
	scripts/setup.sh

# the main job on the embedded default: prepare the synthetic DeRTa dataset, train the tiny model, show the effect
demo: setup
	$(VENV)/derta demo --output runs/demo

test: setup
	$(VENV)/python -m pytest -q tests

bench: setup
	for b in bench/*.py; do $(VENV)/python $$b || exit 1; done
