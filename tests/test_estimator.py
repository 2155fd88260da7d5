"""PSMI against psmi 0.2.0 on shared directions, and its invariances."""

from __future__ import annotations

import re
import warnings

import dask
import dask.array as da
import numpy as np
import psmi
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from psmi_dask import PSMI, ConvergenceWarning

# pmi near 0 is the difference of two O(1) logs: absolute agreement there.
RTOL, ATOL = 1e-9, 1e-12


def _mixture(seed: int, n: int = 800, d: int = 16, n_classes: int = 4, gap=0.3):
    rng = np.random.default_rng(seed)
    y = rng.integers(n_classes, size=n)
    X = rng.normal(size=(n, d)) + gap * y[:, None] * rng.normal(size=d)
    return X, y


def _iid_blocks(seed: int, n_blocks: int, block: int, d: int) -> np.ndarray:
    """The directions psmi 0.2.0 draws, block after block, from ``seed``."""
    np.random.seed(seed)
    blocks = []
    for _ in range(n_blocks):
        g = np.random.normal(0, 1, block * d).reshape(block, d)
        blocks.append(g / np.linalg.norm(g, axis=1)[:, None])
    return np.concatenate(blocks)


@pytest.mark.parametrize("n_estimators, block", [(300, 100), (250, 100), (64, 500)])
def test_fixed_mode_equals_psmi_on_shared_directions(n_estimators, block):
    X, y = _mixture(0)
    np.random.seed(10)
    reference = psmi.PSMI(n_estimators=n_estimators)
    expected = reference.fit_transform(X, y)
    est = PSMI(n_estimators, min_n_estimators=block, directions=reference.thetas)
    for ours, theirs in zip(est.fit_transform(X, y), expected):
        assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)
    for c in est.classes_:
        assert_allclose(est.mean_per_label[c], reference.mean_per_label[c], rtol=RTOL)
        assert_allclose(est.std_per_label[c], reference.std_per_label[c], rtol=RTOL)
        assert est.frequency_per_label[c] == reference.frequency_per_label[c]
    X_new, y_new = _mixture(1, n=50)
    for ours, theirs in zip(
        est.transform(X_new, y_new), reference.transform(X_new, y_new)
    ):
        assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)


def test_auto_mode_equals_psmi_and_stops_at_the_same_block():
    X, y = _mixture(2, n=400, d=8, gap=0.6)
    block = 50
    directions = _iid_blocks(7, 200, block, X.shape[1])
    np.random.seed(7)
    reference = psmi.PSMI(min_n_estimators=block)
    expected = reference.fit_transform(X, y)
    assert_array_equal(reference.thetas, directions[: reference.n_estimators])
    est = PSMI(min_n_estimators=block, directions=directions, max_n_estimators=10_000)
    outputs = est.fit_transform(X, y)
    assert est.n_estimators == reference.n_estimators
    assert est.converged_ is True
    for ours, theirs in zip(outputs, expected):
        assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)


def test_numpy_in_numpy_out_dask_in_dask_out():
    X, y = _mixture(3, n=300)
    est = PSMI(n_estimators=120, min_n_estimators=50, random_state=0)
    numpy_out = est.fit_transform(X, y)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in numpy_out)
    dask_out = est.fit_transform(da.from_array(X, chunks=(70, 5)), da.from_array(y))
    assert all(isinstance(a, da.Array) for a in dask_out)
    assert dask_out[2].shape == (300, 120)
    for a, b in zip(dask_out, numpy_out):
        assert_array_equal(a.compute(), b)


@pytest.mark.parametrize("chunks", [(1, 16), (37, 16), (100, 3), (299, 16), (-1, -1)])
def test_outputs_are_identical_whatever_the_chunking(chunks):
    X, y = _mixture(4, n=600)
    kwargs = dict(min_n_estimators=40, random_state=5, chunk_size=128)
    expected = PSMI(**kwargs).fit_transform(X, y)
    est = PSMI(**kwargs)
    got = est.fit_transform(da.from_array(X, chunks=chunks), y)
    for a, b in zip(got, expected):
        assert_array_equal(a.compute(), b)


def test_outputs_do_not_depend_on_which_thread_ran_which_block():
    X, y = _mixture(5, n=500)
    kwargs = dict(n_estimators=400, min_n_estimators=50, random_state=9)
    expected = PSMI(**kwargs, max_blocks_in_flight=1).fit_transform(X, y)
    for in_flight in (2, 3, 8):
        got = PSMI(**kwargs, max_blocks_in_flight=in_flight).fit_transform(X, y)
        for a, b in zip(got, expected):
            assert_array_equal(a, b)
    with dask.config.set(num_workers=1):
        got = PSMI(**kwargs).fit_transform(X, y)
    for a, b in zip(got, expected):
        assert_array_equal(a, b)


def test_fit_transform_equals_fit_then_transform_auto():
    X, y = _mixture(6, n=300, d=8, gap=5.0)
    est = PSMI(min_n_estimators=50, random_state=1, max_n_estimators=2000)
    got = est.fit_transform(X, y)
    again = PSMI(min_n_estimators=50, random_state=1, max_n_estimators=2000)
    for a, b in zip(got, again.fit(X, y).transform(X, y)):
        assert_array_equal(a, b)


def test_fitted_attributes_and_history():
    X, y = _mixture(7, n=300, d=8, gap=5.0)
    est = PSMI(min_n_estimators=50, random_state=2, max_n_estimators=3000).fit(X, y)
    n = est.n_estimators_
    assert est.directions_.shape == (n, X.shape[1])
    assert_allclose(np.linalg.norm(est.directions_, axis=1), 1.0, rtol=1e-12)
    assert est.projection_means_.shape == est.projection_stds_.shape == (4, n)
    assert est.n_blocks_ == len(est.history_) == n // 50
    assert [r["block"] for r in est.history_] == list(range(est.n_blocks_))
    assert [r["n_estimators"] for r in est.history_] == [
        50 * (i + 1) for i in range(est.n_blocks_)
    ]
    assert est.history_[0]["variation"] is None
    assert est.history_[-1]["variation"] <= 0.05
    assert_array_equal(est.thetas, est.directions_)
    assert est.fitted and est.n_features_in_ == X.shape[1]
    assert_allclose(est.class_prior_, np.bincount(y) / y.size)
    assert est.get_params()["n_estimators"] == "auto"


def test_seed_kinds_and_reproducibility():
    X, y = _mixture(8, n=200)
    kw = dict(n_estimators=60, min_n_estimators=25)
    a = PSMI(**kw, random_state=3).fit(X, y).directions_
    b = PSMI(**kw, random_state=np.random.SeedSequence(3)).fit(X, y).directions_
    assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    first = PSMI(**kw, random_state=rng).fit(X, y).directions_
    second = PSMI(**kw, random_state=rng).fit(X, y).directions_
    assert not np.array_equal(first, second)
    iid = PSMI(**kw, random_state=3, directions="iid").fit(X, y).directions_
    assert not np.array_equal(a, iid)


def test_directions_of_a_block_do_not_depend_on_the_count():
    X, y = _mixture(9, n=200)
    short = PSMI(n_estimators=130, min_n_estimators=50, random_state=4).fit(X, y)
    long = PSMI(n_estimators=150, min_n_estimators=50, random_state=4).fit(X, y)
    assert_array_equal(short.directions_, long.directions_[:130])


def test_orthogonal_frames_are_orthonormal():
    X, y = _mixture(10, n=200, d=16)
    est = PSMI(n_estimators=40, min_n_estimators=40, random_state=0).fit(X, y)
    frame = est.directions_[:16]
    assert_allclose(frame @ frame.T, np.eye(16), atol=1e-12)
    assert_allclose(
        est.directions_[16:32] @ est.directions_[16:32].T, np.eye(16), atol=1e-12
    )


def test_orthogonal_directions_have_lower_error_than_iid():
    X, y = _mixture(11, n=400, d=32, gap=0.4)
    truth = PSMI(n_estimators=20_000, min_n_estimators=2000, random_state=0)
    exact = truth.fit_transform(X, y)[0]
    errors = {}
    for kind in ("iid", "orthogonal"):
        runs = [
            PSMI(
                n_estimators=96, min_n_estimators=96, directions=kind, random_state=s
            ).fit_transform(X, y)[0]
            for s in range(1, 6)
        ]
        errors[kind] = np.sqrt(np.mean([(r - exact) ** 2 for r in runs]))
    assert errors["orthogonal"] < 0.8 * errors["iid"]


def test_refit_and_set_params():
    X, y = _mixture(12, n=200)
    est = PSMI(n_estimators=50, min_n_estimators=25, random_state=0)
    est.fit(X, y)
    est.set_params(n_estimators=75)
    est.fit(X[:, :5], y)
    assert est.n_estimators_ == 75 and est.n_features_in_ == 5


def test_lazy_psmi_full_equals_the_fitted_columns_whatever_the_blas_threads():
    # OpenBLAS's last bits depend on its thread count, which differs between
    # the caller's thread, Dask's pool threads and a worker: every
    # projection runs with one BLAS thread, so these all agree.
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, size=2000)
    X = rng.normal(size=(2000, 16)) + 0.4 * y[:, None]
    est = PSMI(n_estimators=100, min_n_estimators=100, random_state=0, chunk_size=500)
    full = est.fit_transform(X, y)[2]
    lazy = est.fit_transform(da.from_array(X), y)[2]
    assert_array_equal(lazy.compute(), full)
    assert_array_equal(lazy.compute(scheduler="sync"), full)
    with dask.config.set(scheduler="sync"):
        assert_array_equal(est.transform(X, y)[2], full)


def test_auto_fit_keeps_no_per_direction_matrix():
    import tracemalloc
    import warnings

    from psmi_dask import ConvergenceWarning

    rng = np.random.default_rng(13)
    X = rng.normal(size=(5000, 16))
    y = rng.integers(4, size=5000)
    peaks, used = [], []
    for cap in (600, 2400):
        est = PSMI(min_n_estimators=100, max_n_estimators=cap, random_state=0)
        tracemalloc.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        used.append(est.n_estimators_)
    # Holding psmi_full would add 5000 x 8 bytes per extra direction.
    assert used[1] - used[0] >= 600
    assert peaks[1] < peaks[0] + 8 * 2**20, (peaks, used)


def test_transform_takes_a_single_sample():
    X, y = _mixture(14, n=200)
    est = PSMI(n_estimators=50, random_state=0).fit(X, y)
    mean, std, full = est.transform(X[:1], y[:1])
    assert_array_equal(mean, est.transform(X, y)[0][:1])
    assert full.shape == (1, 50)


@pytest.mark.parametrize(
    "labels",
    [
        [b"x", b"y"] * 10,
        [(1, 2), (3, 4)] * 10,
        [frozenset({1}), frozenset({2})] * 10,
    ],
    ids=["bytes", "tuples", "frozensets"],
)
def test_hashable_labels_of_any_kind(labels):
    X, _ = _mixture(15, n=20)
    est = PSMI(n_estimators=10, random_state=0).fit(X, labels)
    assert len(est.classes_) == 2
    assert set(est.classes_.tolist()) == set(labels)


def test_a_huge_cap_costs_nothing_when_the_rule_holds_early():
    X, y = _mixture(16, n=300, d=8, gap=5.0)
    est = PSMI(min_n_estimators=50, max_n_estimators=10**12, random_state=2).fit(X, y)
    assert est.converged_ and est.n_estimators_ < 5000


@pytest.mark.parametrize(
    "kwargs",
    [dict(milestone=0.01), dict(max_n_estimators=501), dict(directions=np.eye(3))],
)
def test_auto_mode_refuses_a_rule_that_can_never_be_tested(kwargs):
    X, y = _mixture(17, n=60, d=3)
    with pytest.raises(ValueError, match="floor\\(k \\* milestone\\) >= 1"):
        PSMI(**kwargs).fit(X, y)


@pytest.mark.parametrize(
    "kwargs, fixes",
    [
        (dict(max_n_estimators=60, milestone=0.3), {"max_n_estimators", "milestone"}),
        (dict(max_n_estimators=30, milestone=0.5), {"max_n_estimators"}),
    ],
)
def test_the_fixes_offered_for_an_untestable_rule_work(kwargs, fixes):
    # milestone < 1, so with one block no milestone helps; none is offered.
    X, y = _mixture(17, n=60, d=3)
    kwargs = dict(kwargs, min_n_estimators=20, random_state=0)
    with pytest.raises(ValueError) as error:
        PSMI(**kwargs).fit(X, y)
    offered = {
        name: float(value)
        for name, value in re.findall(r"(\w+) to (\d+(?:\.\d+)?)", str(error.value))
    }
    assert set(offered) == fixes
    for name, value in offered.items():
        changed = dict(kwargs, **{name: int(value) if value >= 1 else value})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            PSMI(**changed).fit(X, y)


def test_data_too_small_for_float64_is_an_error_not_zero():
    X, y = _mixture(18, n=100)
    with pytest.raises(ValueError, match="multiply X by a large constant"):
        PSMI(n_estimators=20, random_state=0).fit(X * 1e-158, y)


def test_psmi_keyword_names_features_and_labels():
    X, y = _mixture(15, n=200)
    expected = PSMI(n_estimators=50, random_state=0).fit_transform(X, y)
    est = PSMI(n_estimators=50, random_state=0)
    got = est.fit_transform(features=X, labels=y)
    for a, b in zip(got, expected):
        assert_array_equal(a, b)
    est = PSMI(n_estimators=50, random_state=0).fit(features=X, labels=y)
    assert_array_equal(est.transform(features=X, labels=y)[0], expected[0])
    assert_array_equal(est.transform(X, labels=y)[0], expected[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"X": 0, "features": 0}, r"fit\(\) got both X and features"),
        ({"y": 0, "labels": 0, "X": 0}, r"fit\(\) got both y and labels"),
        ({"labels": 0}, r"fit\(\) missing X \(or features\)"),
        ({"features": 0}, r"fit\(\) missing y \(or labels\)"),
    ],
)
def test_psmi_keyword_names_given_twice_or_not_at_all(kwargs, message):
    with pytest.raises(TypeError, match=message):
        PSMI().fit(**kwargs)


def test_fitted_model_does_not_follow_later_changes_to_given_directions():
    X, y = _mixture(16, n=300)
    rng = np.random.default_rng(16)
    D = rng.normal(size=(50, X.shape[1]))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    est = PSMI(n_estimators=50, directions=D).fit(X, y)
    expected = est.transform(X, y)[0]
    D[:] = np.roll(D, 1, axis=1)
    assert not np.shares_memory(est.directions_, D)
    assert_array_equal(est.transform(X, y)[0], expected)


def _blas_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return [
        info["num_threads"]
        for info in threadpoolctl.threadpool_info()
        if info["user_api"] == "blas"
    ]


def test_the_users_blas_threads_come_back_after_fit_and_transform():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    X, y = _mixture(17, n=300)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        if not before or max(before) < 2:
            pytest.skip("BLAS runs one thread here anyway")
        est = PSMI(n_estimators=60, random_state=0).fit(X, y)
        assert _blas_threads() == before
        est.transform(X, y)
        assert _blas_threads() == before
        X_dask = da.from_array(X, chunks=100)
        full = PSMI(n_estimators=60, random_state=0).fit_transform(X_dask, y)[2]
        full.compute()
        assert _blas_threads() == before


def test_fitted_arrays_and_psmi_aliases_refuse_writes():
    X, y = _mixture(18, n=200)
    est = PSMI(n_estimators=20, random_state=0).fit(X, y)
    for values in (
        est.directions_,
        est.thetas,
        est.projection_means_,
        est.projection_stds_,
        est.class_prior_,
        next(iter(est.mean_per_label.values())),
    ):
        with pytest.raises(ValueError, match="read-only"):
            values[0] = 1.0


@pytest.mark.parametrize(
    "rows", [slice(5, 6), slice(0, 7), slice(3, 40), slice(999, 2000)]
)
def test_a_samples_outputs_barely_depend_on_the_samples_beside_it(rows):
    # BLAS may round a product's rows by where they fall in it (OpenBLAS's
    # SkylakeX kernels do, at the edges of a product): a sample transformed
    # among others agrees with it alone within DESIGN.md's 1e-12.
    rng = np.random.default_rng(19)
    y = rng.integers(4, size=3000)
    X = rng.normal(size=(3000, 64)) + 0.3 * y[:, None]
    est = PSMI(n_estimators=600, random_state=7).fit(X, y)
    everything = est.transform(X, y)
    alone = est.transform(X[rows], y[rows])
    scale = np.abs(everything[2]).max()
    for part, whole in zip(alone, everything):
        assert_allclose(part, whole[rows], rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("chunk_size", [777, 3000])
def test_another_chunk_size_moves_outputs_by_less_than_1e_12_of_their_scale(
    chunk_size,
):
    # Weak labels: many PSMI values near 0, differences of larger terms,
    # which move more than 1e-12 relative to themselves (README).
    rng = np.random.default_rng(23)
    y = rng.integers(2, size=6000)
    X = rng.normal(size=(6000, 32))
    X[:, 0] += 0.01 * y
    kwargs = dict(n_estimators=300, random_state=7)
    expected = PSMI(**kwargs, chunk_size=1024).fit_transform(X, y)
    got = PSMI(**kwargs, chunk_size=chunk_size).fit_transform(X, y)
    for part, whole in zip(got, expected):
        assert_allclose(part, whole, rtol=0, atol=1e-12 * np.abs(whole).max())


def test_whole_chunks_of_samples_transform_to_the_same_bits_alone():
    # The same rows in a chunk of the same size: the same products, so the
    # same bits, whatever follows them.
    rng = np.random.default_rng(19)
    y = rng.integers(4, size=3000)
    X = rng.normal(size=(3000, 64)) + 0.3 * y[:, None]
    est = PSMI(n_estimators=600, random_state=7, chunk_size=1000).fit(X, y)
    everything = est.transform(X, y)
    for part, whole in zip(est.transform(X[:2000], y[:2000]), everything):
        assert_array_equal(part, whole[:2000])


def test_directions_are_held_once_in_memory_and_in_a_pickle():
    import pickle

    X, y = _mixture(31, n=400, d=64)
    est = PSMI(n_estimators=1200, random_state=0).fit(X, y)
    size = est.directions_.nbytes
    assert all(
        np.shares_memory(f.directions, est.directions_) for f in est._block_fits_
    )
    blob = pickle.dumps(est)
    # Twice the directions before; the Gaussians take an eighth of them here.
    assert len(blob) < 1.5 * size, (len(blob), size)
    again = pickle.loads(blob)
    assert all(
        np.shares_memory(f.directions, again.directions_) for f in again._block_fits_
    )
    assert not again.directions_.flags.writeable
    assert not again.projection_means_.flags.writeable
    assert_array_equal(again.directions_, est.directions_)
    for got, expected in zip(again.transform(X, y), est.transform(X, y)):
        assert_array_equal(got, expected)


@pytest.mark.parametrize("method", ["fit", "fit_transform"])
def test_the_convergence_warning_points_at_the_callers_line(method):
    from psmi_dask import ConvergenceWarning

    X, y = _mixture(40, n=300)
    est = PSMI(min_n_estimators=20, max_n_estimators=40, random_state=0)
    with pytest.warns(ConvergenceWarning) as caught:
        getattr(est, method)(X, y)
    assert {w.filename for w in caught} == {__file__}
