"""Directions on the unit sphere, drawn block by block from a seed.

The directions of block ``b`` are a pure function of the seed, ``b``, the
block size, the number of features and the kind of directions. Nothing here
reads numpy's global random state, so the same seed gives the same
directions on any number of workers, in any completion order and after a
task is retried elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import numpy as np

__all__ = ["DirectionSource", "block_directions", "seed_sequence"]

KINDS = ("orthogonal", "iid")


def seed_sequence(random_state: object) -> np.random.SeedSequence:
    """Turn ``random_state`` into the SeedSequence every block derives from.

    ``None`` draws fresh entropy from the operating system; an integer or a
    SeedSequence is used as given; a Generator is advanced once, so that two
    fits with the same Generator differ, as in scikit-learn.
    """
    if random_state is None:
        return np.random.SeedSequence()
    if isinstance(random_state, np.random.SeedSequence):
        return random_state
    if isinstance(random_state, np.random.Generator):
        entropy = random_state.integers(0, 2**63, size=4, dtype=np.uint64)
        return np.random.SeedSequence([int(word) for word in entropy])
    if isinstance(random_state, Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(
                f"random_state must be a non-negative integer, got {random_state}."
            )
        return np.random.SeedSequence(int(random_state))
    raise TypeError(
        "random_state must be None, a non-negative int, a numpy SeedSequence "
        f"or a numpy Generator, got {type(random_state).__name__}."
    )


def _block_generator(seed: np.random.SeedSequence, block: int) -> np.random.Generator:
    child = np.random.SeedSequence(
        entropy=seed.entropy,
        spawn_key=(*seed.spawn_key, block),
        pool_size=seed.pool_size,
    )
    return np.random.default_rng(child)


def _iid(rng: np.random.Generator, size: int, n_features: int) -> np.ndarray:
    gaussian = rng.standard_normal((size, n_features))
    return gaussian / np.linalg.norm(gaussian, axis=1, keepdims=True)


def _orthogonal(rng: np.random.Generator, size: int, n_features: int) -> np.ndarray:
    # Haar-random frames: the Q of a Gaussian matrix, with the signs of R's
    # diagonal folded into Q so that the distribution is exactly uniform
    # (Mezzadri, "How to generate random matrices from the classical compact
    # groups", 2007). A d x m Gaussian gives the first m columns of a frame.
    # In place where numpy allows it: on Dask workers every fresh
    # megabyte-sized temporary costs page faults.
    directions = np.empty((size, n_features))
    first = 0
    while first < size:
        width = min(size - first, n_features)
        q, r = np.linalg.qr(rng.standard_normal((n_features, width)))
        signs = np.sign(np.diagonal(r))
        signs[signs == 0] = 1.0
        q *= signs
        directions[first : first + width] = q.T
        first += width
    return directions


def block_directions(
    seed: np.random.SeedSequence,
    block: int,
    block_size: int,
    n_features: int,
    kind: str,
) -> np.ndarray:
    """Return the ``block_size`` unit directions of block ``block``.

    Returns
    -------
    directions : ndarray of shape (block_size, n_features)
        Unit rows, float64, C-contiguous.
    """
    rng = _block_generator(seed, block)
    if kind == "iid":
        directions = _iid(rng, block_size, n_features)
    elif kind == "orthogonal":
        directions = _orthogonal(rng, block_size, n_features)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    return np.ascontiguousarray(directions)


@dataclass(frozen=True)
class DirectionSource:
    """Where the directions of each block come from.

    Either drawn from ``seed`` (``kind`` is "orthogonal" or "iid"), or taken
    in order from ``given``, an array of unit rows supplied by the user.
    """

    n_features: int
    block_size: int
    kind: str
    seed: np.random.SeedSequence | None = None
    given: np.ndarray | None = None

    @property
    def n_available(self) -> int | None:
        """How many directions exist at most (None: unlimited)."""
        return None if self.given is None else self.given.shape[0]

    def block(self, block: int, size: int) -> np.ndarray:
        """The first ``size`` directions of block ``block``.

        A block shorter than ``block_size`` (the last one, when a cap cuts it)
        is the prefix of the full block, so capping never changes the
        directions that are kept.
        """
        start = block * self.block_size
        if self.given is not None:
            return self.given[start : start + size]
        if self.seed is None:
            raise ValueError("DirectionSource needs a seed or given directions.")
        full = block_directions(
            self.seed, block, self.block_size, self.n_features, self.kind
        )
        return full[:size]
