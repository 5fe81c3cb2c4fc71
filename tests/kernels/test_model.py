"""Reference model on the paged cache, held to Hugging Face transformers on the same weights.

Tiny random Llama / Qwen2 checkpoints are written by the test; the real SmolLM2 GGUF golden runs
are marked slow (they load the 135M model twice).
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.attention import AttentionMetadata
from kernels.checkpoints import load_checkpoint
from kernels.generate import generate
from kernels.kv_cache.layout import KVCacheSpec
from kernels.model import TransformerModel
from kernels.sampling import SamplingParams
from tests.kernels import checkpoint_factory as factory

transformers = pytest.importorskip("transformers", reason="dev extra: pip install -e '.[dev]'")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def _tiny(tmp_path, arch: str, tied: bool, rope_scaling: dict | None = None):
    config = factory.tiny_config(arch, tie_word_embeddings=tied)
    state = factory.random_state_dict(config, seed=7)
    overrides = {"rope_scaling": rope_scaling, "max_position_embeddings": 256} if rope_scaling else None
    path = factory.write_hf_checkpoint(tmp_path / f"{arch}-{tied}", config, state, config_overrides=overrides)
    ours = TransformerModel.from_checkpoint(load_checkpoint(path), attention_impl="torch")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


def _prefill_logits(model: TransformerModel, ids: list[int], *, chunks: list[int] | None = None,
                    block_size: int = 16, shuffle: bool = False) -> torch.Tensor:
    """Logits at every position, computed in the given prefill chunks over a paged cache."""
    cfg = model.config
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks=64, block_size=block_size)
    cache = spec.allocate()
    table = list(range(spec.blocks_needed(len(ids))))
    if shuffle:
        random.Random(0).shuffle(pool := list(range(spec.num_blocks)))
        table = pool[: len(table)]
    chunks = chunks or [len(ids)]
    out, done = [], 0
    for n in chunks:
        meta = AttentionMetadata.build([table], [done], [n], block_size, "cpu")
        hidden = model(torch.tensor(ids[done:done + n]), torch.arange(done, done + n), cache, meta)
        out.append(model.compute_logits(hidden))
        done += n
    return torch.cat(out)


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.parametrize("arch, tied, rope", [
    ("llama", True, None), ("llama", False, None), ("qwen2", False, None), ("qwen2", True, None),
    ("llama", False, LLAMA3_ROPE),
])
@torch.no_grad()
def test_tiny_model_matches_transformers(tmp_path, arch, tied, rope):
    torch.manual_seed(0)
    ours, theirs = _tiny(tmp_path, arch, tied, rope)
    ids = torch.randint(0, ours.config.vocab_size, (40,)).tolist()
    expected = theirs(torch.tensor([ids])).logits[0]
    got = _prefill_logits(ours, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"{arch} tied={tied} rope={rope}")
    tokens = list(generate(ours, ids[:10], SamplingParams(temperature=0.0, max_tokens=16)))
    assert tokens == _hf_greedy(theirs, ids[:10], 16)


@torch.no_grad()
def test_chunked_prefill_and_shuffled_blocks_give_the_same_logits(tmp_path):
    ours, _ = _tiny(tmp_path, "qwen2", False)
    ids = torch.randint(0, ours.config.vocab_size, (53,), generator=torch.Generator().manual_seed(1)).tolist()
    whole = _prefill_logits(ours, ids)
    chunked = _prefill_logits(ours, ids, chunks=[17, 16, 1, 19], shuffle=True)
    decoded = _prefill_logits(ours, ids, chunks=[20] + [1] * 33, block_size=8)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5, msg="chunked prefill")
    torch.testing.assert_close(decoded, whole, atol=1e-5, rtol=1e-5, msg="token-by-token decode")


@torch.no_grad()
def test_triton_kernels_in_the_model_match_the_torch_path(tmp_path):
    ours, _ = _tiny(tmp_path, "llama", True)
    ids = torch.randint(0, ours.config.vocab_size, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = _prefill_logits(ours, ids, chunks=[18, 1, 1, 1])
    ours.attention_impl = "triton"  # CPU tensors: runs under TRITON_INTERPRET=1 (tests/conftest.py)
    got = _prefill_logits(ours, ids, chunks=[18, 1, 1, 1])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg="triton vs torch attention in the model")


def test_generate_refuses_bad_requests(tmp_path):
    from kernels.errors import InvalidRequestError

    ours, _ = _tiny(tmp_path, "llama", True)
    with pytest.raises(InvalidRequestError, match="empty"):
        list(generate(ours, [], SamplingParams()))
    too_long = [1] * ours.config.max_position_embeddings
    with pytest.raises(InvalidRequestError, match="context"):
        list(generate(ours, too_long, SamplingParams()))


def test_generate_stops_at_eos_and_max_tokens(tmp_path):
    ours, _ = _tiny(tmp_path, "llama", False)
    prompt = [5, 6, 7]
    free = list(generate(ours, prompt, SamplingParams(temperature=0.0, max_tokens=12)))
    assert len(free) == 12
    stop_at = free[4]
    first = free.index(stop_at)
    stopped = list(generate(ours, prompt, SamplingParams(temperature=0.0, max_tokens=12), eos_token_ids=(stop_at,)))
    assert stopped == free[:first]
    ignored = list(generate(ours, prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                            eos_token_ids=(stop_at,)))
    assert ignored == free


# --------------------------------------------------------------------------- real SmolLM2
SMOL_PROMPTS = [
    [{"role": "user", "content": "Write a haiku about the sea"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 17 * 23?"}],
    [{"role": "user", "content": "def fib(n):\n    # complete this Python function"}],
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    from kernels.tokenizer import Tokenizer

    ours = TransformerModel.from_checkpoint(load_checkpoint(smollm2_gguf))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    return ours, theirs, Tokenizer.from_gguf_file(smollm2_gguf)


@pytest.mark.slow
@pytest.mark.parametrize("messages", SMOL_PROMPTS, ids=["haiku", "system-math", "code"])
@torch.no_grad()
def test_smollm2_logits_match_transformers(smol, messages):
    ours, theirs, tok = smol
    ids = tok.encode_chat(messages)
    expected = theirs(torch.tensor([ids])).logits[0]
    got = _prefill_logits(ours, ids, chunks=[len(ids) - 3, 1, 1, 1])
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3, msg="SmolLM2 logits vs transformers")


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_32_greedy_tokens_match_transformers(smol):
    ours, theirs, tok = smol
    ids = tok.encode_chat(SMOL_PROMPTS[0])
    # Step 25 of this reply is a near-tie (top-2 logit margin ~0.007): transformers' own cached decode
    # flips it when generate() is given eos_token_id=None, so compare with its default configuration.
    expected = theirs.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    got = list(generate(ours, ids, SamplingParams(temperature=0.0, max_tokens=32), eos_token_ids=tok.eos_token_ids))
    assert len(expected) == 32
    assert got == expected
    text = tok.decode(got)
    assert "sea" in text.lower() or "ocean" in text.lower(), text
