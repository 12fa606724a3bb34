"""A model folder whose weights hold a NaN or an inf is refused at start-up with the model spec and
the first offending parameter, on the plain load path and on the sharded one (rank 0 loads, every
rank raises), instead of failing at the first rollout inside torch.multinomial."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lit_covrl.policy import check_finite_weights, load_policy
from tests import _dist
from tests.test_module import make_module

BAD = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny test model with one NaN and one inf in a parameter of its second layer."""
    out = tmp_path_factory.mktemp("nan_model")
    for f in Path(tiny_model_dir).iterdir():
        shutil.copy(f, out / f.name)
    model = load_policy(tiny_model_dir)
    with torch.no_grad():
        w = model.get_parameter(BAD)
        w[0, 0], w[3, 1] = float("nan"), float("inf")
    model.save_pretrained(out)
    return str(out)


def test_check_finite_weights_names_the_first_bad_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    check_finite_weights(model, "ok")  # finite: nothing raised
    with torch.no_grad():
        model[1].bias[0] = float("-inf")
    with pytest.raises(ValueError, match=r"model 'spec': parameter '1.bias' has 1 non-finite value\(s\) .* of 2"):
        check_finite_weights(model, "spec")


def test_policy_with_nan_weights_is_refused_at_load(nan_model_dir):
    module = make_module(nan_model_dir)
    with pytest.raises(ValueError, match=rf"model '{nan_model_dir}': parameter '{BAD}' has 2 non-finite"):
        module.configure_model()


def _load_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from lit_covrl.policy import empty_policy
    from lit_covrl.sharding import load_sharded

    _dist.elastic_env(rank, 2, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        load_sharded(lambda: load_policy(model_dir), lambda: empty_policy(model_dir), lambda m: None,
                     torch.device("cpu"))
        message = "loaded"
    except Exception as err:  # what each rank raised
        message = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(message)


@pytest.mark.slow
def test_sharded_load_of_nan_weights_raises_on_every_rank(nan_model_dir, tmp_path):
    _dist.spawn(_load_worker, (_dist.free_port(), nan_model_dir, str(tmp_path)), timeout_s=300, what="the sharded load")
    rank0, rank1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert rank0.startswith("ValueError") and BAD in rank0 and nan_model_dir in rank0, rank0
    assert rank1.startswith("RuntimeError: rank 0 could not load the model: ValueError") and BAD in rank1, rank1
