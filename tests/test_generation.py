"""RolloutGenerator on its own (no Lightning): prompt-major rows, decoding, scoring, the
overlong penalty, and the same draw as GRPOModule.generate for the same generator state."""
from __future__ import annotations

import pytest
import torch

from lit_covrl.generation import RolloutGenerator
from lit_covrl.policy import load_policy, load_tokenizer
from lit_covrl.reward_set import RewardSet
from lit_covrl.rewards import ExactMatchReward
from lit_covrl.sampling import KVCacheSampler
from lit_covrl.settings import RolloutSettings
from lit_covrl.types import Rollout


def _generator(model_dir, **settings) -> RolloutGenerator:
    return RolloutGenerator(load_tokenizer(model_dir), KVCacheSampler(), RewardSet([ExactMatchReward()]),
                            RolloutSettings(**settings), gather_once=True, reward_timeout_s=None)


def test_generate_is_prompt_major_and_decodes_every_row(tiny_model_dir):
    gen = _generator(tiny_model_dir, max_new_tokens=4)
    policy = load_policy(tiny_model_dir)
    out = gen.generate(policy, ["1+2=", "7+8="], 3, temperature=1.0, generator=torch.Generator().manual_seed(0),
                       device=torch.device("cpu"))
    assert out.input_ids.shape[0] == 6 and out.response_mask.shape == (6, 4) and len(out.completions) == 6
    prompt_cols = out.input_ids.shape[1] - 4
    # rows 0-2 hold the first prompt, rows 3-5 the second (same prompt tokens within a group)
    assert all(torch.equal(out.input_ids[i, :prompt_cols], out.input_ids[0, :prompt_cols]) for i in range(3))
    assert all(torch.equal(out.input_ids[i, :prompt_cols], out.input_ids[3, :prompt_cols]) for i in range(3, 6))
    assert not torch.equal(out.input_ids[0, :prompt_cols], out.input_ids[3, :prompt_cols])
    tok = gen.tokenizer
    assert out.completions == tok.batch_decode(out.input_ids[:, prompt_cols:], skip_special_tokens=True)


def test_module_generate_is_the_generator_draw(tiny_model_dir):
    from lit_covrl.module import GRPOModule

    module = GRPOModule(model=tiny_model_dir, rollout=dict(max_new_tokens=4))
    module.configure_model()
    a = module.generate(["3+4="], 4, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = module.generation.generate(module.policy, ["3+4="], 4, temperature=1.0,
                                   generator=torch.Generator().manual_seed(5), device=torch.device("cpu"))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logp, b.logp) and a.completions == b.completions


def test_score_and_overlong_penalty_by_hand(tiny_model_dir):
    gen = _generator(tiny_model_dir, overlong="penalize", overlong_reward=-0.5)
    rewards, stats = gen.score(["7", "8", "7"], ["7", "7", "7"], device=torch.device("cpu"))
    assert rewards.tolist() == [1.0, 0.0, 1.0] and stats["rollout/reward_errors"] == 0
    per_reward = [v for k, v in stats.items() if k.startswith("rollout/reward/")]
    assert per_reward == [2 / 3]  # the one reward's mean over the 3 items (one process)
    rollout = Rollout(*(torch.zeros(3, 1) for _ in range(5)), truncated=torch.tensor([False, True, True]))
    # truncated rows 1 and 2 get overlong_reward whatever they scored: [1, -0.5, -0.5]
    assert gen.penalize_overlong(rollout, rewards).tolist() == [1.0, -0.5, -0.5]
    keep = _generator(tiny_model_dir)  # overlong: keep (default) leaves the rewards as scored
    assert keep.penalize_overlong(rollout, rewards).tolist() == [1.0, 0.0, 1.0]


def test_score_counts_reward_errors_and_means_over_all_ranks(tiny_model_dir, monkeypatch):
    """Stand-in for a second rank that scored 3 completions (sum 2) with 4 reward errors: all_sum adds
    its [sum, count, errors, failed]; the logged error count must include them, not only this rank's."""
    import lit_covrl.generation as generation

    monkeypatch.setattr(generation.distributed, "all_sum", lambda x: x + torch.tensor([2.0, 3.0, 4.0, 0.0], dtype=x.dtype))
    gen = RolloutGenerator(load_tokenizer(tiny_model_dir), KVCacheSampler(), RewardSet([lambda c, a: 1 / 0]),
                           RolloutSettings(), gather_once=True, reward_timeout_s=None)
    _, stats = gen.score(["7", "8", "7"], ["7", "7", "7"], device=torch.device("cpu"))
    assert stats["rollout/reward_errors"] == 3 + 4  # this rank's 3 failures + the other rank's 4
    assert [v for k, v in stats.items() if k.startswith("rollout/reward/")] == [pytest.approx(2 / 6)]
    # a rank scoring only to keep in step (held-out evaluation's empty share): its items left out
    _, stats = gen.score(["7", "8", "7"], ["7", "7", "7"], device=torch.device("cpu"), counted=False)
    assert stats["rollout/reward_errors"] == 4
    assert [v for k, v in stats.items() if k.startswith("rollout/reward/")] == [pytest.approx(2 / 3)]


def test_a_rewards_failure_on_another_rank_stops_this_one(tiny_model_dir, monkeypatch):
    """Stand-in for a second rank whose rewards raised: its 'failed' entry in the sum stops this
    rank with a message, instead of this rank going on to a collective that rank never joins."""
    import lit_covrl.generation as generation

    monkeypatch.setattr(generation.distributed, "all_sum", lambda x: x + torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=x.dtype))
    gen = RolloutGenerator(load_tokenizer(tiny_model_dir), KVCacheSampler(), RewardSet([lambda c, a: 1.0]),
                           RolloutSettings(), gather_once=True, reward_timeout_s=None)
    with pytest.raises(RuntimeError, match=r"scoring failed on 1 other rank\(s\)"):
        gen.score(["7"], ["7"], device=torch.device("cpu"))


def test_sampling_in_batches_keeps_the_rollout_contract():
    """`model.rollout.sampling_batch_size` bounds the sequences sampled at once (the KV cache):
    the rows are drawn in consecutive batches and joined, responses right-padded to the longest.
    The joined rollout keeps the contract: old log-probs equal the training forward on the mask,
    nothing recorded outside it, pad tokens and zero attention in the padding; a size not below
    the row count is the one-call rollout exactly."""
    from lit_covrl.generation import RolloutGenerator
    from lit_covrl.policy import load_policy, load_tokenizer, response_logprobs
    from lit_covrl.reward_set import RewardSet
    from lit_covrl.rewards import ExactMatchReward
    from lit_covrl.sampling import KVCacheSampler
    from lit_covrl.settings import RolloutSettings

    model, tok = load_policy("lit_covrl:tiny-arith").eval(), load_tokenizer("lit_covrl:tiny-arith")
    prompts = ["47+85=", "3+4=", "12-7+9=", "8*6="]

    def rollout(size):
        ro = RolloutSettings(group_size=4, max_new_tokens=8, temperature=0.7, top_p=0.9, sampling_batch_size=size)
        gen = RolloutGenerator(tok, KVCacheSampler(), RewardSet([ExactMatchReward()]), ro, gather_once=False,
                               reward_timeout_s=None)
        with torch.no_grad():
            return gen.generate(model, prompts, 4, temperature=0.7, generator=torch.Generator().manual_seed(0),
                                device=torch.device("cpu"))

    whole, batched = rollout(None), rollout(3)  # 16 rows: batches of 3, 3, 3, 3, 3, 1
    assert torch.equal(rollout(16).input_ids, whole.input_ids)
    assert batched.input_ids.shape[0] == 16 and batched.completions and len(batched.completions) == 16
    T = batched.response_mask.shape[1]
    P = batched.input_ids.shape[1] - T
    with torch.no_grad():
        train = response_logprobs(model, batched.input_ids, batched.attention_mask, T, temperature=0.7).logp
    m = batched.response_mask.bool()
    assert m.sum() >= 16
    torch.testing.assert_close(batched.logp[m], train[m], rtol=0, atol=1e-5)
    assert (batched.logp[~m] == 0).all() and (batched.entropy[~m] == 0).all()
    assert torch.equal(batched.attention_mask[:, P:].bool(), m | batched.attention_mask[:, P:].bool())
    assert (batched.input_ids[:, P:][batched.attention_mask[:, P:] == 0] == tok.pad_token_id).all()
    assert torch.equal(batched.input_ids[:, :P], whole.input_ids[:, :P])  # same prompts, same order


def test_sampling_batch_size_is_checked():
    from lit_covrl.settings import RolloutSettings

    with pytest.raises(ValueError, match="model.rollout.sampling_batch_size"):
        RolloutSettings(sampling_batch_size=0)


def test_settings_beyond_a_learned_position_table_are_refused_at_start_up(tiny_model_dir, tmp_path, capsys):
    """max_prompt_length + max_new_tokens beyond a GPT-2 table passed start-up and stopped the run
    at the first long prompt drawn (hours in) or at the first validation; now refused at start-up,
    naming both settings and the fix. Inside the table, the run trains."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.helpers import cli_fit_tags, cli_start_up_error

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=40, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    model = ["--model.model", str(tmp_path / "gpt2"), "--model.rollout.max_new_tokens", "8"]
    err = cli_start_up_error(tmp_path / "a", capsys, "configs/cpu/grpo.yaml", *model)
    assert "model.rollout.max_prompt_length=512 + model.rollout.max_new_tokens=8 positions exceed the 40 that the " \
           "position table of model.model=" in err and "set model.rollout.max_prompt_length <= 32" in err, err
    err = cli_start_up_error(tmp_path / "b", capsys, "configs/cpu/grpo.yaml", *model, "--model.rollout.max_prompt_length",
                             "1", "--model.rollout.prompt_overflow", "truncate_left", "--model.rollout.max_new_tokens", "40")
    assert "lower model.rollout.max_new_tokens" in err, err
    tags = cli_fit_tags(tmp_path / "c", "configs/cpu/grpo.yaml", *model, "--model.rollout.max_prompt_length", "32", steps=1)
    assert len(tags["rollout/reward_mean"]) == 1


def test_a_rollout_longer_than_a_learned_position_table_is_refused_naming_the_settings(tiny_model_dir, tmp_path):
    """A GPT-2-style model (learned positions, 8 here) crashed inside sampling with a bare
    IndexError (a device-side assert on CUDA) when prompt + max_new_tokens exceeded its table."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_covrl.policy import learned_position_limit, load_policy

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=8, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    policy = load_policy(str(tmp_path / "gpt2"))
    assert learned_position_limit(policy) == 8 and learned_position_limit(load_policy(tiny_model_dir)) is None
    gen = RolloutGenerator(tok, KVCacheSampler(), RewardSet([lambda c, a: 1.0]), RolloutSettings(max_new_tokens=4),
                           gather_once=True, reward_timeout_s=None)
    kw = dict(temperature=1.0, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert gen.generate(policy, ["1+2="], 2, **kw).input_ids.shape[0] == 2  # 4 + 4 positions: fits
    with pytest.raises(ValueError, match=r"a prompt of 6 tokens \+ model.rollout.max_new_tokens=4 need more than the 8 "
                                         r"positions the model's position table holds"):
        gen.generate(policy, ["12+34="], 2, **kw)
    with pytest.raises(ValueError, match="a prompt of 5 tokens"):  # one position over: refused too
        gen.generate(policy, ["12+3="], 2, **kw)


def test_a_rollout_past_a_rotary_models_context_is_warned_once(tiny_model_dir, caplog):
    """A rotary model has no position table to overflow: a rollout past its max_position_embeddings
    runs, degraded, and was never mentioned (review byo25 F6). Now warned, once."""
    from lit_covrl.policy import load_policy

    tok, policy = load_tokenizer(tiny_model_dir), load_policy(tiny_model_dir)
    context = policy.config.max_position_embeddings
    gen = RolloutGenerator(tok, KVCacheSampler(), RewardSet([lambda c, a: 1.0]), RolloutSettings(max_new_tokens=4),
                           gather_once=True, reward_timeout_s=None)
    kw = dict(temperature=1.0, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    fits = "1+" * ((context - 6) // 2) + "1="
    with caplog.at_level("WARNING", logger="lit_covrl"):
        gen.generate(policy, [fits], 1, **kw)
        assert "max_position_embeddings" not in caplog.text
        long = "1+" * (context // 2) + "1="
        gen.generate(policy, [long], 1, **kw)
        gen.generate(policy, [long], 1, **kw)
    assert caplog.text.count(f"past the model's max_position_embeddings={context}") == 1, caplog.text
