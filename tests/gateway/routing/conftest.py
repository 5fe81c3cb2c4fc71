"""Synthetic routing data: 'hard' prompts (proofs, code, optimisation) need the cloud, 'easy' ones do not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.routing.features import FeatureSpec
from gateway.routing.labels import Example
from gateway.routing.train import fit_router

HARD = [
    "prove the theorem",
    "derive the gradient",
    "optimize this sql query",
    "write a compiler pass",
    "find the bug in this rust code",
]
EASY = ["say hello", "what is the capital of france", "translate cat to spanish", "name a colour", "thank you"]
FILLER = ["please", "quickly", "for my class", "in detail", "today", "carefully"]


def synthetic_prompts(num_prompts: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Prompts and their P(edge loses): hard stems near 0.9, easy stems near 0.1."""
    rng = np.random.default_rng(seed)
    prompts, probs = [], []
    for i in range(num_prompts):
        hard = i % 2 == 0
        stem = HARD[rng.integers(len(HARD))] if hard else EASY[rng.integers(len(EASY))]
        tail = " ".join(rng.choice(FILLER, size=int(rng.integers(0, 5))))
        prompts.append(f"{stem} {tail} #{i}".strip())
        probs.append(0.9 if hard else 0.1)
    return prompts, np.array(probs)


@pytest.fixture(scope="session")
def small_spec() -> FeatureSpec:
    return FeatureSpec(hash_dim=2**12)


@pytest.fixture(scope="session")
def synthetic_examples() -> list[Example]:
    prompts, probs = synthetic_prompts(240, seed=0)
    rng = np.random.default_rng(1)
    examples = []
    for p, pr in zip(prompts, probs, strict=True):
        strong_wins = rng.random() < pr
        examples.append(
            Example(
                prompt=p,
                source="synthetic",
                label=float(strong_wins),
                strong_quality=1.0,
                weak_quality=float(not strong_wins),
            )
        )
    return examples


@pytest.fixture(scope="session")
def trained_router(synthetic_examples, small_spec):
    return fit_router(synthetic_examples, spec=small_spec, show_progress=False)


@pytest.fixture()
def binary_file(tmp_path: Path, synthetic_examples) -> Path:
    path = tmp_path / "labels.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": i, "prompt": e.prompt, "label": int(e.label)}) + "\n"
            for i, e in enumerate(synthetic_examples)
        )
    )
    return path
