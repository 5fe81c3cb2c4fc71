"""edge.hugepages: the fused hgw graph's weights read into one huge-page mapping and handed to ONNX Runtime with
``add_initializer``: every array equals the file's tensor, gathered-only tables stay with ORT, the runner's
logits are bit for bit those of ORT's own loading, and a truncated data file is refused."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edge import hugepages, ortop
from edge.runner import OnnxRunner
from kernels import hostmem
from tests.edge.test_runner import _cache, _greedy, _varlen_steps, tiny  # noqa: F401 - the module fixture

pytestmark = pytest.mark.skipif(not ortop.available(), reason="needs a C++ compiler (edge.ortop)")


def _hgw(tiny, **kwargs) -> OnnxRunner:  # noqa: F811 - the fixture's value
    ckpt, _, root = tiny
    return OnnxRunner(ckpt, "int4", cache_root=root, layout="fused", matmul="hgw", **kwargs)


def test_arrays_equal_the_files_tensors(tiny) -> None:  # noqa: F811
    path = _hgw(tiny).model.paths[0]
    weights = hugepages.load(path)
    assert weights is not None and weights.advised == hostmem.available()
    external = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    model = onnx.load(str(path))  # with its external data
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gathered_only = {"embed_tokens", "cos_table", "sin_table"}
    assert gathered_only <= external and "l0_qkv_codes" in external
    assert set(weights.arrays) == external - gathered_only
    assert not gathered_only & set(weights.arrays)
    for name, array in weights.arrays.items():
        assert array.dtype == stored[name].dtype and array.shape == stored[name].shape, name
        np.testing.assert_array_equal(array, stored[name], err_msg=name)
    bases = {a.__array_interface__["data"][0] for a in weights.arrays.values()}
    first = min(bases)
    assert first % hostmem.HUGE_PAGE == 0  # the span of the file starts on a 2 MiB boundary
    assert max(bases) < first + weights.nbytes


def test_runner_on_huge_pages_gives_ort_loadings_logits(tiny) -> None:  # noqa: F811
    huge, plain = _hgw(tiny), _hgw(tiny, huge_pages=False)
    assert huge.huge_pages and huge.weights_huge_pages == hostmem.available()
    assert not plain.huge_pages and not plain.weights_huge_pages
    huge_cache, plain_cache = _cache(huge.config), _cache(plain.config)
    for step, batch in enumerate(_varlen_steps(huge.config.vocab_size)):
        torch.testing.assert_close(huge.execute(batch, huge_cache), plain.execute(batch, plain_cache), rtol=0, atol=0,
                                   msg=f"step {step}")
    torch.testing.assert_close(huge_cache, plain_cache, rtol=0, atol=0)
    assert _greedy(huge, [5, 17, 99, 3], 8) == _greedy(plain, [5, 17, 99, 3], 8)


def test_only_the_custom_matmul_reads_huge_page_weights(tiny) -> None:  # noqa: F811
    ckpt, _, root = tiny
    ort_matmul = OnnxRunner(ckpt, "int4", cache_root=root, layout="fused", matmul="ort")
    assert not ort_matmul.huge_pages and not ort_matmul.weights_huge_pages  # MatMulNBits prepacks its own copy


def test_truncated_data_file_is_refused(tiny, tmp_path) -> None:  # noqa: F811
    source = _hgw(tiny).model.paths[0]
    copy = tmp_path / source.name
    shutil.copy(source, copy)
    data = source.parent / f"{source.name}.data"
    (tmp_path / data.name).write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ValueError, match="shorter than"):
        hugepages.load(copy)
