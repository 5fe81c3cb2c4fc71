"""Measure one peer engine with the protocol that every engine in ``hybrid-gateway bench edge`` follows.

Runs inside the peer's own venv, so it imports the standard library and that peer only, never our package:

    <venv>/bin/python bench/peers/run_peer.py --peer ortgenai --model DIR --threads 2 --protocol '{"repeats": 5}'
    python bench/peers/run_peer.py --peer fake        # the timing logic alone: a "model" that sleeps

One JSON object goes to stdout (see ``validate_result``); progress lines go to stderr. On SIGINT the
entries not yet measured are skipped and the JSON still comes out, with ``"status": "partial"``.

The protocol (``DEFAULT_PROTOCOL``; ``--protocol`` overrides keys), all greedy with EOS suppressed, so every
run generates exactly the tokens it asks for:

    decode       batch 1: the chat prompt ``decode_prompt``, then ``new_tokens`` tokens.
                 decode tok/s = (new_tokens - 1) / (time of the last token - time of the first token)
    prefill      for each L in ``prompt_lengths``: a filler prompt of exactly L tokens, one new token.
                 TTFT = time from the call to the first token; prefill tok/s = L / TTFT
    concurrency  for each C in ``concurrency``: C distinct filler prompts of ``concurrent_prompt_tokens``
                 tokens submitted together, ``new_tokens`` each (equal lengths, so no padding).
                 aggregate tok/s = C * new_tokens / (time of the last token - submission)

Each figure is the median of ``repeats`` runs after ``warmup`` unmeasured ones. Peers without batching
(llama-cpp-python) report their concurrency entries as ``"supported": false``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

SCHEMA_VERSION = 1

# SmolLM2's chat template rendered for one user turn (the same 37 tokens our engine's encode_chat gives).
DECODE_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")

DEFAULT_PROTOCOL: dict[str, Any] = {
    "decode_prompt": DECODE_PROMPT,
    "new_tokens": 64,
    "prompt_lengths": [16, 128, 512],
    "concurrency": [4, 16, 64],
    "concurrent_prompt_tokens": 32,
    "repeats": 3,
    "warmup": 1,
}

Clock = Callable[[], float]


class MeasurementError(RuntimeError):
    """A peer broke the protocol (wrong token count, no batching where batching was asked)."""


def validate_protocol(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULT_PROTOCOL with ``overrides`` applied; ValueError on unknown keys or impossible values."""
    protocol = {**DEFAULT_PROTOCOL, **(overrides or {})}
    unknown = sorted(set(protocol) - set(DEFAULT_PROTOCOL))
    if unknown:
        raise ValueError(f"unknown protocol key(s) {unknown}; known: {sorted(DEFAULT_PROTOCOL)}")
    if not isinstance(protocol["decode_prompt"], str) or not protocol["decode_prompt"]:
        raise ValueError(f"decode_prompt must be a non-empty string, got {protocol['decode_prompt']!r}")
    for key, least in (("new_tokens", 2), ("concurrent_prompt_tokens", 1), ("repeats", 1), ("warmup", 0)):
        if not isinstance(protocol[key], int) or protocol[key] < least:
            raise ValueError(f"{key} must be an int >= {least}, got {protocol[key]!r}")
    for key in ("prompt_lengths", "concurrency"):
        values = protocol[key]
        if not isinstance(values, list) or not all(isinstance(v, int) and v >= 1 for v in values):
            raise ValueError(f"{key} must be a list of positive ints, got {values!r}")
    return protocol


def filler_text() -> str:
    """Plain English filler long enough for the longest prompt plus the concurrency offsets (~2,000 tokens)."""
    return " ".join(f"Note {i}: the quick brown fox jumps over the lazy dog beside the old stone bridge."
                    for i in range(120))


def filler_prompt(tokens: Sequence[int], length: int, offset: int = 0) -> list[int]:
    """Exactly ``length`` tokens of the tokenized filler, starting at ``offset`` (distinct prompts, same length)."""
    if offset + length > len(tokens):
        raise ValueError(f"filler has {len(tokens)} tokens; {length} from offset {offset} do not fit")
    return list(tokens[offset:offset + length])


# --- timing ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Timeline:
    """When one generate call started and when each step's tokens (one per sequence) appeared."""

    start: float
    num_sequences: int
    steps: list[float] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.steps[0] - self.start

    @property
    def decode_tok_per_s(self) -> float:
        """Per-sequence rate from first to last token (prefill excluded)."""
        return (len(self.steps) - 1) / (self.steps[-1] - self.steps[0])

    @property
    def aggregate_tok_per_s(self) -> float:
        """All sequences' tokens over the whole call (prefill included)."""
        return self.num_sequences * len(self.steps) / (self.steps[-1] - self.start)


class Peer(Protocol):
    name: str
    max_batch_size: int | None  # None: any batch; 1: no batching

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def generate(self, prompts: list[list[int]], new_tokens: int, on_step: Callable[[], None]) -> list[list[int]]:
        """Greedy, exactly ``new_tokens`` per prompt; ``on_step()`` right after each step's tokens exist."""
        ...

    def describe(self) -> dict[str, Any]:
        """Versions, weight format and ``weights_bytes`` (what one batch-1 decode step reads)."""
        ...


def timed_generate(peer: Peer, prompts: list[list[int]], new_tokens: int,
                   clock: Clock = time.perf_counter) -> tuple[Timeline, list[list[int]]]:
    timeline = Timeline(start=clock(), num_sequences=len(prompts))
    outputs = peer.generate(prompts, new_tokens, lambda: timeline.steps.append(clock()))
    if len(timeline.steps) != new_tokens or any(len(o) != new_tokens for o in outputs):
        raise MeasurementError(f"{peer.name}: asked for {new_tokens} tokens, got {len(timeline.steps)} steps "
                               f"and outputs of {[len(o) for o in outputs]}")
    return timeline, outputs


def repeat(run: Callable[[], Timeline], protocol: dict[str, Any]) -> list[Timeline]:
    for _ in range(protocol["warmup"]):
        run()
    return [run() for _ in range(protocol["repeats"])]


def measure_decode(peer: Peer, protocol: dict[str, Any], clock: Clock = time.perf_counter) -> dict[str, Any]:
    prompt = peer.encode(protocol["decode_prompt"])
    outputs: list[list[int]] = []

    def run() -> Timeline:
        timeline, out = timed_generate(peer, [prompt], protocol["new_tokens"], clock)
        outputs[:] = out
        return timeline

    runs = repeat(run, protocol)
    return {"prompt_tokens": len(prompt), "new_tokens": protocol["new_tokens"],
            "tok_per_s": statistics.median(t.decode_tok_per_s for t in runs),
            "ttft_ms": statistics.median(t.ttft_s for t in runs) * 1e3,
            "runs_tok_per_s": [t.decode_tok_per_s for t in runs],
            "text": peer.decode(outputs[0])}


def measure_prefill(peer: Peer, filler: Sequence[int], length: int, protocol: dict[str, Any],
                    clock: Clock = time.perf_counter) -> dict[str, Any]:
    prompt = filler_prompt(filler, length)
    runs = repeat(lambda: timed_generate(peer, [prompt], 1, clock)[0], protocol)
    ttft_s = statistics.median(t.ttft_s for t in runs)
    return {"prompt_tokens": length, "ttft_ms": ttft_s * 1e3, "tok_per_s": length / ttft_s,
            "runs_ttft_ms": [t.ttft_s * 1e3 for t in runs]}


def measure_concurrency(peer: Peer, filler: Sequence[int], num_requests: int, protocol: dict[str, Any],
                        clock: Clock = time.perf_counter) -> dict[str, Any]:
    entry: dict[str, Any] = {"num_requests": num_requests, "prompt_tokens": protocol["concurrent_prompt_tokens"],
                             "new_tokens": protocol["new_tokens"]}
    if peer.max_batch_size is not None and num_requests > peer.max_batch_size:
        return {**entry, "supported": False,
                "note": f"{peer.name} runs at most {peer.max_batch_size} sequences at once"}
    # Offsets of 7 tokens make every prompt distinct, so no peer gains from prefix caching.
    prompts = [filler_prompt(filler, protocol["concurrent_prompt_tokens"], 7 * i) for i in range(num_requests)]
    runs = repeat(lambda: timed_generate(peer, prompts, protocol["new_tokens"], clock)[0], protocol)
    return {**entry, "supported": True,
            "tok_per_s": statistics.median(t.aggregate_tok_per_s for t in runs),
            "ttft_ms": statistics.median(t.ttft_s for t in runs) * 1e3,
            "runs_tok_per_s": [t.aggregate_tok_per_s for t in runs]}


def run_protocol(peer: Peer, protocol: dict[str, Any], clock: Clock = time.perf_counter,
                 log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every measurement of the protocol; a failing entry records its error instead of ending the run.

    SIGINT (what ``run_peers`` sends at its timeout) skips the remaining entries but keeps those measured.
    """
    interrupted = False

    def attempt(label: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        nonlocal interrupted
        if interrupted:
            return {"error": "skipped: interrupted"}
        log(label)
        try:
            return measure()
        except KeyboardInterrupt:
            interrupted = True
            log(f"{label}: interrupted")
            return {"error": "interrupted"}
        except Exception as exc:  # one failing shape (e.g. out of memory at batch 64) must not lose the rest
            log(f"{label}: {type(exc).__name__}: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}

    filler = peer.encode(filler_text())
    decode = attempt("decode batch 1", lambda: measure_decode(peer, protocol, clock))
    prefill = [attempt(f"prefill {n} tokens", lambda n=n: measure_prefill(peer, filler, n, protocol, clock))
               for n in protocol["prompt_lengths"]]
    concurrency = [attempt(f"{c} concurrent", lambda c=c: measure_concurrency(peer, filler, c, protocol, clock))
                   for c in protocol["concurrency"]]
    return {"status": "partial" if interrupted else "ok", "decode": decode, "prefill": prefill,
            "concurrency": concurrency}


def validate_result(result: dict[str, Any]) -> None:
    """Raise ValueError unless ``result`` has the shape run_peer.py prints for a peer that ran."""
    def need(obj: dict[str, Any], keys: Sequence[str], where: str) -> None:
        missing = [k for k in keys if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing {missing}")

    need(result, ("schema", "peer", "status", "engine", "threads", "protocol", "load_s", "decode", "prefill",
                  "concurrency"), "result")
    if result["schema"] != SCHEMA_VERSION or result["status"] not in ("ok", "partial"):
        raise ValueError(f"result: schema {result['schema']!r}, status {result['status']!r}")
    need(result["engine"], ("weights", "weights_bytes", "versions"), "engine")
    if "error" not in result["decode"]:
        need(result["decode"], ("prompt_tokens", "new_tokens", "tok_per_s", "ttft_ms", "text"), "decode")
    for entry in result["prefill"]:
        if "error" not in entry:
            need(entry, ("prompt_tokens", "ttft_ms", "tok_per_s"), "prefill")
    for entry in result["concurrency"]:
        if "error" not in entry:
            need(entry, ("num_requests", "supported") + (("tok_per_s",) if entry.get("supported") else ()),
                 "concurrency")


# --- peers -----------------------------------------------------------------------------------------------

@dataclass
class FakePeer:
    """A model made of sleeps: prefill costs per prompt token, a decode step a fixed time plus a per-sequence
    time. ``sleep`` is injectable so tests can run it on a fake clock."""

    prefill_s_per_token: float = 0.0002
    step_s: float = 0.004
    step_s_per_sequence: float = 0.0005
    sleep: Callable[[float], None] = time.sleep
    name: str = "fake"
    max_batch_size: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i % 256 for i in ids).decode(errors="replace")

    def generate(self, prompts: list[list[int]], new_tokens: int, on_step: Callable[[], None]) -> list[list[int]]:
        self.sleep(self.prefill_s_per_token * sum(map(len, prompts)))
        outputs = [[] for _ in prompts]
        for step in range(new_tokens):
            if step:
                self.sleep(self.step_s + self.step_s_per_sequence * len(prompts))
            for prompt, out in zip(prompts, outputs):
                out.append(ord("a") + (prompt[-1] + step) % 26)  # printable, so decode() shows text
            on_step()
        return outputs

    def describe(self) -> dict[str, Any]:
        return {"weights": "none (sleeps)", "weights_bytes": 0, "versions": {}}


class OrtGenAIPeer:
    """onnxruntime-genai's own generate loop over the int4 model its builder made."""

    name = "ortgenai"
    max_batch_size = 32  # onnxruntime-genai 0.18 rejects batch_size > 32 ("must be in [1, 32]")

    def __init__(self, model_dir: Path, threads: int):
        import onnxruntime_genai as og

        self.og, self.model_dir = og, model_dir
        config = og.Config(str(model_dir))
        # The builder writes no thread count; pin ORT's intra-op pool like every other engine's.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        import numpy as np

        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def generate(self, prompts: list[list[int]], new_tokens: int, on_step: Callable[[], None]) -> list[list[int]]:
        import numpy as np

        length = len(prompts[0])
        if any(len(p) != length for p in prompts):
            raise MeasurementError("ortgenai peer takes equal-length prompts only")
        params = self.og.GeneratorParams(self.model)
        total = length + new_tokens
        params.set_search_options(batch_size=len(prompts), max_length=total, min_length=total, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray(prompts, dtype=np.int32))  # runs the prefill
        for _ in range(new_tokens):
            generator.generate_next_token()
            on_step()
        return [[int(t) for t in generator.get_sequence(i)[length:]] for i in range(len(prompts))]

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        data = [p for p in self.model_dir.iterdir() if p.suffix in (".onnx", ".data")]
        return {"weights": "int4 MatMulNBits (onnxruntime-genai builder, -p int4 -e cpu)",
                "weights_bytes": sum(p.stat().st_size for p in data),
                "versions": {p: version(p) for p in ("onnxruntime-genai", "onnxruntime")}}


class TransformersPeer:
    """Hugging Face ``generate()`` on the dequantized folder, left-padding batches of unequal prompts."""

    name = "transformers"
    max_batch_size = None

    def __init__(self, model_dir: Path, threads: int, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch, self.dtype = torch, dtype
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def generate(self, prompts: list[list[int]], new_tokens: int, on_step: Callable[[], None]) -> list[list[int]]:
        from transformers.generation.streamers import BaseStreamer

        class StepStreamer(BaseStreamer):
            def __init__(self) -> None:
                self.seen_prompt = False

            def put(self, value: Any) -> None:  # the first put is the prompt itself
                if self.seen_prompt:
                    on_step()
                self.seen_prompt = True

            def end(self) -> None:
                pass

        width = max(map(len, prompts))
        ids = self.torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = self.torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad_id,
                                      streamer=StepStreamer())
        return out[:, width:].tolist()

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"weights": f"{self.dtype} (dequantized from the GGUF)",
                "weights_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
                "versions": {p: version(p) for p in ("transformers", "torch")}}


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python on the GGUF itself; its high-level API runs one sequence at a time."""

    name = "llamacpp"
    max_batch_size = 1

    def __init__(self, gguf: Path, threads: int, max_tokens: int):
        from llama_cpp import Llama

        self.gguf = gguf
        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=max_tokens,
                         n_batch=512, verbose=False)

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode(errors="replace")

    def generate(self, prompts: list[list[int]], new_tokens: int, on_step: Callable[[], None]) -> list[list[int]]:
        if len(prompts) != 1:
            raise MeasurementError("llamacpp peer runs batch 1 only")
        self.llm.reset()  # n_tokens = 0: no prefix reuse from the previous run, so TTFT is a full prefill
        out: list[int] = []
        # Llama.generate does not stop at EOS by itself (create_completion does), so it runs all new_tokens.
        for token in self.llm.generate(prompts[0], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            on_step()
            if len(out) == new_tokens:
                break
        return [out]

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"weights": "GGUF as shipped", "weights_bytes": self.gguf.stat().st_size,
                "versions": {"llama-cpp-python": version("llama-cpp-python")}}


def load_peer(name: str, model: Path | None, threads: int, protocol: dict[str, Any], dtype: str) -> Peer:
    if name == "fake":
        return FakePeer()
    if model is None or not model.exists():
        raise MeasurementError(f"--model is required for {name} and must exist (got {model})")
    if name == "ortgenai":
        return OrtGenAIPeer(model, threads)
    if name == "transformers":
        return TransformersPeer(model, threads, dtype)
    if name == "llamacpp":
        longest = max([*protocol["prompt_lengths"], protocol["concurrent_prompt_tokens"], 64])
        return LlamaCppPeer(model, threads, max_tokens=longest + protocol["new_tokens"] + 64)
    raise MeasurementError(f"unknown peer {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", required=True, choices=("ortgenai", "transformers", "llamacpp", "fake"))
    parser.add_argument("--model", type=Path, default=None, help="the peer's model folder or GGUF")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--protocol", default="{}", help="JSON object overriding DEFAULT_PROTOCOL keys")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="transformers only")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[{args.peer}] {message}", file=sys.stderr, flush=True)

    protocol = validate_protocol(json.loads(args.protocol))
    load_at_start = os.getloadavg()[0]
    started = time.perf_counter()
    peer = load_peer(args.peer, args.model, args.threads, protocol, args.dtype)
    load_s = time.perf_counter() - started
    log(f"loaded in {load_s:.1f} s")
    result = {"schema": SCHEMA_VERSION, "peer": args.peer, "engine": peer.describe(), "threads": args.threads,
              "protocol": protocol, "load_s": load_s, **run_protocol(peer, protocol, log=log)}
    decode = result["decode"]
    if "tok_per_s" in decode and result["engine"]["weights_bytes"]:
        # Weights-only estimate: a batch-1 step reads every weight once (KV and activations are small here).
        result["decode"]["weights_gb_per_s"] = result["engine"]["weights_bytes"] * decode["tok_per_s"] / 1e9
    result["wall_s"] = time.perf_counter() - started
    # The 1-minute load average says how much others shared the cores while this ran.
    result["machine"] = {"cpu_count": os.cpu_count(), "loadavg_1m_start": load_at_start,
                         "loadavg_1m_end": os.getloadavg()[0]}
    validate_result(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
