"""The /metrics endpoint: one thread, one selector, a fixed number of connections.

prometheus_client's own server starts a thread per connection and waits on a slow client for
ever, so a few dozen connections that never finish their request exhaust the unit's TasksMax
and stop the whole service. Here one thread serves every connection without blocking; at most
MAX_CONNECTIONS are open at once (when a new one comes past that, the one that has waited
longest for its request is closed to make room, so a scraper still gets in while slow clients
hold the rest); a request must arrive within REQUEST_TIMEOUT and the whole exchange end within
EXCHANGE_TIMEOUT, or the connection is closed. One request per connection (``Connection:
close``). Rendering is prometheus_client's (content negotiation, OpenMetrics, gzip, ``name[]``).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 5.0  # from the accept to the end of the request's headers
EXCHANGE_TIMEOUT = 10.0  # from the accept to the last byte of the response
MAX_REQUEST = 8 << 10  # the request line and headers; a GET has no body
LIMIT_WARN_EVERY = 600.0  # the WARNING that the limit was reached, at most this often
ACCEPT_PAUSE = 0.5  # after accept() failed for want of descriptors, before the next try
PATHS = ("/metrics", "/")


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    accepted: float
    request: bytearray = field(default_factory=bytearray)
    response: memoryview | None = None  # what is left to send, once the request is in

    @property
    def deadline(self) -> float:
        return self.accepted + (REQUEST_TIMEOUT if self.response is None else EXCHANGE_TIMEOUT)


class MetricsServer:
    """Serves ``registry`` at ``host``:``port`` on one thread until stop()."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE | socket.AI_NUMERICHOST)[0]
        self._listener = socket.socket(family, kind, proto)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(64)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = threading.Event()
        self._conns: dict[socket.socket, _Conn] = {}
        self._warned_at = -LIMIT_WARN_EVERY
        self._paused_until: float | None = None  # accept() failed (EMFILE): not watched until
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):  # closed: the loop has ended already
            self._wake_w.send(b"x")
        self._thread.join(timeout)

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if self._paused_until is not None and now >= self._paused_until:
                    self._paused_until = None
                    sel.register(self._listener, selectors.EVENT_READ)
                deadlines = [c.deadline for c in self._conns.values()]
                if self._paused_until is not None:
                    deadlines.append(self._paused_until)
                timeout = max(0.0, min(deadlines, default=1.0) - now)
                for key, _mask in sel.select(min(timeout, 1.0)):
                    if key.fileobj is self._listener:
                        self._accept(sel)
                    elif isinstance(key.data, _Conn) and key.data.sock in self._conns:
                        self._serve(sel, key.data)  # (not one closed earlier in this turn)
                now = time.monotonic()
                for conn in [c for c in self._conns.values() if now >= c.deadline]:
                    self._close(sel, conn)
        except Exception:  # the loop must end cleanly whatever a client did; say what broke
            log.exception("metrics: the server stopped")
        finally:
            for conn in list(self._conns.values()):
                self._close(sel, conn)
            sel.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(MAX_CONNECTIONS):  # a burst is taken over several turns
            try:
                sock, _peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the listener would stay readable
                log.debug("metrics: accept failed: %s; pausing for %.1f s", exc, ACCEPT_PAUSE)
                sel.unregister(self._listener)
                self._paused_until = time.monotonic() + ACCEPT_PAUSE
                return
            sock.setblocking(False)
            if len(self._conns) >= MAX_CONNECTIONS and not self._make_room(sel):
                sock.close()
                continue
            conn = _Conn(sock, time.monotonic())
            self._conns[sock] = conn
            sel.register(sock, selectors.EVENT_READ, conn)

    def _make_room(self, sel: selectors.BaseSelector) -> bool:
        """Close the connection that has waited longest for its request (False: none waits)."""
        waiting = [c for c in self._conns.values() if c.response is None]
        if not waiting:
            return False
        now = time.monotonic()
        if now - self._warned_at >= LIMIT_WARN_EVERY:
            self._warned_at = now
            log.warning("metrics: more than %d connections at once; the oldest that has not "
                        "sent its request is closed to make room", MAX_CONNECTIONS)
        self._close(sel, min(waiting, key=lambda c: c.accepted))
        return True

    def _close(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        self._conns.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn.sock)
        conn.sock.close()

    def _serve(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        try:
            if conn.response is None:
                data = conn.sock.recv(4096)
                if not data:
                    self._close(sel, conn)
                    return
                conn.request += data
                end = _end_of_head(conn.request)
                if end < 0 and len(conn.request) > MAX_REQUEST:
                    conn.response = memoryview(_response(431, "request too large\n"))
                elif end < 0:
                    return
                else:
                    conn.response = memoryview(self._respond(bytes(conn.request[:end])))
                sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            sent = conn.sock.send(conn.response)
            conn.response = conn.response[sent:]
            if not conn.response:
                conn.sock.shutdown(socket.SHUT_WR)
                self._close(sel, conn)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client, and the like
            self._close(sel, conn)

    def _respond(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "bad request\n")
        method, target, _version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        url = urlsplit(target)
        if url.path not in PATHS:
            return _response(404, "not found; the metrics are at /metrics\n")
        if method not in ("GET", "HEAD"):
            return _response(405, f"{method} is not allowed; use GET\n",
                             [("Allow", "GET, HEAD")])
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        names = parse_qs(url.query).get("name[]")
        registry: Collector = (self.registry.restricted_registry(names) if names
                               else self.registry)
        try:
            body = encoder(registry)
        except Exception:  # a collector failed: the scrape fails, the service does not
            log.exception("metrics: rendering failed")
            return _response(500, "rendering the metrics failed\n")
        extra = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            extra.append(("Content-Encoding", "gzip"))
        return _response(200, body, extra, head_only=method == "HEAD")


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def _response(status: int, body: bytes | str, headers: list[tuple[str, str]] | None = None,
              *, head_only: bool = False) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    fields = list(headers or [])
    if not any(k == "Content-Type" for k, _ in fields):
        fields.insert(0, ("Content-Type", "text/plain; charset=utf-8"))
    lines = [f"HTTP/1.1 {status} {REASONS[status]}",
             *(f"{k}: {v}" for k, v in fields),
             f"Content-Length: {len(data)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else data)


def _end_of_head(request: bytearray) -> int:
    """Where the request's headers end (a blank line, CRLF or bare LF), or -1."""
    ends = [i for i in (request.find(b"\r\n\r\n"), request.find(b"\n\n")) if i >= 0]
    return min(ends, default=-1)
