"""``bench cloud`` on a tiny random Llama at TP=1 and TP=2: the report's shape, never its speed."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from cloud.bench import CloudBenchConfig, default_tp_degrees, make_prompts, run_cloud_bench, threads_per_rank
from cloud.parallel import COLLECTIVES, COMM_TIMER
from gateway.cli import main
from kernels.checkpoints import load_checkpoint
from kernels.tokenizer import Tokenizer
from tests.cloud import tp_helpers as helpers

TINY = {"new_tokens": 4, "concurrency": (1, 3), "prompt_lengths": (16, 40), "prompt_range": (4, 12), "repeats": 2,
        "threads": 2, "max_num_batched_tokens": 32, "kv_cache_mb": 1, "attention_impl": "torch"}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return helpers.write_variant(tmp_path_factory.mktemp("bench"), "llama-hf-tied")


@pytest.fixture(scope="module")
def bench(path, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("results")
    console = Console(file=io.StringIO(), width=200)
    report = run_cloud_bench(CloudBenchConfig(model=str(path), tp=(1, 2), **TINY), out_dir=out_dir, console=console)
    return report, out_dir, console.file.getvalue()


def test_writes_json_and_png_and_prints_the_tables(bench):
    report, out_dir, printed = bench
    json_path, png_path = (out_dir / f for f in sorted(p.name for p in out_dir.iterdir()))
    assert json_path.suffix == ".json" and png_path.suffix == ".png" and png_path.stat().st_size > 0
    assert json_path.name.startswith("cloud-") and report["files"] == [str(json_path), str(png_path)]
    saved = json.loads(json_path.read_text())
    assert {"machine", "model", "config", "results", "ratios"} <= saved.keys()
    assert {"cpu", "cpu_count", "torch", "gpu"} <= saved["machine"].keys()
    assert saved["model"]["name"] == "llama-hf-tied" and saved["config"]["tp"] == [1, 2]
    assert "bench cloud" in printed and "TP=2 / TP=1" in printed and "per step on rank 0" in printed
    assert helpers.live_children() == [] and not COMM_TIMER.enabled


def test_every_rate_is_positive_and_threads_are_split_over_the_ranks(bench):
    report = bench[0]
    assert [r["tp"] for r in report["results"]] == [1, 2]
    assert [(r["threads_per_rank"], r["total_threads"]) for r in report["results"]] == [(2, 2), (1, 2)]
    for res in report["results"]:
        assert res["dtype"] == "float32"
        assert res["decode"]["tok_per_s"] > 0 and res["decode"]["achieved_gb_s_per_rank"] > 0
        assert [c["num_requests"] for c in res["concurrency"]] == [1, 3]
        assert all(c["tok_per_s"] > 0 and c["ttft_ms_p50"] > 0 for c in res["concurrency"])
        assert [p["prompt_tokens"] for p in res["prefill"]] == [16, 40]
        assert all(p["ttft_ms"] > 0 and p["tok_per_s"] > 0 for p in res["prefill"])
    ratios = report["ratios"]["tp2_over_tp1"]
    assert {"decode_b1_tok_per_s", "aggregate_3_tok_per_s", "ttft_40_ms", "prefill_16_tok_per_s"} <= ratios.keys()
    assert all(v > 0 for v in ratios.values())


def test_communication_is_timed_only_with_tensor_parallelism(bench):
    tp1, tp2 = bench[0]["results"]
    assert set(tp1["per_step"]) == {"decode_b1", "concurrency_1", "concurrency_3", "prefill_16", "prefill_40"}
    for name, split in tp1["per_step"].items():
        assert split["steps"] > 0 and split["step_ms"] > 0 and split["compute_ms"] > 0, name
        assert split["comm_ms"] == 0 and sum(split["calls_per_step"].values()) == 0, name
        assert len(split["ranks"]) == 1
    for name, split in tp2["per_step"].items():
        assert split["comm_ms"] > 0 and split["comm_fraction"] > 0, name
        assert set(split["comm_by_kind_ms"]) == set(COLLECTIVES)
        # Per step: the batch's header and payload, 1 + 2 per layer all-reduces (2 layers); a logits gather
        # unless no sequence samples (a first prefill chunk).
        assert split["calls_per_step"]["broadcast"] == 2 and split["calls_per_step"]["all_reduce"] == 5, name
        worker = split["ranks"][1]
        assert worker["steps"] == split["steps"] and worker["comm_ms"] > 0 and worker["forward_ms"] > 0, name
    assert tp2["per_step"]["decode_b1"]["calls_per_step"]["gather"] == 1
    # Prefill of 40 tokens with a 32-token budget takes two steps; 16 tokens, one.
    assert tp2["per_step"]["prefill_40"]["steps"] == 2 * 2 and tp2["per_step"]["prefill_16"]["steps"] == 2


def test_defaults_and_helpers(path):
    checkpoint = load_checkpoint(path)
    assert default_tp_degrees(checkpoint.config) == (1, 2)
    assert [threads_per_rank(tp, 2) for tp in (1, 2, 3)] == [2, 1, 1]
    prompts = make_prompts(Tokenizer.from_checkpoint(checkpoint), [5, 40, 7], checkpoint.config.vocab_size)
    assert [len(p) for p in prompts] == [5, 40, 7] and len({tuple(p[:5]) for p in prompts}) == 3


@pytest.mark.parametrize("bad", [{"repeats": 0}, {"concurrency": ()}, {"tp": (0,)}, {"dtype": "int8"},
                                 {"prompt_range": (9, 3)}, {"threads": 0}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        CloudBenchConfig(**bad)


def test_cli_maps_flags_onto_the_config(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("cloud.bench.run_cloud_bench", lambda cfg, **kw: seen.update(cfg=cfg, **kw))
    argv = ["bench", "cloud", "--model", "m.gguf", "--tp", "1,3", "--dtype", "bfloat16", "--new-tokens", "9",
            "--concurrency", "2,8", "--prompt-lengths", "32", "--repeats", "2", "--threads", "4",
            "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    assert seen["cfg"] == CloudBenchConfig(model="m.gguf", tp=(1, 3), dtype="bfloat16", new_tokens=9,
                                           concurrency=(2, 8), prompt_lengths=(32,), repeats=2, threads=4)
    assert seen["out_dir"] == tmp_path
    assert main(["bench", "cloud", "--quick", "--out-dir", str(tmp_path)]) == 0
    assert seen["cfg"] == CloudBenchConfig.quick()
    assert main(["bench", "cloud", "--repeats", "0"]) == 2
