"""Random damage to a valid config never crashes the loader and always names the problem."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config import Config, ConfigError, parse_layers

VALID = """\
[livekit]
url = "ws://127.0.0.1:7880"
room = "lobby"
identity = "kiosk-lobby"
token_ttl_s = 3600
simulcast = false
[avatar]
runtime = "reference"
stall_timeout_s = 2.0
width = 512
[models]
keep_previous = 2
update_window = "02:00-05:00"
[fallback]
ladder = ["local"]
[logging]
level = "info"
"""

SCALARS = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["true", "false", '"x"', '""', "[]", '["gpu"]', "{}", "inf", "nan", "1979-05-27"]),
    st.text(max_size=8).map(lambda t: '"' + t.replace("\\", "").replace('"', "") + '"'),
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    lines = VALID.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete_char", "insert_char", "value", "dup", "drop", "truncate", "key"]))
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        if op == "delete_char" and line:
            j = draw(st.integers(0, len(line) - 1))
            lines[i] = line[:j] + line[j + 1:]
        elif op == "insert_char":
            j = draw(st.integers(0, len(line)))
            lines[i] = line[:j] + draw(st.characters(codec="utf-8")) + line[j:]
        elif op == "value" and " = " in line:
            lines[i] = line.split(" = ")[0] + " = " + draw(SCALARS)
        elif op == "dup":
            lines.insert(i, line)
        elif op == "drop":
            del lines[i]
        elif op == "truncate":
            text = "\n".join(lines)
            return text[: draw(st.integers(0, len(text)))]
        elif op == "key" and " = " in line:
            key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
            lines[i] = key + " = " + line.split(" = ", 1)[1]
        if not lines:
            break
    return "\n".join(lines)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_never_crash_and_always_name_the_problem(text: str) -> None:
    try:
        config = parse_layers([("kiosk.toml", text)])
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.path == "kiosk.toml"
            assert problem.line is not None or problem.key, problem
            assert problem.message and problem.fix, problem
            assert str(problem).startswith("kiosk.toml")
    else:
        assert isinstance(config, Config)
