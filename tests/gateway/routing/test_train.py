"""Leave-one-source-out and k-fold CV on synthetic sources; scores-format training through the CLI."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from gateway.routing.bench import bench_app
from gateway.routing.cli import app
from gateway.routing.labels import Example
from gateway.routing.router import load_router
from gateway.routing.train import cross_validate, leave_one_source_out

from .conftest import synthetic_prompts


def _two_sources() -> list[Example]:
    examples = []
    for source, seed in (("a", 0), ("b", 1)):
        prompts, probs = synthetic_prompts(120, seed=seed)
        for p, pr in zip(prompts, probs, strict=True):
            examples.append(
                Example(f"{source}: {p}", source, float(pr > 0.5), 1.0, float(pr < 0.5), outcome=float(pr > 0.5))
            )
    return examples


def test_leave_one_source_out_generalises_on_shared_rule(small_spec):
    reports = leave_one_source_out(_two_sources(), spec=small_spec, show_progress=False)
    assert [r.name for r in reports] == ["a", "b"]
    for r in reports:
        assert r.methods["router"].apgr > 0.7 > r.methods["random"].apgr  # the oracle is 0.75 here


def test_cross_validate(small_spec):
    report = cross_validate(_two_sources(), num_folds=4, spec=small_spec)
    assert report.num_prompts == 240 and report.methods["router"].roc_auc > 0.95


def test_train_scores_format_with_difficulty_labels(tmp_path):
    rng = np.random.default_rng(0)
    prompts, probs = synthetic_prompts(150, seed=4)
    path = tmp_path / "scores.jsonl"
    with path.open("w") as f:
        for p, pr in zip(prompts, probs, strict=True):
            weak = {m: float(rng.random() > pr) for m in ("w1", "w2", "w3")}
            f.write(json.dumps({"prompt": p, "scores": {"big": 1.0, **weak}}) + "\n")
    runner = CliRunner()
    out = tmp_path / "r"
    args = ["train", "--data", str(path), "--format", "scores", "--strong", "big", "--weak", "w1", "--out", str(out)]
    result = runner.invoke(app, [*args, "--hash-dim", "4096"])
    assert result.exit_code == 0, result.output
    router = load_router(out)
    assert router.manifest["training"]["calibrated_on"] == "pair outcomes"
    assert router.manifest["training"]["data"][0]["label"] == "difficulty"  # auto: three or more models
    assert router.score("prove the theorem") > router.score("say hello")
    bench = runner.invoke(
        bench_app, ["--router", str(out), "--num-prompts", "100", "--output", str(tmp_path / "b.json")]
    )
    assert bench.exit_code == 0, bench.output
    assert json.loads((tmp_path / "b.json").read_text())["single"]["p50_us"] > 0
