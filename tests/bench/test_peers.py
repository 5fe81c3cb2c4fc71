"""The peer harness without any peer installed: protocol, timing arithmetic on a fake clock, run_peers."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from rich.console import Console

import bench.peers
from bench.peers import api, run_peer, setup
from bench.peers.run_peer import FakePeer, MeasurementError, Timeline
from bench.peers.setup import MARKER, PEERS, model_path, venv_dir

TINY = {"new_tokens": 4, "prompt_lengths": [8], "concurrency": [2], "concurrent_prompt_tokens": 4,
        "repeats": 1, "warmup": 0}


class FakeClock:
    """perf_counter stand-in that only moves when the fake peer sleeps, so every timing is exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def peer(clock: FakeClock) -> FakePeer:
    return FakePeer(prefill_s_per_token=0.001, step_s=0.01, step_s_per_sequence=0.002, sleep=clock.sleep)


def test_protocol_defaults_and_overrides():
    protocol = run_peer.validate_protocol({"new_tokens": 16})
    assert protocol["new_tokens"] == 16
    assert protocol["prompt_lengths"] == [16, 128, 512]
    assert protocol["concurrency"] == [4, 16, 64]
    assert run_peer.validate_protocol() == run_peer.DEFAULT_PROTOCOL


@pytest.mark.parametrize("overrides", [{"new_token": 64}, {"new_tokens": 1}, {"repeats": 0}, {"warmup": -1},
                                       {"prompt_lengths": [16, 0]}, {"concurrency": 4}, {"decode_prompt": ""}])
def test_protocol_rejects_bad_values(overrides):
    with pytest.raises(ValueError):
        run_peer.validate_protocol(overrides)


def test_filler_covers_the_longest_default_prompt_with_offsets():
    tokens = FakePeer().encode(run_peer.filler_text())
    assert len(run_peer.filler_prompt(tokens, 512)) == 512
    assert run_peer.filler_prompt(tokens, 32, 7) != run_peer.filler_prompt(tokens, 32, 0)
    with pytest.raises(ValueError, match="do not fit"):
        run_peer.filler_prompt(tokens, len(tokens), 1)


def test_timeline_arithmetic():
    timeline = Timeline(start=1.0, num_sequences=4, steps=[1.5, 1.6, 1.7, 1.8, 1.9])
    assert timeline.ttft_s == pytest.approx(0.5)
    assert timeline.decode_tok_per_s == pytest.approx(4 / 0.4)
    assert timeline.aggregate_tok_per_s == pytest.approx(4 * 5 / 0.9)


def test_decode_rate_excludes_prefill(peer, clock):
    protocol = run_peer.validate_protocol({"new_tokens": 64, "repeats": 3, "warmup": 1})
    result = run_peer.measure_decode(peer, protocol, clock)
    prompt_tokens = len(peer.encode(protocol["decode_prompt"]))
    assert result["prompt_tokens"] == prompt_tokens
    assert result["tok_per_s"] == pytest.approx(1 / (0.01 + 0.002), rel=1e-9)
    assert result["ttft_ms"] == pytest.approx(prompt_tokens * 0.001 * 1e3, rel=1e-9)
    assert len(result["runs_tok_per_s"]) == 3
    assert len(result["text"]) == 64


@pytest.mark.parametrize("length", [1, 16, 128, 512])
def test_prefill_ttft_and_rate(peer, clock, length):
    filler = peer.encode(run_peer.filler_text())
    result = run_peer.measure_prefill(peer, filler, length, run_peer.validate_protocol(), clock)
    assert result["ttft_ms"] == pytest.approx(length * 0.001 * 1e3, rel=1e-9)
    assert result["tok_per_s"] == pytest.approx(1 / 0.001, rel=1e-9)


@pytest.mark.parametrize("num_requests", [1, 4, 16, 64])
def test_aggregate_rate_counts_every_sequence_and_the_prefill(peer, clock, num_requests):
    protocol = run_peer.validate_protocol({"new_tokens": 32, "concurrent_prompt_tokens": 20})
    filler = peer.encode(run_peer.filler_text())
    result = run_peer.measure_concurrency(peer, filler, num_requests, protocol, clock)
    wall_s = num_requests * 20 * 0.001 + 31 * (0.01 + 0.002 * num_requests)
    assert result["supported"] is True
    assert result["tok_per_s"] == pytest.approx(num_requests * 32 / wall_s, rel=1e-9)
    assert result["ttft_ms"] == pytest.approx(num_requests * 20 * 0.001 * 1e3, rel=1e-9)


def test_batch_one_peer_reports_concurrency_as_unsupported(clock):
    peer = FakePeer(sleep=clock.sleep, max_batch_size=1)
    result = run_peer.measure_concurrency(peer, list(range(100)), 4, run_peer.validate_protocol(), clock)
    assert result["supported"] is False
    assert "tok_per_s" not in result


def test_wrong_token_count_is_a_measurement_error(peer, clock):
    def short(prompts, new_tokens, on_step):
        on_step()
        return [[1] for _ in prompts]

    peer.generate = short
    with pytest.raises(MeasurementError, match="asked for 4 tokens"):
        run_peer.timed_generate(peer, [[1, 2]], 4, clock)


def test_run_protocol_keeps_going_after_a_failing_entry(peer, clock):
    generate = peer.generate

    def fails_on_large_batches(prompts, new_tokens, on_step):
        if len(prompts) > 2:
            raise MemoryError("batch too large")
        return generate(prompts, new_tokens, on_step)

    peer.generate = fails_on_large_batches
    protocol = run_peer.validate_protocol({**TINY, "concurrency": [2, 4]})
    result = run_peer.run_protocol(peer, protocol, clock)
    assert result["concurrency"][0]["supported"] is True
    assert result["concurrency"][1] == {"error": "MemoryError: batch too large"}
    assert "tok_per_s" in result["decode"]


def test_fake_peer_script_prints_a_valid_result():
    out = subprocess.run([sys.executable, str(api.RUN_PEER), "--peer", "fake", "--protocol", json.dumps(TINY)],
                         capture_output=True, text=True, check=True, timeout=60)
    result = json.loads(out.stdout)
    run_peer.validate_result(result)
    assert result["peer"] == "fake" and result["protocol"]["new_tokens"] == 4
    assert [e["prompt_tokens"] for e in result["prefill"]] == [8]
    assert "decode batch 1" in out.stderr


def test_validate_result_rejects_missing_keys():
    with pytest.raises(ValueError, match="missing"):
        run_peer.validate_result({"schema": 1, "peer": "x"})


def test_missing_peers_are_reported_with_a_hint(tmp_path):
    results = api.run_peers(["ortgenai", "llamacpp"], {}, tmp_path, None, threads=2)
    for peer in ("ortgenai", "llamacpp"):
        assert results[peer]["status"] == "not installed"
        assert results[peer]["hint"] == f"python bench/peers/setup.py --peers {peer} --root {tmp_path}"
    assert api.detect_peers(tmp_path) == {peer: False for peer in PEERS}


def test_unknown_peer_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown peer"):
        api.run_peers(["vllm"], {}, tmp_path, None)


def fake_install(root, peer):
    """What setup.py leaves behind, minus the packages: a venv whose python is ours, a marker, a model."""
    (venv_dir(root, peer) / "bin").mkdir(parents=True)
    (venv_dir(root, peer) / "bin" / "python").symlink_to(sys.executable)
    (venv_dir(root, peer) / MARKER).write_text("{}")
    model_path(root, peer).parent.mkdir(parents=True, exist_ok=True)
    model_path(root, peer).touch()


def test_installed_peer_runs_in_a_subprocess_with_pinned_threads(tmp_path, monkeypatch):
    fake_install(tmp_path, "transformers")
    assert api.detect_peers(tmp_path)["transformers"] is True
    seen = {}

    def fake_command(peer, root, protocol, threads):
        seen["protocol"], seen["threads"] = protocol, threads
        return [sys.executable, str(api.RUN_PEER), "--peer", "fake", "--threads", str(threads),
                "--protocol", json.dumps(protocol)]

    monkeypatch.setattr(api, "peer_command", fake_command)
    results = api.run_peers(["transformers"], TINY, tmp_path, None, threads=3)
    assert results["transformers"]["status"] == "ok"
    assert results["transformers"]["threads"] == 3
    assert seen["protocol"] == run_peer.validate_protocol(TINY)
    assert api.thread_env(3)["OMP_NUM_THREADS"] == "3"


def test_a_crashing_peer_is_reported_as_failed(tmp_path, monkeypatch):
    fake_install(tmp_path, "ortgenai")
    monkeypatch.setattr(api, "peer_command", lambda *a: [sys.executable, "-c", "import sys; sys.exit('boom')"])
    result = api.run_peers(["ortgenai"], {}, tmp_path, None)["ortgenai"]
    assert result["status"] == "failed"
    assert "boom" in result["log_tail"]


def test_all_is_complete_and_sorted():
    assert bench.peers.__all__ == sorted(bench.peers.__all__)
    assert all(hasattr(bench.peers, name) for name in bench.peers.__all__)


def test_default_root_follows_the_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv(setup.CACHE_ENV, str(tmp_path))
    assert setup.default_root() == tmp_path / "peers"
    monkeypatch.delenv(setup.CACHE_ENV)
    assert setup.default_root().parts[-2:] == ("hybrid-gateway", "peers")


def test_setup_rejects_unknown_peers_and_missing_weights(tmp_path):
    console = Console(file=io.StringIO())
    with pytest.raises(setup.SetupError, match="unknown peer"):
        setup.setup(["vllm"], tmp_path, tmp_path / "x.gguf", console)
    with pytest.raises(setup.SetupError, match="GGUF not found"):
        setup.setup(["transformers"], tmp_path, tmp_path / "x.gguf", console)


def test_a_failing_step_raises_with_its_log_tail(tmp_path):
    steps = setup.Steps(tmp_path, Console(file=io.StringIO()))
    with pytest.raises(setup.SetupError, match=r"(?s)exit 3.*step-log.log.*last words"):
        steps.run("step", "step-log", [sys.executable, "-c", "print('last words'); raise SystemExit(3)"])


def test_installed_peers_are_skipped(tmp_path):
    fake_install(tmp_path, "transformers")
    (venv_dir(tmp_path, "transformers") / MARKER).write_text(
        json.dumps({"packages": list(PEERS["transformers"].packages)}))
    out = io.StringIO()
    setup.Steps(tmp_path, Console(file=out, width=200)).install_peer(PEERS["transformers"])
    assert "already there" in out.getvalue()


def test_interrupt_keeps_what_was_measured(peer, clock):
    generate = peer.generate

    def interrupted_on_batches(prompts, new_tokens, on_step):
        if len(prompts) > 1:
            raise KeyboardInterrupt
        return generate(prompts, new_tokens, on_step)

    peer.generate = interrupted_on_batches
    result = run_peer.run_protocol(peer, run_peer.validate_protocol({**TINY, "concurrency": [2, 4]}), clock)
    assert result["status"] == "partial"
    assert "tok_per_s" in result["decode"] and "ttft_ms" in result["prefill"][0]
    assert result["concurrency"] == [{"error": "interrupted"}, {"error": "skipped: interrupted"}]


def test_a_peer_past_its_timeout_returns_a_partial_result(tmp_path, monkeypatch):
    fake_install(tmp_path, "ortgenai")
    slow = {**TINY, "repeats": 400, "new_tokens": 64}  # ~2 min of fake decode: the timeout lands inside it
    monkeypatch.setattr(api, "peer_command", lambda *a: [sys.executable, str(api.RUN_PEER), "--peer", "fake",
                                                         "--protocol", json.dumps(slow)])
    result = api.run_peers(["ortgenai"], {}, tmp_path, None, timeout_s=3)["ortgenai"]
    assert result["status"] == "partial"
    assert result["timeout_s"] == 3
    assert result["decode"] == {"error": "interrupted"}
    assert result["concurrency"] == [{"error": "skipped: interrupted"}]
