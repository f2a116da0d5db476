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
| sft | RPO, Pang et al. 2024, in a list | -log pi(y_w) x pairs / preferred tokens of the step (below) |
| aot, aot_unpaired | AOT, Melnyk et al. 2024 | sorted over the whole step (below) |
| plackett_luce | Rafailov et al. 2023, App. A.3 | one term per list (below) |

f-divergences (Wang et al. 2023, "Beyond Reverse KL"; `loss.f_divergence`, as TRL's
`f_divergence_type`): reverse_kl s = t; forward_kl s = 1 - exp(-t); js_divergence
s = log 2 + log sigmoid(t); alpha_divergence s = (exp((alpha - 1) t) - 1) / (alpha - 1) with
alpha = `loss.f_alpha` ((alpha - 1) t clamped at 80, as TRL; alpha = 1 is reverse_kl), t the
log-ratio. As in TRL, an f-divergence applies to the terms that use the score difference
(sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop; sft reads no score); with any
other term it is refused at config time.

`loss.variant` may be a list (`[sigmoid, sft]` is RPO): the per-pair loss is the sum of the
terms times `loss.weights` (1 each when unset), as TRL's list of loss types with `loss_weights`.
`sft` in a mix is the negative log-likelihood of the preferred responses as a mean over the
step's preferred tokens: each pair contributes -log pi(y_w) times pairs / preferred tokens of
the whole step (StepTotals), so the summed loss divided by the step's pairs is the token mean
however the step is cut into micro-batches and ranks (TRL takes the mean over its batch: the
same with one micro-batch per step). A response preferred in several pairs (K > 2 lists) counts
once per pair.

`loss.ld_alpha` (LD-DPO, Liu et al. 2024, "Length Desensitization in Direct Preference
Optimization"; TRL's `ld_alpha`): in each pair, each response's log-prob (policy and reference)
is the sum over its first m = min(n_w, n_l) tokens plus alpha times the sum over the rest. With
K responses the partner, and so m, differs per pair: the policy computes these prefix sums from
its token log-probs, the cached reference table stores them per pair (two numbers per pair,
ReferenceTable.shared), a live reference computes them like the policy. null: plain sums.

`loss.wpo` (WPO, Zhou et al. 2024, "Weighted Preference Optimization", eq. 2; TRL's
`use_weighting`): every pair's loss is multiplied by w(y_w) w(y_l), detached, with
w(y) = exp(mean over y's tokens of log p(y_t) - log sum_v p(v)^2) under the policy; the fused
output head computes each token's sum of squared probabilities in its softmax pass (no
(tokens, vocab) tensor is kept). Refused with `sft` in the mix (TRL scales the batch's sft mean
by the batch's mean weight, which the step's first micro-batch cannot know).

`loss.variant=plackett_luce` (Rafailov et al. 2023, Appendix A.3; not a TRL name): one loss per
list of responses, L = -sum_k log(exp(beta r_k) / sum_{j >= k} exp(beta r_j)) over the list in
preference order, r the summed log-ratio. It is computed from the pairs: each response's
denominator holds itself and every response it is preferred to, which for a strictly ordered
list (all ordered pairs) is exactly the formula above. Ties follow the pair builder: tied
responses are not paired, so neither enters the other's denominator, and a response preferred
to none (the last, or a group tied at the bottom) adds no term. The loss is normalized by the
step's list count (not its pairs); the metrics are per pair as for the other variants. With
K = 2 it equals sigmoid. It takes no f-divergence, ld_alpha, WPO or mix.

`aot` and `aot_unpaired` (AOT, Melnyk et al. 2024, "Distributional Preference Alignment of
LLMs via Optimal Transport"; g(z) = -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z),
eps = `loss.label_smoothing`) sort over the pairs of the whole optimizer step, across
micro-batches and ranks (TRL sorts within its batch: the same with one micro-batch per step).
aot: with x = log pi(y_w) - log pi(y_l) and y the same under the reference, the k-th smallest x
is matched with the k-th smallest y: sum_k g(x_(k) - y_(k)). aot_unpaired: the k-th smallest
chosen log-ratio c with the k-th smallest rejected log-ratio r: sum_k g(c_(k) - r_(k)). The
ranks come from a no-grad forward of the step's micro-batches before its first backward (one
extra forward per step when the step has more than one micro-batch; `step_stats`, gathered over
ranks); each pair's term then takes its rank's partner value from that pass, detached, which
gives the sorted sum's value and gradient (aot_unpaired adds the rejected side's gradient as a
term of value 0). The per-pair terms follow the pairs, not the sorted positions, so the metrics
stay per pair.

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
from ppo_train.losses.common import StepTotals, beta_and_smoothing_problems, pair_metrics

# TRL 1.16's DPOConfig.loss_type names (all computed)
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LISTWISE = ("plackett_luce",)  # one loss per list of responses, not per pair
VARIANTS = TRL_LOSS_TYPES + LISTWISE
SORTED = ("aot", "aot_unpaired")  # sort over the whole step's pairs
LENGTH_NORMALIZED = ("ipo", "sigmoid_norm")
# the terms an f-divergence changes (TRL refuses the others: the f-DPO reparameterization only
# cancels in the chosen - rejected score difference); sft does not read the scores
F_DIVERGENCE_TERMS = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


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
    # a TRL loss_type name (or plackett_luce), or a list of TRL names combined with `weights`
    variant: Any = "sigmoid"
    weights: Optional[List[float]] = None  # one per variant; null: 1 each
    label_smoothing: float = 0.0  # robust: the assumed rate of flipped labels; exo_pair: its epsilon (> 0)
    f_divergence: FDivergence = FDivergence.reverse_kl
    f_alpha: float = 0.5  # alpha of f_divergence=alpha_divergence
    discopop_tau: float = 0.05  # the temperature of discopop's mixing
    ld_alpha: Optional[float] = None  # LD-DPO: the weight of the tokens past the shorter response's length
    wpo: bool = False  # WPO: weight each pair by its responses' length-normalized probabilities

    def problems(self) -> list[str]:
        names = variant_names(self.variant)
        out = beta_and_smoothing_problems(self.beta, self.label_smoothing)
        unknown = [n for n in names if n not in VARIANTS]
        if unknown or not names:
            out.append(f"loss.variant={self.variant}: expected one of {list(VARIANTS)} (TRL's loss_type names, "
                       "or plackett_luce) or a list of TRL names")
        if len(set(names)) != len(names):
            out.append(f"loss.variant={names}: a name appears twice (give it one weight instead)")
        if self.weights is not None:
            weights = list(self.weights)
            if len(weights) != len(names):
                out.append(f"loss.weights={weights}: expected one weight per loss.variant entry ({len(names)})")
            elif not all(math.isfinite(float(x)) for x in weights):
                out.append(f"loss.weights={weights}: expected finite numbers")
        if 0 < self.label_smoothing and not {"robust", "exo_pair", *SORTED} & set(names):
            out.append(f"loss.label_smoothing={self.label_smoothing}: only used by loss.variant robust, exo_pair, "
                       "aot and aot_unpaired")
        if "exo_pair" in names and self.label_smoothing <= 0:
            out.append("loss.label_smoothing=0 with loss.variant=exo_pair: expected 0 < value < 0.5 (EXO's epsilon; "
                       "its loss has log(epsilon); TRL's docs suggest 1e-3)")
        if str(self.f_divergence) != "reverse_kl" and set(names) - set(F_DIVERGENCE_TERMS):
            out.append(f"loss.f_divergence={self.f_divergence} with loss.variant "
                       f"{sorted(set(names) - set(F_DIVERGENCE_TERMS))}: those terms use the plain log-ratios; "
                       f"an f-divergence applies to {list(F_DIVERGENCE_TERMS)} only (as in TRL)")
        if self.discopop_tau <= 0:
            out.append(f"loss.discopop_tau={self.discopop_tau}: expected > 0")
        if self.ld_alpha is not None and not 0.0 <= float(self.ld_alpha) <= 1.0:
            out.append(f"loss.ld_alpha={self.ld_alpha}: expected null or 0 <= value <= 1 (1: plain sums)")
        if self.wpo and set(SORTED) & set(names):
            out.append("loss.wpo=true with aot/aot_unpaired: those terms follow sorted positions, not pairs, so a "
                       "per-pair weight does not apply (as in TRL)")
        if self.wpo and "sft" in names:
            out.append("loss.wpo=true with sft in loss.variant: TRL scales the batch's sft mean by the batch's mean "
                       "pair weight, which the step's first micro-batch cannot know; drop one of them")
        if "plackett_luce" in names:
            extra = [k for k, on in (("a mix (list of variants)", len(names) > 1),
                                     ("loss.ld_alpha", self.ld_alpha is not None), ("loss.wpo", self.wpo),
                                     ("loss.f_divergence", str(self.f_divergence) != "reverse_kl")) if on]
            if extra:
                out.append(f"loss.variant=plackett_luce: one loss per list, normalized by the lists; it takes no "
                           f"{', '.join(extra)}")
        return out


def variant_names(variant) -> list[str]:
    """`loss.variant` as a list of names (a single name, or a list from the config)."""
    if isinstance(variant, str) or not hasattr(variant, "__iter__"):
        return [str(variant)]
    return [str(v) for v in variant]


def per_list(cfg) -> bool:
    """Whether the loss has one term per list (normalized by the step's lists), not per pair."""
    return variant_names(getattr(cfg, "variant", "sigmoid")) == ["plackett_luce"]


def sorts_step(cfg) -> bool:
    """Whether a term sorts over the whole step (needs StepTotals.pair_stats)."""
    return bool(set(SORTED) & set(variant_names(getattr(cfg, "variant", "sigmoid"))))


def dpo_step_stats(policy: ResponseLogps, reference: ResponseLogps, pairs: torch.Tensor, cfg) -> torch.Tensor | None:
    """(P, 4) detached: policy chosen - rejected, the same under the reference, the chosen and the
    rejected log-ratio, per pair (what aot and aot_unpaired sort); None when no term sorts."""
    if not sorts_step(cfg):
        return None
    ld_alpha = getattr(cfg, "ld_alpha", None)
    pol_w, pol_l = pair_logps(policy, pairs, ld_alpha)
    ref_w, ref_l = pair_logps(reference, pairs, ld_alpha)
    return torch.stack([pol_w - pol_l, ref_w - ref_l, pol_w - ref_w, pol_l - ref_l], dim=1).detach()


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Each entry's position in the ascending (stable) order."""
    order = torch.argsort(values, stable=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _sorted_terms(name: str, beta: float, eps: float, x: torch.Tensor, c: torch.Tensor, r: torch.Tensor,
                  stats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per pair of this batch: its share of aot / aot_unpaired over the step (`stats` every pair
    of the step, `index` this batch's rows in it)."""
    def g(z):
        return -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)

    if name == "aot":  # the k-th policy margin against the k-th reference margin
        partner = torch.sort(stats[:, 1]).values[_ranks(stats[:, 0])[index]]
        return g(x - partner)
    chosen_partner = torch.sort(stats[:, 3]).values[_ranks(stats[:, 2])[index]]
    rejected_partner = torch.sort(stats[:, 2]).values[_ranks(stats[:, 3])[index]]
    rejected = g(rejected_partner - r)
    return g(c - chosen_partner) + rejected - rejected.detach()


def wants_shared_sums(cfg) -> bool:
    """ld_alpha needs each pair member's log-prob sum over the pair's shared length."""
    return getattr(cfg, "ld_alpha", None) is not None


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


def pair_logps(logps: ResponseLogps, pairs: torch.Tensor, ld_alpha: float | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (preferred, dispreferred) log-probs of each pair: plain sums, or under LD-DPO the sum
    over the pair's shared length plus ld_alpha times the rest."""
    w, l = pairs[:, 0], pairs[:, 1]
    if ld_alpha is None:
        return logps.sums[w], logps.sums[l]
    if logps.shared is None:
        raise ValueError("loss.ld_alpha needs each pair's shared-length sums; these scores were computed without "
                         "them (PolicyModule(shared_sums=True))")
    full = torch.stack([logps.sums[w], logps.sums[l]], dim=1)
    mixed = logps.shared + float(ld_alpha) * (full - logps.shared)
    return mixed[:, 0], mixed[:, 1]


def plackett_luce(logratio: torch.Tensor, pairs: torch.Tensor, beta: float) -> torch.Tensor:
    """-log(exp(s_i) / (exp(s_i) + sum over j that i is preferred to of exp(s_j))) for every
    response i preferred to at least one other, s = beta * log-ratio: the Plackett-Luce terms of
    every list (their sum over a list is its loss). (W,) for the W distinct preferred responses."""
    s = beta * logratio
    w, l = pairs[:, 0], pairs[:, 1]
    winners = torch.unique(w)
    top = s.detach().clone().scatter_reduce(0, w, s.detach()[l], "amax")  # a stable shift per winner
    rest = torch.zeros_like(s).index_add(0, w, torch.exp(s[l] - top[w]))
    sw, tw = s[winners], top[winners]
    return -(sw - tw - torch.log(torch.exp(sw - tw) + rest[winners]))


def _term(name: str, beta: float, c, r, sc, sr, nw, nl, cfg, sft) -> torch.Tensor:
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
    if name == "sft":
        return sft()
    raise ValueError(f"loss.variant={name!r}: not computed by pptrain (expected one of {list(VARIANTS)})")


def wpo_weights(policy: ResponseLogps, pairs: torch.Tensor) -> torch.Tensor:
    """WPO's per-pair weight w(y_w) w(y_l), detached (see the module docstring)."""
    if policy.wpo is None:
        raise ValueError("loss.wpo needs each response's WPO sum; these scores were computed without it "
                         "(PolicyModule(wpo=True))")
    per_response = torch.exp(policy.wpo.detach() / policy.counts.clamp(min=1))
    return per_response[pairs[:, 0]] * per_response[pairs[:, 1]]


def dpo_loss(policy: ResponseLogps, reference: ResponseLogps, pairs: torch.Tensor, cfg: DpoConfig,
             totals: StepTotals | None = None) -> tuple[torch.Tensor, dict]:
    """pairs (P, 2) -> the loss terms ((P,), one per pair: the weighted sum of the variant's terms;
    plackett_luce: one per preferred response, summing to the lists' losses) and per-pair metric
    tensors (P,). `totals`: the whole step's counts (sft in a mix); None: this batch's."""
    w, l = pairs[:, 0], pairs[:, 1]
    names = variant_names(cfg.variant)
    weights = list(getattr(cfg, "weights", None) or []) or [1.0] * len(names)
    ld_alpha = getattr(cfg, "ld_alpha", None)
    pol_w, pol_l = pair_logps(policy, pairs, ld_alpha)
    ref_w, ref_l = pair_logps(reference, pairs, ld_alpha)
    c, r = pol_w - ref_w, pol_l - ref_l
    beta = float(cfg.beta)
    if names == ["plackett_luce"]:
        loss = plackett_luce(policy.sums - reference.sums, pairs, beta)
        return loss, pair_metrics(beta * c.detach(), beta * r.detach(), policy, w, l)
    sc, sr = f_scores(c, cfg), f_scores(r, cfg)
    nw, nl = policy.counts[w].clamp(min=1), policy.counts[l].clamp(min=1)

    def sft() -> torch.Tensor:  # -log pi(y_w) * pairs / preferred tokens of the step
        t = totals if totals is not None else StepTotals.of_batch(policy, pairs)
        return -policy.sums[w] * (t.pairs / max(t.chosen_tokens, 1))

    def sorted_term(name: str) -> torch.Tensor:
        if totals is not None and totals.pair_stats is not None:
            stats, index = totals.pair_stats.to(c.device), totals.pair_index.to(c.device)
        else:  # this batch is the step
            stats, index = dpo_step_stats(policy, reference, pairs, cfg), torch.arange(len(pairs), device=c.device)
        eps = float(getattr(cfg, "label_smoothing", 0.0))
        return _sorted_terms(name, beta, eps, pol_w - pol_l, c, r, stats, index)

    loss = sum(float(weight) * (sorted_term(name) if name in SORTED else
                                _term(name, beta, c, r, sc, sr, nw, nl, cfg, sft))
               for name, weight in zip(names, weights))
    if getattr(cfg, "wpo", False):
        loss = loss * wpo_weights(policy, pairs)
    scored = [n for n in names if n != "sft"]
    if scored and all(name in LENGTH_NORMALIZED for name in scored):
        chosen, rejected = beta * c.detach() / nw, beta * r.detach() / nl
    else:
        chosen, rejected = beta * c.detach(), beta * r.detach()
    return loss, pair_metrics(chosen, rejected, policy, w, l)
