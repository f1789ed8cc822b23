# The two Quick start commands of README.md. Both create .venv in the checkout and install into it
# what they need (torch pinned to the local CPU build: an unpinned torch pulls CUDA packages).
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.routecap-installed
OUT    ?= runs/demo

.PHONY: demo test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

# The main job: capture routes from the built-in tiny MoE model, write traces and a summary.
demo: $(STAMP)
	$(VENV)/bin/routecap capture --model builtin:tiny-qwen3-moe --prompts examples/prompts.txt --max-new-tokens 16 --out $(OUT) --overwrite

# The whole test suite.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
