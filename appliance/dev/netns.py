"""Private network namespaces for media tests.

WebRTC (both libwebrtc inside the livekit SDK and aiortc) ignores the loopback
interface, and tests may only send traffic to loopback or to addresses inside a
namespace they created themselves.  So the test process moves itself into a fresh
network namespace that holds `lo` and one veth pair with two private addresses;
nothing in it routes anywhere else.

`setns()` only moves the calling thread; threads and child processes created
afterwards inherit its namespace.  That is why `enter()` must run on the main
thread before anything (the livekit FFI runtime, aiortc's executors) starts a
thread: see `tests/conftest.py` (in `pytest_configure`) and `appliance/bench.py`.

Some work must still reach the outside world from such a process (an image or
rootfs build on a cold cache fetches Debian packages and wheels). `enter()` keeps a
handle on the namespace the process came from, opened *before* it left, and
`run_outside()` runs a command there. Keeping the handle matters: the host's
namespace cannot be found again afterwards on machines where `/proc/1/ns/net` is
unreadable, and a parent process may have left already.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CLONE_NEWNET = 0x40000000

# The namespace this process lived in before enter(): an open fd, or None if it never left.
_origin_fd: int | None = None

# The same addresses in every namespace is fine: namespaces never see each other.
HOST_A = "10.213.0.1"
HOST_B = "10.213.0.2"
PREFIX_LEN = 24


@dataclass(frozen=True)
class Netns:
    name: str
    host_a: str = HOST_A
    host_b: str = HOST_B

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"


def available() -> tuple[bool, str]:
    """Whether this process can create namespaces, and if not, why."""
    if os.geteuid() != 0:
        return False, "media tests need root to create a network namespace (ip netns)"
    if shutil.which("ip") is None:
        return False, "media tests need iproute2 (`ip`) to create a network namespace"
    return True, ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def remove_stale(prefix: str = "lkdev") -> None:
    """Delete namespaces left behind by test processes that were killed."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != prefix or not parts[1].isdigit():
            continue
        if not os.path.exists(f"/proc/{parts[1]}"):
            remove(Netns(name=name))


def create(prefix: str = "lkdev") -> Netns:
    """Create a uniquely named namespace with `lo` and a veth pair, both ends up."""
    remove_stale(prefix)
    ns = Netns(name=f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    _ip("netns", "add", ns.name)
    try:
        _ip("-n", ns.name, "link", "set", "lo", "up")
        _ip("-n", ns.name, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b")
        _ip("-n", ns.name, "addr", "add", f"{ns.host_a}/{PREFIX_LEN}", "dev", "veth-a")
        _ip("-n", ns.name, "addr", "add", f"{ns.host_b}/{PREFIX_LEN}", "dev", "veth-b")
        _ip("-n", ns.name, "link", "set", "veth-a", "up")
        _ip("-n", ns.name, "link", "set", "veth-b", "up")
    except BaseException:
        remove(ns)
        raise
    return ns


def enter(ns: Netns) -> None:
    """Move the calling thread (and everything it starts later) into `ns`."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("netns.enter() must run on the main thread")
    global _origin_fd
    libc = ctypes.CDLL(None, use_errno=True)
    origin = os.open("/proc/self/ns/net", os.O_RDONLY) if _origin_fd is None else None
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns.path}): {os.strerror(err)}")
    except BaseException:
        if origin is not None:
            os.close(origin)
        raise
    finally:
        os.close(fd)
    if origin is not None:
        _origin_fd = origin


def outside_argv(argv: Sequence[str]) -> tuple[list[str], tuple[int, ...]]:
    """``argv`` wrapped to run in the namespace this process came from, and the fds the
    child must inherit for that. Unchanged when the process never entered a namespace."""
    if _origin_fd is None:
        return list(argv), ()
    if shutil.which("nsenter") is None:
        raise RuntimeError("running a command outside the private network namespace needs"
                           " nsenter (apt-get install util-linux)")
    # nsenter opens the inherited fd as its own /proc/self/fd/N
    return ["nsenter", f"--net=/proc/self/fd/{_origin_fd}", "--", *argv], (_origin_fd,)


def run_outside(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` in the namespace this process came from (where the network is):
    for builds that fetch packages while the rest of the process stays private."""
    wrapped, fds = outside_argv(argv)
    kwargs["pass_fds"] = tuple(kwargs.get("pass_fds", ())) + fds
    return subprocess.run(wrapped, **kwargs)


def remove(ns: Netns) -> None:
    """Delete the namespace (the veth pair goes with it)."""
    subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
