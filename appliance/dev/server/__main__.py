"""`python -m appliance.dev.server --host 0.0.0.0 --port 7880 --key devkey --secret S`"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from appliance.dev.server import DevServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.dev.server",
        description="A small LiveKit-compatible server for development and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7880)
    parser.add_argument("--key", default="devkey", help="API key tokens must be issued by")
    parser.add_argument(
        "--secret",
        default=os.environ.get("LIVEKIT_API_SECRET", ""),
        help="API secret tokens are signed with (default: $LIVEKIT_API_SECRET)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("--secret (or LIVEKIT_API_SECRET) is required")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_serve(DevServer(args.host, args.port, args.key, args.secret)))
    return 0


async def _serve(server: DevServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
