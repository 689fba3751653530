"""Upstream for bench/memory.py: discards request bodies; also a role store API for u0…uN."""

from __future__ import annotations

import argparse
import json

from aiohttp import web

STORE_ORG = "bench"  # every u<N> is a developer of this enterprise org (SPEC §6 http store)


async def store_member(request: web.Request) -> web.Response:
    user = request.match_info["user"]
    if not (user.startswith("u") and user[1:].isdigit()):
        raise web.HTTPNotFound()
    membership = {"org": STORE_ORG, "plan": "enterprise", "role": "developer", "projects": {}}
    return web.json_response({"user": user, "memberships": [membership]})


async def store_project(request: web.Request) -> web.Response:
    return web.json_response({"project": request.match_info["project"], "org": STORE_ORG})


async def discard(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():  # counted, never kept
        received += len(chunk)
    body = {"method": request.method, "path": request.path, "received": received}
    return web.Response(text=json.dumps(body), content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/store/members/{user}", store_member)
    app.router.add_get("/store/projects/{project}", store_project)
    app.router.add_route("*", "/{tail:.*}", discard)
    # Loopback only; no access log (it would cost more than the handlers).
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
