# The README's two set-up commands: `make demo` and `make test`.
# Both install into a project virtualenv (.venv): our top-level packages `cli`
# and `db` have generic names that would collide in a shared site-packages.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := .demo

.PHONY: demo test install system-deps clean

$(BIN)/egress: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/egress

# The main job on the bundled default: a dependency install recorded in the lab
# (examples/lab-incident/record.py) that also opened a reverse SSH tunnel over 443
# and mined; replayed against the task's purpose, stored, audited and explained.
# Exit status 10 means "violations found", which is what this capture shows.
demo: install
	$(BIN)/egress purpose check examples/lab-incident/purpose.toml
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/egress replay examples/lab-incident/incident.pcap --local 10.99.0.2/32 \
	    --purpose examples/lab-incident/purpose.toml --db $(DEMO)/egress.db || [ $$? -eq 10 ]
	$(BIN)/egress audit --db $(DEMO)/egress.db --task deps-install --no-events || [ $$? -eq 10 ]
	$(BIN)/egress explain --finding reverse-ssh-tunnel --db $(DEMO)/egress.db

system-deps:
	./tests/system-deps.sh

test: system-deps install
	$(BIN)/pytest

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
