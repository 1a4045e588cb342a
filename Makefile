# Two commands for a fresh Debian/Ubuntu machine with Python 3.11+:
#   make demo   set up .venv and run a whole batch job on embedded defaults
#   make test   set up .venv (with the dev tools) and the test servers, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test lint

demo: $(VENV)/.installed-runtime
	$(BIN)/batchinfer demo

test: $(VENV)/.installed-dev debian-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Where the machine keeps a CPU build of torch 2.13.0 among pip's local wheels, install it
# before the project so that pip does not download a multi-GB CUDA build; elsewhere this
# step finds nothing and pip picks a torch for the machine (torch>=2.5).
$(VENV)/.torch: | $(BIN)/python
	-$(BIN)/pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null
	touch $@

$(VENV)/.installed-runtime: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed-runtime

# Debian packages the tests start as real servers (and the browser that looks at Flower).
.PHONY: debian-packages
debian-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "The tests need these Debian packages:$$missing — install them: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi
