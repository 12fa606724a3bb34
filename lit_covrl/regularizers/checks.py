"""Start-up checks of the regularizers: the stack of a run (`check_stack`, `check_objective_stack`,
`check_lookalikes`), the constructors' argument checks and the on-policy warning. base.py re-exports
them, so imports from lit_covrl.regularizers.base keep working."""
from __future__ import annotations

import inspect
import logging
import math
from typing import TYPE_CHECKING

from lit_covrl.regularizers.schedules import Schedule
from lit_covrl.types import ForwardAsks

if TYPE_CHECKING:
    from lit_covrl.regularizers.base import Regularizer

log = logging.getLogger("lit_covrl")


def check_unique_names(regularizers: list[Regularizer]) -> None:
    """Each regularizer logs under reg/<name>/ and keeps its state under its name: two with the same
    name would overwrite each other's metrics (and clash in checkpoints), so refuse them at start-up."""
    seen: dict[str, int] = {}
    for i, reg in enumerate(regularizers):
        if reg.name in seen:
            first = regularizers[seen[reg.name]]
            raise ValueError(
                f"two regularizers are named {reg.name!r} (regularizers [{seen[reg.name]}] {type(first).__name__} and "
                f"[{i}] {type(reg).__name__}, in callback order): give one its own init_args.name, "
                f"e.g. name: {reg.name}_2"
            )
        seen[reg.name] = i


def check_stack(regularizers: list[Regularizer]) -> None:
    """Start-up checks of the stacked regularizers: unique names, at most one that shifts the
    advantage (each keeps |shift| < |A| on its own, so A never flips sign; two shifts add up and can
    flip it: two EntropyAdvantage with kappa 1.5 turn negative advantages positive) and at most one
    that sets a per-token clip range (a token has one clip range: two would have to be merged by a
    rule neither defines), and one value of each request of the training forward (`ForwardAsks.of`:
    two regularizers asking for different min-p thresholds, nuclei, logit scales or clamp_p), and
    at most one that draws extra responses (`draws_rollout`: both would replace the same rows), one
    that computes the advantages (`replaces_advantages`), at most one that splits the update into
    phases (`update_phases`), no advantage computer, outcome shaper or drawer beside the one that
    sets the all-equal groups' advantage (`check_equal_groups`: RLZVP), and
    no outcome shaper (`shapes_outcome`) beside one that reads A > 0 as correct (`reads_sign_as_correct`)."""
    for reg in regularizers:
        reg._check_initialized()
    check_unique_names(regularizers)
    shifting = [r for r in regularizers if r.shifts_advantage]
    if len(shifting) > 1:
        raise ValueError(
            f"{len(shifting)} regularizers shift the advantage "
            f"({', '.join(f'{r.name!r} ({type(r).__name__})' for r in shifting)}): their shifts add up and can flip "
            "the advantage's sign; keep one shift (of two EntropyAdvantage, one with a larger alpha; TrajectoryGTPO "
            "shifts nothing with entropy_scale 0)"
        )
    ForwardAsks.of(regularizers)  # one request of each kind for the training forward, else refused
    outcome = [r for r in regularizers if r.shapes_outcome]
    if len(outcome) > 1:
        raise ValueError(f"{len(outcome)} regularizers shape the outcome rewards "
                         f"({', '.join(repr(r.name) for r in outcome)}): keep one")
    sign = [r for r in regularizers if r.reads_sign_as_correct]
    if outcome and sign:
        raise ValueError(
            f"{type(outcome[0]).__name__} ({outcome[0].name!r}) and {type(sign[0]).__name__} ({sign[0].name!r}) "
            f"cannot be stacked: {type(sign[0]).__name__} reads A > 0 as a verified-correct response, and the outcome "
            "terms move advantages away from correctness (wrong answers can get A > 0 and right ones A < 0, with "
            "either apply; responses: correct still where right answers differ in outcome, as MathVerifyReward's "
            "forms of one value); keep one")
    drawing = [r for r in regularizers if r.draws_rollout]
    if len(drawing) > 1:
        raise ValueError(
            f"{len(drawing)} regularizers draw extra responses ({', '.join(repr(r.name) for r in drawing)}): "
            "each would replace the same first rows of the rollout; keep one"
        )
    replacing = [r for r in regularizers if r.replaces_advantages]
    if len(replacing) > 1:
        raise ValueError(f"{len(replacing)} regularizers compute the advantages "
                         f"({', '.join(repr(r.name) for r in replacing)}): keep one")
    check_equal_groups(regularizers)
    phased = [r for r in regularizers if r.update_phases > 1]
    if len(phased) > 1:
        raise ValueError(f"{len(phased)} regularizers split the update into phases "
                         f"({', '.join(repr(r.name) for r in phased)}): each asks for its own; keep one")
    clipping = [r for r in regularizers if r.sets_clip_range]
    if len(clipping) > 1:
        raise ValueError(
            f"{len(clipping)} regularizers set a per-token clip range "
            f"({', '.join(f'{r.name!r} ({type(r).__name__})' for r in clipping)}): a token has one clip range and "
            "neither says how to merge them; keep one"
        )


def check_equal_groups(regularizers: list[Regularizer]) -> None:
    """A regularizer that sets the advantage of the groups whose rewards are all equal
    (`shapes_equal_groups`: RLZVP) beside one that gives those groups advantages of its own, or
    replaces rows of them: refused at start-up, naming both (one would overwrite the other)."""
    owner = next((r for r in regularizers if r.shapes_equal_groups), None)
    if owner is None:
        return
    for r in regularizers:
        why = ("computes the advantages, nonzero on a prompt's equal-reward group once it had unequal ones"
               if r.replaces_advantages else
               "shapes the rewards or advantages by outcome, which gives equal-reward groups advantages"
               if r.shapes_outcome else
               "puts extra responses of advantage 1 in place of rollout rows" if r.draws_rollout else None)
        if why is not None:
            raise ValueError(
                f"{type(owner).__name__} ({owner.name!r}) and {type(r).__name__} ({r.name!r}) cannot be stacked: "
                f"{type(owner).__name__} sets the advantage of every group whose rewards are all equal, and "
                f"{type(r).__name__} {why}; keep one")


def check_objective_stack(objective, regularizers: list[Regularizer], where: str = "model.objective.init_args") -> None:
    """The objective against the regularizers' per-token clip range (GSPO takes none; CE-GPPO's
    dual-clip bound on beta1 (1 - eps_low)) and against each regularizer's own
    `check_objective` (SimKO: token-level objectives only): refused at start-up, naming both.
    The objective's own clip_low / clip_high set away from their defaults (under `where`:
    model.loss for the default PPOClip) are replaced on every token by such a range: a warning."""
    for reg in regularizers:
        if reg.sets_clip_range:
            objective.check_token_clip(*reg.clip_values(), owner=f"{type(reg).__name__} (regularizer {reg.name!r})")
            defaults = inspect.signature(type(objective).__init__).parameters
            for key in ("clip_low", "clip_high"):
                p = defaults.get(key)
                if p is not None and hasattr(objective, key) and getattr(objective, key) != p.default:
                    log.warning("%s.%s=%r has no effect: %s (regularizer %r) sets every token's clip range in place "
                                "of the objective's (set the range in its init_args)", where, key,
                                getattr(objective, key), type(reg).__name__, reg.name)
        reg.check_objective(objective)


def update_phases(regularizers: list[Regularizer]) -> int:
    """How many times a rollout's update schedule runs: the phase-splitting regularizer's
    `update_phases` (Lopti's 2; `check_stack` allows one), else 1."""
    return max([r.update_phases for r in regularizers], default=1)


def warn_inert_on_policy(reg: Regularizer, pl_module, why: str) -> None:
    """A warning, once per regularizer, when every update of a rollout is on policy (one update per
    rollout), where a control that compares the current policy with the rollout's does nothing."""
    if getattr(pl_module, "updates_per_rollout", None) == 1 and not getattr(reg, "_warned_inert", False):
        reg._warned_inert = True
        log.warning("%s has no effect with a single on-policy update per rollout: %s. "
                    "Use several mini-batches or ppo_epochs > 1.", type(reg).__name__, why)


def check_ratio(field_name: str, value: float) -> None:
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{field_name} must be in (0, 1], got {value!r}")


def check_scheduled_ratio(field_name: str, schedule: Schedule) -> None:
    """A schedule that anneals a ratio must end in [0, 1] (0 switches the control off)."""
    if schedule.name != "constant" and schedule.final > 1.0:
        raise ValueError(f"{field_name}: schedule.final must be in [0, 1] (a fraction of tokens), got {schedule.final!r}")


def check_nonnegative(field_name: str, value: float) -> None:
    """A finite number >= 0 (NaN and inf are refused: a NaN coefficient skipped every update as
    non-finite, a NaN target switched a controller off, silently)."""
    check_number(field_name, value)


def check_number(owner_field: str, value, *, low: float = 0.0, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, must: str | None = None) -> float:
    """`value` as a float if it is a finite int or float (not a bool) from `low` to `high` (either end
    excluded when open), else a ValueError "<owner_field>=<value!r> is invalid: must be <must>";
    `must` defaults to "a finite number" and the range: ">= low" (or "> low") when `high` is inf,
    else "in [low, high]" with a "(" or ")" at an open end."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
    if not ok:
        if must is None:
            if high == math.inf:
                must = f"a finite number {'>' if low_open else '>='} {low:g}"
            else:
                must = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{owner_field}={value!r} is invalid: must be {must}")
    return float(value)


def check_lookalikes(callbacks: list) -> None:
    """A callback with `prepare` and `shape` methods that is no `Regularizer` subclass is never
    asked for them (the learner collects Regularizer instances): refuse it rather than train as if
    it were not there."""
    from lit_covrl.regularizers.base import Regularizer  # base.py imports this module

    for cb in callbacks:
        if not isinstance(cb, Regularizer) and callable(getattr(cb, "shape", None)) and callable(getattr(cb, "prepare", None)):
            raise ValueError(f"trainer.callbacks: {type(cb).__name__} has prepare() and shape() like a regularizer but "
                             "does not subclass lit_covrl.regularizers.Regularizer, so it would be ignored; subclass it")
