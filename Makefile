# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test check lint typecheck unit interop bench clean qemu10 guest vm-matrix verify faults fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/multifd demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks fuzz
	$(PY) -m ruff format --check src tests benchmarks fuzz

typecheck: $(STAMP)
	$(PY) -m mypy

unit: $(STAMP)
	$(PY) -m pytest -m 'not interop'

# QEMU 10.0 from Debian 13, unpacked into .cache/qemu10 (no-op once there).
qemu10:
	bash scripts/qemu10.sh

# The real guest of the VM tests (Debian 12 cloud kernel + busybox initramfs) in .cache/guest.
guest:
	bash scripts/guest.sh

interop: $(STAMP) qemu10 guest
	$(PY) -m pytest -m interop

test: lint typecheck verify qemu10 guest
	$(PY) -m pytest

# The sync handshake checked for every interleaving by SPIN (docs/sync-protocol.md);
# the Python explorer runs in the suite (tests/model).
verify:
	bash scripts/verify.sh

# Every real-VM case (relay, record/replay, direct) against QEMU 7.2 and 10.0.
vm-matrix: $(STAMP) qemu10 guest
	$(PY) -m pytest -m vm

# Every fault x side x phase cell (the default suite runs a reduced set); docs/reliability.md.
faults: $(STAMP)
	$(PY) -m pytest -m faults tests/faults

# Coverage-guided fuzzing of the receive path (atheris), seeded from fuzz/corpus.
fuzz: $(STAMP)
	$(PY) -m pip install --quiet 'atheris>=3.0'
	mkdir -p .cache/fuzz-corpus .cache/fuzz-crashes
	nice -n 19 $(PY) fuzz/fuzz_receiver.py .cache/fuzz-corpus fuzz/corpus -max_len=65536 \
		-timeout=30 -runs=20000 -artifact_prefix=.cache/fuzz-crashes/

bench: $(STAMP) qemu10 guest
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/convergence.py
	$(PY) benchmarks/mixed.py
	$(PY) benchmarks/relay_pause.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .cache
