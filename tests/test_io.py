"""Tests of psmi_dask.io: features and labels from files, results to files."""

from __future__ import annotations

import collections
import json
import pickle

import cloudpickle
import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from psmi_dask.io import (
    HDF5Source,
    NpySource,
    open_features,
    open_labels,
    record_path,
    result_paths,
    save_results,
    write_record,
)

h5py = pytest.importorskip("h5py")
zarr = pytest.importorskip("zarr")

N_SAMPLES, N_FEATURES, STORED_ROWS = 10_000, 64, 1_000


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((N_SAMPLES, N_FEATURES)).astype(np.float32)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.arange(N_SAMPLES) % 3


def write_zarr(path, values, rows=STORED_ROWS):
    stored = zarr.create_array(
        str(path),
        shape=values.shape,
        chunks=(rows, values.shape[1]),
        dtype=values.dtype,
    )
    stored[...] = values
    return path


def write_hdf5(path, values, chunks=(STORED_ROWS, N_FEATURES), **extra):
    with h5py.File(path, "w") as handle:
        handle.create_dataset("X", data=values, chunks=chunks)
        for name, data in extra.items():
            handle.create_dataset(name, data=data)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, features, labels):
    """The same features in every format: name -> (path, dataset)."""
    base = tmp_path_factory.mktemp("features")
    np.save(base / "X.npy", features)
    group = zarr.open_group(str(base / "group.zarr"), mode="w")
    group.create_array("X", data=features, chunks=(STORED_ROWS, N_FEATURES))
    group.create_array("y", data=labels)
    return {
        "zarr": (write_zarr(base / "X.zarr", features), None),
        "zarr-group": (base / "group.zarr", "X"),
        "hdf5-chunked": (write_hdf5(base / "X.h5", features, y=labels), "X"),
        "hdf5-contiguous": (write_hdf5(base / "Xc.h5", features, chunks=None), None),
        "npy": (base / "X.npy", None),
    }


@pytest.mark.parametrize(
    "kind", ["zarr", "zarr-group", "hdf5-chunked", "hdf5-contiguous", "npy"]
)
@pytest.mark.parametrize("chunk_rows", [None, 1_500, 700])
def test_open_features_matches_numpy(files, features, kind, chunk_rows):
    path, dataset = files[kind]
    X = open_features(path, dataset=dataset, chunk_rows=chunk_rows)

    assert isinstance(X, da.Array)
    assert X.shape == features.shape
    assert X.dtype == features.dtype
    assert X.chunks[1] == (N_FEATURES,)
    assert_array_equal(X.compute(), features)


@pytest.mark.parametrize("kind", ["zarr", "hdf5-chunked"])
@pytest.mark.parametrize("chunk_rows", [1_500, 700, 2_500])
def test_chunks_are_whole_stored_chunks(files, kind, chunk_rows):
    # C21: stored chunks of 1,000 rows read with 1,500 or 700 requested.
    path, dataset = files[kind]
    X = open_features(path, dataset=dataset, chunk_rows=chunk_rows)

    boundaries = np.cumsum((0, *X.chunks[0]))
    assert np.all(boundaries[:-1] % STORED_ROWS == 0)
    assert max(X.chunks[0]) == max(STORED_ROWS, chunk_rows // STORED_ROWS * STORED_ROWS)


@pytest.mark.parametrize("kind", ["hdf5-contiguous", "npy"])
def test_unchunked_files_take_the_requested_rows(files, kind):
    path, dataset = files[kind]
    X = open_features(path, dataset=dataset, chunk_rows=700)

    assert X.chunks[0][:-1] == (700,) * (N_SAMPLES // 700)


def test_default_chunks_follow_dask_chunk_size(files):
    import dask

    path, _ = files["zarr"]
    with dask.config.set({"array.chunk-size": "1MiB"}):
        X = open_features(path)

    # 1 MiB / (64 features * 4 bytes) = 4,096 rows, down to whole stored chunks.
    assert X.chunks[0][0] == 4_000


def count_chunk_reads(monkeypatch):
    """Count reads of each stored chunk key through zarr's LocalStore."""
    reads: collections.Counter[str] = collections.Counter()
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        if not key.endswith("zarr.json"):
            reads[key] += 1
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    return reads


@pytest.mark.parametrize("chunk_rows", [1_500, 700])
def test_misaligned_request_reads_each_stored_chunk_once(
    files, features, monkeypatch, chunk_rows
):
    # C21: a pass over X reads every stored chunk once, and gives numpy's sum.
    path, _ = files["zarr"]
    X = open_features(path, chunk_rows=chunk_rows)
    reads = count_chunk_reads(monkeypatch)

    total = X.sum(axis=0, dtype=np.float64).compute(scheduler="sync")

    assert len(reads) == N_SAMPLES // STORED_ROWS
    assert set(reads.values()) == {1}
    np.testing.assert_allclose(
        total, features.sum(axis=0, dtype=np.float64), rtol=1e-12
    )


def test_plain_from_zarr_rereads_chunks_when_misaligned(files, monkeypatch):
    # What the alignment avoids: dask chunks of 1,500 rows split stored chunks.
    path, _ = files["zarr"]
    stored = zarr.open_array(str(path), mode="r")
    X = da.from_zarr(stored, chunks=(1_500, N_FEATURES))
    reads = count_chunk_reads(monkeypatch)

    X.sum().compute(scheduler="sync")

    assert max(reads.values()) == 2


@pytest.mark.parametrize("pickler", [pickle, cloudpickle])
def test_hdf5_array_pickles(files, features, pickler):
    path, dataset = files["hdf5-chunked"]
    X = open_features(path, dataset=dataset, chunk_rows=2_000)

    restored = pickler.loads(pickler.dumps(X))

    assert_array_equal(restored.compute(), features)
    source = pickler.loads(pickler.dumps(HDF5Source(path, "X")))
    assert_array_equal(source[10:20], features[10:20])


def test_npy_source_pickles_without_data(files, features):
    path, _ = files["npy"]
    payload = cloudpickle.dumps(NpySource(path))

    assert len(payload) < 1_000
    assert_array_equal(cloudpickle.loads(payload)[5:9], features[5:9])


def test_hdf5_and_npy_on_worker_processes(files, features):
    # C16: file-backed arrays travel to worker processes as paths.
    distributed = pytest.importorskip("distributed")

    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        for kind in ("hdf5-chunked", "npy"):
            path, dataset = files[kind]
            X = open_features(path, dataset=dataset, chunk_rows=2_500)
            total = client.compute(X.sum(axis=0, dtype=np.float64)).result()
            np.testing.assert_allclose(
                total, features.sum(axis=0, dtype=np.float64), rtol=1e-12
            )


def test_member_after_colon(files, features):
    path, _ = files["hdf5-chunked"]

    X = open_features(f"{path}:X", chunk_rows=5_000)

    assert_array_equal(X.compute(), features)


def test_path_with_a_colon_that_exists(tmp_path, features):
    path = tmp_path / "run:1.npy"
    np.save(path, features[:10])

    assert_array_equal(open_features(path).compute(), features[:10])


def test_integer_and_bool_features_keep_their_dtype(tmp_path):
    values = np.arange(20).reshape(10, 2)
    np.save(tmp_path / "i.npy", values)
    np.save(tmp_path / "b.npy", values % 2 == 0)

    assert open_features(tmp_path / "i.npy").dtype == values.dtype
    assert open_features(tmp_path / "b.npy").dtype == bool


@pytest.mark.parametrize(
    ("name", "dataset", "match"),
    [
        ("missing.npy", None, r"features file .*missing\.npy' does not exist"),
        ("X.parquet", None, r"format psmi_dask does not read; give a zarr"),
        ("fake.npy", None, r"named like a \.npy file but is not one"),
        ("fake.h5", None, r"named like an HDF5 file but is not one"),
        ("X.h5", None, r"holds datasets \['X', 'y'\]; choose the features"),
        ("X.h5", "Z", r"has no dataset 'Z'; its datasets are \['X', 'y'\]"),
        ("group.zarr", None, r"zarr group with arrays \['X', 'y'\]; choose"),
        ("group.zarr", "Z", r"has no array 'Z'; its arrays are \['X', 'y'\]"),
        ("X.zarr", "X", r"is a zarr array, not a group"),
        ("X.npy", "X", r"\.npy file, which holds one array"),
        ("one.npy", None, r"shape \(10,\), but a 2-D array .* was expected"),
        ("cube.npy", None, r"shape \(2, 2, 2\), but a 2-D array"),
        ("text.npy", None, r"dtype <U1, but a numeric"),
        ("fields.npy", None, r"structured array with fields \['a', 'b'\]"),
        ("empty.zarr", None, r"could not open .*empty\.zarr' as zarr"),
    ],
)
def test_open_features_errors(tmp_path, features, name, dataset, match):
    np.save(tmp_path / "X.npy", features[:10])
    (tmp_path / "X.parquet").write_bytes(b"PAR1")
    (tmp_path / "fake.npy").write_bytes(b"not numpy")
    (tmp_path / "fake.h5").write_bytes(b"not hdf5")
    write_hdf5(tmp_path / "X.h5", features[:10], chunks=None, y=np.zeros(10))
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("X", data=features[:10])
    group.create_array("y", data=np.zeros(10))
    write_zarr(tmp_path / "X.zarr", features[:10], rows=5)
    np.save(tmp_path / "one.npy", np.zeros(10))
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    np.save(tmp_path / "text.npy", np.array([["a", "b"]]))
    np.save(tmp_path / "fields.npy", np.zeros(10, dtype=[("a", "f8"), ("b", "f8")]))
    (tmp_path / "empty.zarr").mkdir()

    with pytest.raises(ValueError, match=match):
        open_features(tmp_path / name, dataset=dataset)


@pytest.mark.parametrize("chunk_rows", [0, -5, 2.5])
def test_open_features_rejects_bad_chunk_rows(files, chunk_rows):
    path, _ = files["npy"]

    with pytest.raises(ValueError, match=r"chunk_rows must be a positive integer"):
        open_features(path, chunk_rows=chunk_rows)


def test_labels_from_npy(tmp_path):
    np.save(tmp_path / "y.npy", np.array([2, 0, 1]))
    np.save(tmp_path / "s.npy", np.array(["cat", "dog", "cat"]))
    np.save(tmp_path / "col.npy", np.array([[1], [2], [3]]))

    assert_array_equal(open_labels(tmp_path / "y.npy"), [2, 0, 1])
    assert_array_equal(open_labels(tmp_path / "s.npy"), ["cat", "dog", "cat"])
    assert_array_equal(open_labels(tmp_path / "col.npy"), [1, 2, 3])


def test_labels_one_a_line(tmp_path):
    (tmp_path / "y.txt").write_text("3\n1\n3\n\n")
    (tmp_path / "s.txt").write_text("cat\ndog\n cat \n")

    y = open_labels(tmp_path / "y.txt")

    assert y.dtype == np.int64
    assert_array_equal(y, [3, 1, 3])
    assert_array_equal(open_labels(tmp_path / "s.txt"), ["cat", "dog", "cat"])


def test_labels_from_a_csv_column(tmp_path):
    (tmp_path / "meta.csv").write_text("id,label,note\n0,7,x\n1,8,y\n2,7,z\n")

    by_option = open_labels(tmp_path / "meta.csv", column="label")
    by_suffix = open_labels(f"{tmp_path / 'meta.csv'}:label")
    strings = open_labels(tmp_path / "meta.csv", column="note")

    assert_array_equal(by_option, [7, 8, 7])
    assert_array_equal(by_suffix, [7, 8, 7])
    assert_array_equal(strings, ["x", "y", "z"])


def test_labels_from_a_tsv_column(tmp_path):
    (tmp_path / "meta.tsv").write_text("id\tlabel\n0\ta\n1\tb\n")

    assert_array_equal(open_labels(tmp_path / "meta.tsv", column="label"), ["a", "b"])


def test_labels_beside_the_features(files, labels, tmp_path):
    zarr_path, _ = files["zarr-group"]
    h5_path, _ = files["hdf5-chunked"]
    with h5py.File(tmp_path / "s.h5", "w") as handle:
        handle.create_dataset("names", data=np.array(["a", "b", "a"], dtype=object))

    assert_array_equal(open_labels(zarr_path, dataset="y"), labels)
    assert_array_equal(open_labels(f"{zarr_path}:y"), labels)
    assert_array_equal(open_labels(h5_path, dataset="y"), labels)
    assert_array_equal(open_labels(f"{h5_path}:y"), labels)
    assert_array_equal(open_labels(tmp_path / "s.h5"), ["a", "b", "a"])


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("missing.csv", {}, r"labels file .*missing\.csv' does not exist"),
        ("y.json", {}, r"labels file .*y\.json' is in a format .* give \.npy, \.csv"),
        ("meta.csv", {}, r"has 2 columns; name the label column with column=NAME"),
        ("meta.csv", {"column": "class"}, r"has no column 'class'; its header has"),
        ("header.csv", {}, r"first line .*'label', looks like a header"),
        ("meta.csv", {"dataset": "y"}, r"is a text file; name a column with column="),
        ("grid.npy", {}, r"shape \(2, 2\), but one label per sample"),
        ("objects.npy", {}, r"not an object array"),
        ("empty.txt", {}, r"is empty"),
        ("blank.txt", {}, r"1 label is empty in .*blank\.txt' \(the first on line 2\)"),
        ("y.h5", {"column": "y"}, r"is an HDF5 file; name its labels with dataset="),
        ("y.h5", {"dataset": "z"}, r"has no dataset 'z'"),
    ],
)
def test_open_labels_errors(tmp_path, name, options, match):
    (tmp_path / "y.json").write_text("[1, 2]")
    (tmp_path / "meta.csv").write_text("id,label\n0,1\n1,2\n")
    (tmp_path / "blank.txt").write_text("1\n\n2\n1\n")
    (tmp_path / "header.csv").write_text("label\n1\n2\n1\n")
    np.save(tmp_path / "grid.npy", np.zeros((2, 2)))
    np.save(tmp_path / "objects.npy", np.array([{}, []], dtype=object))
    (tmp_path / "empty.txt").write_text("")
    with h5py.File(tmp_path / "y.h5", "w") as handle:
        handle.create_dataset("y", data=np.zeros(3))

    with pytest.raises(ValueError, match=match):
        open_labels(tmp_path / name, **options)


@pytest.mark.parametrize(
    "name, text, options",
    [
        ("y.csv", "id,label\n0,1\n1,\n2,2\n", {"column": "label"}),
        ("y.txt", "1\n2\n   \n1\n", {}),
    ],
)
def test_an_empty_label_is_an_error_naming_its_line(tmp_path, name, text, options):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=r"1 label is empty in .* on line 3\)"):
        open_labels(tmp_path / name, **options)


def test_a_byte_order_mark_is_not_part_of_the_first_label(tmp_path):
    (tmp_path / "y.txt").write_text("2\n1\n2\n", encoding="utf-8-sig")
    (tmp_path / "y.csv").write_text("label,other\n2,x\n1,y\n", encoding="utf-8-sig")

    assert_array_equal(open_labels(tmp_path / "y.txt"), [2, 1, 2])
    assert_array_equal(open_labels(tmp_path / "y.csv", column="label"), [2, 1])


def test_blank_lines_at_the_end_of_a_labels_file_are_no_labels(tmp_path):
    (tmp_path / "y.csv").write_text("id,label\n0,1\n1,2\n\n\n")
    (tmp_path / "y.txt").write_text("a\nb\n\n")

    assert_array_equal(open_labels(tmp_path / "y.csv", column="label"), [1, 2])
    assert_array_equal(open_labels(tmp_path / "y.txt"), ["a", "b"])


def test_member_given_twice_must_agree(tmp_path):
    (tmp_path / "meta.csv").write_text("a,b\n1,2\n")

    with pytest.raises(ValueError, match=r"names the member 'a', but column='b'"):
        open_labels(f"{tmp_path / 'meta.csv'}:a", column="b")


@pytest.fixture
def results():
    rng = np.random.default_rng(1)
    full = rng.standard_normal((50, 7))
    return full.mean(axis=1), full.std(axis=1), full


@pytest.mark.parametrize("lazy", [False, True])
def test_save_results_to_zarr(tmp_path, results, lazy):
    mean, std, full = results
    if lazy:
        full = da.from_array(full, chunks=(20, 7))

    written = save_results(tmp_path / "out.zarr", mean, std, full)

    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert set(written) == {"psmi_mean", "psmi_std", "psmi_full"}
    assert_array_equal(group["psmi_mean"][...], mean)
    assert_array_equal(group["psmi_std"][...], std)
    assert_array_equal(group["psmi_full"][...], results[2])
    if lazy:
        assert group["psmi_full"].chunks == (20, 7)


@pytest.mark.parametrize("lazy", [False, True])
def test_save_results_to_npy(tmp_path, results, lazy):
    mean, std, full = results
    if lazy:
        full = da.from_array(full, chunks=(20, 7))

    written = save_results(tmp_path / "out.npy", mean, std, full)

    assert written["psmi_mean"] == tmp_path / "out_psmi_mean.npy"
    assert_array_equal(np.load(tmp_path / "out_psmi_mean.npy"), mean)
    assert_array_equal(np.load(tmp_path / "out_psmi_std.npy"), std)
    assert_array_equal(np.load(tmp_path / "out_psmi_full.npy"), results[2])


@pytest.mark.parametrize("lazy", [False, True])
def test_save_results_to_csv(tmp_path, results, lazy):
    mean, std, full = results
    if lazy:
        full = da.from_array(full, chunks=(20, 7))
    labels = np.array(["a", "b"] * 25)

    save_results(tmp_path / "out.csv", mean, std, full, labels=labels)

    table = np.genfromtxt(tmp_path / "out.csv", delimiter=",", names=True, dtype=None)
    assert table.dtype.names == ("sample", "label", "psmi_mean", "psmi_std")
    assert_array_equal(table["psmi_mean"], mean)
    assert_array_equal(table["psmi_std"], std)
    stored_full = np.loadtxt(tmp_path / "out_psmi_full.csv", delimiter=",", skiprows=1)
    assert_array_equal(stored_full[:, 0], np.arange(50))
    assert_array_equal(stored_full[:, 1:], results[2])


def test_save_results_without_full(tmp_path, results):
    mean, std, _ = results

    written = save_results(tmp_path / "out.npy", mean, std)

    assert set(written) == {"psmi_mean", "psmi_std"}
    assert not (tmp_path / "out_psmi_full.npy").exists()


def test_save_results_refuses_to_overwrite(tmp_path, results):
    mean, std, _ = results
    save_results(tmp_path / "out.zarr", mean, std)

    with pytest.raises(ValueError, match=r"out\.zarr' already exists"):
        save_results(tmp_path / "out.zarr", mean, std)
    save_results(tmp_path / "out.zarr", 2 * mean, std, overwrite=True)
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert_array_equal(group["psmi_mean"][...], 2 * mean)


def test_overwrite_never_deletes_a_plain_directory(tmp_path, results):
    mean, std, _ = results
    (tmp_path / "out.zarr").mkdir()
    (tmp_path / "out.zarr" / "keep.txt").write_text("mine")

    with pytest.raises(ValueError, match=r"not a zarr store; psmi_dask will not"):
        save_results(tmp_path / "out.zarr", mean, std, overwrite=True)
    assert (tmp_path / "out.zarr" / "keep.txt").exists()


def test_result_paths_reject_unknown_extensions(tmp_path):
    with pytest.raises(ValueError, match=r"end it with \.zarr, \.npy or \.csv"):
        result_paths(tmp_path / "out.parquet")


def test_record_sits_beside_the_results(tmp_path):
    assert record_path(tmp_path / "out.zarr") == tmp_path / "out.zarr.json"
    assert record_path(tmp_path / "out.csv") == tmp_path / "out.csv.json"


def test_write_record_handles_numpy_values(tmp_path):
    record = {
        "n": np.int64(3),
        "values": np.arange(3.0),
        "seed": np.random.SeedSequence(5),
        "nan": float("nan"),
    }

    write_record(tmp_path / "r.json", record)

    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["n"] == 3
    assert loaded["values"] == [0.0, 1.0, 2.0]
    assert loaded["seed"]["entropy"] == 5


@pytest.fixture(scope="module")
def numpy_psmi(features, labels):
    from psmi_dask import PSMI

    estimator = PSMI(n_estimators=300, min_n_estimators=150, random_state=0)
    return estimator.fit_transform(features[:3_000], labels[:3_000])


def write_format(base, kind, values):
    """Write ``values`` as ``kind``; return the path with its member, if any."""
    if kind == "zarr":
        return write_zarr(base / "X.zarr", values)
    if kind == "zarr-group":
        group = zarr.open_group(str(base / "g.zarr"), mode="w")
        group.create_array("X", data=values, chunks=(STORED_ROWS, values.shape[1]))
        return f"{base / 'g.zarr'}:X"
    if kind == "hdf5-chunked":
        return write_hdf5(base / "X.h5", values)
    np.save(base / "X.npy", values)
    return base / "X.npy"


@pytest.mark.parametrize("kind", ["zarr", "zarr-group", "hdf5-chunked", "npy"])
def test_file_inputs_give_numpy_results(tmp_path, features, labels, numpy_psmi, kind):
    from psmi_dask import PSMI

    path = write_format(tmp_path, kind, features[:3_000])
    X = open_features(path, chunk_rows=1_500)

    estimator = PSMI(n_estimators=300, min_n_estimators=150, random_state=0)
    outputs = estimator.fit_transform(X, labels[:3_000])

    for got, want in zip(outputs, numpy_psmi, strict=True):
        assert isinstance(got, da.Array)
        np.testing.assert_allclose(got.compute(), want, rtol=1e-12, atol=1e-12)


def test_fit_reads_stored_chunks_alike_whatever_the_chunks(files, labels, monkeypatch):
    # C21 through the estimator: requested chunks of 1,500 or 700 rows read
    # every stored chunk exactly as often as the stored chunking itself does.
    from psmi_dask import PSMI

    path, _ = files["zarr"]
    counts = []
    for chunk_rows in (STORED_ROWS, 1_500, 700):
        reads = count_chunk_reads(monkeypatch)
        X = open_features(path, chunk_rows=chunk_rows)
        estimator = PSMI(n_estimators=300, min_n_estimators=150, random_state=0)
        psmi_mean, _, _ = estimator.fit_transform(X, labels)
        psmi_mean.compute()
        counts.append({key: n for key, n in reads.items() if "/c/" in f"/{key}"})
        monkeypatch.undo()

    assert len(counts[0]) == N_SAMPLES // STORED_ROWS
    assert counts[1] == counts[0]
    assert counts[2] == counts[0]
    assert max(counts[0].values()) <= 2 * estimator.n_blocks_ + 1


@pytest.mark.parametrize("member", [None, "X"])
def test_save_results_never_writes_over_the_features_it_reads(
    tmp_path, features, labels, member
):
    # With overwrite=True this once replaced the features a lazy psmi_full
    # was still reading, and wrote a psmi_full computed from the wreck.
    from psmi_dask import PSMI

    path = tmp_path / "X.zarr"
    if member is None:
        write_zarr(path, features)
    else:
        group = zarr.open_group(str(path), mode="w")
        group.create_array(member, data=features, chunks=(STORED_ROWS, N_FEATURES))
    stored = sorted(p.read_bytes() for p in path.rglob("*") if p.is_file())
    X = open_features(path, dataset=member)
    est = PSMI(n_estimators=20, random_state=0)
    mean, std, full = est.fit_transform(X, labels)

    for outputs in [(mean, std, full), (mean, std)]:
        with pytest.raises(ValueError, match=r"would write over .* open_features"):
            save_results(path, *outputs, overwrite=True)

    assert stored == sorted(p.read_bytes() for p in path.rglob("*") if p.is_file())
    save_results(tmp_path / "out.zarr", mean, std, full)  # beside it: written
    expected = est.transform(features, labels)[2]
    got = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["psmi_full"][:]
    assert_array_equal(got, expected)
