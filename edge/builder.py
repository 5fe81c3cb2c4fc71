"""ONNX graphs for the dense parts of a Llama / Qwen2 decoder, built straight from checkpoint weights.

No torch export: every node is written with ``onnx.helper``. Attention always runs the shared
``kernels/`` code on the shared paged KV cache; the two layouts differ in where it is called from.

``layout="fused"`` (CPU): one graph, ``model.onnx``, for the whole step. Each layer's attention is a
``hybrid_gateway::PagedAttention`` node (:mod:`edge.ortop`: RoPE, the cache write and attention in C++ on the
``kv_cache`` input, which the runner binds to the engine's cache tensor)::

    input_ids, positions, logits_indices, kv_cache, block_tables, seq_lens, cu_seqlens_q, slot_mapping
      -> embed -> RMSNorm -> [QKV -> PagedAttention(layer i) -> o_proj + residual -> RMSNorm -> MLP + residual
      -> RMSNorm] x L (the last layer's MLP on the sampled rows only) -> LM head -> logits [num_sampled, vocab]

With ``matmul="hgw"`` every RMSNorm (and the residual add before it) and the SwiGLU are prologues of the
``BlockQuantMatMul`` node that consumes them, so a layer is five nodes: QKV (norm), PagedAttention, o_proj,
gate/up (residual add + norm), down (SwiGLU).

``layout="split"`` (any device; the CUDA path): attention is *not* in the graphs; it runs between them
through ``kernels.attention``. One step runs ``num_layers + 1`` graphs, each ending where a layer's
attention begins::

    pre          input_ids, positions -> embed -> RMSNorm(layer 0) -> QKV -> RoPE -> q, k, v, residual, cos, sin
    layer_i      attn_i, residual, cos, sin -> o_proj(i) + residual -> RMSNorm -> SwiGLU MLP(i) + residual
   (i < L-1)        -> RMSNorm(layer i+1) -> QKV(i+1) -> RoPE -> q, k, v, residual
    final        attn_{L-1}, residual, logits_indices -> gather rows -> o_proj + residual -> MLP + residual
                    -> final RMSNorm -> LM head -> logits [num_sampled, vocab]

Linear layers are ``hybrid_gateway::BlockQuantMatMul`` (``matmul="hgw"``, fused int4: GGML's own 4/8-bit
blocks, see :mod:`edge.blockquant`), ``MatMulNBits`` (com.microsoft; int4 or int8, block-wise asymmetric, see
:mod:`edge.quantize`) or plain ``MatMul`` for ``quant="fp32"``. For ``MatMulNBits``: with ``source="auto"``
a GGUF matrix stored
as Q4_0 / Q4_1 / Q8_0 keeps its own codes and scales (:mod:`edge.repack`, lossless; Q4_1 adds a
``ReduceSum`` + ``Gemm`` correction for its block mins); other matrices are re-quantized from float.
q/k/v and gate/up are each fused into one matmul. RMSNorm is ONNX ``RMSNormalization``, or com.microsoft
``SkipSimplifiedLayerNormalization`` when it follows a residual add; RoPE is ONNX ``RotaryEmbedding``
(opset 23, rotate-half) fed per-token cos/sin gathered from tables computed with the reference model's
``rope_inv_freq``. The embedding is a float32 ``Gather`` (exact rows); a tied LM head is the same matrix,
quantized (or repacked).

Built models are cached on disk, keyed by checkpoint fingerprint, options and :data:`GRAPH_VERSION`::

    <cache root>/onnx/<fingerprint[:16]>-<quant>[-bs<block_size>-acc<accuracy_level>-<source>]-g<GRAPH_VERSION>
        [-fused][-hgw]/
        manifest.json   pre.onnx  pre.onnx.data  layer_000.onnx  layer_000.onnx.data ...  final.onnx  final.onnx.data
        (fused: manifest.json  model.onnx  model.onnx.data)

where ``<cache root>`` is the parent of ``kernels.checkpoints.store.cache_dir()`` (``$HYBRID_GATEWAY_CACHE``
when set). A build is written to a temporary directory and renamed into place, so an entry is complete or
absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edge import blockquant
from edge.blockquant import BlockQuantWeight, RescoredHead
from edge.quantize import check_quant_params, quantize_blockwise
from edge.repack import GGML_BLOCK_SIZE, REPACKABLE_TYPES, RepackedWeight, concat_repacked, repack_blocks
from kernels.checkpoints import Checkpoint, GGUFCheckpoint, ModelConfig, load_checkpoint
from kernels.checkpoints.store import cache_dir
from kernels.model import rope_inv_freq

GRAPH_VERSION = 6  # 2: GGUF Q4_0/Q4_1/Q8_0 repacked losslessly (BuildOptions.source); 3: Q4_1 block sums by MatMul;
# 4: BuildOptions.matmul ("hgw": hybrid_gateway::BlockQuantMatMul, 8-row tiles); 5: hgw fuses norms and SwiGLU in;
# 6: lm_head "auto" rescores an 8-bit head's best logits after a 4-bit scan (hgw)
OPSET = 23  # RotaryEmbedding
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would default to 14
QUANTS = ("int4", "int8", "fp32")
SOURCES = ("auto", "fast", "requantize")
LAYOUTS = ("split", "fused")
MATMULS = ("ort", "hgw")
LM_HEADS = ("auto", "stored", "int4", "rescore")
KV_DTYPES = ("float32", "float16")
RESCORE_TOP = 64  # logits per row recomputed at 8 bits; SmolLM2's exact best was never past the int4 scan's 20th
CUSTOM_DOMAIN = "hybrid_gateway"  # edge/csrc/ort_ops.cpp (edge.ortop)
_BITS = {"int4": 4, "int8": 8}
DEFAULT_ACCURACY_LEVEL = {"int4": 4, "int8": 0, "fp32": 0}
MANIFEST = "manifest.json"

Quant = Literal["int4", "int8", "fp32"]
Source = Literal["auto", "fast", "requantize"]
Layout = Literal["split", "fused"]
Matmul = Literal["ort", "hgw"]
LmHead = Literal["auto", "stored", "int4", "rescore"]
KvDtype = Literal["float32", "float16"]


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """How the dense graphs are built.

    ``accuracy_level`` is MatMulNBits' compute type on CPU: 0 = float activations, 4 = activations
    quantized to int8 per block (3-4x faster matmuls, ~0.5% relative error each). ``None`` picks
    :data:`DEFAULT_ACCURACY_LEVEL`: 4 for int4 (speed is why one picks int4; on SmolLM2 its quality loss
    comes from the 4-bit weights, not the activations), 0 for int8 (fidelity is why one picks int8).

    ``source`` says where quantized weights come from. ``"auto"``: a GGUF matrix stored as Q4_0, Q4_1 or
    Q8_0 (with ``block_size`` 32) is packed from its stored codes, exactly (:mod:`edge.repack`); its bits
    are then the stored ones (4 for Q4_x, 8 for Q8_0) whatever ``quant`` says, since re-rounding them onto
    another grid only adds error. Every other matrix is re-quantized from its float values to ``quant``.
    ``"fast"``: like ``"auto"`` for Q4_0 and Q8_0, which ``MatMulNBits`` holds exactly; Q4_1 is re-quantized
    onto ``MatMulNBits``' own 4-bit grid (integer zero points) instead of carrying its float block mins as a
    ``ReduceSum`` + ``Gemm`` correction after every matmul: two fewer ops per matmul and ~19% fewer bytes,
    at the price of a second rounding (each block's offset moves by at most half a step).
    ``"requantize"``: every matrix is re-quantized (the GRAPH_VERSION 1 behaviour). Ignored for fp32.

    ``layout`` is how a step is cut into graphs. ``"split"``: ``num_layers + 1`` graphs, attention runs
    between them in Python through ``kernels.attention`` (any device). ``"fused"``: one graph for the whole
    step, each layer's attention a ``hybrid_gateway::PagedAttention`` node (RoPE, the cache write and
    attention on the shared paged cache, :mod:`edge.ortop`; CPU only).

    ``matmul`` is what runs the quantized linear layers. ``"ort"``: ONNX Runtime's ``MatMulNBits``.
    ``"hgw"`` (``layout="fused"``, ``quant="int4"``, ``accuracy_level`` 4 only): the
    ``hybrid_gateway::BlockQuantMatMul`` op of the same custom op library, on GGML's own block formats
    (:mod:`edge.blockquant`): Q4_0 / Q4_1 / Q8_0 matrices are taken exactly as stored, Q4_1's block mins
    included (so ``source="fast"`` is the same as ``"auto"``), and every other matrix is quantized to
    Q4_1-style 4-bit blocks. Its batch-1 loop reads the weights at ~20 GB/s
    where ``MatMulNBits`` reaches ~15-19 on our machines.

    ``lm_head`` is how the LM head is stored. ``"stored"``: like every other matrix (a GGUF's own blocks with
    ``source="auto"``; SmolLM2's tied Q8_0 head is then 30 MB, a third of what batch-1 decode reads per token).
    ``"int4"``: re-quantized to 4-bit blocks (Q4_1-style for ``"hgw"``, ``MatMulNBits`` int4 for ``"ort"``), as
    onnxruntime-genai's int4 builds do: ~12 MB fewer a token, at some agreement with the reference (a second
    rounding of an 8-bit head). Not for ``quant="fp32"``. ``"rescore"`` (``"hgw"`` only): both. Every logit
    comes from the 4-bit head, then each row's :data:`RESCORE_TOP` best (and the rest of their 8-row tiles) are
    computed again from the 8-bit head (a GGUF's Q8_0 as stored, else Q8_0 blocks of the float values): those
    logits are bit for bit the 8-bit head's, so greedy decoding matches ``"stored"`` on a Q8_0 head whenever its
    best token is among the scan's best :data:`RESCORE_TOP`, at the int4 head's speed. Memory holds both heads.
    ``"auto"``: ``"rescore"`` with ``"hgw"`` where the head is not already stored at 4 bits, else ``"stored"``
    (:func:`resolve_lm_head`).

    ``kv_dtype`` is the element type of the fused graph's ``kv_cache`` input, the engine's cache (``"float16"``:
    K and V stored as IEEE half, rounded to nearest-even once rotated, half the bytes for attention to read; all
    arithmetic stays float32). The split layout takes float32 caches only.

    >>> BuildOptions(quant="int8").key("0123456789abcdef0123")
    '0123456789abcdef-int8-bs32-acc0-auto-g6'
    >>> BuildOptions(layout="fused").key("0123456789abcdef0123")
    '0123456789abcdef-int4-bs32-acc4-auto-g6-fused'
    """

    quant: Quant = "int4"
    block_size: int = 32
    accuracy_level: int | None = None
    source: Source = "auto"
    layout: Layout = "split"
    matmul: Matmul = "ort"
    lm_head: LmHead = "auto"
    kv_dtype: KvDtype = "float32"

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, got {self.quant!r}")
        if self.accuracy_level is None:
            object.__setattr__(self, "accuracy_level", DEFAULT_ACCURACY_LEVEL[self.quant])
        if self.quant != "fp32":
            check_quant_params(_BITS[self.quant], self.block_size)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be one of 0..4, got {self.accuracy_level!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.matmul not in MATMULS:
            raise ValueError(f"matmul must be one of {MATMULS}, got {self.matmul!r}")
        if (self.lm_head not in LM_HEADS or (self.lm_head == "int4" and self.quant == "fp32")
                or (self.lm_head == "rescore" and self.matmul != "hgw")):
            raise ValueError(f"lm_head must be one of {LM_HEADS} ('int4' not with quant='fp32', 'rescore' only with "
                             f"matmul='hgw'), got {self.lm_head!r} with quant={self.quant!r}, matmul={self.matmul!r}")
        if self.kv_dtype not in KV_DTYPES or (self.kv_dtype != "float32" and self.layout != "fused"):
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES} (float16 with layout='fused' only), got "
                             f"{self.kv_dtype!r} with layout={self.layout!r}")
        if self.matmul == "hgw" and (self.layout != "fused" or self.quant != "int4" or self.block_size != 32
                                     or self.accuracy_level != 4):
            raise ValueError(f"matmul='hgw' runs in the fused graph's custom op library on int4 weights in blocks of "
                             f"32 with int8 activations (accuracy_level 4); got layout={self.layout!r}, "
                             f"quant={self.quant!r}, block_size={self.block_size}, "
                             f"accuracy_level={self.accuracy_level}")

    @property
    def bits(self) -> int | None:
        return _BITS.get(self.quant)

    def key(self, fingerprint: str) -> str:
        suffix = (("-fused" if self.layout == "fused" else "") + ("-hgw" if self.matmul == "hgw" else "")
                  + {"auto": "", "stored": "-stored", "int4": "-head4", "rescore": "-rescore"}[self.lm_head]
                  + ("-kv16" if self.kv_dtype == "float16" else ""))
        if self.quant == "fp32":
            return f"{fingerprint[:16]}-fp32-g{GRAPH_VERSION}{suffix}"
        return (f"{fingerprint[:16]}-{self.quant}-bs{self.block_size}-acc{self.accuracy_level}-{self.source}"
                f"-g{GRAPH_VERSION}{suffix}")


@dataclass(frozen=True, slots=True)
class OnnxModel:
    """A built (or reused) set of graphs for one checkpoint and :class:`BuildOptions`."""

    directory: Path
    config: ModelConfig
    options: BuildOptions
    fingerprint: str
    reused: bool  # True when the cache already held this build
    graphs: tuple[str, ...] = field(default=())  # file names in run order: pre, layer_000.., final
    lm_head: str = "stored"  # options.lm_head resolved (resolve_lm_head)

    @property
    def paths(self) -> list[Path]:
        return [self.directory / name for name in self.graphs]


def onnx_cache_root() -> Path:
    """``$HYBRID_GATEWAY_CACHE/onnx`` (or the user cache dir's ``hybrid-gateway/onnx``)."""
    return cache_dir().parent / "onnx"


def graph_names(num_layers: int, layout: Layout = "split") -> tuple[str, ...]:
    if layout == "fused":
        return ("model.onnx",)
    return ("pre.onnx", *(f"layer_{i:03d}.onnx" for i in range(num_layers - 1)), "final.onnx")


def lm_head_name(config: ModelConfig) -> str:
    return "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"


def resolve_lm_head(ckpt: Checkpoint, options: BuildOptions) -> str:
    """``options.lm_head``, with ``"auto"`` made ``"rescore"`` where the head runs on ``BlockQuantMatMul`` and is not
    stored at 4 bits already (a Q8_0 or float head), else ``"stored"``."""
    if options.lm_head != "auto":
        return options.lm_head
    stored = ckpt.quant_types()[lm_head_name(ckpt.config)]
    return "rescore" if options.matmul == "hgw" and stored not in ("Q4_0", "Q4_1") else "stored"


def build_onnx_model(checkpoint: Checkpoint | str | os.PathLike[str], options: BuildOptions | None = None, *,
                     cache_root: Path | None = None, force: bool = False,
                     console: Console | None = None) -> OnnxModel:
    """Build the graphs for ``checkpoint`` (or reuse the cached build) and return where they are.

    >>> model = build_onnx_model("SmolLM2-135M-Instruct.Q4_1.gguf", BuildOptions(quant="int4"))  # doctest: +SKIP
    >>> model.paths[0].name  # doctest: +SKIP
    'pre.onnx'
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    options = options or BuildOptions()
    if not isinstance(options, BuildOptions):
        raise ValueError(f"options must be a BuildOptions, got {type(options).__name__}")
    config = ckpt.config
    fingerprint = ckpt.fingerprint
    root = Path(cache_root) if cache_root is not None else onnx_cache_root()
    target = root / options.key(fingerprint)
    names = graph_names(config.num_layers, options.layout)
    lm_head = resolve_lm_head(ckpt, options)
    if not force and _is_complete(target, fingerprint, names):
        return OnnxModel(target, config, options, fingerprint, reused=True, graphs=names, lm_head=lm_head)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
    try:
        sources = _write_graphs(ckpt, options, tmp, console or Console(stderr=True))
        manifest = {"graph_version": GRAPH_VERSION, "fingerprint": fingerprint, "options": asdict(options),
                    "config": config.to_dict(), "graphs": list(names), "lm_head": lm_head, "linear_sources": sources,
                    "built_at": time.time()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():  # force=True, or a stale/incomplete entry
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)  # atomic on one filesystem
        except OSError:
            if not _is_complete(target, fingerprint, names):  # not a concurrent builder winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return OnnxModel(target, config, options, fingerprint, reused=False, graphs=names, lm_head=lm_head)


def _is_complete(directory: Path, fingerprint: str, names: tuple[str, ...]) -> bool:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (data.get("fingerprint") == fingerprint and data.get("graph_version") == GRAPH_VERSION
            and all((directory / n).is_file() for n in names))


def _write_graphs(ckpt: Checkpoint, options: BuildOptions, out: Path, console: Console) -> dict[str, int]:
    """Write every graph into ``out``; returns how many linear layers took their weights from where
    (``"repacked Q4_1"``, ``"requantized"``, ``"float"``)."""
    config = ckpt.config
    weights = _WeightReader(ckpt, options)
    names = graph_names(config.num_layers, options.layout)
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"Building ONNX graphs ({options.quant})", total=len(names))
        for index, name in enumerate(names):
            progress.update(task, description=f"Building {name} ({options.quant})")
            g = _Graph(name.removesuffix(".onnx"), config, options)
            if options.layout == "fused":
                g.build_fused(weights, progress, task)
            elif index == 0:
                g.build_pre(weights)
            elif name == "final.onnx":
                g.build_final(weights, config.num_layers - 1)
            else:
                g.build_mid(weights, index - 1)
            g.save(out / name)
            progress.advance(task)
    return dict(sorted(weights.sources.items()))


class _WeightReader:
    """Weights by HF name: float32 numpy arrays, and linear weights (fused q/k/v and gate/up) either as float32
    or, when every part's stored blocks can be repacked at one bit width, as a :class:`RepackedWeight`."""

    def __init__(self, ckpt: Checkpoint, options: BuildOptions) -> None:
        self.ckpt = ckpt
        self.config = ckpt.config
        self.options = options
        self.repack = (options.quant != "fp32" and options.source in ("auto", "fast")
                       and isinstance(ckpt, GGUFCheckpoint) and options.block_size == GGML_BLOCK_SIZE)
        # "fast": no Q4_1 (its mins would need the correction ops); "auto": everything repackable.
        self.repackable = {t: b for t, b in REPACKABLE_TYPES.items() if options.source == "auto" or t != "Q4_1"}
        self.stored_types = ckpt.quant_types()
        self.sources: dict[str, int] = {}
        self.head_mode = resolve_lm_head(ckpt, options)

    def get(self, name: str) -> np.ndarray:
        return self.ckpt.get_tensor(name, dtype=torch.float32).numpy()

    def linear(self, *names: str, requantize: bool = False) -> np.ndarray | RepackedWeight | BlockQuantWeight:
        """The matrices ``names`` stacked along N (rows); ``requantize``: 4-bit blocks from the float values, never
        the stored ones."""
        if requantize:
            matrix = np.concatenate([self.get(n) for n in names], axis=0)
            self.sources["requantized int4"] = self.sources.get("requantized int4", 0) + 1
            if self.options.matmul == "hgw":
                return blockquant.quantize(matrix, 4)
            return RepackedWeight(quantize_blockwise(matrix, 4, self.options.block_size), None)
        types = {self.stored_types[n] for n in names}
        if self.options.matmul == "hgw":
            return self._block_quant(names, types)
        if self.repack and types <= self.repackable.keys() and len({self.repackable[t] for t in types}) == 1:
            source = "repacked " + "+".join(sorted(types))
            weight: np.ndarray | RepackedWeight = concat_repacked(
                [repack_blocks(*self.ckpt.raw_blocks(n)) for n in names])
        else:
            source = "float" if self.options.quant == "fp32" else "requantized"
            weight = np.concatenate([self.get(n) for n in names], axis=0)
        self.sources[source] = self.sources.get(source, 0) + 1
        return weight

    def _block_quant(self, names: tuple[str, ...], types: set[str]) -> BlockQuantWeight:
        stored = (isinstance(self.ckpt, GGUFCheckpoint) and self.options.source != "requantize"
                  and types <= blockquant.BLOCK_TYPES.keys()
                  and len({blockquant.BLOCK_TYPES[t] for t in types}) == 1)
        if stored:
            source = "repacked " + "+".join(sorted(types))
            weight = blockquant.concat([blockquant.from_ggml(*self.ckpt.raw_blocks(n)) for n in names])
        else:
            source = "requantized"
            weight = blockquant.quantize(np.concatenate([self.get(n) for n in names], axis=0), 4)
        self.sources[source] = self.sources.get(source, 0) + 1
        return weight

    def qkv(self, layer: int) -> tuple[np.ndarray | RepackedWeight, np.ndarray | None]:
        p = f"model.layers.{layer}.self_attn."
        w = self.linear(*(p + f"{x}_proj.weight" for x in "qkv"))
        b = np.concatenate([self.get(p + f"{x}_proj.bias") for x in "qkv"]) if self.config.attention_bias else None
        return w, b

    def gate_up(self, layer: int) -> np.ndarray | RepackedWeight:
        p = f"model.layers.{layer}.mlp."
        return self.linear(p + "gate_proj.weight", p + "up_proj.weight")

    def lm_head(self) -> np.ndarray | RepackedWeight | BlockQuantWeight | RescoredHead:
        name = lm_head_name(self.config)
        if self.head_mode != "rescore":
            return self.linear(name, requantize=self.head_mode == "int4")
        scan = self.linear(name, requantize=True)
        if (isinstance(self.ckpt, GGUFCheckpoint) and self.options.source != "requantize"
                and self.stored_types[name] == "Q8_0"):
            exact, source = blockquant.from_ggml(*self.ckpt.raw_blocks(name)), "rescored from Q8_0 as stored"
        else:
            exact, source = blockquant.quantize(self.get(name), 8), "rescored from requantized Q8_0"
        self.sources[source] = self.sources.get(source, 0) + 1
        return RescoredHead(scan, exact, RESCORE_TOP)


class _Graph:
    """One graph under construction: nodes, initializers, inputs and outputs."""

    def __init__(self, name: str, config: ModelConfig, options: BuildOptions) -> None:
        self.name, self.config, self.options = name, config, options
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._consts: set[str] = set()
        c = config
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    # -- plumbing -------------------------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", domain=domain,
                                           **attrs))
        return outputs

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        """A small constant shared by the nodes of this graph that need it (added once)."""
        if name not in self._consts:
            self._consts.add(self.init(name, array))
        return name

    def input(self, name: str, dtype: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, dtype: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def save(self, path: Path) -> None:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        if any(n.domain == CUSTOM_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
        model = helper.make_model(graph, ir_version=IR_VERSION, producer_name="hybrid-gateway.edge",
                                  opset_imports=opsets)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)

    # -- layers ---------------------------------------------------------------------------------------------
    def linear(self, x: str, weight: np.ndarray | RepackedWeight, prefix: str, bias: np.ndarray | None = None) -> str:
        """x [T, K] @ weight[N, K]^T (+ bias) -> [T, N]."""
        out = f"{prefix}_out"
        if isinstance(weight, BlockQuantWeight):
            out = self.block_quant(x, weight, prefix)
        elif isinstance(weight, np.ndarray) and self.options.quant == "fp32":
            self.node("MatMul", [x, self.init(prefix + "_wT", weight.T.astype(np.float32))], [out])
        else:
            if isinstance(weight, RepackedWeight):
                qw, mins = weight.weight, weight.mins
            else:
                qw, mins = quantize_blockwise(weight, self.options.bits, self.options.block_size), None
            self.node("MatMulNBits", [x, self.init(prefix + "_q", qw.packed), self.init(prefix + "_scales", qw.scales),
                                      self.init(prefix + "_zp", qw.zero_points)], [out], domain="com.microsoft",
                      K=qw.k, N=qw.n, bits=qw.bits, block_size=qw.block_size,
                      accuracy_level=self.options.accuracy_level)
            if mins is not None:  # Q4_1's block mins: + (per-block sums of x) @ mins, see edge.repack
                num_blocks = mins.shape[0]
                # Block sums as x @ indicator [K, K / 32] (ones on each block's rows; adding zeros is exact): one
                # node where Reshape + ReduceSum took two, at ~5 us of ORT overhead a node per matmul.
                indicator = np.kron(np.eye(num_blocks, dtype=np.float32), np.ones((qw.block_size, 1), np.float32))
                sums = self.node("MatMul", [x, self.const(f"block_indicator_{num_blocks}", indicator)],
                                 [prefix + "_x_block_sums"])[0]  # [T, num_blocks]
                # sums @ mins + out in one Gemm: a MatMul and an Add cost ~35% more per step on ORT CPU.
                out = self.node("Gemm", [sums, self.init(prefix + "_mins", mins), out], [prefix + "_shifted"])[0]
        if bias is not None:
            out = self.node("Add", [out, self.init(prefix + "_bias", bias.astype(np.float32))], [prefix + "_biased"])[0]
        return out

    def block_quant(self, x: str, weight: BlockQuantWeight | RescoredHead, prefix: str, *,
                    gamma: np.ndarray | None = None, skip: str | None = None, keep_sum: bool = True,
                    swiglu: bool = False) -> str | tuple[str, str]:
        """``hybrid_gateway::BlockQuantMatMul`` with its prologue fused in (edge/csrc/ort_ops.cpp): ``gamma``:
        RMSNorm(x (+ skip)) @ W^T, and with ``skip`` and ``keep_sum`` also the sum x + skip, returned as (out, sum);
        ``swiglu``: x is [T, 2K] = [gate, up] and silu(gate) * up @ W^T. A :class:`RescoredHead` is its 4-bit scan
        with the 8-bit weights as inputs 6 and 7 (attribute ``rescore``)."""
        rescored = weight if isinstance(weight, RescoredHead) else None
        if rescored is not None:
            weight = rescored.scan
        codes, scales, mins = weight.packed()
        inputs = [x, self.init(prefix + "_codes", codes), self.init(prefix + "_scales", scales),
                  self.init(prefix + "_mins", mins) if mins is not None else "", "", ""]
        attrs: dict = {"K": weight.k, "N": weight.n, "bits": weight.bits}
        outputs = [f"{prefix}_out"]
        if gamma is not None:
            inputs[4] = self.init(prefix + "_gamma", gamma.astype(np.float32))
            attrs.update(prologue=1, epsilon=float(self.config.rms_norm_eps))
            if skip is not None:
                inputs[5] = skip
                if keep_sum:
                    outputs.append(f"{prefix}_sum")
        elif swiglu:
            attrs["prologue"] = 2
        if rescored is not None:
            exact_codes, exact_scales, _ = rescored.exact.packed()
            inputs += [self.init(prefix + "_exact_codes", exact_codes),
                       self.init(prefix + "_exact_scales", exact_scales)]
            attrs["rescore"] = rescored.top
        while inputs[-1] == "":
            inputs.pop()
        self.node("BlockQuantMatMul", inputs, outputs, domain=CUSTOM_DOMAIN, **attrs)
        return outputs[0] if len(outputs) == 1 else (outputs[0], outputs[1])

    def rms_norm(self, x: str, weight: np.ndarray, prefix: str) -> str:
        return self.node("RMSNormalization", [x, self.init(prefix + "_gamma", weight)], [prefix + "_out"],
                         axis=-1, epsilon=self.config.rms_norm_eps)[0]

    def add_rms_norm(self, x: str, residual: str, weight: np.ndarray, prefix: str) -> tuple[str, str]:
        """(RMSNorm(x + residual), x + residual) in one fused node."""
        normed, total = prefix + "_out", prefix + "_sum"
        self.node("SkipSimplifiedLayerNormalization", [x, residual, self.init(prefix + "_gamma", weight)],
                  [normed, "", "", total], domain="com.microsoft", epsilon=self.config.rms_norm_eps)
        return normed, total

    def qkv_rope(self, h: str, w: _WeightReader, layer: int) -> None:
        """Graph outputs q [T, q_size], k, v [T, kv_size] of ``layer`` from its normed input ``h``."""
        c, q, kv = self.config, self.q_size, self.kv_size
        weight, bias = w.qkv(layer)
        qkv = self.linear(h, weight, f"l{layer}_qkv", bias)
        qk, _ = self.node("Split", [qkv, self.init(f"l{layer}_split_qkv", np.array([q + kv, kv]))],
                          [f"l{layer}_qk", "v"], axis=1)
        # RotaryEmbedding wants [batch, seq, heads * head_dim]; q and k heads rotate alike, so rope them together.
        qk3 = self.node("Reshape", [qk, self.init("shape_1tx", np.array([1, -1, q + kv]))], [f"l{layer}_qk3"])[0]
        rot = self.node("RotaryEmbedding", [qk3, "cos", "sin"], [f"l{layer}_qk_rot"],
                        num_heads=c.num_heads + c.num_kv_heads, interleaved=0)[0]
        rot2 = self.node("Reshape", [rot, self.init("shape_tx", np.array([-1, q + kv]))], [f"l{layer}_qk_rot2"])[0]
        self.node("Split", [rot2, self.init("split_qk", np.array([q, kv]))], ["q", "k"], axis=1)
        self.output("q", TensorProto.FLOAT, ["T", q])
        self.output("k", TensorProto.FLOAT, ["T", kv])
        self.output("v", TensorProto.FLOAT, ["T", kv])

    def attn_out_mlp(self, attn: str, residual: str, w: _WeightReader, layer: int, next_norm: np.ndarray,
                     next_prefix: str) -> tuple[str, str]:
        """o_proj + residual, post-attention norm, SwiGLU MLP + residual, then ``next_norm``: (normed, residual)."""
        p = f"model.layers.{layer}."
        inter = self.config.intermediate_size
        o = self.linear(attn, w.linear(p + "self_attn.o_proj.weight"), f"l{layer}_o")
        h, res = self.add_rms_norm(o, residual, w.get(p + "post_attention_layernorm.weight"), f"l{layer}_post_norm")
        gu = self.linear(h, w.gate_up(layer), f"l{layer}_gate_up")
        gate, up = self.node("Split", [gu, self.init(f"l{layer}_split_gu", np.array([inter, inter]))],
                             [f"l{layer}_gate", f"l{layer}_up"], axis=1)
        sig = self.node("Sigmoid", [gate], [f"l{layer}_sig"])[0]
        silu = self.node("Mul", [gate, sig], [f"l{layer}_silu"])[0]
        act = self.node("Mul", [silu, up], [f"l{layer}_act"])[0]
        down = self.linear(act, w.linear(p + "mlp.down_proj.weight"), f"l{layer}_down")
        return self.add_rms_norm(down, res, next_norm, next_prefix)

    # -- the three graph kinds ------------------------------------------------------------------------------
    def rope_rows(self, positions: str) -> tuple[str, str]:
        """cos/sin rows [T, head_dim / 2] at ``positions``, gathered from tables [max_positions, head_dim / 2]
        computed with the same float32 math as ``TransformerModel.rope``."""
        c = self.config
        inv_freq = rope_inv_freq(c)
        freqs = torch.arange(c.max_position_embeddings).float().unsqueeze(-1) * inv_freq.unsqueeze(0)
        return tuple(self.node("Gather", [self.init(f"{fn}_table", table.numpy()), positions], [f"{fn}_rows"])[0]
                     for fn, table in (("cos", freqs.cos()), ("sin", freqs.sin())))

    def build_pre(self, w: _WeightReader) -> None:
        c = self.config
        ids = self.input("input_ids", TensorProto.INT64, ["T"])
        positions = self.input("positions", TensorProto.INT64, ["T"])
        x = self.node("Gather", [self.init("embed_tokens", w.get("model.embed_tokens.weight")), ids], ["residual"])[0]
        self.output("residual", TensorProto.FLOAT, ["T", c.hidden_size])
        axes = self.init("axes0", np.array([0]))
        for fn, rows in zip(("cos", "sin"), self.rope_rows(positions)):
            self.node("Unsqueeze", [rows, axes], [fn])  # [1, T, head_dim / 2]
            self.output(fn, TensorProto.FLOAT, [1, "T", c.head_dim // 2])
        h = self.rms_norm(x, w.get("model.layers.0.input_layernorm.weight"), "l0_input_norm")
        self.qkv_rope(h, w, 0)

    def build_fused(self, w: _WeightReader, progress: Progress, task) -> None:
        """The whole step in one graph: every layer's attention is a ``hybrid_gateway::PagedAttention`` node that
        ropes q and k, writes this step's K/V into ``kv_cache`` (a graph input the runner binds to the engine's
        cache tensor) and attends on the paged cache (``edge/csrc/ort_ops.cpp``)."""
        c = self.config
        ids = self.input("input_ids", TensorProto.INT64, ["T"])
        positions = self.input("positions", TensorProto.INT64, ["T"])
        idx = self.input("logits_indices", TensorProto.INT64, ["S"])
        cache = self.input("kv_cache", TensorProto.FLOAT16 if self.options.kv_dtype == "float16" else TensorProto.FLOAT,
                           [c.num_layers, 2, "num_blocks", "block_size", c.num_kv_heads, c.head_dim])
        meta = [cache,
                self.input("block_tables", TensorProto.INT32, ["num_seqs", "max_blocks"]),
                self.input("seq_lens", TensorProto.INT32, ["num_seqs"]),
                self.input("cu_seqlens_q", TensorProto.INT32, ["num_seqs_plus_1"]),
                self.input("slot_mapping", TensorProto.INT64, ["T"])]
        residual = self.node("Gather", [self.init("embed_tokens", w.get("model.embed_tokens.weight")), ids],
                             ["embedded"])[0]
        cos, sin = self.rope_rows(positions)
        if self.options.matmul == "hgw":
            self._fused_block_quant_layers(w, residual, cos, sin, idx, meta, progress, task)
            return
        h = self.rms_norm(residual, w.get("model.layers.0.input_layernorm.weight"), "l0_input_norm")
        for layer in range(c.num_layers):
            weight, bias = w.qkv(layer)
            qkv = self.linear(h, weight, f"l{layer}_qkv", bias)
            attn = self.node("PagedAttention", [qkv, cos, sin, *meta], [f"l{layer}_attn"], domain=CUSTOM_DOMAIN,
                             layer=layer, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                             scale=float(c.head_dim ** -0.5))[0]
            if layer < c.num_layers - 1:
                next_norm = w.get(f"model.layers.{layer + 1}.input_layernorm.weight")
                h, residual = self.attn_out_mlp(attn, residual, w, layer, next_norm, f"l{layer + 1}_input_norm")
            else:  # only the sampled rows need the last MLP, the final norm and the LM head
                attn_s = self.node("Gather", [attn, idx], ["attn_rows"], axis=0)[0]
                res_s = self.node("Gather", [residual, idx], ["residual_rows"], axis=0)[0]
                h, _ = self.attn_out_mlp(attn_s, res_s, w, layer, w.get("model.norm.weight"), "final_norm")
            progress.update(task, description=f"Building model.onnx, layer {layer + 1}/{c.num_layers} "
                                              f"({self.options.quant})")
        logits = self.linear(h, w.lm_head(), "lm_head")
        self.node("Identity", [logits], ["logits"])
        self.output("logits", TensorProto.FLOAT, ["S", c.vocab_size])

    def _fused_block_quant_layers(self, w: _WeightReader, embedded: str, cos: str, sin: str, idx: str,
                                  meta: list[str], progress: Progress, task) -> None:
        """The fused graph's layers on ``BlockQuantMatMul`` with every norm and SwiGLU inside a matmul node: per
        layer QKV (input norm, and the residual add before it), PagedAttention, o_proj, gate/up (post-attention
        norm and residual add), down (SwiGLU): five nodes where the unfused graph has nine."""
        c = self.config
        x, skip = embedded, None  # the residual stream is x + skip, summed by the next normed matmul
        for layer in range(c.num_layers):
            p = f"model.layers.{layer}."
            weight, bias = w.qkv(layer)
            gamma = w.get(p + "input_layernorm.weight")
            if skip is None:
                qkv, residual = self.block_quant(x, weight, f"l{layer}_qkv", gamma=gamma), x
            else:
                qkv, residual = self.block_quant(x, weight, f"l{layer}_qkv", gamma=gamma, skip=skip)
            if bias is not None:
                qkv = self.node("Add", [qkv, self.init(f"l{layer}_qkv_bias", bias.astype(np.float32))],
                                [f"l{layer}_qkv_biased"])[0]
            attn = self.node("PagedAttention", [qkv, cos, sin, *meta], [f"l{layer}_attn"], domain=CUSTOM_DOMAIN,
                             layer=layer, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                             scale=float(c.head_dim ** -0.5))[0]
            if layer == c.num_layers - 1:  # only the sampled rows need the rest
                attn = self.node("Gather", [attn, idx], ["attn_rows"], axis=0)[0]
                residual = self.node("Gather", [residual, idx], ["residual_rows"], axis=0)[0]
            o = self.block_quant(attn, w.linear(p + "self_attn.o_proj.weight"), f"l{layer}_o")
            gu, skip = self.block_quant(o, w.gate_up(layer), f"l{layer}_gate_up",
                                        gamma=w.get(p + "post_attention_layernorm.weight"), skip=residual)
            x = self.block_quant(gu, w.linear(p + "mlp.down_proj.weight"), f"l{layer}_down", swiglu=True)
            progress.update(task, description=f"Building model.onnx, layer {layer + 1}/{c.num_layers} "
                                              f"({self.options.quant}, BlockQuantMatMul)")
        logits = self.block_quant(x, w.lm_head(), "lm_head", gamma=w.get("model.norm.weight"), skip=skip,
                                  keep_sum=False)
        self.node("Identity", [logits], ["logits"])
        self.output("logits", TensorProto.FLOAT, ["S", c.vocab_size])

    def _attn_inputs(self) -> tuple[str, str]:
        attn = self.input("attn", TensorProto.FLOAT, ["T", self.q_size])
        residual = self.input("residual", TensorProto.FLOAT, ["T", self.config.hidden_size])
        return attn, residual

    def build_mid(self, w: _WeightReader, layer: int) -> None:
        c = self.config
        attn, residual = self._attn_inputs()
        for fn in ("cos", "sin"):
            self.input(fn, TensorProto.FLOAT, [1, "T", c.head_dim // 2])
        next_norm = w.get(f"model.layers.{layer + 1}.input_layernorm.weight")
        h, res = self.attn_out_mlp(attn, residual, w, layer, next_norm, f"l{layer + 1}_input_norm")
        self.node("Identity", [res], ["residual_out"])
        self.output("residual_out", TensorProto.FLOAT, ["T", c.hidden_size])
        self.qkv_rope(h, w, layer + 1)

    def build_final(self, w: _WeightReader, layer: int) -> None:
        c = self.config
        attn, residual = self._attn_inputs()
        idx = self.input("logits_indices", TensorProto.INT64, ["S"])
        # Only the sampled rows need the last MLP, the final norm and the LM head.
        attn_s = self.node("Gather", [attn, idx], ["attn_rows"], axis=0)[0]
        res_s = self.node("Gather", [residual, idx], ["residual_rows"], axis=0)[0]
        h, _ = self.attn_out_mlp(attn_s, res_s, w, layer, w.get("model.norm.weight"), "final_norm")
        logits = self.linear(h, w.lm_head(), "lm_head")
        self.node("Identity", [logits], ["logits"])
        self.output("logits", TensorProto.FLOAT, ["S", c.vocab_size])

