"""Training files in three formats, label construction, and clear errors for malformed files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway.routing.errors import TrainingDataError
from gateway.routing.labels import build_examples, difficulty_labels, read_records


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_pairwise_winner_names_and_battles(tmp_path):
    path = _write(
        tmp_path,
        [
            {"prompt": "a", "winner": "strong"},
            {"prompt": "a", "winner": "tie"},
            {"messages": [{"role": "user", "content": "b"}], "winner": "edge"},
            {"prompt": "c", "model_a": "big", "model_b": "small", "winner": "model_b"},
        ],
    )
    examples = build_examples(read_records(path, "pairwise", strong="big", weak="small"))
    labels = {e.prompt if isinstance(e.prompt, str) else "b": e.label for e in examples}
    assert labels == {"a": 0.75, "b": 0.0, "c": 0.0}  # repeated prompt "a" averaged


def test_scores_pair_and_difficulty_labels(tmp_path):
    rows = [{"prompt": f"p{i}", "scores": {"S": 9.0, "W": float(i), "X": float(i), "Y": 2.0 * i}} for i in range(10)]
    path = _write(tmp_path, rows)
    pair = build_examples(read_records(path, "scores", strong="S", weak="W"), label="pair", strong="S")
    assert [e.label for e in pair] == [1.0] * 9 + [0.0]
    assert [e.outcome for e in pair] == [1.0] * 9 + [0.0]
    diff = build_examples(read_records(path, "scores", strong="S", weak="W"), label="difficulty", strong="S")
    # Badness falls as i rises, so the difficulty percentile falls too; mid-ranks in (0, 1).
    np.testing.assert_allclose([e.label for e in diff], (np.arange(10)[::-1] + 0.5) / 10)
    assert diff[0].strong_quality == 9.0 and diff[0].weak_quality == 0.0


def test_difficulty_is_a_percentile_within_each_source(tmp_path):
    from gateway.routing.labels import Record

    recs = [
        Record(prompt=f"{s}{i}", source=s, scores={"m1": v * i, "m2": v * i, "m3": 0.0})
        for s, v in (("a", 1.0), ("b", 100.0))
        for i in range(4)
    ]
    labels = difficulty_labels(recs, exclude=set())
    np.testing.assert_allclose(labels[:4], labels[4:])  # scale of a source does not matter


def test_binary(tmp_path, binary_file):
    examples = build_examples(read_records(binary_file, "binary"))
    assert {e.label for e in examples} == {0.0, 1.0}


@pytest.mark.parametrize(
    ("fmt", "rows", "line", "needle"),
    [
        ("binary", [{"prompt": "ok", "label": 1}, "{not json"], 2, "invalid JSON"),
        ("binary", [{"prompt": "ok", "label": 1}, {"label": 0}], 2, "'prompt' or a 'messages'"),
        ("binary", [{"prompt": "", "label": 1}], 1, "'prompt' is empty"),
        ("binary", [{"prompt": "x", "label": 3}], 1, "'label' must be 0 or 1"),
        ("pairwise", [{"prompt": "x", "winner": "gandalf"}], 1, "unknown winner"),
        ("scores", [{"prompt": "x", "scores": {"a": "high"}}], 1, "finite number"),
        ("scores", [{"prompt": "x"}, {"prompt": "y"}], 1, "scores"),
        ("binary", [[1, 2]], 1, "JSON object"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, fmt, rows, line, needle):
    path = _write(tmp_path, rows, name="bad.jsonl")
    with pytest.raises(TrainingDataError) as info:
        read_records(path, fmt)
    assert f"bad.jsonl:{line}:" in str(info.value) and needle in str(info.value)
    assert info.value.line == line


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TrainingDataError, match="empty"):
        read_records(tmp_path / "empty.jsonl", "binary")
    with pytest.raises(TrainingDataError, match="cannot read"):
        read_records(tmp_path / "nope.jsonl", "binary")
    with pytest.raises(TrainingDataError, match="unknown format"):
        read_records(tmp_path / "empty.jsonl", "csv")  # type: ignore[arg-type]
