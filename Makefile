# hyperrun: `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

# Debian packages hyperrun and its tests need on the host.
APT_PACKAGES := qemu-system-x86 qemu-utils linux-source-6.1 build-essential flex bison bc \
	libelf-dev libssl-dev dwarves erofs-utils busybox-static crun binutils xz-utils \
	docker-registry skopeo umoci runc apache2-utils openssl debootstrap \
	containernetworking-plugins iptables iproute2 curl \
	python3-venv procps kmod util-linux passwd e2fsprogs

.PHONY: setup apt venv bytecode cni-config vmm-user proto kernel guest assets demo test test-kvm test-unit bench check clean fuzz

setup: apt venv bytecode cni-config vmm-user

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "Debian packages: all present"; fi

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# hyperrun's own modules compiled ahead: where PYTHONDONTWRITEBYTECODE is
# set, every CLI call would compile them again (measured: 16 ms of a 300 ms
# `run` from the pool). A source newer than its .pyc is compiled as usual.
bytecode: venv
	$(PY) -m compileall -q hyperrun

# A default CNI network (bridge hyperrun0, 10.89.0.0/16, portmap, firewall)
# where /etc/cni/net.d has none; an admin's config always wins.
cni-config: venv
	@if [ "$$(id -u)" = 0 ]; then $(PY) -m hyperrun.network install-config; \
	else echo "not root: pods will use user-mode networking"; fi

# The unprivileged user QEMU runs as when hyperrun runs as root
# (hyperrun/vm/privileges.py); without it, QEMU runs as root.
vmm-user:
	@if [ "$$(id -u)" != 0 ]; then echo "not root: QEMU runs as the invoking user"; \
	elif id -u hyperrun-vmm >/dev/null 2>&1; then echo "user hyperrun-vmm: present"; \
	else useradd --system --user-group --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin hyperrun-vmm && echo "user hyperrun-vmm: created"; fi

proto: venv
	$(PY) hyperrun/proto/generate.py

kernel: setup
	$(PY) kernel-config/build.py

guest: setup
	$(PY) agent/build_image.py

assets: kernel guest

check: venv
	$(VENV)/bin/hyperrun check

demo: assets
	$(PY) -m hyperrun.demo

test: assets
	$(PY) -m pytest -v -rs tests

# The tests marked `kvm`, with KVM and the vsock agent channel: on this host
# where it has both, else in an L1 VM under TCG with nested SVM (its image
# built once from Debian packages and cached; tests/nested/lane.py).
test-kvm: assets
	$(PY) -m tests.nested.lane

test-unit: venv
	$(PY) -m pytest -v tests/unit

# The hostile-input property suites (tests/property) with a much larger
# budget than `make test` gives them, and a random seed (printed; pass
# HYPERRUN_FUZZ_SEED to replay one). HYPERRUN_FUZZ_EXAMPLES sets the budget.
fuzz: venv
	@seed=$${HYPERRUN_FUZZ_SEED:-$$RANDOM$$RANDOM}; echo "hypothesis seed: $$seed"; \
	HYPERRUN_FUZZ_EXAMPLES=$${HYPERRUN_FUZZ_EXAMPLES:-20000} \
		$(PY) -m pytest -q -rsx --timeout=0 --hypothesis-seed=$$seed tests/property

# `make bench` runs every section but scale; `make bench SECTION...` those
# (start images cri network density scale); STEPS=10,30 MODES=template for
# scale's pod counts and kinds of VM; BENCH_ARGS passes more ("-n 5").
BENCH_SECTIONS := start images cri network density scale
bench: assets
	$(PY) -m hyperrun.bench $(filter $(BENCH_SECTIONS),$(MAKECMDGOALS)) \
		$(if $(STEPS),--steps $(STEPS)) $(if $(MODES),--modes $(MODES)) $(BENCH_ARGS)

ifneq ($(filter bench,$(MAKECMDGOALS)),)
$(filter $(BENCH_SECTIONS),$(MAKECMDGOALS)):
	@:
endif

clean:
	rm -rf build
