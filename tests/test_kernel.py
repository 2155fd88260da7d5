"""The compiled scoring kernel against its numpy fallback, and its exp."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from psmi_dask import _numerics
from psmi_dask._numerics import (
    _EXP_TABLE,
    _LOG_TABLE,
    _exp_negligible_to_zero,
    _log_at_least_one,
    _pmi_numpy,
    class_moments,
    fit_gaussians,
    project,
    score,
)

needs_kernel = pytest.mark.skipif(
    _numerics._kernel is None, reason="built without the compiled kernel"
)


def test_kernel_is_built_where_ci_requires_it():
    if os.environ.get("PSMI_DASK_REQUIRE_KERNEL") != "1":
        pytest.skip("PSMI_DASK_REQUIRE_KERNEL is not set")
    assert _numerics._kernel is not None


def test_exp_is_within_two_ulp_of_the_c_library():
    x = np.concatenate([np.linspace(-50.0, 0.0, 400_001), -np.logspace(-300, 1, 999)])
    expected = np.array([math.exp(v) for v in x])
    got = _exp_negligible_to_zero(x.copy())
    ulp = np.abs(got - expected) / np.spacing(expected)
    assert ulp.max() <= 2.0


def test_exp_clamps_below_minus_fifty_and_keeps_nan():
    got = _exp_negligible_to_zero(np.array([-1e300, -np.inf, -50.0, np.nan, 0.0]))
    assert got[0] == got[1] == got[2] == _EXP_TABLE[-1]
    assert np.isnan(got[3])
    assert got[4] == 1.0


def test_log_is_within_two_ulp_of_the_c_library():
    x = np.concatenate(
        [np.linspace(1.0, 3.0, 200_001), np.geomspace(1.0, 1e300, 100_001)]
    )
    x = np.concatenate([x, np.nextafter(x, np.inf)])
    expected = np.array([math.log(v) for v in x])
    got = _log_at_least_one(x.copy())
    # Near 1 the result is tiny and the error is counted against log(2).
    ulp = np.abs(got - expected) / np.spacing(np.maximum(expected, math.log(2)))
    assert ulp.max() <= 2.0
    assert _log_at_least_one(np.array([1.0]))[0] == 0.0
    assert np.isnan(_log_at_least_one(np.array([np.nan]))[0])


def _problem(seed: int, n: int, n_dirs: int, n_classes: int):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n, n_dirs)) * 3.0
    t[::7] *= 40.0  # far from every class: the clamp and the peak matter
    codes = rng.integers(n_classes, size=n).astype(np.int64)
    means = rng.normal(size=(n_classes, n_dirs))
    stds = rng.uniform(0.01, 2.0, size=(n_classes, n_dirs))
    log_prior = np.log(rng.dirichlet(np.ones(n_classes)))
    scales = np.sqrt(0.5) / stds
    log_coef = log_prior[:, None] - np.log(stds)
    return t, codes, means, scales, log_coef, log_prior


def _kernel_pmi(args, n, n_dirs, n_classes):
    pmi = np.empty((n, n_dirs))
    _numerics._kernel.pmi_rows(*args, _EXP_TABLE, _LOG_TABLE, pmi, n, n_dirs, n_classes)
    return pmi


@needs_kernel
@pytest.mark.parametrize(
    "seed, n, n_dirs, n_classes", [(0, 50, 17, 3), (1, 9, 1, 2), (2, 33, 64, 40)]
)
def test_kernel_gives_the_numpy_bits(seed, n, n_dirs, n_classes):
    args = _problem(seed, n, n_dirs, n_classes)
    expected = np.empty((n, n_dirs))
    _pmi_numpy(*args, expected)
    assert_array_equal(_kernel_pmi(args, n, n_dirs, n_classes), expected)


@needs_kernel
def test_kernel_propagates_nan():
    args = _problem(3, 4, 5, 3)
    args[0][1, 2] = np.nan
    pmi = _kernel_pmi(args, 4, 5, 3)
    assert np.isnan(pmi[1, 2])
    assert np.isfinite(np.delete(pmi.ravel(), 7)).all()


@needs_kernel
def test_kernel_rejects_codes_out_of_range_and_short_buffers():
    args = _problem(4, 4, 5, 3)
    args[1][2] = 3
    with pytest.raises(ValueError, match="class code out of range"):
        _kernel_pmi(args, 4, 5, 3)
    args[1][2] = 0
    with pytest.raises(ValueError, match="means holds 120 bytes, expected 160"):
        _kernel_pmi(args, 4, 5, 4)
    with pytest.raises(ValueError, match="n_classes >= 1"):
        _kernel_pmi(args, 4, 5, 0)
    empty = np.empty(0)
    with pytest.raises(ValueError, match="of sizes that fit in memory"):
        _numerics._kernel.pmi_rows(
            empty, args[1][:0], *args[2:], _EXP_TABLE, _LOG_TABLE, empty, 2**61, 8, 3
        )


@needs_kernel
def test_score_is_the_same_without_the_kernel(monkeypatch):
    rng = np.random.default_rng(5)
    y = rng.integers(4, size=700)
    X = rng.normal(size=(700, 30)) + y[:, None] * rng.normal(size=30)
    directions = rng.normal(size=(90, 30))
    T = project(X, X[0], directions)
    params = fit_gaussians(class_moments(T, y, 4), 1e-9)
    moments, columns = score(T, y, params, keep_columns=True)
    monkeypatch.setattr(_numerics, "_kernel", None)
    moments_np, columns_np = score(T, y, params, keep_columns=True)
    assert_array_equal(columns, columns_np)
    assert_array_equal(moments.mean, moments_np.mean)
    assert_array_equal(moments.m2, moments_np.m2)
