"""Exact properties of the numerics (DESIGN.md, "The quantity")."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from psmi_dask import PSMI
from psmi_dask._numerics import (
    class_moments,
    fit_gaussians,
    merge_class_moments,
    project,
    score,
)


def _mixture(seed: int, n: int = 600, d: int = 6, n_classes: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.integers(n_classes, size=n)
    X = rng.normal(size=(n, d)) + 0.8 * y[:, None] * rng.normal(size=d)
    return X, y


def _pmi(X, y, directions, codes=None):
    offset = X[0].astype(np.float64)
    T = project(X, offset, directions)
    params = fit_gaussians(class_moments(T, y, int(y.max()) + 1), 1e-9)
    codes = y if codes is None else codes
    return score(T, codes, params, keep_columns=True)[1], params


def test_pmi_is_bounded_by_minus_log_prior():
    X, y = _mixture(0)
    directions = PSMI(n_estimators=40, random_state=0).fit(X, y).directions_
    pmi, params = _pmi(X, y, directions)
    bound = -params.log_prior[y][:, None]
    assert np.all(pmi <= bound + 1e-12)


def test_posterior_of_every_class_sums_to_one():
    X, y = _mixture(1)
    directions = PSMI(n_estimators=30, random_state=1).fit(X, y).directions_
    total = 0.0
    for label in range(3):
        codes = np.full_like(y, label)
        pmi, params = _pmi(X, y, directions, codes)
        total = total + np.exp(params.log_prior[label] + pmi)
    assert_allclose(total, 1.0, rtol=1e-12)


def test_opposite_directions_give_the_same_pmi():
    X, y = _mixture(2)
    directions = PSMI(n_estimators=25, random_state=2).fit(X, y).directions_
    pmi, _ = _pmi(X, y, directions)
    flipped, _ = _pmi(X, y, -directions)
    assert_allclose(flipped, pmi, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale, shift", [(1000.0, 0.0), (1e-3, 5.0), (7.0, -1e4)])
def test_psmi_is_unchanged_by_translation_and_positive_scaling(scale, shift):
    X, y = _mixture(3)
    est = PSMI(n_estimators=50, random_state=3)
    reference = est.fit_transform(X, y)[0]
    moved = est.fit_transform(X * scale + shift, y)[0]
    assert_allclose(moved, reference, rtol=1e-7, atol=1e-9)


def test_one_feature_psmi_does_not_depend_on_the_seed():
    X, y = _mixture(4, d=1)
    first = PSMI(n_estimators=20, random_state=0).fit_transform(X, y)[0]
    second = PSMI(n_estimators=20, random_state=99).fit_transform(X, y)[0]
    assert_allclose(second, first, rtol=1e-12, atol=1e-14)


def test_one_class_gives_exactly_zero():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(50, 4))
    mean, std, full = PSMI(n_estimators=20, random_state=0).fit_transform(
        X, np.zeros(50, dtype=int)
    )
    assert np.all(full == 0.0) and np.all(mean == 0.0) and np.all(std == 0.0)


def test_merged_moments_equal_numpy_two_pass():
    rng = np.random.default_rng(6)
    T = rng.normal(loc=1e4, size=(1000, 7))
    codes = rng.integers(3, size=1000)
    parts = [
        class_moments(T[a:b], codes[a:b], 3) for a, b in [(0, 5), (5, 610), (610, 1000)]
    ]
    merged = merge_class_moments(merge_class_moments(parts[0], parts[1]), parts[2])
    for c in range(3):
        assert merged.counts[c] == np.sum(codes == c)
        assert_allclose(merged.means[c], T[codes == c].mean(axis=0), rtol=1e-14)
        assert_allclose(
            merged.m2[c] / merged.counts[c], T[codes == c].var(axis=0), rtol=1e-10
        )


def test_far_points_are_finite():
    X, y = _mixture(7)
    est = PSMI(n_estimators=30, random_state=0).fit(X, y)
    mean, std, full = est.transform(X * 1e6, y)
    assert np.all(np.isfinite(full))


def test_constant_features_give_exactly_zero():
    X = np.full((40, 5), 0.1)
    y = np.repeat([0, 1], 20)
    est = PSMI(n_estimators=20, random_state=0)
    mean, _, full = est.fit_transform(X, y)
    assert_array_equal(full, 0.0)
    mean_new, _, _ = est.transform(X + 3.0, y)
    assert_array_equal(mean_new, 0.0)


@pytest.mark.parametrize("scale", [1e-155, 1e-170, 1e-300, 5e-324])
def test_data_too_small_for_float64_is_refused_not_taken_as_constant(scale):
    X, y = _mixture(8, n=300, d=5)
    with pytest.raises(ValueError, match="X varies too little for float64"):
        PSMI(n_estimators=20, random_state=0).fit(X * scale, y)


@pytest.mark.parametrize("value", [3.7, 0.0, -0.0])
def test_identical_rows_give_exactly_zero_with_several_classes(value):
    X = np.full((30, 4), value)
    y = np.r_[[0] * 10, [1] * 15, [2] * 5]
    mean, std, full = PSMI(n_estimators=20, random_state=0).fit_transform(X, y)
    assert_array_equal(full, 0.0)
    assert_array_equal(mean, 0.0)
    assert_array_equal(std, 0.0)


@pytest.mark.parametrize("scale", [1e100, 1e154, 1e160, 1e300])
@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_transform_of_rows_far_beyond_the_fit_is_a_clear_error(scale, kind):
    import dask.array as da

    X, y = _mixture(9, n=300, d=5)
    est = PSMI(n_estimators=20, random_state=0).fit(X, y)
    far = X[:3] * scale
    far = da.from_array(far) if kind == "dask" else far
    with pytest.raises(ValueError, match=r"PSMI of 3 samples overflows float64"):
        est.transform(far, y[:3])


def test_moments_of_chunks_of_changing_size_match_each_alone():
    # Chunks share one growing buffer per thread: a large chunk, then a
    # short one, then a large one again must each give the moments they
    # give alone in a fresh process, to the bit.
    rng = np.random.default_rng(8)
    sizes = [700, 130, 700, 1, 900]
    chunks = [rng.normal(size=(n, 9)) for n in sizes]
    codes = [rng.integers(4, size=n) for n in sizes]
    directions = rng.normal(size=(5, 9))
    offset = chunks[0][0].copy()
    seen = [
        class_moments(project(X, offset, directions, temporary=True), c, 4)
        for X, c in zip(chunks, codes)
    ]
    for X, c, got in zip(chunks, codes, seen):
        T = (X - offset) @ directions.T
        for k in range(4):
            rows = T[c == k]
            assert got.counts[k] == rows.shape[0]
            if rows.shape[0]:
                assert_allclose(got.means[k], rows.mean(axis=0), rtol=1e-12)
                assert_allclose(
                    got.m2[k],
                    ((rows - rows.mean(axis=0)) ** 2).sum(axis=0),
                    rtol=1e-9,
                    atol=1e-12,
                )
        again = class_moments(project(X, offset, directions, temporary=True), c, 4)
        assert_array_equal(again.means, got.means)
        assert_array_equal(again.m2, got.m2)


_FAULTS_SCRIPT = """
import resource, sys
import numpy as np
from psmi_dask._blocks import _range_moments, _drawn_directions
rng = np.random.default_rng(0)
X = rng.normal(size=(2600, 256))
y = rng.integers(10, size=2600)
chunks = [X[a:a + 1024] for a in range(0, 2600, 1024)]  # 1024, 1024, 552 rows
codes = [y[a:a + 1024] for a in range(0, 2600, 1024)]
seed = np.random.SeedSequence(0)
directions = _drawn_directions(seed, 0, 300, 256, "orthogonal", 300)
_range_moments(chunks, codes, X[0], directions, 10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    _range_moments(chunks, codes, X[0], directions, 10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(
    not __import__("sys").platform.startswith("linux"), reason="glibc malloc"
)
def test_chunk_moments_reuse_memory_under_the_nannys_malloc_setting():
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, so every
    # freed temporary goes back to the kernel and the next one page-faults.
    # A run's moments must not allocate per chunk: one chunk's projections
    # here are 2.4 MB (600 pages), and its temporaries once cost 1,000+
    # faults per chunk.
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    faults_per_run = float(out.stdout.strip())
    assert faults_per_run < 300, faults_per_run


@pytest.mark.parametrize("near_the_limit", [False, True])
def test_overflowing_projections_give_one_clear_error_and_no_numpy_warnings(
    near_the_limit,
):
    import warnings

    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 5)) * 1e300
    if near_the_limit:  # X minus a sample overflows before the projection
        X = np.sign(X) * 1e308
    y = rng.integers(2, size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="overflow float64; rescale X"):
            PSMI(n_estimators=20, random_state=0).fit(X, y)


def _at_byte(values: np.ndarray, byte: int) -> np.ndarray:
    """A copy of ``values`` starting ``byte`` bytes past a 64-byte boundary."""
    raw = np.empty(values.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + byte
    out = raw[start : start + values.nbytes].view(np.float64).reshape(values.shape)
    out[...] = values
    return out


@pytest.mark.parametrize("byte", [1, 2, 4, 10])
def test_misaligned_directions_project_to_the_same_bits(byte):
    # As a Dask worker may receive them: numpy hands OpenBLAS a misaligned
    # matrix in a way that rounds some products differently (seen with 16
    # features and 100 directions).
    rng = np.random.default_rng(5)
    chunk, directions = rng.normal(size=(512, 16)), rng.normal(size=(100, 16))
    offset = rng.normal(size=16)
    moved = _at_byte(directions, byte)
    assert not moved.flags.aligned
    assert_array_equal(
        project(chunk, offset, moved), project(chunk, offset, directions)
    )


@pytest.mark.parametrize("byte", [2, 12])
def test_misaligned_projections_give_the_same_moments_and_scores(byte):
    rng = np.random.default_rng(6)
    codes = rng.integers(4, size=512)
    projections = rng.normal(size=(512, 100)) + codes[:, None]
    moments = class_moments(projections, codes, 4)
    moved = class_moments(_at_byte(projections, byte), codes, 4)
    for got, expected in zip(
        (moved.counts, moved.means, moved.m2),
        (moments.counts, moments.means, moments.m2),
    ):
        assert_array_equal(got, expected)
    params = fit_gaussians(moments, 1e-9)
    expected = score(projections, codes, params, keep_columns=True)
    got = score(_at_byte(projections, byte), codes, params, keep_columns=True)
    assert_array_equal(got[1], expected[1])
    assert_array_equal(got[0].mean, expected[0].mean)


def test_a_later_block_that_overflows_is_the_same_clear_error():
    # Block 0's directions stay finite; some later direction, nearer the
    # huge sample's axis, overflows the variance.
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(100, 2)), rng.integers(2, size=100)
    X[0], X[5] = 0.0, [1.2e154, -1.2e154]
    kwargs = {"n_estimators": 40, "min_n_estimators": 1, "random_state": 2}
    for method in ("fit", "fit_transform"):
        with pytest.raises(ValueError, match="overflow float64; rescale X"):
            getattr(PSMI(**kwargs), method)(X, y)
