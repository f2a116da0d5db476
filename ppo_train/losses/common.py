"""The metrics every pairwise loss logs, under the names users know."""

from __future__ import annotations

import torch

from ppo_train.logps import ResponseLogps


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
