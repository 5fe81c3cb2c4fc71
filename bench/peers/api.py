"""Measure the installed peers from the main venv: each peer's ``run_peer.py`` runs in that peer's own venv.

    from rich.console import Console
    from bench.peers import detect_peers, run_peers

    detect_peers()                       # {"ortgenai": True, "transformers": True, "llamacpp": False}
    results = run_peers(["ortgenai", "transformers", "llamacpp"], {"new_tokens": 64}, None, Console(),
                        threads=2)
    results["llamacpp"]                  # {"status": "not installed", "hint": "python bench/peers/setup.py ..."}

Peers run one after another, never beside each other or beside our engine, with every thread pool they
might use (OpenMP, MKL, OpenBLAS, ONNX Runtime's, torch's) pinned to ``threads``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .run_peer import validate_protocol, validate_result
from .setup import PEERS, default_root, is_installed, model_path, venv_python

RUN_PEER = Path(__file__).with_name("run_peer.py")
INTERRUPT_GRACE_S = 60.0  # after SIGINT at the timeout, how long a peer gets to print its partial result
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def detect_peers(root: Path | None = None) -> dict[str, bool]:
    """Which known peers have a finished venv and their model under ``root``."""
    base = root or default_root()
    return {peer: is_installed(base, peer) for peer in PEERS}


def install_hint(peer: str, root: Path | None = None) -> str:
    """The command that installs ``peer`` (with ``--root`` when it is not the default)."""
    command = f"python bench/peers/setup.py --peers {peer}"
    return command if root is None else f"{command} --root {root}"


def peer_command(peer: str, root: Path, protocol: dict[str, Any], threads: int) -> list[str]:
    return [str(venv_python(root, peer)), str(RUN_PEER), "--peer", peer, "--model", str(model_path(root, peer)),
            "--threads", str(threads), "--protocol", json.dumps(protocol)]


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, **{var: str(threads) for var in THREAD_ENV_VARS}}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_peers(peers: Sequence[str], protocol: dict[str, Any], root: Path | None, console: Console | None = None,
              *, threads: int | None = None, timeout_s: float = 1800.0) -> dict[str, dict[str, Any]]:
    """Run each peer's protocol in its venv; a peer that is missing or fails gets a status, not an exception.

    Returns ``{peer: result}``: ``run_peer.py``'s JSON (``"status": "ok"``, or ``"partial"`` when it ran past
    ``timeout_s`` and was interrupted), or ``{"status": "not installed", "hint": ...}``,
    ``{"status": "failed", "error": ...}`` or ``{"status": "timeout", ...}``.
    Raises ValueError for a peer name that is not in the catalog or a protocol that does not validate.
    """
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; known: {sorted(PEERS)}")
    full_protocol = validate_protocol(protocol)
    base = root or default_root()
    console = console or Console(stderr=True)
    threads = threads or default_threads()
    results: dict[str, dict[str, Any]] = {}
    for peer in peers:
        if not is_installed(base, peer):
            results[peer] = {"status": "not installed", "hint": install_hint(peer, root)}
            console.print(f"[yellow]{peer}: not installed[/] — {results[peer]['hint']}")
            continue
        results[peer] = _run_one(peer, peer_command(peer, base, full_protocol, threads), threads, timeout_s, console)
    return results


def _run_one(peer: str, command: list[str], threads: int, timeout_s: float, console: Console) -> dict[str, Any]:
    """One peer subprocess: stderr lines drive a spinner, stdout is the JSON result."""
    started = time.perf_counter()
    stdout: list[str] = []
    stderr: list[str] = []
    with Progress(SpinnerColumn(), TextColumn(f"[bold]{PEERS[peer].title}"), TextColumn("[dim]{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=thread_env(threads)) as proc:

            def follow_stderr() -> None:
                assert proc.stderr is not None
                for line in proc.stderr:
                    stderr.append(line)
                    progress.update(task, description=line.strip()[:80])

            readers = [threading.Thread(target=follow_stderr, daemon=True),
                       threading.Thread(target=lambda: stdout.extend(proc.stdout or ()), daemon=True)]
            for reader in readers:
                reader.start()
            timed_out = False
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                # SIGINT first: run_peer.py then prints what it measured so far as a "partial" result.
                timed_out = True
                proc.send_signal(signal.SIGINT)
                try:
                    code = proc.wait(timeout=INTERRUPT_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
            for reader in readers:
                reader.join()

    elapsed = time.perf_counter() - started
    log_tail = "".join(stderr[-20:])
    try:
        if code != 0:
            raise ValueError(f"exit code {code}")
        result = json.loads("".join(stdout))
        validate_result(result)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too
        if timed_out:
            console.print(f"[red]{peer}: timed out after {timeout_s:.0f} s[/]")
            return {"status": "timeout", "error": f"no result after {timeout_s:.0f} s", "log_tail": log_tail}
        console.print(f"[red]{peer}: failed ({exc})[/]\n{log_tail}")
        return {"status": "failed", "error": str(exc), "log_tail": log_tail}
    if timed_out:
        console.print(f"[yellow]{peer}: timed out after {timeout_s:.0f} s; keeping what it measured[/]")
        result["timeout_s"] = timeout_s
    result["command"] = shlex.join(command)
    console.print(f"[green]✓[/] {PEERS[peer].title}: decode {result['decode'].get('tok_per_s', float('nan')):.1f} "
                  f"tok/s at batch 1 [dim]({elapsed:.0f} s)[/]")
    return result
