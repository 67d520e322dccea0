"""Connections for the RPC server (ipc/server.py) and client (ipc/client.py).

The wire format is multiprocessing.connection's (length-prefixed pickles after an HMAC challenge
both ways), but the listener accepts raw sockets so that no client can hold up another: each
connection is authenticated in its own thread with a deadline (`Acceptor`), a message is
capped at a size before anything is allocated for it (`recv_message`), and replies go out
through a bounded queue and a writer thread per client (`ClientConnection`), so a client that
stops reading is hung up instead of blocking the engine. `claim_address` checks a socket path
or port before a server spends minutes loading a model.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import queue
import socket
import stat
import threading
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import AuthenticationError, Connection, answer_challenge, deliver_challenge
from typing import Any

log = logging.getLogger(__name__)
Address = str | tuple[str, int]


class AddressError(RuntimeError):
    """The server's address cannot be used (the message says why and what to do)."""


class AddressInUse(AddressError):
    """A live server already listens on the address."""


def claim_address(address: Address) -> None:
    """Make sure a server can listen on `address`, before it loads a model.

    A unix socket path left by a server that died (nothing accepts on it) is removed; one a live
    server accepts on raises AddressInUse, and a path that is not a socket raises AddressError.
    For (host, port): the port must be free to bind."""
    if isinstance(address, tuple):
        host, port = address
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener binds
            try:
                probe.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise AddressInUse(f"port {host}:{port} is in use; stop that server or pick another --port") from e
                raise AddressError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
        return
    if address.startswith("\0"):  # abstract socket: no file to check
        return
    try:
        mode = os.stat(address).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AddressError(f"{address} exists and is not a socket; pick another --socket")
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(address)
        except ConnectionRefusedError:  # no listener: a stale file from a server that died
            os.unlink(address)
            log.warning("removed the stale socket %s (no server listens on it)", address)
            return
        except OSError as e:
            raise AddressError(f"socket {address} cannot be checked: {e.strerror or e}") from e
    raise AddressInUse(f"socket {address} is in use by a live server; stop it or pick another --socket")


class SocketListener:
    """A listening socket (unix path or (host, port)) that accepts raw, unauthenticated
    connections. close() removes the socket file, if it is still the one bound here."""

    def __init__(self, address: Address, backlog: int = 64) -> None:
        claim_address(address)
        if isinstance(address, tuple):
            try:
                self.sock = socket.create_server(address, backlog=backlog)
            except OSError as e:
                raise AddressError(f"cannot listen on {address[0]}:{address[1]}: {e.strerror or e}") from e
            self.address: Address = self.sock.getsockname()[:2]
            self._file = None
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.bind(address)
                self.sock.listen(backlog)
            except OSError as e:
                self.sock.close()
                if e.errno == errno.EADDRINUSE:  # a server started between the check and the bind
                    raise AddressInUse(f"socket {address} is in use by a live server; stop it or pick "
                                       "another --socket") from e
                raise AddressError(f"cannot listen on {address}: {e.strerror or e}") from e
            self.address = address
            info = os.stat(address)
            self._file = (address, info.st_dev, info.st_ino)
        self.sock.settimeout(0.2)  # accept() wakes up to notice close()
        self.closed = False

    def accept(self) -> socket.socket | None:
        """The next connection (blocking), or None after a 0.2 s timeout or once closed."""
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            return None
        except OSError:
            if self.closed:
                return None
            raise
        conn.setblocking(True)
        return conn

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        if self._file is not None:
            path, dev, ino = self._file
            try:
                info = os.stat(path)
                if (info.st_dev, info.st_ino) == (dev, ino):  # never remove a later server's socket
                    os.unlink(path)
            except FileNotFoundError:
                pass


def hang_up(conn: Connection) -> None:
    """Shut a connection down both ways: a read or write blocked on it, ours or the peer's,
    ends (EOF / EPIPE). The descriptor stays open until its owner closes it."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class HandshakeTimeout(Exception):
    """The peer did not complete the key handshake within the deadline."""


def authenticate(conn: Connection, authkey: bytes, timeout_s: float | None, server: bool) -> None:
    """Run multiprocessing's HMAC challenge both ways (the server challenges first). Past
    timeout_s the connection is hung up and HandshakeTimeout raised; AuthenticationError,
    EOFError and OSError pass through."""
    steps = (deliver_challenge, answer_challenge) if server else (answer_challenge, deliver_challenge)
    state = {"done": False, "expired": False}
    lock = threading.Lock()

    def expire() -> None:
        with lock:
            if not state["done"]:
                state["expired"] = True
                hang_up(conn)

    timer = threading.Timer(timeout_s, expire) if timeout_s is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        for step in steps:
            step(conn, authkey)
    except BaseException:
        with lock:
            state["done"] = True
            if state["expired"]:
                raise HandshakeTimeout(f"no handshake within {timeout_s} s") from None
        raise
    finally:
        if timer is not None:
            timer.cancel()
    with lock:
        state["done"] = True
        if state["expired"]:  # finished just as the timer fired: the socket is already shut
            raise HandshakeTimeout(f"no handshake within {timeout_s} s")


class MessageTooLarge(Exception):
    """A message's length prefix is over the limit (the stream cannot be resynchronised)."""


class BadFrame(Exception):
    """A message frame that no client sends (empty or negative length)."""


def recv_message(conn: Connection, max_bytes: int) -> Any:
    """Receive one pickled message of at most max_bytes. Raises MessageTooLarge or BadFrame
    (hang up: the stream is lost), EOFError / OSError (the peer is gone), or the unpickling
    error of a well-framed but undecodable message."""
    try:
        data = conn.recv_bytes(max_bytes)
    except OSError as e:
        if e.args == ("bad message length",):  # multiprocessing's check, before it allocates
            raise MessageTooLarge(f"a message over max_message_bytes = {max_bytes}") from None
        raise
    if not data:  # a negative length prefix reads as b""
        raise BadFrame("an empty or negative-length message frame")
    return pickle.loads(data)


class ClientConnection:
    """An authenticated connection. send() never blocks: replies queue for a writer thread, and
    a client that lets max_queued replies pile up (it stopped reading) is hung up."""

    def __init__(self, conn: Connection, name: str, max_queued: int = 4096) -> None:
        self.conn, self.name = conn, name
        self.open = True
        self._outbox: queue.Queue = queue.Queue(maxsize=max_queued)
        self._state_lock = threading.Lock()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name=f"{name}-writer", daemon=True)
        self._writer.start()

    def send(self, msg: dict) -> None:
        if not self.open:
            return
        try:
            self._outbox.put_nowait(msg)
        except queue.Full:
            log.warning("%s: %d replies queued and not read; hanging up", self.name, self._outbox.maxsize)
            self.hang_up()

    def _write_loop(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                break
            try:
                self.conn.send(msg)
            except (OSError, EOFError):
                self.open = False
                break
            except Exception:  # a reply that cannot be pickled: a server bug, not the client's
                log.exception("%s: cannot send a reply", self.name)
        self.hang_up()

    def hang_up(self) -> None:
        """End the connection now (queued replies are dropped); the peer sees EOF."""
        with self._state_lock:
            self.open = False
            if not self._closed:
                hang_up(self.conn)
        try:  # wake an idle writer; a busy one fails on the shut socket and ends
            self._outbox.put_nowait(None)
        except queue.Full:
            pass

    def finish(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (up to timeout_s; nothing if already hung up), then hang up and
        release the descriptor."""
        flush, self.open = self.open, False
        if flush:
            try:
                self._outbox.put(None, timeout=timeout_s)
            except queue.Full:
                pass
            self._writer.join(timeout_s)
        self.hang_up()  # unblocks a writer stuck on a peer that does not read
        self._writer.join(timeout_s)
        with self._state_lock:
            if not self._closed and not self._writer.is_alive():
                self._closed = True
                self.conn.close()


class Acceptor:
    """Accepts connections and authenticates each in its own thread with a deadline; an
    authenticated connection is handed to `serve(client)` in that thread. Every rejection is
    logged at WARNING and counted by reason; nothing a client does ends the accept loop."""

    def __init__(self, listener: SocketListener, authkey: bytes, serve: Callable[[ClientConnection], None],
                 handshake_timeout_s: float, max_pending_handshakes: int = 64) -> None:
        self.listener, self.authkey, self.serve = listener, authkey, serve
        self.handshake_timeout_s = handshake_timeout_s
        self.max_pending = max_pending_handshakes
        self.rejected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pending: set[Connection] = set()  # handshakes in progress
        self.clients: set[ClientConnection] = set()  # authenticated and open
        self._closing = False
        self._count = 0
        self.thread = threading.Thread(target=self._accept_loop, name="rpc-accept", daemon=True)

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                sock = self.listener.accept()
            except OSError as e:  # e.g. EMFILE: out of descriptors; keep accepting once freed
                log.warning("accept failed: %s", e)
                threading.Event().wait(0.1)
                continue
            if sock is None:
                continue
            self._count += 1
            name = f"conn{self._count}"
            conn = Connection(sock.detach())
            with self._lock:
                if self._closing:
                    hang_up(conn)
                    conn.close()
                    return
                busy = len(self._pending) >= self.max_pending
                if not busy:
                    self._pending.add(conn)
            if busy:
                self._reject(conn, name, "busy", f"{self.max_pending} handshakes already in progress")
                continue
            threading.Thread(target=self._connection, args=(conn, name), name=name, daemon=True).start()

    def _connection(self, conn: Connection, name: str) -> None:
        reason = None
        try:
            authenticate(conn, self.authkey, self.handshake_timeout_s, server=True)
        except HandshakeTimeout as e:
            reason, detail = "timeout", str(e)
        except AuthenticationError as e:
            reason, detail = "auth_failed", str(e) or "wrong key"
        except EOFError:
            reason, detail = "closed", "the client hung up during the handshake"
        except OSError as e:
            bad_length = e.args == ("bad message length",)
            reason, detail = ("bad_length", "handshake message too long") if bad_length else ("io_error", str(e))
        except Exception as e:  # garbage the handshake could not parse
            reason, detail = "error", f"{type(e).__name__}: {e}"
        with self._lock:
            self._pending.discard(conn)
            if reason is None and self._closing:
                reason, detail = "closed", "the server is stopping"
            client = None if reason else ClientConnection(conn, name)
            if client is not None:
                self.clients.add(client)
        if client is None:
            self._reject(conn, name, reason, detail)
            return
        try:
            self.serve(client)
        finally:
            with self._lock:
                self.clients.discard(client)
            client.finish()

    def _reject(self, conn: Connection, name: str, reason: str, detail: str) -> None:
        log.warning("rejected connection %s on %s: %s (%s)", name, self.listener.address, reason, detail)
        with self._lock:
            self.rejected[reason] += 1
        hang_up(conn)
        conn.close()

    def stats(self) -> dict:
        with self._lock:
            return {"rejected_connections": sum(self.rejected.values()),
                    "rejected_connections_by_reason": dict(self.rejected),
                    "connections_open": len(self.clients)}

    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Stop accepting, remove the socket file, flush and hang up every connection."""
        with self._lock:
            self._closing = True
            pending, clients = list(self._pending), list(self.clients)
        self.listener.close()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5.0)
        for conn in pending:
            hang_up(conn)  # its handshake thread fails, counts it and closes it
        for client in clients:
            client.finish(flush_timeout_s)
