"""Readers of ../shared/routing-data (located relative to the repo root, as CI has it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.routing.corpora import FRONTIER_MODELS, STRONG_MODEL, find_routing_data, load_source
from gateway.routing.errors import TrainingDataError
from gateway.routing.labels import build_examples

REPO_ROOT = Path(__file__).resolve().parents[3]
DATA = REPO_ROOT.parent / "shared" / "routing-data"
needs_data = pytest.mark.skipif(not (DATA / "MANIFEST.tsv").is_file(), reason=f"routing-data not at {DATA}")


@needs_data
def test_arena_hard_difficulty_labels():
    records = load_source("arena-hard", DATA)
    assert len(records) == 300
    examples = build_examples(records, label="auto", strong=STRONG_MODEL, frontier=FRONTIER_MODELS)
    labels = np.array([e.label for e in examples])
    assert 0 < labels.min() < 0.01 and 0.99 < labels.max() < 1 and abs(labels.mean() - 0.5) < 0.01
    pair = [e for e in examples if e.strong_quality is not None and e.weak_quality is not None]
    assert len(pair) > 280
    # Published means (README): gpt-4-1106 8.87, Mixtral 6.54.
    assert np.mean([e.strong_quality for e in pair]) == pytest.approx(8.85, abs=0.1)


@needs_data
def test_routerbench_shots_are_stripped():
    records = load_source("winogrande", DATA)
    assert all("\n\n" not in r.prompt for r in records[:50])
    assert all(r.prompt.count("Answer:") == 1 for r in records[:50])


def test_missing_routing_data_is_a_clear_error(tmp_path, monkeypatch):
    import gateway.routing.corpora as corpora

    monkeypatch.delenv("HYBRID_GATEWAY_ROUTING_DATA", raising=False)
    monkeypatch.setattr(corpora, "_REPO_ROOT", tmp_path / "repo")
    with pytest.raises(TrainingDataError, match="routing-data not found"):
        find_routing_data(tmp_path / "nowhere")


@needs_data
def test_unknown_source_is_a_clear_error():
    with pytest.raises(TrainingDataError, match="unknown routing-data source"):
        load_source("mt-bench", DATA)
