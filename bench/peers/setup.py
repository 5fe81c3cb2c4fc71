"""Install the peers that ``hybrid-gateway bench edge`` measures, each in its own virtual environment.

    python bench/peers/setup.py                                # onnxruntime-genai and transformers
    python bench/peers/setup.py --peers llamacpp               # llama.cpp: builds from source, ~12 min on 2 cores
    python bench/peers/setup.py --gguf PATH --root DIR --force

Every peer gets a venv of its own because they disagree on packages: onnxruntime-genai pulls the plain
``onnxruntime`` package, which must not sit beside the ``onnxruntime-gpu`` of our main venv. Layout:

    <root>/venvs/<peer>/          the peer's venv (marked complete by .hybrid-gateway-peer.json)
    <root>/models/hf/             the default GGUF dequantized by transformers into a Hugging Face folder
    <root>/models/ortgenai-int4/  onnxruntime-genai's int4 CPU model, built from models/hf
    <root>/models/model.gguf      a link to the GGUF itself (llama.cpp reads it directly)
    <root>/logs/<step>.log        full output of each install or build step

<root> is ``$HYBRID_GATEWAY_CACHE/peers``, else ``~/.cache/hybrid-gateway/peers``. Each step is skipped
when its output already exists, so running the script again is cheap. ``bench/peers/api.py`` reads this
same catalog to find what is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

CACHE_ENV = "HYBRID_GATEWAY_CACHE"
MARKER = ".hybrid-gateway-peer.json"
# The local CPU wheel is 2.13.0+cpu; an exact pin selects it, a looser one would fetch the CUDA build.
TORCH = "torch==2.13.0"


class SetupError(RuntimeError):
    """A setup step failed; the message says which and where its log is."""


@dataclass(frozen=True, slots=True)
class PeerSpec:
    name: str
    title: str
    packages: tuple[str, ...]
    model: str  # "ortgenai-int4" | "hf" | "model.gguf": the entry under <root>/models the peer runs
    default: bool  # installed when --peers is not given
    build_env: dict[str, str] = field(default_factory=dict)
    pip_args: tuple[str, ...] = ()
    note: str = ""


PEERS: dict[str, PeerSpec] = {
    "ortgenai": PeerSpec(
        "ortgenai", "onnxruntime-genai (int4, CPU)",
        # onnx, onnx-ir, transformers, gguf and torch serve its model builder.
        ("onnxruntime-genai", "onnx", "onnx-ir", "transformers", "gguf", "accelerate", TORCH),
        model="ortgenai-int4", default=True),
    "transformers": PeerSpec(
        "transformers", "Hugging Face transformers generate()",
        ("transformers", "gguf", "accelerate", TORCH),
        model="hf", default=True),
    "llamacpp": PeerSpec(
        "llamacpp", "llama.cpp (llama-cpp-python)",
        ("llama-cpp-python",),
        model="model.gguf", default=False,
        build_env={"CMAKE_BUILD_PARALLEL_LEVEL": "2"},
        pip_args=("--verbose",),  # shows cmake's "[ 42%] Building ..." lines while the long build runs
        note="only an sdist on PyPI: the build takes ~12 min on 2 cores"),
}


def default_root() -> Path:
    """Where peers live: ``$HYBRID_GATEWAY_CACHE/peers``, else ``~/.cache/hybrid-gateway/peers``."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "hybrid-gateway") / "peers"


def venv_dir(root: Path, peer: str) -> Path:
    return root / "venvs" / peer


def venv_python(root: Path, peer: str) -> Path:
    return venv_dir(root, peer) / "bin" / "python"


def model_path(root: Path, peer: str) -> Path:
    return root / "models" / PEERS[peer].model


def is_installed(root: Path, peer: str) -> bool:
    """The peer's venv finished installing and the model it runs exists."""
    return (venv_dir(root, peer) / MARKER).is_file() and model_path(root, peer).exists()


# --- steps -----------------------------------------------------------------------------------------------

class Steps:
    """Runs the setup steps as subprocesses under one rich progress display, logging each to a file."""

    def __init__(self, root: Path, console: Console, force: bool = False):
        self.root, self.console, self.force = root, console, force
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, label: str, log_name: str, cmd: Sequence[str | Path], env: dict[str, str] | None = None) -> None:
        """Run ``cmd``, showing its latest output line beside a spinner; raise SetupError with the log's tail."""
        log = self.logs / f"{log_name}.log"
        with log.open("w") as out, Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                                            TextColumn("[dim]{task.fields[line]}"), TimeElapsedColumn(),
                                            console=self.console, transient=True) as progress:
            task = progress.add_task(label, line="")
            out.write(f"$ {' '.join(map(str, cmd))}\n")
            # Unbuffered, so pip's and the builders' lines reach the display as they happen.
            with subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    out.write(line)
                    if line.strip():
                        progress.update(task, line=line.strip()[:70])
                code = proc.wait()
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise SetupError(f"{label} failed (exit {code}); full log: {log}\n{tail}")

    def done(self, label: str, started: float) -> None:
        self.console.print(f"[green]✓[/] {label} [dim]({time.perf_counter() - started:.0f} s)[/]")

    def skipped(self, label: str, path: Path) -> None:
        self.console.print(f"[dim]• {label}: already there ({path})[/]")

    def install_peer(self, spec: PeerSpec) -> None:
        venv = venv_dir(self.root, spec.name)
        marker = venv / MARKER
        label = f"install {spec.title}"
        if marker.is_file() and not self.force and json.loads(marker.read_text())["packages"] == list(spec.packages):
            self.skipped(label, venv)
            return
        if spec.note:
            self.console.print(f"[yellow]{spec.title}: {spec.note}[/]")
        started = time.perf_counter()
        if self.force and venv.exists():
            shutil.rmtree(venv)
        if not (venv / "bin" / "python").exists():
            self.run(f"create venv {spec.name}", f"venv-{spec.name}", [sys.executable, "-m", "venv", venv])
        python = venv_python(self.root, spec.name)
        self.run(label, f"pip-{spec.name}", [python, "-m", "pip", "install", *spec.pip_args, *spec.packages],
                 env=spec.build_env)
        if TORCH in spec.packages:
            self._check_cpu_torch(python)
        marker.write_text(json.dumps({"packages": list(spec.packages), "installed_at": time.time()}))
        self.done(label, started)

    def _check_cpu_torch(self, python: Path) -> None:
        version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        if not version.endswith("+cpu"):
            self.console.print(f"[yellow]warning: {python} got torch {version}, not the local CPU wheel[/]")

    def link_gguf(self, gguf: Path) -> Path:
        link = self.root / "models" / "model.gguf"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() == gguf.resolve():
                return link
            link.unlink()
        link.symlink_to(gguf.resolve())
        self.console.print(f"[green]✓[/] models/model.gguf → {gguf}")
        return link

    def hf_folder(self, python: Path, gguf: Path) -> Path:
        """Dequantize the GGUF into a Hugging Face folder (fp32 weights + tokenizer) with transformers."""
        out = self.root / "models" / "hf"
        label = "convert GGUF → Hugging Face folder"
        if (out / "config.json").is_file() and not self.force:
            self.skipped(label, out)
            return out
        started = time.perf_counter()
        partial = out.with_name("hf.partial")
        shutil.rmtree(partial, ignore_errors=True)
        script = ("import sys, torch\n"
                  "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                  "folder, name, out = sys.argv[1:]\n"
                  "model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)\n"
                  # Weights are already dequantized to fp32; recent transformers still tag the model as
                  # GGUF-quantized and refuse to save it, so drop the tag.
                  "model.hf_quantizer = None\n"
                  "model.config.__dict__.pop('quantization_config', None)\n"
                  "model.save_pretrained(out)\n"
                  "AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)\n")
        self.run(label, "convert-hf", [python, "-c", script, gguf.parent, gguf.name, partial])
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
        self.done(label, started)
        return out

    def ortgenai_model(self, python: Path, hf: Path) -> Path:
        """Build onnxruntime-genai's int4 CPU model (MatMulNBits) from the Hugging Face folder."""
        out = self.root / "models" / "ortgenai-int4"
        label = "build onnxruntime-genai int4 CPU model"
        if (out / "genai_config.json").is_file() and not self.force:
            self.skipped(label, out)
            return out
        started = time.perf_counter()
        partial = out.with_name("ortgenai-int4.partial")
        cache = self.root / "models" / "ortgenai-build-cache"
        shutil.rmtree(partial, ignore_errors=True)
        self.run(label, "build-ortgenai", [python, "-m", "onnxruntime_genai.models.builder", "-i", hf,
                                           "-o", partial, "-p", "int4", "-e", "cpu", "-c", cache])
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
        shutil.rmtree(cache, ignore_errors=True)
        self.done(label, started)
        return out


def default_gguf(console: Console) -> Path:
    """Our default GGUF, pulled on first use by the main package (so this must run in the main venv)."""
    try:
        from kernels.checkpoints.store import ensure_default_model
    except ImportError as exc:
        raise SetupError(f"cannot import our package to find the default model ({exc}); "
                         "run this in the main venv or pass --gguf PATH") from exc
    return ensure_default_model(console)


def setup(peers: Sequence[str], root: Path, gguf: Path, console: Console, force: bool = False) -> dict[str, bool]:
    """Install ``peers`` under ``root`` and prepare their models from ``gguf``; returns detect status per peer."""
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SetupError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
    if not gguf.is_file():
        raise SetupError(f"GGUF not found: {gguf}")
    steps = Steps(root, console, force)
    for peer in peers:
        steps.install_peer(PEERS[peer])
    steps.link_gguf(gguf)
    needs_hf = [p for p in peers if PEERS[p].model in ("hf", "ortgenai-int4")]
    if needs_hf:
        # Either venv has transformers + gguf + torch for the conversion.
        hf = steps.hf_folder(venv_python(root, needs_hf[0]), gguf)
        if "ortgenai" in peers:
            steps.ortgenai_model(venv_python(root, "ortgenai"), hf)
    return {p: is_installed(root, p) for p in peers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=",".join(p for p, s in PEERS.items() if s.default),
                        help=f"comma-separated, from {', '.join(PEERS)} (default: %(default)s)")
    parser.add_argument("--root", type=Path, default=None, help="default: $HYBRID_GATEWAY_CACHE/peers")
    parser.add_argument("--gguf", type=Path, default=None, help="default: our default model")
    parser.add_argument("--force", action="store_true", help="redo every step")
    args = parser.parse_args(argv)

    console = Console()
    root = (args.root or default_root()).expanduser()
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    started = time.perf_counter()
    try:
        gguf = args.gguf.expanduser() if args.gguf else default_gguf(console)
        console.print(f"peers {', '.join(peers)} → [bold]{root}[/] (weights: {gguf})")
        status = setup(peers, root, gguf, console, force=args.force)
    except SetupError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    for peer, ok in status.items():
        console.print(f"{peer}: {'[green]ready' if ok else '[red]incomplete'}[/] ({model_path(root, peer)})")
    console.print(f"[dim]setup took {time.perf_counter() - started:.0f} s[/]")
    return 0 if all(status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
