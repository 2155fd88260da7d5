"""The PSMI estimator."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask import delayed

from psmi_dask._blas import single_threaded_blas
from psmi_dask._blocks import (
    BlockFit,
    ChunkedData,
    Columns,
    ColumnSink,
    block_directions,
    fit_block,
    score_block,
)
from psmi_dask._controller import (
    BlockRecord,
    LocalBackend,
    SampleAccumulator,
    log_block,
    run_blocks,
)
from psmi_dask._directions import DirectionSource, seed_sequence
from psmi_dask._numerics import (
    GaussianParams,
    project,
    score,
    too_small_for_float64,
)
from psmi_dask._placement import (
    as_dask,
    default_in_flight,
    ensure_a_running_worker,
    place,
    run_with_retries,
    share,
)
from psmi_dask._stopping import StoppingRule
from psmi_dask._validation import (
    Params,
    check_features,
    check_labels,
    check_params,
    encode_known_labels,
    encode_labels,
    raise_if_not_finite,
    user_stacklevel,
)
from psmi_dask.exceptions import ConvergenceWarning, NotFittedError

__all__ = ["PSMI"]

logger = logging.getLogger(__name__)

# Keep a block's projections between its two passes while those of the
# blocks in flight fit in this many bytes; beyond, project twice.
_PROJECTION_CACHE_BYTES = 512 * 2**20

# A block over at most this many samples x max(features, directions) runs as
# one task instead of a few per chunk (on digits, 3 tasks a block instead of
# 14); the wall time on a two-worker LocalCluster stayed about the same.
# Dask culls its whole graph once for each Delayed in a list argument, so a
# whole block over many chunks (a small chunk_size) would cost their square.
_WHOLE_BLOCK_VALUES = 2**21
_WHOLE_BLOCK_CHUNKS = 64

# Target size of one chunk's projections (rows x max(features, block) x 8).
_CHUNK_BYTES = 16 * 2**20
_MIN_CHUNKS = 16
_MIN_ROWS = 1024


def chunk_rows(n_samples: int, n_features: int, block_size: int) -> int:
    """Rows per chunk, from the shape alone: a power of two in [256, 65536].

    Small enough that one chunk's projections take at most 16 MiB, and that
    there are about 16 chunks or more to share between cores (measured on
    2 cores: 3 chunks of 4,096 rows left a core idle a third of the time);
    but 1,024 rows at least unless memory says otherwise, since each chunk
    costs a few tasks per block, and a task a millisecond or more on a
    cluster.
    The chunking is a function of the shape and the parameters only, never
    of the input's own chunks, so results are identical bit for bit however
    X arrives.
    """
    by_memory = _CHUNK_BYTES // (8 * max(n_features, block_size))
    by_count = max(_MIN_ROWS, -(-n_samples // _MIN_CHUNKS))
    rows = min(by_memory, 2 ** math.ceil(math.log2(by_count)))
    return int(min(65536, max(256, 2 ** int(math.log2(max(rows, 1))))))


@dataclass(frozen=True)
class Plan:
    """``total`` directions in blocks of ``block_size``; the last may be short."""

    total: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return -(-self.total // self.block_size)

    def first(self, block: int) -> int:
        """Index of the block's first direction."""
        return block * self.block_size

    def size(self, block: int) -> int:
        return min(self.block_size, self.total - self.first(block))


def _holding_blas(method: Callable[..., Any]) -> Callable[..., Any]:
    """Hold BLAS to one thread for the whole call, then give it back.

    Each task also holds it; holding it across the call spares setting it
    and giving it back between tasks.
    """

    @functools.wraps(method)
    def held(*args: Any, **kwargs: Any) -> Any:
        with single_threaded_blas():
            return method(*args, **kwargs)

    return held


class PSMI:
    """Pointwise Sliced Mutual Information between features and labels.

    For a unit direction theta, every sample is projected, t = theta^T x, and
    one 1-D Gaussian per class is fitted to the projections of that class
    (mean, population standard deviation, and the class frequency as prior).
    The pointwise mutual information of a sample (x, y) along theta is

        pmi(x, y) = log N(t; mu_y, sigma_y) - log sum_c pi_c N(t; mu_c, sigma_c)

    in nats, and PSMI(x, y) is its mean over directions drawn uniformly on
    the sphere (Algorithm 1 of Wongso et al. [1], with the Gaussian 1-D
    estimator of sliced mutual information [2]). The estimate runs as Dask
    work: directions are grouped in blocks of ``min_n_estimators``, and each
    block is an independent piece of work over the chunks of X.

    With ``n_estimators="auto"``, blocks are added until a stopping rule
    holds: after k blocks, take the samples whose PSMI is among the lowest
    ``lowest_psmi_quantile`` fraction (at least one sample); for each, the
    relative change between PSMI over the first ``floor(k * milestone)``
    blocks and PSMI over all k blocks; stop when their mean is at most
    ``max_variation_of_the_lowest``. A PSMI of magnitude below 1e-12 counts as
    zero in the denominator, so that PSMI that is exactly 0 never gives 0/0.
    The run also stops at ``max_n_estimators`` directions, with a
    ``ConvergenceWarning`` if the rule was not met.

    Parameters
    ----------
    n_estimators : int or "auto", default="auto"
        Number of directions, or "auto" to add blocks until the stopping rule
        holds.
    min_n_estimators : int, default=500
        Directions per block, in both modes; in auto mode, also the smallest
        step by which the number of directions grows.
    lowest_psmi_quantile : float in (0, 1], default=0.05
        Fraction of samples with the lowest PSMI that the stopping rule
        watches.
    max_variation_of_the_lowest : float >= 0, default=0.05
        The stopping rule holds when the mean relative change of the lowest
        samples is at most this.
    milestone : float in (0, 1), default=0.5
        PSMI after k blocks is compared with PSMI after
        ``floor(k * milestone)`` blocks.
    max_n_estimators : int, default=20000
        Cap on the number of directions in auto mode; reaching it without
        meeting the rule emits a ``ConvergenceWarning``.
    directions : {"orthogonal", "iid"} or array-like of shape \
            (n_directions, n_features), default="orthogonal"
        How directions are drawn. "orthogonal": Haar-random orthonormal
        frames, each direction still uniform on the sphere, with a much
        smaller Monte-Carlo error than "iid" for the same number of
        directions. "iid": independent uniform directions, as psmi 0.2.0
        draws them. An array: unit rows used in order, block by block, which
        makes results comparable with any other implementation.
    random_state : None, int, numpy SeedSequence or Generator, default=None
        Seed of the directions. The directions of block b come from the
        SeedSequence child with spawn key b, so results depend only on the
        data, the parameters and the seed, not on the number of workers, the
        chunking or the order in which blocks complete.
    var_floor : float in [0, 1), default=1e-9
        Floor of every class's variance along a direction, relative to the
        variance of all fitted samples along it (as scikit-learn's
        ``GaussianNB.var_smoothing`` is relative to the largest feature
        variance). A class with zero spread, such as duplicate rows or
        constant features, gets the floor instead of a zero that would turn
        every density into NaN. Classes above the floor are untouched.
    chunk_size : int or "auto", default="auto"
        Samples per chunk. "auto" chooses a power of two from the shape of X
        and the block size: at least 1,024 rows, and 16 chunks or more when
        X is large enough, while one chunk's projections take at most
        16 MiB. X is rechunked to this along samples, so for a given
        chunk_size the result is the same to the bit whatever the input's
        own chunks. Two different chunk_size values sum the class moments in
        a different order, and BLAS may round a sample's projections by
        where it falls in its chunk: they may differ in the last bits, by
        less than 1e-12 of the outputs' scale. Below a few hundred rows,
        Dask's cost per task outweighs the work in it.
    max_blocks_in_flight : int or "auto", default="auto"
        Blocks computed at once; "auto" is one per core on the threaded
        scheduler and two per worker thread on a cluster. Blocks
        that run ahead of a stopping decision are cancelled.
    progress : bool, default=False
        Show a progress bar of blocks done (and, in auto mode, the current
        variation against its threshold).

    Attributes
    ----------
    n_estimators_ : int
        Number of directions used.
    directions_ : ndarray of shape (n_estimators_, n_features_in_)
        The directions, as unit rows.
    classes_ : ndarray of shape (n_classes,)
        The class labels, sorted.
    class_prior_ : ndarray of shape (n_classes,)
        Frequency of each class in the fitted data.
    projection_means_ : ndarray of shape (n_classes, n_estimators_)
        Mean of each class's projections along each direction.
    projection_stds_ : ndarray of shape (n_classes, n_estimators_)
        Standard deviation (ddof=0, after the variance floor) of each class's
        projections along each direction.
    n_features_in_ : int
        Number of features seen during fit.
    n_blocks_ : int
        Number of blocks of directions used.
    history_ : list of dict
        One record per block: ``block`` (its index), ``n_estimators``
        (directions so far), ``variation`` (the stopping rule's value, None
        where it was not tested) and ``seconds`` (since the fit started).
    converged_ : bool or None
        Whether the stopping rule was met; None in fixed mode.

    Notes
    -----
    Densities are computed in log space, so samples far from every class
    get finite values. Per-class statistics are float64 moments merged
    with Chan et al.'s pairwise update, whatever the input dtype. After a
    fit, ``n_estimators`` reads the number of directions used, as psmi
    0.2.0 reports it, while ``get_params()`` and ``clone`` keep the value
    given. psmi 0.2.0's attribute names (``thetas``,
    ``frequency_per_label``, ``mean_per_label``, ``std_per_label``,
    ``fitted``) remain as read-only aliases.

    References
    ----------
    .. [1] S. Wongso, R. Ghosh and M. Motani, "Pointwise Sliced Mutual
       Information for Neural Network Explainability", ISIT 2023.
    .. [2] Z. Goldfeld and K. Greenewald, "Sliced Mutual Information: A
       Scalable Measure of Statistical Dependence", NeurIPS 2021.

    Examples
    --------
    >>> import numpy as np
    >>> from psmi_dask import PSMI
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(3, size=200)
    >>> X = rng.normal(size=(200, 8)) + y[:, None]
    >>> psmi_mean, psmi_std, psmi_full = PSMI(
    ...     n_estimators=100, random_state=0
    ... ).fit_transform(X, y)
    >>> psmi_full.shape
    (200, 100)
    """

    def __init__(
        self,
        n_estimators: int | str = "auto",
        min_n_estimators: int = 500,
        lowest_psmi_quantile: float = 0.05,
        max_variation_of_the_lowest: float = 0.05,
        milestone: float = 0.5,
        *,
        max_n_estimators: int = 20_000,
        directions: str | Any = "orthogonal",
        random_state: Any = None,
        var_floor: float = 1e-9,
        chunk_size: int | str = "auto",
        max_blocks_in_flight: int | str = "auto",
        progress: bool = False,
    ) -> None:
        self.n_estimators = n_estimators
        self.min_n_estimators = min_n_estimators
        self.lowest_psmi_quantile = lowest_psmi_quantile
        self.max_variation_of_the_lowest = max_variation_of_the_lowest
        self.milestone = milestone
        self.max_n_estimators = max_n_estimators
        self.directions = directions
        self.random_state = random_state
        self.var_floor = var_floor
        self.chunk_size = chunk_size
        self.max_blocks_in_flight = max_blocks_in_flight
        self.progress = progress

    # The estimator contract, without a dependency on scikit-learn.

    @classmethod
    def _get_param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [name for name in signature.parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Parameters of this estimator, as given (``"auto"`` stays)."""
        params = {name: getattr(self, name) for name in self._get_param_names()}
        params["n_estimators"] = self._n_estimators
        return params

    def set_params(self, **params: Any) -> PSMI:
        """Set parameters; the next ``fit`` uses them."""
        valid = self._get_param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"Invalid parameter {name!r} for PSMI; valid parameters are "
                    f"{valid}."
                )
            setattr(self, name, value)
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Each block's directions are rows of directions_: pickled once.
        state = dict(self.__dict__)
        fits = state.pop("_block_fits_", None)
        if fits is not None:
            state["_block_params_"] = [fit.params for fit in fits]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        params = state.pop("_block_params_", None)
        self.__dict__.update(state)
        if params is not None:
            for name in _READ_ONLY:
                state[name].flags.writeable = False
            self._block_fits_ = _viewing(state["directions_"], params)

    def __repr__(self) -> str:
        defaults = {
            name: p.default
            for name, p in inspect.signature(type(self).__init__).parameters.items()
        }
        changed = []
        for name, value in self.get_params().items():
            default = defaults[name]
            if isinstance(value, np.ndarray) or not (
                value is default or (type(value) is type(default) and value == default)
            ):
                shown = "array(...)" if isinstance(value, np.ndarray) else repr(value)
                changed.append(f"{name}={shown}")
        return f"PSMI({', '.join(changed)})"

    @property
    def n_estimators(self) -> Any:
        """The number of directions: as given before fit, as used after."""
        if hasattr(self, "n_estimators_"):
            return self.n_estimators_
        return self._n_estimators

    @n_estimators.setter
    def n_estimators(self, value: Any) -> None:
        self._n_estimators = value

    # Public API.

    @_holding_blas
    def fit(
        self, X: Any = None, y: Any = None, *, features: Any = None, labels: Any = None
    ) -> PSMI:
        """Fit the class Gaussians along every direction.

        Parameters
        ----------
        X : array-like or dask array of shape (n_samples, n_features)
            Features. Any chunking; numeric or bool dtype.
        y : array-like or dask array of shape (n_samples,)
            Class labels, of any hashable type; every class needs at least
            2 samples.
        features, labels : array-like, optional
            psmi 0.2.0's names for X and y, for code written for it.

        Returns
        -------
        self : PSMI
            The fitted estimator.
        """
        X, y = _psmi_names("fit", X, y, features, labels)
        self._fit(X, y, with_scores=False)
        self._warn_if_not_converged()
        return self

    @_holding_blas
    def fit_transform(
        self, X: Any = None, y: Any = None, *, features: Any = None, labels: Any = None
    ) -> tuple[Any, Any, Any]:
        """Fit, then return PSMI of the fitted samples.

        Equal to ``fit(X, y).transform(X, y)``, and faster: each block is
        projected once for both. Parameters as in ``fit``.

        Returns
        -------
        psmi_mean, psmi_std, psmi_full
            See ``transform``.
        """
        X, y = _psmi_names("fit_transform", X, y, features, labels)
        outputs = self._fit(X, y, with_scores=True)
        self._warn_if_not_converged()
        return outputs

    @_holding_blas
    def transform(
        self, X: Any = None, y: Any = None, *, features: Any = None, labels: Any = None
    ) -> tuple[Any, Any, Any]:
        """PSMI of each sample under the fitted Gaussians.

        Parameters
        ----------
        X : array-like or dask array of shape (n_samples, n_features)
            Features, with as many features as in fit.
        y : array-like or dask array of shape (n_samples,)
            Labels, each among ``classes_``.
        features, labels : array-like, optional
            psmi 0.2.0's names for X and y.

        Returns
        -------
        psmi_mean : ndarray or dask array of shape (n_samples,)
            PSMI of each sample: the mean of its pmi over the directions.
        psmi_std : ndarray or dask array of shape (n_samples,)
            Standard deviation (ddof=0) of its pmi over the directions.
        psmi_full : ndarray or dask array of shape (n_samples, n_estimators_)
            Every pmi value. For dask input, a lazy dask array that
            recomputes the projections when computed (or written, for example
            with ``psmi_full.to_zarr(path)``, chunk by chunk).
        """
        X, y = _psmi_names("transform", X, y, features, labels)
        self._check_fitted()
        ensure_a_running_worker()  # checking dask input computes on it
        features = check_features(X, self.n_features_in_, min_samples=1)
        labels = check_labels(y, features.shape[0])
        codes = encode_known_labels(labels, self.classes_)
        params = check_params(self)
        is_dask = isinstance(features, da.Array)
        if not is_dask:
            _check_full_fits(features.shape[0], self.n_estimators_)
        rows = params.chunk_size or chunk_rows(
            features.shape[0], self.n_features_in_, params.block_size
        )
        in_flight = self._in_flight(params)

        firsts = np.cumsum([0] + [f.directions.shape[0] for f in self._block_fits_])

        def transform_on(backend: Any) -> tuple[Any, Any, Any]:
            data = place(backend, features, codes, rows, self._offset_)
            sink = _sink(backend, not is_dask, data.n_samples, self.n_estimators_)
            keep = not is_dask and sink is None
            accumulator = SampleAccumulator(
                backend, data.starts, None, keep, data.n_samples
            )

            def build(block: int) -> tuple[Any, list[Any]]:
                fit = self._block_fits_[block]
                directions = delayed(fit.directions, pure=True)
                params = delayed(fit.params, pure=True)
                columns = Columns(keep, sink, int(firsts[block]))
                return params, score_block(data, directions, params, columns)

            fetch = keep and not isinstance(backend, LocalBackend)

            def consume(block: int, result: Any) -> bool:
                accumulator.add(result[1])
                if fetch:
                    accumulator.fetch_ahead(block + 1)
                return False

            try:
                run_blocks(backend, build, len(self._block_fits_), in_flight, consume)
                return self._outputs(
                    features, codes, data, accumulator, is_dask, rows, sink
                )
            finally:
                accumulator.close()

        return run_with_retries(transform_on, in_flight)

    # psmi 0.2.0's names, read-only.

    @property
    def fitted(self) -> bool:
        """Whether the estimator is fitted (psmi 0.2.0's name)."""
        return hasattr(self, "n_estimators_")

    @property
    def thetas(self) -> np.ndarray | None:
        """Alias of ``directions_`` (psmi 0.2.0's name)."""
        return getattr(self, "directions_", None)

    @property
    def frequency_per_label(self) -> dict[Any, float] | None:
        """Class priors by label (psmi 0.2.0's name)."""
        if not self.fitted:
            return None
        return {c: float(p) for c, p in zip(self.classes_, self.class_prior_)}

    @property
    def mean_per_label(self) -> dict[Any, np.ndarray] | None:
        """Projection means by label (psmi 0.2.0's name)."""
        if not self.fitted:
            return None
        return dict(zip(self.classes_, self.projection_means_))

    @property
    def std_per_label(self) -> dict[Any, np.ndarray] | None:
        """Projection standard deviations by label (psmi 0.2.0's name)."""
        if not self.fitted:
            return None
        return dict(zip(self.classes_, self.projection_stds_))

    # Internals.

    def _warn_if_not_converged(self) -> None:
        message = self.__dict__.pop("_convergence_warning", None)
        if message is not None:
            warnings.warn(message, ConvergenceWarning, stacklevel=user_stacklevel())

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise NotFittedError(
                "This PSMI instance is not fitted yet; call fit(X, y) before "
                "transform(X, y)."
            )

    def _in_flight(self, params: Params) -> int:
        if params.max_blocks_in_flight is not None:
            return params.max_blocks_in_flight
        return default_in_flight()

    def _direction_source(self, params: Params, n_features: int) -> DirectionSource:
        seed = seed_sequence(self.random_state)
        if isinstance(params.directions, np.ndarray):
            if params.directions.shape[1] != n_features:
                raise ValueError(
                    f"directions has {params.directions.shape[1]} columns, but X "
                    f"has {n_features} features."
                )
            return DirectionSource(
                n_features, params.block_size, "given", given=params.directions
            )
        self.random_state_ = seed
        return DirectionSource(
            n_features, params.block_size, params.directions, self.random_state_
        )

    def _plan(self, params: Params, source: DirectionSource) -> Plan:
        """How many directions, in blocks of ``min_n_estimators``.

        In auto mode the cap is rounded down to whole blocks, as psmi 0.2.0
        only ever has whole blocks: a short last block would make the rule
        compare nearly the same directions and pass for no reason.
        """
        available = source.n_available
        if params.n_estimators is not None:
            return Plan(params.n_estimators, params.block_size)
        cap = params.max_n_estimators
        if available is not None:
            cap = min(cap, available)
        n_blocks = cap // params.block_size
        if params.milestone * n_blocks < 1:
            given = available is not None and available < params.max_n_estimators
            what = (
                f"the {available} directions given"
                if given
                else f"max_n_estimators={params.max_n_estimators}"
            )
            fix = (
                "give more directions, lower min_n_estimators, or set n_estimators "
                "to use them all in fixed mode"
                if given
                else _more_blocks_or_milestone(params, n_blocks)
            )
            raise ValueError(
                f"In auto mode the stopping rule needs floor(k * milestone) >= 1 "
                f"after k blocks, but {what} allow only {n_blocks} block(s) of "
                f"min_n_estimators={params.block_size} with milestone="
                f"{params.milestone}; {fix}."
            )
        return Plan(n_blocks * params.block_size, params.block_size)

    def _fit(self, X: Any, y: Any, with_scores: bool) -> Any:
        for name in _FITTED:
            self.__dict__.pop(name, None)
        params = check_params(self)
        ensure_a_running_worker()  # checking dask input computes on it
        features = check_features(X)
        labels = check_labels(y, features.shape[0])
        classes, codes = encode_labels(labels)
        is_dask = isinstance(features, da.Array)
        n_samples, n_features = features.shape
        source = self._direction_source(params, n_features)
        plan = self._plan(params, source)
        auto = params.n_estimators is None
        full_in_memory = with_scores and not is_dask
        if auto:  # a huge cap costs nothing if the rule holds early
            n_blocks = _blocks_in_memory(plan, n_samples, n_features, full_in_memory)
        else:
            _check_memory(plan, n_samples, n_features, full_in_memory)
            n_blocks = plan.n_blocks
        rule = (
            StoppingRule(params.quantile, params.max_variation, params.milestone)
            if auto
            else None
        )
        rows = params.chunk_size or chunk_rows(n_samples, n_features, params.block_size)
        in_flight = self._in_flight(params)
        wants_outputs = with_scores
        keep_columns = wants_outputs and not is_dask
        with_scores = with_scores or auto
        cache = n_samples * params.block_size * 8 * in_flight <= _PROJECTION_CACHE_BYTES
        whole = (
            n_samples * max(n_features, params.block_size) <= _WHOLE_BLOCK_VALUES
            and -(-n_samples // rows) <= _WHOLE_BLOCK_CHUNKS
        )
        offset = _reference_sample(features)

        def fit_on(backend: Any) -> Any:
            directions = _early_directions(backend, source, plan, in_flight)
            data = place(backend, features, codes, rows, offset)
            # In auto mode the number of columns is known only at the end.
            sink = _sink(backend, keep_columns and not auto, n_samples, plan.total)
            keep = keep_columns and sink is None
            accumulator = (
                SampleAccumulator(backend, data.starts, rule, keep, n_samples)
                if with_scores
                else None
            )
            try:
                fits, history = self._run_fit(
                    backend,
                    data,
                    directions,
                    plan,
                    classes.shape[0],
                    params,
                    accumulator,
                    rule,
                    cache,
                    whole,
                    features,
                    sink,
                    n_blocks,
                )
                self._set_fitted(fits, history, classes, codes, offset, rule, params)
                if accumulator is None or not wants_outputs:
                    return None
                return self._outputs(
                    features, codes, data, accumulator, is_dask, rows, sink
                )
            finally:
                if accumulator is not None:
                    accumulator.close()

        return run_with_retries(fit_on, in_flight)

    def _run_fit(
        self,
        backend: Any,
        data: ChunkedData,
        directions: Callable[[int], Any],
        plan: Plan,
        n_classes: int,
        params: Params,
        accumulator: SampleAccumulator | None,
        rule: StoppingRule | None,
        cache: bool,
        whole: bool,
        features: Any,
        sink: ColumnSink | None,
        n_blocks: int,
    ) -> tuple[list[BlockFit], list[BlockRecord]]:
        """Run up to ``n_blocks`` of ``plan``'s blocks; fewer if the rule holds.

        In auto mode ``n_blocks`` may stop short of the cap, where memory
        ends: reaching it without the rule met is an error, never a result
        that depends on the machine.
        """
        fits: list[BlockFit] = []
        history: list[BlockRecord] = []
        started = time.perf_counter()
        bar = _progress_bar(params, plan, rule)

        def build(block: int) -> tuple[Any, list[Any]]:
            return fit_block(
                data,
                directions(block),
                n_classes,
                params.var_floor,
                with_scores=accumulator is not None,
                columns=Columns(
                    accumulator is not None and accumulator.keep_columns,
                    sink,
                    plan.first(block),
                ),
                cache_projections=cache,
                whole=whole,
            )

        # On a cluster the merges of each block go with the block, so that
        # the controller only reads the variation; threads merge at consume.
        ahead = accumulator is not None and not isinstance(backend, LocalBackend)
        variations: dict[int, Any] = {}

        def on_submit(block: int, handle: Any) -> None:
            if accumulator is not None:
                variations[block] = accumulator.extend(handle[1:])

        def consume(block: int, result: Any) -> bool:
            fit, scores = backend.fetch(result[0]), result[1]
            # Any block may overflow: a direction nearer X's largest values.
            _check_block_fit(fit, features)
            fits.append(fit)
            if accumulator is None:
                variation = None
            elif ahead:
                variation = accumulator.variation_of(variations.pop(block))
                if accumulator.keep_columns:
                    accumulator.fetch_ahead(block + 1)
            else:
                variation = accumulator.add(scores)
            done = plan.first(block) + plan.size(block)
            record = BlockRecord(block, done, variation, time.perf_counter() - started)
            history.append(record)
            log_block(record, rule.max_variation if rule else None)
            if bar is not None:
                bar.update(plan.size(block))
                if variation is not None:
                    bar.set_postfix_str(
                        f"variation {variation:.4g} / {params.max_variation:.4g}"
                    )
            return rule is not None and variation is not None and rule.is_met(variation)

        try:
            run_blocks(
                backend,
                build,
                n_blocks,
                self._in_flight(params),
                consume,
                on_submit if ahead else None,
            )
            if len(fits) < plan.n_blocks and rule is not None:
                full = accumulator is not None and accumulator.keep_columns
                _raise_if_out_of_memory(history[-1], rule, params, full)
            if ahead and accumulator is not None:
                accumulator.keep(len(fits))
        finally:
            if bar is not None:
                bar.close()
        return fits, history

    def _set_fitted(
        self,
        fits: list[BlockFit],
        history: list[BlockRecord],
        classes: np.ndarray,
        codes: np.ndarray,
        offset: np.ndarray,
        rule: StoppingRule | None,
        params: Params,
    ) -> None:
        directions = np.concatenate([f.directions for f in fits], axis=0)
        directions.flags.writeable = False
        shift = directions @ offset
        self._offset_ = offset
        # The blocks read their rows of directions_: one copy in memory.
        self._block_fits_ = _viewing(directions, [f.params for f in fits])
        self.directions_ = directions
        self.classes_ = classes
        self.class_prior_ = np.bincount(codes, minlength=classes.shape[0]) / codes.size
        self.projection_means_ = (
            np.concatenate([f.params.means for f in fits], axis=1) + shift
        )
        self.projection_stds_ = np.concatenate([f.params.stds for f in fits], axis=1)
        for name in _READ_ONLY:
            getattr(self, name).flags.writeable = False
        self.n_features_in_ = directions.shape[1]
        self.n_blocks_ = len(fits)
        self.history_ = [record.as_dict() for record in history]
        self.converged_ = None
        if rule is not None:
            last = history[-1].variation
            self.converged_ = last is not None and rule.is_met(last)
            if self.converged_:
                logger.info(
                    "stopped after %d blocks (%d directions): variation %.4g <= %.4g",
                    len(fits),
                    directions.shape[0],
                    last,
                    rule.max_variation,
                )
            else:
                logger.info(
                    "stopped at the cap of %d directions: variation %.4g > %.4g",
                    directions.shape[0],
                    last,
                    rule.max_variation,
                )
                rows = params.directions
                given = isinstance(rows, np.ndarray)
                limit = (
                    f"the {directions.shape[0]} directions given"
                    if isinstance(rows, np.ndarray)
                    and rows.shape[0] < params.max_n_estimators
                    else f"max_n_estimators={params.max_n_estimators} directions"
                )
                more = "give more directions" if given else "increase max_n_estimators"
                advice = (
                    ", or use directions='orthogonal', which needs fewer"
                    if isinstance(params.directions, str) and params.directions == "iid"
                    else ""
                )
                self._convergence_warning = (
                    f"The stopping rule was not met within {limit}: the mean "
                    f"relative variation of the lowest PSMI was {last:.4g}, above "
                    f"max_variation_of_the_lowest={rule.max_variation}. To go on, "
                    f"{more}; to accept a looser estimate, increase "
                    f"max_variation_of_the_lowest{advice}."
                )
        else:
            logger.info(
                "fitted %d directions in %d blocks", directions.shape[0], len(fits)
            )
        self.n_estimators_ = directions.shape[0]

    def _outputs(
        self,
        features: Any,
        codes: np.ndarray,
        data: ChunkedData,
        accumulator: SampleAccumulator,
        is_dask: bool,
        rows: int,
        sink: ColumnSink | None,
    ) -> tuple[Any, Any, Any]:
        moments = accumulator.moments()
        mean = np.concatenate([m.mean for m in moments])
        with np.errstate(over="ignore", invalid="ignore"):
            std = np.sqrt(np.concatenate([m.m2 for m in moments]) / moments[0].count)
        _raise_if_overflowed(features, mean, std)
        if not is_dask:
            if sink is not None:
                return mean, std, sink.array
            return mean, std, self._gather_columns(accumulator, data)
        backend = accumulator.backend
        full = self._lazy_full(features, codes, rows, backend)
        return (
            as_dask(backend, mean, data.sizes),
            as_dask(backend, std, data.sizes),
            full,
        )

    def _gather_columns(
        self, accumulator: SampleAccumulator, data: ChunkedData
    ) -> np.ndarray:
        full = np.empty((data.n_samples, self.n_estimators_))
        column = 0
        for block in accumulator.column_blocks():
            width = block[0].shape[1]
            for start, size, part in zip(data.starts, data.sizes, block):
                full[start : start + size, column : column + width] = part
            column += width
        return full

    def _lazy_full(
        self, features: da.Array, codes: np.ndarray, rows: int, backend: Any
    ) -> da.Array:
        """psmi_full as a lazy dask array, recomputed chunk by chunk.

        On a cluster, the labels, the reference sample and each block's fit
        are scattered once, so that computing psmi_full sends a small graph.
        """
        X = features.rechunk({0: rows, 1: -1})
        labels = as_dask(backend, codes, X.chunks[0])[:, None]
        offset = share(backend, self._offset_)
        columns = [
            da.map_blocks(
                _pmi_columns,
                X,
                labels,
                offset,
                share(backend, fit),
                chunks=(X.chunks[0], (fit.directions.shape[0],)),
                dtype=np.float64,
            )
            for fit in self._block_fits_
        ]
        return da.concatenate(columns, axis=1)


_FITTED = (
    "n_estimators_",
    "directions_",
    "classes_",
    "class_prior_",
    "projection_means_",
    "projection_stds_",
    "n_features_in_",
    "n_blocks_",
    "history_",
    "converged_",
    "random_state_",
    "_offset_",
    "_block_fits_",
    "_convergence_warning",
)


# The model reads its blocks, not these: writing into them would change
# nothing, so they refuse writes.
_READ_ONLY = ("directions_", "class_prior_", "projection_means_", "projection_stds_")


def _viewing(directions: np.ndarray, params: list[GaussianParams]) -> list[BlockFit]:
    """Block fits whose directions are consecutive rows of ``directions``."""
    fits = []
    first = 0
    for block in params:
        stop = first + block.n_directions
        fits.append(BlockFit(directions[first:stop], block))
        first = stop
    return fits


def _sink(
    backend: Any, wanted: bool, n_samples: int, n_directions: int
) -> ColumnSink | None:
    """A preallocated psmi_full, when the blocks run in this process."""
    if wanted and isinstance(backend, LocalBackend):
        return ColumnSink(n_samples, n_directions)
    return None


def _early_directions(
    backend: Any, source: DirectionSource, plan: Plan, in_flight: int
) -> Callable[[int], Any]:
    """The directions of each block, those of the first blocks started now.

    Directions do not need X: on a cluster, the workers draw those of the
    blocks submitted first while X is being scattered to them.
    """
    early = {
        block: backend.start(block_directions(source, block, plan.size(block)))
        for block in range(min(in_flight, plan.n_blocks))
    }

    def directions(block: int) -> Any:
        # Popped: once its block is submitted, the scheduler keeps the
        # directions as long as the block needs them, and not longer.
        if block in early:
            return early.pop(block)
        return block_directions(source, block, plan.size(block))

    return directions


def _memory_total() -> int:
    return _memory()[0]


def _memory_available() -> int:
    return _memory()[1]


def _memory() -> tuple[int, int]:
    """Bytes of memory (total, free) for this process: the machine's, or
    less under an address-space limit (``ulimit -v``) or a cgroup limit
    (containers, batch jobs)."""
    import psutil

    memory = psutil.virtual_memory()
    total, free = int(memory.total), int(memory.available)
    limits = []
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append((soft, psutil.Process().memory_info().vms))
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        pass
    limits.extend(_cgroup_limit())
    for limit, used in limits:
        total, free = min(total, limit), min(free, max(0, limit - used))
    return total, free


def _cgroup_limit() -> list[tuple[int, int]]:
    """The cgroup memory limit of this process and its use, if any (v2 or v1)."""
    try:
        with open("/proc/self/cgroup") as handle:
            lines = [line.strip().split(":", 2) for line in handle]
    except OSError:
        return []
    found = []
    for _, controllers, path in (line for line in lines if len(line) == 3):
        if controllers == "":
            files = ("", "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            files = ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        folder = os.path.join("/sys/fs/cgroup", files[0], path.lstrip("/"))
        try:
            with open(os.path.join(folder, files[1])) as handle:
                limit = handle.read().strip()
            with open(os.path.join(folder, files[2])) as handle:
                used = int(handle.read())
        except (OSError, ValueError):
            continue
        # "max" (v2) or a huge number (v1) is no limit.
        if limit.isdigit() and int(limit) < 2**60:
            found.append((int(limit), used))
    return found


def _check_full_fits(n_samples: int, n_estimators: int) -> None:
    """Refuse at once a numpy psmi_full that could never fit here."""
    needed, total = n_samples * n_estimators * 8, _memory_total()
    if needed > total:
        raise ValueError(
            f"psmi_full of {n_samples} samples x {n_estimators} directions needs "
            f"{needed / 2**30:,.1f} GiB, more than this machine's "
            f"{total / 2**30:,.1f} GiB of memory; pass X as a dask array for a "
            "lazy psmi_full, or transform fewer samples at a time."
        )


def _check_memory(plan: Plan, n_samples: int, n_features: int, full: bool) -> None:
    """Refuse at once a fixed-mode fit whose results could never fit here."""
    total = _memory_total()
    needed = plan.total * n_features * 8
    what = "the directions"
    if full:
        needed += n_samples * plan.total * 8
        what = "the directions and psmi_full"
    if needed <= total:
        return
    fix = "choose a smaller n_estimators"
    if full:
        fix += ", or pass X as a dask array for a lazy psmi_full"
    raise ValueError(
        f"n_estimators={plan.total} needs {needed / 2**30:,.1f} GiB for {what} "
        f"alone, more than this machine's {total / 2**30:,.1f} GiB of memory; "
        f"{fix}."
    )


def _more_blocks_or_milestone(params: Params, n_blocks: int) -> str:
    """The smallest changes that make the auto-mode rule testable."""
    needed = math.ceil(1 / params.milestone) * params.block_size
    fix = f"raise max_n_estimators to {needed}"
    if n_blocks >= 2:  # milestone < 1: one block can never be tested
        fix += f" or milestone to {math.ceil(1e4 / n_blocks) / 1e4:g}"
    return fix


def _bytes_per_direction(n_samples: int, n_features: int, full: bool) -> int:
    # Twice: the blocks' arrays, then the fitted ones joined from them.
    return 2 * 8 * (n_features + (n_samples if full else 0))


def _blocks_in_memory(plan: Plan, n_samples: int, n_features: int, full: bool) -> int:
    """How many of an auto-mode plan's blocks half the free memory can hold.

    The other half is for the blocks being drawn and computed: random
    normals, the QR's workspace, projections.
    """
    per_block = plan.block_size * _bytes_per_direction(n_samples, n_features, full)
    available = _memory_available()
    n_blocks = min(plan.n_blocks, available // 2 // per_block)
    if n_blocks < 1:
        raise ValueError(
            f"one block of min_n_estimators={plan.block_size} directions needs "
            f"{per_block / 2**30:,.1f} GiB, more than half the "
            f"{available / 2**30:,.1f} GiB of memory free here; choose a smaller "
            "min_n_estimators"
            + (", or pass X as a dask array for a lazy psmi_full." if full else ".")
        )
    return int(n_blocks)


def _raise_if_out_of_memory(
    last: BlockRecord, rule: StoppingRule, params: Params, full: bool
) -> None:
    """Auto mode stopped where memory ends, not by its rule: say so."""
    if last.variation is not None and rule.is_met(last.variation):
        return
    raise ValueError(
        f"auto mode reached {last.n_estimators} directions without meeting the "
        f"stopping rule, and half the memory free when the fit began holds no "
        f"more directions, "
        f"short of max_n_estimators={params.max_n_estimators}; choose "
        f"max_n_estimators <= {last.n_estimators} (the fit then ends there with "
        "a ConvergenceWarning), a larger max_variation_of_the_lowest"
        + (", or X as a dask array for a lazy psmi_full." if full else " instead.")
    )


def _reference_sample(features: Any) -> np.ndarray:
    first = features[0]
    if isinstance(first, da.Array):
        first = first.compute()
    return np.asarray(first, dtype=np.float64)


def _raise_if_overflowed(features: Any, mean: np.ndarray, std: np.ndarray) -> None:
    """A clear error for outputs that left float64, never a silent NaN."""
    bad = ~(np.isfinite(mean) & np.isfinite(std))
    if not bad.any():
        return
    raise_if_not_finite(features)
    count, row = int(bad.sum()), int(np.argmax(bad))
    raise ValueError(
        f"PSMI of {count} sample{'s' if count > 1 else ''} overflows float64 (the "
        f"first is row {row}): they lie so far from every class, in units of "
        "the class spreads, that their log-densities leave the float64 range. "
        "Such rows are far outside the data the estimator was fitted on; check "
        "their scale and units."
    )


def _check_block_fit(fit: BlockFit, features: Any) -> None:
    params = fit.params
    if not (np.all(np.isfinite(params.means)) and np.all(np.isfinite(params.stds))):
        raise_if_not_finite(features)
        raise ValueError(
            "The projections of X overflow float64; rescale X (for example "
            "divide it by its largest absolute value)."
        )
    error = too_small_for_float64(params)
    if error is not None:
        raise error


def _pmi_columns(
    chunk: np.ndarray, codes: np.ndarray, offset: np.ndarray, fit: BlockFit
) -> np.ndarray:
    with single_threaded_blas():
        projections = project(chunk, offset, fit.directions)
    _, columns = score(projections, codes[:, 0], fit.params, True)
    return columns  # type: ignore[return-value]


def _progress_bar(params: Params, plan: Plan, rule: StoppingRule | None) -> Any:
    if not params.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=plan.total,
        unit="direction",
        desc="PSMI (auto)" if rule is not None else "PSMI",
    )


def _psmi_names(
    method: str, X: Any, y: Any, features: Any, labels: Any
) -> tuple[Any, Any]:
    """X and y, given by these names or by psmi 0.2.0's, exactly once each."""
    chosen = []
    for name, value, alias, alias_value in (
        ("X", X, "features", features),
        ("y", y, "labels", labels),
    ):
        if value is not None and alias_value is not None:
            raise TypeError(
                f"{method}() got both {name} and {alias} (psmi 0.2.0's name for "
                f"{name}); pass one of them."
            )
        if value is None and alias_value is None:
            raise TypeError(f"{method}() missing {name} (or {alias}).")
        chosen.append(alias_value if value is None else value)
    return chosen[0], chosen[1]
