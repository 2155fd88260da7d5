"""Every validation error of PSMI's public boundary, with its message.

Messages name the argument, what was expected and what came (STYLE.md).
"""

from __future__ import annotations

import math
import re

import dask.array as da
import numpy as np
import pytest

from psmi_dask import PSMI, ConvergenceWarning, NotFittedError


def _data(seed=0, n_samples=40, n_features=4, n_classes=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(n_classes, size=n_samples)
    X = rng.normal(size=(n_samples, n_features)) + y[:, None]
    return X, y


def _as(kind, array, chunks=10):
    return da.from_array(array, chunks=chunks) if kind == "dask" else array


def _named(value):
    """A pattern for ``value`` as a message may show it: 7 or np.int64(7)."""
    shown = {repr(value), repr(np.asarray(value)[()])}
    return "(?:" + "|".join(re.escape(s) for s in sorted(shown)) + ")"


def _fitted(seed=0, **params):
    X, y = _data(seed)
    params = {"n_estimators": 10, "random_state": seed, **params}
    return PSMI(**params).fit(X, y)


# X


@pytest.mark.parametrize("kind", ["numpy", "dask"])
@pytest.mark.parametrize(
    ("reshape", "shown"),
    [
        (lambda X: X[:, 0], "1-D with shape (40,)"),
        (lambda X: X[:, :, None], "3-D with shape (40, 4, 1)"),
    ],
    ids=["1-D", "3-D"],
)
@pytest.mark.parametrize("method", ["fit", "transform"])
def test_x_not_2d_raises(method, reshape, shown, kind):
    X, y = _data()
    est = _fitted() if method == "transform" else PSMI(n_estimators=10)
    message = f"X must be 2-D, of shape (n_samples, n_features), got {shown}."

    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(est, method)(_as(kind, reshape(X)), y)


@pytest.mark.parametrize("y_kind", ["numpy", "dask", "list"])
@pytest.mark.parametrize("method", ["fit", "transform", "fit_transform"])
def test_x_and_y_of_different_lengths_raise(method, y_kind):
    X, y = _data()
    est = _fitted() if method == "transform" else PSMI(n_estimators=10)
    y_short = y[:37]
    y_short = y_short.tolist() if y_kind == "list" else _as(y_kind, y_short)

    with pytest.raises(
        ValueError,
        match=re.escape(
            "X and y must have the same number of samples, got X with 40 rows "
            "and y with 37 labels."
        ),
    ):
        getattr(est, method)(X, y_short)


def test_y_not_1d_raises():
    X, y = _data()

    with pytest.raises(ValueError, match=r"y must be 1-D.*\(40, 2\)"):
        PSMI(n_estimators=10).fit(X, np.c_[y, y])


@pytest.mark.parametrize("kind", ["numpy", "dask"])
@pytest.mark.parametrize("method", ["fit", "fit_transform", "transform"])
@pytest.mark.parametrize(
    ("cells", "message"),
    [
        (
            [(3, 1, np.nan)],
            (
                "X must be finite, but it holds 1 NaN or infinite value; the "
                "first is at row 3, column 1."
            ),
        ),
        (
            [(22, 0, np.inf), (7, 3, np.nan), (7, 2, -np.inf)],
            (
                "X must be finite, but it holds 3 NaN or infinite values; the "
                "first is at row 7, column 2."
            ),
        ),
    ],
    ids=["one NaN", "NaN and infinities"],
)
def test_non_finite_x_raises_with_count_and_first_location(
    cells, message, method, kind
):
    X, y = _data()
    for row, column, value in cells:
        X[row, column] = value
    est = _fitted() if method == "transform" else PSMI(n_estimators=10)

    with (
        np.errstate(all="ignore"),
        pytest.raises(ValueError, match=re.escape(message)),
    ):
        getattr(est, method)(_as(kind, X), y)


@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_feature_count_differing_from_fit_raises(kind):
    est = _fitted()
    X, y = _data(seed=1, n_features=5)

    with pytest.raises(
        ValueError,
        match=re.escape("X has 5 features, but PSMI was fitted with 4 features."),
    ):
        est.transform(_as(kind, X), y)


@pytest.mark.parametrize("kind", ["numpy", "dask"])
@pytest.mark.parametrize("method", ["fit", "transform"])
def test_complex_x_raises_type_error(method, kind):
    X, y = _data()
    est = _fitted() if method == "transform" else PSMI(n_estimators=10)

    with pytest.raises(TypeError, match="X must hold real numbers, got dtype complex"):
        getattr(est, method)(_as(kind, X + 1j), y)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda X: X.astype(str), r"X must hold real numbers, got dtype <U"),
        (
            lambda X: np.where(X > 0, "pos", "neg").astype(object),
            r"X must hold numbers.*could not convert string to float",
        ),
        (lambda X: np.where(X > 0, "pos", "neg").tolist(), r"X must hold"),
    ],
    ids=["numpy str", "object str", "list of str"],
)
def test_string_x_raises_type_error(make, pattern):
    X, y = _data()

    with pytest.raises(TypeError, match=pattern):
        PSMI(n_estimators=10).fit(make(X), y)


def test_empty_x_raises_value_error():
    with pytest.raises(ValueError, match=r"(?i)sample"):
        PSMI(n_estimators=10).fit(np.empty((0, 4)), np.empty(0, dtype=int))


# y


@pytest.mark.parametrize("kind", ["numpy", "dask"])
@pytest.mark.parametrize(
    ("y", "listed"),
    [
        (np.r_[np.zeros(39, dtype=int), 7], [7]),
        (np.r_[np.zeros(37, dtype=int), 1, 5, 9], [1, 5, 9]),
        (np.array(["a"] * 39 + ["lone"]), ["lone"]),
    ],
    ids=["one int", "three ints", "one str"],
)
@pytest.mark.parametrize("n_estimators", [10, "auto"])
def test_class_with_fewer_than_2_samples_raises_naming_it(
    n_estimators, y, listed, kind
):
    X, _ = _data()
    est = PSMI(n_estimators=n_estimators, min_n_estimators=10)
    named = ", ".join(rf"label {_named(label)} \(1 sample\)" for label in listed)

    with pytest.raises(ValueError, match=rf"at least 2 samples.*: {named}\."):
        est.fit(X, _as(kind, y))


@pytest.mark.parametrize("kind", ["numpy", "dask"])
@pytest.mark.parametrize(
    ("fit_labels", "transform_labels", "unseen"),
    [
        ((0, 1), (0, 2), [2]),
        ((0, 1), (3, 1, 4), [3, 4]),
        (("a", "b"), ("a", "c"), ["c"]),
        (("a", "b"), (0, 1), [0, 1]),
    ],
    ids=["one int", "two ints", "one str", "ints on str"],
)
def test_labels_unseen_at_fit_raise_naming_them(
    fit_labels, transform_labels, unseen, kind
):
    X, codes = _data()
    est = PSMI(n_estimators=10, random_state=0).fit(X, np.array(fit_labels)[codes])
    y = np.array(transform_labels)[np.arange(40) % len(transform_labels)]
    named = ", ".join(_named(label) for label in unseen)
    counted = f"{len(unseen)} label{'s' if len(unseen) > 1 else ''}"

    with pytest.raises(ValueError, match=rf"{counted} that fit never saw: {named}\."):
        est.transform(X, _as(kind, y))


@pytest.mark.parametrize(
    "y",
    [
        np.array([1, "a"] * 20, dtype=object),
        np.array([1.5, "b"] * 20, dtype=object),
    ],
    ids=["int and str", "float and str"],
)
@pytest.mark.parametrize("method", ["fit", "transform"])
def test_mixed_unsortable_label_types_raise_type_error(method, y):
    X, _ = _data()
    est = _fitted() if method == "transform" else PSMI(n_estimators=10)

    with pytest.raises(
        TypeError, match="y mixes labels of types that cannot be compared"
    ):
        getattr(est, method)(X, y)


def test_mixed_label_types_in_a_list_raise_type_error():
    # numpy turns [1, "a"] into the strings "1" and "a"; the label 1 would
    # silently become "1" in classes_.
    X, _ = _data()

    with pytest.raises(TypeError, match="y mixes labels"):
        PSMI(n_estimators=10).fit(X, [1, "a"] * 20)


@pytest.mark.parametrize(
    "labels",
    [
        np.where(np.arange(40) % 2, np.nan, 1.0),
        np.array([np.nan, 1.0] * 20, dtype=object),
        np.array([np.float32("nan"), "a"] * 20, dtype=object),
        [None, 1] * 20,
        [None, "a"] * 20,
        "pandas NA in objects",
        "pandas NA in a list",
        "pandas NA in a string Series",
        "pandas NaT in a datetime Series",
        np.array(["NaT", "2026-01-01"] * 20, dtype="datetime64[D]"),
    ],
)
def test_missing_labels_raise(labels):
    X, _ = _data()
    if isinstance(labels, str):
        pd = pytest.importorskip("pandas")
        values = [pd.NA, "a"] * 20
        labels = {
            "pandas NA in objects": np.array(values, dtype=object),
            "pandas NA in a list": values,
            "pandas NA in a string Series": pd.Series(values, dtype="string"),
            "pandas NaT in a datetime Series": pd.Series(
                [pd.NaT, pd.Timestamp("2026-01-01")] * 20
            ),
        }[labels]

    with pytest.raises(
        ValueError,
        match=r"y must not contain missing labels \(NaN, None, NA or NaT\), got 20 "
        r"\(the first at index [01]\)",
    ):
        PSMI(n_estimators=10).fit(X, labels)


# Not fitted


@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_transform_before_fit_raises_not_fitted_error(kind):
    X, y = _data()

    with pytest.raises(NotFittedError, match=r"not fitted yet; call fit\(X, y\)"):
        PSMI(n_estimators=10).transform(_as(kind, X), y)


def test_not_fitted_error_is_a_value_error_and_an_attribute_error():
    assert issubclass(NotFittedError, ValueError)
    assert issubclass(NotFittedError, AttributeError)


def test_a_failed_refit_leaves_the_estimator_not_fitted():
    est = _fitted()
    X, y = _data()

    with pytest.raises(ValueError, match="X must be 2-D"):
        est.fit(X[:, 0], y)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        est.transform(X, y)


# Parameters: each case gives the parameter, a bad value, and the texts its
# message must hold (the allowed range and the value given).

_INTEGER_OR_AUTO = "an integer >= 1 or 'auto'"

PARAMETER_CASES = [
    ("n_estimators", 0, _INTEGER_OR_AUTO, "got 0"),
    ("n_estimators", -3, _INTEGER_OR_AUTO, "got -3"),
    ("n_estimators", 2.5, _INTEGER_OR_AUTO, "got 2.5"),
    ("n_estimators", "many", _INTEGER_OR_AUTO, "got 'many'"),
    ("n_estimators", True, _INTEGER_OR_AUTO, "got True"),
    ("n_estimators", None, _INTEGER_OR_AUTO, "got None"),
    ("min_n_estimators", 0, "an integer >= 1", "got 0"),
    ("min_n_estimators", 1.5, "an integer >= 1", "got 1.5"),
    ("min_n_estimators", "auto", "an integer >= 1", "got 'auto'"),
    ("lowest_psmi_quantile", 0.0, "(0, 1]", "got 0.0"),
    ("lowest_psmi_quantile", 1.5, "(0, 1]", "got 1.5"),
    ("lowest_psmi_quantile", -0.1, "(0, 1]", "got -0.1"),
    ("lowest_psmi_quantile", math.nan, "(0, 1]", "got nan"),
    ("lowest_psmi_quantile", "0.05", "(0, 1]", "got '0.05'"),
    ("max_variation_of_the_lowest", -0.01, "[0, inf)", "got -0.01"),
    ("max_variation_of_the_lowest", math.inf, "[0, inf)", "got inf"),
    ("max_variation_of_the_lowest", math.nan, "[0, inf)", "got nan"),
    ("milestone", 0.0, "(0, 1)", "got 0.0"),
    ("milestone", 1.0, "(0, 1)", "got 1.0"),
    ("milestone", 1.5, "(0, 1)", "got 1.5"),
    ("max_n_estimators", 0, "an integer >= 1", "got 0"),
    ("max_n_estimators", 2.5, "an integer >= 1", "got 2.5"),
    ("max_n_estimators", 100, ">= min_n_estimators (500) in auto mode", "got 100"),
    ("directions", "random", "one of ('orthogonal', 'iid')", "got 'random'"),
    (
        "directions",
        np.eye(4)[:3] * 2.0,
        "unit rows (norm 1 within 1e-6)",
        "row 0 has norm 2",
    ),
    (
        "directions",
        np.r_[np.eye(4)[:2], [[0.6, 0.8, 0.1, 0.0]]],
        "unit rows (norm 1 within 1e-6)",
        "row 2 has norm 1.00499",
    ),
    ("directions", np.eye(3)[np.arange(10) % 3], "has 3 columns", "X has 4 features"),
    ("directions", np.ones(4) / 2, "(n_directions, n_features)", "shape (4,)"),
    ("directions", np.full((2, 4), np.nan), "must be finite", "NaN"),
    ("directions", np.eye(4)[:2], "holds 2 rows", "n_estimators is 10"),
    ("random_state", -1, "non-negative integer", "got -1"),
    ("random_state", "seed", "None, a non-negative int", "got str"),
    ("random_state", 1.5, "None, a non-negative int", "got float"),
    ("var_floor", -1e-9, "[0, 1)", "got -1e-09"),
    ("var_floor", 1.0, "[0, 1)", "got 1.0"),
    ("var_floor", math.nan, "[0, 1)", "got nan"),
    ("chunk_size", 0, _INTEGER_OR_AUTO, "got 0"),
    ("chunk_size", 2.5, _INTEGER_OR_AUTO, "got 2.5"),
    ("chunk_size", "big", _INTEGER_OR_AUTO, "got 'big'"),
    ("max_blocks_in_flight", 0, _INTEGER_OR_AUTO, "got 0"),
    ("max_blocks_in_flight", -1, _INTEGER_OR_AUTO, "got -1"),
    ("max_blocks_in_flight", "many", _INTEGER_OR_AUTO, "got 'many'"),
    ("progress", "yes", "True or False", "got 'yes'"),
    ("progress", 1, "True or False", "got 1"),
    ("progress", None, "True or False", "got None"),
]

# Fixed mode unless the case is about auto mode.
_AUTO_CASES = {"max_n_estimators=100"}

# A random_state of the wrong type is a TypeError; everything else a ValueError.
_TYPE_ERROR_CASES = {"random_state='seed'", "random_state=1.5"}


def _case_id(case):
    name, value = case[:2]
    shown = f"array{value.shape}" if isinstance(value, np.ndarray) else repr(value)
    return f"{name}={shown}"


@pytest.mark.parametrize(
    ("name", "value", "allowed", "given"),
    PARAMETER_CASES,
    ids=[_case_id(case) for case in PARAMETER_CASES],
)
def test_parameter_out_of_range_raises_naming_it(name, value, allowed, given):
    X, y = _data()
    params = {"n_estimators": 10, "random_state": 0}
    if _case_id((name, value)) in _AUTO_CASES:
        params["n_estimators"] = "auto"
    params[name] = value
    est = PSMI(**params)
    error = TypeError if _case_id((name, value)) in _TYPE_ERROR_CASES else ValueError

    with pytest.raises(error, match=rf"(?<!\w){re.escape(name)}\b") as caught:
        est.fit(X, y)

    message = str(caught.value)
    assert allowed in message
    assert given in message


def test_parameters_are_checked_at_fit_not_at_init():
    est = PSMI(n_estimators=0, milestone=7.0, progress="yes")

    assert est.get_params()["n_estimators"] == 0
    assert est.milestone == 7.0


def test_set_params_with_an_unknown_name_raises():
    with pytest.raises(ValueError, match="Invalid parameter 'n_directions' for PSMI"):
        PSMI().set_params(n_directions=10)


def test_ragged_sparse_and_masked_features_are_refused_by_name():
    _, y = _data()
    with pytest.raises(ValueError, match="X must be a 2-D array .* got list"):
        PSMI(n_estimators=5).fit([[1.0, 2.0], [3.0]], [0, 1])
    scipy_sparse = pytest.importorskip("scipy.sparse")
    X, _ = _data()
    with pytest.raises(TypeError, match=r"X is a sparse matrix .*X\.toarray\(\)"):
        PSMI(n_estimators=5).fit(scipy_sparse.csr_matrix(X), y)
    with pytest.raises(TypeError, match=r"X is a masked array"):
        PSMI(n_estimators=5).fit(np.ma.masked_array(X, mask=X > 1), y)


def test_directions_beyond_the_machines_memory_are_refused_at_once():
    # psmi 0.2.0 raises MemoryError here; drawing block after block would
    # run for days before running out. (In auto mode a huge cap is allowed:
    # it costs nothing when the rule holds early.)
    import time

    X = np.random.default_rng(0).normal(size=(100, 4))
    y = np.random.default_rng(0).integers(3, size=100)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^n_estimators=10+ needs .* GiB .* memory"):
        PSMI(n_estimators=10**12, random_state=0).fit(X, y)
    assert time.monotonic() - start < 5


def test_a_psmi_full_beyond_memory_is_refused_with_the_lazy_way_out():
    X = np.random.default_rng(0).normal(size=(10**6, 2))
    y = np.random.default_rng(0).integers(3, size=10**6)
    with pytest.raises(ValueError, match="psmi_full .* dask array"):
        PSMI(n_estimators=10**7, random_state=0).fit_transform(X, y)


def test_a_column_of_labels_is_used_with_a_warning():
    from psmi_dask import DataConversionWarning

    X = np.random.default_rng(1).normal(size=(120, 3))
    y = np.random.default_rng(1).integers(3, size=120)
    expected = PSMI(n_estimators=20, random_state=0).fit_transform(X, y)
    with pytest.warns(DataConversionWarning, match=r"got \(120, 1\)") as record:
        got = PSMI(n_estimators=20, random_state=0).fit_transform(X, y[:, None])
    assert record[0].filename == __file__
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_a_dask_column_of_labels_is_used_with_a_warning():
    from psmi_dask import DataConversionWarning

    X = np.random.default_rng(2).normal(size=(300, 5))
    y = np.random.default_rng(2).integers(3, size=300)
    expected = PSMI(n_estimators=50, random_state=0).fit_transform(X, y)
    column = da.from_array(y[:, None], chunks=100)
    with pytest.warns(DataConversionWarning, match=r"got \(300, 1\)"):
        got = PSMI(n_estimators=50, random_state=0).fit_transform(X, column)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"y must be 1-D.*\(300, 2\)"):
        PSMI(n_estimators=50).fit(X, da.from_array(np.c_[y, y], chunks=100))


def test_transform_refuses_a_psmi_full_beyond_memory(monkeypatch):
    import psmi_dask._estimator as estimator_module

    X = np.random.default_rng(3).normal(size=(200, 3))
    y = np.random.default_rng(3).integers(2, size=200)
    est = PSMI(n_estimators=50, random_state=0).fit(X, y)
    # 200 x 50 x 8 bytes = 80,000: a machine of 50,000 bytes cannot hold it.
    monkeypatch.setattr(estimator_module, "_memory_total", lambda: 50_000)
    with pytest.raises(ValueError, match="psmi_full of 200 samples x 50 .* dask"):
        est.transform(X, y)
    mean, std, full = est.transform(da.from_array(X, chunks=100), y)
    assert full.shape == (200, 50)  # lazy: nothing allocated yet


def test_auto_mode_stops_with_an_error_where_free_memory_ends(monkeypatch):
    # 50 features: 2 x 8 x 50 = 800 bytes a direction, 80,000 a block of 100.
    import psmi_dask._estimator as estimator_module

    X = np.random.default_rng(4).normal(size=(300, 50))
    y = np.arange(300) % 3
    never = dict(min_n_estimators=100, max_variation_of_the_lowest=0.0)
    # Half the free memory holds the directions: 7 blocks of 14.
    monkeypatch.setattr(estimator_module, "_memory_available", lambda: 14 * 80_000)
    with pytest.raises(ValueError, match=r"^auto mode reached 700 directions .*"):
        PSMI(**never, max_n_estimators=2000, random_state=0).fit(X, y)
    with pytest.warns(ConvergenceWarning):  # the cap within memory: no error
        est = PSMI(**never, max_n_estimators=700, random_state=0).fit(X, y)
    assert est.n_estimators_ == 700
    monkeypatch.setattr(estimator_module, "_memory_available", lambda: 159_999)
    with pytest.raises(ValueError, match=r"one block of min_n_estimators=100 .*"):
        PSMI(**never, random_state=0).fit(X, y)


def test_a_rule_met_within_free_memory_gives_the_unbounded_result(monkeypatch):
    import psmi_dask._estimator as estimator_module

    rng = np.random.default_rng(5)
    y = rng.integers(3, size=400)
    X = rng.normal(size=(400, 6)) + 0.5 * y[:, None]
    kwargs = dict(min_n_estimators=50, max_n_estimators=5000, random_state=0)
    expected = PSMI(**kwargs).fit_transform(X, y)
    blocks = len(PSMI(**kwargs).fit(X, y).history_)
    assert blocks < 100
    # Room for the blocks the rule needs and one more, not for the cap's 100.
    per_block = 50 * 2 * 8 * (6 + 400)
    monkeypatch.setattr(
        estimator_module, "_memory_available", lambda: 2 * (blocks + 1) * per_block
    )
    got = PSMI(**kwargs).fit_transform(X, y)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_auto_mode_keeps_within_an_address_space_limit():
    # `ulimit -v` (or a batch job's limit) is below the machine's free
    # memory: the fit once ended in numpy's MemoryError.
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("resource")
    script = textwrap.dedent(
        """
        import resource, psutil
        import numpy as np
        from psmi_dask import PSMI
        X = np.random.default_rng(0).normal(size=(200, 10_000))
        y = np.arange(200) % 2
        vms = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vms + 2**31, resource.RLIM_INFINITY))
        try:
            PSMI(
                max_n_estimators=10**7, max_variation_of_the_lowest=0.0, random_state=0
            ).fit(X, y)
        except ValueError as error:
            print(error)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert re.match(r"auto mode reached \d+ directions without meeting", run.stdout)
