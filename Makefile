# Two commands for a newcomer: `make demo` (end-to-end on the embedded default data) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the builds on this machine's disk (a bare `torch` requirement would fetch GBs).
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	# clip-retrieval's ClipClient for tests/test_serve.py: its pins (open-clip-torch<3, numpy<2) would downgrade ours
	$(BIN)/python -m pip install -q --no-deps clip-retrieval==2.45.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m clipkit.demo --output-dir demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check clipkit data_prep train eval index serve tests bench

clean:
	rm -rf demo_out .pytest_cache
