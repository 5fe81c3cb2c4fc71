"""The edge model runner: ONNX Runtime for the dense parts, ``kernels`` attention on the shared paged KV cache.

Two layouts (:class:`edge.builder.BuildOptions`):

* ``"fused"`` (the default on CPU when the custom op builds, :mod:`edge.ortop`): one graph, one ONNX Runtime
  call per step. Each layer's attention is a ``hybrid_gateway::PagedAttention`` node running the shared C++
  attention core of ``kernels/attention/csrc`` on the engine's KV cache tensor, bound as a graph input; int4
  linear layers are ``hybrid_gateway::BlockQuantMatMul`` nodes (``matmul="hgw"``, :mod:`edge.blockquant`).
* ``"split"`` (CUDA, or no C++ compiler): ``num_layers + 1`` sessions with ``kernels.attention`` called
  between them from Python.

Per-step overhead is kept low by binding every session's inputs and outputs once to preallocated torch
buffers (IOBinding over the tensors' memory, no copies through numpy): a step then only copies the
batch's ids into the bound buffers (and, fused, binds this step's block tables) and calls
``run_with_iobinding``. Buffers and bindings are cached per ``(num_tokens, num_sampled)``, so decode steps
of one batch size reuse the same ones.

On CUDA the sessions use the CUDA provider on torch's current stream, the buffers are CUDA tensors and
nothing is copied to the host (untested here: no GPU on the development machines).
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort
import torch

from edge import hugepages, ortop
from edge.builder import LAYOUTS, MATMULS, BuildOptions, KvDtype, LmHead, OnnxModel, Quant, Source, build_onnx_model
from kernels.attention import IMPLS, attention_kv, resolve_impl
from kernels.checkpoints import Checkpoint, ModelConfig
from kernels.runner import ModelInput

_MAX_CACHED_SHAPES = 8
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_KV_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share one core's matmul units)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return max(1, min(cores or os.cpu_count() or 1, len(os.sched_getaffinity(0))))


_global_pool_threads: int | None = None  # set once by use_global_thread_pool


def use_global_thread_pool(num_threads: int | None = None) -> bool:
    """Make every ONNX Runtime session this process creates share one intra-op thread pool.

    One pool for all ``num_layers + 1`` sessions keeps its worker threads warm between the sessions of a
    step, where one pool per session wakes a sleeping thread for every parallel op: batch-1 decode goes
    from ~67 to ~80 tok/s on our 2 cores (``bench/edge_decode.py --global-pool``). Once it is on, ONNX
    Runtime refuses any session of the process that asks for its own pool, so only process entry points
    call this (``serve``, ``bench``), never library code. Returns False, changing nothing, when ORT
    refuses (the sizes were already set).
    """
    global _global_pool_threads
    num_threads = num_threads or physical_cores()
    if _global_pool_threads is not None:
        return _global_pool_threads == num_threads
    try:
        ort.capi._pybind_state.set_global_thread_pool_sizes(num_threads, 1)
    except Exception:  # noqa: BLE001 - ORT raises its own Fail type: global pools exist already
        return False
    _global_pool_threads = num_threads
    return True


class OnnxRunner:
    """A :class:`kernels.runner.ModelRunner` on ONNX Runtime.

    ``checkpoint`` is a :class:`Checkpoint` or a path :func:`kernels.checkpoints.load_checkpoint` opens; the
    graphs are built (or reused) by :func:`edge.builder.build_onnx_model` with ``quant``, ``block_size``,
    ``accuracy_level``, ``source``, ``matmul`` and ``lm_head`` (see :class:`edge.builder.BuildOptions`;
    ``matmul="auto"`` takes ``"hgw"``, the custom block-quantized matmul, wherever it applies: the fused layout,
    int4, int8 activations).
    ``intra_op_num_threads`` defaults to the
    physical cores; above 1 it sizes ORT's process-wide pool, which the first runner creates and later ones
    share (``self.intra_op_num_threads`` says the size in force). ``providers`` defaults to CUDA when torch
    sees a GPU, else CPU. ``attention_threads`` is torch's thread count during a CPU step (``None`` leaves it).
    ``huge_pages`` (CPU, ``matmul="hgw"``) keeps the weights in transparent huge pages (:mod:`edge.hugepages`).
    ``kv_dtype`` (``"float32"``, or for the fused layout ``"float16"``; ``"auto"``: float16 where the layout is
    fused, else float32) is the element type of the caches :meth:`execute` takes (``self.kv_dtype``, a torch dtype).
    One runner executes one step at a time (its bound buffers are reused across steps).

    >>> runner = OnnxRunner("SmolLM2-135M-Instruct.Q4_1.gguf", quant="int4")  # doctest: +SKIP
    >>> logits = runner.execute(batch, kv_cache)  # [len(batch.logits_indices), vocab] float32  # doctest: +SKIP
    """

    def __init__(self, checkpoint: Checkpoint | str | os.PathLike[str], quant: Quant = "int4", *,
                 block_size: int = 32, accuracy_level: int | None = None, source: Source = "auto",
                 intra_op_num_threads: int | None = None, providers: Sequence[str] | None = None,
                 attention_impl: str = "auto", layout: str = "auto", matmul: str = "auto", lm_head: LmHead = "auto",
                 attention_threads: int | None = 1, cache_root: Path | None = None,
                 force_build: bool = False, huge_pages: bool = True, kv_dtype: str = "float32") -> None:
        if attention_impl not in IMPLS:
            raise ValueError(f"attention_impl must be one of {IMPLS}, got {attention_impl!r}")
        if intra_op_num_threads is not None and (not isinstance(intra_op_num_threads, int) or intra_op_num_threads < 1):
            raise ValueError(f"intra_op_num_threads must be a positive int or None, got {intra_op_num_threads!r}")
        if attention_threads is not None and (not isinstance(attention_threads, int) or attention_threads < 1):
            raise ValueError(f"attention_threads must be a positive int or None, got {attention_threads!r}")
        if layout not in ("auto", *LAYOUTS):
            raise ValueError(f"layout must be one of {('auto', *LAYOUTS)}, got {layout!r}")
        if matmul not in ("auto", *MATMULS):
            raise ValueError(f"matmul must be one of {('auto', *MATMULS)}, got {matmul!r}")
        self.providers = _resolve_providers(providers)
        on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        self.layout = self._resolve_layout(layout, attention_impl)
        if matmul == "auto":  # hgw: int8 activations; accuracy_level 0 asks for float ones, which only ORT has
            matmul = ("hgw" if self.layout == "fused" and quant == "int4" and block_size == 32
                      and accuracy_level in (None, 4) else "ort")
        self.matmul = matmul
        if kv_dtype not in ("auto", *_KV_TORCH_DTYPES):
            raise ValueError(f"kv_dtype must be one of {('auto', *_KV_TORCH_DTYPES)}, got {kv_dtype!r}")
        if kv_dtype == "auto":  # half caches where the fused op reads them, float32 for the split layout
            kv_dtype = "float16" if self.layout == "fused" else "float32"
        options = BuildOptions(quant=quant, block_size=block_size, accuracy_level=accuracy_level, source=source,
                               layout=self.layout, matmul=matmul, lm_head=lm_head, kv_dtype=cast(KvDtype, kv_dtype))
        # The cache's element type (EngineCore allocates it: EngineConfig.kv_dtype; edge.engine passes this one).
        self.kv_dtype: torch.dtype = _KV_TORCH_DTYPES[kv_dtype]
        self.model: OnnxModel = build_onnx_model(checkpoint, options, cache_root=cache_root, force=force_build)
        self.config: ModelConfig = self.model.config
        self.lm_head = self.model.lm_head  # "auto" resolved: "stored", "int4" or "rescore"
        self.attention_impl = attention_impl
        if self.layout == "split" and self.device.type == "cpu" and attention_impl in ("auto", "native"):
            # Build (once per machine) or load the native decode-attention op now, not in the first request.
            resolve_impl(attention_impl, torch.empty(0))
        # torch's intra-op threads while the step runs on CPU. Attention at edge batch sizes is a chain of tiny
        # ops; handing each to a second thread costs more than it saves (10x slower on a loaded 2-core box).
        self.attention_threads = attention_threads if self.device.type == "cpu" else None
        # What the engine loop should give torch for its own work around a step (EngineCore reads it): on CPU
        # one thread, leaving the cores to ORT's pool. A parallel argmax over a batch of logits next to ORT's
        # spinning workers cost 4.5 ms instead of 0.7 at 16 requests, and slowed ORT's next run by a quarter.
        self.host_threads: int | None = 1 if self.device.type == "cpu" else None
        self.intra_op_num_threads = _global_pool_threads or intra_op_num_threads or physical_cores()
        # The custom matmul streams the initializers themselves: on CPU they are read into 2 MiB pages
        # (edge.hugepages; ~6% off a batch-1 step). ORT's MatMulNBits streams prepacked copies of its own, so its
        # graphs keep ORT's loading. ``weights_huge_pages``: the kernel took the advice. The arrays and OrtValues
        # must outlive the sessions.
        self.huge_pages = huge_pages and self.device.type == "cpu" and self.matmul == "hgw"
        self._external: list[tuple[hugepages.ExternalWeights, list[ort.OrtValue]]] = []
        self.sessions = [self._session(path) for path in self.model.paths]
        self.weights_huge_pages = bool(self._external) and all(w.advised for w, _ in self._external)
        self._run_options = ort.RunOptions()
        if self.device.type == "cuda":
            # Stream order (ORT and torch share one stream) is the only synchronization needed.
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._steps: OrderedDict[tuple[int, int], _StepBuffers] = OrderedDict()
        c = self.config
        self.scale = c.head_dim ** -0.5

    def _resolve_layout(self, layout: str, attention_impl: str) -> str:
        if layout == "split":
            return layout
        if layout == "fused":
            if self.device.type != "cpu":
                raise ValueError("layout='fused' runs attention in an ONNX Runtime CPU op; on CUDA use 'split'")
            if attention_impl not in ("auto", "native"):
                raise ValueError(f"layout='fused' runs the native attention core; attention_impl={attention_impl!r} "
                                 f"needs layout='split'")
            if not ortop.available():
                raise ValueError(f"layout='fused' but the ONNX Runtime attention op is unavailable: "
                                 f"{ortop.unavailable_reason()}")
            return layout
        fused = self.device.type == "cpu" and attention_impl in ("auto", "native") and ortop.available()
        return "fused" if fused else "split"

    def _session(self, path: Path) -> ort.InferenceSession:
        so = ort.SessionOptions()
        weights = hugepages.load(path) if self.huge_pages else None
        if weights is not None:
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.arrays.values()]
            for name, value in zip(weights.arrays, values):
                so.add_initializer(name, value)  # used instead of the file's copy
            self._external.append((weights, values))
        if self.layout == "fused":
            so.register_custom_ops_library(str(ortop.library_path()))
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if _global_pool_threads is not None:
            so.use_per_session_threads = False  # the process-wide pool (use_global_thread_pool)
        elif self.intra_op_num_threads > 1:
            # num_layers + 1 sessions each own a pool: spinning workers would fight over the cores between
            # calls, so they sleep instead (measured at 2 threads on a loaded 2-core machine: 56 tok/s, vs 22
            # with ORT's process-wide pool, which also breaks every later session made with default options).
            so.intra_op_num_threads = self.intra_op_num_threads
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        else:
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        providers: list = list(self.providers)
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device).cuda_stream
            providers[0] = ("CUDAExecutionProvider", {"device_id": str(self.device.index),
                                                      "has_user_compute_stream": "1",
                                                      "user_compute_stream": str(stream)})
        return ort.InferenceSession(str(path), so, providers=providers)

    @torch.no_grad()
    def execute(self, batch: ModelInput, kv_cache: torch.Tensor) -> torch.Tensor:
        """Write the batch's K/V into ``kv_cache`` layer by layer and return the sampled rows' float32 logits."""
        self._check_cache(kv_cache)
        if self.attention_threads is None:
            return self._execute(batch, kv_cache)
        saved = torch.get_num_threads()
        torch.set_num_threads(self.attention_threads)
        try:
            return self._execute(batch, kv_cache)
        finally:
            torch.set_num_threads(saved)

    def _execute(self, batch: ModelInput, kv_cache: torch.Tensor) -> torch.Tensor:
        if self.layout == "fused":
            return self._execute_fused(batch, kv_cache)
        c = self.config
        num_tokens, num_sampled = batch.input_ids.shape[0], batch.logits_indices.shape[0]
        step = self._step_buffers(num_tokens, num_sampled)
        step.input_ids.copy_(batch.input_ids)
        step.positions.copy_(batch.positions)
        step.logits_indices.copy_(batch.logits_indices)
        q = step.q.view(num_tokens, c.num_heads, c.head_dim)
        kv = step.kv.view(2, num_tokens, c.num_kv_heads, c.head_dim)
        attn_out = step.attn.view(num_tokens, c.num_heads, c.head_dim)
        run, opts, meta, scale, impl = step.runs, self._run_options, batch.attn, self.scale, self.attention_impl
        threads = self.intra_op_num_threads  # the native decode op may use ORT's cores while ORT waits
        run[0](opts)
        for layer in range(c.num_layers):
            attention_kv(q, kv, kv_cache[layer], meta, scale, impl, out=attn_out, threads=threads)
            if layer == c.num_layers - 1 and num_sampled == 0:
                break  # nothing to sample (a middle prefill chunk): the cache is written, skip the head
            run[layer + 1](opts)
        return step.logits.clone()

    def _execute_fused(self, batch: ModelInput, kv_cache: torch.Tensor) -> torch.Tensor:
        num_tokens, num_sampled = batch.input_ids.shape[0], batch.logits_indices.shape[0]
        # A middle prefill chunk samples nothing, but ORT cannot bind an empty output: sample row 0, drop it.
        step = self._step_buffers(num_tokens, max(num_sampled, 1))
        step.input_ids.copy_(batch.input_ids)
        step.positions.copy_(batch.positions)
        if num_sampled:
            step.logits_indices.copy_(batch.logits_indices)
        else:
            step.logits_indices.zero_()
        meta = batch.attn
        step.bind_step(kv_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, meta.slot_mapping)
        step.runs[0](self._run_options)
        return step.logits.clone() if num_sampled else step.logits[:0].clone()

    def _check_cache(self, kv_cache: torch.Tensor) -> None:
        c = self.config
        if (kv_cache.ndim != 6 or kv_cache.shape[0] != c.num_layers or kv_cache.shape[1] != 2
                or kv_cache.shape[4:] != (c.num_kv_heads, c.head_dim)):
            raise ValueError(f"kv_cache must be [num_layers={c.num_layers}, 2, num_blocks, block_size, "
                             f"num_kv_heads={c.num_kv_heads}, head_dim={c.head_dim}], got {tuple(kv_cache.shape)}")
        if kv_cache.dtype != self.kv_dtype or kv_cache.device != self.device:
            raise ValueError(f"kv_cache must be {str(self.kv_dtype).removeprefix('torch.')} on {self.device} (the "
                             f"runner's kv_dtype), got {kv_cache.dtype} on {kv_cache.device}")

    def _step_buffers(self, num_tokens: int, num_sampled: int) -> _StepBuffers:
        key = (num_tokens, num_sampled)
        step = self._steps.get(key)
        if step is None:
            step = _StepBuffers(self, num_tokens, num_sampled)
            self._steps[key] = step
            if len(self._steps) > _MAX_CACHED_SHAPES:
                self._steps.popitem(last=False)
        else:
            self._steps.move_to_end(key)
        return step


class _StepBuffers:
    """Preallocated activations for one ``(num_tokens, num_sampled)`` and every session's IOBinding over them."""

    def __init__(self, runner: OnnxRunner, num_tokens: int, num_sampled: int) -> None:
        if runner.layout == "fused":
            self._init_fused(runner, num_tokens, num_sampled)
            return
        c, dev, f32 = runner.config, runner.device, torch.float32
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        self.logits_indices = torch.zeros(num_sampled, dtype=torch.int64, device=dev)
        self.q = torch.empty(num_tokens, q_size, dtype=f32, device=dev)
        # New keys and values side by side, as attention_kv takes them (one cache write and one gather a layer).
        self.kv = torch.empty(2, num_tokens, kv_size, dtype=f32, device=dev)
        self.attn = torch.zeros(num_tokens, q_size, dtype=f32, device=dev)
        # Ping-pong: layer i reads residual[i % 2] and writes residual[(i + 1) % 2].
        self.residual = [torch.empty(num_tokens, c.hidden_size, dtype=f32, device=dev) for _ in range(2)]
        self.cos = torch.empty(1, num_tokens, c.head_dim // 2, dtype=f32, device=dev)
        self.sin = torch.empty_like(self.cos)
        self.logits = torch.empty(num_sampled, c.vocab_size, dtype=f32, device=dev)
        qkv = {"q": self.q, "k": self.kv[0], "v": self.kv[1]}

        sessions = runner.sessions
        self.bindings = [_bind(sessions[0], {"input_ids": self.input_ids, "positions": self.positions},
                               {**qkv, "residual": self.residual[0], "cos": self.cos, "sin": self.sin})]
        for layer in range(c.num_layers - 1):
            inputs = {"attn": self.attn, "residual": self.residual[layer % 2], "cos": self.cos, "sin": self.sin}
            self.bindings.append(_bind(sessions[layer + 1], inputs,
                                       {**qkv, "residual_out": self.residual[(layer + 1) % 2]}))
        if num_sampled:  # ORT cannot bind empty buffers; execute() skips the final graph then
            final_inputs = {"attn": self.attn, "residual": self.residual[(c.num_layers - 1) % 2],
                            "logits_indices": self.logits_indices}
            self.bindings.append(_bind(sessions[-1], final_inputs, {"logits": self.logits}))
        # The pybind calls themselves: InferenceSession.run_with_iobinding's Python wrapper checks for WebGPU
        # graph capture on every call, ~45 us each (measured), i.e. ~1.4 ms of a 31-session decode step.
        self.runs = [functools.partial(_run_bound, session._sess, binding._iobinding)
                     for session, binding in zip(sessions, self.bindings)]


    def _init_fused(self, runner: OnnxRunner, num_tokens: int, num_sampled: int) -> None:
        dev = runner.device
        self.input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        self.logits_indices = torch.zeros(num_sampled, dtype=torch.int64, device=dev)
        self.logits = torch.empty(num_sampled, runner.config.vocab_size, dtype=torch.float32, device=dev)
        session = runner.sessions[0]
        self.binding = _bind(session, {"input_ids": self.input_ids, "positions": self.positions,
                                       "logits_indices": self.logits_indices}, {"logits": self.logits})
        self.bindings = [self.binding]
        self.runs = [functools.partial(_run_bound, session._sess, self.binding._iobinding)]
        self._bound: dict[str, tuple[int, tuple[int, ...]]] = {}

    def bind_step(self, kv_cache: torch.Tensor, *metadata: torch.Tensor) -> None:
        """Bind the cache and this step's attention metadata (rebinding only what moved or changed shape)."""
        names = ("kv_cache", "block_tables", "seq_lens", "cu_seqlens_q", "slot_mapping")
        if not kv_cache.is_contiguous():
            raise ValueError("the fused layout writes into kv_cache in place: it must be contiguous")
        for name, t in zip(names, (kv_cache, *metadata)):
            if not t.is_contiguous():
                t = t.contiguous()
                setattr(self, f"_hold_{name}", t)  # keep the copy alive until the run
            key = (t.data_ptr(), tuple(t.shape))
            if self._bound.get(name) != key:
                self.binding.bind_input(name, t.device.type, t.device.index or 0, _NP_DTYPES[t.dtype],
                                        list(t.shape), t.data_ptr())
                self._bound[name] = key


def _run_bound(sess, binding, run_options: ort.RunOptions) -> None:
    sess.run_with_iobinding(binding, run_options)


def _bind(session: ort.InferenceSession, inputs: dict[str, torch.Tensor],
          outputs: dict[str, torch.Tensor]) -> ort.IOBinding:
    binding = session.io_binding()
    for bind, tensors in ((binding.bind_input, inputs), (binding.bind_output, outputs)):
        for name, t in tensors.items():
            assert t.is_contiguous(), name
            device_id = t.device.index or 0
            bind(name, t.device.type, device_id, _NP_DTYPES[t.dtype], list(t.shape), t.data_ptr())
    return binding


def _resolve_providers(providers: Sequence[str] | None) -> list[str]:
    available = ort.get_available_providers()
    if providers is None:
        # onnxruntime-gpu lists CUDA even on a machine without a GPU: ask torch whether one is there.
        if "CUDAExecutionProvider" in available and torch.cuda.is_available():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    providers = list(providers)
    supported = ("CPUExecutionProvider", "CUDAExecutionProvider")
    if not providers or any(p not in supported for p in providers):
        raise ValueError(f"providers must be a non-empty list from {supported}, got {providers!r}")
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"execution providers {missing} are not available in this onnxruntime build "
                         f"(available: {available})")
    if providers[0] == "CUDAExecutionProvider" and not torch.cuda.is_available():
        raise ValueError("CUDAExecutionProvider requested but torch sees no CUDA device")
    return providers
