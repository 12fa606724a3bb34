"""Policy objectives (the base loss), chosen with `model.objective` (see base.py)."""
from lit_covrl.objectives.aspo import ASPO
from lit_covrl.objectives.base import Objective, PPOClip, resolve_objective
from lit_covrl.objectives.ce_gppo import CEGPPO
from lit_covrl.objectives.cispo import CISPO
from lit_covrl.objectives.gspo import GSPO

__all__ = ["ASPO", "CEGPPO", "CISPO", "GSPO", "Objective", "PPOClip", "resolve_objective"]
