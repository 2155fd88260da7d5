"""Warnings and errors raised by psmi_dask."""

from __future__ import annotations

__all__ = [
    "ConvergenceWarning",
    "DataConversionWarning",
    "NotFittedError",
    "PSMIWarning",
    "SchedulerLostError",
    "WorkersLostError",
]


class PSMIWarning(UserWarning):
    """Base class of every warning psmi_dask emits."""


class ConvergenceWarning(PSMIWarning):
    """The auto-mode stopping rule was not met before ``max_n_estimators``."""


class DataConversionWarning(PSMIWarning):
    """An input was reshaped to what is expected, as a column y to 1-D.

    Named after scikit-learn's warning for the same case.
    """


class NotFittedError(ValueError, AttributeError):
    """The estimator is used before ``fit``.

    Subclasses ``ValueError`` and ``AttributeError``, as scikit-learn's
    exception of the same name does, so that code catching either keeps
    working.
    """


class SchedulerLostError(ConnectionError):
    """The distributed scheduler went away while PSMI was running on it."""


class WorkersLostError(ConnectionError):
    """The cluster's workers lost the run's data on every attempt.

    Workers that die or are restarted (a worker past its memory limit is)
    take the run's data with them; the run is retried, then given up.
    """
