"""The local cloud tier as child processes: ``hybrid-gateway cloud serve`` started and stopped by the gateway.

The child is rank 0 of the cloud engine (it spawns the other ranks itself) and serves the
OpenAI-compatible API on ``127.0.0.1:cloud_port``; the gateway reaches it over HTTP like any external
cloud. No orphans: the child gets SIGTERM from the kernel if the gateway dies (``PR_SET_PDEATHSIG``),
and :meth:`LocalCloud.stop` sends rank 0 SIGTERM, waits, then SIGKILLs what is left of its process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import torch

from gateway.config import GatewaySettings

log = logging.getLogger("hybrid_gateway")

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setpgrp()  # own process group, so stop() reaches the ranks it spawns too
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def cloud_tp(settings: GatewaySettings) -> int:
    """The TP degree ``settings.cloud_tp`` means for the cloud model on this machine."""
    from kernels.checkpoints import load_checkpoint
    from kernels.checkpoints.store import resolve_model

    config = load_checkpoint(resolve_model(settings.cloud_model)).config
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return settings.cloud_tp_degree(config.num_heads, config.num_kv_heads, gpus)


class LocalCloud:
    """Start ``cloud serve`` in a child process group and wait until it answers ``/health``.

    >>> cloud = LocalCloud(settings); await cloud.start(); cloud.url   # doctest: +SKIP
    'http://127.0.0.1:8001'
    """

    def __init__(self, settings: GatewaySettings, startup_timeout_s: float = 600.0) -> None:
        self.settings = settings
        self.tp = cloud_tp(settings)
        self.url = f"http://127.0.0.1:{settings.cloud_port}"
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gateway.cli", "cloud", "serve", "--host", "127.0.0.1",
               "--port", str(self.settings.cloud_port), "--tp", str(self.tp), "--log-level", "warning"]
        if self.settings.cloud_model:
            cmd += ["--model", str(self.settings.cloud_model)]
        if self.settings.cloud_dtype:
            cmd += ["--dtype", self.settings.cloud_dtype]
        return cmd

    def _spawn(self) -> None:
        log.info("starting the cloud tier: %s", " ".join(self.command()))
        self.process = subprocess.Popen(self.command(), preexec_fn=_die_with_parent)  # noqa: PLW1509

    async def supervise(self, max_backoff_s: float = 30.0, stable_s: float = 60.0) -> None:
        """Restart the cloud tier whenever it exits (a rank died, it was killed), with exponential backoff.

        Runs as a task for the gateway's lifetime; meanwhile the gateway serves on the edge and its health
        probes notice when the cloud answers again. A run that stayed up ``stable_s`` resets the backoff.
        """
        backoff, started = 1.0, time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            proc = self.process
            if proc is None:
                return  # stopped on purpose
            if proc.poll() is None:
                continue
            if time.monotonic() - started > stable_s:
                backoff = 1.0
            log.error("the cloud tier exited with code %s; serving on the edge, restarting it in %.0f s",
                      proc.returncode, backoff)
            await asyncio.sleep(backoff)
            if self.process is None:
                return
            self._spawn()
            started, backoff = time.monotonic(), min(backoff * 2, max_backoff_s)

    async def start(self) -> None:
        self._spawn()
        deadline = time.monotonic() + self.startup_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the cloud tier exited during startup with code {self.process.returncode}")
                try:
                    if (await client.get(self.url + "/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"the cloud tier did not answer {self.url}/health in "
                                       f"{self.startup_timeout_s:.0f} s")
                await asyncio.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to rank 0 (it stops its server and joins its ranks), then SIGKILL to whatever is left of
        the process group. Signalling the whole group at once would kill the ranks under rank 0's feet."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("cloud tier did not stop in %.0f s; killing it", timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (normally none)
        proc.wait()
