"""Per-response log-probs from hidden states: explicit target positions, chunked output head.

Only response positions are projected, in chunks of `chunk` tokens. Two implementations of
the same function:

- a plain `torch.nn.Linear` head whose weight is a whole tensor (every case except ZeRO-3,
  LoRA on the head or a biased head) goes through `LinearLogProbs`, one autograd function that
  writes each chunk's logits into one buffer and turns them into probabilities in place: the
  backward is `(softmax - onehot)` times the head's two matmuls, with no (tokens, vocab)
  temporaries beyond that buffer. With `recompute` the buffer is one chunk and the backward
  recomputes each chunk's logits (peak memory one chunk); without, it holds every response
  token's probabilities until the backward (no second head matmul).
- any other head (a ZeRO-3 partitioned weight, which only the module's own hooks can gather; a
  LoRA-wrapped or biased head) is called as a module, chunk by chunk, under activation
  checkpointing when `recompute`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ppo_train.precision import autocast


@dataclass
class ResponseLogps:
    sums: torch.Tensor  # (R,) float64 sum of token log-probs of each response
    counts: torch.Tensor  # (R,) float64 number of tokens of each response
    # (P, 2) float64: each pair member's sum over its first min(n_w, n_l) tokens (LD-DPO), or None
    shared: torch.Tensor | None = None
    # (R,) float64: sum over each response's tokens of log p(y_t) - log sum_v p(v)^2 (WPO), or None
    wpo: torch.Tensor | None = None

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)

    def detach(self) -> "ResponseLogps":
        return ResponseLogps(self.sums.detach(), self.counts.detach(),
                             None if self.shared is None else self.shared.detach(),
                             None if self.wpo is None else self.wpo.detach())


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out (n, V) fp32 <- hidden (n, H) @ weight (V, H)^T, computed in the weight's dtype."""
    if weight.dtype == torch.float32:
        return torch.mm(hidden, weight.t(), out=out)
    return out.copy_(hidden @ weight.t())


def _exp_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place: logits (n, V) -> exp(logits - max); returns (target logit, logsumexp, row sums)."""
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    top = logits.amax(-1)
    total = logits.sub_(top[:, None]).exp_().sum(-1)
    return picked, top + total.log(), total


class LinearLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight^T)[i, targets[i]] for each row, in fp32, chunked.

    The two matmuls run in `dtype` (None: the weight's; bf16 mixed precision over fp32 weights
    passes bf16, and the weight is cast once per call), the softmax and its gradient in fp32; the
    weight's gradient is summed over chunks in fp32 and returned in the weight's dtype. `sq_out`
    (n,) fp32, when given, receives each row's log sum_v softmax_v^2 (WPO; no gradient)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                recompute: bool, dtype: torch.dtype | None = None, sq_out: torch.Tensor | None = None
                ) -> torch.Tensor:
        w = weight if dtype is None else weight.to(dtype)  # the compute copy (the weight itself when no cast)
        n, vocab = hidden.shape[0], weight.shape[0]
        out = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        keep = None if recompute else hidden.new_empty(n, vocab, dtype=torch.float32)
        buf = hidden.new_empty(min(chunk, n), vocab, dtype=torch.float32) if recompute else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = _logits_into(buf[:e - s] if recompute else keep[s:e], hidden[s:e].to(w.dtype), w)
            picked, lse[s:e], total = _exp_(logits, targets[s:e])
            out[s:e] = picked - lse[s:e]
            if sq_out is not None:  # WPO: log sum_v p(v)^2 = 2 log(||exp(l - max)|| / total), no (n, V) temporary
                sq_out[s:e] = 2 * (torch.linalg.vector_norm(logits, dim=-1).log() - total.log())
            if not recompute:  # keep the probabilities for the backward
                logits.div_(total[:, None])
        ctx.recompute, ctx.chunk, ctx.weight_dtype = recompute, chunk, weight.dtype
        ctx.save_for_backward(hidden, w, targets, lse, keep)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, w, targets, lse, keep = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, chunk = hidden.shape[0], ctx.chunk
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = None  # the first chunk's product, then accumulated into (no zero-filled buffer)
        buf = hidden.new_empty(min(chunk, n), w.shape[0], dtype=torch.float32) if ctx.recompute and n else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e].to(w.dtype)
            if ctx.recompute:
                probs = _logits_into(buf[:e - s], h, w)
                probs.sub_(lse[s:e, None]).exp_()
            else:
                probs = keep[s:e]  # consumed: this backward cannot run twice (no retain_graph)
            # d log p[t] / d logits = onehot(t) - softmax; the upstream gradient scales rows,
            # applied to the (n, H) sides of the matmuls instead of the (n, V) block
            probs[torch.arange(e - s, device=probs.device), targets[s:e]] -= 1.0
            g = -grad_out[s:e, None]
            low = probs.to(w.dtype)  # one conversion for both matmuls (no copy in fp32)
            if want_h:
                grad_h[s:e] = (low @ w).to(hidden.dtype) * g.to(hidden.dtype)
            if want_w and w.dtype == torch.float32:
                grad_w = probs.t() @ (h * g) if grad_w is None else grad_w.addmm_(probs.t(), h * g)
            elif want_w:  # the matmul in the compute dtype, the sum over chunks in fp32
                part = (low.t() @ (h * g.to(w.dtype))).float()
                grad_w = part if grad_w is None else grad_w.add_(part)
        if want_w and grad_w is None:  # no response tokens: a zero gradient keeps the head in the graph
            grad_w = torch.zeros(w.shape, dtype=ctx.weight_dtype, device=w.device)
        return grad_h, grad_w.to(ctx.weight_dtype) if want_w else None, None, None, None, None, None


def fusable(head: torch.nn.Module) -> bool:
    """A plain linear head without bias whose weight is a whole tensor (not ZeRO-3 partitioned)."""
    return type(head) is torch.nn.Linear and head.bias is None and not hasattr(head.weight, "ds_id")


def _token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                 dtype: torch.dtype | None = None, sq: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs of the targets, log sum_v p(v)^2 per row when `sq`, detached)."""
    with autocast(hidden.device.type, dtype):
        logits = head(hidden).float()  # (n, V) for one chunk only
    lse = torch.logsumexp(logits, dim=-1)
    lss = (torch.logsumexp(2 * logits.detach(), dim=-1) - 2 * lse.detach()) if sq else None
    return logits.gather(-1, targets[:, None]).squeeze(-1) - lse, lss


def token_logps(hidden: torch.Tensor, pred_index: torch.Tensor, targets: torch.Tensor,
                head: torch.nn.Module, chunk: int = 1024, num_chunks: int | None = None,
                recompute: bool = True, dtype: torch.dtype | None = None, sq: bool = False):
    """hidden (B, L, H), pred_index (T,) flat positions, targets (T,) -> (T,) fp32 log-probs
    (log-softmax in fp32 whatever the model dtype). `dtype`: the head's matmuls in it (bf16 mixed
    precision over fp32 weights); None: in the weight's dtype. `sq`: also return (T,) fp32
    log sum_v p(v)^2 of each position (WPO), without gradient: (log-probs, that).

    `num_chunks` >= ceil(T / chunk) makes exactly that many head calls: the extra ones run on
    one real row and add 0 to the result. Under ZeRO-3 every head call gathers the head's
    weights collectively, so all ranks must make the same number of calls (train.py passes the
    maximum over ranks); otherwise ranks with fewer response tokens would wait forever. The
    fused head gathers nothing and makes one call.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    if fusable(head):
        grads = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
        sq_out = flat.new_empty(pred_index.shape[0], dtype=torch.float32) if sq else None
        out = LinearLogProbs.apply(flat.index_select(0, pred_index), head.weight, targets, chunk,
                                   recompute or not grads, dtype, sq_out)
        return (out, sq_out) if sq else out
    n = pred_index.shape[0]
    own = -(-n // chunk)
    parts, squares, extra = [], [], None
    for i in range(max(own, num_chunks or 0)):
        if i < own:
            h, t = flat.index_select(0, pred_index[i * chunk:(i + 1) * chunk]), targets[i * chunk:(i + 1) * chunk]
        else:
            h, t = flat[:1], targets.new_zeros(1)
        out, lss = checkpoint(_token_logps, h, t, head, dtype, sq, use_reentrant=False) \
            if recompute and torch.is_grad_enabled() else _token_logps(h, t, head, dtype, sq)
        if i < own:
            parts.append(out)
            squares.append(lss)
        else:
            extra = 0.0 * out.sum() if extra is None else extra + 0.0 * out.sum()
    result = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    result = result if extra is None else result + extra
    if not sq:
        return result
    return result, torch.cat(squares) if squares else flat.new_zeros(0, dtype=torch.float32)


def shared_sums(values: torch.Tensor, owner: torch.Tensor, counts: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """values (T,) token log-probs, owner (T,) their response (each response's tokens contiguous
    and in order, as collate lays them out), counts (R,), pairs (P, 2) -> (P, 2) float64: each
    pair member's sum over its first min(n_w, n_l) tokens (differentiable in `values`)."""
    if pairs.numel() == 0:
        return values.new_zeros((0, 2), dtype=torch.float64)
    cum = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])  # (T + 1,)
    n = counts.long()
    first = torch.full_like(n, owner.numel()).scatter_reduce(0, owner, torch.arange(owner.numel(), device=owner.device),
                                                              "amin")
    start = torch.where(n > 0, first, torch.zeros_like(first))  # a response without tokens: any start (m = 0)
    m = torch.minimum(n[pairs[:, 0]], n[pairs[:, 1]])[:, None]  # (P, 1)
    lo = start[pairs]  # (P, 2) each member's first token
    return cum[lo + m] - cum[lo]


def sum_per_response(values: torch.Tensor, owner: torch.Tensor, num_responses: int) -> ResponseLogps:
    """values (T,) fp32, owner (T,) response index -> sums and token counts per response.

    Accumulated in float64: a response sum has hundreds of terms and DPO takes the
    difference of two such sums, so fp32 accumulation order alone would move it by
    more than 1e-5. The cost is R numbers.
    """
    sums = torch.zeros(num_responses, dtype=torch.float64, device=values.device).index_add(0, owner, values.double())
    counts = torch.zeros(num_responses, dtype=torch.float64, device=values.device).index_add(
        0, owner, torch.ones_like(values, dtype=torch.float64))
    return ResponseLogps(sums, counts)
