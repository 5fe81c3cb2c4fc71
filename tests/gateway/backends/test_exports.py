"""gateway.backends re-exports its public API with a complete, sorted __all__."""

from __future__ import annotations

import gateway.backends as backends
from gateway.backends import base, breaker, openai_http, sse


def test_all_is_sorted_and_complete():
    assert backends.__all__ == sorted(backends.__all__)
    for module in (base, breaker, openai_http, sse):
        missing = set(module.__all__) - set(backends.__all__)
        assert not missing, f"{module.__name__} exports {missing} that gateway.backends does not"
    for name in backends.__all__:
        assert hasattr(backends, name), name
