"""ProRL's reference policy reset (Liu et al. 2025, arXiv 2505.24864): the frozen reference model
of a KL penalty is overwritten with the online policy's current weights, and the optimizer's
state is cleared, so that the KL term does not come to dominate a long run. `ReferenceKL`
(`reset_every`) calls these between RL steps.

The reference is `GRPOModule._reference`, a plain attribute that checkpoints leave out while it
is the loaded model; once reset it is no longer reproducible from `model.reference_model`, so
`ReferenceKL` saves its weights in its callback state from the first reset on.
"""
from __future__ import annotations

import torch


def check_same_layout(reference: torch.nn.Module, policy: torch.nn.Module, field: str) -> None:
    """Refuse a reference whose parameters (names and shapes) are not the policy's: a reset copies
    the policy into it tensor by tensor. `field` names the setting in the error."""
    ref = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    pol = {n: tuple(p.shape) for n, p in policy.named_parameters()}
    if ref != pol:
        diff = sorted(set(ref.items()) ^ set(pol.items()))[:3]
        raise ValueError(f"{field}: a reset copies the policy's weights into the reference model, but their "
                         f"parameters differ (first differences: {diff}); leave model.reference_model null "
                         "(a copy of model.model) or give it the policy's architecture")


@torch.no_grad()
def copy_policy_into(reference: torch.nn.Module, policy: torch.nn.Module) -> None:
    """reference <- policy, parameter by parameter, each cast to the reference's dtype (its device
    kept). The policy's buffers are left alone: they are constants of the architecture."""
    params = dict(policy.named_parameters())
    for name, ref_param in reference.named_parameters():
        ref_param.copy_(params[name].detach())


def clear_optimizer_state(optimizers) -> None:
    """Re-initialise every optimizer's per-parameter state (Adam's moments and step count start
    again at their first step); the parameter groups (learning rate, schedule) are kept."""
    for opt in optimizers:
        opt.state.clear()


def reference_weights(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's state dict on the CPU, for a checkpoint."""
    return {k: v.detach().cpu().clone() for k, v in reference.state_dict().items()}
