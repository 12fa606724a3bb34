"""DAPO dynamic sampling: re-padding and choosing groups (hand-worked), fresh prompts as a pure
function of the step, and a short fit whose batches end up full of informative groups."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_covrl import distributed
from lit_covrl.data import PromptDataModule
from lit_covrl.dynamic_sampling import Round, assemble, choose_groups, concat_rollouts, sample_rounds
from lit_covrl.types import PromptBatch, Rollout
from tests._dist import free_port
from tests.helpers import fit
from tests.test_module import make_module

PAD = 0


def _rollout(prompt_len: int, resp_len: int, n: int, base: int) -> Rollout:
    ids = torch.arange(base, base + n * (prompt_len + resp_len)).view(n, prompt_len + resp_len)
    m = torch.ones(n, resp_len)
    return Rollout(ids, torch.ones_like(ids), m, -m, 2 * m, torch.zeros(n, dtype=torch.bool),
                   [f"c{base}-{i}" for i in range(n)])


def test_concat_rollouts_left_pads_prompts_and_right_pads_responses():
    a = _rollout(prompt_len=2, resp_len=3, n=2, base=10)  # rows [10..14], [15..19]
    b = _rollout(prompt_len=4, resp_len=1, n=2, base=50)  # rows [50..54], [55..59]
    out = concat_rollouts([(a, torch.tensor([1])), (b, torch.tensor([0]))], PAD)
    # P = 4, T = 3: a's row 1 = prompt [15, 16] -> [0, 0, 15, 16], response [17, 18, 19]
    #               b's row 0 = prompt [50..53], response [54] -> [54, 0, 0]
    assert out.input_ids.tolist() == [[0, 0, 15, 16, 17, 18, 19], [50, 51, 52, 53, 54, 0, 0]]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
    assert out.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out.logp.tolist() == [[-1, -1, -1], [-1, 0, 0]] and out.entropy.tolist() == [[2, 2, 2], [2, 0, 0]]
    assert out.completions == ["c10-1", "c50-0"] and out.truncated.tolist() == [False, False]


def _round(rewards: list[float], G: int, base: int) -> Round:
    B = len(rewards) // G
    batch = PromptBatch([f"p{base + i}" for i in range(B)], [f"a{base + i}" for i in range(B)], index=7)
    return Round(batch, _rollout(2, 1, len(rewards), base * 100), torch.tensor(rewards))


def test_choose_groups_takes_informative_groups_in_generation_order_then_fills():
    G = 2
    r0 = _round([0, 0, 1, 0, 1, 1], G, 0)  # groups: flat, informative, flat
    r1 = _round([1, 0, 0, 0, 0, 1], G, 10)  # informative, flat, informative
    assert choose_groups([r0, r1], 3, G) == [(0, 1), (1, 0), (1, 2)]
    assert choose_groups([r0, r1], 2, G) == [(0, 1), (1, 0)]
    # not enough informative groups: complete with the first round's uninformative ones
    assert choose_groups([r0], 3, G) == [(0, 1), (0, 0), (0, 2)]
    out = assemble([r0, r1], choose_groups([r0, r1], 3, G), G, PAD)
    assert out.batch.prompts == ["p1", "p10", "p12"] and out.batch.answers == ["a1", "a10", "a12"]
    assert out.rewards.tolist() == [1, 0, 1, 0, 0, 1] and out.batch.index == 7
    assert out.rollout.input_ids.shape == (6, 3)
    assert out.scores.tolist() == out.rewards.tolist()  # no scores given: the rewards
    r0.scores, r1.scores = torch.tensor([5, 5, 6, 5, 6, 6]), torch.tensor([6, 5, 5, 5, 5, 6])  # before a penalty
    assert assemble([r0, r1], choose_groups([r0, r1], 3, G), G, PAD).scores.tolist() == [6, 5, 6, 5, 5, 6]


def test_assemble_keeps_the_columns_of_rounds_that_have_them():
    # round 1's rows carry no extra columns (an optional field absent from those rows): the chosen
    # rows of round 0 must keep theirs, round 1's get {} (dropping all of them broke column rewards)
    G = 2
    r0, r1 = _round([0, 1, 0, 0], G, 0), _round([1, 0, 0, 0], G, 10)
    r0.batch.columns = [{"solution": "s0"}, {"solution": "s1"}]
    out = assemble([r0, r1], [(0, 0), (1, 0), (0, 1)], G, PAD)
    assert out.batch.columns == [{"solution": "s0"}, {}, {"solution": "s1"}]
    assert assemble([r1], [(0, 0)], G, PAD).batch.columns == []  # no columns anywhere: still []


def _two_rounds(rank: int) -> list[Round]:
    """Round 0 decodes 1 response token on both ranks, round 1 decodes 3 (rounds run in lock-step):
    rank 0's first round is all informative, rank 1's has nothing informative."""
    r0 = [[0, 1, 1, 0], [0, 0, 1, 1]][rank]
    first = Round(PromptBatch(["p0", "p1"], ["a", "a"], index=0), _rollout(2, 1, 4, 0), torch.tensor(r0, dtype=torch.float))
    second = Round(PromptBatch(["q0", "q1"], ["a", "a"], index=0), _rollout(2, 3, 4, 100), torch.tensor([1.0, 0, 0, 1]))
    return [first, second]


def test_assembled_width_is_the_widest_round_even_if_no_group_comes_from_it():
    rounds = _two_rounds(rank=0)
    out = assemble(rounds, [(0, 0), (0, 1)], 2, PAD)  # both groups from the 1-token round
    assert out.rollout.response_mask.shape == (4, 3)  # padded to round 1's width, as on every rank
    assert out.rollout.response_mask.tolist() == [[1, 0, 0]] * 4
    assert out.rollout.logp.tolist() == [[-1, 0, 0]] * 4


def _width_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rounds = iter(_two_rounds(rank))
        out, stats = sample_rounds(PromptBatch(["p0", "p1"], ["a", "a"], index=0), lambda b: (next(rounds), {}),
                                   lambda i: None, group_size=2, max_rounds=2, pad_token_id=PAD)
        full, _ = distributed.gather_rows(out.rollout.response_mask)  # fails on unequal widths
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{stats['rollout/gen_rounds']} {out.rollout.response_mask.shape[1]} {tuple(full.shape)}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_drawing_from_different_rounds_can_gather(tmp_path):
    """Rank 0 keeps its first-round groups (width 1), rank 1 needs the second round (width 3): both
    must come out at the same width or every cross-rank gather of the step fails."""
    mp.start_processes(_width_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "2.0 3 (8, 3)"


def test_regen_batches_are_fresh_and_a_pure_function_of_the_step():
    dm = PromptDataModule(task="arithmetic", batch_size=4, val_size=0, seed=3)
    dm.setup("fit")
    first = dm.regen_batch(5, 1, 4)
    assert first.prompts == PromptDataModule(task="arithmetic", batch_size=4, val_size=0, seed=3).regen_batch(5, 1, 4).prompts
    others = [dm.regen_batch(5, 2, 4).prompts, dm.regen_batch(6, 1, 4).prompts, dm.batch_at(5).prompts]
    assert all(first.prompts != o for o in others) and first.index == 5


class OddAnswersOnly:
    """Informative only for prompts whose answer is odd: constant 0 for even answers, else the
    fraction of '1' characters (varies across samples)."""

    def __call__(self, completion: str, answer: str) -> float:
        if int(answer) % 2 == 0:
            return 0.0
        return completion.count("1") / max(len(completion), 1)


def test_dynamic_sampling_fills_the_batch_with_informative_groups(tiny_model_dir):
    import lightning as L

    steps = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    module = make_module(
        tiny_model_dir, reward=OddAnswersOnly(), reward_timeout_s=None,
        rollout=dict(filter_groups=True, max_gen_rounds=6, max_new_tokens=6),
    )
    sampled = []  # response tokens sampled per RL step, every round
    generate = module.generate

    def counting(*args, **kwargs):
        rollout = generate(*args, **kwargs)
        sampled[-1] += int(rollout.response_mask.sum())
        return rollout

    module.generate = counting

    class Count(L.Callback):
        def on_train_batch_start(self, *args):
            sampled.append(0)

    dm = PromptDataModule(task="arithmetic", batch_size=4, val_size=0, seed=0)
    fit(module, dm, steps=3, callbacks=[Count(), Recorder()], limit_val_batches=0)
    assert max(s["rollout/gen_rounds"] for s in steps) > 1  # at least one step needed more prompts
    for s, n in zip(steps, sampled):  # every round's tokens over every round's time (was: the batch's)
        assert s["rollout/tokens_per_s"] == pytest.approx(n / s["time/rollout_s"], rel=1e-4)
    full = [s for s in steps if s["rollout/gen_rounds"] < 6]
    assert full and all(s["rollout/zero_var_group_frac"] == 0.0 for s in full)
    assert all(s["policy/kept_frac"] == 1.0 for s in full)  # nothing left to filter


def test_sample_rounds_stops_when_the_batch_is_informative_and_averages_reward_means():
    """Round 0: groups flat, informative, flat; round 1: informative, flat, informative -> 3 of 3
    after two rounds. Reward errors add up (1 + 2), per-reward means are averaged ((0.2 + 0.4) / 2)."""
    from lit_covrl.dynamic_sampling import sample_rounds

    G = 2
    made = [_round([0, 0, 1, 0, 1, 1], G, 0), _round([1, 0, 0, 0, 0, 1], G, 10), _round([1, 0, 1, 0, 1, 0], G, 20)]
    stats = [{"rollout/reward_errors": 1.0, "rollout/reward/r": 0.2}, {"rollout/reward_errors": 2.0, "rollout/reward/r": 0.4},
             {"rollout/reward_errors": 0.0, "rollout/reward/r": 0.9}]
    asked = []

    def run_round(b):
        i = len(asked)
        asked.append(b.prompts[0])
        return made[i], stats[i]

    out, s = sample_rounds(made[0].batch, run_round, lambda r: made[r].batch, group_size=G, max_rounds=5, pad_token_id=PAD)
    assert asked == ["p0", "p10"]  # no third round: 3 informative groups after two
    assert out.batch.prompts == ["p1", "p10", "p12"]
    assert s == {"rollout/reward_errors": 3.0, "rollout/reward/r": pytest.approx(0.3), "rollout/gen_rounds": 2.0}
    asked.clear()
    out, s = sample_rounds(made[0].batch, run_round, lambda r: made[r].batch, group_size=G, max_rounds=1, pad_token_id=PAD)
    assert asked == ["p0"] and out is made[0] and s["rollout/gen_rounds"] == 1.0
