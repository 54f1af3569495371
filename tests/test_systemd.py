"""appliance.service under a real systemd 252 (Debian 12), driven through systemctl.

The container tests boot a Debian bookworm rootfs (``tests/nspawn/mkrootfs.sh``, cached in
/var/cache/appliance-ci) with ``systemd-nspawn --boot --volatile=overlay --private-network``,
install this checkout's wheel into /opt/appliance/venv and the units from ``systemd/`` the
way the image builder does, and then act as an operator would: ``systemctl start``,
``reload``, ``stop``, ``status``, ``journalctl``. The container has no network at all, so
the kiosk sits in its "waiting for network" state (frames flow regardless: READY and the
watchdog depend on the renderer, not on the room).

The tests below share one booted container and run in file order; each says what state it
expects and leaves. They need root (CI runs as root); elsewhere they are skipped, saying why.
In CI (``CI`` set) a missing tool or a container that cannot boot is a failure, not a skip.
The pure-Python tests of ``appliance.config.boot`` and the offline security score run anywhere.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import boot as bootconfig

sys.path.insert(0, os.path.dirname(__file__))
from systemd_harness import (  # noqa: E402  (tests/ is not a package)
    REPO,
    Container,
    HarnessError,
    build_rootfs,
    install_appliance,
    unavailable_reason,
    wait_for,
)

UNIT = "appliance.service"
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".path", ".target")
MAX_EXPOSURE = 3.0
IN_CI = bool(os.environ.get("CI"))

# the kiosk's config, as an operator would write it on the boot partition (imported as the
# highest layer, so the room, which the reload test changes in a drop-in, is not set here)
BOOT_TOML = """\
[livekit]
url = "ws://127.0.0.1:7880"
identity = "kiosk-ci"
api_key = "APIci"
api_secret_file = "livekit-secret"
"""
# a drop-in that is a symlink to a file the daemon's directory watch does not look at, so a
# change to it reaches the daemon only through `systemctl reload` (SIGHUP)
ROOM_TARGET = "/etc/appliance/ci-room.conf"
ROOM_DROPIN = "/etc/appliance/appliance.d/50-ci-room.toml"
_SECRET = "ci-livekit-secret-" + secrets.token_hex(16)

# a cold rootfs build (mmdebstrap + dependency wheels) is part of the first container test
pytestmark = pytest.mark.timeout(900)


# ---------------------------------------------------------------------------------- offline


def test_security_exposure_offline() -> None:
    """The unit file alone (no root, no container): systemd-analyze's offline estimate."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    for unit in ("appliance.service", "appliance-boot-config.service"):
        result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                                 str(REPO / "systemd" / unit)], capture_output=True, text=True)
        exposure = _exposure(result.stdout, unit)
        assert exposure <= MAX_EXPOSURE, result.stdout


def _exposure(output: str, unit: str) -> float:
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", output)
    assert match, f"no exposure level for {unit} in:\n{output[-2000:]}"
    return float(match.group(1))


def test_bootconfig_imports_a_valid_file(tmp_path: Path) -> None:
    boot, etc, dest = tmp_path / "boot.toml", tmp_path / "etc.toml", tmp_path / "state" / "boot-config.toml"
    etc.write_text('[livekit]\nroom = "from-etc"\n')
    # written on Windows: byte order mark and CRLF line ends
    boot.write_bytes(b'\xef\xbb\xbf[livekit]\r\nroom = "from-boot"\r\n')
    result = bootconfig.import_boot_config(boot, etc, tmp_path / "no-dropins", dest)
    assert result.imported and result.exit_code == 0, result
    assert dest.read_text() == '[livekit]\nroom = "from-boot"\n'
    assert etc.read_text() == '[livekit]\nroom = "from-etc"\n'  # the operator's file is not touched
    again = bootconfig.import_boot_config(boot, etc, tmp_path / "no-dropins", dest)
    assert not again.imported and "already imported" in again.message


def test_bootconfig_refuses_an_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    boot, etc, dest = tmp_path / "boot.toml", tmp_path / "etc.toml", tmp_path / "boot-config.toml"
    dest.write_text('[livekit]\nroom = "previous"\n')
    boot.write_text('[livekit]\nroom = "new"\nrooom = "typo"\n')
    code = bootconfig.main(["--boot", str(boot), "--etc", str(etc), "--dropins", str(tmp_path),
                            "--dest", str(dest)])
    err = capsys.readouterr().err
    assert code == 3
    assert f"{boot}:3: [livekit] rooom: unknown key" in err and "did you mean `room`?" in err
    assert dest.read_text() == '[livekit]\nroom = "previous"\n'  # the previous import stays


def test_bootconfig_missing_secret_is_a_warning(tmp_path: Path) -> None:
    boot, dest = tmp_path / "boot.toml", tmp_path / "boot-config.toml"
    boot.write_text(f'[livekit]\napi_key = "k"\napi_secret_file = "{tmp_path}/absent"\n')
    result = bootconfig.import_boot_config(boot, tmp_path / "etc.toml", tmp_path, dest)
    assert result.imported and result.exit_code == 0
    assert [w.key for w in result.warnings] == ["[livekit] api_secret_file"]


# ------------------------------------------------------------------------ the container


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"systemd container tests cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(rootfs, appliance wheel, its directory); cached rootfs, fresh wheel."""
    if os.geteuid() != 0:
        pytest.skip("needs root: systemd-nspawn boots a container (CI runs as root)")
    reason = unavailable_reason()
    if reason:
        _unavailable(reason)
    out = tmp_path_factory.mktemp("appliance-wheel")
    rootfs, wheel, seconds = build_rootfs(out)
    print(f"rootfs {rootfs} ready in {seconds:.1f} s")
    return rootfs, wheel, out


@pytest.fixture(scope="module")
def kiosk(built: tuple[Path, Path, Path]) -> Iterator[Container]:
    """A booted container with the appliance installed and configured, not yet started."""
    rootfs, wheel, out = built
    container = Container(rootfs, binds=[(out, "/mnt/wheel"), (REPO / "systemd", "/mnt/units")])
    try:
        container.start()
    except (HarnessError, TimeoutError) as exc:
        container.stop()
        _unavailable(f"systemd-nspawn could not boot the container: {exc}")
    try:
        install_appliance(container, f"/mnt/wheel/{wheel.name}", "/mnt/units")
        container.write("/boot/firmware/appliance.toml", BOOT_TOML)
        container.write("/etc/credstore/livekit-secret", _SECRET + "\n", mode=0o600)
        container.write(ROOM_TARGET, '[livekit]\nroom = "lobby"\n')
        container.run("ln", "-s", ROOM_TARGET, ROOM_DROPIN)
        yield container
    finally:
        container.stop()


def _main_pid(kiosk: Container) -> int:
    return int(kiosk.prop(UNIT, "MainPID") or 0)


def _first_frame_us(kiosk: Container, after_us: int) -> int | None:
    """Monotonic µs of the supervisor's first "renderer ... → RUNNING (child N rendering)" line."""
    for entry in kiosk.journal(UNIT):
        ts = int(entry["__MONOTONIC_TIMESTAMP"])
        if ts >= after_us and re.search(r"→ RUNNING \(child \d+ rendering", str(entry.get("MESSAGE", ""))):
            return ts
    return None


def _alive(kiosk: Container, pid: int) -> bool:
    return kiosk.run("test", "-e", f"/proc/{pid}", check=False).returncode == 0


def _ensure_running(kiosk: Container) -> None:
    if kiosk.prop(UNIT, "ActiveState") != "active":
        kiosk.systemctl("reset-failed", UNIT, check=False)
        kiosk.systemctl("start", UNIT)


def _status_json(kiosk: Container) -> dict:
    return wait_for("`appliance status --json` to answer", kiosk.appliance_status, 30)


def test_units_verify(kiosk: Container) -> None:
    """systemd-analyze verify on every unit, where they are installed; sysusers/tmpfiles apply cleanly."""
    units = [p.name for p in sorted((REPO / "systemd").iterdir()) if p.suffix in UNIT_SUFFIXES]
    assert {"appliance.service", "appliance-boot-config.service"} <= set(units)
    result = kiosk.run("systemd-analyze", "verify", *(f"/usr/lib/systemd/system/{u}" for u in units),
                       check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr + result.stdout
    for argv in (["systemd-sysusers", "/usr/lib/sysusers.d/appliance.conf"],
                 ["systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/appliance.conf"]):
        result = kiosk.run(*argv, check=False)
        assert result.returncode == 0 and not result.stderr.strip(), f"{argv}: {result.stderr}"
    groups = kiosk.run("id", "-nG", "appliance").stdout.split()
    assert {"appliance", "audio", "gpio"} <= set(groups)


def test_security_exposure(kiosk: Container) -> None:
    """systemd-analyze security on the loaded unit, inside the systemd that runs it."""
    for unit in (p.name for p in sorted((REPO / "systemd").glob("*.service"))):
        out = kiosk.run("systemd-analyze", "security", "--no-pager", unit).stdout
        exposure = _exposure(out, unit)
        print(f"{unit}: exposure {exposure}")
        assert exposure <= MAX_EXPOSURE, out


def test_start_is_active_only_once_frames_flow(kiosk: Container) -> None:
    if kiosk.prop(UNIT, "ActiveState") != "inactive":  # only when run out of order
        kiosk.systemctl("stop", UNIT)
    kiosk.systemctl("start", UNIT, timeout=200)  # returns once READY=1 arrived (Type=notify)
    props = kiosk.show(UNIT, "ActiveState", "SubState", "InactiveExitTimestampMonotonic",
                       "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    activating = int(props["InactiveExitTimestampMonotonic"])
    active = int(props["ActiveEnterTimestampMonotonic"])
    first_frame = wait_for("the first-frame log line", lambda: _first_frame_us(kiosk, activating), 30)
    # journald stamps a line when it receives it, never earlier than it was written: a first
    # frame logged before ActiveEnterTimestamp happened before it
    assert activating < first_frame <= active, (
        f"activating at {activating}, first frame logged at {first_frame}, active at {active} (µs)")
    # the boot partition's config was imported first, and is what runs
    boot_unit = kiosk.show("appliance-boot-config.service", "ActiveState", "Result")
    assert boot_unit == {"ActiveState": "active", "Result": "success"}, boot_unit
    assert kiosk.run("cat", "/var/lib/appliance/boot-config.toml").stdout == BOOT_TOML
    status = _status_json(kiosk)
    assert status["room"]["identity"] == "kiosk-ci"


def test_status_shows_the_status_line(kiosk: Container) -> None:
    _ensure_running(kiosk)
    pattern = re.compile(r"waiting for network \(retry in \d+ s\) · reference warm · \d+\.\d fps")
    text = wait_for("STATUS= to say it waits for the network",
                    lambda: (t := kiosk.prop(UNIT, "StatusText")) and pattern.search(t) and t, 60)
    shown = kiosk.systemctl("status", UNIT, "--no-pager", check=False).stdout
    line = next((ln.strip() for ln in shown.splitlines() if ln.strip().startswith("Status:")), "")
    assert pattern.search(line), f"{text!r} not in `systemctl status`:\n{shown}"
    human = kiosk.run("/opt/appliance/venv/bin/appliance", "status").stdout
    assert human.startswith("● ") and "kiosk-ci" in human, human


def test_journal_has_structured_fields(kiosk: Container) -> None:
    _ensure_running(kiosk)

    def waiting_entry() -> dict | None:
        for entry in kiosk.journal(UNIT):
            if entry.get("APPLIANCE_STATE") == "waiting":
                return entry
        return None

    entry = wait_for("a journal entry with APPLIANCE_STATE=waiting", waiting_entry, 60)
    assert entry["APPLIANCE_ROOM"] == "lobby"
    assert "cannot connect" in entry["APPLIANCE_REASON"]
    assert entry["SYSLOG_IDENTIFIER"] == "appliance" and entry["_SYSTEMD_UNIT"] == UNIT
    # the LiveKit secret reached the daemon (it mints tokens) but no log, status or environment
    everything = kiosk.run("journalctl", "--no-pager", "-o", "json").stdout
    assert _SECRET not in everything
    assert _SECRET not in kiosk.run("/opt/appliance/venv/bin/appliance", "status", "--json").stdout
    pids = kiosk.run("sh", "-c", "for p in /proc/[0-9]*; do [ \"$(stat -c %U $p)\" = appliance ] "
                     "&& echo ${p#/proc/}; done 2>/dev/null; true").stdout.split()
    assert len(pids) >= 2, pids  # the supervisor and its renderer child(ren)
    for pid in pids:
        environ = kiosk.run("cat", f"/proc/{pid}/environ", check=False).stdout
        assert _SECRET not in environ


def test_reload_applies_a_change_without_restart(kiosk: Container) -> None:
    _ensure_running(kiosk)
    before = kiosk.show(UNIT, "MainPID", "NRestarts")
    since = kiosk.run("date", "+%Y-%m-%d %H:%M:%S.%N").stdout.strip()[:26]
    kiosk.write(ROOM_TARGET, '[livekit]\nroom = "hall"\n')  # not watched: only SIGHUP brings it in
    time.sleep(1.5)  # longer than the directory watch's debounce, had it noticed anything
    kiosk.systemctl("reload", UNIT)

    def applied() -> list[str] | None:
        lines = [m for m in kiosk.messages(UNIT, "--since", since) if "config reloaded" in m]
        return lines or None

    lines = wait_for("the daemon to log the reload", applied, 30)
    assert [line.split(": ", 1)[-1] for line in lines] == [
        "config reloaded (SIGHUP): livekit.room changed"], lines
    status = wait_for("the new room in `appliance status`",
                      lambda: (s := kiosk.appliance_status()) and s["room"]["name"] == "hall" and s, 30)
    assert status["last_reload"] == "livekit.room (SIGHUP)"
    wait_for("the unit to be back from reloading",
             lambda: kiosk.prop(UNIT, "SubState") == "running", 30)
    assert kiosk.show(UNIT, "MainPID", "NRestarts") == before  # the same process: no restart


def test_hung_renderer_is_recovered_in_process(kiosk: Container) -> None:
    _ensure_running(kiosk)
    before = kiosk.show(UNIT, "MainPID", "NRestarts")
    status = _status_json(kiosk)
    hung, restarts = status["renderer"]["pid"], status["renderer"]["restarts"]
    assert hung and status["renderer"]["state"] == "running", status
    kiosk.run("sh", "-c", f"kill -STOP {hung}")

    def recovered() -> dict | None:
        s = kiosk.appliance_status()
        if s is None:
            return None
        renderer = s["renderer"]
        ok = renderer["state"] == "running" and renderer["pid"] not in (None, hung)
        return s if ok and renderer["restarts"] > restarts and s["fps_10s"] > 0 else None

    status = wait_for("a new renderer child rendering", recovered, 60)
    assert "stalled" in status["renderer"]["last_restart_reason"], status
    # the hung child is retired after the new one took over: asked, stacks dumped, SIGKILL
    wait_for(f"the hung child {hung} to be killed and reaped", lambda: not _alive(kiosk, hung), 30)
    assert kiosk.show(UNIT, "MainPID", "NRestarts") == before  # systemd had nothing to do
    assert kiosk.prop(UNIT, "ActiveState") == "active"


def test_hung_supervisor_is_restarted_by_the_watchdog(kiosk: Container) -> None:
    dropin = "/run/systemd/system/appliance.service.d/50-ci-watchdog.conf"
    kiosk.write(dropin, "[Service]\nWatchdogSec=3s\n")
    try:
        kiosk.systemctl("daemon-reload")
        kiosk.systemctl("restart", UNIT, timeout=200)
        assert kiosk.prop(UNIT, "WatchdogUSec") == "3s"
        hung = _main_pid(kiosk)
        restarts = int(kiosk.prop(UNIT, "NRestarts"))
        kiosk.run("sh", "-c", f"kill -STOP {hung}")

        def restarted() -> bool:
            props = kiosk.show(UNIT, "MainPID", "ActiveState", "SubState")
            return props["MainPID"] not in ("0", str(hung)) and props["SubState"] == "running"

        wait_for("systemd's watchdog to restart the service", restarted, 90)
        assert int(kiosk.prop(UNIT, "NRestarts")) == restarts + 1
        messages = kiosk.messages(UNIT, "-n", "200")
        assert any("Watchdog timeout (limit 3s)" in m for m in messages), messages[-30:]
        assert any("Failed with result 'watchdog'" in m for m in messages), messages[-30:]
    finally:
        kiosk.run("rm", "-f", dropin)
        kiosk.systemctl("daemon-reload")
    kiosk.systemctl("restart", UNIT, timeout=200)  # back to the unit's own WatchdogSec=


def test_missing_credential_still_starts_and_says_why(kiosk: Container) -> None:
    """Name-only LoadCredential=: a secret found nowhere is skipped by systemd 252, not 243."""
    kiosk.run("mv", "/etc/credstore/livekit-secret", "/root/livekit-secret")
    try:
        kiosk.systemctl("restart", UNIT, timeout=200)
        props = kiosk.show(UNIT, "ActiveState", "ExecMainStatus", "StatusText")
        assert props["ActiveState"] == "active", props
        assert "livekit-secret" in props["StatusText"] and "not joining" in props["StatusText"], props
        assert kiosk.run("ls", "/run/credentials/appliance.service").stdout.strip() == ""
    finally:
        kiosk.run("mv", "/root/livekit-secret", "/etc/credstore/livekit-secret")
    kiosk.systemctl("restart", UNIT, timeout=200)  # credentials are copied at start, not on reload
    assert kiosk.run("ls", "/run/credentials/appliance.service").stdout.split() == ["livekit-secret"]


def test_stop_is_clean_and_quick(kiosk: Container) -> None:
    _ensure_running(kiosk)
    wait_for("the renderer to be running", lambda: (s := kiosk.appliance_status())
             and s["renderer"]["state"] == "running", 30)
    main = _main_pid(kiosk)
    started = time.monotonic()
    kiosk.systemctl("stop", UNIT, timeout=120)
    took = time.monotonic() - started
    props = kiosk.show(UNIT, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "TimeoutStopUSec")
    assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
    assert (props["ExecMainCode"], props["ExecMainStatus"]) == ("1", "0"), props  # exited, status 0
    assert took < 10, f"stop took {took:.1f} s (TimeoutStopSec={props['TimeoutStopUSec']})"
    messages = kiosk.messages(UNIT, "-n", "60")
    assert not [m for m in messages if "SIGKILL" in m or "timed out" in m], messages
    assert not [m for m in messages if "child killed by SIGTERM" in m], messages  # KillMode=mixed
    assert not _alive(kiosk, main)
