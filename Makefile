# Two entry points used by the README Quick start and by CI (.ci/run calls `make test`).
# TORCH_SPEC: on a CPU machine the pinned CPU build; on a GPU machine pass TORCH_SPEC=torch to keep your own
# (the venv then sees the interpreter's site-packages, so pip finds that torch installed and leaves it).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS = $(if $(filter torch,$(TORCH_SPEC)),--system-site-packages)
PROMPT ?= The quick brown fox
BIN = $(VENV)/bin

$(BIN)/deltaserve: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: demo test
demo: $(BIN)/deltaserve  ## set up, build the embedded tiny checkpoint, generate
	$(BIN)/deltaserve generate --prompt "$(PROMPT)" --max-tokens 32

test: $(BIN)/deltaserve  ## set up and run every CPU test tier
	$(BIN)/python -m pytest -q
