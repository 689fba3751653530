"""Minimal aiohttp pass-through proxy, no authorization: the Python floor for bench/run.py."""

from __future__ import annotations

import argparse
import asyncio
import importlib
from collections.abc import AsyncIterator
from importlib.util import find_spec

from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web

# RFC 9110 §7.6.1: connection-specific fields never cross a proxy.
HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)


async def _body(request: web.BaseRequest) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(64 * 1024):
        yield chunk


def make_handler(session: ClientSession, upstream: str) -> web.Server:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with session.request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=_body(request) if request.body_exists else None,
            allow_redirects=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        ) as up:
            response = web.StreamResponse(status=up.status, reason=up.reason)
            for name, value in up.headers.items():
                if name.lower() not in HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    return web.Server(handle, access_log=None)


async def serve(host: str, port: int, upstream: str) -> None:
    session = ClientSession(
        connector=TCPConnector(limit=0, keepalive_timeout=30),
        timeout=ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
        cookie_jar=DummyCookieJar(),
    )
    runner = web.ServerRunner(make_handler(session, upstream.rstrip("/")))
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        await asyncio.Event().wait()  # until the bench kills us
    finally:
        await runner.cleanup()
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    # Imported by name so the bench type-checks where uvloop is not installed.
    if args.loop == "uvloop" or (args.loop == "auto" and find_spec("uvloop") is not None):
        importlib.import_module("uvloop").run(serve(host, int(port), args.upstream))
    else:
        asyncio.run(serve(host, int(port), args.upstream))


if __name__ == "__main__":
    main()
