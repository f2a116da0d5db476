"""Kahneman-Tversky Optimization: one labelled completion at a time, no preference pairs.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7, as
TRL 1.16's KTOTrainer computes it (`loss_type="kto"`). With r = log pi(y) - log ref(y) the
completion's summed log-ratio and z0 the KL estimate:

    desirable:    L = desirable_weight   * (1 - sigmoid(beta (r - z0)))
    undesirable:  L = undesirable_weight * (1 - sigmoid(beta (z0 - r)))

One term per labelled completion, normalized by the step's completion count (the trainer's
pair count: each labelled completion is one "pair" (completion, its KL completion), see
ppo_train/data/kto.py).

z0 estimates KL(pi || ref) from mismatched completions: each prompt is scored with another
example's completion (the neighbouring example's, cyclic, as TRL builds its KL dataset), which in
the shared layout is one more response of the prompt's unit, so the prompt is encoded once for
both. z0 = max(0, mean over the step's mismatched completions of their log-ratio), detached;
the mean runs over the whole optimizer step, across micro-batches and ranks (a no-grad pass
gathers it before the step's first backward when the step has more than one micro-batch,
train.step_totals). TRL averages over its batch (the mean of the ranks' means): the same with
one micro-batch per step.

Metrics: `kl` (z0), and as TRL logs them `rewards/chosen` and `rewards/rejected` (beta r averaged
over the desirable, resp. undesirable completions: per completion, NaN where the label differs,
which the trainer leaves out of the mean; null in a step without such completions),
`rewards/margins` their difference, `logps/chosen` and `logps/rejected` likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppo_train.logps import ResponseLogps


@dataclass
class KtoConfig:
    """`loss=kto` (TRL's KTOConfig names and defaults)."""

    name: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def problems(self) -> list[str]:
        out = [] if self.beta > 0 else [f"loss.beta={self.beta}: expected > 0"]
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) < 0:
                out.append(f"loss.{key}={getattr(self, key)}: expected >= 0")
        return out


def kto_step_stats(policy: ResponseLogps, reference: ResponseLogps, pairs: torch.Tensor, cfg,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """(P, 1) detached, per labelled completion: its KL completion's log-ratio (the step's KL
    estimate is their mean)."""
    del cfg, labels  # the estimate reads neither
    kl = pairs[:, 1]
    return (policy.sums[kl] - reference.sums[kl]).detach().double()[:, None]


def _desirable(labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        raise ValueError("loss=kto needs each completion's label (the batch's pair_label)")
    return (labels > 0.5).to(torch.float64)


def kto_loss(policy: ResponseLogps, reference: ResponseLogps, pairs: torch.Tensor, cfg: KtoConfig,
             totals=None, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """pairs (P, 2) = (labelled completion, its KL completion), labels (P,) 1 desirable / 0 not ->
    per-completion loss (P,) and per-completion metric tensors (P,). `totals`: the step's
    (common.StepTotals, pair_stats from kto_step_stats); None: this batch is the step."""
    own = pairs[:, 0]
    if totals is not None and totals.pair_stats is not None:
        stats = totals.pair_stats.to(policy.sums.device)
    else:
        stats = kto_step_stats(policy, reference, pairs, cfg, labels)
    z0 = stats[:, 0].mean().clamp(min=0) if len(stats) else policy.sums.new_zeros(())
    good = _desirable(labels).to(policy.sums.device)
    r = policy.sums[own] - reference.sums[own]
    beta = float(cfg.beta)
    loss = (good * float(cfg.desirable_weight) * (1 - torch.sigmoid(beta * (r - z0)))
            + (1 - good) * float(cfg.undesirable_weight) * (1 - torch.sigmoid(beta * (z0 - r))))
    rewards, logps = beta * r.detach(), policy.sums[own].detach()
    nan = torch.full_like(rewards, float("nan"))  # not applicable: the trainer averages over the others
    metrics = {
        "kl": z0.detach().expand(len(own)).clone(),
        "rewards/chosen": torch.where(good > 0, rewards, nan),
        "rewards/rejected": torch.where(good > 0, nan, rewards),
        "logps/chosen": torch.where(good > 0, logps, nan),
        "logps/rejected": torch.where(good > 0, nan, logps),
    }
    return loss, metrics
