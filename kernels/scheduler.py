"""Continuous-batching scheduler shared by both engines.

Every step mixes decode tokens of running sequences with prefill chunks of new ones under one
token budget (chunked prefill, as in Sarathi-Serve and vLLM's v1 scheduler):

1. Running sequences first, oldest first: each gets its next chunk (1 token when decoding). If the
   KV pool cannot hold it, the newest running sequence is preempted by recompute (blocks freed,
   sequence back at the head of the queue) until it fits.
2. Then waiting sequences in arrival order, while the budget, ``max_num_seqs`` and free blocks
   allow. Admission allocates blocks for the whole prompt at once (reusing cached prefix blocks),
   so an admitted prompt never stalls halfway for memory.

The engine calls :meth:`Scheduler.schedule`, runs the batch, then :meth:`Scheduler.postprocess`.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kernels.kv_cache.block_manager import BlockManager
from kernels.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"


_seq_counter = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """One request's tokens and progress. ``num_computed`` tokens already have their KV in the cache."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int  # prompt + output may not exceed this (model context)
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at first admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    seq_no: int = field(default_factory=lambda: next(_seq_counter))
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)
        if self.generator is None:
            self.generator = self.params.make_generator()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's end, so its last position yields a new token."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(slots=True)
class SchedulerConfig:
    """Knobs for the throughput / interactivity trade-off."""

    max_num_seqs: int = 64  # most sequences in one batch
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decode tokens)
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []

        # 1. Running sequences, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk_len(seq, budget)
            if n == 0:  # a whole prompt is due but chunking is off and it does not fit the budget
                i += 1
                continue
            while not self.blocks.can_reserve(seq.request_id, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: nothing newer is left to schedule
            self.blocks.reserve(seq.request_id, seq.num_computed + n)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
            i += 1

        # 2. Waiting sequences, in arrival order (a preempted one went back to the head).
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            # Keep one block per running sequence free so decodes do not preempt at once.
            if not self.blocks.can_allocate(seq.token_ids, reserve=len(self.running)):
                break
            if not self.config.enable_chunked_prefill and seq.num_tokens > budget and chunks:
                break
            self.waiting.popleft()
            cached = self.blocks.allocate(seq.request_id, seq.token_ids)
            if seq.num_preemptions == 0:
                seq.num_cached_prompt = cached
            seq.num_computed = cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = self._chunk_len(seq, budget) or seq.num_tokens - seq.num_computed
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return SchedulerOutput(chunks, preempted)

    def _chunk_len(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_tokens - seq.num_computed
        if self.config.enable_chunked_prefill:
            return min(remaining, budget)
        return remaining if remaining <= budget else 0

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop its KV, requeue it at the head with all its tokens as the prompt."""
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, output: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Advance each chunk; ``sampled`` maps id(seq) -> new token for chunks that sample."""
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed += chunk.num_tokens
            self.blocks.commit(seq.request_id, seq.token_ids[: seq.num_computed])
            token = sampled.get(id(seq))
            if token is not None:
                seq.token_ids.append(token)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Stop a sequence now and return its blocks (finished, stopped or aborted)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if self.blocks.has_seq(seq.request_id):
            self.blocks.free(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
