# lbwatch: set-up, tests, demo and benchmarks. Run as root on a Debian/Ubuntu host:
#   sudo make demo    set everything up, run the two-node lab demo, tear it down
#   sudo make demo-systemd   the same on two nodes booted by systemd, lbwatch from its .deb
#   sudo make test    set everything up, run ruff, mypy, deb-check and the tests (the e2e lab
#                     included)
#   sudo make bench   failover, idle CPU, memory, notification, config-sync and split-brain
#                     figures (sync: two and three nodes, and its cost at idle; split brain:
#                     resolved by lbwatch against left alone), and the clients' failed
#                     requests per drain/undrain against keepalived stopped
#   sudo make bench-systemd   failover and idle figures on nodes booted by systemd (lbwatch from
#                     its .deb), with lbwatch and with systemd alone, beside the bare lab's
#   sudo make chaos   a seeded fault-injection soak with invariants (SEED=1 MINUTES=30)
#   sudo make chaos-baseline   the soak with the pair's faults, then on the same schedule the
#                     seed's scripts instead of lbwatch, side by side (SEED, MINUTES, PROFILE)
#   sudo make chaos-systemd   the same soak on the systemd tier (SEED, MINUTES as for chaos)
#   make deb          dist/lbwatch_VERSION_ARCH.deb (see packaging/build-deb)
#   sudo make deb-check   build it, install it on this machine and check the installed lbwatch

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Everything the tests and the lab need from Debian; haproxy and keepalived are the real daemons;
# vim is one of the real editors the config watcher is tested with; libseccomp2 (and setpriv from
# util-linux) rebuild the unit's syscall filter and capability set in the tests; bubblewrap (with
# setpriv and prlimit) confines the check of a config received from a peer; systemd-container
# (systemd-nspawn) boots the systemd tier's nodes (tests/systemd, make demo-systemd); tcpdump
# times VRRP advertisements and gratuitous ARPs on the lab's bridge (bench/failover.py).
APT_PACKAGES := haproxy keepalived rsync openssh-server iproute2 psmisc procps util-linux \
                systemd systemd-container python3-venv openssl vim libseccomp2 bubblewrap \
                tcpdump
# The approaches bench/sync.py compares lbwatch with.
BENCH_PACKAGES := inotify-tools lsyncd

.PHONY: deps apt venv tools lint test test-fast test-py39 demo demo-systemd bench bench-systemd \
	chaos chaos-baseline chaos-systemd deb deb-check clean

deps: apt venv tools

apt:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		$(APT_PACKAGES) >/dev/null

venv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'

# promtool (Prometheus's rule checker, rule unit tests and metrics linter) from Debian's
# prometheus package: only the binary is taken out of the .deb, so no Prometheus server is
# installed or started on the machine.
tools: .tools/promtool

.tools/promtool:
	rm -rf .tools/deb && mkdir -p .tools/deb
	cd .tools/deb && apt-get download -qq prometheus 2>/dev/null
	dpkg-deb -x .tools/deb/prometheus_*.deb .tools/deb/x
	cp .tools/deb/x/usr/bin/promtool .tools/promtool
	rm -rf .tools/deb
	.tools/promtool --version >/dev/null

lint:
	$(VENV)/bin/ruff check lbwatch tests bench
	$(VENV)/bin/ruff format --check lbwatch tests bench
	$(VENV)/bin/mypy

test: deps lint deb-check
	$(PY) -m pytest -q

# Without the apt step and the e2e lab: for a quick loop while editing.
test-fast: lint
	$(PY) -m pytest -q -m "not e2e"

# The oldest supported Python (RHEL 9's): unit and integration tests in a separate venv.
PY39 ?= python3.9
test-py39:
	test -x .venv39/bin/python || $(PY39) -m venv .venv39
	.venv39/bin/python -m pip install -q -e '.[test]'
	.venv39/bin/python -m pytest -q -p no:cacheprovider -m "not e2e"

demo: deps
	$(PY) -m tests.lab

# The same story on nodes booted by systemd, lbwatch installed from the package (built first).
demo-systemd: deps deb
	$(PY) -m tests.lab.sysdemo

bench: deps
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		$(BENCH_PACKAGES) >/dev/null
	$(PY) bench/failover.py
	$(PY) bench/memory.py
	$(PY) bench/notify.py
	$(PY) bench/notify_cli.py
	$(PY) bench/notify_lab.py
	$(PY) bench/sync.py --three-nodes
	$(PY) bench/sync_idle.py
	$(PY) bench/drain.py
	$(PY) bench/splitbrain.py

# bench/failover.py --systemd: the nodes are containers (systemd-nspawn, from systemd-container)
# running Debian's haproxy and keepalived units and the lbwatch package built from this checkout
# (when dist/ has none of its sources); RUNS faults of each kind per mode, figures in JSON too.
RUNS ?= 5
bench-systemd: deps
	@$(call apt-ensure,systemd-container)
	$(PY) bench/failover.py --systemd --runs $(RUNS) --json failover-systemd.json

# The chaos soak: the schedule is a function of SEED; JSON figures in chaos-SEED-PROFILE.json.
SEED    ?= 1
MINUTES ?= 30
PROFILE ?= classic
chaos: deps
	$(PY) bench/chaos.py --seed $(SEED) --minutes $(MINUTES) --profile $(PROFILE) \
		--json chaos-$(SEED)-$(PROFILE).json

# The soak with the pair's faults (--overlap), then the same schedule with the seed's scripts
# instead of lbwatch, and both side by side; figures in chaos-baseline-SEED-PROFILE.json.
chaos-baseline: deps
	$(PY) bench/chaos.py --seed $(SEED) --minutes $(MINUTES) --profile $(PROFILE) --overlap \
		--baseline seed --json chaos-baseline-$(SEED)-$(PROFILE).json

# The same soak with each node booted by systemd and lbwatch from its package (the .deb built
# from this checkout when dist/ has none as fresh); figures in chaos-systemd-SEED.json.
chaos-systemd: deps
	$(PY) bench/chaos.py --systemd --seed $(SEED) --minutes $(MINUTES) \
		--json chaos-systemd-$(SEED).json

# The Debian package. The version is the one lbwatch/__init__.py says (pyproject.toml reads it
# from there too); packaging/build-deb takes it from the wheel it builds.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' lbwatch/__init__.py)
# The Debian packages named in $(1) that are not installed, installed (as root); nothing, and no
# root needed, when all are there.
apt-ensure = missing=$$(for p in $(1); do dpkg-query -W -f '$${db:Status-Status}\n' $$p 2>/dev/null \
		| grep -qx installed || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

deb:
	@$(call apt-ensure,python3-venv)
	packaging/build-deb

# The package as a node gets it: installed with apt, then the installed command, the shipped
# config and the unit checked. --reinstall: a package rebuilt with the same version replaces the
# installed one, so a second run checks the new build; --allow-downgrades: so does an older
# checkout's. The installed /etc/lbwatch/lbwatch.toml is kept if changed on this machine
# (confold), as a node's would be. Another apt run on the machine is waited for (its lock). Leaves
# lbwatch installed, neither enabled nor started; the tests use .venv's lbwatch and pass
# --config, never these.
deb-check: deb
	@$(call apt-ensure,systemd)
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall --allow-downgrades \
		-o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confold \
		./dist/lbwatch_*.deb >/dev/null
	@v=$$(/usr/bin/lbwatch --version); [ "$$v" = "lbwatch $(VERSION)" ] || { echo \
		"deb-check: /usr/bin/lbwatch --version says '$$v'; lbwatch/__init__.py says $(VERSION)" \
		>&2; exit 1; }
	/usr/bin/lbwatch --config /etc/lbwatch/lbwatch.toml check-config
	@# verify exits 0 on a line it cannot parse and only says so; PID 1 need not be systemd.
	@out=$$(systemd-analyze verify /lib/systemd/system/lbwatch.service 2>&1) && [ -z "$$out" ] \
		|| { echo "deb-check: systemd-analyze verify /lib/systemd/system/lbwatch.service:" >&2; \
		echo "$$out" >&2; exit 1; }
	@echo "deb-check: $$(dpkg-query -W -f '$${Package} $${Version}' lbwatch) installed and checked"

clean:
	rm -rf $(VENV) .venv39 .tools .mypy_cache .ruff_cache .pytest_cache *.egg-info build dist
