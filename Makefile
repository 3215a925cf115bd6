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

# Two pytest-xdist workers (one per core here), a test file each at a time (module fixtures built once); the slowest
# tests are listed at the end so a slow CI run says where its time went.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=25

lint: $(STAMP)
	$(BIN)/ruff check clipkit data_prep train eval index serve tests bench

clean:
	rm -rf demo_out .pytest_cache
