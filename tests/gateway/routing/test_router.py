"""Router API: score/decide, train → save → load round trip, artefact safety, public surface."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gateway.routing as routing
from gateway.routing import ArtefactError, EmptyPromptError, RouteDecision, RouterError, default_router, load_router

from .conftest import synthetic_prompts


def test_all_is_sorted_and_complete():
    assert routing.__all__ == sorted(routing.__all__)
    for name in routing.__all__:
        assert hasattr(routing, name), name
    exported_classes = {n for n in dir(routing) if not n.startswith("_") and isinstance(getattr(routing, n), type)}
    assert exported_classes <= set(routing.__all__)
    assert {"Router", "RouteDecision", "RouterError", "default_router", "load_router"} <= set(routing.__all__)


def test_round_trip_gives_identical_scores(trained_router, tmp_path):
    prompts, _ = synthetic_prompts(50, seed=3)
    trained_router.save(tmp_path / "r")
    loaded = load_router(tmp_path / "r")
    before = np.array([trained_router.score(p) for p in prompts])
    after = np.array([loaded.score(p) for p in prompts])
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(loaded.score_batch(prompts), after, rtol=0, atol=1e-12)
    assert loaded.threshold == trained_router.threshold
    np.testing.assert_array_equal(loaded.training_hashes, trained_router.training_hashes)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["threshold_semantics"]["kind"] == "direct"
    assert "versions" in manifest and "score_semantics" in manifest


def test_router_learns_the_synthetic_rule(trained_router):
    prompts, probs = synthetic_prompts(200, seed=11)
    scores = trained_router.score_batch(prompts)
    assert scores[probs > 0.5].mean() > scores[probs < 0.5].mean() + 0.3
    assert ((scores >= 0.5) == (probs > 0.5)).mean() > 0.95


def test_messages_use_last_user_turn_plus_context(trained_router):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "say hello"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "prove the theorem"}]},
    ]
    s_conv = trained_router.score(messages)
    assert s_conv == pytest.approx(trained_router.score_batch([messages])[0], abs=1e-12)
    assert s_conv > trained_router.score("say hello")
    # The query's n-grams come from the last user turn only; the context enters through the statistics.
    with_context = trained_router.extractor.transform_one(messages)
    alone = trained_router.extractor.transform_one("prove the theorem")
    hash_dim = trained_router.spec.hash_dim
    np.testing.assert_array_equal(with_context[:hash_dim], alone[:hash_dim])
    assert (with_context[hash_dim:] != alone[hash_dim:]).sum() == 2  # log_turns, log_context_chars


def test_decide(trained_router):
    d = trained_router.decide("prove the theorem in detail")
    assert isinstance(d, RouteDecision) and d.tier == "cloud" and d.score >= d.threshold
    assert "threshold" in d.reason
    assert trained_router.decide("say hello").tier == "edge"


@pytest.mark.parametrize(
    "bad", ["", "   \n", [], [{"role": "user", "content": ""}], [{"role": "assistant", "content": "hi"}]]
)
def test_empty_prompts_raise_clear_error(trained_router, bad):
    with pytest.raises(EmptyPromptError, match="empty|no user"):
        trained_router.score(bad)


def test_wrong_types_raise_router_error(trained_router):
    with pytest.raises(RouterError):
        trained_router.score(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        trained_router.threshold = 1.5


def test_tampered_or_missing_artefact_is_refused(trained_router, tmp_path):
    with pytest.raises(ArtefactError, match="not a router directory"):
        load_router(tmp_path)
    d = trained_router.save(tmp_path / "r")
    data = bytearray((d / "weights.npz").read_bytes())
    data[-30] ^= 0xFF
    (d / "weights.npz").write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match="sha256"):
        load_router(d)


def test_default_router_loads_and_scores():
    router = default_router()
    assert router.manifest["training"]["sources"] == ["arena-hard"]
    s = router.score("What is the capital of France?")
    assert 0.0 < s < 1.0
    assert router.decide("hi").tier in ("edge", "cloud")
