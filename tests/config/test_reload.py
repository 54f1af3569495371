"""Live reload the way operators edit: every save style, junk files, bad edits.

The watcher tests use the real `watchdog` observer on a temporary directory;
the supervisor tests run a real Supervisor (renderer child, reference
runtime) without a room, and check that a bad edit changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.config.watch import ConfigWatcher, diff_configs
from appliance.supervisor import Supervisor

DEBOUNCE_S = 0.3


class Recorder:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self) -> None:
        self.calls.append(time.monotonic())


async def settle(recorder: Recorder, *, quiet_s: float = 1.2) -> int:
    """Wait until no callback came for quiet_s; return how many came."""
    await asyncio.sleep(quiet_s)
    last = len(recorder.calls)
    while True:
        await asyncio.sleep(quiet_s / 2)
        if len(recorder.calls) == last:
            return last
        last = len(recorder.calls)


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    (tmp_path / "appliance.d").mkdir()
    (tmp_path / "appliance.toml").write_text('[livekit]\nroom = "lobby"\n')
    return tmp_path


async def watching(conf_dir: Path) -> tuple[ConfigWatcher, Recorder]:
    recorder = Recorder()
    watcher = ConfigWatcher([conf_dir / "appliance.toml"], [conf_dir / "appliance.d"], recorder,
                            debounce_s=DEBOUNCE_S)
    watcher.start()
    await asyncio.sleep(0.2)
    return watcher, recorder


async def test_atomic_save_by_rename_is_one_reload(conf_dir: Path) -> None:
    watcher, recorder = await watching(conf_dir)
    try:
        tmp = conf_dir / ".appliance.toml.XYZ123"
        tmp.write_text('[livekit]\nroom = "hall"\n')
        os.replace(tmp, conf_dir / "appliance.toml")
        assert await settle(recorder) == 1
        # and the watch survives the rename: a second save is seen too
        tmp.write_text('[livekit]\nroom = "hall2"\n')
        os.replace(tmp, conf_dir / "appliance.toml")
        assert await settle(recorder) == 2
    finally:
        watcher.stop()


async def test_in_place_truncate_and_write_in_pieces_is_debounced(conf_dir: Path) -> None:
    watcher, recorder = await watching(conf_dir)
    try:
        with open(conf_dir / "appliance.toml", "w") as handle:
            for piece in ('[livekit]\n', 'room = ', '"hall"\n'):
                handle.write(piece)
                handle.flush()
                await asyncio.sleep(0.05)
        assert await settle(recorder) == 1
    finally:
        watcher.stop()


@pytest.mark.parametrize("name", [".appliance.toml.swp", "appliance.toml~", "4913", ".#appliance.toml",
                                  "appliance.toml.bak", "notes.txt"])
async def test_editor_droppings_are_ignored(conf_dir: Path, name: str) -> None:
    watcher, recorder = await watching(conf_dir)
    try:
        (conf_dir / name).write_text("junk")
        (conf_dir / "appliance.d" / name).write_text("junk")
        (conf_dir / name).unlink()
        assert await settle(recorder) == 0
    finally:
        watcher.stop()


async def test_dropins_deletion_symlink_swap_and_chmod_are_seen(conf_dir: Path) -> None:
    watcher, recorder = await watching(conf_dir)
    try:
        (conf_dir / "appliance.d" / "10-room.toml").write_text('[livekit]\nroom = "x"\n')
        assert await settle(recorder) == 1
        (conf_dir / "appliance.d" / "10-room.toml").unlink()
        assert await settle(recorder) == 2
        # the config as a symlink, swapped atomically to another target
        a, b = conf_dir / "a.toml", conf_dir / "b.toml"
        a.write_text('[livekit]\nroom = "a"\n')
        b.write_text('[livekit]\nroom = "b"\n')
        link = conf_dir / "appliance.toml"
        link.unlink()
        link.symlink_to(a)
        assert await settle(recorder) >= 3
        before = len(recorder.calls)
        staged = conf_dir / ".link.tmp"
        staged.symlink_to(b)
        os.replace(staged, link)
        assert await settle(recorder) == before + 1
        os.chmod(b, 0o000)
        assert await settle(recorder) >= before + 1  # chmod of the target: seen via the directory
    finally:
        watcher.stop()


# -- the supervisor: validate everything first, apply only what changed, never half-apply --


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
async def supervisor(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "appliance.toml"
    write(path, f'[avatar]\nstall_timeout_s = 2.0\n[status]\nsocket = "{tmp_path}/s.sock"\n')
    sup = Supervisor(load_config([path]), load=lambda: load_config([path]))
    await sup.start()
    try:
        yield sup, path
    finally:
        await sup.close()


async def test_invalid_edit_changes_nothing_and_says_why(supervisor) -> None:  # type: ignore[no-untyped-def]
    sup, path = supervisor
    before = sup.config
    renderer_pid = sup.renderer.pid
    write(path, '[avatar]\nstall_timeout_s = "soon"\nruntime = "bithumann"\n')
    assert await sup.reload("test") is False
    assert sup.config is before
    assert sup.renderer.pid == renderer_pid
    assert len(sup.config_problems) == 2
    assert any("stall_timeout_s: got 'soon'" in p for p in sup.config_problems)
    assert sup.status()["config_problems"] == sup.config_problems
    # the next valid save clears the problem and applies
    write(path, f'[avatar]\nstall_timeout_s = 3.5\n[status]\nsocket = "{path.parent}/s.sock"\n')
    assert await sup.reload("test") is True
    assert sup.config_problems == []
    assert sup.renderer.options.stall_timeout_s == 3.5
    assert sup.renderer.pid == renderer_pid  # a timeout change needs no new renderer


async def test_half_written_file_then_complete(supervisor) -> None:  # type: ignore[no-untyped-def]
    sup, path = supervisor
    with open(path, "w") as handle:
        handle.write('[avatar]\nstall_timeout_s = ')
    assert await sup.reload("half") is False
    assert sup.config.avatar.stall_timeout_s == 2.0
    with open(path, "a") as handle:
        handle.write(f'4.0\n[status]\nsocket = "{path.parent}/s.sock"\n')
    assert await sup.reload("complete") is True
    assert sup.config.avatar.stall_timeout_s == 4.0


async def test_deleted_and_unreadable_file_keep_last_good(supervisor) -> None:  # type: ignore[no-untyped-def]
    sup, path = supervisor
    before = sup.config
    path.unlink()
    assert await sup.reload("deleted") is False
    assert "file does not exist" in sup.config_problems[0]
    write(path, '[avatar]\nstall_timeout_s = 2.0\n')
    path.chmod(0o000)
    if os.geteuid() != 0:  # root reads anything: the permission case only means something for users
        assert await sup.reload("chmod") is False
    assert sup.config is before or sup.config.avatar == before.avatar


async def test_model_change_swaps_renderer_while_frames_flow(supervisor) -> None:  # type: ignore[no-untyped-def]
    sup, path = supervisor
    from importlib import resources

    other = resources.files("appliance") / "data" / "reference-avatar-b.json"
    old_pid = sup.renderer.pid
    await asyncio.sleep(0.5)
    frames_before = sup.fps_meter.fps(time.monotonic())
    assert frames_before > 0
    write(path, f'[avatar]\nmodel = "{other}"\n[status]\nsocket = "{path.parent}/s.sock"\n')
    assert await sup.reload("model") is True
    assert sup.renderer.pid != old_pid
    assert sup.config.avatar.model == str(other)
    await asyncio.sleep(0.5)
    assert sup.frames_flowing(0.2)


def test_diff_names_what_changed(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[livekit]\nroom = "x"\n')
    b.write_text('[livekit]\nroom = "y"\n[logging]\nlevel = "debug"\n')
    assert diff_configs(load_config([a]), load_config([b])) == ["livekit.room", "logging.level"]


async def test_model_swap_keeps_the_reason_for_not_joining(supervisor) -> None:  # type: ignore[no-untyped-def]
    # issue 9.7: the swap cleared the one shared problem string, leaving "not joining: "
    sup, path = supervisor
    from importlib import resources

    assert sup.room is None  # the defaults have no api_key / token_url
    await asyncio.sleep(0.5)
    before = sup.status_line()
    assert "not joining: [livekit] api_key / api_secret_file / token_url" in before, before
    other = resources.files("appliance") / "data" / "reference-avatar-b.json"
    write(path, f'[avatar]\nmodel = "{other}"\n[status]\nsocket = "{path.parent}/s.sock"\n')
    assert await sup.reload("model") is True
    await asyncio.sleep(0.5)
    after = sup.status_line()
    print(f"\nbefore the swap: {before}\nafter the swap:  {after}")
    assert "not joining: [livekit] api_key / api_secret_file / token_url" in after, after
    assert sup.status()["problem"] and "token_url" in sup.status()["problem"]
