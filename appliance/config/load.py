"""Loading the configuration: TOML layers, validation, secrets, the last good copy.

Errors are collected, never raised one by one: a file with three mistakes
gets three lines, each ``path:line: [section] key: what is wrong — fix``
(:class:`Problem`), all in one :class:`ConfigError`. Files are decoded by
``text.py`` (BOM, curly quotes and non-UTF-8 bytes named, not tracebacks).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import text as config_text
from appliance.config.schema import (
    SECTIONS,
    AgentSection,
    AvatarSection,
    Config,
    FallbackSection,
    LiveKitSection,
    ModelsSection,
    Secret,
    _toml_value,
    iter_settings,
    render_snapshot,
)

__all__ = [
    "Problem", "ConfigError", "parse_layers", "read_secret_file", "load_config", "decode_toml",
    "config_paths", "last_good_path", "save_last_good", "load_last_good",
    "ETC_CONFIG", "ETC_DROPINS", "BOOT_IMPORTED",
]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration, phrased for an operator."""

    path: str
    line: int | None
    key: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        fix = f" — {self.fix}" if self.fix else ""
        return f"{self.located()}{fix}"

    def located(self) -> str:
        """``file:line: [section] key: what is wrong``, without the fix."""
        where = f"{self.path}:{self.line}" if self.line else self.path
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"

    def report(self) -> tuple[str, str, str, str]:
        """(subject, message, setting, fix) for the problem registry."""
        where = f"{self.path}:{self.line}" if self.line else self.path
        return (f"{where} {self.key}".strip(), self.located(), self.key, self.fix)


class ConfigError(Exception):
    """The configuration cannot be used as written; ``problems`` lists every reason.

    ``usable`` is set when the only problems are unreadable secrets: the rest of
    the config is valid, so the kiosk can still render (and say why it cannot join).
    """

    def __init__(self, problems: list[Problem], usable: Config | None = None) -> None:
        self.problems = problems
        self.usable = usable
        super().__init__("\n".join(str(p) for p in problems))


_TYPES: dict[str, type] = {
    "str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": tuple,
}


def _type_name(t: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        t, str(t)
    )


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """Best-effort line number of [section] / key in a TOML text (tomllib gives none)."""
    lines = text.splitlines()
    in_section = False
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([^\]]+?)\s*\]", stripped)
        if header:
            in_section = header.group(1) == section
            if in_section and key is None:
                return number
            continue
        if in_section and key is not None and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


def _check_value(
    section: str, f: dataclasses.Field[Any], value: Any, path: str, text: str
) -> tuple[Any, Problem | None]:
    key = f"[{section}] {f.name}"
    line = _line_of(text, section, f.name)
    want = _TYPES[str(f.type)]
    if want is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, Problem(path, line, key, f"got {value!r}, expected a list of strings",
                                 f"write e.g. {f.name} = {_toml_value(f.default)}")
        bad = [v for v in value if f.metadata["choices"] and v not in f.metadata["choices"]]
        if bad or not value:
            return None, Problem(path, line, key, f"got {value!r}",
                                 f"use a non-empty list of: {', '.join(f.metadata['choices'])}")
        return tuple(value), None
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        return None, Problem(
            path, line, key, f"got {value!r}, expected {_type_name(want)}",
            f"write e.g. {f.name} = {_toml_value(f.default)}",
        )
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return None, Problem(
            path, line, key, f"got {value!r}", f"{hint}allowed: {', '.join(map(str, meta['choices']))}"
        )
    low, high = meta["min"], meta["max"]
    if (low is not None and value < low) or (high is not None and value > high):
        return None, Problem(
            path, line, key, f"got {value!r}, out of range", f"use a value from {low} to {high}"
        )
    return value, None



def _merge_layer(
    merged: dict[str, dict[str, Any]],
    origins: dict[str, str],
    data: Mapping[str, Any],
    path: str,
    text: str,
    problems: list[Problem],
) -> None:
    for section, body in data.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            fix = f"did you mean [{close[0]}]?" if close else f"sections: {', '.join(SECTIONS)}"
            problems.append(Problem(path, _line_of(text, section, None), f"[{section}]", "unknown section", fix))
            continue
        if not isinstance(body, dict):
            problems.append(Problem(path, None, section, "must be a [section] table", f"write [{section}]"))
            continue
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        for key, value in body.items():
            f = fields.get(key)
            if f is None:
                close = difflib.get_close_matches(key, fields, n=1)
                fix = f"did you mean `{close[0]}`?" if close else f"keys: {', '.join(fields)}"
                if f"{key}_file" in fields:
                    fix = (f"secrets are never written in the TOML: put it in a file (chmod 600)"
                           f" and set `{key}_file` to its path")
                problems.append(
                    Problem(path, _line_of(text, section, key), f"[{section}] {key}", "unknown key", fix)
                )
                continue
            checked, problem = _check_value(section, f, value, path, text)
            if problem:
                problems.append(problem)
                continue
            merged.setdefault(section, {})[key] = checked
            origins[f"{section}.{key}"] = path


def _credentials_dir() -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(directory) if directory else None


def read_secret_file(reference: str, key: str, origin: str) -> tuple[Secret | None, Problem | None]:
    """Read a secret from a file path, or from a systemd credential of that name."""
    candidate = Path(reference)
    creds = _credentials_dir()
    if not candidate.is_absolute() and "/" not in reference and creds is not None:
        candidate = creds / reference
    try:
        st = candidate.stat()
    except FileNotFoundError:
        if creds is not None and candidate.parent == creds:
            # systemd copies credentials at start only: a reload cannot pick a new one up
            return None, Problem(origin, None, key, f"systemd credential {reference!r} was not found",
                                 f"put the secret in /etc/credstore/{reference} (chmod 600), "
                                 "then `systemctl restart appliance`")
        return None, Problem(origin, None, key, f"secret file {candidate} does not exist",
                             f"create it with the secret and `chmod 600 {candidate}`")
    except PermissionError:
        return None, Problem(origin, None, key, f"secret file {candidate} is not readable by this user",
                             f"`chown appliance {candidate}` or use systemd LoadCredential=")
    # systemd credentials live on a private, read-only mount: their mode is the service's business
    in_creds = creds is not None and candidate.parent == creds
    if not in_creds and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return None, Problem(origin, None, key,
                             f"secret file {candidate} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o})",
                             f"`chmod 600 {candidate}`")
    try:
        value = candidate.read_text(encoding="utf-8-sig").strip()  # Notepad writes a BOM
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        return None, Problem(origin, None, key, f"cannot read secret file {candidate}: {type(exc).__name__}",
                             "make it a readable text file holding only the secret")
    if not value:
        return None, Problem(origin, None, key, f"secret file {candidate} is empty", "write the secret into it")
    return Secret(value, str(candidate)), None


def parse_layers(layers: list[tuple[str, str]]) -> Config:
    """Build a Config from (path, text) TOML layers, lowest priority first.

    Raises ConfigError listing every problem in every layer.
    """
    merged: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    problems: list[Problem] = []
    for path, text in layers:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            match = re.search(r"line (\d+), column (\d+)", str(exc))
            # "at end of document" has no position: the last line is where it went wrong
            line = int(match.group(1)) if match else text.count("\n") + 1
            curly = config_text.smart_quote_problems(text, line)
            problems.extend(Problem(path, p.line, p.key, p.message, p.fix) for p in curly)
            if not curly:
                problems.append(Problem(path, line, "", f"TOML syntax error: {exc}",
                                        "fix the line (strings need quotes, tables need [brackets])"))
            continue
        _merge_layer(merged, origins, data, path, text, problems)

    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        sections[name] = cls(**merged.get(name, {}))

    texts = dict(layers)
    problems.extend(_cross_checks(sections, origins, texts))
    secrets: dict[str, Secret] = {}
    secret_problems: list[Problem] = []
    for section, f in iter_settings():
        if not f.metadata["secret_file"]:
            continue
        reference = getattr(sections[section], f.name)
        if not reference:
            continue
        origin = origins.get(f"{section}.{f.name}", "default")
        secret, problem = read_secret_file(reference, f"[{section}] {f.name}", origin)
        if problem:
            secret_line = _line_of(texts.get(origin, ""), section, f.name)
            secret_problems.append(dataclasses.replace(problem, line=secret_line))
        elif secret:
            secrets[f"{section}.{f.name.removesuffix('_file')}"] = secret

    if problems or secret_problems:
        usable = None
        if not problems:
            usable = Config(**sections, secrets=secrets, origins=origins)
        raise ConfigError(problems + secret_problems, usable)
    return Config(**sections, secrets=secrets, origins=origins)


def _cross_checks(
    sections: Mapping[str, Any], origins: Mapping[str, str], texts: Mapping[str, str]
) -> list[Problem]:
    """Rules that involve several settings; each problem points at where a value was set."""

    def where(name: str) -> tuple[str, int | None]:
        path = origins.get(name, "default")
        section, key = name.split(".")
        return path, _line_of(texts.get(path, ""), section, key)

    problems = []
    lk: LiveKitSection = sections["livekit"]
    if not re.match(r"^wss?://", lk.url):
        problems.append(Problem(*where("livekit.url"), "[livekit] url", f"got {lk.url!r}",
                                "use ws://host:7880 or wss://host"))
    if lk.api_key and lk.token_url:
        problems.append(Problem(*where("livekit.token_url"), "[livekit] token_url",
                                "both api_key and token_url are set", "keep only one of them"))
    if lk.api_key and not lk.api_secret_file:
        problems.append(Problem(*where("livekit.api_key"), "[livekit] api_secret_file",
                                "api_key is set but no secret file", "set api_secret_file to a file holding the secret"))
    avatar: AvatarSection = sections["avatar"]
    if avatar.runtime == "bithuman" and not avatar.model:
        problems.append(Problem(*where("avatar.runtime"), "[avatar] model",
                                "runtime is bithuman but no model is set", "set model to the .imx file"))
    models: ModelsSection = sections["models"]
    if models.manifest_url and not models.public_key:
        problems.append(Problem(*where("models.manifest_url"), "[models] public_key",
                                "manifest_url is set but no public_key to verify it",
                                "set public_key to the base64 ed25519 key from `appliance models keygen`"))
    if models.update_window and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d",
                                                 models.update_window):
        problems.append(Problem(*where("models.update_window"), "[models] update_window",
                                f"got {models.update_window!r}", 'write HH:MM-HH:MM, e.g. "02:00-05:00"'))
    agent: AgentSection = sections["agent"]
    if agent.metadata:
        try:
            fields = json.loads(agent.metadata)
        except ValueError as exc:
            fields = exc
        if not isinstance(fields, dict):
            problems.append(Problem(*where("agent.metadata"), "[agent] metadata",
                                    f"not a JSON object ({fields})" if isinstance(fields, ValueError)
                                    else f"a JSON {type(fields).__name__}, not an object",
                                    "write a JSON object in single quotes, e.g. metadata = '{\"language\": \"en\"}'"))
    fallback: FallbackSection = sections["fallback"]
    if "gpu" in fallback.ladder and not fallback.gpu_api_url:
        problems.append(Problem(*where("fallback.ladder"), "[fallback] gpu_api_url",
                                "the ladder has gpu but no gpu_api_url", "set gpu_api_url or remove gpu"))
    image = fallback.gpu_avatar_image
    if "gpu" in fallback.ladder and image and not image.startswith(("https://", "http://")) \
            and not os.access(image, os.R_OK):
        problems.append(Problem(*where("fallback.gpu_avatar_image"), "[fallback] gpu_avatar_image",
                                f"cannot read {image}", "point it at a readable JPEG or PNG, or an https:// URL"))
    if "cloud" in fallback.ladder and not fallback.cloud_avatar_id:
        problems.append(Problem(*where("fallback.ladder"), "[fallback] cloud_avatar_id",
                                "the ladder has cloud but no cloud_avatar_id", "set cloud_avatar_id or remove cloud"))
    if "cloud" in fallback.ladder and not sections["avatar"].api_secret_file:
        problems.append(Problem(*where("fallback.ladder"), "[avatar] api_secret_file",
                                "the ladder has cloud but no bitHuman API secret",
                                "set [avatar] api_secret_file to the file with the bitHuman API secret"))
    return problems


# The layers on a kiosk, lowest priority first (the packaged defaults are implicit).
ETC_CONFIG = Path("/etc/appliance/appliance.toml")
ETC_DROPINS = Path("/etc/appliance/appliance.d")
# /boot/firmware/appliance.toml, copied here by appliance-boot-config.service at boot
# once it validated: the boot partition is FAT and may be yanked, so it is never read live.
BOOT_IMPORTED = Path("/var/lib/appliance/boot-config.toml")


def last_good_path() -> Path | None:
    """Where the last configuration that loaded is kept: systemd's StateDirectory."""
    directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not directory and os.access("/var/lib/appliance", os.W_OK):
        directory = "/var/lib/appliance"
    return Path(directory) / "last-good.toml" if directory else None


def save_last_good(config: Config) -> None:
    """Atomically keep a snapshot of a config that loaded (best effort: a full disk only warns)."""
    path = last_good_path()
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(render_snapshot(config), encoding="utf-8")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        import logging

        logging.getLogger("appliance.config").warning("cannot keep the last good config in %s: %s", path, exc)


def load_last_good() -> Config | None:
    path = last_good_path()
    if path is None or not path.exists():
        return None
    try:
        return load_config([path])
    except ConfigError as exc:
        return exc.usable


def config_paths(explicit: list[str] | None = None) -> list[Path]:
    """The TOML layers to read; ``--config`` files replace the kiosk's layers."""
    if explicit:
        return [Path(p) for p in explicit]
    paths = [ETC_CONFIG] if ETC_CONFIG.exists() else []
    if ETC_DROPINS.is_dir():
        paths += sorted(ETC_DROPINS.glob("*.toml"))
    if BOOT_IMPORTED.exists():
        paths.append(BOOT_IMPORTED)
    return paths


def decode_toml(path: str, raw: bytes) -> str:
    """The text of an operator's TOML file (BOM and CRLF accepted); ConfigError if not UTF-8.

    Every reader of operator TOML decodes through here (see ``config_text``).
    """
    try:
        return config_text.decode(raw)
    except config_text.TextProblem as exc:
        raise ConfigError([Problem(path, exc.line, exc.key, exc.message, exc.fix)]) from None


def load_config(paths: list[Path]) -> Config:
    """Read the TOML files (lowest priority first) and build the Config."""
    layers: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            layers.append((str(path), decode_toml(str(path), path.read_bytes())))
        except FileNotFoundError:
            problems.append(Problem(str(path), None, "", "file does not exist", "check the path"))
        except OSError as exc:
            problems.append(Problem(str(path), None, "", f"cannot read: {exc.strerror or type(exc).__name__}",
                                    "make it a readable UTF-8 text file"))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:  # the readable layers are checked too: every problem at once
        try:
            parse_layers(layers)
        except ConfigError as exc:
            problems.extend(exc.problems)
        raise ConfigError(problems)
    return parse_layers(layers)
