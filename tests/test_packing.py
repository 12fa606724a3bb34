"""No compute on padding (lit_covrl.packing): trimming a micro-batch to its own extent and
cutting micro-batches from length-sorted rows change no result, and the forwards see fewer columns."""
from __future__ import annotations

import pytest
import torch

from lit_covrl.packing import length_order, trim_padding
from lit_covrl.policy import load_policy, response_logprobs

PAD = 0


def _rollout_rows(prompts: list[list[int]], responses: list[list[int]]):
    """Left-padded prompts + right-padded responses, as a sampler lays them out."""
    P, T = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((len(prompts), P + T), PAD)
    att = torch.zeros((len(prompts), P + T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p)
        att[i, P - len(p):P] = 1
        ids[i, P:P + len(r)] = torch.tensor(r)
        att[i, P:P + len(r)] = 1
    return ids, att, T


def test_trim_padding_hand_worked():
    # prompts of 2 and 3 tokens in a rollout whose longest prompt is 5 (P = 5): the first 2 columns
    # are padding in both rows; responses of 1 and 2 tokens in a rollout with T = 6: the last 4
    # response columns are padding in both rows
    ids = torch.tensor([[0, 0, 0, 4, 5, 6, 0, 0, 0, 0, 0],
                        [0, 0, 7, 8, 9, 6, 6, 0, 0, 0, 0]])
    att = (ids != 0).long()
    t_ids, t_att, kept = trim_padding(ids, att, response_len=6)
    assert kept == 2
    assert t_ids.tolist() == [[0, 4, 5, 6, 0], [7, 8, 9, 6, 6]]
    assert t_att.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # nothing to drop: unchanged
    full = torch.ones(2, 4, dtype=torch.long)
    assert trim_padding(full, full, 2)[2] == 2 and trim_padding(full, full, 2)[0].shape == (2, 4)
    # always one prompt column and one response column left, even when they are padding
    z = torch.zeros(1, 5, dtype=torch.long)
    z_att = torch.tensor([[0, 0, 0, 0, 0]])
    assert trim_padding(z, z_att, 2)[0].shape == (1, 5)  # nothing real at all: untouched
    one = torch.tensor([[0, 0, 1, 0, 0]])  # the last prompt column only
    t, _, k = trim_padding(one, one, 2)
    assert t.shape == (1, 2) and k == 1
    # min_response: that many response columns stay (FSDP lock-step of the shared-prompt split)
    t_ids, _, kept = trim_padding(ids, att, response_len=6, min_response=3)
    assert kept == 3 and t_ids.tolist() == [[0, 4, 5, 6, 0, 0], [7, 8, 9, 6, 6, 0]]
    assert trim_padding(full, full, 2, min_response=5)[2] == 2  # never more than there are


def test_ranks_whose_responses_end_after_one_token_run_the_same_forwards(tiny_model_dir, monkeypatch):
    """With several ranks, shared_prompt and skip_padding, every micro-batch must issue the same
    forwards on every rank (FSDP collectives): a rank whose rows all stop after one token used to be
    trimmed to one response column and skip the tail forward that the other ranks ran (a hang)."""
    from lit_covrl import distributed
    from lit_covrl.learner import Learner, LearnerSettings
    from lit_covrl.objectives import PPOClip
    from lit_covrl.settings import LossSettings, RolloutSettings, UpdateSettings

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    model = load_policy(tiny_model_dir)
    settings = LearnerSettings(RolloutSettings(group_size=2, max_new_tokens=3), LossSettings(),
                               UpdateSettings(micro_batch_size=4), shared_prompt=True, skip_padding=True)
    learner = Learner(model, settings, PPOClip(), [], driver=None)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    forwards = {}
    try:
        for n in (1, 3):  # one rank's rows stop after 1 token, the other's after 3
            ids, att, _ = _rollout_rows([[5, 6, 7]] * 4, [[8] * n] * 3 + [[9] * n])
            pad = torch.zeros(4, 3 - n, dtype=torch.long)  # the rollout's width T = 3 on every rank
            ids, att = torch.cat([ids, pad], 1), torch.cat([att, pad], 1)
            calls.clear()
            with torch.no_grad():
                lp = learner.logprobs(model, ids, att, att[:, -3:].float())
            forwards[n] = len(calls)
            ref = response_logprobs(model, ids, att, 3).logp
            torch.testing.assert_close(lp, ref * att[:, -3:], rtol=1e-5, atol=1e-6)
    finally:
        hook.remove()
    assert forwards == {1: 2, 3: 2}


def test_length_order_rows_and_groups():
    att = torch.tensor([[1] * n + [0] * (6 - n) for n in (2, 5, 3, 5, 1, 4)])
    assert length_order(att).tolist() == [1, 3, 5, 2, 0, 4]  # ties (rows 1, 3) keep their order
    # groups [0,0,1,1,2,2]: longest rows 5, 5, 4 -> blocks 0, 1, 2; rows longest first inside
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert length_order(att, groups).tolist() == [1, 0, 3, 2, 5, 4]
    groups = torch.tensor([0, 0, 0, 1, 1, 1])  # longest 5 and 5: block 0 first (tie keeps order)
    assert length_order(att, groups).tolist() == [1, 2, 0, 3, 5, 4]


def test_trimmed_logprobs_equal_the_untrimmed_ones(tiny_model_dir):
    """Same log-probs and entropies (to float rounding) on the trimmed micro-batch as on the full
    rollout layout, gradients included."""
    torch.manual_seed(0)
    model = load_policy(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(3, 15, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rnd(n) for n in (3, 4, 2)] + [rnd(9)]
    responses = [rnd(n) for n in (2, 1, 3)] + [rnd(12)]
    ids, att, T = _rollout_rows(prompts, responses)
    rows = torch.arange(3)  # a micro-batch without the long row: 5 of 9 prompt, 9 of 12 response columns are padding
    full_lp, full_ent = response_logprobs(model, ids[rows], att[rows], T, with_entropy=True)[:2]
    t_ids, t_att, kept = trim_padding(ids[rows], att[rows], T)
    assert t_ids.shape[1] == 4 + 3 and kept == 3
    lp, ent = response_logprobs(model, t_ids, t_att, kept, with_entropy=True)[:2]
    mask = att[rows, -T:].float()
    torch.testing.assert_close(lp * mask[:, :kept], full_lp[:, :kept] * mask[:, :kept], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent * mask[:, :kept], full_ent[:, :kept] * mask[:, :kept], rtol=1e-5, atol=1e-6)
    assert (mask[:, kept:] == 0).all()
    (lp * mask[:, :kept]).sum().backward()
    g_trim = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (full_lp * mask).sum().backward()
    for a, b in zip(g_trim, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_learner_forwards_skip_padding_and_keep_the_result(tiny_model_dir, shared_prompt):
    """The learner's no-grad forward with micro-batches of 2 (sorted, trimmed) equals one forward
    over all rows in the rollout's layout, row for row, and its forwards see fewer columns."""
    from lit_covrl.learner import Learner, LearnerSettings
    from lit_covrl.objectives import PPOClip
    from lit_covrl.settings import LossSettings, RolloutSettings, UpdateSettings

    torch.manual_seed(0)
    model = load_policy(tiny_model_dir)
    g = torch.Generator().manual_seed(2)
    rnd = lambda n: torch.randint(3, 15, (n,), generator=g).tolist()  # noqa: E731
    p1, p2 = rnd(2), rnd(6)
    prompts = [p1] * 3 + [p2] * 3  # two groups of G = 3
    responses = [rnd(n) for n in (1, 10, 2, 3, 1, 2)]
    ids, att, T = _rollout_rows(prompts, responses)
    mask = att[:, -T:].float()
    settings = LearnerSettings(RolloutSettings(group_size=3, max_new_tokens=T), LossSettings(),
                               UpdateSettings(micro_batch_size=2, grad_clip=None),
                               shared_prompt=shared_prompt, skip_padding=True)
    learner = Learner(model, settings, PPOClip(), [], driver=None)
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        lp = learner.logprobs(model, ids, att, mask)
    finally:
        hook.remove()
    ref = response_logprobs(model, ids, att, T).logp
    torch.testing.assert_close(lp, ref * mask, rtol=1e-5, atol=1e-6)
    assert max(widths) < ids.shape[1] and sum(widths) < 3 * ids.shape[1]


def _fit_run(tiny_model_dir, tmp_path, *, skip_padding: bool):
    """3 RL steps, 2 mini-batches x 2 epochs, micro-batches of 3 rows, an entropy bonus and a
    reference KL (continuous in the log-probs: no selection whose ties rounding could flip)."""
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule
    from lit_covrl.regularizers import EntropyBonus, ReferenceKL
    from tests.helpers import fit, scalar_tags

    torch.manual_seed(0)
    module = GRPOModule(model=tiny_model_dir, rollout={"group_size": 4, "max_new_tokens": 6},
                        update={"mini_batch_size": 2, "micro_batch_size": 3, "ppo_epochs": 2}, seed=0,
                        system={"skip_padding": skip_padding},
                        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))
    module.configure_model()
    columns = []
    handle = module.policy.register_forward_pre_hook(
        lambda m, a, kw: columns.append(kw["input_ids"].numel()) if torch.is_grad_enabled() else None, with_kwargs=True)
    log_dir = tmp_path / str(skip_padding)
    try:
        fit(module, PromptDataModule(task="arithmetic", batch_size=4, val_size=0, seed=0), steps=3,
            callbacks=[EntropyBonus(coef=0.01), ReferenceKL(beta=0.1)], log_dir=log_dir)
    finally:
        handle.remove()
    assert module.learner.settings.skip_padding is skip_padding
    tags = scalar_tags(log_dir)
    keys = ("policy/loss", "policy/entropy", "policy/grad_norm", "reg/entropy_bonus/loss", "reg/ref_kl/kl")
    return {k: [v for _, v in sorted(tags[k])] for k in keys}, sum(columns)


def test_training_run_is_the_same_with_skip_padding_on_and_off(tiny_model_dir, tmp_path):
    on, work_on = _fit_run(tiny_model_dir, tmp_path, skip_padding=True)
    off, work_off = _fit_run(tiny_model_dir, tmp_path, skip_padding=False)
    for k in on:
        assert len(on[k]) == 3
        assert on[k] == pytest.approx(off[k], rel=1e-4, abs=1e-6), k
    assert work_on < work_off  # fewer token positions in the training forwards


def test_skip_padding_default_follows_the_device(tiny_model_dir):
    from lit_covrl.module import GRPOModule

    auto = GRPOModule(model=tiny_model_dir)
    assert auto.hparams.system["skip_padding"] is None and not auto.skip_padding_on
    auto._device = torch.device("cuda", 0)  # what Lightning sets when the module moves to a GPU
    assert auto.skip_padding_on
    assert GRPOModule(model=tiny_model_dir, system={"skip_padding": True}).skip_padding_on
