"""The auto-mode stopping rule, as pure functions of per-sample PSMI.

After ``k`` blocks, take the samples whose current PSMI is among the lowest
``quantile`` fraction (at least one sample); for each, the relative change
between PSMI over the first ``floor(k * milestone)`` blocks and PSMI over
all ``k``; stop when their mean is at most ``max_variation``.

The lowest set is found chunk by chunk: each chunk keeps its own
``n_lowest`` candidates, and candidates merge pairwise, so the rule can be
evaluated where the per-sample vectors live and only a few scalars travel.
No Dask here: the controller decides where these functions run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Candidates",
    "StoppingRule",
    "chunk_candidates",
    "merge_candidates",
    "relative_variation",
]

# Below this magnitude (in nats) a PSMI counts as zero in the denominator of
# the relative change, so that PSMI that is exactly or nearly 0 (one class,
# labels independent of X) gives a finite variation instead of 0/0.
ZERO_PSMI = 1e-12


@dataclass(frozen=True)
class Candidates:
    """Samples that may be among the lowest, sorted by (PSMI, index)."""

    psmi: np.ndarray
    index: np.ndarray
    variation: np.ndarray


def relative_variation(milestone: np.ndarray, current: np.ndarray) -> np.ndarray:
    """|milestone - current| / |current|, with 0/0 taken as no change."""
    change = np.abs(milestone - current)
    scale = np.maximum(np.abs(current), ZERO_PSMI)
    return change / scale


def _lowest(candidates: Candidates, n_lowest: int) -> Candidates:
    order = np.lexsort((candidates.index, candidates.psmi))[:n_lowest]
    return Candidates(
        candidates.psmi[order], candidates.index[order], candidates.variation[order]
    )


def chunk_candidates(
    current: np.ndarray, milestone: np.ndarray, offset: int, n_lowest: int
) -> Candidates:
    """The ``n_lowest`` lowest samples of one chunk, with their variation.

    ``offset`` is the index of the chunk's first sample, so that ties are
    broken by global sample index whatever the chunking.
    """
    index = np.arange(offset, offset + current.shape[0])
    variation = relative_variation(milestone, current)
    return _lowest(Candidates(current, index, variation), n_lowest)


def merge_candidates(a: Candidates, b: Candidates, n_lowest: int) -> Candidates:
    """Keep the ``n_lowest`` lowest of two sets of candidates."""
    merged = Candidates(
        np.concatenate([a.psmi, b.psmi]),
        np.concatenate([a.index, b.index]),
        np.concatenate([a.variation, b.variation]),
    )
    return _lowest(merged, n_lowest)


def mean_variation(candidates: Candidates) -> float:
    """The value the rule compares with ``max_variation``."""
    return float(candidates.variation.mean())


@dataclass(frozen=True)
class StoppingRule:
    """The auto-mode rule's parameters, and the arithmetic around them."""

    quantile: float
    max_variation: float
    milestone: float

    def n_lowest(self, n_samples: int) -> int:
        """Size of the lowest set: ``int(quantile * n)``, at least one."""
        return max(1, int(self.quantile * n_samples))

    def milestone_blocks(self, n_blocks: int) -> int:
        """Number of blocks PSMI is compared over: ``floor(k * milestone)``."""
        return math.floor(n_blocks * self.milestone)

    def is_met(self, variation: float) -> bool:
        return variation <= self.max_variation
