"""Tensor parallelism: the process group and the layers that load and compute their own shard.

Megatron-LM's intra-layer model parallelism (Shoeybi et al., 2019), shaped like nano-vllm's
``layers/linear.py``: each layer knows which slice of each checkpoint tensor is its own and reads
only that slice (:meth:`Checkpoint.get_tensor_slice`), so no rank ever holds the whole model.

    layer                   weight held by rank r of tp                    communication in forward
    ColumnParallelLinear    rows [r*out/tp, (r+1)*out/tp) of each part      none: the output stays sharded
    QKVParallelLinear       its q heads, then its k heads, its v heads      none
    RowParallelLinear       columns [r*in/tp, (r+1)*in/tp)                  all_reduce(sum), then the bias
    VocabParallelEmbedding  vocab rows [r*V'/tp, (r+1)*V'/tp), V' = V       all_reduce(sum)
                            padded up to a multiple of tp
    ParallelLMHead          the same rows (shared with the embedding when   gather to rank 0
                            tied)

One decoder layer then needs two all-reduces (after o_proj and after down_proj): the hidden state is
replicated between blocks, sharded by heads inside attention and by columns inside the MLP.

Process groups: every rank joins the default group (gloo on CPU, NCCL on CUDA), which carries the
collectives inside the forward, and a gloo *control* group with a very long timeout, over which rank 0
broadcasts each step's batch (see :mod:`cloud.worker`). Workers wait in that broadcast while no request
arrives, so its timeout must outlast any idle period; failures are found by connection errors and by
rank 0 watching its child processes instead. Layers take ``tp_rank`` / ``tp_size`` explicitly (default:
the initialized group), so a shard can be built and checked without any process group.

Every collective goes through :func:`collective`, so a benchmark can switch on :data:`COMM_TIMER` and
split a step into compute and communication (``hybrid-gateway bench cloud``); it is off by default.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cloud.errors import TensorParallelError
from kernels.checkpoints import Checkpoint
from kernels.errors import CheckpointError

# Collectives inside a forward finish in seconds; rendezvous waits for slow starters.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# Idle workers sit in a control broadcast until the next request: make that wait effectively unbounded.
CONTROL_TIMEOUT = timedelta(days=365)

_control_group: dist.ProcessGroup | None = None


# --------------------------------------------------------------------------- process group
def default_backend(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int = 29500, *,
                       backend: str | None = None, device: torch.device | str = "cpu") -> None:
    """Join the ``world_size``-rank group rendezvousing at ``master_addr:master_port`` (rank 0 hosts the store)."""
    global _control_group
    if dist.is_initialized():
        raise TensorParallelError("a process group is already initialized in this process: one tensor-parallel "
                                  "cloud engine per process")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size={world_size}")
    backend = backend or default_backend(device)
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    # A second gloo group even on CPU: the forward's collectives keep a timeout that catches hangs.
    _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def init_process_group_from_env(backend: str | None = None, device: torch.device | str = "cpu") -> None:
    """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    env = torchrun_env()
    init_process_group(env.rank, env.world_size, env.master_addr, env.master_port, backend=backend, device=device)


@dataclass(frozen=True, slots=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def torchrun_env() -> TorchrunEnv:
    """The variables torchrun sets for each rank, parsed, or a clear error when they are missing."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TensorParallelError(f"not launched by torchrun: the environment lacks {', '.join(missing)}")

    def integer(key: str, default: str | None = None) -> int:
        raw = os.environ.get(key, default)
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise TensorParallelError(f"torchrun variable {key}={raw!r} is not an integer") from None

    world_size = integer("WORLD_SIZE")
    return TorchrunEnv(integer("RANK"), world_size, integer("LOCAL_RANK", os.environ["RANK"]),
                       integer("LOCAL_WORLD_SIZE", str(world_size)), os.environ["MASTER_ADDR"], integer("MASTER_PORT"))


def destroy_process_group() -> None:
    global _control_group
    _control_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def get_tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def control_group() -> dist.ProcessGroup:
    """The gloo group (long timeout) that carries rank 0's step broadcasts."""
    if _control_group is None:
        raise TensorParallelError("no tensor-parallel process group: call init_process_group first")
    return _control_group


def _resolve(tp_rank: int | None, tp_size: int | None) -> tuple[int, int]:
    rank = get_tp_rank() if tp_rank is None else tp_rank
    size = get_tp_size() if tp_size is None else tp_size
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"tp_rank {rank} out of range for tp_size={size}")
    return rank, size


def _divide(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise TensorParallelError(f"tensor-parallel degree {tp} does not divide {what} ({size})")
    return size // tp


def _check_shape(checkpoint: Checkpoint, name: str, expected: tuple[int, ...]) -> None:
    shape = checkpoint.tensor_shape(name)
    if tuple(shape) != expected:
        raise CheckpointError(f"{name}: checkpoint shape {tuple(shape)} != model {expected}")


# ----------------------------------------------------------------------- collective timing
COLLECTIVES = ("broadcast", "all_reduce", "gather")


class CommTimer:
    """Opt-in accounting of one rank's time inside collectives, by kind, and in whole forward steps.

    Off by default: then a collective costs one extra attribute test. On CPU a gloo collective blocks its
    caller, so the wall time around it is its cost, waiting for the slowest rank included. On CUDA an NCCL
    collective returns once queued: a pair of CUDA events on the current stream brackets it instead (read
    in :meth:`snapshot`, which synchronizes), and :meth:`end_step` synchronizes before stopping the clock.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.step_s = 0.0  # rank 0: TPRunner.execute; workers: payload broadcast + forward
        self.comm_s = dict.fromkeys(COLLECTIVES, 0.0)
        self.calls = dict.fromkeys(COLLECTIVES, 0)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: not yet read

    def run(self, kind: str, fn: Callable[..., object], tensor: torch.Tensor, *args, **kwargs) -> None:
        self.calls[kind] += 1
        if tensor.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(tensor, *args, **kwargs)
            end.record()
            self._events.append((kind, start, end))
            return
        start_s = time.perf_counter()
        fn(tensor, *args, **kwargs)
        self.comm_s[kind] += time.perf_counter() - start_s

    def end_step(self, start_s: float, device: torch.device) -> None:
        """Count one forward step begun at ``start_s`` (``time.perf_counter()``)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.steps += 1
        self.step_s += time.perf_counter() - start_s

    def snapshot(self) -> torch.Tensor:
        """float64 ``[steps, step_s, comm_s per kind..., calls per kind...]``, the vector ranks gather."""
        if self._events:
            torch.cuda.synchronize()
            for kind, start, end in self._events:
                self.comm_s[kind] += start.elapsed_time(end) / 1e3  # ms -> s
            self._events.clear()
        return torch.tensor([self.steps, self.step_s, *self.comm_s.values(), *self.calls.values()],
                            dtype=torch.float64)


def timings_dict(snapshot: torch.Tensor) -> dict[str, object]:
    """:meth:`CommTimer.snapshot` as a dict: steps, step_s, comm_s and calls (both by kind)."""
    values = snapshot.tolist()
    n = len(COLLECTIVES)
    return {"steps": int(values[0]), "step_s": values[1],
            "comm_s": dict(zip(COLLECTIVES, values[2:2 + n], strict=True)),
            "calls": {k: int(v) for k, v in zip(COLLECTIVES, values[2 + n:], strict=True)}}


COMM_TIMER = CommTimer()  # this process's rank; one tensor-parallel engine per process


def collective(kind: str, fn: Callable[..., object], tensor: torch.Tensor, *args, **kwargs) -> None:
    """``fn(tensor, *args, **kwargs)``, timed under ``kind`` while :data:`COMM_TIMER` is enabled."""
    if COMM_TIMER.enabled:
        COMM_TIMER.run(kind, fn, tensor, *args, **kwargs)
    else:
        fn(tensor, *args, **kwargs)


# --------------------------------------------------------------------------------- linears
class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's output rows split across ranks; the output stays sharded (no communication).

    ``output_sizes`` lists fused parts (``[intermediate, intermediate]`` for gate/up): each part is split on
    its own, so rank r holds ``[its rows of part 0 | its rows of part 1 | ...]`` and can split them apart.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False, *,
                 tp_rank: int | None = None, tp_size: int | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = _resolve(tp_rank, tp_size)
        self.input_size = input_size
        self.full_sizes = list(output_sizes)
        self.local_sizes = [_divide(s, self.tp_size, "an output size") for s in output_sizes]
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), input_size))  # [out/tp, in]
        self.bias = nn.Parameter(torch.empty(sum(self.local_sizes))) if bias else None

    @torch.no_grad()
    def load(self, checkpoint: Checkpoint, names: Sequence[str]) -> None:
        """Read this rank's rows of part i from ``{names[i]}.weight`` (and ``.bias``)."""
        offset = 0
        for name, full, local in zip(names, self.full_sizes, self.local_sizes, strict=True):
            start, end = self.tp_rank * local, (self.tp_rank + 1) * local
            _check_shape(checkpoint, f"{name}.weight", (full, self.input_size))
            self.weight[offset:offset + local].copy_(checkpoint.get_tensor_slice(f"{name}.weight", 0, start, end))
            if self.bias is not None:
                _check_shape(checkpoint, f"{name}.bias", (full,))
                self.bias[offset:offset + local].copy_(checkpoint.get_tensor_slice(f"{name}.bias", 0, start, end))
            offset += local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in] (replicated) -> [num_tokens, sum(local_sizes)] (this rank's columns)
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by heads: rank r holds q heads ``[r*H/tp, (r+1)*H/tp)`` and KV heads
    ``[r*KV/tp, (r+1)*KV/tp)``, the KV-cache shard of :meth:`KVCacheSpec.shard`. Load with the q, k, v names."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False, *,
                 tp_rank: int | None = None, tp_size: int | None = None) -> None:
        _, tp = _resolve(tp_rank, tp_size)
        self.num_heads = _divide(num_heads, tp, "the attention heads")  # per rank
        self.num_kv_heads = _divide(num_kv_heads, tp, "the KV heads")
        self.head_dim = head_dim
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias,
                         tp_rank=tp_rank, tp_size=tp_size)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[n, local qkv] -> q [n, heads, head_dim], k and v [n, kv_heads, head_dim] (views)."""
        n = qkv.shape[0]
        q, k, v = qkv.split(self.local_sizes, dim=-1)
        return (q.view(n, self.num_heads, self.head_dim), k.view(n, self.num_kv_heads, self.head_dim),
                v.view(n, self.num_kv_heads, self.head_dim))


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's input columns split: each rank multiplies its slice of x (the sharded output of
    a column-parallel layer), the partial sums are all-reduced, and the bias is added once, after the reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *,
                 tp_rank: int | None = None, tp_size: int | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = _resolve(tp_rank, tp_size)
        self.input_size, self.output_size = input_size, output_size
        self.local_input_size = _divide(input_size, self.tp_size, "an input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.local_input_size))  # [out, in/tp]
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None  # replicated

    @torch.no_grad()
    def load(self, checkpoint: Checkpoint, name: str) -> None:
        start = self.tp_rank * self.local_input_size
        _check_shape(checkpoint, f"{name}.weight", (self.output_size, self.input_size))
        self.weight.copy_(checkpoint.get_tensor_slice(f"{name}.weight", 1, start, start + self.local_input_size))
        if self.bias is not None:
            self.bias.copy_(checkpoint.get_tensor(f"{name}.bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in/tp] -> [num_tokens, out], replicated on every rank
        y = F.linear(x, self.weight)
        if self.tp_size > 1:
            collective("all_reduce", dist.all_reduce, y)
        return y if self.bias is None else y + self.bias


# ------------------------------------------------------------------------------ vocabulary
class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks. The vocabulary is padded up to a multiple of tp so every shard has the
    same shape (the padding rows are zero); a rank looks up only the ids in its range, masks the rest to zero,
    and the all-reduce assembles every token's row."""

    def __init__(self, vocab_size: int, hidden_size: int, *, tp_rank: int | None = None,
                 tp_size: int | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = _resolve(tp_rank, tp_size)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_local = -(-vocab_size // self.tp_size)  # rows per rank, padding included
        self.vocab_start = self.tp_rank * self.num_local
        self.vocab_end = max(self.vocab_start, min(self.vocab_start + self.num_local, vocab_size))  # real rows end
        self.weight = nn.Parameter(torch.empty(self.num_local, hidden_size))  # [V'/tp, hidden]

    @torch.no_grad()
    def load(self, checkpoint: Checkpoint, name: str) -> None:
        _check_shape(checkpoint, f"{name}.weight", (self.vocab_size, self.hidden_size))
        self.weight.zero_()
        if self.vocab_end > self.vocab_start:
            rows = checkpoint.get_tensor_slice(f"{name}.weight", 0, self.vocab_start, self.vocab_end)
            self.weight[:rows.shape[0]].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [num_tokens] -> [num_tokens, hidden], replicated
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(mine, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight).masked_fill_(~mine.unsqueeze(-1), 0.0)
        collective("all_reduce", dist.all_reduce, out)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection on the embedding's vocabulary shard (the same parameter when tied).

    Each rank computes logits for its vocabulary rows; ``dist.gather`` collects them on rank 0, which returns
    float32 ``[n, vocab_size]`` (padding columns dropped). Other ranks return None: only rank 0 samples.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden: [n, hidden] -> rank 0: [n, vocab_size] float32; other ranks: None
        logits = F.linear(hidden, self.weight)  # [n, V'/tp]
        if self.tp_size == 1:
            return logits[:, :self.vocab_size].float()
        if hidden.shape[0] == 0:  # every rank sees the same n: all skip the collective together
            return logits.new_empty(0, self.vocab_size, dtype=torch.float32) if self.tp_rank == 0 else None
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        collective("gather", dist.gather, logits, parts, dst=0)
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[:, :self.vocab_size].float()
