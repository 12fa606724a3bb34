"""Token log-probabilities and policy entropy from logits, chunked for memory.

    log pi(y) = z_y / tau - logsumexp(z / tau)
    H(pi)     = -sum_v p_v log p_v,   p = softmax(z / tau), log p from the log-softmax

Vocabularies are large (V ~ 150k): a float32 log-softmax of N*T rows is the biggest tensor of
the update. Both functions flatten the leading dims to rows and process ``chunk_size`` rows at a
time upcast to float32 (inputs may be bf16); with gradients enabled each chunk runs under
``torch.utils.checkpoint`` (use_reentrant=False), so only one chunk's float32 intermediates are
alive at a time and backward recomputes them.
Entropy is that of the distribution actually sampled and trained, softmax(z / tau), as in the
reference code (verl and the paper's code divide the logits by the temperature first); at tau = 1
(every shipped config) it is the plain softmax entropy.
Shapes: ``...`` leading dims (usually [N, T]), V vocabulary.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["token_logprobs", "token_scaled_logprobs", "token_topk_logprobs", "token_proxy_logprobs", "token_entropy",
           "token_topp_entropy", "clamp_keep_mask", "token_clamped_entropy", "masked_entropy", "masked_mean"]


def _upcast(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunked(fn: Callable[..., Tensor], rows: Tensor, *extra: Tensor, chunk_size: int) -> Tensor:
    """Apply ``fn(rows_chunk, *extra_chunks) -> [chunk]`` over row chunks, checkpointed if grad."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    use_ckpt = torch.is_grad_enabled() and rows.requires_grad
    outs = []
    for start in range(0, rows.shape[0], chunk_size):
        args = [t[start : start + chunk_size] for t in (rows, *extra)]
        outs.append(checkpoint(fn, *args, use_reentrant=False) if use_ckpt else fn(*args))
    if not outs:
        return rows.new_zeros(0, dtype=torch.promote_types(rows.dtype, torch.float32))
    return torch.cat(outs)


def token_logprobs(
    logits: Tensor, labels: Tensor, *, temperature: float = 1.0, chunk_size: int = 4096
) -> Tensor:
    """log softmax(logits / temperature)[label] -> [...] (float32 or float64), differentiable.

    logits [..., V] (any float dtype); labels [...] int64 token ids.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1, 1).long()

    def fn(z: Tensor, y: Tensor) -> Tensor:
        z = _upcast(z) / temperature
        return z.gather(-1, y).squeeze(-1) - torch.logsumexp(z, dim=-1)

    return _chunked(fn, rows, flat_labels, chunk_size=chunk_size).view(labels.shape)


def token_scaled_logprobs(
    logits: Tensor, labels: Tensor, scales: tuple[float, ...], *, temperature: float = 1.0, chunk_size: int = 4096
) -> Tensor:
    """log softmax(s * logits / temperature)[label] for each s of `scales` -> [..., S] (float32 or
    float64), differentiable: the label's log-prob under the logits scaled by s after the
    temperature, s > 1 sharpening the distribution and s < 1 flattening it (ERA's logit activation
    z' = s z). One chunked pass for all scales; the column of s = 1 equals `token_logprobs` to the
    bit (the same operations in the same order).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty tuple of numbers > 0, got {scales!r}")
    rows = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1, 1).long()

    def fn(z: Tensor, y: Tensor) -> Tensor:
        z = _upcast(z) / temperature
        out = []
        for s in scales:
            zs = z if s == 1.0 else z * s
            out.append(zs.gather(-1, y).squeeze(-1) - torch.logsumexp(zs, dim=-1))
        return torch.stack(out, -1)

    return _chunked(fn, rows, flat_labels, chunk_size=chunk_size).view(*labels.shape, len(scales))


def token_topk_logprobs(
    logits: Tensor, labels: Tensor, k: int, *, temperature: float = 1.0, chunk_size: int = 4096
) -> tuple[Tensor, Tensor, Tensor]:
    """(log pi(label) [...], log pi of the k most probable tokens [..., k] (largest first),
    label is the most probable token [...] bool), in one chunked pass over the logits.

    The first output is `token_logprobs`' to the bit (same operations in the same order); the
    top-k log-probs are differentiable (the indices come from the detached logits, as SimKO's
    reference code picks them); memory stays one chunk's float32 [chunk, V] at a time. The
    top-1 flag compares the label with the first top-k index (a tie between two maximal logits
    is broken by `torch.topk`'s choice).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if k < 1 or k > logits.shape[-1]:
        raise ValueError(f"k must be in [1, vocabulary size {logits.shape[-1]}], got {k}")
    rows = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1, 1).long()

    def fn(z: Tensor, y: Tensor) -> Tensor:
        z = _upcast(z) / temperature
        lse = torch.logsumexp(z, dim=-1)
        idx = torch.topk(z.detach(), k, dim=-1).indices
        top = z.gather(-1, idx) - lse.unsqueeze(-1)
        # [chunk, 1 + k + 1]: the label's log-prob, the top-k log-probs, the top-1 flag (no grad)
        return torch.cat([(z.gather(-1, y).squeeze(-1) - lse).unsqueeze(-1), top,
                          (idx[:, :1] == y).to(top.dtype)], dim=-1)

    out = _chunked(fn, rows, flat_labels, chunk_size=chunk_size)
    if out.shape[0] == 0:
        out = out.new_zeros(0, k + 2)
    return (out[:, 0].view(labels.shape), out[:, 1:1 + k].view(*labels.shape, k),
            out[:, -1].detach().bool().view(labels.shape))


@torch.no_grad()
def token_proxy_logprobs(
    logits: Tensor, labels: Tensor, min_p: float, *, temperature: float = 1.0, chunk_size: int = 4096
) -> Tensor:
    """log pi_proxy(label) [...] (detached): the log-prob of the label under the min-p proxy of
    softmax(logits / temperature), -inf where the label itself is filtered out.

    The proxy (Lp-Reg, Huang et al. 2025) keeps the tokens whose probability under softmax(logits)
    (temperature 1, as the reference filters the raw logits before dividing them by the
    temperature) is at least `min_p` times the most probable token's, i.e. z_v >= max z + log
    min_p, and renormalises softmax(z / temperature) over them:
        log pi_proxy(y) = z_y / tau - logsumexp_{kept v}(z_v / tau)   (y kept).
    The most probable token is always kept. With every token kept the proxy is the policy itself
    (the same logsumexp over the same values: equal to `token_logprobs` to the bit). Chunked like
    the log-probs (one chunk's float32 [chunk, V] at a time), without grad: the proxy is a target.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < min_p <= 1.0:
        raise ValueError(f"min_p must be in (0, 1], got {min_p}")
    rows = logits.detach().reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1, 1).long()
    log_min_p = math.log(min_p)

    def fn(z: Tensor, y: Tensor) -> Tensor:
        z = _upcast(z)
        kept = z >= z.amax(-1, keepdim=True) + log_min_p
        z = z / temperature
        lse = torch.logsumexp(z.masked_fill(~kept, float("-inf")), dim=-1)
        return (z.gather(-1, y).squeeze(-1) - lse).masked_fill(~kept.gather(-1, y).squeeze(-1), float("-inf"))

    return _chunked(fn, rows, flat_labels, chunk_size=chunk_size).view(labels.shape)


def _tempered(z: Tensor, temperature: float) -> Tensor:
    z = _upcast(z)
    return z / temperature if temperature != 1.0 else z


def _entropy_rows(z: Tensor, temperature: float = 1.0) -> Tensor:
    z = _tempered(z, temperature)
    logp = torch.log_softmax(z, dim=-1)
    # -sum p log p from the log-softmax, as the sampler computes it (`token_distribution`): the
    # equivalent logsumexp(z) - sum p z cancels two large terms, an absolute error of ~1e-5 that a
    # confident token's entropy (1e-6 and below) drowns in, and entropy ratios between the two
    # paths (EntropyRatioClip) then clip tokens whose distribution has not moved.
    # -inf logits (masked vocab) have p = 0 and log p = -inf: zeroed, so 0 * -inf gives no NaN (nor in backward)
    return -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)


def token_entropy(logits: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Exact entropy of softmax(logits / temperature) per position: [..., V] -> [...].

    Differentiable; float32 (float64 for float64 input) whatever the logits' dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = logits.reshape(-1, logits.shape[-1])

    def fn(z: Tensor) -> Tensor:
        return _entropy_rows(z, temperature)

    return _chunked(fn, rows, chunk_size=chunk_size).view(logits.shape[:-1])


def _nucleus_ranks(z: Tensor, *, top_p: float, top_k: int, probe: int) -> list[tuple[Tensor | slice, Tensor, Tensor]]:
    """The nucleus of each row of detached logits `z` by rank: [(rows, idx, keep)], idx [r, w] the
    rows' w most probable tokens, largest first, keep [r, w] those in the nucleus (cumulative
    probability, their own included, strictly below `top_p`). w = min(top_k, V, probe) for every
    row, then, for the rows whose nucleus holds all `probe` (it may reach further), a second entry
    with w = min(top_k, V): the later entry wins for its rows."""
    k = min(int(top_k), z.shape[-1])
    probs = torch.softmax(z, dim=-1)

    def ranked(rows: Tensor | slice, width: int) -> tuple[Tensor | slice, Tensor, Tensor]:
        idx = torch.topk(z[rows], width, dim=-1).indices
        return rows, idx, probs[rows].gather(-1, idx).cumsum(-1) < top_p

    found = [ranked(slice(None), min(k, probe))]
    if k > probe and (wide := found[0][2][:, -1].nonzero().squeeze(-1)).numel():  # a host sync
        found.append(ranked(wide, k))
    return found


def nucleus_mask(z: Tensor, *, top_p: float, top_k: int, probe: int = 64) -> Tensor:
    """BoolTensor [rows, V] (no grad): the nucleus of each row of logits `z` as SIREN's reference
    code (Linn3a/siren, dp_actor.efficient_top_p_sampling) draws it: among the min(top_k, V) most
    probable tokens, largest first, those whose cumulative probability (their own included) is
    strictly below `top_p`. The token that reaches top_p is left out, so a row whose top-1 already
    has probability >= top_p has an empty nucleus.

    The reference sorts min(top_k, V) tokens of every row (10,000 of a 150k vocabulary) though a
    peaked row's nucleus holds a few: here the `probe` most probable are ranked first, and only the
    rows whose nucleus might reach past them (all `probe` below top_p) are ranked to min(top_k, V).
    The same nucleus, since the first `probe` of the longer ranking are the same tokens in the same
    order (exactly tied logits aside, where either keeps the same probability mass)."""
    z = z.detach()
    mask = torch.zeros_like(z, dtype=torch.bool)
    for rows, idx, keep in _nucleus_ranks(z, top_p=top_p, top_k=top_k, probe=probe):
        mask[rows] = torch.zeros_like(mask[rows]).scatter(-1, idx, keep)
    return mask


def _nucleus_entropy(zk: Tensor, keep: Tensor) -> Tensor:
    """Entropy of softmax over the kept entries of each row of `zk` (0 for a row with none)."""
    empty = ~keep.any(-1, keepdim=True)
    # an empty nucleus has entropy 0 (no gradient): its row is masked as all of its entries so
    # that no -inf row reaches the log-softmax, then zeroed
    logq = torch.log_softmax(zk.masked_fill(~(keep | empty), float("-inf")), dim=-1)
    h = -(logq.exp() * logq.masked_fill(torch.isneginf(logq), 0.0)).sum(-1)
    return torch.where(empty.squeeze(-1), torch.zeros_like(h), h)


def _topp_entropy_rows(z: Tensor, top_p: float, top_k: int, temperature: float, probe: int = 64) -> Tensor:
    # the softmax over the nucleus needs its logits only: gathered by rank ([rows, w], w = the
    # probe's or top_k's width), not the whole vocabulary masked
    z = _tempered(z, temperature)
    h = None
    for rows, idx, keep in _nucleus_ranks(z.detach(), top_p=top_p, top_k=top_k, probe=probe):
        hr = _nucleus_entropy(z[rows].gather(-1, idx), keep)
        h = hr if h is None else h.index_put((rows,), hr)
    return h


def token_topp_entropy(
    logits: Tensor, *, top_p: float, top_k: int, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """Entropy of the nucleus distribution per position: [..., V] -> [...], differentiable.

    q = softmax(z / temperature) restricted to `nucleus_mask` and renormalised; H = -sum q log q
    (0 for an empty nucleus). The nucleus is chosen on detached logits; the gradient flows through
    q as the reference's (which renormalises the full softmax's probabilities over the nucleus).
    Chunked and checkpointed like `token_entropy`: one chunk's float32 [chunk, V] at a time."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1 or top_k < 1:
        raise ValueError(f"need 0 < top_p <= 1 and top_k >= 1, got top_p={top_p}, top_k={top_k}")
    rows = logits.reshape(-1, logits.shape[-1])

    def fn(z: Tensor) -> Tensor:
        return _topp_entropy_rows(z, top_p, top_k, temperature)

    return _chunked(fn, rows, chunk_size=chunk_size).view(logits.shape[:-1])


def clamp_keep_mask(z: Tensor, clamp_p: float, cut: Tensor | None = None) -> Tensor:
    """BoolTensor [rows, V] (no grad): the tokens AEnt's clamped entropy keeps in each row of
    logits `z`, all but the k = int(V clamp_p) lowest-logit ones (the reference's
    `torch.topk(..., k, largest=False)`, k rounded down as its `int`). Ties are broken by token id,
    so the mask is the same on every device and for every chunking: of equal logits straddling the
    cut, the lower ids are kept (the V - k kept tokens are the first V - k of the order by logit
    descending, then id ascending). A NaN logit is not ordered: the caller's logits are finite.
    `cut` [rows, 1]: each row's smallest kept logit (`clamp_cut`) when already known."""
    z = z.detach()
    V = z.shape[-1]
    k = int(V * clamp_p)
    if k == 0:
        return torch.ones_like(z, dtype=torch.bool)
    keep_n = V - k
    if cut is None:
        cut = clamp_cut(z, clamp_p)
    above = z > cut
    tied = z == cut
    room = keep_n - above.sum(-1, keepdim=True)  # how many of the tied tokens are kept, lowest ids first
    # int32 running count (an int64 cumsum of [chunk, V] would be twice a float32 chunk's memory)
    return above | (tied & (tied.to(torch.int32).cumsum(-1, dtype=torch.int32) <= room))


def clamp_cut(z: Tensor, clamp_p: float) -> Tensor:
    """[rows, 1]: each row's smallest logit `clamp_keep_mask` keeps (the (V - k)-th largest, k =
    int(V clamp_p) >= 1), a k-th value over the vocabulary: most of the clamped entropy's cost."""
    return torch.kthvalue(z.detach(), int(z.shape[-1] * clamp_p) + 1, dim=-1, keepdim=True).values


def _clamped_entropy_rows(z: Tensor, cut: Tensor, clamp_p: float, temperature: float) -> Tensor:
    z = _tempered(z, temperature)
    return _entropy_rows(z.masked_fill(~clamp_keep_mask(z, clamp_p, cut), float("-inf")))


def token_clamped_entropy(
    logits: Tensor, *, clamp_p: float, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """AEnt's clamped entropy per position (Shen 2025, arXiv 2509.03493): [..., V] -> [...],
    differentiable.

    q = softmax(z / temperature) renormalised over `clamp_keep_mask` (every token but the
    int(V clamp_p) lowest-logit ones); H = -sum q log q. The kept set is chosen on detached logits
    and the gradient flows through q, as the reference's `clamped_entropy_from_logits` (its value
    logsumexp_kept(z) - sum q z is the same number). clamp_p = 0 keeps every token: the plain
    entropy (`token_entropy`). Chunked and checkpointed like `token_entropy`: one chunk's float32
    [chunk, V] at a time."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= clamp_p < 1.0:
        raise ValueError(f"clamp_p must be in [0, 1), got {clamp_p}")
    rows = logits.reshape(-1, logits.shape[-1])
    if int(rows.shape[-1] * clamp_p) == 0:  # nothing left out: the plain entropy
        return token_entropy(logits, temperature=temperature, chunk_size=chunk_size)
    # the cuts in a no-grad pass of their own, so that a checkpointed chunk's recomputation in the
    # backward does not search for them again (the same values: the same tempered logits)
    with torch.no_grad():
        cuts = torch.cat([clamp_cut(_tempered(rows[i:i + chunk_size], temperature), clamp_p)
                          for i in range(0, rows.shape[0], chunk_size)]) if rows.shape[0] else rows.new_zeros(0, 1)

    def fn(z: Tensor, cut: Tensor) -> Tensor:
        return _clamped_entropy_rows(z, cut, clamp_p, temperature)

    return _chunked(fn, rows, cuts, chunk_size=chunk_size).view(logits.shape[:-1])


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is true (bool or 0/1 float).

    dim=None: scalar over all valid entries; else reduce ``dim``. Empty -> 0 (denominator >= 1).
    Masked-out entries never contribute, even if they hold inf/NaN.
    """
    m = mask.bool()
    xs = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return xs.sum() / m.sum().clamp(min=1).to(xs.dtype)
    return xs.sum(dim) / m.sum(dim).clamp(min=1).to(xs.dtype)


def masked_entropy(logits: Tensor, mask: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Token-mean entropy over ``mask``: sum_i H_i m_i / sum_i m_i (scalar, differentiable).

    logits [N, T, V], mask [N, T]. Every valid token weighs the same; this is NOT the paper's
    mean of per-sequence means (use ``masked_mean(token_entropy(...), mask, dim=-1)`` then mean).
    """
    return masked_mean(token_entropy(logits, chunk_size=chunk_size), mask)
