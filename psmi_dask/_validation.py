"""The one validation path at the public boundary of PSMI.

``fit``, ``transform`` and ``fit_transform`` all come through here. Every
message names the argument, what was expected and what came.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from numbers import Integral, Number, Real
from typing import Any

import dask.array as da
import numpy as np

from psmi_dask._directions import KINDS
from psmi_dask.exceptions import DataConversionWarning

__all__ = [
    "Params",
    "check_features",
    "check_labels",
    "check_params",
    "encode_labels",
    "encode_known_labels",
    "raise_if_not_finite",
    "user_stacklevel",
]

_MAX_LISTED = 10


@dataclass(frozen=True)
class Params:
    """The estimator's parameters, checked and translated for one fit."""

    n_estimators: int | None  # None in auto mode
    block_size: int
    quantile: float
    max_variation: float
    milestone: float
    max_n_estimators: int
    directions: str | np.ndarray
    var_floor: float
    chunk_size: int | None  # None: chosen from the data's shape
    max_blocks_in_flight: int | None  # None: one per thread
    progress: bool


def _integer(name: str, value: Any, low: int, allow: tuple[str, ...] = ()) -> Any:
    if isinstance(value, str) and value in allow:
        return value
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        also = "".join(f" or {word!r}" for word in allow)
        raise ValueError(f"{name} must be an integer >= {low}{also}, got {value!r}.")
    return int(value)


def _real(name: str, value: Any, low: float, high: float, closed: str) -> float:
    """Check ``value`` in an interval; ``closed`` says which ends are in it."""
    ok = isinstance(value, Real) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value)
        ok = ok and (value >= low if closed[0] == "[" else value > low)
        ok = ok and (value <= high if closed[1] == "]" else value < high)
    if not ok:
        raise ValueError(
            f"{name} must be a float in {closed[0]}{low}, {high}{closed[1]}, "
            f"got {value!r}."
        )
    return float(value)


def _check_directions(value: Any) -> str | np.ndarray:
    if isinstance(value, str):
        if value not in KINDS:
            raise ValueError(
                f"directions must be one of {KINDS} or an array of unit rows, "
                f"got {value!r}."
            )
        return value
    # A copy: the fitted state must not change when the user's array does.
    rows = np.array(value, dtype=np.float64, order="C")
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(
            "directions must be an array of shape (n_directions, n_features), "
            f"got shape {rows.shape}."
        )
    if not np.all(np.isfinite(rows)):
        raise ValueError("directions must be finite, got NaN or infinite values.")
    norms = np.linalg.norm(rows, axis=1)
    worst = int(np.argmax(np.abs(norms - 1.0)))
    if abs(norms[worst] - 1.0) > 1e-6:
        raise ValueError(
            "directions must have unit rows (norm 1 within 1e-6), but row "
            f"{worst} has norm {norms[worst]:.6g}; divide each row by its norm."
        )
    return rows


def check_params(estimator: Any) -> Params:
    """Check every parameter of ``estimator``; raise on the first bad one."""
    n_estimators = _integer(
        "n_estimators", estimator.get_params()["n_estimators"], 1, ("auto",)
    )
    block_size = _integer("min_n_estimators", estimator.min_n_estimators, 1)
    cap = _integer("max_n_estimators", estimator.max_n_estimators, 1)
    if n_estimators == "auto" and cap < block_size:
        raise ValueError(
            f"max_n_estimators must be >= min_n_estimators ({block_size}) in auto "
            f"mode, got {cap}."
        )
    directions = _check_directions(estimator.directions)
    if isinstance(directions, np.ndarray):
        wanted = cap if n_estimators == "auto" else n_estimators
        available = directions.shape[0]
        if n_estimators != "auto" and available < wanted:
            raise ValueError(
                f"directions holds {available} rows, but n_estimators is "
                f"{wanted}; pass more rows or a smaller n_estimators."
            )
    return Params(
        n_estimators=None if n_estimators == "auto" else n_estimators,
        block_size=block_size,
        quantile=_real(
            "lowest_psmi_quantile", estimator.lowest_psmi_quantile, 0, 1, "(]"
        ),
        max_variation=_real(
            "max_variation_of_the_lowest",
            estimator.max_variation_of_the_lowest,
            0,
            math.inf,
            "[)",
        ),
        milestone=_real("milestone", estimator.milestone, 0, 1, "()"),
        max_n_estimators=cap,
        directions=directions,
        var_floor=_real("var_floor", estimator.var_floor, 0, 1, "[)"),
        chunk_size=_none_if_auto(
            _integer("chunk_size", estimator.chunk_size, 1, ("auto",))
        ),
        max_blocks_in_flight=_none_if_auto(
            _integer(
                "max_blocks_in_flight", estimator.max_blocks_in_flight, 1, ("auto",)
            )
        ),
        progress=_boolean("progress", estimator.progress),
    )


def _none_if_auto(value: Any) -> Any:
    return None if value == "auto" else value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def _as_feature_array(X: Any) -> np.ndarray:
    """X as a numpy array, refusing what would lose data on the way."""
    if hasattr(X, "tocsr") or hasattr(X, "todense"):
        raise TypeError(
            f"X is a sparse matrix ({type(X).__name__}), which PSMI does not take: "
            "its projections are dense; pass X.toarray(), or a dask array for "
            "data larger than memory."
        )
    if isinstance(X, np.ma.MaskedArray):
        raise TypeError(
            "X is a masked array, and PSMI would ignore its mask: fill the masked "
            "values (X.filled(value)) or drop those rows first."
        )
    try:
        return np.asarray(X)
    except ValueError as error:  # ragged nested lists, for example
        raise ValueError(
            f"X must be a 2-D array of shape (n_samples, n_features), got "
            f"{type(X).__name__} that numpy cannot make one of ({error})."
        ) from None


def check_features(X: Any, n_features: int | None = None, min_samples: int = 2) -> Any:
    """Check X: 2-D, numeric, known chunk sizes; numpy or dask.

    Returns a numpy array or a dask array; neither is copied or cast here.
    """
    if isinstance(X, da.Array):
        if X.ndim != 2:
            raise ValueError(
                f"X must be 2-D, of shape (n_samples, n_features), got {X.ndim}-D "
                f"with shape {X.shape}."
            )
        if any(math.isnan(size) for size in X.shape):
            raise ValueError(
                "X has unknown chunk sizes (for example after boolean "
                "indexing); call X.compute_chunk_sizes() before passing it."
            )
        features: Any = X
    else:
        features = _as_feature_array(X)
        if features.dtype == object:
            try:
                features = features.astype(np.float64)
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"X must hold numbers, got values that are not ({error})."
                ) from None
        if features.ndim != 2:
            raise ValueError(
                f"X must be 2-D, of shape (n_samples, n_features), got "
                f"{features.ndim}-D with shape {features.shape}."
            )
    if not (
        np.issubdtype(features.dtype, np.number) or features.dtype == np.bool_
    ) or np.issubdtype(features.dtype, np.complexfloating):
        raise TypeError(f"X must hold real numbers, got dtype {features.dtype}.")
    if features.shape[1] == 0:
        raise ValueError("X must have at least one feature, got 0 columns.")
    if features.shape[0] < min_samples:
        raise ValueError(
            f"X must have at least {min_samples} sample"
            f"{'s' if min_samples > 1 else ''}, got {features.shape[0]}."
        )
    if n_features is not None and features.shape[1] != n_features:
        raise ValueError(
            f"X has {features.shape[1]} features, but PSMI was fitted with "
            f"{n_features} features."
        )
    if isinstance(features, np.ndarray):
        raise_if_not_finite(features)
    return features


def raise_if_not_finite(X: np.ndarray | da.Array) -> None:
    """Raise a ValueError counting the non-finite values of X, if any."""
    if np.issubdtype(X.dtype, np.integer) or X.dtype == np.bool_:
        return
    bad: Any = ~np.isfinite(X)
    if isinstance(X, da.Array):
        rows = bad.any(axis=1).compute()
        if not rows.any():
            return
        row = int(np.argmax(rows))
        column = int(np.argmax(bad[row].compute()))
        count = int(bad.sum().compute())
    else:
        if not bad.any():
            return
        count = int(bad.sum())
        row, column = (int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"X must be finite, but it holds {count} NaN or infinite value"
        f"{'s' if count > 1 else ''}; the first is at row {row}, column {column}."
    )


def check_labels(y: Any, n_samples: int) -> np.ndarray:
    """Bring y to a 1-D numpy array of length ``n_samples``."""
    if isinstance(y, da.Array):
        if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
            raise ValueError(
                f"y must be 1-D, of shape (n_samples,), got shape {y.shape}."
            )
        if not math.isnan(y.shape[0]) and y.shape[0] != n_samples:
            raise ValueError(
                f"X and y must have the same number of samples, got X with "
                f"{n_samples} rows and y with {y.shape[0]} labels."
            )
        y = y.compute()
    labels = _as_label_array(y)
    if labels.ndim == 2 and labels.shape[1] == 1:
        warnings.warn(
            f"y should be 1-D, of shape (n_samples,), got {labels.shape}; its "
            "one column is used as the labels (pass y.ravel() to silence this).",
            DataConversionWarning,
            stacklevel=user_stacklevel(),
        )
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"y must be 1-D, of shape (n_samples,), got {labels.shape}.")
    if labels.shape[0] != n_samples:
        raise ValueError(
            f"X and y must have the same number of samples, got X with {n_samples} "
            f"rows and y with {labels.shape[0]} labels."
        )
    missing = _missing(labels)
    if missing.any():
        raise ValueError(
            f"y must not contain missing labels (NaN, None, NA or NaT), got "
            f"{int(missing.sum())} (the first at index {int(np.argmax(missing))}); "
            "drop those samples or give them a label."
        )
    return labels


def user_stacklevel() -> int:
    """The stacklevel, for the caller of this function, of the user's code."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(
        frame.f_code.co_filename
    ).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _missing(labels: np.ndarray) -> np.ndarray:
    """Which labels are NaN, or missing values among objects."""
    if labels.dtype.kind == "f":
        return np.isnan(labels)
    if labels.dtype.kind in "mM":
        return np.isnat(labels)
    if labels.dtype != object:
        return np.zeros(labels.shape, dtype=bool)
    return np.fromiter(map(_is_missing, labels.tolist()), bool, labels.shape[0])


def _is_missing(label: Any) -> bool:
    """None, a float NaN, a NaT, or pandas's NA (pandas is never imported)."""
    if label is None:
        return True
    if isinstance(label, (float, np.floating)):
        return math.isnan(label)
    if isinstance(label, (np.datetime64, np.timedelta64)):
        return bool(np.isnat(label))
    pandas = sys.modules.get("pandas")
    return pandas is not None and (label is pandas.NA or label is pandas.NaT)


def _as_label_array(y: Any) -> np.ndarray:
    """A 1-D array of labels; a list keeps each label whole and its type."""
    if not isinstance(y, (list, tuple)):
        return np.asarray(y)
    # A missing label is reported as such by the caller.
    types = {type(label) for label in y if not _is_missing(label)}
    if len(types) > 1 and not all(issubclass(t, Number) for t in types):
        names = ", ".join(sorted(t.__name__ for t in types))
        raise TypeError(
            f"y mixes labels of types that cannot be compared ({names}); give "
            "every label the same type."
        )
    if types and issubclass(next(iter(types)), tuple):
        labels = np.empty(len(y), dtype=object)
        labels[:] = list(y)
        return labels
    return np.asarray(y)


def _shown(label: Any) -> str:
    return repr(label.item() if isinstance(label, np.generic) else label)


def _unique(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        classes, codes = np.unique(labels, return_inverse=True)
    except TypeError:
        raise TypeError(
            "y mixes labels of types that cannot be compared, e.g. numbers and "
            "strings; give every label the same type."
        ) from None
    if labels.dtype == object and len(set(classes.tolist())) != len(classes):
        # Labels without a total order (sets, for example) do not sort into
        # runs of equals: number them in order of first appearance instead.
        try:
            index = {label: i for i, label in enumerate(dict.fromkeys(labels.tolist()))}
        except TypeError:
            raise TypeError("y must hold hashable labels.") from None
        classes = np.empty(len(index), dtype=object)
        classes[:] = list(index)
        codes = np.array([index[label] for label in labels.tolist()], dtype=np.intp)
    return classes, codes.ravel()


def encode_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``classes`` (sorted) and integer codes; every class needs 2."""
    classes, codes = _unique(labels)
    counts = np.bincount(codes, minlength=classes.shape[0])
    small = np.flatnonzero(counts < 2)
    if small.size:
        listed = ", ".join(
            f"label {_shown(classes[i])} ({counts[i]} sample)"
            for i in small[:_MAX_LISTED]
        ) + (
            f" and {small.size - _MAX_LISTED} more" if small.size > _MAX_LISTED else ""
        )
        raise ValueError(
            "Every class needs at least 2 samples to fit its Gaussian, but "
            f"{small.size} class{'es have' if small.size > 1 else ' has'} fewer: "
            f"{listed}."
        )
    return classes, codes.astype(np.intp).ravel()


def encode_known_labels(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Integer codes of ``labels`` among the fitted ``classes``."""
    values, inverse = _unique(labels)
    try:
        position = np.searchsorted(classes, values)
        position = np.minimum(position, classes.shape[0] - 1)
        known = classes[position] == values
    except TypeError:
        known = np.zeros(values.shape[0], dtype=bool)
        position = np.zeros(values.shape[0], dtype=np.intp)
    if not np.all(known):
        unseen = values[~known]
        listed = ", ".join(_shown(v) for v in unseen[:_MAX_LISTED])
        more = (
            f" and {unseen.size - _MAX_LISTED} more"
            if unseen.size > _MAX_LISTED
            else ""
        )
        raise ValueError(
            f"y holds {unseen.size} label{'s' if unseen.size > 1 else ''} that fit "
            f"never saw: {listed}{more}. Fitted classes: "
            f"{', '.join(_shown(c) for c in classes[:_MAX_LISTED])}"
            f"{', ...' if classes.shape[0] > _MAX_LISTED else ''}."
        )
    return position[inverse.ravel()].astype(np.intp)
