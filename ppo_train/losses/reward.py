"""Bradley-Terry reward-model loss, in the loss interface of dpo_loss.

Here policy.sums holds one scalar reward r per response (R,), as the trainer passes a
reward head's outputs; policy.counts is unused. Per pair (y_w, y_l):

    L = -log sigmoid(r_w - r_l - margin) + center_coef * (r_w + r_l)^2

The first term is the Bradley-Terry likelihood (Ouyang et al. 2022, "Training language
models to follow instructions with human feedback", eq. 1); margin (default 0.0) asks
for a minimum reward gap (Touvron et al. 2023, "Llama 2", sec. 3.2.2), here one constant
rather than TRL's per-example `margin` column. The second term is TRL RewardTrainer's
`center_rewards_coefficient` (default 0.0 here, None = off in TRL), from Eisenstein et
al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate
Reward Hacking": BT only sees differences, so this pins the reward's free offset near 0.
TRL adds center_coef * mean((r_w + r_l)^2) to the batch mean loss; the per-pair term
here gives the same total once the trainer averages over pairs.

Metrics: rewards/accuracies is reward-model accuracy, the fraction with r_w > r_l.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ppo_train.logps import ResponseLogps


@dataclass
class RewardConfig:
    """`loss=reward`: a Bradley-Terry reward model (a one-label sequence classifier)."""

    name: str = "reward"
    margin: float = 0.0
    center_coef: float = 0.0  # reward centering (Eisenstein et al. 2023)

    def problems(self) -> list[str]:
        return [f"loss.center_coef={self.center_coef}: expected >= 0"] if self.center_coef < 0 else []


def reward_loss(policy: ResponseLogps, reference: ResponseLogps | None, pairs: torch.Tensor,
                cfg: RewardConfig, totals=None) -> tuple[torch.Tensor, dict]:
    """pairs (P, 2) -> per-pair loss (P,) and per-pair metric tensors (P,). reference is unused."""
    del reference  # a reward model has no reference; the trainer may pass None
    w, l = pairs[:, 0], pairs[:, 1]
    margin, center_coef = cfg.margin, cfg.center_coef
    rewards = policy.sums
    r_w, r_l = rewards[w], rewards[l]
    loss = -F.logsigmoid(r_w - r_l - margin)
    if center_coef:
        loss = loss + center_coef * (r_w + r_l) ** 2
    metrics = {
        "rewards/chosen": r_w.detach(),
        "rewards/rejected": r_l.detach(),
        "rewards/margins": (r_w - r_l).detach(),
        "rewards/accuracies": (r_w > r_l).float(),
    }
    return loss, metrics
