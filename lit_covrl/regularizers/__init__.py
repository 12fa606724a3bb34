"""Entropy regularizers as Lightning callbacks (see base.py for the contract)."""
from lit_covrl.regularizers.aent import AEnt
from lit_covrl.regularizers.aepo import AEPO
from lit_covrl.regularizers.archer import Archer
from lit_covrl.regularizers.bapo import BAPO
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer
from lit_covrl.regularizers.covariance import ClipCov, KLCov
from lit_covrl.regularizers.dcpo import DCPOAdvantage, DCPOClip
from lit_covrl.regularizers.dense import EntropyBonus, ReferenceKL
from lit_covrl.regularizers.entropic import EntroPIC
from lit_covrl.regularizers.epo import EPO
from lit_covrl.regularizers.era import ERA
from lit_covrl.regularizers.entropy_selection import EntropyRatioClip, HighEntropyTokens, SteerWeights
from lit_covrl.regularizers.entropy_shaping import AdaptiveEntropyBonus, EntropyAdvantage
from lit_covrl.regularizers.lp_reg import LpReg
from lit_covrl.regularizers.outcome import OutcomeExploration
from lit_covrl.regularizers.probability import AdvantageReweighting, Lopti
from lit_covrl.regularizers.sample_weights import WeightedReinforce
from lit_covrl.regularizers.schedules import SCHEDULES, Schedule
from lit_covrl.regularizers.simko import SimKO
from lit_covrl.regularizers.trajectory_gtpo import TrajectoryGTPO
from lit_covrl.regularizers.siren import SIREN
from lit_covrl.regularizers.zvp import RLZVP

__all__ = [
    "AEPO",
    "AEnt",
    "AdaptiveEntropyBonus",
    "AdvantageReweighting",
    "Archer",
    "BAPO",
    "ClipCov",
    "DCPOAdvantage",
    "DCPOClip",
    "EPO",
    "ERA",
    "EntroPIC",
    "EntropyAdvantage",
    "EntropyBonus",
    "EntropyRatioClip",
    "HighEntropyTokens",
    "KLCov",
    "Lopti",
    "LpReg",
    "MiniBatchContext",
    "OutcomeExploration",
    "RLZVP",
    "ReferenceKL",
    "Regularizer",
    "SCHEDULES",
    "SIREN",
    "Schedule",
    "SimKO",
    "SteerWeights",
    "TrajectoryGTPO",
    "WeightedReinforce",
]
