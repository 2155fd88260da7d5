"""The cases of CASES.md, one test (or parametrized group) per row.

Each test is named after its row and asserts the row's "right behaviour".
Where a row compares with psmi 0.2.0, psmi draws its directions from numpy's
global random state (seeded here) and psmi_dask is given the same directions.
"""

from __future__ import annotations

import math
import re
import threading

import dask.array as da
import numpy as np
import pandas as pd
import psmi
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone

from psmi_dask import PSMI, ConvergenceWarning

# Agreement with psmi 0.2.0 on the same directions. The absolute part is
# needed because a pmi near 0 is the difference of two O(1) logarithms.
REFERENCE_TOLERANCE = {"rtol": 1e-9, "atol": 1e-12}

# Longest a fit may take before it counts as hanging.
HANG_SECONDS = 60.0


def _mixture(seed, n_samples, n_features, n_classes, separation=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(n_classes, size=n_samples)
    X = rng.normal(size=(n_samples, n_features)) + separation * y[:, None]
    return X, y


def _computed(outputs):
    return tuple(
        np.asarray(o.compute()) if isinstance(o, da.Array) else o for o in outputs
    )


def _within(seconds, function):
    """Run ``function`` in a daemon thread; fail if it runs past ``seconds``.

    A daemon thread, unlike a thread pool's worker, does not keep the test
    process alive if the function never returns.
    """
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 (re-raised below)
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not return within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _poisoned(array, chunks):
    """A dask array that fails the test if any of its chunks is computed."""

    def explode(block):
        if block.size:
            raise AssertionError("a chunk of the input was computed")
        return block

    return da.from_array(array, chunks=chunks).map_blocks(explode, dtype=array.dtype)


def _named(value):
    """A pattern for ``value`` as a message may show it: 7 or np.int64(7)."""
    shown = {repr(value), repr(np.asarray(value)[()])}
    return "(?:" + "|".join(re.escape(s) for s in sorted(shown)) + ")"


def _normal_densities(ref, X, y):
    """Where psmi 0.2.0's own-class density is a normal float."""
    projections = X @ ref.thetas.T
    means = np.stack([ref.mean_per_label[label] for label in y])
    stds = np.stack([ref.std_per_label[label] for label in y])
    with np.errstate(under="ignore"):
        z = (projections - means) / stds
        density = np.exp(-0.5 * z**2) / (stds * math.sqrt(2 * math.pi))
    return density >= np.finfo(np.float64).tiny


def _assert_same_outputs(ours, theirs):
    for mine, reference in zip(_computed(ours), _computed(theirs)):
        assert_array_equal(mine, reference)


# psmi 0.2.0's own faults


def test_r1_auto_mode_on_15_samples_returns():
    y = np.repeat([0, 1, 2], 5)
    X = np.random.default_rng(1).normal(size=(15, 3)) + y[:, None]
    block = 50
    est = PSMI(min_n_estimators=block, max_n_estimators=5000, random_state=1)

    _, _, full = _within(HANG_SECONDS, lambda: est.fit_transform(X, y))

    assert est.converged_ is True
    assert est.n_estimators_ < 5000
    assert full.shape == (15, est.n_estimators_)
    # The rule's value, recomputed from the pmi columns with a lowest set of
    # exactly one sample (int(0.05 * 15) is 0): it must match every tested
    # value of the history, which an empty lowest set would make NaN.
    tested = [r for r in est.history_ if r["variation"] is not None]
    assert tested, "the stopping rule was never tested"
    for record in tested:
        k = record["block"] + 1
        current = full[:, : k * block].mean(axis=1)
        milestone = full[:, : math.floor(k * 0.5) * block].mean(axis=1)
        lowest = np.argmin(current)
        expected = abs(milestone[lowest] - current[lowest]) / abs(current[lowest])
        assert math.isfinite(record["variation"])
        assert_allclose(record["variation"], expected, rtol=1e-9)


@pytest.mark.parametrize("y_kind", ["numpy", "dask"])
def test_r2_transform_with_a_label_unseen_at_fit_names_it(y_kind):
    X, y = _mixture(2, 60, 3, 2)
    est = PSMI(n_estimators=20, random_state=2).fit(X, y)
    y_new = y.copy()
    y_new[[4, 9]] = 2
    if y_kind == "dask":
        y_new = da.from_array(y_new, chunks=20)

    with pytest.raises(ValueError, match=rf"1 label that fit never saw: {_named(2)}"):
        est.transform(X, y_new)


def test_r3_transform_far_from_every_class_is_finite():
    X, y = _mixture(3, 300, 4, 3, separation=0.0)
    np.random.seed(3)
    ref = psmi.PSMI(n_estimators=100).fit(X, y)
    with np.errstate(all="ignore"):
        ref_mean, _, ref_full = ref.transform(1000 * X, y)
    est = PSMI(n_estimators=100, min_n_estimators=50, directions=ref.thetas)

    psmi_mean, psmi_std, psmi_full = est.fit(X, y).transform(1000 * X, y)

    for values in (psmi_mean, psmi_std, psmi_full):
        assert np.all(np.isfinite(values))
    # pmi_theta(x, y) <= -log pi_y holds for every direction.
    bound = -np.log(est.class_prior_[np.searchsorted(est.classes_, y)])
    assert np.all(psmi_full <= bound[:, None] + 1e-12)
    # Where psmi 0.2.0's densities are normal floats (neither 0 nor
    # subnormal, which loses digits), the values agree.
    accurate = _normal_densities(ref, 1000 * X, y)
    assert 0 < accurate.sum() < accurate.size
    assert_allclose(psmi_full[accurate], ref_full[accurate], **REFERENCE_TOLERANCE)
    rows = accurate.all(axis=1)
    assert_allclose(psmi_mean[rows], ref_mean[rows], **REFERENCE_TOLERANCE)


@pytest.mark.parametrize("kind", ["every_feature_constant", "every_class_one_point"])
def test_r4_constant_features_give_finite_values(kind):
    rng = np.random.default_rng(4)
    y = rng.integers(3, size=60)
    if kind == "every_feature_constant":
        X = np.full((60, 4), 3.0)
    else:
        X = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 5.0, 2.0], [4, 4, 4, 4]])[y]
    est = PSMI(n_estimators=40, random_state=4)

    psmi_mean, psmi_std, psmi_full = est.fit_transform(X, y)

    for values in (psmi_mean, psmi_std, psmi_full, est.projection_stds_):
        assert np.all(np.isfinite(values))
    assert np.all(est.projection_stds_ > 0)
    if kind == "every_feature_constant":
        # Every class has the same Gaussian, so every pmi is log 1 = 0.
        assert np.max(np.abs(psmi_full)) <= 1e-12
    else:
        # Each class sits on its own point: the sample's own class wins.
        assert np.all(psmi_mean > 0)


@pytest.mark.parametrize("X_kind", ["numpy", "dask"])
def test_r5_one_nan_in_x_raises_counting_and_locating_it(X_kind):
    X, y = _mixture(5, 50, 4, 2)
    X[17, 2] = np.nan
    if X_kind == "dask":
        X = da.from_array(X, chunks=(10, 4))
    message = "1 NaN or infinite value; the first is at row 17, column 2"

    with pytest.raises(ValueError, match=re.escape(message)):
        PSMI(n_estimators=20, random_state=5).fit_transform(X, y)


def test_r6_string_object_bool_and_integer_labels_agree():
    X, codes = _mixture(6, 80, 3, 2)
    as_strings = [("a", "b")[c] for c in codes]
    labels = {
        "list of str": (as_strings, ["a", "b"]),
        "object": (np.array(as_strings, dtype=object), ["a", "b"]),
        "bool": (codes.astype(bool), [False, True]),
        "int": (codes, [0, 1]),
    }
    np.random.seed(6)
    ref = psmi.PSMI(n_estimators=60).fit(X, codes)
    ref_outputs = ref.transform(X, codes)

    results = {}
    for name, (y, classes) in labels.items():
        est = PSMI(n_estimators=60, min_n_estimators=30, directions=ref.thetas)
        results[name] = est.fit_transform(X, y)
        assert est.classes_.tolist() == classes, name

    for name, outputs in results.items():
        _assert_same_outputs(outputs, results["int"])
    for mine, theirs in zip(results["int"], ref_outputs):
        assert_allclose(mine, theirs, **REFERENCE_TOLERANCE)


def test_r7_fit_twice_refits():
    X1, y1 = _mixture(7, 60, 3, 2)
    X2, y2 = _mixture(8, 90, 5, 3)
    est = PSMI(n_estimators=30, random_state=7)
    est.fit(X1, y1)

    outputs = est.fit(X2, y2).transform(X2, y2)

    fresh = PSMI(n_estimators=30, random_state=7)
    _assert_same_outputs(outputs, fresh.fit(X2, y2).transform(X2, y2))
    assert est.n_features_in_ == 5
    assert est.directions_.shape == (30, 5)
    assert est.classes_.tolist() == [0, 1, 2]
    assert_array_equal(est.projection_means_, fresh.projection_means_)
    _assert_same_outputs(est.fit_transform(X1, y1), fresh.fit_transform(X1, y1))


def test_r8_auto_mode_stops_at_max_n_estimators_with_a_warning():
    X, y = _mixture(8, 1000, 16, 10, separation=0.02)
    est = PSMI(min_n_estimators=50, max_n_estimators=300, random_state=8)
    pattern = (
        r"variation of the lowest PSMI was (?P<value>[0-9.e+-]+), above "
        r"max_variation_of_the_lowest=0\.05\. To go on, increase "
        r"max_n_estimators"
    )

    with pytest.warns(ConvergenceWarning, match=pattern) as caught:
        _, _, psmi_full = _within(HANG_SECONDS, lambda: est.fit_transform(X, y))

    assert est.n_estimators_ <= est.max_n_estimators
    assert est.n_estimators_ == 300
    assert psmi_full.shape == (1000, 300)
    assert est.converged_ is False
    last = est.history_[-1]["variation"]
    assert last > 0.05
    [warning] = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    shown = re.search(pattern, str(warning.message)).group("value")
    assert_allclose(float(shown), last, rtol=1e-3)
    assert warning.filename == __file__


# From public reports


@pytest.mark.parametrize("n_estimators", [20, "auto"])
@pytest.mark.parametrize("X_kind", ["numpy", "dask"])
def test_c01_one_class_gives_exactly_zero(X_kind, n_estimators):
    X = np.random.default_rng(11).normal(size=(30, 4))
    y = np.zeros(30, dtype=int)
    if X_kind == "dask":
        X = da.from_array(X, chunks=(10, 4))
    est = PSMI(n_estimators=n_estimators, min_n_estimators=20, random_state=11)

    outputs = _computed(_within(HANG_SECONDS, lambda: est.fit_transform(X, y)))

    psmi_mean, _, psmi_full = outputs
    assert psmi_mean.shape == (30,)
    assert psmi_full.shape == (30, est.n_estimators_)
    if n_estimators == "auto":
        # PSMI exactly 0 must not make the rule's relative change 0/0.
        assert est.converged_ is True
        assert est.n_estimators_ == 40
    else:
        assert est.n_estimators_ == 20
    for values in outputs:
        assert not np.isnan(values).any()
        assert np.max(np.abs(values)) <= 1e-12


@pytest.mark.parametrize("n_estimators", [20, "auto"])
@pytest.mark.parametrize("y_kind", ["numpy", "dask"])
@pytest.mark.parametrize("X_kind", ["numpy", "dask"])
@pytest.mark.parametrize("n_samples", [4, 1000])
def test_c05_a_class_with_a_single_sample_raises_before_any_work(
    n_samples, X_kind, y_kind, n_estimators
):
    rng = np.random.default_rng(15)
    X = rng.normal(size=(n_samples, 3))
    if n_samples == 4:
        y, lone = np.array([0, 0, 0, 1]), 1
    else:
        y, lone = rng.integers(3, size=n_samples), 7
        y[123] = lone
    if X_kind == "dask":
        X = _poisoned(X, chunks=(max(1, n_samples // 4), 3))
    if y_kind == "dask":
        y = da.from_array(y, chunks=max(1, n_samples // 3))
    est = PSMI(n_estimators=n_estimators, min_n_estimators=20, random_state=15)
    pattern = rf"at least 2 samples.*{_named(lone)} \(1 sample\)"

    with pytest.raises(ValueError, match=pattern):
        _within(HANG_SECONDS, lambda: est.fit(X, y))


def test_c06_label_types_give_identical_results():
    X, codes = _mixture(16, 20, 3, 2)
    strings = np.array(["a", "b"])[codes]
    labels = {
        "list": (strings.tolist(), ["a", "b"]),
        "numpy str": (strings, ["a", "b"]),
        "object": (strings.astype(object), ["a", "b"]),
        "categorical": (pd.Categorical(strings), ["a", "b"]),
        "codes": (codes, [0, 1]),
    }

    results = {}
    for name, (y, classes) in labels.items():
        est = PSMI(n_estimators=30, random_state=16)
        results[name] = est.fit_transform(X, y)
        assert est.classes_.tolist() == classes, name
        assert type(est.classes_[0]) is type(np.asarray(y)[0]), name

    for name, outputs in results.items():
        _assert_same_outputs(outputs, results["codes"])


def _c08_data():
    X, y = _mixture(18, 2000, 8, 3, separation=0.5)
    return 10.0 + X, y


@pytest.mark.parametrize("X_kind", ["numpy", "dask"])
@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, np.float64, np.int64, np.bool_]
)
def test_c08_input_dtypes_match_float64_on_the_same_values(dtype, X_kind):
    X, y = _c08_data()
    if dtype is np.bool_:
        X_typed = X > 10.5
    elif dtype is np.int64:
        X_typed = np.rint(3 * X).astype(np.int64)
    else:
        X_typed = X.astype(dtype)
    X_float64 = X_typed.astype(np.float64)
    X_input = X_typed
    if X_kind == "dask":
        X_input = da.from_array(X_typed, chunks=(500, 8))

    def run(features):
        return PSMI(
            n_estimators=100, min_n_estimators=50, random_state=18
        ).fit_transform(features, y)

    outputs = run(X_input)
    expected = run(X_float64)

    for output in outputs:
        assert output.dtype == np.float64
    for mine, reference in zip(_computed(outputs), expected):
        assert mine.dtype == np.float64
        if dtype in (np.float16, np.float32):
            assert_allclose(mine, reference, rtol=1e-6)
        else:
            assert_array_equal(mine, reference)


@pytest.mark.parametrize("chunk_size", ["auto", 100, 64])
def test_c11_a_class_in_one_chunk_gives_numpys_statistics(chunk_size):
    rng = np.random.default_rng(21)
    y = rng.integers(1, 3, size=1000)
    y[:6] = 0
    X = rng.normal(size=(1000, 4)) + y[:, None] + 5.0
    est = PSMI(n_estimators=60, random_state=21, chunk_size=chunk_size)

    est.fit(da.from_array(X, chunks=(100, 4)), y)

    projections = X @ est.directions_.T
    means = np.stack([projections[y == c].mean(axis=0) for c in range(3)])
    stds = np.stack([projections[y == c].std(axis=0) for c in range(3)])
    assert_allclose(est.projection_means_, means, rtol=1e-12)
    assert_allclose(est.projection_stds_, stds, rtol=1e-12)
    assert_allclose(est.class_prior_, np.bincount(y) / 1000, rtol=1e-12)
    on_numpy = PSMI(n_estimators=60, random_state=21, chunk_size=chunk_size)
    on_numpy.fit(X, y)
    assert_allclose(est.projection_means_, on_numpy.projection_means_, rtol=1e-12)
    assert_allclose(est.projection_stds_, on_numpy.projection_stds_, rtol=1e-12)


def test_c11_boolean_mask_with_unknown_chunks_points_to_compute_chunk_sizes():
    rng = np.random.default_rng(22)
    X = da.from_array(rng.normal(size=(1000, 4)), chunks=(100, 4))
    y = da.from_array(rng.integers(3, size=1000), chunks=100)
    mask = X[:, 0] > -0.5

    with pytest.raises(ValueError, match=r"compute_chunk_sizes\(\)"):
        PSMI(n_estimators=20, random_state=22).fit(X[mask], y[mask])


@pytest.mark.parametrize("chunk_size", ["auto", 30])
@pytest.mark.parametrize("y_kind", ["dask (51, 49)", "dask one chunk", "numpy", "list"])
def test_c12_labels_chunked_unlike_x_give_identical_results(y_kind, chunk_size):
    X, y = _mixture(23, 100, 3, 3)
    labels = {
        "dask (51, 49)": lambda: da.from_array(y, chunks=((51, 49),)),
        "dask one chunk": lambda: da.from_array(y, chunks=100),
        "numpy": lambda: y,
        "list": lambda: y.tolist(),
    }[y_kind]()

    def run(features, targets):
        est = PSMI(
            n_estimators=100,
            min_n_estimators=50,
            random_state=23,
            chunk_size=chunk_size,
        )
        return est.fit_transform(features, targets), est

    outputs, est = run(da.from_array(X, chunks=((50, 50), (3,))), labels)
    expected, reference = run(X, y)

    _assert_same_outputs(outputs, expected)
    assert_array_equal(est.projection_means_, reference.projection_means_)
    assert_array_equal(est.projection_stds_, reference.projection_stds_)


@pytest.mark.parametrize("y_kind", ["numpy", "dask"])
def test_c12_labels_of_another_length_raise_before_any_compute(y_kind):
    rng = np.random.default_rng(24)
    X = _poisoned(rng.normal(size=(100, 3)), chunks=(50, 3))
    y = rng.integers(3, size=99)
    if y_kind == "dask":
        y = _poisoned(y, chunks=((50, 49),))

    with pytest.raises(ValueError, match="100 rows and y with 99 labels"):
        PSMI(n_estimators=20, random_state=24).fit(X, y)


def test_c14_clone_keeps_auto_also_after_an_auto_fit():
    X, y = _mixture(25, 120, 3, 3)
    est = PSMI(min_n_estimators=50, random_state=25)
    assert clone(est).get_params()["n_estimators"] == "auto"

    est.fit(X, y)

    assert est.n_estimators == est.n_estimators_
    assert est.get_params()["n_estimators"] == "auto"
    copy = clone(est)
    assert copy.n_estimators == "auto"
    assert copy.get_params() == est.get_params()
    assert not hasattr(copy, "n_estimators_")
    _assert_same_outputs(copy.fit_transform(X, y), est.fit_transform(X, y))


def test_c14_set_params_is_honoured_by_the_next_fit():
    X, y = _mixture(26, 120, 3, 3)
    est = PSMI(min_n_estimators=50, random_state=26).fit(X, y)

    outputs = est.set_params(n_estimators=200).fit(X, y).transform(X, y)

    assert est.n_estimators_ == 200
    assert est.directions_.shape == (200, 3)
    assert outputs[2].shape == (120, 200)
    assert est.converged_ is None
    fresh = PSMI(n_estimators=200, min_n_estimators=50, random_state=26)
    _assert_same_outputs(outputs, fresh.fit_transform(X, y))


@pytest.mark.parametrize("directions", ["orthogonal", "iid"])
@pytest.mark.parametrize("n_estimators", [120, "auto"])
def test_c14_same_seed_gives_identical_outputs(n_estimators, directions):
    X, y = _mixture(27, 150, 4, 3)

    def fitted():
        return PSMI(
            n_estimators=n_estimators,
            min_n_estimators=50,
            directions=directions,
            random_state=27,
        ).fit(X, y)

    first, second = fitted(), fitted()

    assert_array_equal(first.directions_, second.directions_)
    _assert_same_outputs(first.transform(X, y), second.transform(X, y))
    again = first.fit(X, y)
    assert_array_equal(again.directions_, second.directions_)
    _assert_same_outputs(again.transform(X, y), second.transform(X, y))


@pytest.mark.parametrize("X_kind", ["numpy", "dask"])
@pytest.mark.parametrize("n_estimators", [120, "auto"])
def test_c14_fit_transform_equals_fit_then_transform(n_estimators, X_kind):
    X, y = _mixture(28, 150, 4, 3)
    if X_kind == "dask":
        X = da.from_array(X, chunks=(40, 4))
    est = PSMI(n_estimators=n_estimators, min_n_estimators=50, random_state=28)

    together = est.fit_transform(X, y)
    apart = est.fit(X, y).transform(X, y)

    _assert_same_outputs(together, apart)
