"""Fixtures shared by the kernels tests."""

from __future__ import annotations

import pytest

from tests.kernels.engine_helpers import build_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama behind the reference runner: (runner, tokenizer, fingerprint)."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))
