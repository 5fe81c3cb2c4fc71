"""The one dtype -> (atol, rtol) table kernel tests compare with. Widen explicitly (fp8, int4), never inline.

Attention outputs are softmax-weighted means of values of order 1, so the bound is a few output ulps:
float32 differs from the reference only by summation order; float16/bfloat16 kernels also round the
probabilities to the input dtype before the P @ V product (as FlashAttention does) and round the output.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}

EXACT: dict[str, float] = {"atol": 0.0, "rtol": 0.0}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``assert_close`` keyword arguments for comparing an op's output in ``dtype`` with its reference."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for {dtype}; add it to tests/kernels/tolerances.py") from None
