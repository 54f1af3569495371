"""Boot a real systemd in a container around the installed appliance (for test_systemd.py).

* ``build_rootfs()`` runs ``tests/nspawn/mkrootfs.sh`` (cached Debian bookworm rootfs with
  the appliance's dependencies in /opt/appliance/venv, plus this checkout's wheel) with
  ``netns.run_outside``, in the network namespace pytest came from: the test process itself
  lives in a private one (conftest.py) where no mirror is reachable.
* ``Container`` boots it with ``systemd-nspawn --boot --volatile=overlay --private-network``
  (the cached tree is never written; the container reaches no network at all), finds its
  init process and runs commands inside with ``nsenter``: ``systemctl``, ``journalctl``,
  ``appliance status``, exactly as an operator on a kiosk would.
* ``install_appliance()`` does what the image builder does: the wheel into the venv, the
  units, sysusers.d, tmpfiles.d and udev rule from ``systemd/`` into /usr/lib, then enables.

Every wait is a poll with a deadline; ``Container.stop()`` always tears everything down.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from appliance.dev import netns

__all__ = [
    "REPO",
    "Container",
    "HarnessError",
    "build_rootfs",
    "install_appliance",
    "unavailable_reason",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[1]
MKROOTFS = REPO / "tests" / "nspawn" / "mkrootfs.sh"
UNITS = REPO / "systemd"
PATH_INSIDE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/appliance/venv/bin"

T = TypeVar("T")


class HarnessError(RuntimeError):
    pass


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.25) -> T:
    """Poll ``probe`` until it returns something truthy; fail saying what was awaited."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            value = probe()
        except subprocess.SubprocessError as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}"
                               + (f" (last error: {last})" if last else ""))
        time.sleep(interval_s)


def unavailable_reason() -> str | None:
    """Why systemd-nspawn cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root: systemd-nspawn boots a container (CI runs as root)"
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter"):
        if shutil.which(tool) is None:
            package = {"systemd-nspawn": "systemd-container", "nsenter": "util-linux"}.get(tool, tool)
            return f"{tool} is not installed (apt-get install {package})"
    return None


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def build_rootfs(out_dir: Path, timeout_s: float = 900) -> tuple[Path, Path, float]:
    """(rootfs, appliance wheel, seconds taken); the rootfs comes from the cache when warm."""
    started = time.monotonic()
    # in the namespace pytest came from: a cold cache fetches from the Debian mirror and PyPI
    result = netns.run_outside([str(MKROOTFS), str(out_dir)], capture_output=True, text=True,
                               timeout=timeout_s)
    if result.returncode != 0:
        raise HarnessError(f"{MKROOTFS.name} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    rootfs = Path(result.stdout.strip().splitlines()[-1])
    wheels = sorted(out_dir.glob("appliance-*.whl"))
    if not rootfs.is_dir() or len(wheels) != 1:
        raise HarnessError(f"{MKROOTFS.name} gave {rootfs} and {wheels}:\n{result.stderr[-2000:]}")
    return rootfs, wheels[0], time.monotonic() - started


def _ns_pid(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = _parent_pid(int(entry))
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


class Container:
    """One booted systemd-nspawn container; use as a context manager."""

    def __init__(self, rootfs: Path, binds: Sequence[tuple[Path, str]] = (), name: str = "appliance-ci") -> None:
        self.rootfs, self.binds, self.name = rootfs, list(binds), name
        self.workdir = Path(tempfile.mkdtemp(prefix="appliance-nspawn-"))
        self.console = self.workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Container:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, boot_timeout_s: float = 90) -> None:
        argv = [
            "systemd-nspawn", "--quiet", "--boot", "--keep-unit", "--register=no",
            "--volatile=overlay", "--private-network", f"--machine={self.name}",
            f"--directory={self.rootfs}", "--console=passive", "--link-journal=no",
            *(f"--bind-ro={src}:{dst}" for src, dst in self.binds),
        ]  # fmt: skip
        with open(self.console, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.leader = wait_for("the container's init process", self._find_leader, 30)
        state = wait_for("the container to finish booting", self._booted, boot_timeout_s, 0.5)
        if state not in ("running", "degraded"):
            raise HarnessError(f"container boot ended {state!r}: {self.run('systemctl', '--failed', check=False).stdout}")

    def _find_leader(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise HarnessError(f"systemd-nspawn exited {self.proc.returncode}: {self.console_text()[-2000:]}")
        for child in _children(self.proc.pid):
            if _ns_pid(child)[-1:] == [1]:
                return child
        return None

    def _booted(self) -> str | None:
        result = self.run("systemctl", "is-system-running", check=False, timeout=10)
        state = result.stdout.strip()
        return None if state in ("", "initializing", "starting") or "Failed to connect" in result.stderr else state

    def stop(self, timeout_s: float = 30) -> None:
        """Power the container off (SIGTERM to nspawn = orderly shutdown), then make sure."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                if self.leader is not None:
                    try:
                        os.kill(self.leader, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ commands inside

    def run(self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        if self.leader is None:
            raise HarnessError("container not started")
        environment = {"PATH": PATH_INSIDE, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb",
                       "LANG": "C.UTF-8", **(env or {})}
        full = ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i",
                *(f"{k}={v}" for k, v in environment.items()), *argv]
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise HarnessError(f"`{shlex.join(argv)}` exited {result.returncode}:\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-euc", script, check=check, timeout=timeout)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        self.run("/bin/sh", "-euc", f'mkdir -p "$(dirname {shlex.quote(path)})"; cat > {shlex.quote(path)}; '
                 f"chmod {mode:o} {shlex.quote(path)}", input=text)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, unit: str, name: str) -> str:
        return self.show(unit, name).get(name, "")

    def journal(self, unit: str, *extra: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", "--no-pager", "-o", "json", "-u", unit, *extra, timeout=30).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def messages(self, unit: str, *extra: str) -> list[str]:
        return [str(entry.get("MESSAGE", "")) for entry in self.journal(unit, *extra)]

    def appliance_status(self) -> dict[str, Any] | None:
        result = self.run("/opt/appliance/venv/bin/appliance", "status", "--json", check=False, timeout=30)
        return json.loads(result.stdout) if result.returncode == 0 else None


def install_appliance(container: Container, wheel_inside: str, units_inside: str) -> None:
    """What the image builder does with a wheel and systemd/ (see image-build/)."""
    container.sh(rf"""
        /opt/appliance/venv/bin/pip install -qq --no-deps --no-index --force-reinstall {wheel_inside}
        cd {units_inside}
        enable=""
        for f in *.service *.socket *.timer *.path *.target; do
            [ -e "$f" ] || continue
            install -m 0644 "$f" /usr/lib/systemd/system/
            if grep -q '^\[Install\]' "$f"; then enable="$enable $f"; fi
        done
        install -D -m 0644 -t /usr/lib/sysusers.d sysusers.d/*.conf
        install -D -m 0644 -t /usr/lib/tmpfiles.d tmpfiles.d/*.conf
        install -D -m 0644 -t /usr/lib/udev/rules.d udev/*.rules
        systemd-sysusers
        systemd-tmpfiles --create
        systemctl daemon-reload
        systemctl enable --quiet $enable
    """, timeout=180)
