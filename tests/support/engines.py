"""Small real engines for HTTP tests: the tiny random Llama behind the reference runner."""

from __future__ import annotations

from kernels.async_engine import AsyncEngine
from tests.kernels.engine_helpers import make_engine


class TinyServedEngine(AsyncEngine):
    """An AsyncEngine with what servers read from an engine: ``tokenizer`` and ``model_id``."""

    def __init__(self, tiny, model_id: str = "tiny-llama", name: str = "tiny", **engine_kw) -> None:
        core = make_engine(tiny, **{"num_blocks": 128, **engine_kw})
        super().__init__(core, name=name)
        self.tokenizer = tiny[1]
        self.model_id = model_id
