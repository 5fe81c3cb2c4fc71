"""Starting, watching and stopping the worker ranks of a spawned tensor-parallel group.

``CloudEngine.from_model(tp=N)`` makes the calling process rank 0 and spawns ranks 1..N-1 with
``torch.multiprocessing`` (spawn context: no forked locks or CUDA state)::

    rank 0 (caller)                                   rank r (child)
    WorkerGroup.spawn ──────────────────────────────► bind to the parent: PR_SET_PDEATHSIG + ppid watchdog
    load shard 0                                      load shard r ──("loaded" | error)──► pipe
    wait_loaded(): every child "loaded", or raise
    init_process_group(0) ◄─────── rendezvous ──────► init_process_group(r)
    EngineCore sizes the cache, TPRunner INIT ──────► serve_worker(): STEP ... SHUTDOWN, exit 0
    ProcessMonitor: first unexpected child exit ──► CloudEngine fails in-flight requests, kills the rest

No orphans: a child dies with rank 0 through PR_SET_PDEATHSIG (only when spawned from the main thread:
the signal follows the spawning *thread*, and servers often load engines in a worker thread), through a
watchdog thread that exits when its parent pid changes, and through the connection errors its collectives
raise once rank 0's sockets close. Children are daemonic, so a normally exiting rank 0 also reaps them.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from cloud.errors import WorkerFailedError
from cloud.model import TPTransformerModel
from cloud.parallel import destroy_process_group, init_process_group
from cloud.worker import serve_worker
from kernels.checkpoints import load_checkpoint

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a spawned rank needs to build its shard and join the group (pickled to the child)."""

    model_path: str
    world_size: int
    dtype: str  # torch dtype name: "float32", "bfloat16"
    device_type: str  # "cpu" | "cuda": rank r uses cuda:r
    attention_impl: str
    threads: int
    master_addr: str
    master_port: int
    parent_pid: int
    die_with_parent: bool  # set PR_SET_PDEATHSIG (the spawning thread lives as long as the process)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def reaped_exitcode(proc: mp.Process, timeout: float = 2.0) -> int | None:
    """The exit code of a child whose sentinel is ready. The sentinel fires when the child's pipes close,
    which can be a moment before it can be reaped; and when another thread (a join in ``kill``) reaps it
    first, this thread's ``waitpid`` fails with ECHILD and reads None until that thread has stored the code.
    So wait up to ``timeout`` s for a code instead of reporting None (seen once in CI under load)."""
    deadline = time.monotonic() + timeout
    proc.join(timeout)
    while proc.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc.exitcode


def exit_reason(rank: int, pid: int | None, exitcode: int | None) -> str:
    return f"cloud rank {rank} (pid {pid}) exited with code {exitcode}; shutting down the cloud engine"


class WorkerGroup:
    """Ranks 1..world_size-1 as child processes of this one."""

    def __init__(self, spec: WorkerSpec, processes: dict[int, mp.Process],
                 conns: dict[int, multiprocessing.connection.Connection]) -> None:
        self.spec = spec
        self.processes = processes  # rank -> process
        self._conns = conns  # rank -> the read end of its "loaded" pipe

    @classmethod
    def spawn(cls, spec: WorkerSpec) -> WorkerGroup:
        ctx = mp.get_context("spawn")
        processes, conns = {}, {}
        for rank in range(1, spec.world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child_main, args=(rank, spec, writer), name=f"cloud-rank-{rank}", daemon=True)
            proc.start()
            writer.close()  # the child holds the only write end: EOF on the reader means it died
            processes[rank], conns[rank] = proc, reader
        return cls(spec, processes, conns)

    @property
    def pids(self) -> dict[int, int | None]:
        return {rank: p.pid for rank, p in self.processes.items()}

    def wait_loaded(self, timeout: float | None = None) -> None:
        """Block until every child reports its shard loaded; raise :class:`WorkerFailedError` if one cannot."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = dict(self._conns)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait(list(pending.values()), left)
            if not ready:
                raise WorkerFailedError(f"cloud ranks {sorted(pending)} did not load their shards in {timeout} s")
            for rank in [r for r, c in pending.items() if c in ready]:
                try:
                    status, detail = pending.pop(rank).recv()
                except EOFError:
                    proc = self.processes[rank]
                    proc.join(1.0)
                    raise WorkerFailedError(f"cloud rank {rank} (pid {proc.pid}) exited with code {proc.exitcode} "
                                            "while loading its shard") from None
                if status != "loaded":
                    raise WorkerFailedError(f"cloud rank {rank} failed to load its shard: {detail}")
        for conn in self._conns.values():
            conn.close()

    def first_exit(self, timeout: float = 0.0) -> tuple[int, int | None, int | None] | None:
        """(rank, pid, exit code) of a child that has exited, waiting up to ``timeout`` s for one; else None."""
        by_sentinel = {p.sentinel: rank for rank, p in self.processes.items()}
        ready = multiprocessing.connection.wait(list(by_sentinel), timeout)
        if not ready:
            return None
        rank = by_sentinel[ready[0]]
        proc = self.processes[rank]
        return rank, proc.pid, reaped_exitcode(proc)

    def stop(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for the children to exit on their own, then kill what is left."""
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """SIGKILL every child still alive and reap them all."""
        for proc in self.processes.values():
            if proc.is_alive():
                proc.kill()
        for proc in self.processes.values():
            proc.join(5.0)


class ProcessMonitor(threading.Thread):
    """Calls ``on_exit(rank, pid, exitcode)`` once, for the first child that exits before :meth:`stop`."""

    def __init__(self, workers: WorkerGroup, on_exit: Callable[[int, int | None, int | None], None]) -> None:
        super().__init__(name="cloud-rank-monitor", daemon=True)
        self.workers = workers
        self.on_exit = on_exit
        self._stop_reader, self._stop_writer = multiprocessing.Pipe(duplex=False)
        self._stopping = threading.Event()

    def run(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in self.workers.processes.items()}
        ready = multiprocessing.connection.wait([*sentinels, self._stop_reader])
        if self._stopping.is_set():
            return
        rank = next(sentinels[s] for s in ready if s in sentinels)
        proc = self.workers.processes[rank]
        self.on_exit(rank, proc.pid, reaped_exitcode(proc))

    def stop(self) -> None:
        """From now on child exits are expected (shutdown); returns once the thread is done."""
        self._stopping.set()
        self._stop_writer.send(None)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5.0)


# ----------------------------------------------------------------------------- child side
def _bind_to_parent(parent_pid: int, die_with_parent: bool) -> None:
    """Make sure this child never outlives rank 0."""
    if die_with_parent and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watchdog() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)  # reparented: rank 0 is gone

    if os.getppid() != parent_pid:  # it died before we could arm the signal
        os._exit(1)
    threading.Thread(target=watchdog, name="cloud-parent-watchdog", daemon=True).start()


def _child_main(rank: int, spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    _bind_to_parent(spec.parent_pid, spec.die_with_parent)
    logging.basicConfig(level=logging.INFO, format=f"cloud rank {rank}: %(message)s")
    torch.set_num_threads(spec.threads)
    device = torch.device(f"cuda:{rank}" if spec.device_type == "cuda" else "cpu")
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        checkpoint = load_checkpoint(spec.model_path)
        model = TPTransformerModel.from_checkpoint(checkpoint, getattr(torch, spec.dtype), device,
                                                   spec.attention_impl, tp_rank=rank, tp_size=spec.world_size)
    except Exception as exc:  # reported to rank 0, which raises it to the caller
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        conn.close()
        sys.exit(1)
    conn.send(("loaded", None))
    conn.close()
    init_process_group(rank, spec.world_size, spec.master_addr, spec.master_port, device=device)
    sys.exit(serve_rank(model, device))


def serve_rank(model: TPTransformerModel, device: torch.device) -> int:
    """Run a worker rank's loop in an initialized group; 0 after SHUTDOWN, 1 if the group broke."""
    try:
        serve_worker(model, device)
    except (WorkerFailedError, RuntimeError) as exc:  # RuntimeError: a collective inside the forward failed
        log.error("lost the tensor-parallel group (%s); exiting", str(exc).splitlines()[0] if str(exc) else exc)
        return 1
    destroy_process_group()
    return 0
