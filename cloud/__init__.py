"""The cloud tier: a tensor-parallel PyTorch model behind the shared engine core.

>>> from cloud import CloudEngine
>>> engine = CloudEngine.from_model(tp=3).start()  # doctest: +SKIP
"""

from cloud.engine import CloudEngine, run_torchrun_rank
from cloud.errors import CloudError, TensorParallelError, WorkerFailedError
from cloud.model import TPTransformerModel, check_tp_degree, valid_tp_degrees
from cloud.worker import TPRunner

__all__ = [
    "CloudEngine",
    "CloudError",
    "TPRunner",
    "TPTransformerModel",
    "TensorParallelError",
    "WorkerFailedError",
    "check_tp_degree",
    "run_torchrun_rank",
    "valid_tp_degrees",
]
