"""``hybrid-gateway bench edge``: our edge engine and its peers, one protocol, one run, ratios.

Our engine is measured with exactly the code that measures the peers (``bench/peers/run_peer.py``:
batch-1 decode, prefill/TTFT at 16/128/512 tokens, aggregate tok/s at 4/16/64 concurrent
requests), through :class:`EnginePeer`, an adapter from :class:`~kernels.engine.EngineCore` to that
protocol's ``Peer``. On top it records KV-cache waste (allocated but unfilled slots ÷ allocated,
sampled every step of the concurrent runs) and the achieved memory bandwidth of batch-1 decode
against a copy-bandwidth measurement of this machine taken in the same run.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from kernels.bench_report import save_report
from kernels.engine import EngineCore
from kernels.sampling import SamplingParams
from kernels.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent


def peers_module():
    """``bench/peers`` lives in the source checkout, beside the package (it is not installed)."""
    if not (REPO_ROOT / "bench" / "peers" / "run_peer.py").exists():
        raise RuntimeError("bench edge needs a source checkout (bench/peers/ is not installed with the package)")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.peers import api, run_peer

    return api, run_peer


class EnginePeer:
    """Our :class:`EngineCore` seen through the peers' protocol (greedy, EOS ignored, exact token counts)."""

    name = "hybrid-gateway"
    max_batch_size = None

    def __init__(self, core: EngineCore, tokenizer: Tokenizer, describe: dict[str, Any]) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self._describe = describe
        self.kv_samples: list[tuple[int, int]] = []  # (allocated slots, filled slots) per step

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def generate(self, prompts: list[list[int]], new_tokens: int, on_step: Callable[[], None]) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        ids = [self.core.add_request(p, params) for p in prompts]
        outputs: dict[str, list[int]] = {i: [] for i in ids}
        reported = 0
        while self.core.has_unfinished():
            for out in self.core.step():
                outputs[out.request_id].extend(out.token_ids)
            self._sample_kv()
            # One protocol "step" = every sequence has one more token.
            done = min(len(v) for v in outputs.values())
            for _ in range(done - reported):
                on_step()
            reported = done
        return [outputs[i] for i in ids]

    def _sample_kv(self) -> None:
        bs = self.core.config.block_size
        filled: dict[int, int] = {}
        for seq in self.core.scheduler.running:
            table = self.core.blocks.block_table(seq.request_id)
            for i, block in enumerate(table):
                filled[block] = max(filled.get(block, 0), min(bs, max(0, seq.num_computed - i * bs)))
        if filled:
            self.kv_samples.append((len(filled) * bs, sum(filled.values())))

    def describe(self) -> dict[str, Any]:
        return dict(self._describe)

    @property
    def kv_waste(self) -> float | None:
        allocated = sum(a for a, _ in self.kv_samples)
        return 1 - sum(f for _, f in self.kv_samples) / allocated if allocated else None


def decode_bytes_per_token(graph_paths: Sequence[Path], config) -> int:
    """Weight bytes one batch-1 decode step reads: every initializer except the row-gathered tables.

    The embedding table and the RoPE cos/sin tables are read one row per token, so they count as one row. A
    rescored LM head's 8-bit copy (``BlockQuantMatMul`` inputs 6, 7) counts as the ``rescore`` 8-row tiles a token
    reads of it, at most.
    """
    import onnx

    total = 0
    for path in graph_paths:
        graph = onnx.load(str(path), load_external_data=False).graph
        tiles_read: dict[str, int] = {}
        for node in graph.node:
            rescore = next((a.i for a in node.attribute if a.name == "rescore"), 0)
            if node.op_type == "BlockQuantMatMul" and rescore > 0 and len(node.input) > 7:
                tiles_read.update({node.input[6]: rescore, node.input[7]: rescore})
        for init in graph.initializer:
            ext = {e.key: e.value for e in init.external_data}
            nbytes = int(ext["length"]) if "length" in ext else len(init.raw_data)
            dims = list(init.dims)
            if dims and dims[0] in (config.vocab_size, config.max_position_embeddings) and len(dims) == 2 \
                    and path.name == graph_paths[0].name:
                nbytes //= dims[0]  # gathered: one row per token
            elif init.name in tiles_read:  # [tiles, blocks, bytes]: a tile per rescored logit, at most
                nbytes = nbytes * min(tiles_read[init.name], dims[0]) // dims[0]
            total += nbytes
    return total


def measure_copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of a large memory copy (bytes read + bytes written), best of ``repeats``."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def summarize(ours: dict[str, Any], peers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios ours/peer for decode, prefill and concurrency entries both sides have."""
    ratios: dict[str, dict[str, float]] = {}
    for name, res in peers.items():
        if res.get("status") != "ok":
            continue
        r: dict[str, float] = {}
        if "tok_per_s" in res["decode"] and "tok_per_s" in ours["decode"]:
            r["decode_b1"] = ours["decode"]["tok_per_s"] / res["decode"]["tok_per_s"]
        for mine, theirs in zip(ours["prefill"], res["prefill"], strict=False):
            if "ttft_ms" in mine and "ttft_ms" in theirs:
                r[f"ttft_{mine['prompt_tokens']}"] = theirs["ttft_ms"] / mine["ttft_ms"]  # >1: we are faster
        for mine, theirs in zip(ours["concurrency"], res["concurrency"], strict=False):
            if mine.get("supported") and theirs.get("supported") and "tok_per_s" in theirs:
                r[f"aggregate_{mine['num_requests']}"] = mine["tok_per_s"] / theirs["tok_per_s"]
        ratios[name] = r
    return ratios


def print_report(report: dict[str, Any], console: Console) -> None:
    engines = {"ours": report["ours"], **{k: v for k, v in report["peers"].items() if v.get("status") == "ok"}}
    table = Table(title=f"bench edge — {report['machine']['cpu']} ({report['machine']['threads']} threads)")
    table.add_column("engine")
    table.add_column("decode b1 tok/s", justify="right")
    for n in report["protocol"]["prompt_lengths"]:
        table.add_column(f"TTFT {n} ms", justify="right")
    for c in report["protocol"]["concurrency"]:
        table.add_column(f"{c} conc tok/s", justify="right")
    for name, res in engines.items():
        row = [name, _fmt(res["decode"].get("tok_per_s"))]
        row += [_fmt(p.get("ttft_ms")) for p in res["prefill"]]
        row += [_fmt(c.get("tok_per_s")) if c.get("supported", True) else "n/a" for c in res["concurrency"]]
        table.add_row(*row)
    console.print(table)
    for name, res in report["peers"].items():
        if res.get("status") != "ok":
            console.print(f"[yellow]{name}: {res.get('status')}[/] {res.get('hint', res.get('error', ''))}")
    for name, r in report["ratios"].items():
        console.print(f"ours / {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    bw = report["bandwidth"]
    waste = report["ours"]["kv_waste"]
    console.print(f"KV waste {waste:.1%}" if waste is not None else "KV waste: not sampled")
    console.print(f"batch-1 decode reads {bw['bytes_per_token'] / 1e6:.1f} MB/token -> {bw['achieved_gb_s']:.1f} GB/s "
                  f"of {bw['machine_gb_s']:.1f} GB/s measured copy bandwidth ({bw['roofline_fraction']:.0%} of the "
                  f"roofline, {bw['roofline_tok_per_s']:.0f} tok/s)")


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}"


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = {"ours": report["ours"], **{k: v for k, v in report["peers"].items() if v.get("status") == "ok"}}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(engines)
    ax1.bar(names, [engines[n]["decode"].get("tok_per_s", 0) for n in names], color="tab:blue")
    ax1.set_title("batch-1 decode (tok/s, higher is better)")
    conc = report["protocol"]["concurrency"]
    for n in names:
        ys = [c.get("tok_per_s") if c.get("supported", True) else None for c in engines[n]["concurrency"]]
        pts = [(x, y) for x, y in zip(conc, ys, strict=False) if y]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker="o", label=n)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("concurrent requests")
    ax2.set_title("aggregate decode (tok/s)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def decode_rounds_summary(rounds: list[dict[str, float | None]]) -> dict[str, Any]:
    """Batch-1 decode tok/s per round (``{"ours": x, peer: y, ...}``) -> per-round ratios ours/peer and their
    median: the figure to quote on a shared machine, where a peer measured minutes after us may meet another
    load than we did (two runs of ours and onnxruntime-genai here: 191 vs 210 tok/s, then 204 vs 176). A round
    where either side has no figure is left out of that peer's ratios.

    >>> decode_rounds_summary([{"ours": 200.0, "p": 100.0}, {"ours": 210.0, "p": 150.0}])["median_ratio"]
    {'p': 1.7}
    """
    names = sorted({name for r in rounds for name in r} - {"ours"})
    ratios = {name: [r["ours"] / r[name] for r in rounds if r.get("ours") and r.get(name)] for name in names}
    return {"rounds": rounds, "ratios": ratios,
            "median_ratio": {name: statistics.median(v) for name, v in ratios.items() if v}}


def run_edge_bench(core: EngineCore, tokenizer: Tokenizer, describe: dict[str, Any], *, peers: list[str],
                   protocol_overrides: dict[str, Any] | None, out_dir: Path, threads: int,
                   console: Console, rounds: int = 1) -> dict[str, Any]:
    """The whole protocol for ours, then for each peer; with ``rounds`` > 1, that many more batch-1 decode
    measurements of everyone, alternating who goes first, whose per-round ratios give ``decode_rounds``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    api, run_peer = peers_module()
    protocol = run_peer.validate_protocol(protocol_overrides)
    machine_bw = measure_copy_bandwidth()
    ours_peer = EnginePeer(core, tokenizer, describe)
    with console.status("measuring hybrid-gateway edge…") as status:
        ours = run_peer.run_protocol(ours_peer, protocol, log=lambda m: status.update(f"ours: {m}"))
    ours["kv_waste"] = ours_peer.kv_waste
    ours["describe"] = ours_peer.describe()
    peer_results = api.run_peers(peers, protocol, None, console) if peers else {}
    decode_rounds = None
    if rounds > 1:
        decode_only = {**protocol, "prompt_lengths": [], "concurrency": []}
        per_round = [{"ours": ours["decode"].get("tok_per_s"),
                      **{n: r.get("decode", {}).get("tok_per_s") for n, r in peer_results.items()}}]
        for i in range(1, rounds):
            console.print(f"[dim]decode round {i + 1}/{rounds} ({'peers' if i % 2 else 'ours'} first)[/]")
            figures: dict[str, float | None] = {}
            for who in ("peers", "ours") if i % 2 else ("ours", "peers"):
                if who == "ours":
                    with console.status(f"round {i + 1}: ours, decode batch 1…"):
                        figures["ours"] = run_peer.measure_decode(ours_peer, decode_only)["tok_per_s"]
                elif peers:
                    for name, result in api.run_peers(peers, decode_only, None, console).items():
                        figures[name] = result.get("decode", {}).get("tok_per_s")
            per_round.append(figures)
        decode_rounds = decode_rounds_summary(per_round)
    bytes_per_token = describe["weights_bytes"]
    achieved = ours["decode"].get("tok_per_s", 0.0) * bytes_per_token
    report = {
        "kind": "bench-edge",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                    "python": platform.python_version()},
        "protocol": protocol,
        "ours": ours,
        "peers": peer_results,
        "ratios": {},
        "bandwidth": {"machine_gb_s": machine_bw / 1e9, "bytes_per_token": bytes_per_token,
                      "achieved_gb_s": achieved / 1e9, "roofline_fraction": achieved / machine_bw,
                      "roofline_tok_per_s": machine_bw / bytes_per_token},
    }
    report["ratios"] = summarize(ours, peer_results)
    if decode_rounds is not None:
        report["decode_rounds"] = decode_rounds
    save_report(report, out_dir, "edge", plot_report)
    print_report(report, console)
    if decode_rounds is not None:
        for name, ratio in decode_rounds["median_ratio"].items():
            each = ", ".join(f"{r:.2f}x" for r in decode_rounds["ratios"][name])
            console.print(f"batch-1 decode ours / {name} over {rounds} rounds: median [bold]{ratio:.2f}x[/] ({each})")
    console.print(f"saved {report['files'][0]} and {report['files'][1]}")
    return report
