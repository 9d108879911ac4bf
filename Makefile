# Two entry points for a fresh machine: `make train` (the main job) and `make test`.
# Each creates or reuses .venv and installs what it needs by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/default
ARGS ?=

.PHONY: install train test lint format clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The default corpus is the King James Bible from Debian's bible-kjv package; where apt is not
# available (or we are not root) training falls back to Python's own pydoc text.
bible:
	@command -v bible >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  [ "$$(id -u)" = 0 ] && apt-get install -y -qq bible-kjv >/dev/null 2>&1 || \
	  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bible-kjv >/dev/null 2>&1); } || \
	  echo "bible-kjv not installed: training will use dataset=pydoc"

train: $(STAMP) bible
	$(PY) -m dynmoe_jax.main --config=dynmoe_jax/configs/default.py --workdir=$(WORKDIR) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
