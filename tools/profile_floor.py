"""The floor of tools/profile_step.py: the least any GRPO implementation on this Hugging Face
model must run per rollout, as a bare loop (no Lightning, no metrics, no logging).

Per step: one prefill forward (last-position logits) + one KV-cache forward per further token, a
log-softmax + multinomial per token, the reward and group-normalized advantages, one training
forward (response logits only) with a clipped-ratio token-mean loss, backward, grad-norm clip
and one AdamW step, on the setting of profile_lit.py (same model, prompts, group size, tokens).
The time of each part is summed into `parts` (same keys, in the same order, as printed by
profile_step.py).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

import bench  # tools/bench.py
from profile_lit import G, PROMPTS, T_MAX


class _Floor:
    """One bare GRPO step per call (see make_floor); `parts` sums the seconds of each part and
    `last` holds the last step's (new log-probs, old log-probs, response mask)."""

    def __init__(self, shared_prompt: bool) -> None:
        from transformers import DynamicCache

        from lit_covrl.policy import load_policy, load_tokenizer
        from lit_covrl.prompts import encode_prompts

        self.shared_prompt = shared_prompt
        self.model = load_policy(bench.QUICKSTART)
        self.tok = load_tokenizer(bench.QUICKSTART)
        dm = bench.make_data(PROMPTS)
        self.batches = dm._stream(0, 1, start=0)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        self.eos = self.tok.eos_token_id
        self.parts: dict[str, float] = defaultdict(float)
        self._new_cache, self._encode = DynamicCache, encode_prompts

    def _prefix(self, ids, mask, pos, cache, keep):
        """Prompt forward: on every row (each prompt repeated G times), or with shared_prompt once
        per prompt, its KV cache then repeated over the group's rows."""
        model = self.model
        if not self.shared_prompt:
            return model(input_ids=ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0),
                         position_ids=pos.repeat_interleave(G, 0), past_key_values=cache, use_cache=True,
                         logits_to_keep=keep).logits
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=keep).logits
        cache.batch_repeat_interleave(G)
        return logits.repeat_interleave(G, 0)

    def _sample(self, ids, pmask, ppos, n: int):
        """No-grad sampling of up to T_MAX tokens per row. Returns (responses, their log-probs,
        response mask, prefill forward seconds, decode forward seconds)."""
        with torch.no_grad():
            a = time.perf_counter()
            cache = self._new_cache()
            logits = self._prefix(ids, pmask, ppos, cache, 1)[:, -1]
            pf = time.perf_counter() - a
            fwd = 0.0
            mask = pmask.repeat_interleave(G, 0)
            p = ppos[:, -1:].repeat_interleave(G, 0)
            toks, logps, alive = [], [], []
            done = torch.zeros(n, dtype=torch.bool)
            for s in range(T_MAX):
                lp = torch.log_softmax(logits, -1)
                tk = torch.multinomial(lp.exp(), 1)
                alive.append(~done)
                toks.append(tk)
                logps.append(lp.gather(-1, tk))
                done = done | (tk[:, 0] == self.eos)
                if s == T_MAX - 1 or bool(done.all()):
                    break
                mask = torch.cat([mask, (~done).long()[:, None]], 1)
                p = p + 1
                a = time.perf_counter()
                logits = self.model(input_ids=tk, attention_mask=mask, position_ids=p, past_key_values=cache,
                                    use_cache=True).logits[:, -1]
                fwd += time.perf_counter() - a
            return torch.cat(toks, 1), torch.cat(logps, 1), torch.stack(alive, 1).float(), pf, fwd

    def _loss(self, ids, pmask, ppos, resp, old, m, adv):
        """Training forward (response logits only) and the clipped-ratio token-mean loss.
        Returns (loss, new log-probs)."""
        model = self.model
        T = resp.shape[1]
        fm = torch.cat([pmask.repeat_interleave(G, 0), m.long()], 1)
        if self.shared_prompt:  # prefix once per prompt (with grad), then the responses on its repeated cache
            cache = self._new_cache()
            first = self._prefix(ids, pmask, ppos, cache, 1)  # [n, 1, V]: predicts response token 0
            rpos = ppos[:, -1:].repeat_interleave(G, 0) + 1 + torch.arange(T)
            rest = model(input_ids=resp, attention_mask=fm, position_ids=rpos, past_key_values=cache,
                         use_cache=True).logits[:, :-1]
            out = torch.cat([first, rest], 1)
        else:
            full = torch.cat([ids.repeat_interleave(G, 0), resp], 1)
            out = model(input_ids=full, attention_mask=fm, position_ids=(fm.cumsum(-1) - 1).clamp(min=0),
                        logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(out, -1).gather(-1, resp[..., None]).squeeze(-1)
        ratio = torch.exp(logp - old)
        loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        return (loss * m).sum() / m.sum(), logp

    def __call__(self) -> None:
        parts, tok = self.parts, self.tok
        t = [time.perf_counter()]
        batch = next(self.batches)
        ids, pmask = self._encode(tok, batch.prompts, chat_template=False, max_prompt_length=512, overflow="error")
        ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
        n = ids.shape[0] * G
        t.append(time.perf_counter())
        resp, old, m, pf, fwd = self._sample(ids, pmask, ppos, n)
        t.append(time.perf_counter())
        parts["prefill forward"] += pf
        parts["decode forwards"] += fwd
        parts["sampling math"] += t[-1] - t[-2] - fwd - pf
        texts = tok.batch_decode(resp, skip_special_tokens=True)
        r = torch.tensor([float(x.strip() == y) for x, y in zip(texts, [a for a in batch.answers for _ in range(G)])])
        rg = r.view(-1, G)
        adv = ((rg - rg.mean(1, keepdim=True)) / (rg.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        t.append(time.perf_counter())
        parts["score + advantages"] += t[-1] - t[-2]
        loss, logp = self._loss(ids, pmask, ppos, resp, old, m, adv)
        t.append(time.perf_counter())
        parts["training forward + loss"] += t[-1] - t[-2]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        parts["backward"] += t[-1] - t[-2]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        t.append(time.perf_counter())
        parts["clip + AdamW"] += t[-1] - t[-2]
        parts["encode prompts"] += t[1] - t[0]
        self.last = (logp.detach(), old, m)


def make_floor(shared_prompt: bool = False):
    """A bare GRPO step on the same model and prompts (see the module docstring): returns
    (step, parts), `step()` runs one step and adds its part times to the dict `parts`.

    shared_prompt=True: the variant that does fewer FLOPs than every implementation compared
    here: each prompt's prefix runs once per group (16 rows, not 128), in sampling and in the
    training forward (its KV cache, with grad, is repeated over the group's 8 rows), so only the
    response tokens run per sample. Same math up to float rounding."""
    step = _Floor(shared_prompt)
    return step, step.parts


def run_floor(steps: int, warmup: int, shared_prompt: bool = False) -> dict:
    step, parts = make_floor(shared_prompt)
    for _ in range(warmup):
        step()
    parts.clear()
    per = []
    for _ in range(steps):
        a = time.perf_counter()
        step()
        per.append(time.perf_counter() - a)
    return {"wall": sum(per), "per_step": per, "parts": dict(parts)}
