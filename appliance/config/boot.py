"""Import ``/boot/firmware/appliance.toml`` for the daemon, at boot.

An operator can edit the boot partition (FAT, writable from any PC) before the first boot,
or later with the card in a laptop. ``appliance-boot-config.service`` runs this module (as
the ``appliance`` user) before ``appliance.service``. The boot partition is never read
live (it may be unmounted or yanked): a copy that validated is kept as
``/var/lib/appliance/boot-config.toml``, which ``config.config_paths`` layers last, above
``/etc/appliance/appliance.toml`` and ``appliance.d/*.toml``.

* no boot file: the unit does not run (ConditionPathExists=), the last import stays;
* the boot file validates (on top of the /etc layers): it is copied, atomically, with a
  UTF-8 byte order mark and CRLF line ends (Windows editors) removed (``config.decode_toml``,
  the same decoding as every other config reader: curly quotes and non-UTF-8 bytes are
  reported with their line and the fix);
* it does not: nothing is copied, the previous import keeps serving, every problem is printed
  as ``file:line: [section] key: what is wrong — fix`` (to the journal) and the unit ends
  failed, so ``systemctl --failed`` shows it;
* a secret it names that is not provisioned yet is reported, not a reason to refuse the file
  (the daemon runs without that secret and says why); problems in the /etc layers are the
  daemon's to report, not a reason to refuse the boot file either.

    python -m appliance.config.boot [--boot FILE] [--etc FILE] [--dropins DIR] [--dest FILE]

Exit codes: 0 imported or already current, 1 could not read or write, 3 invalid (not imported).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import (
    BOOT_IMPORTED,
    ETC_CONFIG,
    ETC_DROPINS,
    ConfigError,
    Problem,
    decode_toml,
    parse_layers,
)

__all__ = ["BOOT_CONFIG", "ImportResult", "import_boot_config", "main"]

BOOT_CONFIG = Path("/boot/firmware/appliance.toml")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 3


@dataclass
class ImportResult:
    imported: bool
    message: str
    problems: list[Problem] = field(default_factory=list)  # the boot file's own: not imported
    warnings: list[Problem] = field(default_factory=list)  # reported, imported anyway

    @property
    def exit_code(self) -> int:
        return EXIT_CONFIG if self.problems else EXIT_OK


def _is_secret_problem(problem: Problem) -> bool:
    """A secret that is not there (yet): the daemon reports it too; the file itself is fine."""
    return problem.key.endswith("_file") and problem.message.startswith("secret file")


def _write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def import_boot_config(
    boot: Path = BOOT_CONFIG,
    etc: Path = ETC_CONFIG,
    dropins: Path = ETC_DROPINS,
    dest: Path = BOOT_IMPORTED,
) -> ImportResult:
    """Validate ``boot`` over the /etc layers and copy it to ``dest``. Raises OSError on I/O errors."""
    if not boot.exists():
        return ImportResult(False, f"{boot}: no such file; nothing to import")
    try:
        text = decode_toml(str(boot), boot.read_bytes())
    except ConfigError as exc:
        return ImportResult(False, f"{boot} not imported; the previous import stays", exc.problems)
    layers = []
    for path in ([etc] if etc.exists() else []) + (sorted(dropins.glob("*.toml")) if dropins.is_dir() else []):
        # an undecodable /etc layer is the daemon's to report, not a reason to refuse the boot file
        with contextlib.suppress(ConfigError):
            layers.append((str(path), decode_toml(str(path), path.read_bytes())))
    layers.append((str(boot), text))
    warnings: list[Problem] = []
    try:
        parse_layers(layers)
    except ConfigError as exc:
        own = [p for p in exc.problems if p.path == str(boot)]
        warnings = [p for p in own if _is_secret_problem(p)]
        problems = [p for p in own if not _is_secret_problem(p)]
        if problems:
            return ImportResult(False, f"{boot} not imported; the previous import stays", problems, warnings)
    data = text.encode("utf-8")
    if dest.exists() and dest.read_bytes() == data:
        return ImportResult(False, f"{boot}: already imported as {dest}", warnings=warnings)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(dest, data)
    return ImportResult(True, f"imported {boot} as {dest}", warnings=warnings)


# Written at boot by appliance-boot-config.service (the image's boot-config-result) when
# /boot/firmware/appliance.toml was refused: a heading, then one problem per line.
REFUSED_IMPORT = Path("/run/appliance-boot-config/problems.txt")
_PROBLEM_LINE = re.compile(r"^(?P<where>\S+?:\d+): (?P<setting>\[[^\]]+\] [\w.-]+): (?P<what>.*?)"
                           r"(?: — (?P<fix>.*))?$")


def refused_import(path: Path | None = None) -> list[tuple[str, str, str, str]]:
    """Why this boot's boot-partition config was not applied, one (subject, message,
    setting, fix) per problem; [] when it was applied (or there was none)."""
    try:
        text = (path or REFUSED_IMPORT).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reports = []
    for line in lines[1:] or lines:  # the first line is the heading ("... NOT applied ...")
        match = _PROBLEM_LINE.match(line)
        if match:
            where, setting, fix = match["where"], match["setting"], match["fix"] or ""
            reports.append((f"{where} {setting}", line.removesuffix(f" — {fix}"), setting, fix))
        else:
            reports.append((line, line, "", "fix /boot/firmware/appliance.toml, then reboot"))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.config.boot",
        description="Import the boot partition's appliance.toml for the daemon (run at boot).",
        epilog="exit codes: 0 imported or already current, 1 read/write failure, 3 invalid (not imported)",
    )
    parser.add_argument("--boot", type=Path, default=BOOT_CONFIG, help=f"default {BOOT_CONFIG}")
    parser.add_argument("--etc", type=Path, default=ETC_CONFIG, help=f"default {ETC_CONFIG}")
    parser.add_argument("--dropins", type=Path, default=ETC_DROPINS, help=f"default {ETC_DROPINS}")
    parser.add_argument("--dest", type=Path, default=BOOT_IMPORTED, help=f"default {BOOT_IMPORTED}")
    args = parser.parse_args(argv)
    try:
        result = import_boot_config(args.boot, args.etc, args.dropins, args.dest)
    except OSError as exc:
        print(f"boot config: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for problem in result.problems:
        print(problem, file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"boot config: {result.message}", file=sys.stderr if result.problems else sys.stdout)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())

