"""Extra latency of edge signals on this (loaded, shared 2-core) CPU: SmolLM2-135M prefill, single prompt.

Usage: nice -n 10 python /tmp/router-exp/latency.py  -> /tmp/router-exp/latency.json
"""
import json, time
import numpy as np, torch
from kernels.attention import AttentionMetadata
from kernels.checkpoints import load_checkpoint
from kernels.checkpoints.store import ensure_default_model
from kernels.kv_cache.layout import KVCacheSpec
from kernels.model import TransformerModel

torch.set_num_threads(2)
ck = load_checkpoint(ensure_default_model())
out = {}
for dtype in (torch.float32, torch.bfloat16):
    m = TransformerModel.from_checkpoint(ck, dtype=dtype); c = m.config
    spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, num_blocks=24, block_size=16, dtype=dtype)
    cache = spec.allocate(); table = list(range(24))
    g = torch.Generator().manual_seed(0)
    for n in (32, 64, 128, 256):
        ids = torch.randint(0, c.vocab_size, (n,), generator=g)
        t_last, t_all, t_sig = [], [], []
        with torch.no_grad():
            for rep in range(6):
                meta = AttentionMetadata.build([table], [0], [n], 16, "cpu")
                t0 = time.perf_counter(); h = m(ids, torch.arange(n), cache, meta); lg = m.compute_logits(h[-1:]); t1 = time.perf_counter()
                lp_all = torch.log_softmax(m.compute_logits(h).float(), -1); nll = -lp_all[:-1].gather(1, ids[1:, None]); t2 = time.perf_counter()
                lp = torch.log_softmax(lg.float(), -1); ent = -(lp.exp() * lp).sum(); pooled = h.float().mean(0); t3 = time.perf_counter()
                if rep:  # first is warm-up
                    t_last.append(t1 - t0); t_all.append(t2 - t1); t_sig.append(t3 - t2)
        key = f"{str(dtype).split('.')[-1]} n={n}"
        out[key] = {"prefill_last_logits_ms": [float(np.median(t_last) * 1e3), float(np.max(t_last) * 1e3)],
                    "extra_all_position_logits_nll_ms": [float(np.median(t_all) * 1e3), float(np.max(t_all) * 1e3)],
                    "start_entropy_and_pooling_ms": [float(np.median(t_sig) * 1e3), float(np.max(t_sig) * 1e3)]}
        print(key, out[key], flush=True)
    # one decode step after a 64-token prompt
    with torch.no_grad():
        ts = []
        for rep in range(6):
            meta = AttentionMetadata.build([table], [64], [1], 16, "cpu")
            t0 = time.perf_counter(); h = m(torch.tensor([5]), torch.tensor([64]), cache, meta); m.compute_logits(h); ts.append(time.perf_counter() - t0)
        out[f"{str(dtype).split('.')[-1]} decode_step"] = [float(np.median(ts[1:]) * 1e3), float(np.max(ts[1:]) * 1e3)]
        print(out[f"{str(dtype).split('.')[-1]} decode_step"], flush=True)
json.dump(out, open("/tmp/router-exp/latency.json", "w"), indent=1)
