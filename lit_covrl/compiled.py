"""The update's policy forward through `torch.compile` (`model.system.compile_update`).

`CompiledForwards` hands the learner a stand-in for a model that `response_logprobs` calls like
the model itself (`model(input_ids=..., attention_mask=..., position_ids=..., logits_to_keep=k,
use_cache=False).logits`) and that runs that forward, the transformer and the LM head on the kept
positions, as one compiled graph. The log-softmax and entropy over the vocabulary stay eager and
chunked (`lit_covrl.algorithms`), so their memory bound is unchanged. Each model object (the
policy, the reference model) is compiled once, on first use, and its compiled function is kept for
as long as the model lives; the model is not wrapped or modified, so its state dict, checkpoints
and the sampler's own forwards are untouched.

Shapes: rows and columns change from micro-batch to micro-batch (filtered groups, the last
micro-batch, response lengths, `skip_padding` trimming). The function is compiled with
`dynamic=True`: the row count, the sequence length and `logits_to_keep` are symbolic from the
first compilation on, so one graph per grad mode (training forward, no-grad old/reference
forward) serves every shape. Measured on the CPU (the shipped tiny Qwen2, 8 micro-batch shapes of
1-8 rows x 11-25 columns with a training forward each, dynamo graphs counted): `dynamic=True` 2
graphs, the second for the one-row batch; automatic dynamic shapes (`dynamic=None`, torch's
default) 4; `maybe_mark_dynamic` on the row and column dims 3; lengths rounded up to multiples of
16 4 (and that computes the padding `skip_padding` removes); static shapes one per shape up to
dynamo's recompile limit (8), after which it silently runs the forward eagerly. Dynamo specializes a dimension of size 1, so a one-row
micro-batch (a filler pass under FSDP/DDP lock-step, or a mini-batch left with one row) is
forwarded as two copies of its row, the second discarded, and the inputs are always passed as
fresh contiguous copies (dynamo also guards on strides and on whether an input is a view, as
`trim_padding`'s column slices are): one graph per grad mode in all.

Every model's function shares one code object, and dynamo keeps at most 8 compiled entries per code
object (`torch._dynamo.config.recompile_limit`; beyond it the forward silently runs eagerly): enough
for 4 models (2 grad modes each) in one process, e.g. the policy and the reference model of a run.

Not combined (refused at start-up, `lit_covrl.settings` / `lit_covrl.sharding.check_strategy`):
the shared-prompt forward (a forward on a KV cache built by another forward), activation
checkpointing, FSDP2 and several processes: none of these was tested compiled.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

BACKEND = "inductor"  # torch.compile backend; the CPU tests use a cheaper one (inductor compiles for minutes here)


class CompiledForwards:
    """One compiled forward per model object (see the module docstring).

    Args:
        backend: the `torch.compile` backend (default: the module's `BACKEND` when first used).
    """

    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend
        # strong references: the learner holding this lives as long as the policy and reference model
        self._fns: dict[nn.Module, _CompiledModel] = {}

    def __call__(self, model: nn.Module) -> "_CompiledModel":
        """The stand-in for `model` in `response_logprobs`; compiled on the first call for it."""
        fn = self._fns.get(model)
        if fn is None:
            fn = self._fns[model] = _CompiledModel(model, self.backend or BACKEND)
        return fn


class _CompiledModel:
    """Calls `model(...)` through one `torch.compile`d function returning only the logits."""

    def __init__(self, model: nn.Module, backend: str) -> None:
        def logits(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, keep: int) -> Tensor:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        logits_to_keep=keep, use_cache=False)
            return out.logits

        self._logits = torch.compile(logits, dynamic=True, backend=backend)

    def __call__(self, *, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, logits_to_keep: int,
                 use_cache: bool = False) -> SimpleNamespace:
        assert not use_cache, "the compiled update forward keeps no KV cache"
        n = input_ids.shape[0]
        # always fresh contiguous copies (small integer tensors): dynamo guards on an input's strides
        # and on whether it is a view (`trim_padding` slices); a size-1 dim would be specialized into
        # a second graph, so a single row is forwarded twice
        rep = 2 if n == 1 else 1
        input_ids, attention_mask, position_ids = (t.repeat(rep, 1) for t in (input_ids, attention_mask, position_ids))
        return SimpleNamespace(logits=self._logits(input_ids, attention_mask, position_ids, logits_to_keep)[:n])
