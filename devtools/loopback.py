"""What every local server of the dev stack shares: a ThreadingHTTPServer on loopback, served from a daemon thread,
with start/stop, its URL and use as a context manager (subclasses only build their server), and the request handler
settings they all need (`LoopbackHandler`)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class LoopbackHandler(BaseHTTPRequestHandler):
    """Base of the local servers' request handlers: kept-alive HTTP/1.1 connections, as AWS and Adobe keep them."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle + the peer's delayed ACK hold the body
    # ~40 ms on a kept-alive connection, a stall real AWS/Adobe endpoints do not have.
    disable_nagle_algorithm = True


class LoopbackService:
    host: str = "127.0.0.1"
    thread_name: str = "loopback-service"
    poll_interval: float = 0.1
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def _make_server(self) -> ThreadingHTTPServer:
        raise NotImplementedError

    def _after_shutdown(self) -> None:
        """Hook: release what the server kept (e.g. idle keep-alive sockets) before the thread is joined."""

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{self.thread_name} not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._server = server = self._make_server()
        server.daemon_threads = True
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": self.poll_interval},
            name=self.thread_name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._after_shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
