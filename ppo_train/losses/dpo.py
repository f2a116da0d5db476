"""Direct Preference Optimization and the pairwise losses TRL 1.16's DPOTrainer names.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model". Every term is computed from per-response log-prob sums (policy and reference)
and token counts, as TRL computes it (trl/trainer/dpo_trainer.py, `loss_type`). With
c = log pi(y_w) - log ref(y_w) and r = log pi(y_l) - log ref(y_l) (summed log-ratios), their
f-divergence scores s_c = f'(c), s_r = f'(r) (`loss.f_divergence`; reverse_kl: s = the
log-ratio itself), d = s_c - s_r, n_w, n_l the responses' token counts and beta `loss.beta`:

| `loss.variant` | paper | per-pair loss |
|---|---|---|
| sigmoid (default) | DPO, Rafailov et al. 2023 | -log sigmoid(beta d) |
| hinge | SLiC, Zhao et al. 2023 | relu(1 - beta d) |
| ipo | IPO, Azar et al. 2023 (per-token means, as TRL) | (s_c / n_w - s_r / n_l - 1 / (2 beta))^2 |
| exo_pair | EXO, Ji et al. 2024 (eps = `loss.label_smoothing` > 0) | q log(q / (1 - eps)) + (1 - q) log((1 - q) / eps), q = sigmoid(beta d) |
| nca_pair | NCA, Chen et al. 2024 | -log sigmoid(beta c) - log sigmoid(-beta c) / 2 - log sigmoid(-beta r) / 2 |
| robust | rDPO, Chowdhury et al. 2024 (eps = `loss.label_smoothing`) | ((1 - eps)(-log sigmoid(beta d)) + eps log sigmoid(-beta d)) / (1 - 2 eps) |
| bco_pair | BCO, Jung et al. 2024 (TRL's pairwise form, no running mean) | -log sigmoid(beta c) - log sigmoid(-beta r) |
| sppo_hard | SPPO, Wu et al. 2024 (hard probabilities) | (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2 |
| apo_zero | APO, D'Oosterlinck et al. 2024, eq. 7 | 1 - sigmoid(beta c) + sigmoid(beta r) |
| apo_down | APO, eq. 8 | sigmoid(beta c) + 1 - sigmoid(beta (c - r)) |
| discopop | DiscoPOP, Chris Lu et al. 2024, eq. 5 (tau = `loss.discopop_tau`) | (1 - m)(-log sigmoid(beta d)) + m exp(-beta d), m = sigmoid(beta d / tau) |
| sigmoid_norm | length-normalized DPO (Tulu 3, Lambert et al. 2024) | -log sigmoid(beta (s_c / n_w - s_r / n_l)) |

f-divergences (Wang et al. 2023, "Beyond Reverse KL"; `loss.f_divergence`, as TRL's
`f_divergence_type`): reverse_kl s = t; forward_kl s = 1 - exp(-t); js_divergence
s = log 2 + log sigmoid(t); alpha_divergence s = (exp((alpha - 1) t) - 1) / (alpha - 1) with
alpha = `loss.f_alpha` ((alpha - 1) t clamped at 80, as TRL; alpha = 1 is reverse_kl), t the
log-ratio. As in TRL, an f-divergence applies to the terms that use the score difference
(sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop); with any other term it is
refused at config time.

`loss.variant` may be a list (`[sigmoid, hinge]`): the per-pair loss is the sum of the terms
times `loss.weights` (1 each when unset), as TRL's list of loss types with `loss_weights`. Not
yet supported: `aot` and `aot_unpaired` (they sort over the whole step's pairs), `sft` in a mix
(a token mean over the step's chosen responses), `ld_alpha` and WPO weighting: refused at
config time, naming the key.

Implicit rewards (the metrics): beta * (log pi - log ref) per response, as per-token means when
every term is length-normalized (ipo, sigmoid_norm), else as sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn.functional as F

from ppo_train.choices import Choice
from ppo_train.logps import ResponseLogps
from ppo_train.losses.common import beta_and_smoothing_problems, pair_metrics

# TRL 1.16's DPOConfig.loss_type names; the ones pptrain does not compute yet, and why
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
NOT_YET = {"aot": "it sorts the log-ratios over the whole optimizer step, across micro-batches and ranks",
           "aot_unpaired": "it sorts the log-ratios over the whole optimizer step, across micro-batches and ranks",
           "sft": "in a mix it is a token mean over the step's chosen responses; use loss=sft on its own"}
LENGTH_NORMALIZED = ("ipo", "sigmoid_norm")
# the terms an f-divergence changes (TRL refuses the others: the f-DPO reparameterization only
# cancels in the chosen - rejected score difference)
F_DIVERGENCE_TERMS = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")


class FDivergence(Choice):
    reverse_kl = "reverse_kl"
    forward_kl = "forward_kl"
    js_divergence = "js_divergence"
    alpha_divergence = "alpha_divergence"


@dataclass
class DpoConfig:
    """`loss=dpo`."""

    name: str = "dpo"
    beta: float = 0.1
    # a TRL loss_type name, or a list of them combined with `weights`
    variant: Any = "sigmoid"
    weights: Optional[List[float]] = None  # one per variant; null: 1 each
    label_smoothing: float = 0.0  # robust: the assumed rate of flipped labels; exo_pair: its epsilon (> 0)
    f_divergence: FDivergence = FDivergence.reverse_kl
    f_alpha: float = 0.5  # alpha of f_divergence=alpha_divergence
    discopop_tau: float = 0.05  # the temperature of discopop's mixing

    def problems(self) -> list[str]:
        names = variant_names(self.variant)
        out = beta_and_smoothing_problems(self.beta, self.label_smoothing)
        unknown = [n for n in names if n not in TRL_LOSS_TYPES]
        if unknown or not names:
            out.append(f"loss.variant={self.variant}: expected one of {list(TRL_LOSS_TYPES)} (TRL's loss_type "
                       "names) or a list of them")
        for name in names:
            if name in NOT_YET:
                out.append(f"loss.variant={name}: not supported yet: {NOT_YET[name]}")
        if len(set(names)) != len(names):
            out.append(f"loss.variant={names}: a name appears twice (give it one weight instead)")
        if self.weights is not None:
            weights = list(self.weights)
            if len(weights) != len(names):
                out.append(f"loss.weights={weights}: expected one weight per loss.variant entry ({len(names)})")
            elif not all(math.isfinite(float(x)) for x in weights):
                out.append(f"loss.weights={weights}: expected finite numbers")
        if 0 < self.label_smoothing and not {"robust", "exo_pair"} & set(names):
            out.append(f"loss.label_smoothing={self.label_smoothing}: only used by loss.variant robust and exo_pair")
        if "exo_pair" in names and self.label_smoothing <= 0:
            out.append("loss.label_smoothing=0 with loss.variant=exo_pair: expected 0 < value < 0.5 (EXO's epsilon; "
                       "its loss has log(epsilon); TRL's docs suggest 1e-3)")
        if str(self.f_divergence) != "reverse_kl" and set(names) - set(F_DIVERGENCE_TERMS):
            out.append(f"loss.f_divergence={self.f_divergence} with loss.variant "
                       f"{sorted(set(names) - set(F_DIVERGENCE_TERMS))}: those terms use the plain log-ratios; "
                       f"an f-divergence applies to {list(F_DIVERGENCE_TERMS)} only (as in TRL)")
        if self.discopop_tau <= 0:
            out.append(f"loss.discopop_tau={self.discopop_tau}: expected > 0")
        return out


def variant_names(variant) -> list[str]:
    """`loss.variant` as a list of names (a single name, or a list from the config)."""
    if isinstance(variant, str) or not hasattr(variant, "__iter__"):
        return [str(variant)]
    return [str(v) for v in variant]


def f_scores(logratio: torch.Tensor, cfg) -> torch.Tensor:
    """f'(exp(t)) of each log-ratio t under `loss.f_divergence` (TRL's f_divergence_type)."""
    kind = str(getattr(cfg, "f_divergence", "reverse_kl"))
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":
        alpha = float(getattr(cfg, "f_alpha", 0.5))
        if abs(alpha - 1.0) < 1e-6:  # the limit is log t: reverse KL
            return logratio
        return (torch.exp(torch.clamp((alpha - 1.0) * logratio, max=80.0)) - 1.0) / (alpha - 1.0)
    raise ValueError(f"loss.f_divergence={kind!r}: expected one of {[m.value for m in FDivergence]}")


def _term(name: str, beta: float, c, r, sc, sr, nw, nl, cfg) -> torch.Tensor:
    d = sc - sr
    eps = float(getattr(cfg, "label_smoothing", 0.0))
    if name == "sigmoid":
        return -F.logsigmoid(beta * d)
    if name == "hinge":
        return torch.relu(1 - beta * d)
    if name == "ipo":
        return (sc / nw - sr / nl - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        return (torch.sigmoid(beta * d) * (F.logsigmoid(beta * d) - math.log1p(-eps))
                + torch.sigmoid(-beta * d) * (F.logsigmoid(-beta * d) - math.log(eps)))
    if name == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if name == "robust":
        return ((1 - eps) * -F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if name == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if name == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))
    if name == "discopop":
        logits = beta * d
        mix = torch.sigmoid(logits / float(getattr(cfg, "discopop_tau", 0.05)))
        return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
    if name == "sigmoid_norm":
        return -F.logsigmoid(beta * (sc / nw - sr / nl))
    raise ValueError(f"loss.variant={name!r}: not computed by pptrain (expected one of {list(TRL_LOSS_TYPES)})")


def dpo_loss(policy: ResponseLogps, reference: ResponseLogps, pairs: torch.Tensor, cfg: DpoConfig
             ) -> tuple[torch.Tensor, dict]:
    """pairs (P, 2) -> per-pair loss (P,) (the weighted sum of the variant's terms) and per-pair
    metric tensors (P,)."""
    w, l = pairs[:, 0], pairs[:, 1]
    names = variant_names(cfg.variant)
    weights = list(getattr(cfg, "weights", None) or []) or [1.0] * len(names)
    c = policy.sums[w] - reference.sums[w]
    r = policy.sums[l] - reference.sums[l]
    sc, sr = f_scores(c, cfg), f_scores(r, cfg)
    nw, nl = policy.counts[w].clamp(min=1), policy.counts[l].clamp(min=1)
    beta = float(cfg.beta)
    loss = sum(float(weight) * _term(name, beta, c, r, sc, sr, nw, nl, cfg) for name, weight in zip(names, weights))
    if all(name in LENGTH_NORMALIZED for name in names):
        chosen, rejected = beta * c.detach() / nw, beta * r.detach() / nl
    else:
        chosen, rejected = beta * c.detach(), beta * r.detach()
    return loss, pair_metrics(chosen, rejected, policy, w, l)
