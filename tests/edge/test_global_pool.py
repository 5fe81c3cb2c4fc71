"""``use_global_thread_pool``: one ONNX Runtime pool for every session of a process.

It changes process-wide ORT state, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, tmp_path: Path) -> dict:
    script = textwrap.dedent(code).replace("TMP", str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_global_pool_runner_gives_the_reference_tokens(tmp_path):
    result = _run("""
        import json
        from pathlib import Path
        from edge.runner import OnnxRunner, use_global_thread_pool
        first = use_global_thread_pool(2)
        from kernels.checkpoints import load_checkpoint
        from kernels.engine import EngineConfig, EngineCore
        from kernels.model import TransformerModel
        from kernels.runner import ReferenceRunner
        from kernels.tokenizer import Tokenizer
        from tests.kernels import checkpoint_factory as factory
        from tests.kernels.engine_helpers import GREEDY, make_prompts
        config = factory.tiny_config("llama", tie_word_embeddings=True)
        path = factory.write_hf_checkpoint(Path("TMP") / "m", config, factory.random_state_dict(config, 3))
        ckpt = load_checkpoint(path)
        tok = Tokenizer.from_checkpoint(ckpt)
        cfg = dict(num_blocks=64, block_size=4)
        onnx = EngineCore(OnnxRunner(ckpt, "fp32", cache_root=Path("TMP") / "onnx"), tok, EngineConfig(**cfg))
        ref = EngineCore(ReferenceRunner(TransformerModel.from_checkpoint(ckpt, attention_impl="torch")), tok,
                         EngineConfig(**cfg))
        prompts = make_prompts(4, seed=2)
        ours = [s.output_ids for s in onnx.generate(prompts, GREEDY)]
        theirs = [s.output_ids for s in ref.generate(prompts, GREEDY)]
        print(json.dumps({"first": first, "same": use_global_thread_pool(2), "other": use_global_thread_pool(3),
                          "threads": onnx.runner.intra_op_num_threads, "equal": ours == theirs}))
    """, tmp_path)
    assert result == {"first": True, "same": True, "other": False, "threads": 2, "equal": True}
