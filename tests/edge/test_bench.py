"""`hybrid-gateway bench edge`'s own arithmetic and its rounds: the protocol on a tiny engine, no peers."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from edge.bench import decode_rounds_summary, run_edge_bench
from tests.edge.test_engine import _engine, edge  # noqa: F401 - the module-scoped fixture


def test_decode_rounds_summary_takes_the_median_of_per_round_ratios() -> None:
    rounds = [{"ours": 200.0, "a": 100.0, "b": 400.0}, {"ours": 180.0, "a": 120.0, "b": None},
              {"ours": 210.0, "a": 210.0, "b": 420.0}]
    summary = decode_rounds_summary(rounds)
    assert summary["ratios"] == {"a": [2.0, 1.5, 1.0], "b": [0.5, 0.5]}  # a failed peer round is left out
    assert summary["median_ratio"] == {"a": 1.5, "b": 0.5}
    assert decode_rounds_summary([{"ours": None, "a": 1.0}])["median_ratio"] == {}


def test_rounds_measure_decode_again_and_are_saved(edge, tmp_path) -> None:  # noqa: F811 - the fixture
    runner, tok, _, _ = edge
    protocol = {"new_tokens": 4, "repeats": 1, "warmup": 0, "concurrency": [2], "prompt_lengths": [8]}
    describe = {"engine": "tiny", "weights_bytes": 1000}
    report = run_edge_bench(_engine(edge), tok, describe, peers=[], protocol_overrides=protocol, out_dir=tmp_path,
                            threads=1, console=Console(quiet=True), rounds=3)
    rounds = report["decode_rounds"]["rounds"]
    assert len(rounds) == 3 and all(r["ours"] > 0 for r in rounds)
    assert rounds[0]["ours"] == report["ours"]["decode"]["tok_per_s"]
    saved = json.loads(next(tmp_path.glob("edge-*.json")).read_text())
    assert saved["decode_rounds"]["rounds"] == rounds
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        run_edge_bench(_engine(edge), tok, describe, peers=[], protocol_overrides=protocol, out_dir=tmp_path,
                       threads=1, console=Console(quiet=True), rounds=0)
