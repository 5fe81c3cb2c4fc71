"""Errors raised by the router package.

    RouterError
     ├── EmptyPromptError          a prompt (or a conversation's last user turn) is empty    (also ValueError)
     ├── TrainingDataError         a training or evaluation file is malformed: names file and line
     ├── ArtefactError             a saved router is missing, corrupt or from an unknown format version
     ├── CalibrationError          a threshold cannot be derived from what was given           (also ValueError)
     └── MissingDependencyError    an optional extra (onnx, onnxruntime, matplotlib) is not installed

Callers catch :class:`RouterError` to handle any of them; the gateway maps them to HTTP 400.
"""

from __future__ import annotations

from pathlib import Path


class RouterError(Exception):
    """Base of every error the router raises on purpose."""


class EmptyPromptError(RouterError, ValueError):
    """The prompt to score is empty or only whitespace."""


class TrainingDataError(RouterError, ValueError):
    """A training or evaluation file cannot be used; the message names the file and line.

    Usage::

        raise TrainingDataError("missing field 'winner'", path="prefs.jsonl", line=12)
    """

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")


class ArtefactError(RouterError):
    """A saved router directory cannot be loaded."""


class CalibrationError(RouterError, ValueError):
    """A threshold cannot be derived from the given target or sample."""


class MissingDependencyError(RouterError, ImportError):
    """An optional dependency is needed for this operation."""

    def __init__(self, package: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs the '{package}' package: pip install {package}")
