"""Thresholds from a target cloud share (within one point on the sample) and from a quality target."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.routing.calibrate import threshold_for_cloud_share, threshold_for_quality
from gateway.routing.errors import CalibrationError

from .conftest import synthetic_prompts


@pytest.mark.parametrize("share", [0.0, 0.05, 0.2, 0.37, 0.5, 0.8, 1.0])
def test_cloud_share_hits_target_on_router_scores(trained_router, share):
    prompts, _ = synthetic_prompts(500, seed=7)
    scores = trained_router.score_batch(prompts)
    t = threshold_for_cloud_share(scores, share)
    achieved = np.mean([trained_router.score(p) >= t for p in prompts])
    assert abs(achieved - share) <= 0.01, (share, achieved)


def test_cloud_share_on_continuous_scores_is_exact():
    scores = np.random.default_rng(0).random(1000)
    for share in (0.1, 0.333, 0.9):
        assert np.mean(scores >= threshold_for_cloud_share(scores, share)) == pytest.approx(share, abs=0.001)


def test_quality_target_finds_smallest_share():
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    strong, weak = np.ones(4), np.array([0.0, 0.0, 1.0, 1.0])
    t, share = threshold_for_quality(scores, strong, weak, target_pgr=1.0)
    assert share == 0.5 and 0.7 < t <= 0.8
    t, share = threshold_for_quality(scores, strong, weak, target_pgr=0.5)
    assert share == 0.25


def test_bad_targets_raise():
    with pytest.raises(CalibrationError):
        threshold_for_cloud_share(np.ones(3), 1.5)
    with pytest.raises(CalibrationError):
        threshold_for_quality(np.ones(3), np.zeros(3), np.ones(3), 0.5)
