"""Rank 0's runner and the loop every other rank runs: one step = one broadcast batch, one sharded forward.

Rank 0 owns the scheduler. For each step its :class:`TPRunner` sends the batch over the gloo control group
in two broadcasts, then runs its own shard; the workers receive the same batch, rebuild the attention
metadata from the raw tensors and run theirs. The forward's collectives line them up; logits arrive on
rank 0 only::

    rank 0 (EngineCore.step)                       rank r > 0 (serve_worker)
    ModelInput ─pack─► header [8] int64  ─bcast─►  header: command and sizes
                       payload [P] int64 ─bcast─►  payload ─unpack─► ModelInput
    forward(shard 0) ◄────── all_reduce ×2 per layer ──────► forward(shard r)
    logits [n, vocab] ◄─────────── gather ─────────────────  lm_head shard

    header = [command, num_tokens T, num_seqs S, max_blocks B, num_sampled N, max_query_len, max_seq_len, arg]
    payload = input_ids[T] | positions[T] | slot_mapping[T] | block_tables[S*B] | seq_lens[S]
              | cu_seqlens_q[S+1] | logits_indices[N]

Commands: INIT (once, after rank 0's engine sized the cache: header[1:4] = num_blocks, block_size, dtype
index, so every rank allocates the same number of blocks), STEP, SHUTDOWN, and TIMING for benchmarks
(header[1] = 1: reset and start every rank's :data:`~cloud.parallel.COMM_TIMER`; 0: stop it and gather
each rank's totals on rank 0 over the control group). A worker leaves its loop on
SHUTDOWN, or with :class:`WorkerFailedError` when the group breaks (rank 0 died: its sockets closed).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from cloud.errors import WorkerFailedError
from cloud.model import TPTransformerModel
from cloud.parallel import COMM_TIMER, collective, control_group, timings_dict
from kernels.attention import AttentionMetadata
from kernels.kv_cache.layout import KV_DTYPES, KVCacheSpec
from kernels.runner import ModelInput

log = logging.getLogger(__name__)

HEADER_LEN = 8
INIT, STEP, SHUTDOWN, TIMING = 1, 2, 3, 4


def _broadcast(tensor: torch.Tensor, *, timed: bool = True) -> None:
    """Rank 0's ``tensor`` to every rank; ``timed=False`` keeps idle waits and timer control off the timer."""
    try:
        if timed:
            collective("broadcast", dist.broadcast, tensor, src=0, group=control_group())
        else:
            dist.broadcast(tensor, src=0, group=control_group())
    except RuntimeError as exc:  # gloo: a peer's connection closed or timed out
        raise WorkerFailedError(f"tensor-parallel control broadcast failed: {exc}") from exc


def _gather_timings(parts: list[torch.Tensor] | None) -> None:
    """Every rank's :meth:`CommTimer.snapshot` into ``parts`` on rank 0 (None elsewhere)."""
    try:
        dist.gather(COMM_TIMER.snapshot(), parts, dst=0, group=control_group())
    except RuntimeError as exc:
        raise WorkerFailedError(f"tensor-parallel timing gather failed: {exc}") from exc


def _header(command: int, *values: int) -> torch.Tensor:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = command
    header[1:1 + len(values)] = torch.tensor(values, dtype=torch.int64)
    return header


def pack_step(batch: ModelInput) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [8], payload [P]) int64 CPU tensors describing ``batch``."""
    attn = batch.attn
    num_seqs, max_blocks = attn.block_tables.shape
    header = _header(STEP, attn.num_tokens, num_seqs, max_blocks, batch.logits_indices.shape[0],
                     attn.max_query_len, attn.max_seq_len)
    parts = (batch.input_ids, batch.positions, attn.slot_mapping, attn.block_tables.flatten(), attn.seq_lens,
             attn.cu_seqlens_q, batch.logits_indices)
    return header, torch.cat([p.to("cpu", torch.int64) for p in parts])


def unpack_step(header: torch.Tensor, payload: torch.Tensor, device: torch.device | str) -> ModelInput:
    """Inverse of :func:`pack_step` (the metadata is rebuilt from the tensors, not re-derived)."""
    _, num_tokens, num_seqs, max_blocks, num_sampled, max_query_len, max_seq_len, _ = header.tolist()
    payload = payload.to(device)
    sizes = [num_tokens, num_tokens, num_tokens, num_seqs * max_blocks, num_seqs, num_seqs + 1, num_sampled]
    ids, positions, slots, tables, seq_lens, cu_q, logits_indices = payload.split(sizes)
    attn = AttentionMetadata(slot_mapping=slots, block_tables=tables.view(num_seqs, max_blocks).int(),
                             seq_lens=seq_lens.int(), cu_seqlens_q=cu_q.int(), max_query_len=max_query_len,
                             max_seq_len=max_seq_len)
    return ModelInput(ids, positions, attn, logits_indices)


def payload_len(header: torch.Tensor) -> int:
    _, num_tokens, num_seqs, max_blocks, num_sampled = header[:5].tolist()
    return 3 * num_tokens + num_seqs * max_blocks + 2 * num_seqs + 1 + num_sampled


@torch.no_grad()
def run_shard(model: TPTransformerModel, batch: ModelInput, kv_cache: torch.Tensor) -> torch.Tensor | None:
    """This rank's forward; float32 logits ``[num_sampled, vocab]`` on rank 0, None elsewhere."""
    hidden = model(batch.input_ids, batch.positions, kv_cache, batch.attn)
    return model.compute_logits(hidden[batch.logits_indices])


class TPRunner:
    """The :class:`~kernels.runner.ModelRunner` rank 0's engine drives.

    ``kv_heads_per_rank`` tells :class:`~kernels.engine.EngineCore` to allocate only rank 0's KV shard;
    :meth:`init_workers` then makes every worker allocate the same number of blocks. With tp == 1 this is
    the plain sharded-model forward: no process group, no broadcast.
    """

    def __init__(self, model: TPTransformerModel) -> None:
        self.model = model
        self.config = model.config
        self.tp_size = model.tp_size
        self.kv_heads_per_rank = model.num_kv_heads_per_rank

    def init_workers(self, spec: KVCacheSpec) -> None:
        """Tell every worker the cache rank 0's engine allocated (its own shard of the same num_blocks)."""
        if self.tp_size > 1:
            _broadcast(_header(INIT, spec.num_blocks, spec.block_size, KV_DTYPES.index(spec.dtype)))

    @torch.no_grad()
    def execute(self, batch: ModelInput, kv_cache: torch.Tensor) -> torch.Tensor:
        start_s = time.perf_counter()
        if self.tp_size > 1:
            header, payload = pack_step(batch)
            _broadcast(header)
            _broadcast(payload)
        logits = run_shard(self.model, batch, kv_cache)
        assert logits is not None  # rank 0 always receives the gathered logits
        if COMM_TIMER.enabled:
            COMM_TIMER.end_step(start_s, logits.device)
        return logits

    def start_timing(self) -> None:
        """Reset and switch on every rank's :data:`~cloud.parallel.COMM_TIMER` (benchmarks only)."""
        if self.tp_size > 1:
            _broadcast(_header(TIMING, 1), timed=False)
        COMM_TIMER.reset()
        COMM_TIMER.enabled = True

    def stop_timing(self) -> list[dict[str, object]]:
        """Switch the timers off; each rank's totals since :meth:`start_timing`, rank 0 first."""
        COMM_TIMER.enabled = False
        if self.tp_size == 1:
            return [timings_dict(COMM_TIMER.snapshot())]
        _broadcast(_header(TIMING, 0), timed=False)
        parts = [torch.empty(COMM_TIMER.snapshot().shape, dtype=torch.float64) for _ in range(self.tp_size)]
        _gather_timings(parts)
        return [timings_dict(p) for p in parts]

    def shutdown_workers(self) -> None:
        """Release every worker from its loop (they destroy their groups and exit)."""
        if self.tp_size > 1:
            _broadcast(_header(SHUTDOWN))


def serve_worker(model: TPTransformerModel, device: torch.device | str) -> None:
    """Rank r > 0: receive and run steps until SHUTDOWN; raises :class:`WorkerFailedError` if the group breaks."""
    kv_cache: torch.Tensor | None = None
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    while True:
        _broadcast(header, timed=False)  # waiting here is idle time (rank 0 schedules), not communication
        command = int(header[0])
        if command == SHUTDOWN:
            return
        if command == INIT:
            num_blocks, block_size, dtype_index = header[1:4].tolist()
            spec = KVCacheSpec(model.config.num_layers, model.num_kv_heads_per_rank, model.config.head_dim,
                               num_blocks, block_size, KV_DTYPES[dtype_index])
            kv_cache = spec.allocate(device)
            log.debug("rank %d: KV shard %s", model.tp_rank, spec.shape)
            continue
        if command == TIMING:
            if header[1]:
                COMM_TIMER.reset()
                COMM_TIMER.enabled = True
            else:
                COMM_TIMER.enabled = False
                _gather_timings(None)
            continue
        if command != STEP or kv_cache is None:
            raise WorkerFailedError(f"rank {model.tp_rank}: unexpected command {command} (cache allocated: "
                                    f"{kv_cache is not None})")
        start_s = time.perf_counter()
        payload = torch.empty(payload_len(header), dtype=torch.int64)
        _broadcast(payload)
        run_shard(model, unpack_step(header, payload, device), kv_cache)
        if COMM_TIMER.enabled:
            COMM_TIMER.end_step(start_s, torch.device(device))
