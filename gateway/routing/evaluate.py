"""RouteLLM's evaluation protocol (Ong et al., "RouteLLM: Learning to Route LLMs with Preference Data",
ICLR 2025, ``routellm/evals/evaluate.py`` and ``benchmarks.py``), reproduced exactly:

- thresholds: the 11 bin edges of ``pd.qcut(scores, 10)`` (score deciles incl. min and max); at edge i the
  strong model gets every query with score >= edge, except at the last edge where it is score > edge;
- quality at a threshold: mean per-query quality of the model each query was routed to;
- AUC: trapezoid rule over (strong share, quality); APGR = (AUC − weak·span) / ((strong − weak)·span);
- CPT(x): the strong share at which the curve reaches weak + x·(strong − weak), by linear interpolation
  (RouteLLM calls ``np.interp`` on the curve, which assumes it rises; we take the first crossing, which is
  the same number when it does and still defined when it does not);
- random router: uniform scores, metrics averaged over 10 seeds;
- the evaluation set is deduplicated against the training prompts first.

Not part of RouteLLM's protocol, added because evaluation sets are small (MT-Bench has 80 prompts): an
optional paired bootstrap over prompts gives a 95% interval for each APGR and for the router's margin over
the length baseline, on the same resamples.

Shares are fractions in [0, 1] (RouteLLM prints percentages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from gateway.routing.errors import MissingDependencyError, TrainingDataError
from gateway.routing.features import split_conversation
from gateway.routing.labels import Example, prompt_hash

NUM_THRESHOLDS = 10
NUM_RANDOM_SEEDS = 10


@dataclass(slots=True)
class RoutingMetrics:
    """APGR, CPT and ROC-AUC of one router on one evaluation set, with its quality-vs-share curve."""

    apgr: float
    cpt50: float
    cpt80: float
    roc_auc: float
    shares: np.ndarray = field(repr=False)  # [11] strong (cloud) share at each threshold, ascending
    quality: np.ndarray = field(repr=False)  # [11] mean quality at each threshold
    apgr_ci: tuple[float, float] | None = None  # 95% bootstrap interval, when asked for
    apgr_minus_length_ci: tuple[float, float] | None = None  # same resamples: this APGR − length's APGR

    def as_dict(self) -> dict:
        out: dict = {"apgr": self.apgr, "cpt50": self.cpt50, "cpt80": self.cpt80, "roc_auc": self.roc_auc}
        if self.apgr_ci is not None:
            out["apgr_ci95"] = list(self.apgr_ci)
        if self.apgr_minus_length_ci is not None:
            out["apgr_minus_length_ci95"] = list(self.apgr_minus_length_ci)
        return out


def routing_curve(
    scores: np.ndarray, strong_quality: np.ndarray, weak_quality: np.ndarray, num_thresholds: int = NUM_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """(strong shares, qualities) at the decile thresholds, sorted by share."""
    scores = np.asarray(scores, dtype=np.float64)
    thresholds = np.quantile(scores, np.linspace(0.0, 1.0, num_thresholds + 1))  # = pd.qcut(..., retbins=True)
    shares, quality = [], []
    for i, t in enumerate(thresholds):
        to_strong = scores >= t if i != len(thresholds) - 1 else scores > t
        shares.append(to_strong.mean())
        quality.append(np.where(to_strong, strong_quality, weak_quality).mean())
    order = np.argsort(shares, kind="stable")
    return np.asarray(shares)[order], np.asarray(quality)[order]


def apgr(shares: np.ndarray, quality: np.ndarray, strong: float, weak: float) -> float:
    span = shares[-1] - shares[0]
    auc = np.trapezoid(quality, shares)
    return float((auc - weak * span) / ((strong - weak) * span))


def cpt(shares: np.ndarray, quality: np.ndarray, strong: float, weak: float, pgr: float) -> float:
    """Strong share needed to recover ``pgr`` of the strong-minus-weak gap (first crossing, interpolated)."""
    target = weak + pgr * (strong - weak)
    for i in range(len(shares)):
        if quality[i] >= target:
            if i == 0 or quality[i] == quality[i - 1]:
                return float(shares[i])
            frac = (target - quality[i - 1]) / (quality[i] - quality[i - 1])
            return float(shares[i - 1] + frac * (shares[i] - shares[i - 1]))
    return float("nan")


def evaluate_scores(scores: np.ndarray, strong_quality: np.ndarray, weak_quality: np.ndarray) -> RoutingMetrics:
    """All metrics for one score vector (higher score = send to the strong/cloud model)."""
    sq, wq = np.asarray(strong_quality, float), np.asarray(weak_quality, float)
    strong, weak = sq.mean(), wq.mean()
    if not strong > weak:
        raise TrainingDataError(f"strong quality {strong:.4f} is not above weak quality {weak:.4f}: PGR undefined")
    shares, quality = routing_curve(scores, sq, wq)
    needs_strong = sq > wq
    auc = float(roc_auc_score(needs_strong, scores)) if 0 < needs_strong.sum() < len(sq) else float("nan")
    return RoutingMetrics(
        apgr=apgr(shares, quality, strong, weak),
        cpt50=cpt(shares, quality, strong, weak, 0.5),
        cpt80=cpt(shares, quality, strong, weak, 0.8),
        roc_auc=auc,
        shares=shares,
        quality=quality,
    )


def random_baseline(
    strong_quality: np.ndarray, weak_quality: np.ndarray, num_seeds: int = NUM_RANDOM_SEEDS
) -> RoutingMetrics:
    """Uniform random scores; metrics and curve averaged over ``num_seeds`` seeds."""
    runs = [
        evaluate_scores(np.random.default_rng(seed).random(len(strong_quality)), strong_quality, weak_quality)
        for seed in range(num_seeds)
    ]
    return RoutingMetrics(
        apgr=float(np.mean([r.apgr for r in runs])),
        cpt50=float(np.nanmean([r.cpt50 for r in runs])),
        cpt80=float(np.nanmean([r.cpt80 for r in runs])),
        roc_auc=float(np.mean([r.roc_auc for r in runs])),
        shares=np.mean([r.shares for r in runs], axis=0),
        quality=np.mean([r.quality for r in runs], axis=0),
    )


def bootstrap_apgr(
    scores: dict[str, np.ndarray],
    strong_quality: np.ndarray,
    weak_quality: np.ndarray,
    *,
    num_samples: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """APGR of every score vector on the same ``num_samples`` resamples of the prompts (drawn with
    replacement, so the methods are compared pairwise). Resamples where the strong model is not better on
    average have no PGR and are dropped, for all methods alike."""
    sq, wq = np.asarray(strong_quality, float), np.asarray(weak_quality, float)
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {name: [] for name in scores}
    for _ in range(num_samples):
        idx = rng.integers(0, len(sq), len(sq))
        strong, weak = sq[idx].mean(), wq[idx].mean()
        if not strong > weak:
            continue
        for name, s in scores.items():
            shares, quality = routing_curve(np.asarray(s, float)[idx], sq[idx], wq[idx])
            out[name].append(apgr(shares, quality, strong, weak))
    return {name: np.asarray(v) for name, v in out.items()}


def _interval(samples: np.ndarray) -> tuple[float, float]:
    if not len(samples):
        return float("nan"), float("nan")
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def length_scores(prompts: Sequence) -> np.ndarray:
    """The prompt-length baseline: characters of the last user turn."""
    return np.array([len(split_conversation(p)[0]) for p in prompts], dtype=np.float64)


def deduplicate(examples: list[Example], train_hashes: Iterable[int]) -> tuple[list[Example], int]:
    """Drop evaluation examples whose normalised prompt (see :func:`prompt_hash`) was trained on."""
    seen = set(int(h) for h in train_hashes)
    kept = [e for e in examples if prompt_hash(e.prompt) not in seen]
    return kept, len(examples) - len(kept)


@dataclass(slots=True)
class EvaluationReport:
    """Router beside the trivial baselines on one evaluation set."""

    name: str
    num_prompts: int
    num_removed_duplicates: int
    strong_quality: float
    weak_quality: float
    methods: dict[str, RoutingMetrics]

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "num_prompts": self.num_prompts,
            "num_removed_duplicates": self.num_removed_duplicates,
            "strong_quality": self.strong_quality,
            "weak_quality": self.weak_quality,
            "methods": {k: v.as_dict() for k, v in self.methods.items()},
        }


def evaluate_router(
    name: str,
    examples: list[Example],
    score_batch: Callable[[list], np.ndarray],
    *,
    train_hashes: Iterable[int] = (),
    extra_methods: dict[str, Callable[[list], np.ndarray]] | None = None,
    bootstrap: int = 0,
) -> EvaluationReport:
    """Score ``examples`` (which need strong/weak quality) with the router and the baselines. With
    ``bootstrap`` > 0, every scored method (not random) also gets 95% intervals from that many resamples."""
    usable = [e for e in examples if e.strong_quality is not None and e.weak_quality is not None]
    usable, removed = deduplicate(usable, train_hashes)
    if len(usable) < NUM_THRESHOLDS:
        raise TrainingDataError(f"{name}: only {len(usable)} evaluable prompts (need strong and weak quality)")
    prompts = [e.prompt for e in usable]
    sq = np.array([e.strong_quality for e in usable])
    wq = np.array([e.weak_quality for e in usable])
    scores = {"router": score_batch(prompts)}
    for method, fn in (extra_methods or {}).items():
        scores[method] = fn(prompts)
    scores["length"] = length_scores(prompts)
    methods = {method: evaluate_scores(s, sq, wq) for method, s in scores.items()}
    if bootstrap > 0:
        samples = bootstrap_apgr(scores, sq, wq, num_samples=bootstrap)
        for method, m in methods.items():
            m.apgr_ci = _interval(samples[method])
            if method != "length":
                m.apgr_minus_length_ci = _interval(samples[method] - samples["length"])
    methods["random"] = random_baseline(sq, wq)
    return EvaluationReport(name, len(usable), removed, float(sq.mean()), float(wq.mean()), methods)


def plot_report(report: EvaluationReport, path: str | Path) -> Path:
    """PNG of quality vs cloud share for every method, with the strong and weak lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError("matplotlib", "plotting evaluation curves") from exc
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, m in report.methods.items():
        ax.plot(m.shares * 100, m.quality, marker=".", label=f"{method} (APGR {m.apgr:.3f})")
    ax.axhline(report.strong_quality, color="red", linestyle="--", label="cloud (strong) only")
    ax.axhline(report.weak_quality, color="grey", linestyle="--", label="edge (weak) only")
    ax.set_xlabel("cloud (strong model) calls, %")
    ax.set_ylabel("quality")
    ax.set_title(f"{report.name}: quality vs cloud share (n={report.num_prompts})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
