# Two commands do everything on a fresh Debian 12 machine:
#   make run    set up, then run the appliance on its embedded defaults (dev server, reference avatar)
#   make test   set up, then run the whole test suite (includes ruff and mypy)
# Others: make demo (record the avatar speaking to demo.mp4), make bench, make config,
#         make image ARCH=amd64|arm64 [BOARD=rpi4], make image-test ARCH=...

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := python3-venv python3-dev gcc pkg-config portaudio19-dev libsystemd-dev \
                espeak-ng sox iproute2 systemd mmdebstrap systemd-container \
                genimage mtools dosfstools e2fsprogs zstd xz-utils qemu-system-x86 ovmf \
                qemu-system-arm qemu-efi-aarch64 qemu-user-static chromium \
                libsdl2-2.0-0 libegl1 libgles2 libegl-mesa0 libgl1-mesa-dri libgbm1 \
                xvfb x11-apps openssh-client \
                $(if $(shell command -v npm),,nodejs npm)
# The dev server's browser viewer (livekit-client) and the browser test's driver
# (playwright-core): versions pinned in its package-lock.json.
WEB := appliance/dev/server/web
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

ARCH  ?= amd64
BOARD ?=

.PHONY: setup run demo test bench bench-ladder config image image-test clean

setup: $(VENV)/.installed $(WEB)/node_modules/.installed

# Debian packages: only those missing are installed (needs root or sudo).
.apt-stamp: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(VENV)/.installed: pyproject.toml .apt-stamp
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

$(WEB)/node_modules/.installed: $(WEB)/package.json $(WEB)/package-lock.json .apt-stamp
	npm ci --prefix $(WEB) --no-audit --no-fund --loglevel=error
	@touch $@

run: setup
	$(VENV)/bin/appliance run --dev

demo: setup
	$(VENV)/bin/appliance demo --out demo.mp4

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m appliance.dev.bench

bench-ladder: setup
	$(PY) -m appliance.dev.bench_ladder

config: setup
	$(VENV)/bin/appliance config defaults > config/appliance.toml

# Flashable images (root): ARCH=amd64 | arm64 [BOARD=rpi4]; output in image-build/out/
image: .apt-stamp
	$(SUDO) image-build/build.sh --arch $(ARCH) $(if $(BOARD),--board $(BOARD))

image-test: .apt-stamp
	$(SUDO) image-build/image-test.sh $(ARCH) $(BOARD)

clean:
	rm -rf $(VENV) .apt-stamp .pytest_cache .mypy_cache .ruff_cache
