"""The weak predictors of WeakNAS: scikit-learn regressors on one-hot architecture features.

A predictor is fitted on the architectures queried so far with their scores z-scored by the mean and std
of those queried scores only (WeakNAS's code normalises with the whole table's statistics, a small leak
of unqueried labels), and then ranks every candidate.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor
from threadpoolctl import threadpool_limits

from jobs.nas.config import GbtPredictorConfig, MlpPredictorConfig, RfPredictorConfig


def make_regressor(cfg: MlpPredictorConfig | GbtPredictorConfig | RfPredictorConfig, seed: int):
    if cfg.kind == "mlp":
        return MLPRegressor(hidden_layer_sizes=tuple(cfg.hidden_sizes), max_iter=cfg.max_iter, random_state=seed)
    if cfg.kind == "gbt":
        return GradientBoostingRegressor(n_estimators=cfg.num_trees, max_depth=cfg.max_depth, learning_rate=cfg.learning_rate, random_state=seed)
    return RandomForestRegressor(n_estimators=cfg.num_trees, max_depth=cfg.max_depth, random_state=seed, n_jobs=1)


def zscore(scores: np.ndarray) -> np.ndarray:
    """Labels for the fit: standardised with the queried scores' own mean and std."""
    std = scores.std()
    return (scores - scores.mean()) / (std if std > 0 else 1.0)


def fit_predict(cfg, features_NF: np.ndarray, queried: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
    """Fit on ``features_NF[queried]`` -> z-scored ``scores``; predictions (N,) for every candidate."""
    model = make_regressor(cfg, seed)
    # One BLAS/OpenMP thread: these models are small, and the driver shares its cores with trials (with
    # several threads on a busy machine, spin-waiting made fits up to 100x slower than on one).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # A weak predictor is meant to be cheap: stopping at max_iter before convergence is the method.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features_NF[queried], zscore(np.asarray(scores, dtype=np.float64)))
        return model.predict(features_NF)
