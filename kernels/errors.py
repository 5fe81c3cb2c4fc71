"""Errors raised by the shared engine core.

    EngineError
     ├── CheckpointError              a model file is missing, truncated or malformed
     │    └── UnsupportedArchitectureError
     ├── ModelStoreError              the model cache could not be filled
     │    └── ChecksumMismatchError   a download's sha256 differs from the pinned one
     ├── TokenizerError               no usable tokenizer / chat template in the checkpoint
     ├── OutOfBlocksError             the KV pool cannot hold what was asked
     └── InvalidRequestError          a request the engine must refuse (bad sampling params, too long)

Callers catch :class:`EngineError` to handle any of them; the gateway maps each to an HTTP status.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine core raises on purpose."""


class CheckpointError(EngineError):
    """A checkpoint cannot be read."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint is readable but its architecture is not one we implement."""


class ModelStoreError(EngineError):
    """The model cache could not provide a model."""


class ChecksumMismatchError(ModelStoreError):
    """A downloaded file does not have the expected sha256."""


class TokenizerError(EngineError):
    """The tokenizer or chat template could not be built or applied."""


class OutOfBlocksError(EngineError):
    """The KV block pool cannot satisfy an allocation."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine refuses: bad sampling parameters, empty or over-long prompt."""
