"""hybrid_gateway::BlockQuantMatMul (edge/csrc/block_quant_gemm.h) against its numpy reference over a grid of
shapes, in both the SIMD build and the portable one; the weight layout byte by byte; GGUF blocks taken exactly;
bad inputs refused; and whole tiny GGUF models on it tracking the reference model."""

from __future__ import annotations

import itertools
import json

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from onnx import TensorProto, helper, numpy_helper

from edge import blockquant as bq
from edge import ortop
from edge.bench import decode_bytes_per_token
from edge.builder import RESCORE_TOP, BuildOptions
from edge.runner import OnnxRunner
from tests.edge.test_repack import tiny_gguf  # noqa: F401 - the module-scoped fixture
from tests.edge.test_runner import _cache, _greedy, _varlen_steps

pytestmark = pytest.mark.skipif(not ortop.available(), reason="needs a C++ compiler (edge.ortop)")


def _session(w: bq.BlockQuantWeight, threads: int = 2, library: str | None = None, *, k: int | None = None,
             n: int | None = None, bits: int | None = None, arrays=None) -> ort.InferenceSession:
    codes, scales, mins = arrays or w.packed()
    inits = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales")]
    inputs = ["x", "codes", "scales"]
    if mins is not None:
        inits.append(numpy_helper.from_array(mins, "mins"))
        inputs.append("mins")
    node = helper.make_node("BlockQuantMatMul", inputs, ["y"], domain=ortop.DOMAIN, K=k or w.k, N=n or w.n,
                            bits=bits or w.bits)
    return _one_node_session(node, ["x"], inits, library, threads)


def _one_node_session(node: onnx.NodeProto, graph_inputs: list[str], inits: list, library: str | None,
                      threads: int = 2) -> ort.InferenceSession:
    """A session of the single ``node`` (float inputs ``graph_inputs``, float outputs) with the op library."""
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, None)
                                            for i in graph_inputs],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                  helper.make_opsetid(ortop.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(library or str(ortop.library_path()))
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _check(w: bq.BlockQuantWeight, x: np.ndarray, **kwargs) -> None:
    got = _session(w, **kwargs).run(None, {"x": x})[0]
    expected = bq.reference_matmul(x, w)
    assert got.shape == (*x.shape[:-1], w.n)
    # The integer block sums are exact; only the float sums over blocks run in another order.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


GRID = list(itertools.product((4, 8), (1, 3, 4, 5, 17, 40), (32, 70, 96, 576), (1, 7, 8, 64, 200)))


@pytest.mark.parametrize("bits, m, k, n", GRID, ids=[f"b{b}-m{m}-k{k}-n{n}" for b, m, k, n in GRID])
def test_op_matches_reference_on_grid(bits: int, m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + m * 100 + k + n)
    w = bq.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, bits)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 30, size=(m, 1)).astype(np.float32)
    x[0, : min(k, 5)] = 0.0  # a partly zero block
    _check(w, x, threads=2 if m * n >= 64 else 1)


@pytest.mark.parametrize("bits", [4, 8])
def test_op_takes_any_leading_shape_and_zero_rows(bits: int) -> None:
    rng = np.random.default_rng(3)
    w = bq.quantize(rng.standard_normal((24, 64)).astype(np.float32), bits)
    _check(w, rng.standard_normal((2, 3, 64)).astype(np.float32))
    assert _session(w).run(None, {"x": np.zeros((0, 64), np.float32)})[0].shape == (0, 24)
    zero = _session(w).run(None, {"x": np.zeros((3, 64), np.float32)})[0]
    np.testing.assert_array_equal(zero, np.zeros((3, 24), np.float32))


def _prologue_session(w: bq.BlockQuantWeight, prologue: int, gamma: np.ndarray | None = None, *, skip: bool = False,
                      keep_sum: bool = False, library: str | None = None, eps: float = 1e-5) -> ort.InferenceSession:
    """BlockQuantMatMul with prologue 1 (RMSNorm: inputs x (+ skip), gamma; output 1 = x + skip with keep_sum)
    or 2 (SwiGLU: x [..., 2K]); the unused mins slot of an 8-bit weight is left empty ("")."""
    codes, scales, mins = w.packed()
    inits = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales")]
    inputs = ["x", "codes", "scales", ""]
    if mins is not None:
        inits.append(numpy_helper.from_array(mins, "mins"))
        inputs[3] = "mins"
    graph_inputs = ["x"]
    outputs = ["y"]
    if gamma is not None:
        inits.append(numpy_helper.from_array(gamma, "gamma"))
        inputs.append("gamma")
    if skip:
        inputs.append("skip")
        graph_inputs.append("skip")
    if keep_sum:
        outputs.append("sum")
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("BlockQuantMatMul", inputs, outputs, domain=ortop.DOMAIN, K=w.k, N=w.n, bits=w.bits,
                            prologue=prologue, epsilon=eps)
    return _one_node_session(node, graph_inputs, inits, library)


def _rms_norm(s: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    return (s / np.sqrt(np.mean(s.astype(np.float64) ** 2, axis=-1, keepdims=True) + eps) * gamma).astype(np.float32)


def _swiglu(gu: np.ndarray) -> np.ndarray:
    gate, up = np.split(gu.astype(np.float64), 2, axis=-1)
    return (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    # The prologue's float row may differ from numpy's in the last bit, which can move one int8 activation code
    # by one step (~1/127 of its block's largest value); a wrong prologue is off by O(1) of the output's range.
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=3e-3 * np.abs(expected).max())


PROLOGUE_GRID = list(itertools.product((4, 8), (1, 5, 9), (64, 96, 576), (False, True)))


@pytest.mark.parametrize("bits, m, k, skip", PROLOGUE_GRID, ids=[f"b{b}-m{m}-k{k}-{'skip' if s else 'x'}"
                                                                 for b, m, k, s in PROLOGUE_GRID])
def test_rms_norm_prologue_matches_norm_then_matmul(bits: int, m: int, k: int, skip: bool) -> None:
    rng = np.random.default_rng(bits + m + k + skip)
    w = bq.quantize(rng.standard_normal((40, k)).astype(np.float32) * 0.05, bits)
    gamma = rng.uniform(0.2, 2.0, k).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32) * 3
    r = rng.standard_normal((m, k)).astype(np.float32) * 5
    feeds = {"x": x, "skip": r} if skip else {"x": x}
    outs = _prologue_session(w, 1, gamma, skip=skip, keep_sum=skip).run(None, feeds)
    s = x + r if skip else x
    _close(outs[0], bq.reference_matmul(_rms_norm(s, gamma, 1e-5), w))
    if skip:
        np.testing.assert_array_equal(outs[1], s)  # the residual stream, bit for bit


@pytest.mark.parametrize("bits, m, k", [(4, 1, 64), (4, 5, 576), (8, 3, 96), (4, 9, 1536)])
def test_swiglu_prologue_matches_activation_then_matmul(bits: int, m: int, k: int) -> None:
    rng = np.random.default_rng(bits * m + k)
    w = bq.quantize(rng.standard_normal((24, k)).astype(np.float32) * 0.05, bits)
    gu = rng.standard_normal((m, 2 * k)).astype(np.float32) * 4
    gu[0, :3] = [-120.0, 120.0, 0.0]  # e^-|g| underflows, and a zero gate
    _close(_prologue_session(w, 2).run(None, {"x": gu})[0], bq.reference_matmul(_swiglu(gu), w))


def test_prologues_refuse_bad_inputs() -> None:
    rng = np.random.default_rng(4)
    w = bq.quantize(rng.standard_normal((16, 64)).astype(np.float32), 4)
    with pytest.raises(Exception, match=r"x must be float \[\.\.\., 2K=128\] \(SwiGLU: gate, up\)"):
        _prologue_session(w, 2).run(None, {"x": np.zeros((2, 64), np.float32)})
    with pytest.raises(Exception, match=r"gamma must be float \[K=64\]"):
        _prologue_session(w, 1, np.ones(32, np.float32)).run(None, {"x": np.zeros((2, 64), np.float32)})
    with pytest.raises(Exception, match="input gamma is missing"):
        _prologue_session(w, 1).run(None, {"x": np.zeros((2, 64), np.float32)})
    with pytest.raises(Exception, match="skip must have the shape of x"):
        _prologue_session(w, 1, np.ones(64, np.float32), skip=True).run(
            None, {"x": np.zeros((2, 64), np.float32), "skip": np.zeros((3, 64), np.float32)})
    with pytest.raises(Exception, match=r"output 1 \(x \+ skip\) needs prologue 1"):
        _prologue_session(w, 1, np.ones(64, np.float32), keep_sum=True).run(None, {"x": np.zeros((2, 64), np.float32)})
    with pytest.raises(Exception, match="prologue must be 0"):
        _prologue_session(w, 3)


def _rescore_session(head: bq.RescoredHead, gamma: np.ndarray | None = None, *, library: str | None = None,
                     bits: int | None = None, exact: bool = True) -> ort.InferenceSession:
    """BlockQuantMatMul with ``rescore=head.top``: the 4-bit scan as inputs 1-3, the 8-bit weights as inputs 6, 7
    (left out with ``exact=False``); with ``gamma`` the RMSNorm prologue on x + skip, as the LM head runs."""
    codes, scales, mins = head.scan.packed()
    codes8, scales8, _ = head.exact.packed()
    inits = [numpy_helper.from_array(a, n) for a, n in ((codes, "codes"), (scales, "scales"), (mins, "mins"))]
    inputs = ["x", "codes", "scales", "mins", "", ""]
    graph_inputs = ["x"]
    attrs = {}
    if gamma is not None:
        inits.append(numpy_helper.from_array(gamma, "gamma"))
        inputs[4:6] = ["gamma", "skip"]
        graph_inputs.append("skip")
        attrs = {"prologue": 1, "epsilon": 1e-5}
    if exact:
        inits += [numpy_helper.from_array(codes8, "codes8"), numpy_helper.from_array(scales8, "scales8")]
        inputs += ["codes8", "scales8"]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("BlockQuantMatMul", inputs, ["y"], domain=ortop.DOMAIN, K=head.scan.k, N=head.scan.n,
                            bits=bits or 4, rescore=head.top, **attrs)
    return _one_node_session(node, graph_inputs, inits, library)


def _rescored_head(rng: np.random.Generator, n: int, k: int, top: int) -> bq.RescoredHead:
    weight = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    return bq.RescoredHead(bq.quantize(weight, 4), bq.quantize(weight, 8), top)


def _check_rescored(got: np.ndarray, scan: np.ndarray, exact: np.ndarray, top: int) -> None:
    """``got`` is ``exact`` on the 8-row tiles holding each row's ``top`` best of ``scan``, ``scan`` elsewhere, bit for
    bit: the op reuses the plain op's arithmetic for both."""
    n = scan.shape[-1]
    for row, (g, s, e) in enumerate(zip(got, scan, exact, strict=True)):
        order = np.argsort(-s, kind="stable")
        best = order[:top]
        assert top >= n or s[order[top - 1]] > s[order[top]], "a tie at the cut: the op may pick either"
        rescored = np.zeros(n, bool)
        for t in np.unique(best // bq.TILE):
            rescored[t * bq.TILE:(t + 1) * bq.TILE] = True
        np.testing.assert_array_equal(g[rescored], e[rescored], err_msg=f"row {row}: rescored logits")
        np.testing.assert_array_equal(g[~rescored], s[~rescored], err_msg=f"row {row}: scanned logits")


RESCORE_GRID = list(itertools.product((1, 3, 17), (64, 576), (7, 64, 1000), (1, 5, 64)))


@pytest.mark.parametrize("m, k, n, top", RESCORE_GRID, ids=[f"m{m}-k{k}-n{n}-top{t}" for m, k, n, t in RESCORE_GRID])
def test_rescore_gives_the_8bit_outputs_where_the_4bit_scan_is_best(m: int, k: int, n: int, top: int) -> None:
    rng = np.random.default_rng(m * 7 + k + n + top)
    head = _rescored_head(rng, n, k, top)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 30, size=(m, 1)).astype(np.float32)
    got = _rescore_session(head).run(None, {"x": x})[0]
    scan, exact = _session(head.scan).run(None, {"x": x})[0], _session(head.exact).run(None, {"x": x})[0]
    _check_rescored(got, scan, exact, top)
    if top >= n:
        np.testing.assert_array_equal(got, exact)


@pytest.mark.parametrize("library", ["simd", "portable"])
def test_rescore_with_the_norm_prologue(library: str, request) -> None:
    """As the LM head runs: RMSNorm(x + skip) once, the same int8 activations for the scan and the rescoring."""
    lib = request.getfixturevalue("scalar_library") if library == "portable" else None
    rng = np.random.default_rng(21)
    head = _rescored_head(rng, 300, 96, 16)
    gamma = rng.uniform(0.5, 1.5, 96).astype(np.float32)
    feeds = {"x": rng.standard_normal((4, 96)).astype(np.float32) * 3,
             "skip": rng.standard_normal((4, 96)).astype(np.float32)}
    got = _rescore_session(head, gamma, library=lib).run(None, feeds)[0]
    scan = _prologue_session(head.scan, 1, gamma, skip=True, library=lib).run(None, feeds)[0]
    exact = _prologue_session(head.exact, 1, gamma, skip=True, library=lib).run(None, feeds)[0]
    _check_rescored(got, scan, exact, 16)
    _close(got, bq.reference_rescored(_rms_norm(feeds["x"] + feeds["skip"], gamma, 1e-5), head))


def test_rescore_refuses_bad_inputs() -> None:
    rng = np.random.default_rng(22)
    head = _rescored_head(rng, 40, 64, 8)
    x = {"x": np.ones((2, 64), np.float32)}
    with pytest.raises(Exception, match="input exact_codes is missing"):
        _rescore_session(head, exact=False).run(None, x)
    short = bq.RescoredHead(head.scan, head.exact, 8)  # then an 8-bit weight of 16 rows where 40 belong
    object.__setattr__(short, "exact", bq.quantize(rng.standard_normal((16, 64)).astype(np.float32), 8))
    with pytest.raises(Exception, match=r"rescoring needs exact_codes uint8 \[5, 2, 256\]"):
        _rescore_session(short).run(None, x)
    with pytest.raises(Exception, match="rescore must be >= 0, and > 0 only on 4-bit"):
        _rescore_session(head, bits=8)
    with pytest.raises(ValueError, match="a 4-bit scan and an 8-bit exact weight of one shape"):
        bq.RescoredHead(head.exact, head.scan, 8)
    with pytest.raises(ValueError, match="top must be >= 1"):
        bq.RescoredHead(head.scan, head.exact, 0)


def _library_with(define: str, tmp_path_factory) -> str:
    """The op library built with one more -D flag, into a directory of its own."""
    include = ortop.include_dir()
    directory = tmp_path_factory.mktemp(define.lower())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ortop, "FLAGS", (*ortop.FLAGS, f"-D{define}"))
        mp.setattr(ortop, "include_dir", lambda: include)
        mp.setattr(ortop, "build_dir", lambda includes: directory)
        return str(ortop._build())


@pytest.fixture(scope="module")
def scalar_library(tmp_path_factory) -> str:
    """The op library built without SIMD (-DHGW_BQ_SCALAR): the loop machines without AVX2 run."""
    return _library_with("HGW_BQ_SCALAR", tmp_path_factory)


@pytest.mark.parametrize("bits, m, k, n", [(4, 1, 96, 7), (4, 5, 70, 64), (8, 1, 576, 9), (8, 6, 64, 16)])
def test_portable_loop_matches_reference(scalar_library: str, bits: int, m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(m + k + n)
    w = bq.quantize(rng.standard_normal((n, k)).astype(np.float32), bits)
    _check(w, rng.standard_normal((m, k)).astype(np.float32) * 4, library=scalar_library)


def test_portable_prologues_match_reference(scalar_library: str) -> None:
    rng = np.random.default_rng(12)
    w = bq.quantize(rng.standard_normal((16, 96)).astype(np.float32) * 0.05, 4)
    gamma = rng.uniform(0.5, 1.5, 96).astype(np.float32)
    x, r = rng.standard_normal((2, 3, 96)).astype(np.float32) * 3
    y, total = _prologue_session(w, 1, gamma, skip=True, keep_sum=True, library=scalar_library).run(
        None, {"x": x, "skip": r})
    _close(y, bq.reference_matmul(_rms_norm(x + r, gamma, 1e-5), w))
    np.testing.assert_array_equal(total, x + r)
    gu = rng.standard_normal((3, 192)).astype(np.float32) * 4
    _close(_prologue_session(w, 2, library=scalar_library).run(None, {"x": gu})[0],
           bq.reference_matmul(_swiglu(gu), w))


@pytest.fixture(scope="module")
def avx2_library(tmp_path_factory) -> str:
    """The op library built without the AVX512-VNNI loop (-DHGW_BQ_NO_VNNI): what AVX2-only machines run."""
    return _library_with("HGW_BQ_NO_VNNI", tmp_path_factory)


VNNI_GRID = list(itertools.product((4, 8), (1, 3, 4, 6, 17), (64, 576), (8, 200)))


@pytest.mark.parametrize("bits, m, k, n", VNNI_GRID, ids=[f"b{b}-m{m}-k{k}-n{n}" for b, m, k, n in VNNI_GRID])
def test_vnni_loop_equals_avx2_loop_bit_for_bit(avx2_library: str, bits: int, m: int, k: int, n: int) -> None:
    """vpdpbusd sums the same integers as maddubs + madd: the default build (the VNNI loop where the CPU has
    AVX512-VNNI, ctypes.CDLL(library).hgw_block_quant_vnni) gives exactly the AVX2 build's outputs, extreme
    codes and activations included."""
    rng = np.random.default_rng(bits * 7 + m + k + n)
    w = bq.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, bits)
    w.codes[0, 0, :] = 15 if bits == 4 else -127  # saturating corners of the int16 pair sums
    w.codes[-1, -1, :] = 0 if bits == 4 else 127
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 30, size=(m, 1)).astype(np.float32)
    x[0, :32] = np.where(np.arange(32) % 2 == 0, 1.0, -1.0) * 7.0  # codes of +-127 in one block
    got = _session(w, threads=2).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, _session(w, threads=2, library=avx2_library).run(None, {"x": x})[0])


def test_packed_layout_by_hand() -> None:
    """Bytes at the positions the kernel comment documents."""
    rng = np.random.default_rng(5)
    w4 = bq.quantize(rng.standard_normal((11, 70)).astype(np.float32), 4)
    codes, scales, mins = w4.packed()
    assert codes.shape == (2, 3, 128) and scales.shape == mins.shape == (2, 3, 8)
    for row, b, i in [(0, 0, 0), (3, 1, 5), (7, 2, 31), (8, 0, 13), (10, 2, 20)]:
        t, r, g, c = row // 8, row % 8, i // 8, i % 8
        byte = codes[t, b, g * 32 + r * 4 + c % 4]
        assert (byte & 0x0F if c < 4 else byte >> 4) == w4.codes[row, b, i]
        assert scales[t, b, r] == w4.scales[row, b] and mins[t, b, r] == w4.mins[row, b]
    assert not codes[1, :, :].reshape(3, 4, 8, 4)[:, :, 3:].any()  # rows 11..15 are padding
    w8 = bq.quantize(rng.standard_normal((9, 64)).astype(np.float32), 8)
    codes8, scales8, mins8 = w8.packed()
    assert codes8.shape == (2, 2, 256) and mins8 is None
    for row, b, i in [(0, 0, 0), (5, 1, 30), (8, 1, 7)]:
        t, r = row // 8, row % 8
        assert codes8[t, b, (i // 4) * 32 + r * 4 + i % 4].view(np.int8) == w8.codes[row, b, i]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rounds_to_the_nearest_code(bits: int) -> None:
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((16, 96)).astype(np.float32)
    w = bq.quantize(weight, bits)
    step = np.repeat(w.scales.astype(np.float32), 32, axis=1)[:, :96]
    assert np.all(np.abs(bq.dequantize(w) - weight) <= step / 2 + 1e-3 * np.abs(weight) + 1e-6)
    assert w.codes.min() >= (0 if bits == 4 else -127) and w.codes.max() <= (15 if bits == 4 else 127)


@pytest.mark.parametrize("ggml_type", sorted(bq.BLOCK_TYPES))
def test_ggml_blocks_are_taken_exactly(ggml_type: str) -> None:
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((40, 96)).astype(np.float32) + rng.standard_normal((40, 1)).astype(np.float32)
    raw = gguf.quants.quantize(weight, QType[ggml_type])
    w = bq.from_ggml(ggml_type, raw.reshape(40, 3, -1))
    assert (w.bits, w.mins is None) == (bq.BLOCK_TYPES[ggml_type], ggml_type == "Q8_0")
    np.testing.assert_array_equal(bq.dequantize(w), gguf.quants.dequantize(raw, QType[ggml_type]))
    x = rng.standard_normal((3, 96)).astype(np.float32)
    _check(w, x)
    with pytest.raises(ValueError, match="cannot take GGML type"):
        bq.from_ggml("Q5_K", raw.reshape(40, 3, -1))


def test_bad_inputs_fail_the_run_with_a_clear_error() -> None:
    rng = np.random.default_rng(9)
    w = bq.quantize(rng.standard_normal((16, 64)).astype(np.float32), 4)
    with pytest.raises(Exception, match=r"BlockQuantMatMul: x must be float \[\.\.\., K=64\]"):
        _session(w).run(None, {"x": np.zeros((2, 32), np.float32)})
    codes, scales, mins = w.packed()
    with pytest.raises(Exception, match="BlockQuantMatMul: codes must be"):
        _session(w, arrays=(codes[:, :1], scales, mins)).run(None, {"x": np.zeros((2, 64), np.float32)})
    with pytest.raises(Exception, match="4-bit weights need input 3, mins"):
        _session(w, arrays=(codes, scales, None)).run(None, {"x": np.zeros((2, 64), np.float32)})
    with pytest.raises(Exception, match="needs K >= 1, N >= 1 and bits 4 or 8"):
        _session(w, bits=3)
    with pytest.raises(ValueError, match="cannot fuse"):
        bq.concat([w, bq.quantize(rng.standard_normal((8, 64)).astype(np.float32), 8)])


@pytest.mark.parametrize("options", [dict(layout="split"), dict(quant="int8", layout="fused"),
                                     dict(layout="fused", accuracy_level=0)])
def test_build_options_refuse_hgw_where_it_does_not_apply(options) -> None:
    with pytest.raises(ValueError, match="matmul='hgw'"):
        BuildOptions(matmul="hgw", **options)


def test_runner_on_block_quant_matmul_tracks_reference(tiny_gguf) -> None:  # noqa: F811 - the fixture
    """GGUF Q4_0 / Q4_1 / Q8_0 tiny models, weights taken as stored, on the fused graph with BlockQuantMatMul:
    the only difference from the reference model is the int8 rounding of each matmul's input."""
    ckpt, reference, ggml_type, root = tiny_gguf
    runner = OnnxRunner(ckpt, "int4", cache_root=root, layout="fused", lm_head="stored")
    assert runner.matmul == "hgw"
    manifest = json.loads((runner.model.directory / "manifest.json").read_text())
    assert manifest["linear_sources"] == {f"repacked {ggml_type}": 4 * ckpt.config.num_layers + 1}
    ref_cache, cache = _cache(ckpt.config), _cache(ckpt.config)
    for step, batch in enumerate(_varlen_steps(ckpt.config.vocab_size)):
        got, expected = runner.execute(batch, cache), reference.execute(batch, ref_cache)
        error = (got - expected).abs().max() / expected.std()  # measured up to 0.11 (llama Q8_0)
        assert error < 0.25, f"{ggml_type} step {step}: max |logit diff| {error:.3f} x std"
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8
    prompt = [5, 17, 99, 3, 250, 42]
    agree = sum(a == b for a, b in zip(_greedy(runner, prompt, 16), _greedy(reference, prompt, 16), strict=True))
    assert agree >= 12, agree
    assert torch.isfinite(cache).all()


@pytest.mark.parametrize("matmul, layout", [("hgw", "fused"), ("ort", "split")])
def test_int4_lm_head_is_requantized_and_tracks_reference(tiny_gguf, matmul: str, layout: str) -> None:  # noqa: F811
    """lm_head="int4": the head re-quantized to 4 bits whatever it is stored as, every other matrix as stored."""
    ckpt, reference, ggml_type, root = tiny_gguf
    runner = OnnxRunner(ckpt, "int4", cache_root=root, layout=layout, matmul=matmul, lm_head="int4")
    assert runner.model.directory.name.endswith("-head4")
    manifest = json.loads((runner.model.directory / "manifest.json").read_text())
    assert manifest["linear_sources"] == {f"repacked {ggml_type}": 4 * ckpt.config.num_layers,
                                          "requantized int4": 1}
    ref_cache, cache = _cache(ckpt.config), _cache(ckpt.config)
    for step, batch in enumerate(_varlen_steps(ckpt.config.vocab_size)):
        got, expected = runner.execute(batch, cache), reference.execute(batch, ref_cache)
        error = (got - expected).abs().max() / expected.std()  # measured up to 0.42 (MatMulNBits, Q4_1)
        assert error < 0.75, f"{ggml_type} step {step}: max |logit diff| {error:.3f} x std"


def test_rescored_lm_head_gives_the_stored_heads_tokens(tiny_gguf) -> None:  # noqa: F811 - the fixture
    """lm_head="auto" on BlockQuantMatMul rescores a Q8_0 head (a 4-bit scan, the best logits again from the stored
    8-bit blocks) and keeps a 4-bit one as stored. On a Q8_0 head the rescored build picks the stored build's token
    at every position, with the very same logit."""
    ckpt, _, ggml_type, root = tiny_gguf
    auto = OnnxRunner(ckpt, "int4", cache_root=root, layout="fused")
    assert auto.lm_head == ("rescore" if ggml_type == "Q8_0" else "stored")
    stored = OnnxRunner(ckpt, "int4", cache_root=root, layout="fused", lm_head="stored")
    rescored = OnnxRunner(ckpt, "int4", cache_root=root, layout="fused", lm_head="rescore")
    manifest = json.loads((rescored.model.directory / "manifest.json").read_text())
    exact = "rescored from Q8_0 as stored" if ggml_type == "Q8_0" else "rescored from requantized Q8_0"
    assert manifest["lm_head"] == "rescore" and rescored.model.directory.name.endswith("-rescore")
    assert manifest["linear_sources"] == {f"repacked {ggml_type}": 4 * ckpt.config.num_layers,
                                          "requantized int4": 1, exact: 1}
    # What a batch-1 token reads (bench edge's roofline): the int4 head's bytes plus the rescored tiles, at most.
    int4 = OnnxRunner(ckpt, "int4", cache_root=root, layout="fused", lm_head="int4")
    c = ckpt.config
    tiles, kb = -(-c.vocab_size // 8), -(-c.hidden_size // 32)
    assert (decode_bytes_per_token(rescored.model.paths, c) - decode_bytes_per_token(int4.model.paths, c)
            == min(RESCORE_TOP, tiles) * kb * (256 + 8 * 2))
    if ggml_type != "Q8_0":
        return  # a 4-bit head's 8-bit copy is its values rounded again, not the stored head
    cache_s, cache_r = _cache(ckpt.config), _cache(ckpt.config)
    for batch in _varlen_steps(ckpt.config.vocab_size):
        want, got = stored.execute(batch, cache_s), rescored.execute(batch, cache_r)
        best = got.argmax(-1)
        assert torch.equal(best, want.argmax(-1))
        assert torch.equal(got.gather(1, best[:, None]), want.gather(1, best[:, None]))
    prompt = [5, 17, 99, 3, 250, 42]
    assert _greedy(rescored, prompt, 16) == _greedy(stored, prompt, 16)


def test_lm_head_option_is_checked() -> None:
    assert BuildOptions(layout="fused", matmul="hgw", lm_head="int4").key("f" * 20).endswith("-fused-hgw-head4")
    assert BuildOptions(layout="fused", matmul="hgw", lm_head="rescore").key("f" * 20).endswith("-hgw-rescore")
    assert BuildOptions(lm_head="stored").key("f" * 20).endswith("-stored")
    with pytest.raises(ValueError, match="'rescore' only with matmul='hgw'"):
        BuildOptions(layout="fused", lm_head="rescore")
    with pytest.raises(ValueError, match="lm_head must be one of"):
        BuildOptions(quant="fp32", lm_head="int4")
    with pytest.raises(ValueError, match="lm_head must be one of"):
        BuildOptions(lm_head="int2")
