# Two entry points that work on a fresh CPU machine: `make quickstart` (the main job) and `make test`.
# The venv pins the local CPU torch wheel first: an unpinned torch request pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_CPU ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: install quickstart test clean

$(BIN)/hass-deploy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_CPU)
	$(BIN)/pip install --quiet -e '.[dev,onnx]'
	touch $@

install: $(BIN)/hass-deploy

# For now the main job runs speculative decoding on a random target the command makes itself,
# checks it against plain decoding, and prints both; the trained-draft quickstart replaces it.
quickstart: install
	$(BIN)/hass-deploy init-target --out $(DEMO)/target --force
	$(BIN)/hass-deploy init-draft --target $(DEMO)/target --out $(DEMO)/draft --force
	$(BIN)/hass-deploy generate --target $(DEMO)/target --draft $(DEMO)/draft --prompt-ids 1,2,3,4,5 --max-new-tokens 64 --json
	$(BIN)/hass-deploy generate --target $(DEMO)/target --no-draft --prompt-ids 1,2,3,4,5 --max-new-tokens 64 --json

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)
