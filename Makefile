# pmlb: every target sets up what it needs (idempotently) in .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

BENCH_BIN := $(VENV)/bench-bin
BENCH_ARGS ?=

.PHONY: install js-install test-js test-handover test-partitions test-matrix demo test test-containers lint format proto docs bench bench-quick bench-deps bench-etcd bench-cluster image test-deploy fuzz test-faults test-packages soak clean

# The .pyx: the native link transport (pmlb.transport._nghttp2) is built here
# when Cython (fetched by pip), a C compiler and libnghttp2-dev are there;
# without them pmlb runs its links on grpclib and the node says so.
$(STAMP): pyproject.toml constraints.txt node/pmlb/transport/_nghttp2.pyx
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pmlb needs Python 3.11 or newer")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[node,dev]'
	@touch $(STAMP)

install: $(STAMP)

# The Node.js SDK's packages, from its lock file (the main suite tests the SDK).
JS_SDK := node/upstream-js
JS_STAMP := $(JS_SDK)/node_modules/.package-lock.json

$(JS_STAMP): $(JS_SDK)/package-lock.json
	@command -v node >/dev/null || { echo "make: the Node.js SDK's tests need Node.js 20+ and npm (Debian: apt-get install nodejs npm)" >&2; exit 2; }
	cd $(JS_SDK) && npm ci --no-audit --no-fund
	@touch $@

js-install: $(JS_STAMP)

# The Node.js SDK's own unit tests (node:test); the main suite runs them too.
test-js: js-install
	cd $(JS_SDK) && npm test

demo: install
	$(VENV)/bin/pmlb demo

test: install js-install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install js-install
	cd $(JS_SDK) && npm run --silent lint && npm run --silent types
	$(VENV)/bin/ruff check node scripts tests deploy
	$(VENV)/bin/ruff format --check node scripts tests deploy
	$(VENV)/bin/mypy

format: install js-install
	cd $(JS_SDK) && npm run --silent format
	$(VENV)/bin/ruff check --fix node scripts tests deploy
	$(VENV)/bin/ruff format node scripts tests deploy

proto: install
	$(PY) scripts/gen_proto.py

docs: install
	$(PY) scripts/gen_docs.py
	$(PY) scripts/gen_grafana.py

$(BENCH_BIN)/loadgen: scripts/bench/loadgen.c
	@mkdir -p $(BENCH_BIN)
	cc -O2 -Wall -o $@ $<

$(BENCH_BIN)/echo_server: scripts/bench/echo_server.c
	@mkdir -p $(BENCH_BIN)
	cc -O2 -Wall -o $@ $<

bench-deps: install $(BENCH_BIN)/loadgen $(BENCH_BIN)/echo_server
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy)
	@$(PY) -c 'import matplotlib' 2>/dev/null || \
		$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[bench]'

bench: bench-deps
	$(PY) scripts/bench/run.py --bindir $(BENCH_BIN) $(BENCH_ARGS)

# The etcd and cluster integration tests once more against etcd in a container
# (testcontainers, an image built here FROM scratch; needs a running engine).
# The pmlb and etcd images, built without a registry (see scripts/image/).
image: install
	bash scripts/image/build.sh

# Build the images, then run etcd, two upstreams and three nodes in containers.
test-deploy: install
	PMLB_TEST_DEPLOY=1 $(PY) -m pytest tests/deploy $(PYTEST_ARGS)

test-containers: install
	PMLB_TEST_ETCD=container TESTCONTAINERS_RYUK_DISABLED=true $(PY) -m pytest \
		tests/integration/test_etcd_cluster.py tests/integration/test_persistent.py \
		tests/integration/test_advertise.py -k "not static_stability" $(PYTEST_ARGS)

# Every combination of worker count (1, the default) and link transport for the
# modules that run under both (make test runs the pairs that cover each value).
MATRIX_MODULES := tests/integration/test_failover.py tests/integration/test_hostile.py \
	tests/faults/test_upstream_faults.py tests/integration/test_persistent.py \
	tests/integration/test_etcd_cluster.py tests/integration/test_limits.py \
	tests/e2e/test_dns_cluster.py tests/integration/test_dataplane.py \
	tests/faults/test_poison_workers.py tests/faults/test_faults.py \
	tests/integration/test_mqtt.py tests/integration/test_close_reasons.py \
	tests/integration/test_balancers.py tests/integration/test_sdk_parity.py \
	tests/integration/test_sdk_marks.py tests/integration/test_handover.py

test-matrix: install
	PMLB_TEST_MATRIX=full $(PY) -m pytest $(MATRIX_MODULES) $(PYTEST_ARGS)

# Partitions on real network namespaces (root): a few minutes, cleans up after itself.
# The run's figures replace README's partitions table (measured, never pasted).
test-partitions: install
	PMLB_TEST_PARTITIONS=1 PMLB_FIGURES_OUT=.partitions-figures.md $(PY) -m pytest tests/partitions $(PYTEST_ARGS)
	$(PY) scripts/splice_table.py partitions .partitions-figures.md

# The packages as users install them: the built wheel (and sdist) and the npm
# tarball, each installed into an empty project from the registries.
test-packages: install js-install
	PMLB_TEST_PACKAGES=1 $(PY) -m pytest tests/packages $(PYTEST_ARGS)

# Live handover under load (200 streaming + 5,000 idle clients, three handovers,
# a failed and a killed successor); the run's figures replace README's table.
test-handover: install
	PMLB_TEST_HANDOVER=1 PMLB_FIGURES_OUT=.handover-figures.md $(PY) -m pytest tests/handover $(PYTEST_ARGS)
	$(PY) scripts/splice_table.py handover .handover-figures.md

test-faults: install
	$(PY) -m pytest tests/faults tests/integration/test_failover.py \
		tests/integration/test_etcd_cluster.py::test_checker_and_node_death \
		tests/integration/test_persistent.py::test_sigterm_drains_the_node \
		tests/integration/test_dataplane.py::test_client_that_never_reads_stalls_only_itself \
		tests/integration/test_hostile.py::test_a_slow_handler_delays_only_its_own_mark \
		tests/e2e/test_dns_cluster.py $(PYTEST_ARGS)

SOAK_SECONDS ?= 180

soak: install
	$(PY) scripts/soak.py $(SOAK_SECONDS)

FUZZ_SECONDS ?= 30

fuzz: install
	$(PY) scripts/fuzz.py all $(FUZZ_SECONDS)

bench-etcd: install
	$(PY) scripts/bench/put_to_route.py 10

# 20 nodes, 200 upstream registrations, one etcd: what a cluster costs etcd (a few minutes).
bench-cluster: install
	$(PY) scripts/bench/cluster.py $(BENCH_ARGS)

bench-quick: bench-deps
	$(PY) scripts/bench/run.py --bindir $(BENCH_BIN) --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-results $(JS_SDK)/node_modules
