# The two Quick start commands of README.md. Both create .venv in the checkout and install into it
# what they need (torch pinned to the local CPU build: an unpinned torch pulls CUDA packages).
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.routecap-installed
# transformers 5.17 (the GPU device's version) beside the registry's newest: the transformers-facing
# tests run under both. It lives inside .venv too.
COMPAT       := $(VENV)/tf517
COMPAT_STAMP := $(COMPAT)/.routecap-installed
COMPAT_TESTS := tests/test_hf.py tests/test_hf_architectures.py tests/test_hf_routers.py tests/test_hf_topk.py tests/test_replay.py tests/test_replay_grads.py tests/test_trl.py tests/test_builtin.py tests/test_docs.py tests/distributed
OUT    ?= runs/demo

.PHONY: demo test chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

$(COMPAT_STAMP): pyproject.toml $(STAMP)
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install -q torch==2.13.0
	$(COMPAT)/bin/pip install -q -e '.[test]' 'transformers==5.17.0'
	touch $(COMPAT_STAMP)

# The main job: capture routes from the built-in tiny MoE model, write traces and a summary.
demo: $(STAMP)
	$(VENV)/bin/routecap capture --model builtin:tiny-qwen3-moe --prompts examples/prompts.txt --max-new-tokens 16 --out $(OUT) --overwrite

# The numba-backed tests, run a second time with numba's bounds checks (read at import, so in a
# process of their own, with their own cache of compiled kernels): an index past an array then
# fails a test instead of reading memory at random. -m "" runs their slow part too.
NUMBA_TESTS := tests/test_codec.py tests/test_codec_entropy.py tests/test_codec_kernels.py tests/test_golden.py tests/test_route_checks.py tests/test_store_rows.py tests/test_store_step.py

# The whole test suite on every core (pytest-xdist; the multi-process tests fork their ranks from a
# server that imported torch once), then the transformers-facing part again under transformers
# 5.17, and the numba-backed part under bounds checking.
test: $(STAMP) $(COMPAT_STAMP) chromium
	$(VENV)/bin/python -m pytest -q -m "" -n auto
	$(COMPAT)/bin/python -m pytest -q -n auto $(COMPAT_TESTS)
	NUMBA_BOUNDSCHECK=1 NUMBA_CACHE_DIR=.numba-boundscheck $(VENV)/bin/python -m pytest -q -m "" -n auto $(NUMBA_TESTS)

# The report's browser test needs a real Chromium (Debian's package; Playwright drives it, no
# browser download). Installed when missing; if that is impossible the test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1; } || \
	  echo "note: could not install chromium; tests/test_report.py's browser checks will skip"
