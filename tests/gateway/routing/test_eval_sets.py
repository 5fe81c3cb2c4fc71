"""The RouteLLM benchmark sets in bench/router_eval_sets: readable as `scores` data, complete, and never
trained on by the shipped routers (evaluation only; see bench/router_eval_sets/README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.routing.labels import prompt_hash, read_records
from gateway.routing.router import ACCURATE_DIR, DEFAULT_DIR

SETS = Path(__file__).resolve().parents[3] / "bench" / "router_eval_sets"
STRONG, WEAK = "gpt-4-1106-preview", "mixtral-8x7b-instruct-v0.1"


@pytest.mark.parametrize(
    ("name", "rows", "strong_mean", "weak_mean"),
    [
        # GSM8K test set, all 1,319: correctness of each model's answer (RouteLLM's gsm8k_responses.csv).
        ("gsm8k", 1319, 1130 / 1319, 842 / 1319),
        # MMLU, the first 20 questions of each of the 57 subjects.
        ("mmlu-sample", 1140, 910 / 1140, 779 / 1140),
        # MT-Bench, 80 questions: GPT-4 judge score 1-10, mean of the two turns.
        ("mt-bench", 80, 9.228125, 8.340625),
    ],
)
def test_eval_set_is_complete(name, rows, strong_mean, weak_mean):
    records = read_records(SETS / f"{name}.jsonl", "scores", strong=STRONG, weak=WEAK)
    assert len(records) == rows
    assert all(isinstance(r.prompt, str) and r.prompt.strip() for r in records)
    strong = np.array([r.strong_quality for r in records])
    weak = np.array([r.weak_quality for r in records])
    assert strong.mean() == pytest.approx(strong_mean) and weak.mean() == pytest.approx(weak_mean)


def test_shipped_routers_never_trained_on_the_eval_sets():
    evaluation = {
        prompt_hash(r.prompt)
        for name in ("gsm8k", "mmlu-sample", "mt-bench")
        for r in read_records(SETS / f"{name}.jsonl", "scores")
    }
    for directory in (DEFAULT_DIR, ACCURATE_DIR):
        with np.load(directory / "weights.npz") as data:
            trained = {int(h) for h in data["training_hashes"]}
        assert len(trained) >= 250  # the arena-hard prompts
        assert not trained & evaluation
