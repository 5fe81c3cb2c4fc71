"""RouteLLM's protocol reproduces hand-computed APGR/CPT; random ≈ 0.5; dedup drops trained prompts."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.routing.evaluate import (
    apgr,
    bootstrap_apgr,
    cpt,
    deduplicate,
    evaluate_router,
    evaluate_scores,
    random_baseline,
    routing_curve,
)
from gateway.routing.labels import Example, prompt_hash


def test_oracle_on_four_prompts_matches_hand_computation():
    # Weak model fails the two highest-scoring prompts; the strong model never fails.
    # Deciles of [.1,.2,.3,.4] give shares {1, .75, .5, .25, 0} with qualities {1, 1, 1, .75, .5}:
    # AUC = .15625 + .21875 + .25 + .25 = .875, so APGR = (.875 - .5) / (1 - .5) = .75.
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    strong, weak = np.ones(4), np.array([1.0, 1.0, 0.0, 0.0])
    shares, quality = routing_curve(scores, strong, weak)
    np.testing.assert_allclose(np.unique(shares), [0, 0.25, 0.5, 0.75, 1.0])
    m = evaluate_scores(scores, strong, weak)
    assert m.apgr == pytest.approx(0.75)
    assert m.cpt50 == pytest.approx(0.25)  # quality .75 is first reached at share .25
    assert m.cpt80 == pytest.approx(0.40)  # .9 lies 60% of the way from (.25, .75) to (.5, 1.0)
    assert m.roc_auc == pytest.approx(1.0)


def test_reversed_oracle_is_worst():
    scores = np.array([0.4, 0.3, 0.2, 0.1])
    m = evaluate_scores(scores, np.ones(4), np.array([1.0, 1.0, 0.0, 0.0]))
    assert m.apgr == pytest.approx(0.25)
    assert m.roc_auc == pytest.approx(0.0)


def test_random_router_is_about_half():
    rng = np.random.default_rng(12345)  # not a seed the baseline uses, or its scores would be the oracle
    weak = (rng.random(4000) < 0.5).astype(float)
    m = random_baseline(np.ones(4000), weak)
    assert m.apgr == pytest.approx(0.5, abs=0.02)
    assert m.cpt50 == pytest.approx(0.5, abs=0.05)
    assert m.roc_auc == pytest.approx(0.5, abs=0.02)


def test_apgr_and_cpt_on_a_straight_line():
    shares = np.linspace(0, 1, 11)
    quality = 2 + shares  # weak 2, strong 3, linear in between
    assert apgr(shares, quality, 3.0, 2.0) == pytest.approx(0.5)
    assert cpt(shares, quality, 3.0, 2.0, 0.8) == pytest.approx(0.8)


def test_dedup_drops_training_prompts_and_report_has_baselines():
    examples = [
        Example(prompt=f"Prompt number {i}", source="s", label=0.0, strong_quality=1.0, weak_quality=float(i % 2))
        for i in range(40)
    ]
    kept, removed = deduplicate(examples, [prompt_hash("  prompt NUMBER 3 ")])
    assert removed == 1 and len(kept) == 39
    report = evaluate_router(
        "s", examples, lambda ps: np.arange(len(ps), dtype=float), train_hashes=[prompt_hash("prompt number 3")]
    )
    assert report.num_removed_duplicates == 1
    assert set(report.methods) == {"router", "length", "random"}


def _two_tier_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n prompts, the weak model fails a third of them; the 'difficulty' says which (with noise)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    weak = (difficulty + 0.3 * rng.standard_normal(n) < 0.67).astype(float)
    return difficulty, np.ones(n), weak


def test_bootstrap_intervals_cover_the_estimate_and_are_paired():
    difficulty, strong, weak = _two_tier_set(300, seed=7)
    examples = [
        Example(prompt="x" * (1 + i % 17), source="s", label=0.0, strong_quality=s, weak_quality=w)
        for i, (s, w) in enumerate(zip(strong, weak, strict=True))
    ]
    by_prompt_order = iter(difficulty)
    report = evaluate_router("s", examples, lambda ps: np.array([next(by_prompt_order) for _ in ps]), bootstrap=400)
    router, length = report.methods["router"], report.methods["length"]
    assert router.apgr_ci[0] < router.apgr < router.apgr_ci[1]
    assert length.apgr_ci[0] < length.apgr < length.apgr_ci[1]
    # The router knows the difficulty, length (the prompt index mod 17) does not: the paired margin is positive.
    assert router.apgr_minus_length_ci[0] > 0.05
    assert length.apgr_minus_length_ci is None and report.methods["random"].apgr_ci is None
    d = report.as_dict()["methods"]
    assert d["router"]["apgr_ci95"] == list(router.apgr_ci) and "apgr_ci95" not in d["random"]
    # Without bootstrap nothing changes in the point estimates and no interval is reported.
    by_prompt_order = iter(difficulty)
    plain = evaluate_router("s", examples, lambda ps: np.array([next(by_prompt_order) for _ in ps]))
    assert plain.methods["router"].apgr == router.apgr and plain.methods["router"].apgr_ci is None


def test_bootstrap_is_paired_and_narrows_with_more_prompts():
    widths = []
    for n in (100, 1600):
        difficulty, strong, weak = _two_tier_set(n, seed=3)
        samples = bootstrap_apgr({"a": difficulty, "b": difficulty.copy()}, strong, weak, num_samples=300, seed=1)
        np.testing.assert_array_equal(samples["a"], samples["b"])  # same resamples for every method
        lo, hi = np.percentile(samples["a"], [2.5, 97.5])
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 4x narrower for 16x the prompts
