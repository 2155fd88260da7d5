"""The mislabel demo: find flipped labels in scikit-learn's digits with PSMI.

A sample whose label was changed to a wrong class sits far from the other
samples of that class along most directions, so its PSMI is low. Ranking
samples by PSMI, lowest first, finds the flipped labels; the demo measures
how well with the area under the ROC curve.

The work lives in :func:`run_demo`, which the ``psmi-dask demo`` command and
``examples/mislabel_demo.py`` both call.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psmi_dask.io import (
    _import_optional,
    estimator_record,
    package_versions,
    record_path,
    save_results,
    write_record,
)

__all__ = ["DemoResult", "flip_labels", "plot_psmi", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes
    ----------
    auroc : float
        Area under the ROC curve of "lowest PSMI first" for finding the
        flipped labels.
    psmi_mean, psmi_std : ndarray of shape (n_samples,)
        PSMI of each sample and its standard deviation over directions.
    labels : ndarray of shape (n_samples,)
        The labels PSMI saw, with the flipped ones.
    true_labels : ndarray of shape (n_samples,)
        The labels before flipping.
    flipped : ndarray of shape (n_samples,), dtype=bool
        Which labels were flipped.
    lowest : ndarray of shape (10,)
        Indices of the ten samples with the lowest PSMI, lowest first.
    n_estimators : int
        Directions used.
    converged : bool
        Whether the auto-mode stopping rule was met.
    seconds : float
        Wall time of the fit.
    files : dict of str to Path
        Files written: ``results``, ``record`` and ``plot``.
    """

    auroc: float
    psmi_mean: np.ndarray
    psmi_std: np.ndarray
    labels: np.ndarray
    true_labels: np.ndarray
    flipped: np.ndarray
    lowest: np.ndarray
    n_estimators: int
    converged: bool
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def flip_labels(
    y: np.ndarray, fraction: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Change a fixed fraction of labels, each to a different class.

    Parameters
    ----------
    y : ndarray of shape (n_samples,)
        Labels with at least two classes.
    fraction : float, default=0.05
        Fraction of samples whose label is changed, rounded to the nearest
        count.
    seed : int, default=0
        Seed of the generator that picks the samples and their new classes.

    Returns
    -------
    noisy : ndarray of shape (n_samples,)
        The labels with the chosen ones changed.
    flipped : ndarray of shape (n_samples,), dtype=bool
        True where the label was changed.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.arange(100) % 4
    >>> noisy, flipped = flip_labels(y, fraction=0.1)
    >>> int(flipped.sum()), bool(np.all(noisy[flipped] != y[flipped]))
    (10, True)
    """
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"y has {len(classes)} class; flipping needs at least 2.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")

    rng = np.random.default_rng(seed)
    n_flipped = round(fraction * len(y))
    chosen = rng.choice(len(y), size=n_flipped, replace=False)
    # A shift in 1..C-1 modulo C never lands on the original class.
    shift = rng.integers(1, len(classes), size=n_flipped)
    new_codes = codes.copy()
    new_codes[chosen] = (codes[chosen] + shift) % len(classes)
    flipped = np.zeros(len(y), dtype=bool)
    flipped[chosen] = True
    return classes[new_codes], flipped


def plot_psmi(
    path: str | os.PathLike[str],
    psmi_mean: np.ndarray,
    groups: dict[str, np.ndarray] | None = None,
    title: str | None = None,
) -> Path:
    """Save a histogram of PSMI values, one colour per group of samples.

    Uses matplotlib's object-oriented API, which needs no display and
    leaves the pyplot state of the calling program alone.

    Parameters
    ----------
    path : str or path-like
        Image file; the extension (``.png``, ``.pdf``, ``.svg`` ...) picks the
        format.
    psmi_mean : ndarray of shape (n_samples,)
        PSMI of each sample.
    groups : dict of str to ndarray of bool, default=None
        Masks of the samples in each group, such as ``{"clean": ...,
        "flipped": ...}``. Groups are drawn as densities so that a small
        group stays visible beside a large one. By default, one group of all
        samples, drawn as counts.
    title : str, default=None
        Title of the plot.

    Returns
    -------
    path : Path
        The file written.
    """
    _import_optional("matplotlib", "demo", "Plotting")
    from matplotlib.figure import Figure

    values = np.asarray(psmi_mean, dtype=float)
    finite = values[np.isfinite(values)]
    bins: Any = np.histogram_bin_edges(finite, bins=50) if finite.size else 10
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    if groups is None:
        axes.hist(finite, bins=bins, color="tab:blue")
        axes.set_ylabel("samples")
    else:
        for name, mask in groups.items():
            chosen = values[np.asarray(mask, dtype=bool)]
            axes.hist(
                chosen[np.isfinite(chosen)],
                bins=bins,
                density=True,
                alpha=0.6,
                label=f"{name} ({int(np.sum(mask))})",
            )
        axes.set_ylabel("density")
        axes.legend()
    axes.set_xlabel("PSMI (nats)")
    if title:
        axes.set_title(title)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def _fit(
    X: np.ndarray, y: np.ndarray, n_workers: int, threads_per_worker: int, **params: Any
) -> tuple[Any, np.ndarray, np.ndarray, float]:
    """Fit PSMI on a LocalCluster of ``n_workers`` (none when 0)."""
    from psmi_dask import PSMI

    estimator = PSMI(**params)
    start = time.perf_counter()
    if n_workers == 0:
        psmi_mean, psmi_std, _ = estimator.fit_transform(X, y)
        return estimator, psmi_mean, psmi_std, time.perf_counter() - start

    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=":0",
            # Workers log a warning for every block released after the
            # stop; only errors are worth showing.
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster),
    ):
        start = time.perf_counter()
        psmi_mean, psmi_std, _ = estimator.fit_transform(X, y)
        seconds = time.perf_counter() - start
    return estimator, psmi_mean, psmi_std, seconds


def run_demo(
    output_dir: str | os.PathLike[str] = "psmi_demo",
    *,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    fraction: float = 0.05,
    flip_seed: int = 0,
    random_state: int = 0,
    n_samples: int | None = None,
    block_size: int = 500,
    max_n_estimators: int = 20_000,
    progress: bool = False,
) -> DemoResult:
    """Flip 5 % of the digits labels and find them again with PSMI.

    Loads scikit-learn's digits (1,797 images of 8 × 8 pixels, shipped with
    scikit-learn), flips a fraction of the labels to a different class,
    fits PSMI in auto mode on a local cluster, and scores "lowest PSMI
    first" as a detector of the flipped labels. Writes the per-sample
    results (``digits_psmi.csv``), a JSON record
    (``digits_psmi.csv.json``) and a histogram of PSMI for clean and
    flipped samples (``digits_psmi.png``) into ``output_dir``.

    Parameters
    ----------
    output_dir : str or path-like, default="psmi_demo"
        Directory for the results; created if missing. Files from an earlier
        demo are replaced.
    n_workers : int, default=2
        Worker processes of the LocalCluster the demo starts and closes.
        0 runs on dask's threaded scheduler in this process instead.
    threads_per_worker : int, default=1
        Threads of each worker.
    fraction : float, default=0.05
        Fraction of labels flipped.
    flip_seed : int, default=0
        Seed of the flips.
    random_state : int, default=0
        Seed of the directions.
    n_samples : int, default=None
        Use only the first ``n_samples`` digits (for quick checks). By
        default, all 1,797.
    block_size : int, default=500
        Directions per block (``min_n_estimators``).
    max_n_estimators : int, default=20_000
        Cap on the directions of the auto mode.
    progress : bool, default=False
        Show the estimator's progress display.

    Returns
    -------
    result : DemoResult
        The AUROC, the per-sample values and the files written.

    Notes
    -----
    Start it from a script under ``if __name__ == "__main__":``: the
    LocalCluster starts worker processes, which import the main module.
    """
    _import_optional("sklearn", "demo", "The demo")
    from sklearn.datasets import load_digits
    from sklearn.metrics import roc_auc_score

    X, true_labels = load_digits(return_X_y=True)
    if n_samples is not None:
        X, true_labels = X[:n_samples], true_labels[:n_samples]
    labels, flipped = flip_labels(true_labels, fraction, flip_seed)
    logger.info("flipped %d of %d labels", flipped.sum(), len(labels))

    estimator, psmi_mean, psmi_std, seconds = _fit(
        X,
        labels,
        n_workers,
        threads_per_worker,
        n_estimators="auto",
        min_n_estimators=block_size,
        max_n_estimators=max_n_estimators,
        random_state=random_state,
        progress=progress,
    )
    psmi_mean, psmi_std = np.asarray(psmi_mean), np.asarray(psmi_std)
    auroc = float(roc_auc_score(flipped, -psmi_mean))
    lowest = np.argsort(psmi_mean, kind="stable")[:10]

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = output_dir / "digits_psmi.csv"
    save_results(results, psmi_mean, psmi_std, labels=labels, overwrite=True)
    plot = plot_psmi(
        output_dir / "digits_psmi.png",
        psmi_mean,
        {"clean": ~flipped, "flipped": flipped},
        title=f"digits, {flipped.sum()} labels flipped: AUROC {auroc:.3f}",
    )
    record = {
        "command": "demo",
        "data": {
            "name": "sklearn.datasets.load_digits",
            "n_samples": int(X.shape[0]),
            "n_features": int(X.shape[1]),
            "fraction_flipped": fraction,
            "flip_seed": flip_seed,
            "flipped": np.flatnonzero(flipped),
            "true_labels_of_flipped": true_labels[flipped],
        },
        "auroc": auroc,
        "lowest": lowest,
        "cluster": {"n_workers": n_workers, "threads_per_worker": threads_per_worker},
        "timings": {"fit_seconds": seconds},
        "versions": package_versions(("scikit-learn",)),
        **estimator_record(estimator),
    }
    record_file = write_record(record_path(results), record)
    return DemoResult(
        auroc=auroc,
        psmi_mean=psmi_mean,
        psmi_std=psmi_std,
        labels=labels,
        true_labels=true_labels,
        flipped=flipped,
        lowest=lowest,
        n_estimators=int(estimator.n_estimators_),
        converged=bool(estimator.converged_),
        seconds=seconds,
        files={"results": results, "record": record_file, "plot": plot},
    )
