# The two commands of the README: `make demo` and `make test`. Both set up a fresh machine first.
VENV ?= .venv
STAMP := $(VENV)/.svam-installed

.PHONY: demo test install lint bench clean

demo: install
	$(VENV)/bin/svam demo

test: install
	$(VENV)/bin/python -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(VENV)/bin/python scripts/bench_collect.py
	$(VENV)/bin/python scripts/bench_reader.py

clean:
	rm -rf $(VENV) runs .pytest_cache
