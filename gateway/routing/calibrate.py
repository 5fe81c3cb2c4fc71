"""Choosing the threshold, three ways; the chosen way is recorded in the router manifest.

- ``direct``: a number in [0, 1] (the score is a probability, so 0.5 = "cloud when the edge more likely loses").
- ``cloud_share``: the threshold that sends a target share of a traffic sample to the cloud
  (RouteLLM's "calibrate on a sample" mode).
- ``quality``: on labelled data, the smallest cloud share whose quality recovers a target fraction of the
  strong-minus-weak gap (PGR), and the threshold that gives it.

Routing rule everywhere: cloud when ``score >= threshold``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gateway.routing.errors import CalibrationError


def threshold_for_cloud_share(scores: np.ndarray, cloud_share: float) -> float:
    """Threshold sending ``cloud_share`` of ``scores`` to the cloud (exact up to ties in the scores)."""
    if not 0.0 <= cloud_share <= 1.0:
        raise CalibrationError(f"cloud share must be in [0, 1], got {cloud_share}")
    scores = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if len(scores) == 0:
        raise CalibrationError("cannot calibrate on an empty sample")
    k = int(round(cloud_share * len(scores)))
    if k == 0:
        return float(min(np.nextafter(scores[0], np.inf), 1.0))
    if k == len(scores):
        return float(scores[-1])
    # Halfway between the k-th and (k+1)-th highest scores: robust to float noise on new traffic.
    return float((scores[k - 1] + scores[k]) / 2) if scores[k - 1] > scores[k] else float(scores[k - 1])


def threshold_for_quality(
    scores: np.ndarray, strong_quality: np.ndarray, weak_quality: np.ndarray, target_pgr: float
) -> tuple[float, float]:
    """(threshold, cloud share) reaching ``target_pgr`` of the strong-minus-weak quality gap on labelled data."""
    if not 0.0 <= target_pgr <= 1.0:
        raise CalibrationError(f"target PGR must be in [0, 1], got {target_pgr}")
    scores = np.asarray(scores, dtype=np.float64)
    sq, wq = np.asarray(strong_quality, float), np.asarray(weak_quality, float)
    if not sq.mean() > wq.mean():
        raise CalibrationError("strong quality is not above weak quality on this data: a quality target is meaningless")
    order = np.argsort(-scores, kind="stable")
    # quality[k] = mean quality when the k highest-scoring prompts go to the cloud
    quality = (wq.sum() + np.concatenate([[0.0], np.cumsum((sq - wq)[order])])) / len(scores)
    pgr = (quality - wq.mean()) / (sq.mean() - wq.mean())
    reached = np.flatnonzero(pgr >= target_pgr - 1e-12)
    k = int(reached[0])
    share = k / len(scores)
    return threshold_for_cloud_share(scores, share), share


def semantics(kind: str, **details: Any) -> dict[str, Any]:
    """The manifest record of how a threshold was chosen."""
    meaning = {
        "direct": "set directly",
        "cloud_share": "sends the target share of the calibration sample to the cloud",
        "quality": "smallest cloud share reaching the target PGR on the labelled calibration data",
    }[kind]
    return {"kind": kind, "meaning": meaning, "rule": "cloud if score >= threshold", **details}
