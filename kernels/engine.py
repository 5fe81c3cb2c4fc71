"""The engine loop both tiers share: schedule → run → sample → postprocess.

An :class:`EngineCore` owns the KV cache, the block manager, the scheduler and the sampler; the
tier supplies only its :class:`~kernels.runner.ModelRunner` (ONNX Runtime on the edge, tensor
parallel PyTorch in the cloud). ``step()`` stays as short as nano-vllm's; throughput is measured
by the caller. Stop strings are matched on detokenized text, holding back the few characters that
could still become a stop string, so no stop text ever reaches a client.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from kernels.errors import InvalidRequestError
from kernels.kv_cache.block_manager import BlockManager
from kernels.kv_cache.layout import DEFAULT_BLOCK_SIZE, KVCacheSpec
from kernels.runner import ModelInput, ModelRunner
from kernels.sampling import Sampler, SamplingParams
from kernels.scheduler import FinishReason, Scheduler, SchedulerConfig, Sequence
from kernels.tokenizer import StreamDecoder, Tokenizer


@dataclass(slots=True)
class EngineConfig:
    """Engine-wide settings; every field is also a CLI flag of the tier that runs it."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    block_size: int = DEFAULT_BLOCK_SIZE
    num_blocks: int | None = None  # None: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 1 << 30
    kv_dtype: torch.dtype = torch.float32
    max_model_len: int | None = None  # None: the model's context
    seed: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be > 1, got {self.max_model_len}")
        SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens)  # validates those two


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (deltas), plus its totals so far."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks_used: int
    num_blocks_free: int
    num_preemptions: int
    prefix_hit_rate: float
    steps: int
    prompt_tokens: int
    generated_tokens: int


@dataclass(slots=True)
class _Detok:
    decoder: StreamDecoder
    text: str = ""  # output text not yet sent (held back while it could start a stop string)
    sent: int = 0  # output tokens already reported
    max_stop: int = 0


@dataclass(slots=True)
class _Counters:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    step_times: list[float] = field(default_factory=list)


class EngineCore:
    """Synchronous engine: ``add_request``, then call ``step()`` until ``has_unfinished()`` is false.

    >>> engine = EngineCore(ReferenceRunner(model), tokenizer)                 # doctest: +SKIP
    >>> rid = engine.add_request(tokenizer.encode("Hi"), SamplingParams(max_tokens=8))  # doctest: +SKIP
    >>> while engine.has_unfinished(): outputs = engine.step()               # doctest: +SKIP
    """

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer | None = None,
                 config: EngineConfig | None = None, fingerprint: str = "") -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        mc = runner.config
        self.max_model_len = min(self.config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        # A tensor-parallel runner holds only its shard of the KV heads; kv_cache_bytes is per rank.
        num_kv_heads = getattr(runner, "kv_heads_per_rank", None) or mc.num_kv_heads
        num_blocks = self.config.num_blocks or KVCacheSpec.num_blocks_for_bytes(
            self.config.kv_cache_bytes, num_layers=mc.num_layers, num_kv_heads=num_kv_heads,
            head_dim=mc.head_dim, block_size=self.config.block_size, dtype=self.config.kv_dtype)
        self.kv_spec = KVCacheSpec(mc.num_layers, num_kv_heads, mc.head_dim, num_blocks,
                                   self.config.block_size, self.config.kv_dtype)
        self.kv_cache = self.kv_spec.allocate(self.config.device)
        self.blocks = BlockManager(num_blocks, self.config.block_size, fingerprint,
                                   self.config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                                   self.config.enable_chunked_prefill), self.blocks)
        self.sampler = Sampler(self.config.seed)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids) if tokenizer else tuple(mc.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, _Detok] = {}
        self._ids = itertools.count()
        self._counters = _Counters()
        self._pending: list[RequestOutput] = []
        # torch's intra-op threads for the step's own tensor work (batch building, sampling), when the runner
        # asks: a runner whose compute has its own pool (ONNX Runtime) wants torch on one thread, else torch's
        # OpenMP workers, spinning after a parallel argmax, take the cores from that pool.
        self._host_threads: int | None = getattr(runner, "host_threads", None)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises :class:`InvalidRequestError` for one that can never be served."""
        request_id = request_id or self.new_request_id()
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        max_len = min(self.max_model_len, len(prompt_ids) + params.max_tokens, self.kv_spec.num_slots)
        seq = Sequence(request_id, list(prompt_ids), params, max_len)
        self._seqs[request_id] = seq
        if self.tokenizer is not None:
            self._detok[request_id] = _Detok(self.tokenizer.stream_decoder(prompt_ids),
                                             max_stop=max((len(s) for s in params.stop), default=0))
        self.scheduler.add(seq)
        return request_id

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise :class:`InvalidRequestError` for a request this engine can never serve.

        Reads only the engine's fixed configuration, so another thread may call it while a step runs.
        """
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty: it must contain at least one token")
        vocab = self.runner.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be ints in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt has {len(prompt_ids)} tokens; this model's context is "
                                      f"{self.max_model_len} tokens, including at least one generated token")
        if self.kv_spec.blocks_needed(len(prompt_ids) + 1) > self.kv_spec.num_blocks:
            raise InvalidRequestError(f"prompt of {len(prompt_ids)} tokens does not fit the KV cache "
                                      f"({self.kv_spec.num_slots} token slots)")

    def abort(self, request_id: str, *, emit_output: bool = True) -> bool:
        """Stop a request now; its KV blocks are free when this returns. False if it is unknown or done.

        With ``emit_output`` the next ``step()`` reports the request as finished with reason "abort".
        """
        seq = self._seqs.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, FinishReason.ABORT)
        if emit_output:
            self._pending.append(self._output(seq, final_text=""))
        self._forget(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # --------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return outputs
        start = time.perf_counter()
        sampling = [c.seq for c in plan.chunks if c.samples]
        with _torch_threads(self._host_threads):
            batch = ModelInput.build(
                [c.seq.token_ids[c.seq.num_computed:c.seq.num_computed + c.num_tokens] for c in plan.chunks],
                [c.seq.num_computed for c in plan.chunks],
                [self.blocks.block_table(c.seq.request_id) for c in plan.chunks],
                [c.samples for c in plan.chunks], self.config.block_size, self.config.device)
            logits = self.runner.execute(batch, self.kv_cache)
            tokens = self.sampler(logits, [s.params for s in sampling], [s.generator for s in sampling]).tolist()
        self._counters.prompt_tokens += sum(
            max(0, min(c.seq.num_computed + c.num_tokens, c.seq.num_prompt) - c.seq.num_computed) for c in plan.chunks)
        self.scheduler.postprocess(plan, {id(s): t for s, t in zip(sampling, tokens, strict=True)})
        self._counters.steps += 1
        self._counters.generated_tokens += len(sampling)
        self._counters.step_times.append(time.perf_counter() - start)
        del self._counters.step_times[:-256]
        for seq in sampling:
            outputs.append(self._advance(seq))
        return outputs

    def _advance(self, seq: Sequence) -> RequestOutput:
        """Check the new token against the stop conditions and produce this step's delta."""
        token = seq.token_ids[-1]
        params = seq.params
        reason = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = FinishReason.STOP
            seq.token_ids.pop()  # the stop token is not part of the reply
        elif seq.num_tokens >= seq.max_len:
            reason = FinishReason.LENGTH
        detok = self._detok.get(seq.request_id)
        text = ""
        if detok is not None:
            if reason is not FinishReason.STOP:
                detok.text += detok.decoder.step(token)
            if reason is not None:
                detok.text += detok.decoder.flush()
            hit = _find_stop(detok.text, params.stop)
            if hit is not None:
                detok.text = detok.text[:hit]
                reason = FinishReason.STOP
            if reason is None:
                keep = detok.max_stop - 1 if detok.max_stop else 0
                cut = len(detok.text) - keep
                text, detok.text = detok.text[:max(cut, 0)], detok.text[max(cut, 0):]
            else:
                text, detok.text = detok.text, ""
        if reason is not None:
            self.scheduler.finish(seq, reason)
            out = self._output(seq, final_text=text)
            self._forget(seq)
            return out
        return self._output(seq, final_text=text)

    def _output(self, seq: Sequence, final_text: str) -> RequestOutput:
        detok = self._detok.get(seq.request_id)
        start = detok.sent if detok else 0
        new_ids = seq.output_ids[start:]
        if detok:
            detok.sent = len(seq.output_ids)
        return RequestOutput(seq.request_id, new_ids, final_text, seq.is_finished, seq.finish_reason,
                             seq.num_prompt, len(seq.output_ids), seq.num_cached_prompt)

    def _forget(self, seq: Sequence) -> None:
        self._seqs.pop(seq.request_id, None)
        self._detok.pop(seq.request_id, None)

    # -------------------------------------------------------------- conveniences
    def generate(self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run prompts to completion; returns their finished sequences in order."""
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        seqs = [self._seqs[i] for i in ids]
        while self.has_unfinished():
            self.step()
        return seqs

    def stats(self) -> EngineStats:
        b = self.blocks.stats()
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), b.num_used, b.num_free,
                           self.scheduler.num_preemptions, b.hit_rate, self._counters.steps,
                           self._counters.prompt_tokens, self._counters.generated_tokens)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None
