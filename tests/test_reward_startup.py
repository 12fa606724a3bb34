"""Rewards that would score nothing all run are refused at start-up, naming themselves (review
byo25): async and generator rewards (F12); a reward class whose constructor raises is named
with that exception (F7)."""
from __future__ import annotations

import functools

import pytest

from lit_covrl.reward_set import RewardSet


def plain(completion, answer):
    return float(completion == answer)


async def async_item(completion, answer):
    return 1.0


async def async_batched(completions, **kwargs):
    return [1.0 for _ in completions]


def generator(completion, answer):
    yield 1.0


async def async_generator(completion, answer):
    yield 1.0


class JudgeReward:
    def __init__(self, judge: str = "judge.bin"):
        raise RuntimeError(f"cannot load the judge model {judge}")

    def __call__(self, completion, answer):
        return 1.0


class AsyncScorer:
    async def __call__(self, completion, answer):
        return 1.0


@pytest.mark.parametrize("fn,name,kind", [
    (async_item, "async_item", "an async def function"),
    (async_batched, "async_batched", "an async def function"),
    (generator, "generator", "an item-level generator"),
    (async_generator, "async_generator", "an async generator"),
    (AsyncScorer(), "async_scorer", "an async def function"),
    (functools.partial(async_item, answer="1"), "partial", "an async def function"),
])
def test_async_and_generator_rewards_are_refused_naming_them(fn, name, kind):
    """Each call returned a coroutine or a generator, scored 0 as invalid on every item of every step
    while the run went on (review byo25 F12)."""
    with pytest.raises(TypeError, match=rf"^model.reward\[1\] '{name}' is {kind}: each call would give no score"):
        RewardSet([plain, fn])


def test_a_batched_generator_reward_is_scored_as_its_list():
    def batched_generator(completions, answers):
        yield from (float(c == a) for c, a in zip(completions, answers))

    assert RewardSet([batched_generator]).score(["1", "2"], ["1", "1"], timeout_s=None)[0] == [1.0, 0.0]


def _cli_error(capsys, tmp_path, reward: str) -> str:
    from lit_covrl.cli import main
    from tests.test_configs import QUICK

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICK), "--model.reward", reward, "--trainer.logger.init_args.save_dir",
              str(tmp_path)])
    return capsys.readouterr().err


def test_an_async_reward_is_refused_by_the_cli_naming_it(tmp_path, capsys):
    err = _cli_error(capsys, tmp_path, "tests.test_reward_startup.async_item")
    assert "model.reward[0] 'async_item' is an async def function" in err, err


@pytest.mark.parametrize("reward,key", [
    ('{"class_path": "tests.test_reward_startup.JudgeReward", "init_args": {"judge": "j.bin"}}', "model.reward"),
    ('[{"class_path": "tests.test_reward_startup.JudgeReward", "init_args": {"judge": "j.bin"}}]', "model.reward[0]"),
])
def test_a_reward_class_whose_constructor_raises_is_named_with_its_exception(reward, key, tmp_path, capsys):
    """A single reward by class_path said only "Expected a <class 'list'>. Got value: Namespace(...)",
    the first union member's type mismatch, hiding the constructor's own error (review byo25 F7)."""
    err = _cli_error(capsys, tmp_path, reward)
    assert (f"lit-covrl: error: {key}: tests.test_reward_startup.JudgeReward.__init__ raised RuntimeError: "
            "cannot load the judge model j.bin (LIT_COVRL_DEBUG") in err, err


def needs_level(completion, answer, level):
    return 1.0


def test_a_reward_needing_a_column_a_later_file_lacks_fails_at_start_up_naming_the_file(tiny_model_dir, tmp_path):
    """The rewards were bound on the first 64 rows only, all from a.jsonl here: every row of b.jsonl
    (no `level`) then scored 0 as a reward error, all run (review byo25 F5). Now one row of each set
    of columns is bound too, and the first row of the set that cannot fill the reward is named."""
    import json

    from lit_covrl.data import PromptDataModule
    from tests.helpers import fit
    from tests.test_module import make_module

    def rows(n, level):
        return "".join(json.dumps({"prompt": f"{i % 9}+1=", "answer": str(i % 9 + 1), **({"level": 1} if level else {})})
                       + "\n" for i in range(n))

    (tmp_path / "a.jsonl").write_text(rows(80, True))
    (tmp_path / "b.jsonl").write_text(rows(20, False))
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    module = make_module(tiny_model_dir, reward=needs_level)
    module.generate = None  # a rollout would fail with another error: none may happen
    with pytest.raises(TypeError, match=r"b.jsonl:1: model.reward 'needs_level' cannot be called as fn\(completion, "
                                        r"answer, \*\*columns\) \(missing a required argument: 'level'\); "
                                        r"the data's columns: none"):
        fit(module, PromptDataModule(task=None, train_files=files, batch_size=2), steps=1, limit_val_batches=0)

    def level_or_not(completion, answer, level=0):
        return 1.0

    module = make_module(tiny_model_dir, reward=level_or_not)
    fit(module, PromptDataModule(task=None, train_files=files, batch_size=2), steps=1, limit_val_batches=0)
    assert module.global_step == 1
