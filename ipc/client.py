"""Client for ipc/server.py: `RPCClient(address, authkey).generate(...)` streams tokens."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from multiprocessing.connection import Client
from typing import Any


class RPCError(RuntimeError):
    """The server answered a call with an error."""


class RPCClient:
    def __init__(self, address: str | tuple[str, int], authkey: bytes) -> None:
        self.conn = Client(address, authkey=authkey)  # raises AuthenticationError on a wrong key
        self._ids = itertools.count()

    def call(self, method: str, **params: Any) -> Iterator[dict]:
        """Send one call; yield its replies until the last one (done / status / stopping)."""
        call_id = next(self._ids)
        try:
            self.conn.send({"id": call_id, "method": method, "params": params})
        except OSError as e:
            raise RPCError("the server closed the connection (stopped?)") from e
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError) as e:
                raise RPCError("the server closed the connection (stopped?)") from e
            if msg.get("id") != call_id:
                continue  # a reply to an earlier, abandoned call
            if "error" in msg:
                raise RPCError(msg["error"])
            yield msg
            if msg.get("event") != "token":
                return

    def generate(self, prompt: str, images: list | None = None, raw_prompt: bool = False,
                 **sampling: Any) -> Iterator[dict]:
        """Yield {"event": "token", "token_id", "text"} per token, then {"event": "done", "output"}."""
        yield from self.call("generate", prompt=prompt, images=images or [], raw_prompt=raw_prompt,
                             sampling=sampling)

    def kv_init(self, prompt: str, images: list | None = None, raw_prompt: bool = False,
                **sampling: Any) -> tuple[int, int]:
        """Prefill a session; returns (session, first token id)."""
        msg = next(self.call("kv_init", prompt=prompt, images=images or [], raw_prompt=raw_prompt,
                             sampling=sampling))
        return msg["session"], msg["token_id"]

    def kv_step(self, session: int, token_id: int | None = None) -> int:
        return next(self.call("kv_step", session=session, token_id=token_id))["token_ids"][0]

    def kv_generate(self, session: int, num_steps: int) -> list[int]:
        return next(self.call("kv_generate", session=session, num_steps=num_steps))["token_ids"]

    def kv_close(self, session: int) -> int:
        return next(self.call("kv_close", session=session))["num_tokens"]

    def status(self) -> dict:
        return next(self.call("status"))["status"]

    def stop(self) -> None:
        next(self.call("stop"))

    def close(self) -> None:
        self.conn.close()
