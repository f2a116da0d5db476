"""Simple Preference Optimization: a reference-free, length-normalized DPO.

Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
Reward". With m_w, m_l the per-token *mean* log-probs of the preferred and dispreferred
responses under the policy:

    z = beta * (m_w - m_l) - gamma
    L = -log sigmoid(z)                                  (label_smoothing eps = 0)
    L = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)   (conservative, eps > 0)

gamma is the absolute target margin, subtracted after scaling by beta. Recommended
defaults: beta = 2.0, gamma = 1.0 (gamma / beta = 0.5). The SimPO repo exposes the ratio
instead (`gamma_beta_ratio`, it computes beta * (m_w - m_l - gamma_beta_ratio)); TRL's
CPOTrainer(loss_type="simpo", cpo_alpha=0) exposes the absolute margin as `simpo_gamma`,
as here (with cpo_alpha > 0 TRL also adds an NLL term on the chosen response).
The eps form has no 1/(1 - 2 eps) factor (unlike robust DPO): it is the SimPO code's.

Implicit rewards (the metrics): r = beta * m, as the SimPO repo and TRL log them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ppo_train.logps import ResponseLogps
from ppo_train.losses.common import beta_and_smoothing_problems, pair_metrics


@dataclass
class SimpoConfig:
    """`loss=simpo`."""

    name: str = "simpo"
    beta: float = 2.0
    gamma: float = 1.0  # the target margin, subtracted after scaling by beta
    label_smoothing: float = 0.0

    def problems(self) -> list[str]:
        return beta_and_smoothing_problems(self.beta, self.label_smoothing)


def simpo_loss(policy: ResponseLogps, reference: ResponseLogps | None, pairs: torch.Tensor,
               cfg: SimpoConfig, totals=None) -> tuple[torch.Tensor, dict]:
    """pairs (P, 2) -> per-pair loss (P,) and per-pair metric tensors (P,). reference is unused."""
    del reference  # reference-free by construction; the trainer may pass None
    w, l = pairs[:, 0], pairs[:, 1]
    beta, gamma, eps = cfg.beta, cfg.gamma, cfg.label_smoothing
    means = policy.means  # length normalization is what makes SimPO's reward reference-free
    z = beta * (means[w] - means[l]) - gamma
    loss = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
    metrics = pair_metrics(beta * means[w].detach(), beta * means[l].detach(), policy, w, l)
    return loss, metrics
