"""Operator TOML bytes to text, the one way every reader of a config file does it.

The boot partition invites editing ``appliance.toml`` from any PC, so the bytes may
come from Notepad (a UTF-8 byte order mark, CRLF line ends, or the legacy "ANSI"
Windows-1252 encoding) or from TextEdit (smart quotes). ``decode`` accepts the BOM and
CRLF; bytes that are not UTF-8 raise ``TextProblem`` naming the line, the byte and the
fix. ``smart_quote_problems`` explains a TOML syntax error that curly quotes caused.
``config.decode_toml`` turns these into ``Problem`` lines; the /etc layers, the
appliance.d drop-ins, the boot-partition import, ``appliance check`` and reloads all
go through it.
"""

from __future__ import annotations

import codecs
import re

__all__ = ["TextProblem", "decode", "key_at", "smart_quote_problems"]

_DOUBLE = "“”„‟″"  # what word processors put where a " was typed
_SINGLE = "‘’‚‛′"
_SMART_QUOTES_OFF = "in TextEdit: Format ▸ Make Plain Text and Edit ▸ Substitutions ▸ Smart Quotes off"
_SAVE_AS_UTF8 = "save the file as UTF-8 (Notepad: File ▸ Save as ▸ Encoding UTF-8)"
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=")
_HEADER_RE = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")


class TextProblem(Exception):
    """What is wrong with the text of a config file, at ``line`` (1-based) and ``key``."""

    def __init__(self, line: int, key: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.line, self.key, self.message, self.fix = line, key, message, fix


def key_at(lines: list[str], number: int) -> str:
    """``[section] key`` for line ``number`` (``[section]`` on a header or a line without a key)."""
    section = ""
    for line in lines[: number - 1]:
        header = _HEADER_RE.match(line)
        if header:
            section = header.group(1)
    here = lines[number - 1] if 0 < number <= len(lines) else ""
    header, key = _HEADER_RE.match(here), _KEY_RE.match(here)
    if header:
        return f"[{header.group(1)}]"
    if key:
        return f"[{section}] {key.group(1)}" if section else key.group(1)
    return f"[{section}]" if section else ""


def decode(raw: bytes) -> str:
    """UTF-8 text without a byte order mark, with LF line ends; TextProblem if it is not UTF-8."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise TextProblem(1, "", "the file is UTF-16 (Notepad's \"Unicode\"), not UTF-8", _SAVE_AS_UTF8)
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line = raw.count(b"\n", 0, exc.start) + 1
        column = len(raw[line_start:exc.start].decode("utf-8")) + 1
        byte = raw[exc.start]
        legacy = bytes([byte]).decode("cp1252", errors="replace")
        shown = f" ({legacy!r} in Windows-1252/Latin-1)" if legacy.isprintable() and legacy != "\ufffd" else ""
        lines = raw.decode("utf-8", errors="replace").split("\n")
        raise TextProblem(line, key_at(lines, line),
                          f"not UTF-8: byte 0x{byte:02x}{shown} at column {column}", _SAVE_AS_UTF8) from None
    return text.replace("\r\n", "\n")


def _outside_strings(line: str) -> str:
    """The line without straight-quoted strings and without its comment."""
    out, quote, i = [], "", 0
    while i < len(line):
        char = line[i]
        if quote:
            if char == "\\" and quote == '"':
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#":
            break
        else:
            out.append(char)
        i += 1
    return "".join(out)


def smart_quote_problems(text: str, error_line: int) -> list[TextProblem]:
    """If the syntax error at ``error_line`` is a curly quote, every line that has one outside a string."""
    lines = text.split("\n")
    found: list[TextProblem] = []
    for number, line in enumerate(lines, start=1):
        bare = _outside_strings(line)
        curly = [c for c in bare if c in _DOUBLE + _SINGLE]
        if not curly:
            continue
        column = line.index(curly[0]) + 1
        pairs = []
        if any(c in _DOUBLE for c in curly):
            pairs.append('“ ” with straight quotes "')
        if any(c in _SINGLE for c in curly):
            pairs.append("‘ ’ with straight quotes '")
        found.append(TextProblem(
            number, key_at(lines, number),
            f"curly quote {curly[0]} at column {column}: TOML needs straight quotes",
            f"replace the curly quotes {' and '.join(pairs)} ({_SMART_QUOTES_OFF})"))
    if not any(p.line == error_line for p in found):
        return []  # the syntax error is something else: the generic message says what
    return found
