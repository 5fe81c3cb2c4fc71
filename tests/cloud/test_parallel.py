"""Tensor-parallel layers and model against the dense reference on tiny random checkpoints.

Shard loading is checked without any process group (layers take their rank explicitly); the forward
is checked with real processes: rank 0 is this test process, rank 1 a spawned child, over gloo.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cloud import CloudEngine, TensorParallelError, TPTransformerModel, check_tp_degree
from cloud.parallel import ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear
from kernels.checkpoints import ModelConfig, load_checkpoint
from kernels.kv_cache.layout import KVCacheSpec
from kernels.model import TransformerModel
from kernels.runner import ModelInput, ReferenceRunner
from kernels.sampling import SamplingParams
from tests.cloud import tp_helpers as helpers
from tests.kernels.tolerances import tolerance

# fp32 throughout: the row-parallel all-reduce only changes the summation order.
LOGITS_TOL = tolerance(torch.float32)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {name: helpers.write_variant(root, name) for name in helpers.VARIANTS}


# ----------------------------------------------------------------------------- shards, no group
@pytest.mark.parametrize("name", list(helpers.VARIANTS))
def test_each_layer_loads_only_its_slice(checkpoints, name):
    ckpt = load_checkpoint(checkpoints[name])
    cfg = ckpt.config
    layer, d = "model.layers.1", cfg.head_dim
    full = {n: ckpt.get_tensor(n) for n in ckpt.tensor_names()}
    for rank in range(2):
        qkv = QKVParallelLinear(cfg.hidden_size, d, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias,
                                tp_rank=rank, tp_size=2)
        qkv.load(ckpt, [f"{layer}.self_attn.{p}_proj" for p in "qkv"])
        q_rows, kv_rows = slice(rank * 2 * d, (rank + 1) * 2 * d), slice(rank * d, (rank + 1) * d)  # 2 q heads, 1 kv
        expected = torch.cat([full[f"{layer}.self_attn.q_proj.weight"][q_rows],
                              full[f"{layer}.self_attn.k_proj.weight"][kv_rows],
                              full[f"{layer}.self_attn.v_proj.weight"][kv_rows]])
        torch.testing.assert_close(qkv.weight.data, expected, atol=0, rtol=0, msg=f"{name} qkv rank {rank}")
        if cfg.attention_bias:
            expected_bias = torch.cat([full[f"{layer}.self_attn.q_proj.bias"][q_rows],
                                       full[f"{layer}.self_attn.k_proj.bias"][kv_rows],
                                       full[f"{layer}.self_attn.v_proj.bias"][kv_rows]])
            torch.testing.assert_close(qkv.bias.data, expected_bias, atol=0, rtol=0, msg=f"{name} qkv bias")

        inter = cfg.intermediate_size // 2
        gate_up = ColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, tp_rank=rank, tp_size=2)
        gate_up.load(ckpt, [f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"])
        rows = slice(rank * inter, (rank + 1) * inter)
        expected = torch.cat([full[f"{layer}.mlp.gate_proj.weight"][rows], full[f"{layer}.mlp.up_proj.weight"][rows]])
        torch.testing.assert_close(gate_up.weight.data, expected, atol=0, rtol=0, msg=f"{name} gate/up rank {rank}")

        down = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp_rank=rank, tp_size=2)
        down.load(ckpt, f"{layer}.mlp.down_proj")
        torch.testing.assert_close(down.weight.data, full[f"{layer}.mlp.down_proj.weight"][:, rows], atol=0, rtol=0,
                                   msg=f"{name} down_proj rank {rank}")


def test_vocab_shards_are_padded_to_a_multiple_of_tp(checkpoints):
    ckpt = load_checkpoint(checkpoints["llama-hf-tied"])
    table = ckpt.get_tensor("model.embed_tokens.weight")  # [320, hidden]: 320 = 3 * 107 - 1
    shards = []
    for rank in range(3):
        head = ParallelLMHead(320, ckpt.config.hidden_size, tp_rank=rank, tp_size=3)
        head.load(ckpt, "model.embed_tokens")
        assert head.weight.shape == (107, ckpt.config.hidden_size)
        shards.append(head.weight.data)
    padded = torch.cat(shards)
    torch.testing.assert_close(padded[:320], table, atol=0, rtol=0, msg="shards concatenate to the table")
    assert not padded[320:].any(), "the padding row is zero"


# -------------------------------------------------------------------------------- degree errors
def test_degree_that_does_not_divide_the_heads_is_refused_with_the_valid_ones():
    smollm2 = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                          num_heads=9, num_kv_heads=3, head_dim=64)
    with pytest.raises(TensorParallelError) as err:
        check_tp_degree(smollm2, 2, "SmolLM2")
    assert str(err.value) == ("tensor-parallel degree 2 does not divide SmolLM2's 9 attention heads / 3 KV heads; "
                              "use 1 or 3")
    check_tp_degree(smollm2, 3)
    assert isinstance(err.value, ValueError)


def test_cloud_engine_refuses_a_bad_degree_before_spawning(checkpoints):
    with pytest.raises(TensorParallelError, match=r"degree 3 does not divide .*4 attention heads / 2 KV heads; "
                                                  r"use 1 or 2"):
        CloudEngine.from_model(checkpoints["qwen2-hf-untied"], tp=3)
    assert not dist.is_initialized()
    assert helpers.live_children() == []


# ------------------------------------------------------------------------- forward vs reference
def _two_steps(block_size: int) -> list[ModelInput]:
    """A prefill of two sequences (7 and 3 tokens), then one decode step for both."""
    tables = [[5, 2], [9]]
    prefill = ModelInput.build([[11, 42, 7, 300, 5, 19, 63], [8, 250, 31]], [0, 0], tables, [True, True], block_size)
    decode = ModelInput.build([[17], [99]], [7, 3], tables, [True, True], block_size)
    return [prefill, decode]


@pytest.mark.parametrize("name", list(helpers.VARIANTS))
def test_tp1_shard_is_the_reference_model(checkpoints, name):
    ckpt = load_checkpoint(checkpoints[name])
    cfg = ckpt.config
    ref = ReferenceRunner(TransformerModel.from_checkpoint(ckpt, attention_impl="torch"))
    tp1 = TPTransformerModel.from_checkpoint(ckpt, attention_impl="torch", tp_rank=0, tp_size=1)
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, 4)
    ref_cache, tp_cache = spec.allocate(), spec.allocate()
    for step in _two_steps(4):
        with torch.no_grad():
            expected = ref.execute(step, ref_cache)
            got = tp1.compute_logits(tp1(step.input_ids, step.positions, tp_cache, step.attn)[step.logits_indices])
        torch.testing.assert_close(got, expected, **LOGITS_TOL, msg=f"{name}: tp=1 logits")


@pytest.fixture(scope="module", params=list(helpers.VARIANTS))
def tp2(request, checkpoints):
    """(variant name, checkpoint path, a TP=2 CloudEngine not started: tests drive its core directly)."""
    path = checkpoints[request.param]
    engine = CloudEngine.from_model(path, tp=2, config=helpers.engine_config(), threads_per_rank=1,
                                    attention_impl="torch")
    yield request.param, path, engine
    engine.shutdown()
    assert helpers.wait_until(lambda: helpers.live_children() == [], 10), helpers.live_children()


def test_tp2_logits_equal_the_reference(tp2):
    name, path, engine = tp2
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    assert engine.core.kv_cache.shape[4] == cfg.num_kv_heads // 2, "rank 0 allocates only its KV heads"
    ref = ReferenceRunner(TransformerModel.from_checkpoint(ckpt, attention_impl="torch"))
    ref_cache = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 64, 4).allocate()
    for i, step in enumerate(_two_steps(4)):
        expected = ref.execute(step, ref_cache)
        got = engine.core.runner.execute(step, engine.core.kv_cache)
        torch.testing.assert_close(got, expected, **LOGITS_TOL, msg=f"{name}: tp=2 logits, step {i}")
    # Rank 0's KV shard holds the reference cache's first half of the KV heads.
    written = ref_cache[:, :, [2, 5, 9]]
    torch.testing.assert_close(engine.core.kv_cache[:, :, [2, 5, 9]], written[..., :cfg.num_kv_heads // 2, :],
                               **LOGITS_TOL, msg=f"{name}: rank 0 KV shard")


def test_tp2_greedy_tokens_equal_the_reference_with_continuous_batching(tp2):
    name, path, engine = tp2
    batch = helpers.prompts(6)
    expected = [s.output_ids for s in helpers.reference_engine(path).generate(batch, GREEDY)]
    got = [s.output_ids for s in engine.core.generate(batch, GREEDY)]
    assert got == expected, name
    assert engine.core.stats().num_blocks_used == 0
    assert engine.core.stats().steps > len(batch), "chunked prefill and decode over several steps"
