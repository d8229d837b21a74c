# Set-up is idempotent: a fresh clone needs nothing but python3 (3.11+) and network to PyPI.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch 2.13.0 is what our machines provide; on a CUDA machine set TORCH_SPEC
# to the torch build you want (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.specdec-installed

.PHONY: setup demo test test-all test-fast clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,bench,server]"
	touch $(STAMP)

# The main job: AR vs speculative decoding on the default Qwen pair (first run downloads
# ~1.6 GB and converts the GGUF files once, a few minutes; later runs start in seconds).
demo: setup
	$(BIN)/specdec models fetch qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct
	$(BIN)/specdec demo --max-new-tokens 64

# The suite without the slow real-model end-to-end checks (under ~10 minutes on 2 cores).
test: setup
	SPECDEC_REQUIRE_KERNELS=1 $(BIN)/python -m pytest -m "not slow"

# Everything, the slow checks included.
test-all: setup
	SPECDEC_REQUIRE_KERNELS=1 $(BIN)/python -m pytest

# Without the tests that need the real SmolLM2 model (offline machines).
test-fast: setup
	$(BIN)/python -m pytest -m "not real and not slow"

clean-venv:
	rm -rf $(VENV)
