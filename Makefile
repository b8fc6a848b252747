# tlsroll — the two commands a newcomer needs:
#   make demo   start a leader and three nodes on 127.0.10.1-3 and run the main job
#   make test   install everything into .venv and run lint, types, proto drift and all tests
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The browser tests (tests/test_viewer.py) drive Debian's Chromium through Playwright, which
# must never download a browser of its own.
CHROMIUM := /usr/bin/chromium
# tests/test_deploy.py checks the systemd units with Debian's systemd-analyze and runs them
# under systemd in a container (systemd-nspawn).
SYSTEMD_ANALYZE := /usr/bin/systemd-analyze
NSPAWN := /usr/bin/systemd-nspawn
# The multiprocess tests mostly wait on daemons (a run with one worker per core left a third of
# the CPU idle): two pytest workers per core (pytest-xdist), at most 6, the loopback ranges
# tests/conftest.py gives one run's workers. (Five on 2 cores ran slower, session 73, the same
# tree in the same hour: pytest 1180 s against 1118 s, its tests' summed time 5797 s against 4404.)
PYTEST_WORKERS := $(shell n=$$(( $$(nproc) * 2 )); echo $$(( n > 6 ? 6 : n )))
PYTEST_ARGS ?= -n $(PYTEST_WORKERS)
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: fault-matrix test demo lint typecheck proto proto-check pytest bench bench-rollout bench-agents bench-floor bench-schema clean dist man completions

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(STAMP)
	$(VENV)/bin/mypy

proto: $(STAMP)
	$(PY) tools/protogen.py

proto-check: $(STAMP)
	$(PY) tools/protogen.py --check

# The tests start thousands of daemons and CLI processes from this tree: compiled once here, as
# pip compiles an installed tlsroll, or each of them compiles every module it imports again
# where PYTHONDONTWRITEBYTECODE is set (as on the CI machine): up to half a second of CPU each.
# Where it is set, pytest keeps no test module as it rewrote it for its asserts either: each
# worker rewrote all of them again as it collected, 17 s of CPU a worker before its first test
# (session 70: 21.6 s against 4.3 s of CPU to collect, 4 workers on 2 cores: about 35 s of the
# run's wall time). Rewritten once here by a collection that may write them (pytest checks each
# against its source, and reads them with the variable set), the modules split over the cores.
PY_SOURCES := $(shell find leader nodeagent workstation refserver tlsroll tests bench -name '*.py')
TEST_MODULES := $(sort $(wildcard tests/test_*.py))
NPROC := $(shell nproc)
READY := $(VENV)/.pytest-ready
$(READY): $(STAMP) $(PY_SOURCES) pyproject.toml
	$(PY) -m compileall -q -j 0 leader nodeagent workstation refserver tlsroll tests bench
	@echo "pytest --collect-only: the test modules rewritten for their asserts, once"
	@printf '%s\n' $(TEST_MODULES) | env -u PYTHONDONTWRITEBYTECODE xargs -P $(NPROC) \
	  -n $$(( ($(words $(TEST_MODULES)) + $(NPROC) - 1) / $(NPROC) )) \
	  $(VENV)/bin/pytest -q --collect-only -p no:cacheprovider -p no:xdist >/dev/null || true
	touch $@

pytest: $(READY) | $(CHROMIUM) $(SYSTEMD_ANALYZE) $(NSPAWN)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Installed once when missing (CI runs as root on a fresh machine); `make demo` does not need it.
$(CHROMIUM):
	@if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "make: the browser tests need $(CHROMIUM): install Debian's chromium package (as root: apt-get install chromium)" >&2; \
	  exit 1; \
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation
	@test -x $(CHROMIUM) || { echo "make: apt-get installed chromium, but $(CHROMIUM) is missing" >&2; exit 1; }

$(SYSTEMD_ANALYZE):
	@if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "make: the deploy tests need $(SYSTEMD_ANALYZE): install Debian's systemd package (as root: apt-get install systemd)" >&2; \
	  exit 1; \
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd
	@test -x $(SYSTEMD_ANALYZE) || { echo "make: apt-get installed systemd, but $(SYSTEMD_ANALYZE) is missing" >&2; exit 1; }

$(NSPAWN): | $(SYSTEMD_ANALYZE)
	@if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "make: the deploy tests need $(NSPAWN): install Debian's systemd-container package (as root: apt-get install systemd-container)" >&2; \
	  exit 1; \
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd-container
	@test -x $(NSPAWN) || { echo "make: apt-get installed systemd-container, but $(NSPAWN) is missing" >&2; exit 1; }

# The static checks side by side with the tests' preparation ($(READY)): mypy alone keeps one
# core busy for some 20 s. A check that fails stops the run before the tests, as before.
test: $(STAMP)
	$(MAKE) --no-print-directory -j 2 --output-sync=target lint typecheck proto-check $(READY)
	$(MAKE) --no-print-directory pytest

# Man pages and shell completion files, made from the click commands, for an installer to copy:
# dist/man/*.1 (to /usr/share/man/man1/) and dist/completions/bash/tlsroll,
# dist/completions/zsh/_tlsroll, dist/completions/fish/tlsroll.fish (README "Version, licence,
# man pages, shell completion"; the bundle carries them and install.sh copies them).
man: $(STAMP)
	$(PY) tools/manpages.py --out dist/man

completions: $(STAMP)
	$(PY) tools/completions.py --out dist/completions

# The release bundle dist/tlsroll-VERSION-cpXY-ARCH.tar.gz: install.sh, the units and a wheelhouse
# that installs offline (deploy/dist.py says why not a .deb). DIST_PYTHONS="3.12" adds wheels
# for another CPython (Ubuntu 24.04).
DIST_PYTHONS ?=
dist: $(STAMP)
	$(PY) deploy/dist.py $(foreach v,$(DIST_PYTHONS),--python-version $(v))

demo: $(STAMP)
	$(PY) deploy/demo.py

# Every fault × step × mode of tests/test_fault_matrix.py (make test runs one seeded step per
# fault, the modes rotated over the faults); TLSROLL_FAULT_SEED=N picks other moments. One
# module, its steps spread over the workers
# (--dist load: tests/conftest.py would hand the whole module to one worker); only with -n (or
# PYTEST_ARGS="-p no:xdist", no workers, would not know the option) and no --dist of PYTEST_ARGS.
fault-matrix: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS) $(if $(filter --dist% -d,$(PYTEST_ARGS)),,$(if $(filter -n% --numprocesses%,$(PYTEST_ARGS)),--dist load)) -m fault_matrix tests/test_fault_matrix.py

bench: $(STAMP)
	$(PY) bench/run.py

# End to end on N real nodes, with the Ansible baseline in the same run (the bench extra).
N ?= 10
RUNS ?= 3
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench-rollout: $(BENCH_STAMP)
	$(PY) -m bench.rollout --nodes $(N) --runs $(RUNS)

# One real leader, 50-500 simulated agents (bench/simagents.py).
NODES ?= 50,200,500
bench-agents: $(STAMP)
	$(PY) -m bench.simagents --nodes $(NODES)

# What gRPC for Python costs by itself here (a message, a PING, a call, a channel): the floor.
bench-floor: $(STAMP)
	$(PY) -m bench.grpc_floor

# `tlsroll schema show` with 100 stored rollouts.
bench-schema: $(STAMP)
	$(PY) -m bench.schema_show

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo
