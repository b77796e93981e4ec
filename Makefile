# Two entry points on a fresh clone: `make demo` and `make test`.
# Each creates .venv (Python 3.11) if absent and installs the package with its test, serving and beam extras
# (beam: tests/test_beam_build.py; it pins protobuf to 6.x, see README "Building the shards on Apache Beam").

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,serving,beam]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m caaxr_tf.demo --out demo_output

# Two test processes: most of the suite's time is single-threaded graph tracing and saving.
# Then the numerics-sensitive tests again with oneDNN off: another kernel set, the cheapest stand-in
# for another CPU, so a float tolerance that holds for one kernel set only fails here, not on a user's machine.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2
	TF_ENABLE_ONEDNN_OPTS=0 $(BIN)/python -m pytest -q -n 2 -m "numerics and not slow"

clean:
	rm -rf demo_output .pytest_cache
