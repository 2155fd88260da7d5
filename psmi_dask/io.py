"""Open features and labels from files, and save PSMI results to files.

Features are opened lazily as dask arrays chunked along samples only, so that
no step needs the whole matrix in memory:

- zarr (version 3 or 2) arrays, directly or as a member of a zarr group;
- HDF5 datasets, read through h5py by a small picklable source that opens
  the file for each read, so that nothing unpicklable travels to a
  distributed worker;
- ``.npy`` files, memory-mapped for each read.

The dask chunks along samples are whole multiples of the stored chunk rows,
so that every stored chunk is read once per pass over the data instead of
once per dask chunk that overlaps it.

Labels are small and are read eagerly into a numpy array, from ``.npy``,
from ``.csv``/``.txt`` files (one label a line, or a named column), or from a
dataset beside the features (a zarr group member or an HDF5 dataset).

Paths can name a member after a colon: ``data.h5:X``, ``data.zarr:y`` or
``labels.csv:label``. The colon form is used only when the whole string is
not itself an existing path.
"""

from __future__ import annotations

import csv
import importlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.utils import parse_bytes

__all__ = [
    "HDF5Source",
    "NpySource",
    "estimator_record",
    "open_features",
    "open_labels",
    "package_versions",
    "record_path",
    "result_paths",
    "save_results",
    "write_record",
]

logger = logging.getLogger(__name__)

FEATURE_FORMATS = "a zarr array or group (directory), HDF5 (.h5, .hdf5) or .npy"
LABEL_FORMATS = (
    ".npy, .csv, .txt, or a dataset in a zarr group or HDF5 file (dataset=...)"
)
RESULT_FORMATS = ".zarr, .npy or .csv"

_HDF5_SUFFIXES = {".h5", ".hdf5", ".hdf", ".he5"}
_TEXT_SUFFIXES = {".csv", ".txt", ".tsv"}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_NPY_SIGNATURE = b"\x93NUMPY"


def _import_optional(module: str, extra: str, purpose: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the optional dependency {module!r}; install it "
            f"with `pip install 'psmi_dask[{extra}]'`."
        ) from error


def _split_member(
    path: str | os.PathLike[str], member: str | None, option: str
) -> tuple[Path, str | None]:
    """Split ``file:member`` into its parts unless the whole is a path."""
    text = os.fspath(path)
    if os.path.exists(text) or ":" not in text:
        return Path(text), member

    head, tail = text.rsplit(":", 1)
    if not os.path.exists(head) or not tail:
        return Path(text), member

    if member is not None and member != tail:
        raise ValueError(
            f"{text!r} names the member {tail!r}, but {option}={member!r} was "
            f"also given; give the member once."
        )
    return Path(head), tail


# Every file open_features has opened in this process: save_results will
# not write over one (a lazy result may still read it; and it is the data).
_SOURCES: set[Path] = set()


def _opened(array: da.Array, path: Path) -> da.Array:
    _SOURCES.add(path.resolve())
    return array


def _overlaps(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether writing ``a`` could touch ``b``: the same path, or one in the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def _refuse_writing_over_sources(outputs: Sequence[Path]) -> None:
    for source in sorted(_SOURCES):
        for output in outputs:
            if _overlaps(output, source):
                raise ValueError(
                    f"output {str(output)!r} would write over {str(source)!r}, "
                    "whose features open_features opened (lazy results may "
                    "still read them); choose another output."
                )


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise ValueError(
            f"{what} file {str(path)!r} does not exist; check the path (and, "
            f"on a cluster, that workers see the same path)."
        )


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("zarr.json", ".zarray", ".zgroup")
    )


def _detect_format(path: Path) -> str:
    """Return "zarr", "hdf5", "npy", "text" or "unknown" for ``path``."""
    if _is_zarr_dir(path) or path.suffix == ".zarr":
        return "zarr"

    if path.is_file():
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head.startswith(_HDF5_SIGNATURE):
            return "hdf5"
        if head.startswith(_NPY_SIGNATURE):
            return "npy"

    suffix = path.suffix.lower()
    if suffix in _HDF5_SUFFIXES:
        return "hdf5"
    if suffix == ".npy":
        return "npy"
    if suffix in _TEXT_SUFFIXES:
        return "text"
    return "unknown"


def _check_signature(path: Path, kind: str) -> None:
    """Raise if a file named as ``kind`` does not start like one."""
    signature = {"npy": _NPY_SIGNATURE, "hdf5": _HDF5_SIGNATURE}[kind]
    with open(path, "rb") as handle:
        head = handle.read(len(signature))
    if head != signature:
        label = {"npy": ".npy", "hdf5": "HDF5"}[kind]
        article = {"npy": "a", "hdf5": "an"}[kind]
        fix = {"npy": "numpy.save", "hdf5": "h5py"}[kind]
        raise ValueError(
            f"{str(path)!r} is named like {article} {label} file but is not one (its "
            f"first bytes are not the {label} signature); write it with {fix}."
        )


def _target_rows(n_features: int, itemsize: int) -> int:
    """Rows per chunk that fill dask's configured ``array.chunk-size``."""
    limit = dask.config.get("array.chunk-size", "128MiB")
    limit_bytes = parse_bytes(limit) if isinstance(limit, str) else int(limit)
    return max(1, limit_bytes // max(1, n_features * itemsize))


def _aligned_rows(
    chunk_rows: int | None,
    stored_rows: int,
    n_samples: int,
    n_features: int,
    itemsize: int,
    path: Path,
) -> int:
    """Rows per dask chunk: a whole multiple of the stored chunk rows.

    A requested number of rows is rounded down to a multiple of the stored
    rows (at least one stored chunk), so that a dask chunk never holds part
    of a stored chunk and each stored chunk is read once per pass.
    """
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or int(chunk_rows) != chunk_rows:
            raise ValueError(
                f"chunk_rows must be a positive integer, got {chunk_rows!r}."
            )
        if chunk_rows < 1:
            raise ValueError(
                f"chunk_rows must be a positive integer, got {chunk_rows!r}."
            )
        requested = int(chunk_rows)
    else:
        requested = _target_rows(n_features, itemsize)

    rows = max(1, requested // stored_rows) * stored_rows
    rows = min(rows, max(n_samples, 1))
    if chunk_rows is not None and rows != chunk_rows:
        logger.info(
            "%s is stored in chunks of %d rows; reading %d rows per chunk "
            "instead of the %d requested, so that no stored chunk is split.",
            path,
            stored_rows,
            rows,
            chunk_rows,
        )
    return rows


def _check_feature_array(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    if dtype.names:
        raise ValueError(
            f"features in {where} are a structured array with fields "
            f"{list(dtype.names)}, but a 2-D numeric array was expected; stack "
            "the fields into columns (numpy.lib.recfunctions."
            "structured_to_unstructured) and save that."
        )
    if len(shape) != 2:
        raise ValueError(
            f"features in {where} have shape {shape}, but a 2-D array of shape "
            f"(n_samples, n_features) was expected; store a single feature as "
            f"shape (n_samples, 1)."
        )
    if dtype.kind not in "biuf":
        raise ValueError(
            f"features in {where} have dtype {dtype}, but a numeric (bool, "
            f"integer or float) dtype was expected."
        )


class HDF5Source:
    """A picklable, read-only view of one HDF5 dataset.

    Only the file path and the dataset name are stored; each read opens the
    file, reads the requested slice and closes it, so the object can be sent
    to any worker that sees the same path.

    Parameters
    ----------
    path : str or path-like
        Path of the HDF5 file.
    dataset : str
        Name of the dataset inside the file, such as ``"X"`` or ``"group/X"``.

    Attributes
    ----------
    shape : tuple of int
        Shape of the dataset.
    dtype : numpy.dtype
        Data type of the dataset.
    ndim : int
        Number of dimensions.
    chunks : tuple of int or None
        Stored chunk shape, or None for a contiguous dataset.
    """

    def __init__(self, path: str | os.PathLike[str], dataset: str) -> None:
        h5py = _import_optional("h5py", "io", "Reading HDF5 files")
        self.path = os.path.abspath(os.fspath(path))
        self.dataset = dataset
        with h5py.File(self.path, "r") as handle:
            node = handle[dataset]
            self.shape: tuple[int, ...] = tuple(node.shape)
            self.dtype: np.dtype = node.dtype
            self.chunks: tuple[int, ...] | None = node.chunks
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        import h5py

        with h5py.File(self.path, "r") as handle:
            return np.asarray(handle[self.dataset][key])

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        stat = os.stat(self.path)
        return ("HDF5Source", self.path, self.dataset, stat.st_size, stat.st_mtime_ns)

    def __repr__(self) -> str:
        return f"HDF5Source({self.path!r}, {self.dataset!r}, shape={self.shape})"


class NpySource:
    """A picklable, read-only view of a ``.npy`` file, memory-mapped per read.

    Only the path is stored; each read memory-maps the file with
    ``numpy.load(path, mmap_mode="r")`` and copies out the requested slice,
    so no data travels with the object.

    Parameters
    ----------
    path : str or path-like
        Path of the ``.npy`` file.

    Attributes
    ----------
    shape : tuple of int
        Shape of the stored array.
    dtype : numpy.dtype
        Data type of the stored array.
    ndim : int
        Number of dimensions.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        stored = np.load(self.path, mmap_mode="r", allow_pickle=False)
        self.shape: tuple[int, ...] = tuple(stored.shape)
        self.dtype: np.dtype = stored.dtype
        self.ndim = len(self.shape)
        del stored

    def __getitem__(self, key: Any) -> np.ndarray:
        stored = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.array(stored[key])

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        stat = os.stat(self.path)
        return ("NpySource", self.path, stat.st_size, stat.st_mtime_ns)

    def __repr__(self) -> str:
        return f"NpySource({self.path!r}, shape={self.shape})"


def _zarr_node(path: Path, dataset: str | None, what: str, option: str) -> Any:
    """Open the zarr array at ``path`` (or its member ``dataset``) read-only."""
    zarr = _import_optional("zarr", "io", "Reading zarr files")
    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as error:
        raise ValueError(
            f"could not open {str(path)!r} as zarr ({type(error).__name__}: "
            f"{error}); give {FEATURE_FORMATS}."
        ) from error

    if isinstance(node, zarr.Array):
        if dataset is not None:
            raise ValueError(
                f"{str(path)!r} is a zarr array, not a group, so it has no "
                f"member {dataset!r}; drop {option}."
            )
        return node

    names = sorted(node.array_keys())
    if dataset is None:
        if len(names) == 1:
            return node[names[0]]
        raise ValueError(
            f"{str(path)!r} is a zarr group with arrays {names}; choose the "
            f"{what} with {option}=NAME or '{path}:NAME'."
        )
    if dataset not in node:
        raise ValueError(
            f"zarr group {str(path)!r} has no array {dataset!r}; its arrays "
            f"are {names}."
        )
    member = node[dataset]
    if not isinstance(member, zarr.Array):
        raise ValueError(
            f"{dataset!r} in {str(path)!r} is a zarr group, not an array; name "
            f"an array inside it, such as {dataset!r}/NAME."
        )
    return member


def _hdf5_names(path: Path) -> list[str]:
    import h5py

    names: list[str] = []

    def visit(name: str, node: Any) -> None:
        if isinstance(node, h5py.Dataset):
            names.append(name)

    with h5py.File(path, "r") as handle:
        handle.visititems(visit)
    return sorted(names)


def _hdf5_dataset_name(path: Path, dataset: str | None, what: str, option: str) -> str:
    h5py = _import_optional("h5py", "io", "Reading HDF5 files")
    try:
        names = _hdf5_names(path)
    except OSError as error:
        raise ValueError(
            f"could not read {str(path)!r} as HDF5 ({error}); give {FEATURE_FORMATS}."
        ) from error

    if dataset is None:
        if len(names) == 1:
            return names[0]
        raise ValueError(
            f"HDF5 file {str(path)!r} holds datasets {names}; choose the "
            f"{what} with {option}=NAME or '{path}:NAME'."
        )
    with h5py.File(path, "r") as handle:
        found = isinstance(handle.get(dataset), h5py.Dataset)
    if not found:
        raise ValueError(
            f"HDF5 file {str(path)!r} has no dataset {dataset!r}; its "
            f"datasets are {names}."
        )
    return dataset


def open_features(
    path: str | os.PathLike[str],
    dataset: str | None = None,
    chunk_rows: int | None = None,
) -> da.Array:
    """Open a feature matrix stored in a file as a lazy dask array.

    Nothing is read beyond the metadata: the returned array reads its chunks
    when it is computed, on whichever worker computes them.

    Parameters
    ----------
    path : str or path-like
        A zarr array or group (a directory, usually ``*.zarr``), an HDF5 file
        (``*.h5``, ``*.hdf5``) or a ``.npy`` file. A member can be named after
        a colon, as in ``"data.h5:X"``.
    dataset : str, default=None
        The array inside a zarr group or HDF5 file. May be omitted when the
        group or file holds a single array.
    chunk_rows : int, default=None
        Samples per dask chunk. Rounded down to a whole multiple of the
        stored chunk rows (at least one stored chunk), so that each stored
        chunk is read once per pass. By default, chunks fill dask's
        ``array.chunk-size`` setting.

    Returns
    -------
    X : dask.array.Array of shape (n_samples, n_features)
        The features, chunked along samples only (all features in one
        chunk).

    Raises
    ------
    ValueError
        If the file does not exist, its format is not recognised, the
        dataset is missing or ambiguous, or the array is not 2-D and numeric.
    ImportError
        If zarr or h5py is needed but not installed (extra ``io``).

    See Also
    --------
    open_labels : Read the labels that go with the features.

    Notes
    -----
    On a distributed cluster, every worker must see the file at the same
    path (a shared file system). HDF5 and ``.npy`` files are reopened for
    each chunk read, so the task graph holds only the path.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from psmi_dask.io import open_features
    >>> path = os.path.join(tempfile.mkdtemp(), "X.npy")
    >>> np.save(path, np.arange(12.0).reshape(6, 2))
    >>> X = open_features(path, chunk_rows=4)
    >>> X.chunks
    ((4, 2), (2,))
    """
    path, dataset = _split_member(path, dataset, "dataset")
    _check_exists(path, "features")
    kind = _detect_format(path)
    if kind == "zarr":
        return _opened(_open_zarr_features(path, dataset, chunk_rows), path)
    if kind in ("hdf5", "npy"):
        _check_signature(path, kind)
    if kind == "hdf5":
        name = _hdf5_dataset_name(path, dataset, "features", "dataset")
        hdf5 = HDF5Source(path, name)
        return _opened(_from_source(hdf5, path, chunk_rows, "hdf5"), path)
    if kind == "npy":
        if dataset is not None:
            raise ValueError(
                f"{str(path)!r} is a .npy file, which holds one array, so "
                f"dataset={dataset!r} has no meaning; drop it."
            )
        try:
            source = NpySource(path)
        except ValueError as error:
            raise ValueError(
                f"could not read {str(path)!r} as .npy ({error}); save the "
                f"features with numpy.save as a numeric array."
            ) from error
        return _opened(_from_source(source, path, chunk_rows, "npy"), path)
    raise ValueError(
        f"features file {str(path)!r} is in a format psmi_dask does not read; "
        f"give {FEATURE_FORMATS}."
    )


def _open_zarr_features(
    path: Path, dataset: str | None, chunk_rows: int | None
) -> da.Array:
    node = _zarr_node(path, dataset, "features", "dataset")
    where = f"{str(path)!r}" + (f" (array {node.path!r})" if node.path else "")
    _check_feature_array(tuple(node.shape), np.dtype(node.dtype), where)
    n_samples, n_features = node.shape
    stored_rows = int(node.chunks[0])
    rows = _aligned_rows(
        chunk_rows, stored_rows, n_samples, n_features, node.dtype.itemsize, path
    )
    return da.from_zarr(node, chunks=(rows, n_features))


def _from_source(
    source: HDF5Source | NpySource, path: Path, chunk_rows: int | None, kind: str
) -> da.Array:
    _check_feature_array(source.shape, np.dtype(source.dtype), repr(str(path)))
    n_samples, n_features = source.shape
    stored = getattr(source, "chunks", None)
    stored_rows = int(stored[0]) if stored else 1
    rows = _aligned_rows(
        chunk_rows, stored_rows, n_samples, n_features, source.dtype.itemsize, path
    )
    name = f"from-{kind}-{tokenize(source, rows)}"
    return da.from_array(
        source,
        chunks=(rows, n_features),
        name=name,
        lock=False,
        asarray=True,
        fancy=False,
        meta=np.empty((0, 0), dtype=source.dtype),
    )


def open_labels(
    path: str | os.PathLike[str],
    column: str | None = None,
    dataset: str | None = None,
) -> np.ndarray:
    """Read class labels from a file into a 1-D numpy array.

    Parameters
    ----------
    path : str or path-like
        A ``.npy`` file; a ``.csv``, ``.tsv`` or ``.txt`` file; or a zarr
        group or HDF5 file that holds the labels as a dataset. A CSV column
        or a dataset can be named after a colon, as in ``"meta.csv:label"``
        or ``"data.h5:y"``.
    column : str, default=None
        Column of a delimited text file whose first line is a header. Without
        it, every line of the file is one label (no header).
    dataset : str, default=None
        Array inside a zarr group or HDF5 file.

    Returns
    -------
    y : ndarray of shape (n_samples,)
        The labels. Text labels that are all integers become ``int64``;
        other text labels stay strings.

    Raises
    ------
    ValueError
        If the file does not exist, its format is not recognised, the column
        or dataset is missing, or the labels are not 1-D.

    See Also
    --------
    open_features : Open the features the labels go with.

    Examples
    --------
    >>> import tempfile, os
    >>> from psmi_dask.io import open_labels
    >>> path = os.path.join(tempfile.mkdtemp(), "y.csv")
    >>> with open(path, "w") as handle:
    ...     _ = handle.write("id,label\\n0,cat\\n1,dog\\n")
    >>> open_labels(path, column="label")
    array(['cat', 'dog'], dtype='<U3')
    """
    path, member = _split_member(
        path, column if column is not None else dataset, "column"
    )
    _check_exists(path, "labels")
    kind = _detect_format(path)
    if kind == "text":
        if dataset is not None:
            raise ValueError(
                f"{str(path)!r} is a text file; name a column with column=, "
                f"not dataset={dataset!r}."
            )
        labels = _read_text_labels(path, member)
    elif kind == "npy":
        _check_signature(path, kind)
        if member is not None:
            raise ValueError(
                f"{str(path)!r} is a .npy file, which holds one array; drop "
                f"the member {member!r}."
            )
        labels = _read_npy_labels(path)
    elif kind in ("zarr", "hdf5"):
        if kind == "hdf5":
            _check_signature(path, kind)
        if column is not None:
            described = "an HDF5 file" if kind == "hdf5" else "a zarr store"
            raise ValueError(
                f"{str(path)!r} is {described}; name its labels with "
                f"dataset=, not column={column!r}."
            )
        labels = _read_dataset_labels(path, member, kind)
    else:
        raise ValueError(
            f"labels file {str(path)!r} is in a format psmi_dask does not "
            f"read; give {LABEL_FORMATS}."
        )
    return _check_labels(labels, path)


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"labels in {str(path)!r} have shape {labels.shape}, but one label "
            f"per sample (a 1-D array) was expected."
        )
    if labels.size == 0:
        raise ValueError(f"labels file {str(path)!r} holds no labels.")
    return labels


def _read_npy_labels(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(
            f"could not read {str(path)!r} as .npy ({error}); save the labels "
            f"as a numeric or string array (not an object array)."
        ) from error


def _read_dataset_labels(path: Path, dataset: str | None, kind: str) -> np.ndarray:
    if kind == "zarr":
        return np.asarray(_zarr_node(path, dataset, "labels", "dataset")[...])
    name = _hdf5_dataset_name(path, dataset, "labels", "dataset")
    labels = HDF5Source(path, name)[...]
    if labels.dtype.kind in "OS":
        labels = np.array(
            [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in labels]
        )
    return labels


def _read_text_labels(path: Path, column: str | None) -> np.ndarray:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # utf-8-sig: a byte-order mark, as spreadsheets write, is not a label.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        rows, lines = [], []
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    while rows and not rows[-1]:  # blank lines at the end
        rows.pop()
    if not rows:
        raise ValueError(f"labels file {str(path)!r} is empty.")
    # A blank line within is an empty label, refused below: dropping it
    # would pair every later label with the wrong sample.
    rows = [row or [""] for row in rows]

    if column is None:
        widths = {len(row) for row in rows}
        if widths != {1}:
            raise ValueError(
                f"{str(path)!r} has {max(widths)} columns; name the label "
                f"column with column=NAME or '{path}:NAME' (the first "
                f"line is then read as a header)."
            )
        values = [row[0].strip() for row in rows]
        _refuse_empty(values, lines, path)
        if len(values) > 1 and not _is_int(values[0]) and all(map(_is_int, values[1:])):
            raise ValueError(
                f"the first line of {str(path)!r}, {values[0]!r}, looks like a "
                f"header; pass column={values[0]!r} or '{path}:{values[0]}'."
            )
    else:
        header = [name.strip() for name in rows[0]]
        if column not in header:
            raise ValueError(
                f"{str(path)!r} has no column {column!r}; its header has {header}."
            )
        index = header.index(column)
        values = [row[index].strip() if index < len(row) else "" for row in rows[1:]]
        _refuse_empty(values, lines[1:], path)
    return _parse_text_values(values)


def _refuse_empty(values: Sequence[str], lines: Sequence[int], path: Path) -> None:
    empty = [line for value, line in zip(values, lines) if not value]
    if empty:
        raise ValueError(
            f"{len(empty)} label{'s are' if len(empty) > 1 else ' is'} empty in "
            f"{str(path)!r} (the first on line {empty[0]}); give every sample a "
            "label."
        )


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _parse_text_values(values: Sequence[str]) -> np.ndarray:
    if all(map(_is_int, values)):
        return np.array([int(value) for value in values], dtype=np.int64)
    return np.array(values, dtype=str)


def result_paths(out: str | os.PathLike[str]) -> dict[str, Path]:
    """Files that :func:`save_results` writes for the output path ``out``.

    Parameters
    ----------
    out : str or path-like
        Output path ending in ``.zarr``, ``.npy`` or ``.csv``.

    Returns
    -------
    paths : dict of str to Path
        Keys ``psmi_mean``, ``psmi_std``, ``psmi_full`` and ``record``. For
        ``.zarr`` the three arrays live in one group at ``out``; for ``.npy``
        each array has its own file ``<stem>_<name>.npy``; for ``.csv``
        ``out`` holds psmi_mean and psmi_std as columns and psmi_full goes
        to ``<stem>_psmi_full.csv``. The JSON record is ``<out>.json``, such
        as ``results.zarr.json``.

    Raises
    ------
    ValueError
        If the extension is not one of the supported ones.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    stem = out.with_suffix("")
    paths = {"record": out.with_name(out.name + ".json")}
    if suffix == ".zarr":
        paths.update(psmi_mean=out, psmi_std=out, psmi_full=out)
    elif suffix == ".npy":
        for name in ("psmi_mean", "psmi_std", "psmi_full"):
            paths[name] = stem.with_name(f"{stem.name}_{name}.npy")
    elif suffix == ".csv":
        paths.update(
            psmi_mean=out,
            psmi_std=out,
            psmi_full=stem.with_name(f"{stem.name}_psmi_full.csv"),
        )
    else:
        raise ValueError(
            f"output {str(out)!r} has an extension psmi_dask does not write; "
            f"end it with {RESULT_FORMATS}."
        )
    return paths


def _remove_existing(paths: Sequence[Path], overwrite: bool) -> None:
    existing = sorted({path for path in paths if path.exists()})
    if existing and not overwrite:
        raise ValueError(
            f"output {str(existing[0])!r} already exists; choose another "
            f"output, or pass overwrite=True (--overwrite on the command line)."
        )
    for path in existing:
        if path.is_dir():
            if not _is_zarr_dir(path):
                raise ValueError(
                    f"output {str(path)!r} is a directory that is not a zarr "
                    f"store; psmi_dask will not delete it."
                )
            shutil.rmtree(path)
        else:
            path.unlink()


class _NpyRegionWriter:
    """Picklable target for ``dask.array.store`` that writes into a .npy."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.ndim = len(shape)

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        stored = np.load(self.path, mmap_mode="r+")
        stored[key] = value
        stored.flush()
        del stored


def _regular_rows(array: da.Array) -> da.Array:
    """Rechunk along samples if zarr cannot take the chunks as they are."""
    rows = array.chunks[0]
    if len(set(rows[:-1])) <= 1 and rows[-1] <= rows[0]:
        return array
    return array.rechunk({0: max(rows)})


def _save_zarr(
    out: Path, arrays: dict[str, Any], attributes: dict[str, Any] | None
) -> None:
    zarr = _import_optional("zarr", "io", "Writing zarr output")
    group = zarr.open_group(store=str(out), mode="w")
    if attributes:
        group.attrs.update(attributes)
    for name, values in arrays.items():
        if isinstance(values, da.Array):
            values = _regular_rows(values)
            chunks = tuple(dims[0] for dims in values.chunks)
            target = group.create_array(
                name, shape=values.shape, dtype=values.dtype, chunks=chunks
            )
            da.store(values, target, lock=False)
        else:
            values = np.asarray(values)
            target = group.create_array(name, shape=values.shape, dtype=values.dtype)
            target[...] = values


def _save_npy(paths: dict[str, Path], arrays: dict[str, Any]) -> None:
    for name, values in arrays.items():
        target = str(paths[name])
        if isinstance(values, da.Array):
            stored = np.lib.format.open_memmap(
                target, mode="w+", dtype=values.dtype, shape=values.shape
            )
            del stored
            writer: Any = _NpyRegionWriter(target, values.shape, values.dtype)
            da.store(values, writer, lock=False)
        else:
            np.save(target, np.asarray(values))


def _save_csv(
    paths: dict[str, Path], arrays: dict[str, Any], labels: np.ndarray | None
) -> None:
    mean = np.asarray(arrays["psmi_mean"])
    std = np.asarray(arrays["psmi_std"])
    with open(paths["psmi_mean"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = (
            ["sample"]
            + (["label"] if labels is not None else [])
            + ["psmi_mean", "psmi_std"]
        )
        writer.writerow(header)
        for index in range(mean.shape[0]):
            label = [labels[index]] if labels is not None else []
            writer.writerow(
                [index, *label, repr(float(mean[index])), repr(float(std[index]))]
            )

    if "psmi_full" not in arrays:
        return
    full = arrays["psmi_full"]
    n_columns = full.shape[1]
    with open(paths["psmi_full"], "w", newline="", encoding="utf-8") as handle:
        handle.write(
            ",".join(["sample"] + [f"pmi_{j}" for j in range(n_columns)]) + "\n"
        )
        start = 0
        for block in _row_blocks(full):
            rows = np.column_stack([np.arange(start, start + len(block)), block])
            np.savetxt(handle, rows, delimiter=",", fmt=["%d"] + ["%.17g"] * n_columns)
            start += len(block)


def _row_blocks(array: Any) -> Any:
    """Yield an array's rows chunk by chunk, computing one chunk at a time."""
    if not isinstance(array, da.Array):
        yield np.asarray(array)
        return
    for index in range(array.numblocks[0]):
        yield np.asarray(array.blocks[index, :].compute())


def save_results(
    out: str | os.PathLike[str],
    psmi_mean: Any,
    psmi_std: Any,
    psmi_full: Any = None,
    *,
    labels: np.ndarray | None = None,
    attributes: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write PSMI results in the format chosen by the extension of ``out``.

    Parameters
    ----------
    out : str or path-like
        Output path ending in ``.zarr``, ``.npy`` or ``.csv``; see
        :func:`result_paths` for the files each writes.
    psmi_mean, psmi_std : array-like of shape (n_samples,)
        Per-sample mean and standard deviation of pmi over directions.
    psmi_full : array-like of shape (n_samples, n_estimators), default=None
        Per-direction pmi values; written only when given. A dask array is
        written chunk by chunk and never held whole.
    labels : ndarray of shape (n_samples,), default=None
        Labels, added as a column to ``.csv`` output.
    attributes : dict, default=None
        JSON-serialisable metadata stored as attributes of ``.zarr`` output.
    overwrite : bool, default=False
        Replace existing output files instead of raising.

    Returns
    -------
    written : dict of str to Path
        The path each result was written to (the record path excluded).

    Raises
    ------
    ValueError
        If the extension is not supported, an output exists and
        ``overwrite`` is False, or an output would write over a file that
        :func:`open_features` opened in this process.
    """
    paths = result_paths(out)
    arrays: dict[str, Any] = {"psmi_mean": psmi_mean, "psmi_std": psmi_std}
    if psmi_full is not None:
        arrays["psmi_full"] = psmi_full
    written = {name: paths[name] for name in arrays}
    _refuse_writing_over_sources([*written.values(), paths["record"]])
    _remove_existing(list(written.values()), overwrite)

    suffix = Path(out).suffix.lower()
    if suffix == ".zarr":
        _save_zarr(Path(out), arrays, attributes)
    elif suffix == ".npy":
        _save_npy(paths, arrays)
    else:
        _save_csv(paths, arrays, labels)
    return written


def record_path(out: str | os.PathLike[str]) -> Path:
    """Path of the JSON record written beside the results at ``out``.

    Parameters
    ----------
    out : str or path-like
        Output path ending in ``.zarr``, ``.npy`` or ``.csv``.

    Returns
    -------
    path : Path
        ``out`` with ``.json`` appended, in the same directory.
    """
    return result_paths(out)["record"]


def package_versions(extra: Sequence[str] = ()) -> dict[str, str | None]:
    """Installed versions of psmi_dask and the libraries it runs on.

    Parameters
    ----------
    extra : sequence of str, default=()
        Further distribution names to include, such as ``"zarr"``.

    Returns
    -------
    versions : dict of str to str or None
        Version of each distribution, or None when it is not installed.
    """
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("psmi_dask", "dask", "distributed", "numpy", *extra):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _jsonable(value: Any) -> Any:
    """Translate numpy and other values that ``json`` cannot write."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.random.SeedSequence):
        return {"entropy": value.entropy, "spawn_key": list(value.spawn_key)}
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def write_record(path: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write a run record as indented JSON.

    Parameters
    ----------
    path : str or path-like
        Destination of the record, usually :func:`record_path` of the output.
    record : dict
        The record. numpy scalars and arrays become JSON numbers and lists;
        any other value JSON cannot hold is written as its ``repr``.

    Returns
    -------
    path : Path
        The path written.
    """
    import json

    path = Path(path)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, default=_jsonable, allow_nan=True)
        handle.write("\n")
    return path


def estimator_record(estimator: Any) -> dict[str, Any]:
    """What a fitted PSMI estimator did, as a JSON-ready dictionary.

    Parameters
    ----------
    estimator : PSMI
        A fitted estimator.

    Returns
    -------
    record : dict
        Keys ``parameters`` (the constructor arguments; an array of
        directions is described by its shape), ``n_estimators`` (directions
        used), ``n_blocks``, ``converged``, ``classes``, ``class_prior``,
        ``random_state`` and ``history`` (one entry per block).
    """
    parameters = dict(estimator.get_params())
    if isinstance(parameters.get("directions"), np.ndarray):
        shape = parameters["directions"].shape
        parameters["directions"] = f"array of shape {shape}"
    return {
        "parameters": parameters,
        "n_estimators": getattr(estimator, "n_estimators_", None),
        "n_blocks": getattr(estimator, "n_blocks_", None),
        "converged": getattr(estimator, "converged_", None),
        "classes": np.asarray(estimator.classes_).tolist(),
        "class_prior": np.asarray(estimator.class_prior_).tolist(),
        "random_state": getattr(estimator, "random_state_", None),
        "history": list(getattr(estimator, "history_", [])),
    }
