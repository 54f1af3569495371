"""Command line: ``appliance run|check|status|presence|say|config|models|demo``.

Exit codes (the only place they are decided):
    0  success
    1  runtime failure (the daemon could not start at all)
    2  usage error (argparse)
    3  the configuration is invalid (every problem is printed)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import (
    ETC_CONFIG,
    ETC_DROPINS,
    Config,
    ConfigError,
    Problem,
    config_paths,
    load_config,
    load_last_good,
    notes,
    render_default_toml,
)
from appliance.status.logs import setup_logging

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3

log = logging.getLogger("appliance")


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_paths(args.config))


def cmd_check(args: argparse.Namespace) -> int:
    if args.files:
        return _check_each(args.files)
    paths = config_paths(args.config)
    try:
        config = load_config(paths)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); nothing was changed", file=sys.stderr)
        return EXIT_CONFIG
    shown = ", ".join(str(p) for p in paths) or "built-in defaults"
    print(f"ok: {shown}")
    for note in notes(config):
        print(f"note: {note}")
    return EXIT_OK


def _check_each(targets: list[str]) -> int:
    """Check files (or every *.toml in directories) one by one, each on its own."""
    files: list[Path] = []
    for target in targets:
        path = Path(target)
        files += sorted(path.glob("*.toml")) if path.is_dir() else [path]
    bad = 0
    for path in files:
        try:
            load_config([path])
            print(f"ok: {path}")
        except ConfigError as exc:
            bad += 1
            for problem in exc.problems:
                print(problem)
    print(f"{len(files) - bad} of {len(files)} file(s) valid")
    return EXIT_CONFIG if bad else EXIT_OK


def _run_until_signal(args: argparse.Namespace, config: Config, problems: list[Problem]) -> int:
    from appliance.config.watch import ConfigWatcher
    from appliance.dev.local import (
        dev_banner,
        dev_overrides,
        start_dev_server,
        start_example_agent,
        stop_example_agent,
    )
    from appliance.supervisor import Supervisor

    paths = config_paths(args.config)

    def load_layers() -> Config:
        # files may appear (a first drop-in) but not vanish: a deleted config is a mistake
        # to report, not a silent return to the defaults
        now = config_paths(args.config)
        return load_config(now + [p for p in paths if p not in now])

    async def main() -> None:
        server = worker = None
        load = load_layers
        if args.dev:
            server = await start_dev_server(viewer_room=config.livekit.room)
            load = lambda: dev_overrides(load_layers())  # noqa: E731
            if not config.agent.name:  # the operator names none: the bundled example agent
                worker = start_example_agent(server)
        supervisor = Supervisor(dev_overrides(config) if args.dev else config, load=load)
        supervisor.report_config_problems(problems, logged=True)  # cmd_run logged them
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.request_stop)
        loop.add_signal_handler(signal.SIGHUP, supervisor.request_reload, "SIGHUP")
        dropins = [ETC_DROPINS] if not args.config and ETC_DROPINS.is_dir() else []
        watcher = ConfigWatcher(paths or [ETC_CONFIG], dropins,
                                lambda: supervisor.request_reload("file changed"))
        watcher.start()
        if server is not None:
            print(dev_banner(server, supervisor.config, worker is not None), file=sys.stderr)
        try:
            await supervisor.run()
        finally:
            watcher.stop()
            if worker is not None:
                await asyncio.to_thread(stop_example_agent, worker)
            if server is not None:
                await server.stop()

    asyncio.run(main())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level or "info")
    problems: list[Problem] = []
    try:
        config = _load(args)
    except ConfigError as exc:
        problems = exc.problems
        for problem in problems:
            log.error("%s", problem, extra={"reason": str(problem)})
        # a typo must not brick the kiosk: run on what still works, and say why
        fallback = exc.usable or load_last_good()
        if fallback is None:
            log.error("no usable configuration and no last good one: exiting")
            return EXIT_CONFIG
        what = "the valid part of it (without the secrets above)" if exc.usable else "the last good configuration"
        log.warning("the configuration has problems; running on %s", what)
        config = fallback
    setup_logging(args.log_level or config.logging.level, config.logging.sdk_level)
    for note in notes(config):
        log.warning("%s", note)
    return _run_until_signal(args, config, problems)


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    from appliance.dev.demo import run_demo

    return run_demo(out=Path(args.out), seconds=args.seconds, text=args.text)


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "defaults":
        sys.stdout.write(render_default_toml())
        return EXIT_OK
    try:
        config = _load(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    from appliance.config import describe

    sys.stdout.write(describe(config))
    return EXIT_OK


def _status_socket(args: argparse.Namespace) -> str:
    """--socket, else [status] socket of the config, else the default (a broken config must
    not stop `appliance status` from saying why)."""
    if args.socket is not None:
        return str(args.socket)
    try:
        return _load(args).status.socket
    except ConfigError:
        return "/run/appliance/status.sock"


def _seconds(text: str) -> float:
    """A --timeout in seconds, above 0 and at most an hour (argparse prints the line, exits 2)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected seconds from 0 to 3600, e.g. --timeout 10")
    return value


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from appliance.status.server import format_status, query_status

    path = _status_socket(args)
    try:
        status = query_status(path, args.timeout)
    except OSError as exc:
        print(f"appliance is not running (no answer on {path}: {exc.strerror or exc})", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return EXIT_OK


def _command(args: argparse.Namespace, request: dict[str, Any], typed: str) -> dict[str, Any] | None:
    """Send a command to the daemon's control socket; None (with the reason printed) if it
    was not done. ``typed`` is the command line, for the sudo hint."""
    from appliance.status.control import control_socket_for, send_command

    path = control_socket_for(_status_socket(args))
    try:
        answer = send_command(path, request, timeout_s=30.0)
    except PermissionError:
        command = " ".join(typed.split()[:2])  # "appliance say"
        print(f"{command} needs root: {path} is the daemon's own (sudo {typed})", file=sys.stderr)
        return None
    except OSError as exc:
        print(f"appliance is not running (no answer on {path}: {exc.strerror or exc})", file=sys.stderr)
        return None
    if not answer.get("ok"):
        print(answer.get("error"), file=sys.stderr)
        return None
    return answer


def cmd_presence(args: argparse.Namespace) -> int:
    """`appliance presence arrive|leave`: play a visitor (what the motion sensor would say)."""
    answer = _command(args, {"command": "presence", "action": args.action}, f"appliance presence {args.action}")
    if answer is None:
        return EXIT_FAILURE
    presence = answer.get("presence") or {}
    if presence.get("present"):
        ending = presence.get("ending_in_s")
        print("a visitor is here" + (f"; the visit ends in {ending:.0f} s unless someone is seen"
                                     if ending is not None else ""))
    else:
        print("nobody is here")
    return EXIT_OK


def cmd_say(args: argparse.Namespace) -> int:
    """`appliance say FILE.wav|-` or `--stop`: the avatar speaks, with no agent needed."""
    import base64

    if args.stop:
        request: dict[str, Any] = {"command": "speak", "stop": True}
        typed = "appliance say --stop"
    elif args.wav is None:
        print("appliance say: name a WAV file (or - for standard input), or --stop", file=sys.stderr)
        return EXIT_USAGE
    else:
        try:
            data = sys.stdin.buffer.read() if args.wav == "-" else Path(args.wav).read_bytes()
        except OSError as exc:
            print(f"appliance say: cannot read {args.wav}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILURE
        request = {"command": "speak", "wav": base64.b64encode(data).decode()}
        typed = f"appliance say {args.wav}"
    answer = _command(args, request, typed)
    if answer is None:
        return EXIT_FAILURE
    print("stopped" if answer.get("stopped") else f"speaking {answer.get('seconds')} s")
    return EXIT_OK


def _signal_daemon(config: Config) -> None:
    """Tell a running daemon to look at the model store again (SIGHUP, like `systemctl reload`)."""
    from appliance.status.server import query_status

    try:
        pid = query_status(config.status.socket).get("pid")
    except (OSError, ValueError):
        print("the appliance is not running: the change applies at its next start")
        return
    if isinstance(pid, int):
        os.kill(pid, signal.SIGHUP)
        print(f"told the running appliance (pid {pid}) to switch")


def cmd_models(args: argparse.Namespace) -> int:
    from appliance.models import manifest
    from appliance.models import updater as models

    action = args.action
    if action == "keygen":
        return manifest.cmd_models_keygen(args.dir)
    if action == "sign":
        return manifest.cmd_models_sign(args.manifest, args.key)
    if action == "publish":
        return manifest.cmd_models_publish(
            args.model, args.out, args.key, args.name, args.version, args.runtime,
            base_url=args.base_url, notes=args.notes,
        )
    try:
        config = _load(args)
    except ConfigError as exc:
        config = exc.usable or _fail_config(exc)
    directory = config.models.directory
    if action == "list":
        return models.cmd_models_list(directory, as_json=args.json)
    if action == "rollback":
        code = models.cmd_models_rollback(directory)
        if code == EXIT_OK:
            _signal_daemon(config)
        return code
    # update --now
    if not config.models.manifest_url:
        print("[models] manifest_url is not set: nothing to update from", file=sys.stderr)
        return EXIT_CONFIG
    from appliance.models.rollout import trusted_keys

    keys = [key.text() for key in trusted_keys(config.models.public_key)]
    code = models.cmd_models_update(directory, config.models.manifest_url, keys,
                                    keep_previous=config.models.keep_previous, activate=args.activate)
    if code == EXIT_OK:
        _signal_daemon(config)
    return code


def _fail_config(exc: ConfigError) -> Config:
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Avatar kiosk supervisor: keeps a talking avatar live in a LiveKit room.",
        epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 invalid configuration",
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", action="append", metavar="FILE",
            help="TOML file (repeat to layer; default: /etc/appliance/appliance.toml + appliance.d/*.toml)",
        )

    run = sub.add_parser("run", help="run the daemon in the foreground, logging to stderr")
    with_config(run)
    run.add_argument("--dev", action="store_true",
                     help="also start the built-in development LiveKit server and join it")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="override [logging] level")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate the configuration; exit 0 if usable, 3 if not")
    with_config(check)
    check.add_argument("files", nargs="*", metavar="FILE_OR_DIR",
                       help="check these files (or every *.toml in these directories) each on its own")
    check.set_defaults(func=cmd_check)

    config = sub.add_parser("config", help="show the effective configuration or the defaults")
    config.add_argument("action", choices=["show", "defaults"])
    with_config(config)
    config.set_defaults(func=cmd_config)

    status = sub.add_parser("status", help="show the running daemon's state")
    with_config(status)
    status.add_argument("--socket", help="status socket (default: [status] socket)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--timeout", type=_seconds, default=10.0, metavar="S",
                        help="how long to wait for the daemon's answer (default 10 s: a busy "
                             "slow device can take seconds)")
    status.set_defaults(func=cmd_status)

    presence = sub.add_parser("presence", help="play a visitor: arrive or leave (root)")
    presence.add_argument("action", choices=["arrive", "leave"])
    with_config(presence)
    presence.add_argument("--socket", help="status socket; commands go to control.sock beside it")
    presence.set_defaults(func=cmd_presence)

    say = sub.add_parser("say", help="make the avatar speak a 16-bit PCM WAV file, no agent needed (root)")
    say.add_argument("wav", nargs="?", metavar="FILE.wav", help="the file, or - for standard input")
    say.add_argument("--stop", action="store_true", help="stop what `appliance say` started")
    with_config(say)
    say.add_argument("--socket", help="status socket; commands go to control.sock beside it")
    say.set_defaults(func=cmd_say)

    models = sub.add_parser("models", help="avatar models: list, update, roll back; publish (operator side)")
    msub = models.add_subparsers(dest="action", required=True)
    m_list = msub.add_parser("list", help="the models on this kiosk and their state")
    with_config(m_list)
    m_list.add_argument("--json", action="store_true")
    m_update = msub.add_parser("update", help="check the manifest now, download and verify a new model")
    with_config(m_update)
    m_update.add_argument("--now", action="store_true", required=True, help="do it now (required)")
    m_update.add_argument("--activate", action="store_true",
                          help="also switch to it (when the daemon is stopped; a running one switches itself)")
    m_rollback = msub.add_parser("rollback", help="go back to the previous model (marks the current one bad)")
    with_config(m_rollback)
    m_keygen = msub.add_parser("keygen", help="make an ed25519 signing key pair (operator side)")
    m_keygen.add_argument("dir")
    m_sign = msub.add_parser("sign", help="(re)sign a manifest (operator side)")
    m_sign.add_argument("manifest")
    m_sign.add_argument("--key", required=True)
    m_publish = msub.add_parser("publish", help="copy a model into a directory with a signed manifest")
    m_publish.add_argument("model")
    m_publish.add_argument("--out", required=True)
    m_publish.add_argument("--key", required=True)
    m_publish.add_argument("--name", required=True)
    m_publish.add_argument("--version", required=True)
    m_publish.add_argument("--runtime", required=True, choices=["reference", "bithuman"])
    m_publish.add_argument("--base-url", default="", help="URL the directory will be served at")
    m_publish.add_argument("--notes", default="")
    models.set_defaults(func=cmd_models)

    demo = sub.add_parser(
        "demo", help="join the dev server as an agent, make the kiosk speak, record an MP4"
    )
    demo.add_argument("--out", default="demo.mp4", help="MP4 file to write (default demo.mp4)")
    demo.add_argument("--seconds", type=float, default=8.0, help="how long to record")
    demo.add_argument("--text", default="Hello! Welcome to the museum. I am your avatar guide.",
                      help="sentence to speak (needs espeak-ng; a bundled WAV is used otherwise)")
    demo.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = int(args.func(args))
    if args.command in ("run", "demo"):
        # The livekit native runtime can abort while the interpreter exits after
        # disconnect(); everything is closed by now, so leave without that risk.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
