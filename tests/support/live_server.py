"""Run an ASGI app on a real uvicorn server on 127.0.0.1 in a background thread, for HTTP tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


class ClosingServer(uvicorn.Server):
    """A uvicorn server that, once its graceful shutdown is over, aborts the connections it gave up on.

    uvicorn asks every connection to shut down and waits ``timeout_graceful_shutdown``; a connection caught
    mid-cycle (a client that went away as the server stopped) can outlive that and is then left open until
    the garbage collector warns about it, which the suite turns into an error in whatever test runs next.
    """

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.abort()
        await asyncio.sleep(0)  # let the aborted transports run their connection_lost


@contextmanager
def live_server(app, *, startup_timeout: float = 120.0, port: int = 0) -> Iterator[str]:
    """Serve ``app`` (lifespan included) and yield its base URL; stop it on exit."""
    # IPPROTO_TCP explicitly: uvicorn then sets TCP_NODELAY on accepted connections (no 40 ms Nagle stalls).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    server = ClosingServer(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server exited during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError("server did not start in time")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
