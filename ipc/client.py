"""Client for ipc/server.py: `RPCClient(address, authkey).generate(...)` streams tokens.

Every server verb has a method here (see the server's module docstring for the replies).
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from ipc.connections import HandshakeTimeout, authenticate


class RPCError(RuntimeError):
    """The server answered a call with an error, hung up, or did not answer in time."""


class RPCClient:
    """One connection to an RPC server. timeout_s bounds the connect and key handshake and
    each wait for a reply message (None: wait as long as it takes); a wrong key raises
    multiprocessing's AuthenticationError."""

    def __init__(self, address: str | tuple[str, int], authkey: bytes, timeout_s: float | None = None) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s = {timeout_s}; must be > 0 or None")
        self.address, self.timeout_s = address, timeout_s
        self.conn = _connect(address, timeout_s)
        try:
            authenticate(self.conn, authkey, timeout_s, server=False)
        except HandshakeTimeout:
            self.conn.close()
            raise RPCError(f"the server at {address} did not complete the key handshake within {timeout_s} s") \
                from None
        except (EOFError, OSError) as e:
            self.conn.close()
            raise RPCError(f"the server at {address} hung up during the key handshake ({e or type(e).__name__})") \
                from e
        self._ids = itertools.count()

    def call(self, method: str, reply_timeout_s: float | None = None, **params: Any) -> Iterator[dict]:
        """Send one call; yield its replies until the last one (done / status / stopping / ...).
        reply_timeout_s: the wait for each reply (default: the client's timeout_s)."""
        call_id = next(self._ids)
        wait = reply_timeout_s if reply_timeout_s is not None else self.timeout_s
        try:
            self.conn.send({"id": call_id, "method": method, "params": params})
        except OSError as e:
            raise RPCError("the server closed the connection (stopped?)") from e
        while True:
            try:
                if wait is not None and not self.conn.poll(wait):
                    raise RPCError(f"{method}: no reply from the server within {wait} s")
                msg = self.conn.recv()
            except (EOFError, OSError) as e:
                raise RPCError("the server closed the connection (stopped?)") from e
            if msg.get("id") not in (call_id, None):
                continue  # a reply to an earlier, abandoned call
            if "error" in msg:
                raise RPCError(msg["error"])
            yield msg
            if msg.get("event") != "token":
                return

    def generate(self, prompt: str, images: list | None = None, raw_prompt: bool = False,
                 **sampling: Any) -> Iterator[dict]:
        """Yield {"event": "token", "token_id", "text", "sample"} per token, then {"event": "done", "output"}."""
        yield from self.call("generate", prompt=prompt, images=images or [], raw_prompt=raw_prompt,
                             sampling=sampling)

    def tokenize(self, prompt: str, images: int | list = 0, raw_prompt: bool = False) -> tuple[list[int], str]:
        """The token ids generate would prefill for this prompt and number of images (the
        checkpoint's chat template applied unless raw_prompt), and the templated text."""
        msg = next(self.call("tokenize", prompt=prompt, images=images, raw_prompt=raw_prompt))
        return msg["token_ids"], msg["prompt"]

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

    def capture_start(self) -> dict:
        """Start capturing the decode graphs not captured yet, in the background; returns
        {"started", "captured", "pending", "state"}."""
        return _fields(next(self.call("capture_start")))

    def capture_wait(self, timeout_s: float = 60.0) -> dict:
        """Wait until every decode bucket is captured or timeout_s passed; {"captured", "pending", "state"}."""
        wait = None if self.timeout_s is None else timeout_s + self.timeout_s  # the server waits first
        return _fields(next(self.call("capture_wait", reply_timeout_s=wait, timeout_s=timeout_s)))

    def capture_stop(self) -> dict:
        """Stop the background capture after the bucket in progress; {"captured", "pending", "state"}."""
        return _fields(next(self.call("capture_stop")))

    def switch_role(self, kind: str, index: int, new_kind: str, weights: str = "auto", timeout_s: float = 300.0
                    ) -> dict:
        """Make EPD stage kind+index serve as new_kind (weights: auto, map, peer or disk); once it
        does: {"from", "to", "weights", "drain_s", "seconds"}."""
        wait = None if self.timeout_s is None else timeout_s + self.timeout_s
        return _fields(next(self.call("switch_role", reply_timeout_s=wait, kind=kind, index=index, new_kind=new_kind,
                                      weights=weights, timeout_s=timeout_s)))

    def status(self) -> dict:
        return next(self.call("status"))["status"]

    def stop(self) -> None:
        next(self.call("stop"))

    def close(self) -> None:
        self.conn.close()


def _fields(msg: dict) -> dict:
    return {k: v for k, v in msg.items() if k not in ("id", "event")}


def _connect(address: str | tuple[str, int], timeout_s: float | None) -> Connection:
    try:
        if isinstance(address, tuple):
            sock = socket.create_connection(address, timeout=timeout_s)
        else:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout_s)
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
    except TimeoutError as e:
        raise RPCError(f"cannot connect to {address}: no answer within {timeout_s} s") from e
    except OSError as e:
        raise RPCError(f"cannot connect to {address}: {e.strerror or e}") from e
    sock.setblocking(True)
    return Connection(sock.detach())
