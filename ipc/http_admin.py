"""Admin routes of the HTTP server (ipc/http_server.py), behind the same API key:

    POST /admin/switch_role {"kind": "encode", "index": 1, "new_kind": "prefill", "weights": "auto", "timeout_s": 300}
        -> 200 {"from", "to", "drain_s", "seconds"} once the stage serves in its new role (EPD,
           engine/switching.py; requests go on meanwhile); 400 with the reason when the switch
           cannot be done; 504 past timeout_s; 500 if the stage died on the way.

The switch starts on the engine thread (EngineLoop.call) and the engine loop advances it as it
steps; the handler asks the engine thread every 50 ms whether it is over.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request as HTTPRequest

from engine.sampling import RequestError


def add_admin_routes(app: FastAPI, front: Any, on_engine: Any, http_error: type) -> None:
    """front: the Frontend (auth, loop); on_engine(fn): await fn() run on the engine thread."""

    @app.post("/admin/switch_role")
    async def switch_role(request: HTTPRequest) -> dict:
        front.check_auth(request)
        loop = front.serving_loop()
        try:
            body = await request.json()
        except ValueError as e:
            raise http_error(400, f"the body must be JSON: {e}") from e
        if not isinstance(body, dict):
            raise http_error(400, "the body must be a JSON object {kind, index, new_kind}")
        unknown = sorted(set(body) - {"kind", "index", "new_kind", "weights", "timeout_s"})
        if unknown:
            raise http_error(400, f"unknown field(s) {unknown}; expected kind, index, new_kind, weights, timeout_s",
                             unknown[0])
        kind, index, new_kind = body.get("kind"), body.get("index"), body.get("new_kind")
        timeout_s = body.get("timeout_s", 300.0)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise http_error(400, f"index = {index!r}; must be an int >= 0", "index")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 86400:
            raise http_error(400, f"timeout_s = {timeout_s!r}; must be a number in (0, 86400]", "timeout_s")
        engine = loop.engine
        if not hasattr(engine, "begin_switch"):
            raise http_error(400, "the aggregated engine has no stages to switch (serve --mode epd or pd)")
        try:
            name = await on_engine(partial(engine.begin_switch, kind, index, new_kind, body.get("weights", "auto")))
        except RequestError as e:
            raise http_error(400, str(e)) from e
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                record = await on_engine(partial(engine.switch_done, name))
            except Exception as e:
                raise http_error(500, f"switch to {name} failed: {e}") from e
            if record is not None:
                return record
            if time.monotonic() > deadline:
                raise http_error(504, f"{name} is not serving within {timeout_s:g} s (the switch goes on)")
            await asyncio.sleep(0.05)
