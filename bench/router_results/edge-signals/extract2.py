"""Batched SmolLM2-135M-Instruct signals for routing-data prompts (shared system-prefix KV, batched decode).

Usage: nice -n 10 python /tmp/router-exp/extract2.py [--dtype bf16] SOURCE[:N] ...
Writes /tmp/router-exp/feats/{source}.npz (per-prompt rows keyed by prompt_hash); resumable in chunks.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from gateway.routing.corpora import FRONTIER_MODELS, STRONG_MODEL, load_source
from gateway.routing.features import split_conversation
from gateway.routing.labels import build_examples, prompt_hash
from kernels.attention import AttentionMetadata
from kernels.checkpoints import load_checkpoint
from kernels.checkpoints.store import ensure_default_model
from kernels.kv_cache.layout import KVCacheSpec
from kernels.model import TransformerModel
from kernels.tokenizer import Tokenizer

OUT = Path("/tmp/router-exp/feats")
MAX_TOKENS = 256
K_DECODE = 4
MID_LAYER = 15
BLOCK = 16
BATCH = 8
DTYPE = torch.bfloat16 if "--dtype" in sys.argv and sys.argv[sys.argv.index("--dtype") + 1] == "bf16" else torch.float32

torch.set_num_threads(2)
ck = load_checkpoint(ensure_default_model())
model = TransformerModel.from_checkpoint(ck, dtype=DTYPE)
tok = Tokenizer.from_checkpoint(ck)
cfg = model.config
MARK = "XYZCONTENTMARK"
rendered = tok.apply_chat_template([{"role": "user", "content": MARK}])
PREFIX_IDS = tok.encode(rendered[: rendered.index(MARK)])
SUFFIX_IDS = tok.encode(rendered[rendered.index(MARK) + len(MARK):])
P = len(PREFIX_IDS)
EOS = set(cfg.eos_token_ids) | {tok.token_to_id("<|im_end|>")}
PER_SEQ = (MAX_TOKENS + K_DECODE) // BLOCK + 2
spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks=PER_SEQ * (BATCH + 1), block_size=BLOCK,
                   dtype=DTYPE)
cache = spec.allocate()
tables = [list(range(PER_SEQ * (i + 1), PER_SEQ * (i + 2))) for i in range(BATCH)]
prefix_table = list(range(PER_SEQ))
captured = {}
model.model.layers[MID_LAYER].register_forward_hook(lambda m, i, o: captured.__setitem__("mid", o))
NPB = -(-P // BLOCK)  # blocks holding the prefix

with torch.no_grad():
    meta = AttentionMetadata.build([prefix_table], [0], [P], BLOCK, "cpu")
    h = model(torch.tensor(PREFIX_IDS), torch.arange(P), cache, meta)
    PREFIX_LAST_LOGITS = model.compute_logits(h[-1:]).float()


def entropy_top(logits: torch.Tensor):
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    top = p.topk(5, dim=-1).values
    return logp, ent, top[:, 0], top.sum(-1)


@torch.no_grad()
def batch_signals(texts: list[str]) -> list[dict]:
    n = len(texts)
    contents, full_lens = [], []
    room = MAX_TOKENS - P - len(SUFFIX_IDS)
    for t in texts:
        c = tok.encode(t)
        full_lens.append(len(c))
        contents.append(c[-room:])
    for i in range(n):  # copy the shared prefix KV into each sequence's first blocks
        cache[:, :, tables[i][:NPB]] = cache[:, :, prefix_table[:NPB]]
    new = [c + SUFFIX_IDS for c in contents]
    t0 = time.perf_counter()
    meta = AttentionMetadata.build(tables[:n], [P] * n, [len(x) for x in new], BLOCK, "cpu")
    ids = torch.tensor([t for x in new for t in x])
    pos = torch.cat([torch.arange(P, P + len(x)) for x in new])
    hidden = model(ids, pos, cache, meta)
    mid = captured["mid"]
    logits = model.compute_logits(hidden).float()
    t_prefill = time.perf_counter() - t0
    rows, off = [], 0
    last_logits = []
    for i, c in enumerate(contents):
        L = len(new[i])
        lg = torch.cat([PREFIX_LAST_LOGITS, logits[off : off + len(c) - 1]])  # predictions of content tokens
        logp, ent, top1, _ = entropy_top(lg)
        nll = -logp.gather(1, torch.tensor(c)[:, None]).squeeze(1)
        last = logits[off + L - 1 : off + L]
        last_logits.append(last)
        _, ea, t1a, t5a = entropy_top(last)
        rows.append({
            "nll": nll.numpy(), "ent_c": ent.numpy(), "top1_c": top1.numpy(),
            "scalar": [full_lens[i], len(c), float(ea[0]), float(t1a[0]), float(t5a[0])],
            "pooled_last": hidden[off : off + len(c)].float().mean(0).numpy(),
            "pooled_mid": mid[off : off + len(c)].float().mean(0).numpy(),
            "last_hidden": hidden[off + L - 1].float().numpy(),
            "seq_len": P + L,
        })
        off += L
    # batched greedy decode, K steps (sequences that hit EOS keep decoding but their steps are masked)
    t1 = time.perf_counter()
    nxt = [int(x.argmax()) for x in last_logits]
    done = [t in EOS for t in nxt]
    seq = [r["seq_len"] for r in rows]
    dec_ent = np.zeros((n, K_DECODE)); dec_top1 = np.ones((n, K_DECODE)); steps = np.zeros(n, int)
    for k in range(K_DECODE):
        meta = AttentionMetadata.build(tables[:n], seq, [1] * n, BLOCK, "cpu")
        h = model(torch.tensor(nxt), torch.tensor(seq), cache, meta)
        lg = model.compute_logits(h)
        _, e, t, _ = entropy_top(lg)
        lg_arg = lg.argmax(-1).tolist()
        for i in range(n):
            if not done[i]:
                dec_ent[i, k], dec_top1[i, k] = float(e[i]), float(t[i])
                steps[i] += 1
                done[i] = lg_arg[i] in EOS
        nxt = lg_arg
        seq = [s + 1 for s in seq]
    t_decode = time.perf_counter() - t1
    for i, r in enumerate(rows):
        r["dec_ent"], r["dec_top1"] = dec_ent[i], dec_top1[i]
        r["scalar"] += [int(steps[i] < K_DECODE), int(steps[i])]
        r["times"] = [t_prefill, t_decode, n, sum(len(x) for x in new)]
    return rows


def summarize(r: dict) -> np.ndarray:
    nll, ent, top1 = r["nll"], r["ent_c"], r["top1_c"]
    q = np.quantile(nll, [0.1, 0.25, 0.5, 0.75, 0.9])
    return np.r_[nll.mean(), nll.max(), nll.std(), q, nll[:32].mean(), nll[-32:].mean(),
                 ent.mean(), (nll - ent).mean(), top1.mean(), (nll > 5).mean()]


NLL_NAMES = ["nll_mean", "nll_max", "nll_std", "nll_q10", "nll_q25", "nll_q50", "nll_q75", "nll_q90", "nll_first32",
             "nll_last32", "ent_mean", "surprise_mean", "top1_mean", "frac_nll_gt5"]


def run(source: str, limit: int | None) -> None:
    path = OUT / f"{source}.npz"
    if path.exists():
        print("cached", path); return
    exs = build_examples(load_source(source), strong=STRONG_MODEL, frontier=FRONTIER_MODELS)
    exs = [e for e in exs if e.strong_quality is not None and e.weak_quality is not None] if source != "arena-hard" else exs
    texts = {}
    for e in exs:
        texts.setdefault(prompt_hash(e.prompt), split_conversation(e.prompt)[0])
    keys = list(texts)
    if limit and limit < len(keys):
        keys = [keys[i] for i in sorted(np.random.default_rng(0).choice(len(keys), limit, replace=False))]
    order = sorted(range(len(keys)), key=lambda i: len(texts[keys[i]]))  # similar lengths share a batch
    rows: dict[int, dict] = {}
    start = time.time()
    for b in range(0, len(order), BATCH):
        idx = order[b : b + BATCH]
        for i, r in zip(idx, batch_signals([texts[keys[i]] for i in idx])):
            rows[i] = r
        if (b // BATCH) % 10 == 0:
            print(source, b, len(keys), f"{time.time() - start:.0f}s", flush=True)
    rows_l = [rows[i] for i in range(len(keys))]
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(path, hashes=np.array(keys, dtype=np.uint64), nll_stats=np.stack([summarize(r) for r in rows_l]),
             scalar=np.array([r["scalar"] for r in rows_l], float), dec_ent=np.stack([r["dec_ent"] for r in rows_l]),
             dec_top1=np.stack([r["dec_top1"] for r in rows_l]),
             pooled_last=np.stack([r["pooled_last"] for r in rows_l]).astype(np.float32),
             pooled_mid=np.stack([r["pooled_mid"] for r in rows_l]).astype(np.float32),
             last_hidden=np.stack([r["last_hidden"] for r in rows_l]).astype(np.float32),
             times=np.array([r["times"] for r in rows_l], float))
    print("wrote", path, f"{time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--") and a not in ("bf16", "fp32")]
    for a in args:
        name, _, lim = a.partition(":")
        run(name, int(lim) if lim else None)
