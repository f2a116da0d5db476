"""Per-response log-probs from hidden states: explicit target positions, chunked output head.

Peak memory of the head is one chunk of logits, (chunk, vocab) in fp32, not
(tokens, vocab): each chunk is recomputed in the backward (activation checkpointing)
instead of keeping its logits alive. Only response positions are projected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class ResponseLogps:
    sums: torch.Tensor  # (R,) float64 sum of token log-probs of each response
    counts: torch.Tensor  # (R,) float64 number of tokens of each response

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)

    def detach(self) -> "ResponseLogps":
        return ResponseLogps(self.sums.detach(), self.counts.detach())


def _token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V) for one chunk only
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(hidden: torch.Tensor, pred_index: torch.Tensor, targets: torch.Tensor,
                head: torch.nn.Module, chunk: int = 1024, num_chunks: int | None = None,
                recompute: bool = True) -> torch.Tensor:
    """hidden (B, L, H), pred_index (T,) flat positions, targets (T,) -> (T,) fp32 log-probs
    (log-softmax in fp32 whatever the model dtype).

    `num_chunks` >= ceil(T / chunk) makes exactly that many head calls: the extra ones run on
    one real row and add 0 to the result. Under ZeRO-3 every head call gathers the head's
    weights collectively, so all ranks must make the same number of calls (train.py passes the
    maximum over ranks); otherwise ranks with fewer response tokens would wait forever.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    n = pred_index.shape[0]
    own = -(-n // chunk)
    parts, extra = [], None
    for i in range(max(own, num_chunks or 0)):
        if i < own:
            h, t = flat.index_select(0, pred_index[i * chunk:(i + 1) * chunk]), targets[i * chunk:(i + 1) * chunk]
        else:
            h, t = flat[:1], targets.new_zeros(1)
        out = checkpoint(_token_logps, h, t, head, use_reentrant=False) if recompute and torch.is_grad_enabled() \
            else _token_logps(h, t, head)
        if i < own:
            parts.append(out)
        else:
            extra = 0.0 * out.sum() if extra is None else extra + 0.0 * out.sum()
    result = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return result if extra is None else result + extra


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
