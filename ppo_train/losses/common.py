"""The metrics every pairwise loss logs, under the names users know."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ppo_train.logps import ResponseLogps


@dataclass(frozen=True)
class StepTotals:
    """Counts over the whole optimizer step (every micro-batch, every rank), known before its
    first forward: a term normalized by one of them gives the same gradient however the step is
    cut into micro-batches and ranks."""

    pairs: int
    lists: int  # units (prompts with their responses) of the step
    chosen_tokens: int  # tokens of the preferred response, summed over the step's pairs
    # a loss that ranks or averages over the whole step (aot): detached per-pair values of every
    # pair of the step (P_step, m), from a no-grad pass before the step's first backward, and the
    # rows of the current micro-batch's pairs in it (P,); None: the micro-batch is the step
    pair_stats: torch.Tensor | None = None
    pair_index: torch.Tensor | None = None

    def for_batch(self, index: torch.Tensor) -> "StepTotals":
        """These totals for one micro-batch whose pairs are rows `index` of pair_stats."""
        return replace(self, pair_index=index)

    @classmethod
    def of_step(cls, step) -> "StepTotals":
        """The counts of a data.schedule.Step."""
        return cls(step.pairs, len(step.units), step.chosen_tokens)

    @classmethod
    def of_batch(cls, policy: ResponseLogps, pairs: torch.Tensor) -> "StepTotals":
        """The pair and preferred-token counts of one micro-batch taken as the whole step (no
        schedule: scripts, tests; its lists are not known here and counted as its pairs)."""
        tokens = int(policy.counts[pairs[:, 0]].sum()) if pairs.numel() else 0
        return cls(int(pairs.shape[0]), int(pairs.shape[0]), tokens)


def beta_and_smoothing_problems(beta: float, label_smoothing: float) -> list[str]:
    """The range checks every sigmoid-of-a-scaled-margin loss shares."""
    out = [] if beta > 0 else [f"loss.beta={beta}: expected > 0"]
    if not 0 <= label_smoothing < 0.5:
        out.append(f"loss.label_smoothing={label_smoothing}: expected 0 <= value < 0.5")
    return out


def pair_metrics(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, policy: ResponseLogps,
                 w: torch.Tensor, l: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair (P,) metrics from the loss's implicit rewards; log-probs are sums (one scale
    for every loss, so runs compare)."""
    chosen, rejected = rewards_chosen.detach(), rewards_rejected.detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "logps/chosen": policy.sums[w].detach(),
        "logps/rejected": policy.sums[l].detach(),
    }
