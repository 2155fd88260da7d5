"""A block of directions as an independent piece of Dask work.

For its directions, a block projects every chunk of samples, merges the
per-class moments of the chunks pairwise in a fixed order, fits the class
Gaussians, then projects and scores every chunk again. The graph depends
only on the data, the block's index and the parameters, so the same block
gives the same bits wherever and whenever it runs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from dask import delayed
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from psmi_dask._blas import single_threaded_blas
from psmi_dask._directions import DirectionSource
from psmi_dask._numerics import (
    ClassMoments,
    GaussianParams,
    SampleMoments,
    as_aligned,
    class_moments,
    fit_gaussians,
    merge_class_moments,
    project,
    score,
)

__all__ = [
    "BlockFit",
    "ChunkedData",
    "ColumnSink",
    "Columns",
    "fit_block",
    "score_block",
    "tree_reduce",
]


@dataclass(frozen=True)
class ChunkedData:
    """Features and class codes split into chunks along samples.

    ``features`` and ``codes`` hold one reference per chunk: a Delayed, a
    distributed Future or a numpy array. ``offset`` is the reference
    sample subtracted before projecting (see ``_numerics.project``).
    ``ranges``, when set, splits the chunks into contiguous runs
    ``[first, stop)`` whose data sits on one worker, so that one task per
    run can do the work of its chunks without moving them.
    """

    features: Sequence[Any]
    codes: Sequence[Any]
    starts: Sequence[int]
    sizes: Sequence[int]
    offset: Any
    n_features: int
    ranges: Sequence[tuple[int, int]] | None = None

    @property
    def n_samples(self) -> int:
        return int(sum(self.sizes))

    @property
    def n_chunks(self) -> int:
        return len(self.sizes)


class ColumnSink:
    """psmi_full, preallocated, that chunks write their columns into.

    Only for blocks that run in this process (the threaded scheduler): it
    spares a copy of every column, and the memory of holding them twice.
    """

    def __init__(self, n_samples: int, n_directions: int) -> None:
        self.array = np.empty((n_samples, n_directions))
        self._token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:
        return self._token

    def view(self, start: int, stop: int, column: int, width: int) -> np.ndarray:
        return self.array[start:stop, column : column + width]


@dataclass(frozen=True)
class Columns:
    """What a block does with its pmi columns: drop, return or write them."""

    keep: bool = False
    sink: ColumnSink | None = None
    first: int = 0  # index of the block's first direction in psmi_full

    def out(self, start: int, size: int, width: int) -> np.ndarray | None:
        if self.sink is None:
            return None
        return self.sink.view(start, start + size, self.first, width)


def _score_chunk(
    projections: np.ndarray,
    codes: np.ndarray,
    params: GaussianParams | BlockFit,
    columns: Columns,
    start: int,
) -> tuple[SampleMoments, np.ndarray | None]:
    if isinstance(params, BlockFit):
        params = params.params
    out = columns.out(start, projections.shape[0], projections.shape[1])
    return score(projections, codes, params, columns.keep, out)


@dataclass(frozen=True)
class BlockFit:
    """What the client keeps of a fitted block: its directions and Gaussians."""

    directions: np.ndarray
    params: GaussianParams


def tree_reduce(items: list[Any], merge: Callable[[Any, Any], Any]) -> Any:
    """Merge ``items`` pairwise, level by level, in a fixed order.

    The shape of the tree depends only on ``len(items)``, so the rounding
    of the result does too.
    """
    level = list(items)
    while len(level) > 1:
        paired = [merge(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _project(
    chunk: np.ndarray, offset: np.ndarray, directions: np.ndarray
) -> np.ndarray:
    with single_threaded_blas():
        return project(chunk, offset, directions)


def _chunk_moments(
    chunk: np.ndarray,
    codes: np.ndarray,
    offset: np.ndarray,
    directions: np.ndarray,
    n_classes: int,
) -> ClassMoments:
    with single_threaded_blas():
        projections = project(chunk, offset, directions, temporary=True)
        return class_moments(projections, codes, n_classes)


def _class_moments(
    projections: np.ndarray, codes: np.ndarray, n_classes: int
) -> ClassMoments:
    with single_threaded_blas():
        return class_moments(projections, codes, n_classes)


def _chunk_score(
    chunk: np.ndarray,
    codes: np.ndarray,
    offset: np.ndarray,
    directions: np.ndarray,
    params: GaussianParams | BlockFit,
    columns: Columns,
    start: int,
) -> tuple[SampleMoments, np.ndarray | None]:
    with single_threaded_blas():
        # Scored at once and dropped: a buffer of this thread will do.
        projections = project(chunk, offset, directions, temporary=True)
        return _score_chunk(projections, codes, params, columns, start)


def _finish_fit(
    moments: ClassMoments, directions: np.ndarray, var_floor: float
) -> BlockFit:
    return BlockFit(directions, fit_gaussians(moments, var_floor))


def _drawn_directions(
    seed: np.random.SeedSequence,
    block: int,
    block_size: int,
    n_features: int,
    kind: str,
    size: int,
) -> np.ndarray:
    source = DirectionSource(n_features, block_size, kind, seed)
    with single_threaded_blas():
        return source.block(block, size)


def block_directions(source: DirectionSource, block: int, size: int) -> Any:
    """A Delayed of the block's directions.

    Drawn directions are drawn where the block runs, from the seed; rows
    supplied by the user are sliced here, so that each block's graph
    carries its own rows only.
    """
    if source.given is not None:
        return delayed(source.block(block, size))
    return delayed(_drawn_directions, pure=True)(
        source.seed, block, source.block_size, source.n_features, source.kind, size
    )


def _whole_block(
    chunks: list[np.ndarray],
    codes: list[np.ndarray],
    offset: np.ndarray,
    directions: np.ndarray,
    n_classes: int,
    var_floor: float,
    with_scores: bool,
    columns: Columns,
    starts: list[int],
) -> tuple[Any, ...]:
    """A small block in one task: the same steps, in the same order."""
    directions = as_aligned(directions, np.float64)  # once, not per chunk
    with single_threaded_blas():
        projections = [project(chunk, offset, directions) for chunk in chunks]
        moments = [class_moments(t, c, n_classes) for t, c in zip(projections, codes)]
    fit = _finish_fit(tree_reduce(moments, merge_class_moments), directions, var_floor)
    if not with_scores:
        return (fit,)
    scores = [
        _score_chunk(t, c, fit, columns, start)
        for t, c, start in zip(projections, codes, starts)
    ]
    return (fit, *scores)


def _range_moments(
    chunks: list[np.ndarray],
    codes: list[np.ndarray],
    offset: np.ndarray,
    directions: np.ndarray,
    n_classes: int,
) -> list[ClassMoments]:
    """The moments of each chunk of a run, unmerged: merging follows the tree
    over every chunk, which no run sees whole."""
    directions = as_aligned(directions, np.float64)  # once, not per chunk
    return [
        _chunk_moments(chunk, c, offset, directions, n_classes)
        for chunk, c in zip(chunks, codes)
    ]


def _finish_ranges(
    parts: list[list[ClassMoments]], directions: np.ndarray, var_floor: float
) -> BlockFit:
    moments = [m for part in parts for m in part]
    return _finish_fit(tree_reduce(moments, merge_class_moments), directions, var_floor)


def _fit_ranges(
    data: ChunkedData,
    ranges: Sequence[tuple[int, int]],
    directions: Any,
    n_classes: int,
    var_floor: float,
) -> Any:
    """A fit without scores in one task per run of chunks and one to merge.

    A chunk's moments take a few hundred kilobytes against megabytes for its
    features, so the runs send them whole and the merge is the same tree,
    in the same order, as with one task per chunk: identical bits.
    """
    task = delayed(pure=False)
    parts = [
        task(_range_moments)(
            list(data.features[first:stop]),
            list(data.codes[first:stop]),
            data.offset,
            directions,
            n_classes,
        )
        for first, stop in ranges
    ]
    return task(_finish_ranges)(parts, directions, var_floor)


def fit_block(
    data: ChunkedData,
    directions: Any,
    n_classes: int,
    var_floor: float,
    with_scores: bool,
    columns: Columns,
    cache_projections: bool,
    whole: bool = False,
) -> tuple[Any, list[Any]]:
    """The graph of one block: its fit and, if asked, its scores per chunk.

    With ``cache_projections`` each chunk is projected once and the
    projection is shared by the moments and the scores; otherwise each is
    projected twice, so that no worker holds a block's projections of every
    chunk at once. With ``whole``, for small data, the block is one task
    that does the same per chunk: the cost of a task is then paid once.
    Without scores, on data placed in ``ranges``, one task per range does
    the work of its chunks. All give identical bits.

    Returns
    -------
    fit : Delayed of BlockFit
    scores : list of Delayed of (SampleMoments, columns or None), per chunk
    """
    if not with_scores and data.ranges is not None:
        fit = _fit_ranges(data, data.ranges, directions, n_classes, var_floor)
        return fit, []
    # Unique keys without hashing the arguments: a block is never shared.
    task = delayed(pure=False)
    if whole:
        n_out = 1 + (data.n_chunks if with_scores else 0)
        parts = task(_whole_block, nout=n_out)(
            list(data.features),
            list(data.codes),
            data.offset,
            directions,
            n_classes,
            var_floor,
            with_scores,
            columns,
            list(data.starts),
        )
        return parts[0], [parts[i] for i in range(1, n_out)]
    if with_scores and cache_projections:
        projections = [
            task(_project)(chunk, data.offset, directions) for chunk in data.features
        ]
        moments = [
            task(_class_moments)(t, codes, n_classes)
            for t, codes in zip(projections, data.codes)
        ]
    else:
        moments = [
            task(_chunk_moments)(chunk, codes, data.offset, directions, n_classes)
            for chunk, codes in zip(data.features, data.codes)
        ]
    merged = tree_reduce(moments, task(merge_class_moments))
    fit = _one_layer(task(_finish_fit)(merged, directions, var_floor), data)
    if not with_scores:
        return fit, []
    # The scores take the whole fit, a task fewer than taking its params.
    params = fit
    if cache_projections:
        scores = [
            task(_score_chunk)(t, codes, params, columns, start)
            for t, codes, start in zip(projections, data.codes, data.starts)
        ]
    else:
        scores = score_block(data, directions, params, columns)
    return fit, scores


def _one_layer(value: Delayed, data: ChunkedData) -> Delayed:
    """``value`` with the tasks of its block merged into one graph layer.

    A task that takes a Delayed copies its graph's layers, one per task
    before it: handing the fit, which follows a task per chunk, to a task
    per chunk would cost the square of the number of chunks (minutes per
    block at 10,000 chunks). The data's layers are kept apart, shared by
    every block.
    """
    graph = value.__dask_graph__()
    if not isinstance(graph, HighLevelGraph):
        return value
    refs = [*data.features, *data.codes, data.offset]
    shared = {
        name
        for ref in refs
        if isinstance(ref, Delayed)
        for name in ref.__dask_layers__()
        if name in graph.layers
    }
    tasks: dict[Any, Any] = {}
    for name, layer in graph.layers.items():
        if name not in shared:
            tasks.update(layer)
    own = f"block-{value.key}"
    layers = {name: graph.layers[name] for name in shared}
    dependencies = {name: set(graph.dependencies[name]) for name in shared}
    layers[own] = MaterializedLayer(tasks)
    dependencies[own] = set(shared)
    return Delayed(value.key, HighLevelGraph(layers, dependencies), layer=own)


def score_block(
    data: ChunkedData, directions: Any, params: Any, columns: Columns
) -> list[Any]:
    """The graph that scores every chunk along a fitted block."""
    # Unique keys without hashing the arguments: a block is never shared.
    task = delayed(pure=False)
    return [
        task(_chunk_score)(
            chunk, codes, data.offset, directions, params, columns, start
        )
        for chunk, codes, start in zip(data.features, data.codes, data.starts)
    ]
