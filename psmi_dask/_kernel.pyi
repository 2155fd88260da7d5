import numpy as np

def pmi_rows(
    projections: np.ndarray,
    codes: np.ndarray,
    means: np.ndarray,
    scales: np.ndarray,
    log_coef: np.ndarray,
    log_prior: np.ndarray,
    exp_table: np.ndarray,
    log_table: np.ndarray,
    pmi: np.ndarray,
    rows: int,
    n_directions: int,
    n_classes: int,
) -> None: ...
