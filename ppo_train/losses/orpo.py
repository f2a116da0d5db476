"""Odds Ratio Preference Optimization: SFT plus an odds-ratio penalty, no reference model.

Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
Model". With m the per-token mean log-prob of a response (P = exp(m), its geometric-mean
token probability), odds(y) = P / (1 - P), so

    log_odds(m) = m - log(1 - exp(m))
    ratio       = log_odds(m_w) - log_odds(m_l)          (the log odds ratio)
    L           = -m_w - lambda * log sigmoid(ratio)     (lambda = cfg.orpo_lambda, default 0.1)

-m_w is the preferred response's per-token mean NLL, computed per pair. TRL's ORPOTrainer
instead takes one cross-entropy averaged over all chosen tokens of the batch, so long
responses weigh more there; the two agree when chosen responses have equal lengths.

Metrics follow TRL's convention with beta = lambda: rewards r = lambda * m. Naming note:
TRL logs logsigmoid(ratio) as "log_odds_ratio" and ratio as "log_odds_chosen"; here
"log_odds_ratio" is the ratio itself, which is what the name says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ppo_train.logps import ResponseLogps
from ppo_train.losses.common import pair_metrics

# m = 0 (probability 1, e.g. a fully memorized or empty response) makes log(1 - exp(m))
# = -inf and its gradient inf -> nan. Capping m at -1e-12 keeps both finite and changes
# nothing real: one fp32 token log-prob that is not exactly 0 is already about 1e-7 or
# more in size, so a mean closer to 0 than 1e-12 is 0 up to rounding. Above the cap the
# odds-ratio term has no gradient; the NLL term still has one.
_MAX_MEAN = -1e-12


@dataclass
class OrpoConfig:
    """`loss=orpo`."""

    name: str = "orpo"
    orpo_lambda: float = 0.1  # weight of the odds-ratio term

    def problems(self) -> list[str]:
        return [f"loss.orpo_lambda={self.orpo_lambda}: expected >= 0"] if self.orpo_lambda < 0 else []


def log1mexp(m: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(m)) for m < 0, accurate everywhere (Maechler 2012, "Accurately Computing
    log(1 - exp(-|a|))"): log1p(-exp(m)) loses precision near 0, log(-expm1(m)) far from it."""
    m = m.clamp(max=_MAX_MEAN)
    near_zero = m > -math.log(2)
    # both branches are evaluated; feed each only inputs where it is finite, so the branch
    # not taken cannot put nan into the gradient through torch.where
    a = torch.log(-torch.expm1(torch.where(near_zero, m, torch.full_like(m, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(m, -1.0), m)))
    return torch.where(near_zero, a, b)


def orpo_loss(policy: ResponseLogps, reference: ResponseLogps | None, pairs: torch.Tensor,
              cfg: OrpoConfig, totals=None) -> tuple[torch.Tensor, dict]:
    """pairs (P, 2) -> per-pair loss (P,) and per-pair metric tensors (P,). reference is unused."""
    del reference  # reference-free by construction; the trainer may pass None
    w, l = pairs[:, 0], pairs[:, 1]
    lam = cfg.orpo_lambda
    means = policy.means
    m_w, m_l = means[w], means[l]
    ratio = (m_w - log1mexp(m_w)) - (m_l - log1mexp(m_l))
    nll = -m_w
    loss = nll - lam * F.logsigmoid(ratio)
    metrics = pair_metrics(lam * m_w.detach(), lam * m_l.detach(), policy, w, l)
    metrics.update({"nll": nll.detach(), "log_odds_ratio": ratio.detach()})
    return loss, metrics
