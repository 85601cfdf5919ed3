# Two commands do all the set-up on a fresh machine:
#   make run    relaywatch on the example config (SQLite queue, SMTP on 127.0.0.1:2525)
#   make test   the whole test suite
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test test-unit sink bench bench-smoke clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(VENV)/bin/relaywatch serve -c examples/relaywatch.toml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The pure, table-tested part alone (tests/unit/, marker `unit`): about a minute.
test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests/unit

# A destination for the example's on-premises connector (127.0.0.1:2526) that prints what it gets.
sink: $(STAMP)
	$(VENV)/bin/python -m aiosmtpd -n -l 127.0.0.1:2526 -c aiosmtpd.handlers.Debugging

bench: $(STAMP)
	$(VENV)/bin/python bench/run.py

bench-smoke: $(STAMP)
	$(VENV)/bin/python bench/run.py --smoke

clean:
	rm -rf $(VENV) data
