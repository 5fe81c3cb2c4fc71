"""LOSO / arena-only evaluation of edge-model signals from the cached npz files.

Usage: python /tmp/router-exp/evalx.py [--out results.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from gateway.routing.classifier import LinearFitConfig, fit_linear
from gateway.routing.corpora import FRONTIER_MODELS, STRONG_MODEL, load_source
from gateway.routing.evaluate import evaluate_router
from gateway.routing.features import FeatureExtractor, FeatureSpec
from gateway.routing.labels import build_examples, prompt_hash

FEATS = Path("/tmp/router-exp/feats")
SOURCES = [s for s in ("alpaca-eval", "arc-challenge", "arena-hard", "mbpp", "winogrande") if (FEATS / f"{s}.npz").exists()]
CACHE = Path("/tmp/router-exp/examples.npz")

NLL_NAMES = ["nll_mean", "nll_max", "nll_std", "nll_q10", "nll_q25", "nll_q50", "nll_q75", "nll_q90", "nll_first32",
             "nll_last32", "ent_mean", "surprise_mean", "top1_mean", "frac_nll_gt5"]

examples, blocks = [], {}
for s in SOURCES:
    d = np.load(FEATS / f"{s}.npz")
    row = {int(h): i for i, h in enumerate(d["hashes"])}
    exs = [e for e in build_examples(load_source(s), strong=STRONG_MODEL, frontier=FRONTIER_MODELS) if prompt_hash(e.prompt) in row]
    idx = np.array([row[prompt_hash(e.prompt)] for e in exs])
    sc = d["scalar"][idx]
    blk = {
        "nll": d["nll_stats"][idx],
        "start": np.c_[sc[:, 2:5]],  # entropy, top1, top5 at the assistant position
        "decode": np.c_[d["dec_ent"][idx], d["dec_top1"][idx], d["dec_ent"][idx].mean(1), sc[:, 5:7]],
        "ntok": np.log1p(sc[:, :2]),
        "pooled_last": d["pooled_last"][idx].astype(np.float64),
        "pooled_mid": d["pooled_mid"][idx].astype(np.float64),
        "last_hidden": d["last_hidden"][idx].astype(np.float64),
    }
    for k, v in blk.items():
        blocks.setdefault(k, []).append(v)
    examples += exs
blocks = {k: np.concatenate(v) for k, v in blocks.items()}
src = np.array([e.source for e in examples])
y = np.array([e.label for e in examples])
ext = FeatureExtractor(FeatureSpec())
TEXT = ext.transform([e.prompt for e in examples]).tocsr()
HD = ext.spec.hash_dim
print({s: int((src == s).sum()) for s in SOURCES}, flush=True)


def dense(names: list[str]) -> np.ndarray:
    return np.hstack([blocks[n] for n in names]) if names else np.zeros((len(y), 0))


def fit_dense(xtr, ytr, c):
    mu, sd = xtr.mean(0), xtr.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = (xtr - mu) / sd
    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(np.vstack([z, z]), np.r_[np.ones(len(ytr)), np.zeros(len(ytr))], sample_weight=np.r_[ytr, 1 - ytr])
    return lambda x: clf.decision_function((x - mu) / sd)


def make_scorer(cfg: dict, tr: np.ndarray):
    """Fit on rows tr; return a function rows -> scores."""
    d = dense(cfg.get("dense", []))
    emb = cfg.get("emb")
    if emb:
        pca = PCA(cfg.get("pca", 32), random_state=0).fit(blocks[emb][tr]) if cfg.get("pca") else None
        e = pca.transform(blocks[emb]) if pca else blocks[emb]
        d = np.hstack([d, e])
    if cfg.get("text"):
        x = sparse.hstack([TEXT, sparse.csr_matrix(d)], format="csr") if d.shape[1] else TEXT
        model, _ = fit_linear(x[tr], y[tr], hash_dim=HD, cfg=LinearFitConfig(c=cfg.get("c", 1.0)), calibrate=False)
        return lambda rows: model.margins(x[rows])
    if cfg.get("stats"):
        d = np.hstack([TEXT[:, HD:].toarray(), d])
    f = fit_dense(d[tr], y[tr], cfg.get("c", 1.0))
    return lambda rows: f(d[rows])


def evaluate(cfg: dict, train_sources: list[str] | None = None) -> dict:
    """LOSO (train_sources None) or train on train_sources and test on every other source."""
    out = {}
    tests = [s for s in SOURCES if train_sources is None or s not in train_sources]
    for held in tests:
        tr = np.where(src != held)[0] if train_sources is None else np.where(np.isin(src, train_sources))[0]
        te = np.where(src == held)[0]
        fn = make_scorer(cfg, tr)
        sc = fn(te)
        lookup = {id(examples[i].prompt): v for i, v in zip(te, sc)}
        rep = evaluate_router(held, [examples[i] for i in te], lambda ps: np.array([lookup[id(p)] for p in ps]))
        out[held] = {m: r.as_dict() for m, r in rep.methods.items()} | {"n": rep.num_prompts}
    return out


CONFIGS = {
    "text (shipped features)": {"text": True},
    "stats15": {"stats": True},
    "edge: nll stats": {"dense": ["nll"]},
    "edge: start entropy/top1": {"dense": ["start"]},
    "edge: decode K=4 entropy": {"dense": ["decode"]},
    "edge: scalars (nll+start+decode+ntok)": {"dense": ["nll", "start", "decode", "ntok"]},
    "edge: pooled last layer (576)": {"emb": "pooled_last", "c": 0.05},
    "edge: pooled mid layer (576)": {"emb": "pooled_mid", "c": 0.05},
    "edge: pooled last PCA32": {"emb": "pooled_last", "pca": 32},
    "edge: pooled mid PCA32": {"emb": "pooled_mid", "pca": 32},
    "edge: last-token hidden PCA32": {"emb": "last_hidden", "pca": 32},
    "stats + edge scalars": {"stats": True, "dense": ["nll", "start", "decode", "ntok"]},
    "stats + edge scalars + mid PCA32": {"stats": True, "dense": ["nll", "start", "decode", "ntok"], "emb": "pooled_mid", "pca": 32},
    "text + edge scalars": {"text": True, "dense": ["nll", "start", "decode", "ntok"]},
    "text + edge scalars + mid PCA32": {"text": True, "dense": ["nll", "start", "decode", "ntok"], "emb": "pooled_mid", "pca": 32},
    "edge: pooled mid (576) C=0.01": {"emb": "pooled_mid", "c": 0.01},
    "edge: pooled mid (576) C=0.2": {"emb": "pooled_mid", "c": 0.2},
    "edge: pooled mid (576) C=1": {"emb": "pooled_mid", "c": 1.0},
    "edge: pooled last (576) C=0.01": {"emb": "pooled_last", "c": 0.01},
    "stats + pooled mid (576) C=0.05": {"stats": True, "emb": "pooled_mid", "c": 0.05},
    "stats + edge scalars + pooled mid (576) C=0.05": {"stats": True, "dense": ["nll", "start", "decode", "ntok"], "emb": "pooled_mid", "c": 0.05},
}

def main():
    only = [a for a in sys.argv[1:] if not a.startswith("--") and not a.endswith(".json")]
    results = {}
    for name, cfg in CONFIGS.items():
        if only and not any(o in name for o in only):
            continue
        loso = evaluate(cfg)
        arena = evaluate(cfg, ["arena-hard"]) if "arena-hard" in SOURCES else {}
        results[name] = {"config": cfg, "loso": loso, "arena_only": arena}
        fmt = lambda r: " ".join(f"{s[:6]} {r[s]['router']['apgr']:.3f}" for s in r)
        m = lambda r, k="router": np.mean([r[s][k]["apgr"] for s in r])
        print(f"{name:42s} LOSO mean {m(loso):.3f} [{fmt(loso)}] | len {m(loso,'length'):.3f} rnd {m(loso,'random'):.3f}"
              + (f" | arena-only mean {m(arena):.3f} [{fmt(arena)}]" if arena else ""), flush=True)
    if not only:
        results["_null"] = null_std()
        print(results["_null"])
    if "--out" in sys.argv:
        Path(sys.argv[sys.argv.index("--out") + 1]).write_text(json.dumps(results, indent=1))


def null_std(num_seeds: int = 200) -> dict:
    """Spread of a random router's APGR per source (how much APGR moves by chance at this n)."""
    from gateway.routing.evaluate import evaluate_scores
    out = {}
    for s in SOURCES:
        te = [examples[i] for i in np.where(src == s)[0] if examples[i].strong_quality is not None and examples[i].weak_quality is not None]
        sq = np.array([e.strong_quality for e in te]); wq = np.array([e.weak_quality for e in te])
        a = [evaluate_scores(np.random.default_rng(1000 + k).random(len(te)), sq, wq).apgr for k in range(num_seeds)]
        out[s] = {"n": len(te), "random_apgr_mean": float(np.mean(a)), "random_apgr_std": float(np.std(a))}
    return out


if __name__ == "__main__":
    main()
