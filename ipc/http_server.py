"""OpenAI-compatible HTTP server (FastAPI + uvicorn; the `http` extra) in front of any engine.

    POST /v1/chat/completions   messages with text and image_url parts (data: URLs; local paths
                                and file:// under --allowed-local-media-path; http(s) fetched with
                                a size cap and a timeout), stream (SSE), n, logprobs, usage
    POST /v1/completions        a raw prompt (no chat template), stream too
    GET  /v1/models, GET /health (503 while loading or broken), GET /metrics (Prometheus)

An adapter over engine/serving.py's EngineLoop, as the RPC server is: the loop's thread owns the
engine; a handler never blocks the event loop: the chat template, tokenization and image decoding
run on the engine thread (`EngineLoop.call`), remote images are fetched asynchronously, and the
request's events come back through an asyncio queue fed with call_soon_threadsafe. Each request
has its own owner: a client that goes away (stream or not) aborts it (`abort_owner`). At most
max_waiting requests are admitted and not finished; beyond that the answer is 429 at once. Errors
are OpenAI's JSON {"error": {"message", "type", "param", "code"}}; the message names the field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from engine.config import ConfigError
from engine.images import ImageError
from engine.request import Request
from engine.sampling import RequestError
from engine.serving import EngineLoop, Failed, Finished, LoopStopped, TokenDelta, describe_error
from ipc import openai_protocol as oa
from ipc.http_admin import add_admin_routes
from ipc.http_metrics import CONTENT_TYPE, HTTPMetrics
from ipc.media import image_source, media_dir_of

__all__ = ["HTTPError", "UvicornThread", "build_app"]
log = logging.getLogger(__name__)
_CLIENT_ERRORS = (RequestError, ImageError, ConfigError, ValueError)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class ClientGone(Exception):  # noqa: N818 -- an event, not an error
    """The client disconnected; its request is aborted."""


class Frontend:
    """What the app's handlers share: settings, the loop (None while the engine loads), counters."""

    def __init__(self, loop: EngineLoop | None, model_name: str, api_key: str | None = None,
                 max_waiting: int = 256, max_request_bytes: int = 64 * 2**20,
                 allowed_local_media_path: str | Path | None = None, max_image_url_bytes: int = 20 * 2**20,
                 image_url_timeout_s: float = 10.0, status_timeout_s: float = 5.0) -> None:
        if max_waiting < 1 or max_request_bytes < 1024:
            raise ValueError(f"max_waiting = {max_waiting} (>= 1), max_request_bytes = {max_request_bytes} (>= 1024)")
        self.loop = loop
        self.model_name, self.api_key = model_name, api_key
        self.max_waiting, self.max_request_bytes = max_waiting, max_request_bytes
        self.media_dir = media_dir_of(allowed_local_media_path)
        self.max_image_url_bytes, self.image_url_timeout_s = max_image_url_bytes, image_url_timeout_s
        self.status_timeout_s = status_timeout_s
        self.admitted = 0  # touched on the event loop only
        self.metrics = HTTPMetrics()
        self.created = int(time.time())

    def attach(self, loop: EngineLoop) -> None:
        """The engine is loaded (its loop started or about to): serve it."""
        self.loop = loop

    # ------------------------------------------------------------------ request prelude

    def check_auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise HTTPError(401, "Authorization: a valid 'Bearer <api key>' header is required "
                                 "(the server's --api-key / EPD_API_KEY)", "authorization")

    def serving_loop(self) -> EngineLoop:
        if self.loop is None:
            raise HTTPError(503, "the model is still loading; retry once /health answers 200")
        return self.loop

    async def read_json(self, request: HTTPRequest) -> dict:
        """The body as a JSON object; 413 past max_request_bytes (Content-Length first, then as it streams)."""
        cap = self.max_request_bytes
        length = request.headers.get("content-length", "")
        too_big = f"the limit is {cap} bytes (--max-request-bytes)"
        if length.isdigit() and int(length) > cap:
            raise HTTPError(413, f"body: {length} bytes; {too_big}", "body")
        chunks, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > cap:
                raise HTTPError(413, f"body: more than {cap} bytes; {too_big}", "body")
            chunks.append(piece)
        try:
            data = json.loads(b"".join(chunks))
        except ValueError as e:
            raise HTTPError(400, f"body: invalid JSON ({e})", "body") from e
        if not isinstance(data, dict):
            raise HTTPError(400, f"body: must be a JSON object, got {type(data).__name__}", "body")
        return data

    async def image_source(self, url: str, field: str) -> Any:
        try:
            return await image_source(url, field, self.media_dir, self.max_image_url_bytes, self.image_url_timeout_s)
        except RequestError as e:
            raise HTTPError(400, str(e), field) from e

    # ------------------------------------------------------------------ generation

    async def generate(self, request: HTTPRequest, kind: str) -> Response:
        """POST /v1/chat/completions (kind "chat") or /v1/completions ("completion")."""
        endpoint = "chat" if kind == "chat" else "completions"
        self.check_auth(request)
        loop = self.serving_loop()
        if self.admitted >= self.max_waiting:
            self.metrics.outcome(endpoint, "rejected")
            raise HTTPError(429, f"the server has {self.admitted} requests in flight; the limit is "
                                 f"{self.max_waiting} (--max-waiting); retry later")
        self.admitted += 1
        slot = _Slot(self, endpoint)
        owner = object()
        try:
            data = await self.read_json(request)
            model = oa.ChatCompletionRequest if kind == "chat" else oa.CompletionRequest
            try:
                body = model.model_validate(data)
            except oa.ValidationError as e:
                message, param = oa.validation_message(e.errors())
                raise HTTPError(422, message, param) from e
            if body.model != self.model_name:
                raise HTTPError(404, f"model: {body.model!r} is not served here; this server serves "
                                     f"{self.model_name!r}", "model")
            if kind == "chat":
                messages, urls = _parsed(oa.chat_messages, body)
                images = [await self.image_source(url, field) for url, field in urls]
                prompt = None
            else:
                messages, images, prompt = None, [], _parsed(oa.completion_prompt, body)
            queue: asyncio.Queue = asyncio.Queue()
            aio = asyncio.get_running_loop()
            added = aio.create_future()
            start = partial(self._start, loop, owner, queue, aio, body, messages, prompt, images)
            loop.call(start, partial(_resolve, aio, added))
            try:
                await _until(request, added)
            except ClientGone:
                loop.abort_owner(owner)
                self.metrics.outcome(endpoint, "aborted")
                raise
            except _CLIENT_ERRORS as e:
                raise HTTPError(400, str(e)) from e
            except LoopStopped as e:
                raise HTTPError(503, f"the server is stopping: {e}") from e
            except Exception as e:
                status = 503 if type(e).__name__ == "StageError" else 500
                raise HTTPError(status, f"the engine failed the request: {describe_error(e)}") from e
            rid = oa.new_id("chatcmpl" if kind == "chat" else "cmpl")
            if body.stream:
                stream = self._stream(kind, rid, body, queue, endpoint, slot)
                response = _EventStream(stream, on_close=partial(slot.close, loop, owner))
                slot = None  # the stream releases it
                return response
            return await self._collect(request, kind, rid, queue, endpoint, loop, owner)
        except HTTPError as e:
            self.metrics.outcome(endpoint, "server_error" if e.status >= 500 else "client_error")
            raise
        except asyncio.CancelledError:  # the server cancelled the handler (shutdown): free the request
            loop.abort_owner(owner)
            raise
        finally:
            if slot is not None:
                slot.close(None, None)

    def _start(self, loop: EngineLoop, owner: object, queue: asyncio.Queue, aio: asyncio.AbstractEventLoop,
               body: Any, messages: list[dict] | None, prompt: str | None, images: list) -> None:
        """On the engine thread: the prompt (the chat template), max_tokens, the request."""
        engine = loop.engine
        tokenizer = engine.input_processor.tokenizer
        if messages is not None:
            prompt = tokenizer.render_chat(messages)
        max_tokens = oa.requested_max_tokens(body)
        if max_tokens is None:  # OpenAI's default: what the context has left
            context = engine.config.max_model_len
            used = len(engine.tokenize(prompt, len(images), raw_prompt=True)[1])
            if used >= context:
                raise RequestError(f"messages: the prompt has {used} tokens; the context length is {context}")
            max_tokens = context - used
        sampling = oa.sampling_of(body, max_tokens)

        def sink(event: Any) -> None:  # engine thread: token texts for logprobs are made here
            texts = None
            if isinstance(event, Finished) and sampling.logprobs:
                ids = {t for o in event.output.outputs for r in (o.logprobs or []) for t in [r.token_id, *dict(r.top)]}
                texts = {t: tokenizer.decode([t], skip_special_tokens=False) for t in ids}
            aio.call_soon_threadsafe(queue.put_nowait, (event, texts))

        loop.add(Request(prompt, images=images, raw_prompt=True), sampling, owner, sink)

    async def _collect(self, request: HTTPRequest, kind: str, rid: str, queue: asyncio.Queue, endpoint: str,
                       loop: EngineLoop, owner: object) -> Response:
        while True:
            getter = asyncio.ensure_future(queue.get())
            try:
                event, texts = await _until(request, getter)
            except ClientGone:
                loop.abort_owner(owner)
                self.metrics.outcome(endpoint, "aborted")
                raise
            if isinstance(event, Finished):
                self.metrics.finished(endpoint, event.output)
                return JSONResponse(oa.response_body(kind, rid, self.model_name, event.output,
                                                     (texts or {}).get))
            if isinstance(event, Failed):
                raise HTTPError(503 if "stopped" in event.error else 500, event.error)

    async def _stream(self, kind: str, rid: str, body: Any, queue: asyncio.Queue, endpoint: str, slot: _Slot):
        created, model = int(time.time()), self.model_name
        if kind == "chat":
            for i in range(body.n):
                yield _sse(oa.chunk(kind, rid, model, created, i, role=True))
        while True:
            event, _ = await queue.get()
            if isinstance(event, TokenDelta):
                if event.text:
                    yield _sse(oa.chunk(kind, rid, model, created, event.sample, text=event.text))
                continue
            if isinstance(event, Finished):
                out = event.output
                slot.finished = True
                self.metrics.finished(endpoint, out)
                for o in out.outputs:
                    yield _sse({**oa.chunk(kind, rid, model, created, o.index, finish_reason=o.finish_reason),
                                "epd_metrics": oa.epd_metrics(out)})
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                                "created": created, "model": model, "choices": [], "usage": oa.usage(out)})
            else:
                slot.finished = True
                self.metrics.outcome(endpoint, "server_error")
                yield _sse(oa.error_body(503 if "stopped" in event.error else 500, event.error))
            yield "data: [DONE]\n\n"
            return

    # ------------------------------------------------------------------ status

    async def status(self) -> dict | None:
        """The loop's status_now from the engine thread; None while loading or if it does not answer."""
        if self.loop is None:
            return None
        aio = asyncio.get_running_loop()
        fut = aio.create_future()
        self.loop.call(self.loop.status_now, partial(_resolve, aio, fut))
        try:
            return await asyncio.wait_for(fut, self.status_timeout_s)
        except (asyncio.TimeoutError, LoopStopped):
            return None


class _Slot:
    """One admitted request: released once (the handler, or the stream when it closes); a
    stream closed before its request finished aborts it."""

    def __init__(self, frontend: Frontend, endpoint: str) -> None:
        self.frontend, self.endpoint, self.finished, self.open = frontend, endpoint, False, True

    def close(self, loop: EngineLoop | None, owner: object | None) -> None:
        if not self.open:
            return
        self.open = False
        self.frontend.admitted -= 1
        if loop is not None and not self.finished:
            loop.abort_owner(owner)
            self.frontend.metrics.outcome(self.endpoint, "aborted")


class _EventStream(StreamingResponse):
    """SSE that watches for the client going away whatever the ASGI spec version (a stalled
    stream notices too), and runs on_close however it ends."""

    def __init__(self, content: Any, on_close: Any) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(run)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._on_close()


def _parsed(fn: Any, body: Any) -> Any:
    try:
        return fn(body)
    except RequestError as e:
        raise HTTPError(400, str(e)) from e


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _resolve(aio: asyncio.AbstractEventLoop, fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """EngineLoop.call's done (engine thread) -> the future (event loop)."""
    def settle() -> None:
        if fut.done():
            return
        fut.set_exception(error) if error is not None else fut.set_result(result)
    try:
        aio.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed: nobody waits any more
        pass


async def _until(request: HTTPRequest, fut: asyncio.Future) -> Any:
    """fut's result; ClientGone (fut cancelled) if the client disconnects first."""
    while True:
        done, _ = await asyncio.wait({fut}, timeout=0.2)
        if done:
            return fut.result()
        if await request.is_disconnected():
            fut.cancel()
            raise ClientGone()


def build_app(loop: EngineLoop | None, model_name: str, **settings: Any) -> FastAPI:
    """The app serving `loop`'s engine as `model_name` (loop None: /health answers 503 until
    `app.state.frontend.attach(loop)`). settings: Frontend's (api_key, max_waiting,
    max_request_bytes, allowed_local_media_path, max_image_url_bytes, image_url_timeout_s)."""
    front = Frontend(loop, model_name, **settings)
    app = FastAPI(title="epd-engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.frontend = front

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(oa.error_body(status, message, param), status_code=status)

    @app.exception_handler(HTTPError)
    async def on_http_error(request: HTTPRequest, e: HTTPError) -> JSONResponse:
        return error(e.status, e.message, e.param)

    @app.exception_handler(ClientGone)
    async def on_gone(request: HTTPRequest, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        return error(422, *oa.validation_message(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest) -> Response:
        return await front.generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        return await front.generate(request, "completion")

    @app.get("/v1/models")
    async def models(request: HTTPRequest) -> dict:
        front.check_auth(request)
        card: dict[str, Any] = {"id": model_name, "object": "model", "created": front.created, "owned_by": "epd-engine"}
        config = getattr(front.loop.engine, "config", None) if front.loop else None
        if config is not None:
            card["max_model_len"] = config.max_model_len
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if front.loop is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        status = await front.status()
        if status is None:
            return JSONResponse({"status": "unavailable", "reason": "the engine did not answer"}, status_code=503)
        broken = status.get("broken") or status.get("engine_status_error")
        if broken:
            return JSONResponse({"status": "broken", "reason": broken}, status_code=503)
        return JSONResponse({"status": "ok", "mode": status.get("mode")})

    @app.get("/metrics")
    async def metrics() -> Response:
        status = await front.status()
        up = status is not None and not status.get("broken")
        return Response(front.metrics.render(status, front.admitted, up), media_type=CONTENT_TYPE)

    async def on_engine(fn: Any) -> Any:
        aio = asyncio.get_running_loop()
        fut = aio.create_future()
        front.serving_loop().call(fn, partial(_resolve, aio, fut))
        return await fut

    add_admin_routes(app, front, on_engine, HTTPError)
    return app


class UvicornThread:
    """uvicorn serving `app` in a thread on a socket bound here (port 0: an ephemeral port; a
    bind error raises OSError in the caller, before any model loads)."""

    def __init__(self, app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(2048)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5,
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http",
                                       daemon=True)

    def start(self, timeout_s: float = 30.0) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 15.0) -> bool:
        """Stop serving (connections in flight get up to 5 s); True once the thread has ended."""
        self.server.should_exit = True
        if self.thread.ident is not None:
            self.thread.join(timeout_s)
        self.sock.close()
        return not self.thread.is_alive()
