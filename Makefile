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
# tests/conftest.py gives one run's workers.
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
pytest: $(STAMP) | $(CHROMIUM) $(SYSTEMD_ANALYZE) $(NSPAWN)
	$(PY) -m compileall -q -j 0 leader nodeagent workstation refserver tlsroll tests bench
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

test: lint typecheck proto-check pytest

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
