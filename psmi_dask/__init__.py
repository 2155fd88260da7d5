"""Pointwise Sliced Mutual Information (PSMI), computed with Dask."""

from __future__ import annotations

from psmi_dask._estimator import PSMI
from psmi_dask.exceptions import (
    ConvergenceWarning,
    DataConversionWarning,
    NotFittedError,
    PSMIWarning,
    SchedulerLostError,
    WorkersLostError,
)

__version__ = "0.1.0"

__all__ = [
    "PSMI",
    "ConvergenceWarning",
    "DataConversionWarning",
    "NotFittedError",
    "PSMIWarning",
    "SchedulerLostError",
    "WorkersLostError",
    "__version__",
]
