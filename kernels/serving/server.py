"""uvicorn for our command-line servers: Ctrl-C / SIGTERM means a graceful stop and exit status 0.

Plain ``uvicorn.Server`` re-raises the signal that stopped it once it has shut down, so the process
ends "killed by SIGTERM" (-15) or with 130 even though the lifespan ran and every child was joined.
Our servers are supervised (systemd, Kubernetes, the gateway's ``LocalCloud``): a clean stop reads 0.
"""

from __future__ import annotations

from types import FrameType

import uvicorn


class GracefulServer(uvicorn.Server):
    """A ``uvicorn.Server`` that returns normally after a signal-triggered graceful shutdown.

    >>> server = GracefulServer(uvicorn.Config(app, port=8001))   # doctest: +SKIP
    >>> server.run(); server.stop_signal                           # doctest: +SKIP
    15
    """

    stop_signal: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.stop_signal = sig
        self._captured_signals.clear()  # handled: do not re-raise it after shutdown
