"""The cloud engine: the shared scheduler and engine loop on rank 0 over a tensor-parallel PyTorch model.

Used by the cloud HTTP server (``cloud/server.py``)::

    engine = CloudEngine.from_model(tp=3, on_failure=stop_server).start()   # spawns ranks 1 and 2
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64))     # inside a running event loop
    async for out in engine.stream(rid):
        print(out.text, end="")
    engine.shutdown()                    # SHUTDOWN to the workers, joins them, destroys the process group

Rank 0 runs everything an edge engine runs (scheduler, block manager, sampler, detokenizer) and holds
shard 0 of the model and of the KV cache; each step its :class:`~cloud.worker.TPRunner` broadcasts the
batch to the other ranks. If a rank dies, the engine logs one line, fails every in-flight request with a
:class:`~cloud.errors.WorkerFailedError`, kills the remaining ranks, sets :attr:`CloudEngine.failure` and
calls ``on_failure(reason)``; it never serves again. ``tp=1`` is the plain model in-process: no process
group, no children. Under torchrun, :func:`run_torchrun_rank` gives rank 0 an engine and runs the worker
loop everywhere else.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from cloud.errors import TensorParallelError, WorkerFailedError
from cloud.launcher import ProcessMonitor, WorkerGroup, WorkerSpec, exit_reason, free_port, serve_rank
from cloud.model import TPTransformerModel, check_tp_degree, model_name
from cloud.parallel import destroy_process_group, init_process_group, init_process_group_from_env, torchrun_env
from cloud.worker import TPRunner
from kernels.async_engine import AsyncEngine
from kernels.checkpoints import Checkpoint, load_checkpoint
from kernels.checkpoints.store import resolve_model
from kernels.engine import EngineConfig, EngineCore
from kernels.sampling import SamplingParams
from kernels.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FailureCallback = Callable[[str], None]


class CloudEngine(AsyncEngine):
    """Full-precision tensor-parallel model with continuous batching on rank 0's shard of the paged KV cache.

    Attributes: ``tokenizer``, ``model_id``, ``tp``, ``worker_pids``, ``failure`` (None, or why the engine
    died), ``failed``, ``on_failure`` (called once with that reason, from a background thread; may be set
    after construction).
    """

    def __init__(self, core: EngineCore, tokenizer: Tokenizer, model_id: str, *, tp: int = 1,
                 workers: WorkerGroup | None = None, on_failure: FailureCallback | None = None) -> None:
        super().__init__(core, name="cloud")
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.tp = tp
        self.on_failure = on_failure
        self.failure: str | None = None
        self._workers = workers
        self._fail_lock = threading.Lock()
        self._closed = False
        self._monitor = ProcessMonitor(workers, self._rank_exited) if workers else None
        if self._monitor:
            self._monitor.start()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_model(cls, model: str | os.PathLike[str] | None = None, *, tp: int = 1, dtype: torch.dtype | None = None,
                   config: EngineConfig | None = None, threads_per_rank: int | None = None,
                   master_port: int | None = None, master_addr: str = "127.0.0.1", attention_impl: str = "auto",
                   on_failure: FailureCallback | None = None) -> CloudEngine:
        """Load ``model`` (default: the embedded SmolLM2) split over ``tp`` ranks: this process is rank 0.

        ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA (rank r uses cuda:r); every rank uses
        ``threads_per_rank`` torch threads (default ``cpu_count // tp``). The KV cache holds activations, so
        ``config.kv_dtype`` is set to ``dtype``; ``config.kv_cache_bytes`` is per rank.
        """
        path = resolve_model(model)
        checkpoint = load_checkpoint(path)
        check_tp_degree(checkpoint.config, tp, model_name(checkpoint))  # before anything is spawned
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and tp > torch.cuda.device_count():
            raise TensorParallelError(f"tensor-parallel degree {tp} needs {tp} GPUs; "
                                      f"{torch.cuda.device_count()} are visible")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // tp)
        if tp == 1:
            if threads_per_rank:
                torch.set_num_threads(threads)
            shard = TPTransformerModel.from_checkpoint(checkpoint, dtype, device, attention_impl, tp_rank=0, tp_size=1)
            return cls._assemble(shard, checkpoint, config, on_failure=on_failure)
        if dist.is_initialized():
            raise TensorParallelError("this process already belongs to a process group: one tensor-parallel cloud "
                                      "engine per process (shut the other down first)")
        spec = WorkerSpec(str(path), tp, str(dtype).removeprefix("torch."), device.type, attention_impl, threads,
                          master_addr, master_port or free_port(master_addr), os.getpid(),
                          die_with_parent=threading.current_thread() is threading.main_thread())
        workers = WorkerGroup.spawn(spec)
        try:
            torch.set_num_threads(threads)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            shard = TPTransformerModel.from_checkpoint(checkpoint, dtype, device, attention_impl, tp_rank=0,
                                                       tp_size=tp)
            workers.wait_loaded()
            init_process_group(0, tp, master_addr, spec.master_port, device=device)
            return cls._assemble(shard, checkpoint, config, workers=workers, on_failure=on_failure)
        except BaseException:
            workers.kill()
            destroy_process_group()
            raise

    @classmethod
    def _assemble(cls, shard: TPTransformerModel, checkpoint: Checkpoint, config: EngineConfig | None, *,
                  workers: WorkerGroup | None = None, on_failure: FailureCallback | None = None) -> CloudEngine:
        """Rank 0: engine core on the shard, then tell the workers how many KV blocks to allocate."""
        runner = TPRunner(shard)
        device = shard.embed_tokens.weight.device
        dtype = shard.embed_tokens.weight.dtype
        config = dataclasses.replace(config or EngineConfig(), kv_dtype=dtype, device=str(device))
        tokenizer = Tokenizer.from_checkpoint(checkpoint)
        core = EngineCore(runner, tokenizer, config, checkpoint.fingerprint)
        runner.init_workers(core.kv_spec)
        return cls(core, tokenizer, model_name(checkpoint), tp=shard.tp_size, workers=workers, on_failure=on_failure)

    # ------------------------------------------------------------------ state
    @property
    def failed(self) -> bool:
        return self.failure is not None

    @property
    def worker_pids(self) -> dict[int, int | None]:
        """rank -> pid of the spawned worker ranks (empty for tp == 1 and under torchrun)."""
        return self._workers.pids if self._workers else {}

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        if self.failure is not None:
            raise WorkerFailedError(f"the cloud engine has failed: {self.failure}")
        return super().add_request(prompt_ids, params, request_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop, release the workers (SHUTDOWN), join them and leave the process group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._monitor:
            self._monitor.stop()  # exits from here on are expected
        super().shutdown(timeout)
        if self.tp == 1:
            return
        if self.failure is None and self._lock.acquire(timeout=timeout):
            try:
                self.core.runner.shutdown_workers()
            except WorkerFailedError as exc:
                log.warning("cloud shutdown: %s", exc)
            finally:
                self._lock.release()
        if self._workers:
            self._workers.stop(timeout)
        destroy_process_group()

    # ------------------------------------------------------------------ failure
    def _rank_exited(self, rank: int, pid: int | None, exitcode: int | None) -> None:
        """Monitor thread: a child rank exited while the engine was serving."""
        self._fail(exit_reason(rank, pid, exitcode), lock_held=False)

    def _fail_all(self, exc: Exception) -> None:
        """Loop thread, lock held: a step raised. With tp > 1 the ranks are out of step: the engine is dead."""
        if self.tp == 1:
            super()._fail_all(exc)
            return
        dead = self._workers.first_exit(timeout=1.0) if self._workers else None  # prefer the clearer reason
        self._fail(exit_reason(*dead) if dead else f"cloud tensor-parallel step failed: {exc}", lock_held=True)

    def _fail(self, reason: str, *, lock_held: bool) -> None:
        with self._fail_lock:
            if self.failure is not None or self._closed:
                return
            self.failure = reason
        log.error("%s", reason)
        self._stopped.set()
        self._wake.set()
        if self._workers:
            self._workers.kill()  # also breaks a collective rank 0 may be blocked in
        error = WorkerFailedError(reason)
        locked = lock_held or self._lock.acquire(timeout=5.0)
        try:
            for rid in list(self._streams):
                if locked:
                    self.core.abort(rid, emit_output=False)
                self._close(rid, error)
        finally:
            if locked and not lock_held:
                self._lock.release()
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
            except Exception:
                log.exception("cloud on_failure callback raised")


def run_torchrun_rank(model: str | os.PathLike[str] | None = None, *, dtype: torch.dtype | None = None,
                      config: EngineConfig | None = None, threads_per_rank: int | None = None,
                      attention_impl: str = "auto", on_failure: FailureCallback | None = None) -> CloudEngine | None:
    """Join a ``torchrun --nproc-per-node N`` launch (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Every rank loads only its shard (the model path must exist on every node). Rank 0 returns a
    :class:`CloudEngine` (call ``start()``, serve, ``shutdown()``); the other ranks run the worker loop and
    return None once rank 0 shuts down, or raise :class:`WorkerFailedError` if the group breaks. Rank 0
    cannot watch remote processes: a dead rank is noticed at the next step, by its connection errors.
    """
    env = torchrun_env()
    path = resolve_model(model)
    checkpoint = load_checkpoint(path)
    check_tp_degree(checkpoint.config, env.world_size, model_name(checkpoint))
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_num_threads(threads_per_rank or max(1, (os.cpu_count() or 1) // env.local_world_size))
    shard = TPTransformerModel.from_checkpoint(checkpoint, dtype, device, attention_impl, tp_rank=env.rank,
                                               tp_size=env.world_size)
    if env.world_size > 1:
        init_process_group_from_env(device=device)
    if env.rank == 0:
        return CloudEngine._assemble(shard, checkpoint, config, on_failure=on_failure)
    if serve_rank(shard, device) != 0:
        raise WorkerFailedError(f"cloud rank {env.rank} lost its tensor-parallel group")
    return None

