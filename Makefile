# The two commands of the README: `make demo` and `make test`. Both set up a fresh machine first.
VENV ?= .venv
STAMP := $(VENV)/.svam-installed

.PHONY: demo test install lint bench clean

demo: install
	$(VENV)/bin/svam demo

test: install
	$(VENV)/bin/python -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every benchmark, one after the other (the reader's reads the tiny run's episodes).
bench: install
	$(VENV)/bin/svam collect
	for script in scripts/bench_*.py; do $(VENV)/bin/python $$script || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
