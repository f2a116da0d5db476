"""Direct Preference Optimization and its common variants.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model". With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) over
summed response log-probs:

- sigmoid (default):  L = -log sigmoid(beta * h)
- robust (Chowdhury et al. 2024, "Provably Robust DPO"), label smoothing eps:
      L = ((1 - eps) * -log sigmoid(beta h) + eps * log sigmoid(-beta h)) / (1 - 2 eps)
- hinge (SLiC, Zhao et al. 2023):  L = relu(1 - beta * h)
- ipo (Azar et al. 2023, "A General Theoretical Paradigm..."), on per-token *mean*
  log-probs as TRL computes it:  L = (h_mean - 1 / (2 beta))^2

Implicit rewards (the metrics): r_w = beta (log pi(y_w) - log ref(y_w)), r_l likewise
(with per-token means for ipo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ppo_train.choices import Choice
from ppo_train.logps import ResponseLogps
from ppo_train.losses.common import beta_and_smoothing_problems, pair_metrics


class DpoVariant(Choice):
    sigmoid = "sigmoid"
    ipo = "ipo"
    robust = "robust"
    hinge = "hinge"


@dataclass
class DpoConfig:
    """`loss=dpo`."""

    name: str = "dpo"
    beta: float = 0.1
    variant: DpoVariant = DpoVariant.sigmoid
    label_smoothing: float = 0.0  # robust only: the assumed rate of flipped labels

    def problems(self) -> list[str]:
        out = beta_and_smoothing_problems(self.beta, self.label_smoothing)
        if 0 < self.label_smoothing < 0.5 and self.variant != "robust":
            out.append(f"loss.label_smoothing={self.label_smoothing}: only used by loss.variant=robust")
        return out


def dpo_loss(policy: ResponseLogps, reference: ResponseLogps, pairs: torch.Tensor, cfg: DpoConfig
             ) -> tuple[torch.Tensor, dict]:
    """pairs (P, 2) -> per-pair loss (P,) and per-pair metric tensors (P,)."""
    w, l = pairs[:, 0], pairs[:, 1]
    if cfg.variant == "ipo":
        pol, ref = policy.means, reference.means
    else:
        pol, ref = policy.sums, reference.sums
    chosen_ratio = pol[w] - ref[w]
    rejected_ratio = pol[l] - ref[l]
    h = chosen_ratio - rejected_ratio
    beta = cfg.beta
    if cfg.variant == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif cfg.variant == "robust":
        eps = cfg.label_smoothing
        loss = ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif cfg.variant == "hinge":
        loss = torch.relu(1 - beta * h)
    elif cfg.variant == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss.variant={cfg.variant!r}: expected sigmoid, ipo, robust or hinge")
    # implicit rewards from the log-probs the loss used (per-token means for ipo, as TRL logs them)
    metrics = pair_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), policy, w, l)
    return loss, metrics
