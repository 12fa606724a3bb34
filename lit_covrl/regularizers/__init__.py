"""Entropy regularizers as Lightning callbacks (see base.py for the contract)."""
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer
from lit_covrl.regularizers.covariance import ClipCov, KLCov
from lit_covrl.regularizers.dense import EntropyBonus, ReferenceKL
from lit_covrl.regularizers.schedules import SCHEDULES, Schedule

__all__ = [
    "ClipCov",
    "EntropyBonus",
    "KLCov",
    "MiniBatchContext",
    "ReferenceKL",
    "Regularizer",
    "SCHEDULES",
    "Schedule",
]
