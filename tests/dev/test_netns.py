"""The private network namespace of the test process, and the way out of it (issue 9.1).

conftest.py moves pytest into a namespace with no route anywhere; builds that must fetch on a
cold cache (image, nspawn rootfs) run through ``netns.run_outside``, in the namespace pytest
came from. That must work without reading /proc/1/ns/net (unreadable on some machines).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.dev import netns

NEED_NETWORK = Path(__file__).resolve().parents[2] / "image-build" / "need-network"


def test_run_outside_reaches_the_namespace_pytest_came_from(media_host: str) -> None:
    ours = os.readlink("/proc/self/ns/net")
    outside = netns.run_outside(["readlink", "/proc/self/ns/net"], capture_output=True, text=True,
                                check=True).stdout.strip()
    assert outside.startswith("net:[") and outside != ours
    # and it is a namespace with more than our private veth pair: the one the machine uses
    links = netns.run_outside(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "veth-a" not in links, links


def test_children_stay_private_unless_asked(media_host: str) -> None:
    inside = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert inside == os.readlink("/proc/self/ns/net")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare to make a namespace without network")
def test_need_network_says_why_in_one_line() -> None:
    done = subprocess.run(["unshare", "-n", str(NEED_NETWORK), "wheels", "PyPI (dependency wheels)",
                           "https://pypi.org/simple"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("step 'wheels' needs PyPI (dependency wheels) but cannot reach"
                               " https://pypi.org/simple (pypi.org:443: "), lines[0]


def test_need_network_accepts_local_sources() -> None:
    done = subprocess.run([str(NEED_NETWORK), "rootfs", "a local mirror", "file:///srv/mirror"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
