"""What every ``hybrid-gateway bench …`` command shares: the facts of the machine, and saving a report.

A report is one JSON file and one PNG plot with the same stem (``<kind>-YYYYmmdd-HHMMSS``) under
``bench/results/``, so figures quoted in the README and issue notes can be traced to their file.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

VERSIONED = ("torch", "onnxruntime-gpu", "onnxruntime", "fastapi", "uvicorn", "httpx")


def machine_info() -> dict[str, Any]:
    """CPU, GPU, load and library versions at the start of a run (a shared machine's figures need them)."""

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "gpu_count": torch.cuda.device_count(),
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(), "python": platform.python_version(),
            **{name: version(name) for name in VERSIONED},
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def save_report(report: dict[str, Any], out_dir: str | os.PathLike[str], kind: str,
                plot: Callable[[dict[str, Any], Path], None]) -> list[str]:
    """Write ``report`` as ``<kind>-<time>.json`` and its ``plot`` as the ``.png`` beside it; returns both paths
    (also stored in ``report["files"]``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    report["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".png"))]
    plot(report, stem.with_suffix(".png"))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report["files"]
