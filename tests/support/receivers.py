"""Real notification endpoints for the tests: an SMTP server (aiosmtpd), an HTTP endpoint that
takes apprise's json:// posts, and a blackhole that accepts TCP connections and never answers
(a dead mail relay)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        msg = message_from_bytes(envelope.content)
        parts = [part for part in msg.walk() if not part.is_multipart()]
        text = next((part for part in parts if part.get_content_type() == "text/plain"),
                    parts[0] if parts else msg)
        body = text.get_payload(decode=True)
        self.messages.append({
            "subject": str(msg["Subject"]), "to": ",".join(envelope.rcpt_tos),
            "body": (body if isinstance(body, bytes) else b"").decode("utf-8", "replace"),
            # (content type, file name, bytes) of each attachment
            "attachments": [(part.get_content_type(), part.get_filename(),
                             part.get_payload(decode=True)) for part in parts
                            if part.get_filename()]})
        return "250 OK"


@contextmanager
def smtp_receiver() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    box = _Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, box.messages
    finally:
        controller.stop()


@contextmanager
def http_receiver(up: threading.Event | None = None) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """A JSON endpoint keeping what it is sent; with ``up``, it answers 503 (and keeps
    nothing) until ``up`` is set."""
    posts: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            if up is not None and not up.is_set():
                self.send_response(503)
                self.end_headers()
                return
            posts.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], posts
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def blackhole() -> Iterator[int]:
    """A listener that never accepts: connects succeed, nothing is ever said."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])
