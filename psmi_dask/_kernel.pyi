import numpy as np

def log_terms(
    projections: np.ndarray,
    codes: np.ndarray,
    means: np.ndarray,
    scales: np.ndarray,
    log_coef: np.ndarray,
    exp_table: np.ndarray,
    own: np.ndarray,
    total: np.ndarray,
    rows: int,
    n_directions: int,
    n_classes: int,
) -> None: ...
