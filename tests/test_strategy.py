"""Strategy checks at start-up and activation checkpointing without sharding."""
from __future__ import annotations


import pytest
import torch
import yaml

from lit_covrl.settings import SystemSettings
from lit_covrl.sharding import FSDP2Strategy, check_strategy, decoder_layers
from tests.helpers import fit
from tests.test_configs import STACKS, _merge
from tests.test_module import make_data, make_module


def test_fsdp1_is_refused_with_the_alternative_named():
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="FSDPStrategy is not supported.*FSDP2Strategy"):
        check_strategy(FSDPStrategy(), SystemSettings())


def test_fsdp_mixed_precision_without_fsdp2_fails_at_start_up(tiny_model_dir):
    """A 1-GPU overlay that forgets to unset it would otherwise compute in fp32, silently."""
    module = make_module(tiny_model_dir, system=dict(fsdp_mixed_precision="bf16"))
    with pytest.raises(ValueError, match="model.system.fsdp_mixed_precision='bf16' needs trainer.strategy"):
        fit(module, make_data(), steps=1, limit_val_batches=0)
    assert module.policy is None  # before any model was loaded


def _strategy(spec):
    from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

    if isinstance(spec, dict):
        assert spec["class_path"] == "lit_covrl.sharding.FSDP2Strategy", spec
        return FSDP2Strategy(**spec.get("init_args", {}))
    return SingleDeviceStrategy("cpu") if spec == "auto" else StrategyRegistry.get(spec)


@pytest.mark.parametrize("name", sorted(k for k in STACKS if k.startswith(("paper/qwen", "fsdp/"))))
def test_gpu_recipes_as_written_pass_the_strategy_check(name):
    """The recipes' own strategy (test_configs overrides it to run on CPU): the base 7B recipe
    alone must already be FSDP2 (it was Lightning's FSDP1 `fsdp`, which cannot work)."""
    merged: dict = {}
    for path in STACKS[name]:
        _merge(merged, yaml.safe_load(path.read_text()))
    check_strategy(_strategy(merged["trainer"]["strategy"]), SystemSettings(**merged["model"].get("system", {})))


def test_activation_checkpointing_without_sharding_is_exact(tiny_model_dir):
    """Single process: the layers are wrapped, and recomputation changes nothing (same losses,
    same weights after 2 RL steps); the shared-prompt forward is off under it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    runs = {}
    for ac in (False, True):
        torch.manual_seed(0)
        module = make_module(
            tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), update=dict(grad_clip=None),
            system=dict(activation_checkpointing=ac),
        )
        trainer = fit(module, make_data(), steps=2, limit_val_batches=0)
        wrapped = [type(m) for m in module.policy.modules() if isinstance(m, CheckpointWrapper)]
        runs[ac] = (float(trainer.callback_metrics["policy/loss"]), module.policy.state_dict(), wrapped, module)
    assert runs[False][2] == [] and len(runs[True][2]) == len(decoder_layers(runs[False][3].policy))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5, abs=1e-7)
    from lit_covrl.policy import load_policy

    init = load_policy(tiny_model_dir).state_dict()
    assert max((runs[False][1][k] - v).abs().max().item() for k, v in init.items()) > 1e-3  # it trained
    strip = "._checkpoint_wrapped_module"
    got = {k.replace(strip, ""): v for k, v in runs[True][1].items()}
    for k, v in runs[False][1].items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
