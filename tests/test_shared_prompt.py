"""Shared-prompt training forward (`lit_covrl.policy.shared_prompt_logprobs`): each run of identical
consecutive prompt rows is forwarded once and its KV cache repeated over the rows. It must give
`response_logprobs`' log-probs, entropies and parameter gradients, and the same training run,
while forwarding each prompt once per group (counted with a forward hook)."""
from __future__ import annotations

import pytest
import torch

from lit_covrl.policy import load_policy, load_tokenizer, response_logprobs, shared_prompt_logprobs
from lit_covrl.prompts import encode_prompts

PROMPTS = ["12+3=", "4+5=", "7+80=", "1=", "33+44+5="]  # different lengths: different left padding


def _rows(tok, prompts: list[str], repeats: list[int], T: int = 4, seed: int = 0):
    """Left-padded prompts, prompt i repeated repeats[i] times in consecutive rows, then T random
    response tokens; the response mask ends some rows early (0 after an EOS, as the sampler does)."""
    ids, mask = encode_prompts(tok, prompts, chat_template=False)
    idx = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(repeats))
    ids, mask = ids[idx], mask[idx]
    g = torch.Generator().manual_seed(seed)
    resp = torch.randint(3, len(tok), (len(idx), T), generator=g)
    alive = torch.ones(len(idx), T, dtype=torch.long)
    alive[::3, T - 1:] = 0  # every third row stopped before its last token
    return torch.cat([ids, resp], 1), torch.cat([mask, alive], 1), T


class PromptRowCounter:
    """Forward pre-hook on the model: (rows, columns) of every forward's input_ids."""

    def __init__(self, model) -> None:
        self.calls: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        self.calls.append(tuple(ids.shape))


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    torch.manual_seed(0)
    return load_policy(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


CASES = {
    "groups of 4": [4, 4, 4, 4, 4],
    "partial groups": [4, 1, 3, 2, 4],
    "no repeats": [1, 1, 1, 1, 1],
}


@pytest.mark.parametrize("repeats", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_the_plain_forward(model_tok, repeats, temperature):
    model, tok = model_tok
    ids, att, T = _rows(tok, PROMPTS, repeats)
    kw = dict(temperature=temperature, with_entropy=True, chunk_size=7)
    with torch.no_grad():
        ref_lp, ref_ent = response_logprobs(model, ids, att, T, **kw)[:2]
        for always_split in (False, True):
            lp, ent = shared_prompt_logprobs(model, ids, att, T, always_split=always_split, **kw)[:2]
            torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 5])
def test_response_lengths(model_tok, T):
    model, tok = model_tok
    ids, att, T = _rows(tok, PROMPTS[:2], [3, 2], T=T)
    with torch.no_grad():
        ref = response_logprobs(model, ids, att, T).logp
        got = shared_prompt_logprobs(model, ids, att, T).logp
    assert got.shape == (5, T)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _grads(model, fn, ids, att, T) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    lp, ent = fn(model, ids, att, T, temperature=0.9, with_entropy=True, chunk_size=5)[:2]
    w = torch.linspace(-1.0, 1.0, lp.numel()).view_as(lp)  # distinct weight per token
    ((lp * w).sum() + 0.3 * (ent * w.flip(0)).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("repeats", [[4, 4, 4, 4, 4], [4, 1, 3, 2, 4]], ids=["groups of 4", "partial groups"])
def test_parameter_gradients_match_the_plain_forward(tiny_model_dir, repeats):
    """Gradients flow back through the repeated cache into the prompt forward: every parameter's
    gradient equals the plain path's (a cache that lost its graph would leave the prompt's
    contribution out and fail this)."""
    torch.manual_seed(0)
    model, tok = load_policy(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    ids, att, T = _rows(tok, PROMPTS, repeats)
    plain = _grads(model, response_logprobs, ids, att, T)
    shared = _grads(model, shared_prompt_logprobs, ids, att, T)
    assert plain.keys() == shared.keys() and len(plain) == len(list(model.parameters()))
    for name, g in plain.items():  # float32 sums in another order: relative to the gradient's scale
        err = (shared[name] - g).norm() / g.norm()
        assert err < 1e-5, (name, float(err))
        torch.testing.assert_close(shared[name], g, rtol=0, atol=1e-5 * float(g.abs().max()), msg=name)


def test_the_prompt_is_forwarded_once_per_group(model_tok):
    model, tok = model_tok
    ids, att, T = _rows(tok, PROMPTS[:3], [4, 4, 4])
    P = ids.shape[1] - T
    counter = PromptRowCounter(model)
    try:
        with torch.no_grad():
            shared_prompt_logprobs(model, ids, att, T)
            response_logprobs(model, ids, att, T)
    finally:
        counter.handle.remove()
    # shared: the 3 distinct prompts (P columns), then the 12 rows' responses but the last token;
    # plain: 12 rows of prompt + response
    assert counter.calls == [(3, P), (12, T - 1), (12, P + T)]


def test_no_repeats_falls_back_to_one_forward_unless_always_split(model_tok):
    model, tok = model_tok
    ids, att, T = _rows(tok, PROMPTS[:3], [1, 1, 1])
    counter = PromptRowCounter(model)
    try:
        with torch.no_grad():
            shared_prompt_logprobs(model, ids, att, T)
            n_plain = len(counter.calls)
            shared_prompt_logprobs(model, ids, att, T, always_split=True)
    finally:
        counter.handle.remove()
    assert n_plain == 1 and len(counter.calls) == 3  # always_split: 2 forwards even without repeats


def test_unrepeatable_cache_falls_back_to_the_plain_path(model_tok, monkeypatch):
    """A model whose cache is not a DynamicCache (e.g. 4.x legacy tuples) takes the plain path,
    with the same result; after the first try its class goes straight to the plain path."""
    import lit_covrl.policy as P

    model, tok = model_tok
    ids, att, T = _rows(tok, PROMPTS[:2], [4, 4])
    real = P.forward_with_cache

    def tuple_cache(model, cache, **kw):
        logits, c = real(model, cache, **kw)
        return logits, tuple((layer.keys, layer.values) for layer in c.layers)

    monkeypatch.setattr(P, "forward_with_cache", tuple_cache)
    monkeypatch.setattr(P, "_UNSHARED_CACHE", set())
    counter = PromptRowCounter(model)
    try:
        with torch.no_grad():
            got = shared_prompt_logprobs(model, ids, att, T).logp
            again = shared_prompt_logprobs(model, ids, att, T).logp
            ref = response_logprobs(model, ids, att, T).logp
    finally:
        counter.handle.remove()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, ref, atol=1e-6, rtol=0)
    assert [c[0] for c in counter.calls] == [2, 8, 8, 8]  # one wasted prompt forward, then plain only


# ------------------------------------------------------------------------------- training run

STEPS, G, PROMPTS_PER_STEP, MINI = 3, 4, 4, 2  # 2 mini-batches of 2 prompts x 4 samples, 2 epochs


def _fit(tiny_model_dir, tmp_path, *, shared_prompt: bool, micro_batch_size: int):
    """3 RL steps with Clip-Cov (its selection needs current log-probs: no-grad forwards), an
    entropy bonus (the entropy path) and a reference KL (the reference model's forwards); returns the logged series and the (rows, columns) of every forward run with grad."""
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule
    from lit_covrl.regularizers import ClipCov, EntropyBonus, ReferenceKL
    from tests.helpers import fit, scalar_tags

    torch.manual_seed(0)
    module = GRPOModule(
        model=tiny_model_dir, seed=0, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
        rollout=dict(group_size=G, max_new_tokens=4),
        update=dict(mini_batch_size=MINI, micro_batch_size=micro_batch_size, ppo_epochs=2),
        system=dict(shared_prompt=shared_prompt),
    )
    module.configure_model()
    grad_calls = []
    handle = module.policy.register_forward_pre_hook(
        lambda m, a, kw: grad_calls.append(tuple(kw["input_ids"].shape)) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    log_dir = tmp_path / ("on" if shared_prompt else "off")
    try:
        fit(module, PromptDataModule(task="arithmetic", batch_size=PROMPTS_PER_STEP, val_size=0, seed=0),
            steps=STEPS, callbacks=[ClipCov(ratio=0.25), EntropyBonus(coef=0.01), ReferenceKL(beta=0.1)], log_dir=log_dir)
    finally:
        handle.remove()
    tags = scalar_tags(log_dir)
    keys = ("policy/loss", "policy/entropy", "policy/grad_norm", "policy/clip_frac", "reg/clip_cov/loss",
            "reg/entropy_bonus/loss", "reg/ref_kl/kl")
    return {k: [v for _, v in sorted(tags[k])] for k in keys}, grad_calls


@pytest.mark.parametrize("micro_batch_size,prompts_per_micro", [(8, [2]), (3, [1, 2, 1])],
                         ids=["whole groups", "groups split across micro-batches"])
def test_training_run_is_the_same_with_shared_prompt_on_and_off(
        tiny_model_dir, tmp_path, micro_batch_size, prompts_per_micro):
    on, calls_on = _fit(tiny_model_dir, tmp_path, shared_prompt=True, micro_batch_size=micro_batch_size)
    off, calls_off = _fit(tiny_model_dir, tmp_path, shared_prompt=False, micro_batch_size=micro_batch_size)
    for k in on:
        assert len(on[k]) == STEPS
        assert on[k] == pytest.approx(off[k], rel=1e-4, abs=1e-6), k
    updates = STEPS * 2 * (PROMPTS_PER_STEP // MINI)
    rows = [min(micro_batch_size, MINI * G - s) for s in range(0, MINI * G, micro_batch_size)]
    # off: one forward over prompt+response per micro-batch row
    assert [r for r, _ in calls_off] == rows * updates
    # on: per micro-batch, the prompt forward on its distinct prompts, then the responses of its rows
    assert [r for r, _ in calls_on[0::2]] == prompts_per_micro * updates
    assert [r for r, _ in calls_on[1::2]] == rows * updates
    assert all(c_on[1] + c_resp[1] == c_off[1] - 1  # prompt columns + response columns but the last
               for c_on, c_resp, c_off in zip(calls_on[0::2], calls_on[1::2], calls_off))


def test_shared_prompt_default_follows_the_measurements(tiny_model_dir):
    """null = on for CPU (measured 1.58x faster updates), off on CUDA (measured 1.76x slower on
    an H100); an explicit setting wins; activation checkpointing always turns it off."""
    from lit_covrl.module import GRPOModule

    auto = GRPOModule(model=tiny_model_dir)
    assert auto.settings.system.shared_prompt is None and auto.hparams.system["shared_prompt"] is None
    assert auto.shared_prompt_on
    auto._device = torch.device("cuda", 0)  # what Lightning sets when the module moves to a GPU
    assert not auto.shared_prompt_on
    forced = GRPOModule(model=tiny_model_dir, system=dict(shared_prompt=True))
    forced._device = torch.device("cuda", 0)
    assert forced.shared_prompt_on
    assert not GRPOModule(model=tiny_model_dir, system=dict(shared_prompt=False)).shared_prompt_on
    checkpointed = GRPOModule(model=tiny_model_dir, system=dict(shared_prompt=True, activation_checkpointing=True))
    assert not checkpointed.shared_prompt_on


def test_learner_follows_the_resolved_shared_prompt_setting(tiny_model_dir):
    """The learner is built once; its shared-prompt choice follows the module's resolution (null =
    on for CPU, off on GPU) when that changes after it was built, e.g. a module moved to a GPU."""
    from lit_covrl.module import GRPOModule

    module = GRPOModule(model=tiny_model_dir)
    module.configure_model()
    assert module.learner.settings.shared_prompt is True  # CPU, null
    module._device = torch.device("cuda", 0)  # what Lightning sets when the module moves to a GPU
    assert module.learner.settings.shared_prompt is False
