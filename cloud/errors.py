"""Errors raised by the cloud tier.

    kernels.errors.EngineError
     └── CloudError                   anything the tensor-parallel cloud engine raises on purpose
          ├── TensorParallelError     the degree does not fit the model (also a ValueError)
          └── WorkerFailedError       a rank died or could not start; the engine is dead

``CloudError`` derives from the engine core's :class:`~kernels.errors.EngineError`, so a server that
maps engine errors to HTTP statuses (503 for a dead engine) handles the cloud tier without new cases.
"""

from __future__ import annotations

from kernels.errors import EngineError


class CloudError(EngineError):
    """Base of every error the cloud tier raises on purpose."""


class TensorParallelError(CloudError, ValueError):
    """A tensor-parallel degree that does not divide the model's heads (or MLP width)."""


class WorkerFailedError(CloudError):
    """A worker rank exited, failed to load its shard, or lost its connection to the group."""
