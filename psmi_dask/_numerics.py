"""The numerics of PSMI along a block of directions, in plain numpy.

Everything here works on one chunk of samples at a time and knows nothing
of Dask: the graph in ``_blocks`` calls these functions per chunk and
merges their results in a fixed order.

Statistics are float64 moments (count, mean, sum of squared deviations)
that merge exactly as Chan, Golub and LeVeque's pairwise update does, so
the result does not depend on how the samples were split. Densities are
handled in log space, with the denominator as a log-sum-exp over classes.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, TypeVar

import numpy as np

_kernel: ModuleType | None
try:
    import psmi_dask._kernel as _kernel
except ImportError:  # built without a C compiler: the numpy path below
    _kernel = None

__all__ = [
    "ClassMoments",
    "GaussianParams",
    "SampleMoments",
    "class_moments",
    "fit_gaussians",
    "merge_class_moments",
    "merge_sample_moments",
    "project",
    "score",
    "too_small_for_float64",
]

# Bytes of the (n_classes, rows, n_directions) float64 temporary of the
# numpy fallback in score, which also sets the rows of the compiled kernel's
# tiles: small enough to stay in cache, large enough that per-call costs are
# amortised (measured on 2-core machines, see tests/benchmarks).
_SCORE_TILE_BYTES = 1 << 20

# exp(-50) is 2e-22: a hundred such terms still vanish beside 1 in float64.
_NEGLIGIBLE = -50.0

# exp on [-50, 0] and log on [1, inf) are tables and Taylor polynomials in
# plain float64 arithmetic: the compiled kernel and the numpy fallback give
# the same bits. exp is within 2 ulp of the C library's; log within 2 ulp of
# max(log x, log 2), an absolute error below 3e-16 near 1 (log is only taken
# of sums of at least 1, then subtracted). The C library fills the tables,
# so that numpy's SIMD dispatch cannot change them.
_EXP_STEPS = 128
_EXP_TABLE = np.array(
    [math.exp(-j / _EXP_STEPS) for j in range(int(-_NEGLIGIBLE) * _EXP_STEPS + 1)]
)
# Adding and subtracting 1.5 * 2**52 rounds a float64 to the nearest integer.
_ROUNDING_SHIFT = 1.5 * 2.0**52
# The mantissa in [1, 2) falls in one of 128 cells around c_j.
_LOG_CELLS = 128
_LOG_CENTRES = 1.0 + (np.arange(_LOG_CELLS) + 0.5) / _LOG_CELLS
_LOG_TABLE = np.concatenate([1.0 / _LOG_CENTRES, [math.log(c) for c in _LOG_CENTRES]])
_MANTISSA_BITS = np.uint64(0x000F_FFFF_FFFF_FFFF)
_ONE_BITS = np.uint64(0x3FF0_0000_0000_0000)

_buffers = threading.local()

_F = TypeVar("_F", bound=Callable[..., Any])

# Projections are computed in whole tiles of this many rows (see project).
_PROJECTION_ROWS = 16

# Below this, squared deviations lose their digits to subnormal numbers.
_SMALLEST_VARIANCE = 1e-280


@dataclass(frozen=True)
class ClassMoments:
    """Per-class moments of the projections along a block of directions.

    ``counts`` has shape (n_classes,); ``means`` and ``m2`` (sums of squared
    deviations from the class mean) have shape (n_classes, n_directions).
    """

    counts: np.ndarray
    means: np.ndarray
    m2: np.ndarray


@dataclass(frozen=True)
class SampleMoments:
    """Per-sample moments of pmi over a set of directions.

    ``count`` directions; ``mean`` and ``m2`` have shape (n_samples,).
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray


@dataclass(frozen=True)
class GaussianParams:
    """The fitted 1-D Gaussians of every class along a block of directions.

    ``means`` are those of the shifted projections (see ``project``);
    ``stds`` are floored (see ``fit_gaussians``); ``log_prior`` has shape
    (n_classes,), the others (n_classes, n_directions).
    """

    log_prior: np.ndarray
    means: np.ndarray
    stds: np.ndarray

    @property
    def n_directions(self) -> int:
        return self.means.shape[1]


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 buffer of this thread, of ``shape``, reused call after call.

    Fresh multi-megabyte arrays cost page faults comparable to the
    arithmetic on Dask workers, whose nanny makes malloc hand freed memory
    back at once. The buffer only grows: the short last chunk of a run
    takes a view of it, so that alternating shapes do not reallocate.
    """
    size = math.prod(shape)
    buffer = getattr(_buffers, name, None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(size)
        setattr(_buffers, name, buffer)
    return buffer[:size].reshape(shape)


def as_aligned(array: np.ndarray, dtype: type) -> np.ndarray:
    """``array`` as a C-contiguous, aligned array of ``dtype``, copied if need be.

    Arrays a Dask worker receives from another can start at any byte: BLAS
    rounds a product with a misaligned matrix differently, and the compiled
    kernel reads whole float64s.
    """
    return np.require(array, dtype, ["C_CONTIGUOUS", "ALIGNED"])


def project(
    chunk: np.ndarray,
    offset: np.ndarray,
    directions: np.ndarray,
    temporary: bool = False,
) -> np.ndarray:
    """Project ``chunk - offset`` onto ``directions``, in float64.

    Subtracting a reference sample (``offset``) before projecting leaves
    PSMI unchanged, keeps the projections of data far from the origin well
    conditioned, and makes every projection of a constant feature exactly
    zero, so that a constant input gives PSMI exactly 0. With ``temporary``
    the result lives in a buffer of this thread that the next call reuses.
    """
    # BLAS may round the last rows of a product differently from the others.
    # Padded to a multiple of 16 rows, the rows of a chunk keep their bits
    # on kernels that work in tiles of 16 rows or fewer (OpenBLAS's Haswell
    # kernels); OpenBLAS's SkylakeX kernels also round by where a row falls
    # at the edges, so there a chunk of other rows may move the last bits.
    # The same chunk gives the same product, and so the same bits, always.
    rows = chunk.shape[0]
    padded = -(-rows // _PROJECTION_ROWS) * _PROJECTION_ROWS
    centred = _scratch("centred", (padded, chunk.shape[1]))
    directions = as_aligned(directions, np.float64)
    shape = (padded, directions.shape[0])
    out = _scratch("projections", shape) if temporary else np.empty(shape)
    # Overflow gives inf, which the caller reports with advice.
    with np.errstate(over="ignore", invalid="ignore"):
        np.subtract(chunk, offset, out=centred[:rows], dtype=np.float64)
        centred[rows:] = 0.0
        np.matmul(centred, directions.T, out=out)
    return out[:rows]


def _overflow_checked_later(function: _F) -> _F:
    """Run ``function`` with numpy's overflow warnings off.

    Projections of data near float64's limits overflow to inf; the fit then
    stops with one clear error (``_estimator._check_block_fit``) rather
    than a run of RuntimeWarnings.
    """

    @functools.wraps(function)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(over="ignore", invalid="ignore"):
            return function(*args, **kwargs)

    return quiet  # type: ignore[return-value]


@_overflow_checked_later
def class_moments(
    projections: np.ndarray, codes: np.ndarray, n_classes: int
) -> ClassMoments:
    """Moments of ``projections`` per class, exact two-pass within the chunk."""
    projections = as_aligned(projections, np.float64)
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    one_hot = np.zeros((n_classes, codes.shape[0]))
    one_hot[codes, np.arange(codes.shape[0])] = 1.0
    sums = one_hot @ projections
    safe = np.where(counts > 0, counts, 1.0)[:, None]
    means = sums / safe
    deviations = _scratch("deviations", projections.shape)
    # mode='raise' (the default) writes through a temporary of the output's
    # size; codes are valid class indices, so clipping never changes one.
    np.take(means, codes, axis=0, out=deviations, mode="clip")
    np.subtract(projections, deviations, out=deviations)
    np.square(deviations, out=deviations)
    m2 = one_hot @ deviations
    return ClassMoments(counts, means, m2)


def _merge(
    count_a: Any,
    mean_a: np.ndarray,
    m2_a: np.ndarray,
    count_b: Any,
    mean_b: np.ndarray,
    m2_b: np.ndarray,
) -> tuple[Any, np.ndarray, np.ndarray]:
    count = count_a + count_b
    safe = np.where(count > 0, count, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + np.square(delta) * (count_a * count_b / safe)
    return count, mean, m2


@_overflow_checked_later
def merge_class_moments(a: ClassMoments, b: ClassMoments) -> ClassMoments:
    """Chan et al.'s pairwise merge of two sets of class moments."""
    counts, means, m2 = _merge(
        a.counts[:, None], a.means, a.m2, b.counts[:, None], b.means, b.m2
    )
    return ClassMoments(counts[:, 0], means, m2)


def merge_sample_moments(a: SampleMoments, b: SampleMoments) -> SampleMoments:
    """Merge per-sample pmi moments of two disjoint sets of directions."""
    _, mean, m2 = _merge(
        np.float64(a.count), a.mean, a.m2, np.float64(b.count), b.mean, b.m2
    )
    return SampleMoments(a.count + b.count, mean, m2)


@_overflow_checked_later
def fit_gaussians(moments: ClassMoments, var_floor: float) -> GaussianParams:
    """Class Gaussians from merged moments, with the variance floor.

    The variance of a class along a direction is floored at ``var_floor``
    times the variance of all samples along it, and at a level far above
    the rounding noise of the projections, so that a class with zero spread
    (duplicate rows, constant features) gets a finite density. When every
    sample projects to the same point, every class gets the same unit
    variance, and every pmi is exactly 0. The floor is relative, so PSMI
    stays unchanged when X is scaled.

    Directions along which X varies too little for float64 get a std of 0,
    which the floor rules out otherwise: the estimator refuses the block
    (``too_small_for_float64``) where it reads it, not inside a worker's
    task, whose failure each worker would log.
    """
    counts = moments.counts
    n_samples = counts.sum()
    prior = counts / n_samples
    variances = moments.m2 / counts[:, None]

    total_mean = (prior[:, None] * moments.means).sum(axis=0)
    between = np.square(moments.means - total_mean)
    total_var = (prior[:, None] * (variances + between)).sum(axis=0)
    # A variance that underflowed to 0 while the class means are not 0 is
    # data too small for float64, not constant data (whose projections are
    # exactly 0 after the offset is subtracted).
    moved = np.any(moments.means != 0, axis=0)
    too_small = (total_var < _SMALLEST_VARIANCE) & ((total_var > 0) | moved)
    noise = np.square(4096 * np.finfo(np.float64).eps * np.abs(total_mean))
    floor = np.maximum(var_floor * total_var, noise)
    floor = np.where(floor > 0, floor, 1.0)
    stds = np.sqrt(np.maximum(variances, floor))
    stds[:, too_small] = 0.0
    return GaussianParams(np.log(prior), moments.means, stds)


def too_small_for_float64(params: GaussianParams) -> ValueError | None:
    """The error for a block fitted on data too small for float64, if it was."""
    if not np.any(params.stds == 0):
        return None
    return ValueError(
        "X varies too little for float64 along some directions (variance "
        f"below {_SMALLEST_VARIANCE:g}); multiply X by a large constant, "
        "which leaves PSMI unchanged."
    )


def _tile_rows(n_classes: int, n_directions: int) -> int:
    return max(8, _SCORE_TILE_BYTES // (8 * n_classes * max(n_directions, 1)))


def score(
    projections: np.ndarray,
    codes: np.ndarray,
    params: GaussianParams,
    keep_columns: bool = False,
    out: np.ndarray | None = None,
) -> tuple[SampleMoments, np.ndarray | None]:
    """Pointwise MI of each sample along each direction of the block.

    pmi = log N(t; mu_y, sigma_y) - log sum_c pi_c N(t; mu_c, sigma_c),
    computed as a log-sum-exp with the largest term taken out, so a sample
    far from every class still gets a finite value. The 1/sqrt(2 pi)
    constants cancel and are never computed. The loop over classes runs in
    the compiled kernel when it was built, else in numpy, with the same
    bits.

    Returns
    -------
    moments : SampleMoments
        Per-sample mean and sum of squared deviations of pmi over the block.
    columns : ndarray of shape (n_samples, n_directions) or None
        Every pmi value, when ``keep_columns``; None when they were written
        to ``out`` instead, an array of that shape.
    """
    n_samples, n_directions = projections.shape
    n_classes = params.means.shape[0]
    columns = np.empty((n_samples, n_directions)) if keep_columns else None
    mean = np.empty(n_samples)
    m2 = np.empty(n_samples)
    step = _tile_rows(n_classes, n_directions)
    # Non-finite input gives NaN here, and rows far beyond every class give
    # pmi whose squares overflow; the caller reports both, with where. A std
    # of 0 marks a block that the estimator refuses (fit_gaussians).
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        target = out if out is not None else columns
        _score_tiles(projections, codes, params, step, mean, m2, target)
    return SampleMoments(n_directions, mean, m2), columns


def _exp_negligible_to_zero(z: np.ndarray) -> np.ndarray:
    """exp of ``z`` clamped to [-50, 0], in place, as the kernel computes it.

    z = -j / 128 + r with |r| <= 1/256: exp(z) = exp(-j / 128) exp(r), the
    latter as its Taylor polynomial of degree 5. NaN stays NaN.
    """
    np.maximum(z, _NEGLIGIBLE, out=z)
    np.minimum(z, 0.0, out=z)
    z *= -_EXP_STEPS
    rounded = z + _ROUNDING_SHIFT
    rounded -= _ROUNDING_SHIFT
    with np.errstate(invalid="ignore"):  # NaN: the remainder keeps it
        index = rounded.astype(np.intp)
    np.subtract(rounded, z, out=z)
    z *= 1.0 / _EXP_STEPS
    poly = z * (1.0 / 120.0)
    for coefficient in (1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0):
        poly += coefficient
        poly *= z
    poly += 1.0
    np.take(_EXP_TABLE, index, out=z, mode="clip")
    z *= poly
    return z


def _log_at_least_one(x: np.ndarray) -> np.ndarray:
    """log of ``x`` >= 1 (float64, C-contiguous), in place, as the kernel.

    x = 2^e m with m in [1, 2) and m = c_j (1 + r), |r| < 1/256: log(x) is
    e log 2 + log(c_j) + log1p(r), the last as its Taylor polynomial of
    degree 6. log(1) is 0 and NaN stays NaN.
    """
    bits = x.view(np.uint64)
    exponent = (bits >> np.uint64(52)).astype(np.int64) - 1023
    cell = ((bits >> np.uint64(45)) & np.uint64(_LOG_CELLS - 1)).astype(np.intp)
    mantissa = ((bits & _MANTISSA_BITS) | _ONE_BITS).view(np.float64)
    centre = cell * (1.0 / _LOG_CELLS)
    centre += 1.0 + 0.5 / _LOG_CELLS
    r = mantissa - centre
    r *= _LOG_TABLE[cell]
    poly = r * (-1.0 / 6.0)
    for coefficient in (0.2, -0.25, 1.0 / 3.0, -0.5, 1.0):
        poly += coefficient
        poly *= r
    poly += _LOG_TABLE[_LOG_CELLS + cell]
    one, nan = x == 1.0, np.isnan(x)
    np.multiply(exponent, math.log(2.0), out=x, casting="unsafe")
    x += poly
    x[one] = 0.0
    x[nan] = np.nan
    return x


def _pmi_numpy(
    tile: np.ndarray,
    codes: np.ndarray,
    means: np.ndarray,
    scales: np.ndarray,
    log_coef: np.ndarray,
    log_prior: np.ndarray,
    pmi: np.ndarray,
) -> None:
    """What ``_kernel.pmi_rows`` computes, in numpy, with the same bits."""
    rows = tile.shape[0]
    z = np.subtract(tile[None], means[:, None, :])
    z *= scales[:, None, :]
    np.square(z, out=z)
    np.subtract(log_coef[:, None, :], z, out=z)
    peak = np.max(z, axis=0)
    z -= peak
    pmi[...] = z[codes, np.arange(rows)]
    total = np.sum(_exp_negligible_to_zero(z), axis=0, out=peak)
    pmi -= _log_at_least_one(total)
    pmi -= log_prior[codes][:, None]


def _score_tiles(
    projections: np.ndarray,
    codes: np.ndarray,
    params: GaussianParams,
    step: int,
    mean: np.ndarray,
    m2: np.ndarray,
    columns: np.ndarray | None,
) -> None:
    n_samples, n_directions = projections.shape
    projections = as_aligned(projections, np.float64)
    codes = as_aligned(codes, np.int64)
    means = as_aligned(params.means, np.float64)
    scales = np.sqrt(0.5) / params.stds
    log_prior = as_aligned(params.log_prior, np.float64)
    log_coef = log_prior[:, None] - np.log(params.stds)
    # Where every class has the same Gaussian, pmi is exactly 0; rounding in
    # the log-sum-exp would leave about 1e-16 instead.
    alike = np.all(params.means == params.means[:1], axis=0) & np.all(
        params.stds == params.stds[:1], axis=0
    )
    alike_columns = np.flatnonzero(alike) if alike.any() else None
    # Buffers reused across tiles: fresh arrays cost page faults comparable
    # to the arithmetic, and more so on Dask workers, whose nanny makes
    # malloc hand freed memory back at once.
    pmi_buffer = np.empty((step, n_directions))
    spread_buffer = np.empty((step, n_directions))
    for start in range(0, n_samples, step):
        stop = min(start + step, n_samples)
        rows = stop - start
        tile_codes = codes[start:stop]
        pmi = pmi_buffer[:rows]
        spread = spread_buffer[:rows]
        args = (projections[start:stop], tile_codes, means, scales, log_coef)
        if _kernel is not None:
            _kernel.pmi_rows(
                *args,
                log_prior,
                _EXP_TABLE,
                _LOG_TABLE,
                pmi,
                rows,
                n_directions,
                len(means),
            )
        else:
            _pmi_numpy(*args, log_prior, pmi)
        if alike_columns is not None:
            pmi[:, alike_columns] = 0.0
        tile_mean = pmi.mean(axis=1)
        mean[start:stop] = tile_mean
        np.subtract(pmi, tile_mean[:, None], out=spread)
        np.square(spread, out=spread)
        m2[start:stop] = spread.sum(axis=1)
        if columns is not None:
            columns[start:stop] = pmi
