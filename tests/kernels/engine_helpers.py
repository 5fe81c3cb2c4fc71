"""Helpers for engine tests: a tiny random Llama behind the reference runner."""

from __future__ import annotations

import torch

from kernels.checkpoints import load_checkpoint
from kernels.engine import EngineConfig, EngineCore
from kernels.model import TransformerModel
from kernels.runner import ReferenceRunner
from kernels.sampling import SamplingParams
from kernels.tokenizer import Tokenizer
from tests.kernels import checkpoint_factory as factory


def build_tiny(directory):
    """(runner, tokenizer, fingerprint) for a tiny random tied-embedding Llama written to ``directory``."""
    config = factory.tiny_config("llama", tie_word_embeddings=True)
    path = factory.write_hf_checkpoint(directory, config, factory.random_state_dict(config, 3))
    ckpt = load_checkpoint(path)
    model = TransformerModel.from_checkpoint(ckpt, attention_impl="torch")
    return ReferenceRunner(model), Tokenizer.from_checkpoint(ckpt), ckpt.fingerprint


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_engine(tiny, **kw) -> EngineCore:
    runner, tok, fingerprint = tiny
    cfg = {"num_blocks": 64, "block_size": 4, "max_num_batched_tokens": 64, **kw}
    return EngineCore(runner, tok, EngineConfig(**cfg), fingerprint)


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 5, 17, 9, 30, 3, 12, 23][:n]
    return [torch.randint(3, 300, (k,), generator=g).tolist() for k in lengths]


def run_alone(tiny, prompts, params=GREEDY, **kw) -> list[list[int]]:
    out = []
    for p in prompts:
        engine = make_engine(tiny, **kw)
        (seq,) = engine.generate([p], params)
        out.append(seq.output_ids)
    return out


