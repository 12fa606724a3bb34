"""Held-out evaluation on several ranks: each prompt is evaluated once, on one rank, and the ranks
stay in lock-step (the same number of sampling and scoring calls, both collectives) even when a
batch has fewer prompts than there are ranks."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lit_covrl.evaluation import Evaluator
from lit_covrl.metrics import PassAtK
from lit_covrl.settings import EvalSettings
from lit_covrl.types import PromptBatch
from tests import _dist

CORRECT = {"a", "b"}  # answers whose every sample is correct: pass@1 = 2 / 4 over the four prompts


class _Recorder:
    """Stand-in generate / score that answer every prompt with its own answer for CORRECT ones."""

    def __init__(self, nonfinite_prompts=()):
        self.generated: list[list[str]] = []
        self.scored: list[list[str]] = []
        self.nonfinite_prompts = set(nonfinite_prompts)  # their samples come from NaN logits

    def generate(self, prompts, n, *, temperature, generator):
        self.generated.append(list(prompts))
        rows = len(prompts) * n
        bad = torch.tensor([p in self.nonfinite_prompts for p in prompts for _ in range(n)])
        entropy = torch.where(bad.view(-1, 1), float("nan"), torch.ones(rows, 2))
        return SimpleNamespace(completions=["x"] * rows, entropy=entropy, response_mask=torch.ones(rows, 2),
                               nonfinite=bad)

    def score(self, completions, answers, prompts=None, columns=None, counted=True):
        """Every item of answer "c" a reward error (counted unless `counted` is False)."""
        self.scored.append(sorted(set(answers)))
        errors = sum(a == "c" for a in answers) if counted else 0
        return torch.tensor([1.0 if a in CORRECT else 0.0 for a in answers]), {"rollout/reward_errors": float(errors)}


def _batches():
    return [PromptBatch(["pa", "pb", "pc"], ["a", "b", "c"]), PromptBatch(["pd"], ["d"])]


def _run(rank: int, world: int):
    rec = _Recorder()
    ev = Evaluator(rec.generate, rec.score, PassAtK(2), EvalSettings(samples=2, k=2), correct_threshold=1.0, seed=0)
    ev.start(torch.device("cpu"), rank, world)
    for b in _batches():
        ev.step(b)
    return rec, ev


def test_each_prompt_is_evaluated_once_over_the_ranks_and_the_ranks_keep_in_step():
    (r0, e0), (r1, e1) = _run(0, 2), _run(1, 2)
    assert r0.generated == [["pa", "pc"], ["pd"]]
    assert r1.generated == [["pb"], ["pd"]]  # the one-prompt batch: sampled to keep in step, not counted
    assert len(r0.scored) == len(r1.scored) == 2
    counted = [int(e.pass_at_k.prompts) for e in (e0, e1)]
    assert counted == [3, 1]  # four prompts in all, each once
    pass1 = (e0.pass_at_k.pass1_sum + e1.pass_at_k.pass1_sum) / sum(counted)  # what torchmetrics' sum gives
    assert float(pass1) == pytest.approx(0.5)  # counting rank 1's copy of "d" would give 2 / 5
    (single, e), = [_run(0, 1)]
    assert single.generated == [["pa", "pb", "pc"], ["pd"]] and e.compute()["pass@1"] == pytest.approx(0.5)


def test_reward_errors_are_counted_over_the_evaluation_and_reset_at_its_start():
    """val/reward_errors: the scorer's counts (over all ranks) added up over the evaluation; a rank
    that scores only to keep in step asks the scorer to leave its items out (counted=False)."""
    _, ev = _run(0, 1)
    assert ev.compute()["reward_errors"] == 2  # prompt "pc" x 2 samples
    ev.start(torch.device("cpu"), 0, 1)
    assert ev.compute()["reward_errors"] == 0
    _, ev = _run(1, 2)
    ev.start(torch.device("cpu"), 1, 2)
    ev.step(PromptBatch(["pc"], ["c"]))  # rank 1 of 2 has no share: "pc" is scored, not counted
    assert ev.compute()["reward_errors"] == 0


def test_responses_from_nonfinite_logits_fail_and_are_counted():
    """A held-out response sampled from NaN / inf logits was scored on its text (a correct-looking one
    counted as solved) and its NaN entropy entered val/entropy (review newcomer24); now it is a
    failure, its entropy is left out, and val/nonfinite counts it."""
    rec = _Recorder(nonfinite_prompts={"pa"})
    ev = Evaluator(rec.generate, rec.score, PassAtK(2), EvalSettings(samples=2, k=2), correct_threshold=1.0, seed=0)
    ev.start(torch.device("cpu"), 0, 1)
    for b in _batches():
        ev.step(b)
    res = ev.compute()
    assert res["pass@1"] == pytest.approx(0.25)  # only "pb" of the four prompts is solved
    assert res["entropy"] == pytest.approx(1.0) and res["nonfinite"] == 2
    assert _run(0, 1)[1].compute()["nonfinite"] == 0


def test_rank_out_of_range_is_refused():
    rec = _Recorder()
    ev = Evaluator(rec.generate, rec.score, PassAtK(1), EvalSettings(), correct_threshold=1.0, seed=0)
    with pytest.raises(ValueError, match="rank 2 out of range for world size 2"):
        ev.start(torch.device("cpu"), 2, 2)


def answer_in_correct(completion: str, answer: str) -> float:
    """1 for the answers in CORRECT whatever was sampled; logs each scored answer per rank."""
    with open(Path(os.environ["EVAL_LOG"]) / f"scored{os.environ['RANK']}.txt", "a") as f:
        f.write(answer + "\n")
    return 1.0 if answer in CORRECT else 0.0


def _worker(rank: int, port: int, model_dir: str, train: str, val: str, out: str, sampling_batch_size) -> None:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule

    torch.set_num_threads(1)
    _dist.elastic_env(rank, 2, port)
    os.environ["EVAL_LOG"] = out
    module = GRPOModule(model=model_dir, reward=answer_in_correct,
                        rollout=dict(max_new_tokens=2, sampling_batch_size=sampling_batch_size), eval=dict(samples=2, k=2))
    data = PromptDataModule(task=None, train_files=[train], val_files=[val], batch_size=2, val_batch_size=3)
    res = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), logger=False,
                    enable_progress_bar=False, enable_model_summary=False).validate(module, data)
    Path(out, f"res{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("sampling_batch_size", [None, 2])
def test_two_ranks_share_the_held_out_prompts(tmp_path, tiny_model_dir, sampling_batch_size):
    """With model.rollout.sampling_batch_size 2 the 3-prompt batch gives rank 0 four rows (two
    sampler calls) and rank 1 two (one): rank 1 must make a second, uncounted call to keep in step
    (it used to raise 'needs the same number of rows on every rank')."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": "a"}) + "\n" for i in range(4)))
    val.write_text("".join(json.dumps({"prompt": f"{i}+2=", "answer": a}) + "\n" for i, a in enumerate("abcd")))  # batches 3 + 1
    _dist.spawn(_worker, (_dist.free_port(), tiny_model_dir, str(train), str(val), str(tmp_path), sampling_batch_size),
                timeout_s=240, what="the 2-process validation")
    scored = [sorted((tmp_path / f"scored{r}.txt").read_text().split()) for r in range(2)]
    assert scored == [["a", "a", "c", "c", "d", "d"], ["b", "b", "d", "d"]]  # 2 samples each
    for r in range(2):
        assert json.loads((tmp_path / f"res{r}.json").read_text())[0]["val/pass@1"] == pytest.approx(0.5)


@pytest.mark.parametrize("resumed", [False, True])
def test_a_test_run_after_a_fit_in_the_same_process_logs_at_the_fits_last_step(resumed, tmp_path):
    """`trainer.test()` after `trainer.fit()` in one process: test/* belong at the fit's last RL
    step (3 for a 4-step fit), as a CLI `test` of its checkpoint logs them. After a fit resumed
    from step 2 they landed at step 1 (the loaded checkpoint's), after a plain fit at step 4."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule
    from tests.helpers import fit, scalar_tags

    def parts():
        return (GRPOModule(model="lit_covrl:tiny-arith", rollout=dict(group_size=4, max_new_tokens=4)),
                PromptDataModule(task="arithmetic", batch_size=4, val_size=4, seed=0))

    ckpt_path = None
    if resumed:
        fit(*parts(), steps=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
            enable_checkpointing=True, default_root_dir=tmp_path)
        ckpt_path = str(tmp_path / "ck" / "last.ckpt")
    module, data = parts()
    logger = L.pytorch.loggers.TensorBoardLogger(str(tmp_path / "logs"), name="t")
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    trainer.test(module, data)
    tags = scalar_tags(tmp_path / "logs")
    assert [s for s, _ in tags["test/pass@1"]] == [3]
    assert max(s for s, _ in tags["policy/entropy"]) == 3


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_or_test_without_held_out_prompts_is_refused(tiny_model_dir, stage, tmp_path):
    """`lit-covrl validate` of a run trained on files without val_files printed no figure and
    exited 0 (Lightning's 'Total length of list across ranks is zero' the only output)."""
    import lightning as L

    from tests.test_module import make_data, make_module

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        max_steps=1, num_sanity_val_steps=0, default_root_dir=tmp_path)  # its checkpoints there
    module, empty = make_module(tiny_model_dir), make_data(val_size=0)
    with pytest.raises(ValueError, match=rf"nothing to {stage}: the data has no held-out prompts; set data.val_files"):
        getattr(trainer, stage)(module, empty)
    # held-out data given as dataloaders after a fit on data without any: evaluated (the first
    # version of this refusal looked at the fit's datamodule, still attached to the trainer)
    trainer.fit(module, empty)
    loader = make_data(val_size=4).val_dataloader()
    figures = getattr(trainer, stage)(module, dataloaders=loader)
    assert f"{'val' if stage == 'validate' else 'test'}/pass@1" in figures[0]
