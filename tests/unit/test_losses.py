"""Losses: hand-derived values, agreement with TRL's formulas, stability, gradients.

Three independent checks per loss:
- a value derived by hand in the docstring, step by step, for one pair;
- a "peer" re-implementation that follows the widely used code (TRL's DPOTrainer,
  CPOTrainer with loss_type="simpo", ORPOTrainer, RewardTrainer, SFT cross-entropy)
  line by line, starting from padded per-token log-probs as TRL does, compared on 16
  random pairs over units of K = 4 responses;
- edge cases: ORPO near probability 1 and very small, DPO's analytic gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ppo_train.logps import ResponseLogps, sum_per_response
from ppo_train.losses.dpo import dpo_loss
from ppo_train.losses.orpo import orpo_loss
from ppo_train.losses.reward import reward_loss
from ppo_train.losses.sft import sft_loss
from ppo_train.losses.simpo import simpo_loss

F64 = torch.float64
PAIR = torch.tensor([[0, 1]])


def rl(sums, counts=None) -> ResponseLogps:
    sums = torch.tensor(sums, dtype=F64)
    counts = torch.ones_like(sums) if counts is None else torch.tensor(counts, dtype=F64)
    return ResponseLogps(sums, counts)


def assert_close(got, want, tol, what):
    got = torch.as_tensor(got, dtype=F64).detach()
    want = torch.as_tensor(want, dtype=F64).detach()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    assert diff <= tol, f"{what}: max |got - want| = {diff:.3e} > {tol:.0e}\n got={got.tolist()}\nwant={want.tolist()}"


def softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x)), computed in plain math."""
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------------------- hand values

DPO_POL, DPO_REF = rl([-10.0, -14.0], [5.0, 7.0]), rl([-11.0, -12.0], [5.0, 7.0])


def dpo_cfg(variant, beta=0.1, eps=0.0):
    return OmegaConf.create({"beta": beta, "variant": variant, "label_smoothing": eps})


def test_dpo_sigmoid_hand_value():
    """policy sums [-10, -14], reference sums [-11, -12], pair (0, 1), beta 0.1.
    h = (-10 - -11) - (-14 - -12) = 1 - (-2) = 3;  beta h = 0.3
    L = -log sigmoid(0.3) = log(1 + exp(-0.3)) = log(1.7408182...) = 0.5543552444685271
    rewards: chosen 0.1 * 1 = 0.1, rejected 0.1 * -2 = -0.2, margin 0.3, accuracy 1."""
    loss, m = dpo_loss(DPO_POL, DPO_REF, PAIR, dpo_cfg("sigmoid"))
    assert_close(loss, [-math.log(1 / (1 + math.exp(-0.3)))], 1e-9, "dpo sigmoid loss")
    assert_close(loss, [0.5543552444685271], 1e-9, "dpo sigmoid loss (literal)")
    assert_close(m["rewards/chosen"], [0.1], 1e-12, "rewards/chosen")
    assert_close(m["rewards/rejected"], [-0.2], 1e-12, "rewards/rejected")
    assert_close(m["rewards/margins"], [0.3], 1e-12, "rewards/margins")
    assert_close(m["rewards/accuracies"], [1.0], 0, "rewards/accuracies")
    assert_close(m["logps/chosen"], [-10.0], 0, "logps/chosen")
    assert_close(m["logps/rejected"], [-14.0], 0, "logps/rejected")


def test_dpo_robust_hand_value():
    """Same inputs, beta 0.1, eps 0.1, so beta h = 0.3.
    -log sigmoid(0.3) = 0.5543552444685271;  log sigmoid(-0.3) = -log(1 + e^0.3) = -0.8543552444685272
    L = (0.9 * 0.5543552444685271 + 0.1 * -0.8543552444685272) / (1 - 0.2)
      = (0.4989197200216744 - 0.0854355244468527) / 0.8 = 0.5168552444685272
    Check: since -log sigmoid(-z) = z - log sigmoid(z), L = -log sigmoid(z) - eps z / (1 - 2 eps)
      = 0.5543552444685271 - 0.03 / 0.8 = 0.5543552444685271 - 0.0375."""
    loss, _ = dpo_loss(DPO_POL, DPO_REF, PAIR, dpo_cfg("robust", eps=0.1))
    want = (0.9 * softplus_neg(0.3) + 0.1 * -math.log1p(math.exp(0.3))) / 0.8
    assert_close(loss, [want], 1e-9, "dpo robust loss")
    assert_close(loss, [softplus_neg(0.3) - 0.0375], 1e-9, "dpo robust loss (closed form)")


@pytest.mark.parametrize("beta,want", [(0.1, 0.7), (0.5, 0.0)])
def test_dpo_hinge_hand_value(beta, want):
    """Same inputs, h = 3.  beta 0.1: relu(1 - 0.3) = 0.7.  beta 0.5: relu(1 - 1.5) = relu(-0.5) = 0."""
    loss, _ = dpo_loss(DPO_POL, DPO_REF, PAIR, dpo_cfg("hinge", beta=beta))
    assert_close(loss, [want], 1e-9, f"dpo hinge loss beta={beta}")


def test_dpo_ipo_hand_value():
    """IPO uses per-token means. counts [5, 7] for both models.
    policy means: -10/5 = -2, -14/7 = -2;  reference means: -11/5 = -2.2, -12/7 = -1.7142857142857142
    h = (-2 - -2.2) - (-2 - -1.7142857142857142) = 0.2 + 0.2857142857142857 = 0.4857142857142857
    beta 0.1: 1 / (2 beta) = 5;  L = (0.4857142857142857 - 5)^2 = (-4.514285714285714)^2 = 20.378775510204083."""
    loss, _ = dpo_loss(DPO_POL, DPO_REF, PAIR, dpo_cfg("ipo"))
    h = (-2 - -2.2) - (-2 - -12 / 7)
    assert_close(loss, [(h - 5) ** 2], 1e-9, "dpo ipo loss")
    assert_close(loss, [20.378775510204083], 1e-9, "dpo ipo loss (literal)")


SIMPO_POL = rl([-10.0, -21.0], [5.0, 7.0])  # means -2 and -3


def test_simpo_hand_value():
    """sums [-10, -21], counts [5, 7] -> means m_w = -2, m_l = -3; beta 2.0, gamma 1.0.
    z = 2.0 * (-2 - -3) - 1.0 = 2.0 - 1.0 = 1.0
    L = -log sigmoid(1) = log(1 + e^-1) = log(1.3678794411714423) = 0.31326168751822286
    rewards: chosen 2 * -2 = -4, rejected 2 * -3 = -6, margin 2, accuracy 1; logps are sums."""
    cfg = OmegaConf.create({"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0})
    loss, m = simpo_loss(SIMPO_POL, None, PAIR, cfg)
    assert_close(loss, [-math.log(1 / (1 + math.exp(-1.0)))], 1e-9, "simpo loss")
    assert_close(loss, [0.31326168751822286], 1e-9, "simpo loss (literal)")
    assert_close(m["rewards/chosen"], [-4.0], 1e-12, "rewards/chosen")
    assert_close(m["rewards/rejected"], [-6.0], 1e-12, "rewards/rejected")
    assert_close(m["rewards/margins"], [2.0], 1e-12, "rewards/margins")
    assert_close(m["rewards/accuracies"], [1.0], 0, "rewards/accuracies")
    assert_close(m["logps/chosen"], [-10.0], 0, "logps/chosen")
    assert_close(m["logps/rejected"], [-21.0], 0, "logps/rejected")


def test_simpo_label_smoothing_hand_value():
    """Same inputs, z = 1.0, eps 0.1, SimPO's form (no 1 / (1 - 2 eps)):
    -log sigmoid(1) = 0.31326168751822286;  -log sigmoid(-1) = log(1 + e) = 1.3132616875182228
    L = 0.9 * 0.31326168751822286 + 0.1 * 1.3132616875182228 = 0.28193551876640057 + 0.13132616875182228
      = 0.41326168751822286   (= -log sigmoid(z) + eps z = 0.31326... + 0.1)."""
    cfg = OmegaConf.create({"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.1})
    loss, _ = simpo_loss(SIMPO_POL, None, PAIR, cfg)
    assert_close(loss, [0.9 * softplus_neg(1.0) + 0.1 * math.log1p(math.e)], 1e-9, "simpo eps loss")
    assert_close(loss, [softplus_neg(1.0) + 0.1], 1e-9, "simpo eps loss (closed form)")


def test_orpo_hand_value():
    """sums [-10, -21], counts [5, 7] -> m_w = -2, m_l = -3; lambda 0.1.
    1 - e^-2 = 1 - 0.1353352832366127 = 0.8646647167633873;  log of it = -0.14541345786885906
    log_odds(-2) = -2 - (-0.14541345786885906) = -1.854586542131141
    1 - e^-3 = 1 - 0.049787068367863944 = 0.950212931632136;  log of it = -0.05106918094270159
    log_odds(-3) = -3 - (-0.05106918094270159) = -2.9489308190572983
    ratio = -1.854586542131141 - -2.9489308190572983 = 1.0943442769261573
    log sigmoid(ratio) = -log(1 + e^-1.0943442769261573) = -0.2887507843446179
    nll_w = 2;  L = 2 - 0.1 * -0.2887507843446179 = 2.028875078434462."""
    lo_w = -2 - math.log(1 - math.exp(-2))
    lo_l = -3 - math.log(1 - math.exp(-3))
    ratio = lo_w - lo_l
    cfg = OmegaConf.create({"orpo_lambda": 0.1})
    loss, m = orpo_loss(SIMPO_POL, None, PAIR, cfg)
    assert_close(m["log_odds_ratio"], [ratio], 1e-12, "log_odds_ratio")
    assert_close(m["log_odds_ratio"], [1.0943442769261573], 1e-12, "log_odds_ratio (literal)")
    assert_close(loss, [2 - 0.1 * math.log(1 / (1 + math.exp(-ratio)))], 1e-9, "orpo loss")
    assert_close(loss, [2.028875078434462], 1e-9, "orpo loss (literal)")
    assert_close(m["nll"], [2.0], 1e-12, "nll")
    assert_close(m["rewards/chosen"], [-0.2], 1e-12, "rewards/chosen")
    assert_close(m["rewards/rejected"], [-0.3], 1e-12, "rewards/rejected")
    assert_close(m["rewards/accuracies"], [1.0], 0, "rewards/accuracies")
    assert_close(m["logps/chosen"], [-10.0], 0, "logps/chosen")


def test_sft_hand_value():
    """sums [-10, -21, -3], counts [5, 7, 3]; pairs (0, 1), (2, 1), (0, 2).
    per-pair NLL = -sums[w] / counts[w]:  pair 0: 10 / 5 = 2;  pair 1: 3 / 3 = 1;  pair 2: 10 / 5 = 2
    (response 0 is preferred twice, so it counts twice; response 1 is never preferred)."""
    pol = rl([-10.0, -21.0, -3.0], [5.0, 7.0, 3.0])
    loss, m = sft_loss(pol, None, torch.tensor([[0, 1], [2, 1], [0, 2]]), OmegaConf.create({}))
    assert_close(loss, [2.0, 1.0, 2.0], 1e-12, "sft loss")
    assert_close(m["nll"], [2.0, 1.0, 2.0], 1e-12, "nll")
    assert_close(m["logps/chosen"], [-10.0, -3.0, -10.0], 0, "logps/chosen")


def test_reward_hand_value():
    """rewards [1.5, 0.25], margin 0.5, center_coef 0.01.
    d = 1.5 - 0.25 - 0.5 = 0.75;  -log sigmoid(0.75) = log(1 + e^-0.75) = 0.38687100611489994
    center: (1.5 + 0.25)^2 = 1.75^2 = 3.0625;  0.01 * 3.0625 = 0.030625
    L = 0.38687100611489994 + 0.030625 = 0.41749600611489995
    Without margin or centering: -log sigmoid(1.25) = 0.2519428493326..."""
    pol = rl([1.5, 0.25], [0.0, 0.0])  # counts unused for rewards
    cfg = OmegaConf.create({"margin": 0.5, "center_coef": 0.01})
    loss, m = reward_loss(pol, None, PAIR, cfg)
    assert_close(loss, [-math.log(1 / (1 + math.exp(-0.75))) + 0.01 * 1.75 ** 2], 1e-9, "reward loss")
    assert_close(loss, [0.41749600611489995], 1e-9, "reward loss (literal)")
    plain, _ = reward_loss(pol, None, PAIR, OmegaConf.create({"margin": 0.0, "center_coef": 0.0}))
    assert_close(plain, [softplus_neg(1.25)], 1e-9, "reward loss, no margin or centering")
    assert_close(m["rewards/chosen"], [1.5], 0, "rewards/chosen")
    assert_close(m["rewards/rejected"], [0.25], 0, "rewards/rejected")
    assert_close(m["rewards/margins"], [1.25], 0, "rewards/margins")
    assert_close(m["rewards/accuracies"], [1.0], 0, "rewards/accuracies")


# ------------------------------------------------------------------- peer implementations

def random_batch(seed, units=8, k=4, num_pairs=16, max_len=40, scale=1.0):
    """Padded per-token log-probs (R, T) with a loss mask, as TRL holds them, plus pairs.

    R = units * k responses; each pair is two distinct responses of one unit in random
    order, so a response can appear in several pairs, as with K > 2 ranked responses.
    """
    g = torch.Generator().manual_seed(seed)
    r = units * k
    lengths = torch.randint(1, max_len + 1, (r,), generator=g)
    token_logps = -scale * torch.rand(r, max_len, generator=g, dtype=F64) ** 2 * 3
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    pairs = []
    for _ in range(num_pairs):
        u = int(torch.randint(units, (1,), generator=g))
        i, j = torch.randperm(k, generator=g)[:2].tolist()
        pairs.append([u * k + i, u * k + j])
    return token_logps, mask, torch.tensor(pairs)


def ours(token_logps, mask) -> ResponseLogps:
    """The project's path: flat token log-probs summed per owner response."""
    owner = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
    return sum_per_response(token_logps[mask], owner, mask.shape[0])


def trl_batch_logps(token_logps, mask, average_log_prob):
    """TRL get_batch_logps after the gather: masked sum, or sum / number of tokens."""
    if average_log_prob:
        return (token_logps * mask).sum(-1) / mask.sum(-1)
    return (token_logps * mask).sum(-1)


def trl_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                 reference_rejected_logps, beta, loss_type, label_smoothing):
    """TRL DPOTrainer.dpo_loss, for the four loss types dpo_loss supports."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


@pytest.mark.parametrize("variant,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("robust", 0.1, 0.2),
                                              ("hinge", 0.1, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.01, 0.0)])
def test_dpo_matches_trl(variant, beta, eps):
    tok, mask, pairs = random_batch(seed=1)
    ref_tok = tok + 0.3 * torch.randn(tok.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    w, l = pairs[:, 0], pairs[:, 1]
    avg = variant == "ipo"  # TRL divides the logps by the completion length for ipo only
    pi, ref = trl_batch_logps(tok, mask, avg), trl_batch_logps(ref_tok, mask, avg)
    want, want_cr, want_rr = trl_dpo_loss(pi[w], pi[l], ref[w], ref[l], beta, variant, eps)
    got, m = dpo_loss(ours(tok, mask), ours(ref_tok, mask), pairs, dpo_cfg(variant, beta, eps))
    assert_close(got, want, 1e-10, f"dpo {variant} loss vs TRL")
    if variant != "ipo":
        # For ipo TRL's rewards use the length-averaged logps, dpo_loss's use sums (see
        # its docstring); only the loss is compared there.
        assert_close(m["rewards/chosen"], want_cr, 1e-10, "rewards/chosen vs TRL")
        assert_close(m["rewards/rejected"], want_rr, 1e-10, "rewards/rejected vs TRL")
        assert_close(m["rewards/accuracies"], (want_cr > want_rr).float(), 0, "rewards/accuracies vs TRL")


def trl_cpo_simpo_loss(policy_chosen_logps, policy_rejected_logps, beta, simpo_gamma, label_smoothing):
    """TRL CPOTrainer.cpo_loss, loss_type="simpo" (logps are length-averaged there)."""
    logits = policy_chosen_logps - policy_rejected_logps
    gamma_logratios = simpo_gamma / beta
    logits = logits - gamma_logratios
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * policy_chosen_logps.detach()
    rejected_rewards = beta * policy_rejected_logps.detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_repo_loss(policy_chosen_logps, policy_rejected_logps, beta, gamma_beta_ratio, label_smoothing):
    """princeton-nlp/SimPO SimPOTrainer.simpo_loss, loss_type="sigmoid"."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    logits = pi_logratios - gamma_beta_ratio
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 1.0, 0.0), (2.5, 1.375, 0.0), (10.0, 3.0, 0.1)])
def test_simpo_matches_trl_and_simpo_repo(beta, gamma, eps):
    tok, mask, pairs = random_batch(seed=3)
    w, l = pairs[:, 0], pairs[:, 1]
    pi = trl_batch_logps(tok, mask, average_log_prob=True)
    want, want_cr, want_rr = trl_cpo_simpo_loss(pi[w], pi[l], beta, gamma, eps)
    cfg = OmegaConf.create({"beta": beta, "gamma": gamma, "label_smoothing": eps})
    got, m = simpo_loss(ours(tok, mask), None, pairs, cfg)
    assert_close(got, want, 1e-10, "simpo loss vs TRL CPOTrainer")
    assert_close(got, simpo_repo_loss(pi[w], pi[l], beta, gamma / beta, eps), 1e-10, "simpo loss vs SimPO repo")
    assert_close(m["rewards/chosen"], want_cr, 1e-10, "rewards/chosen vs TRL")
    assert_close(m["rewards/rejected"], want_rr, 1e-10, "rewards/rejected vs TRL")
    assert_close(m["rewards/margins"], want_cr - want_rr, 1e-10, "rewards/margins vs TRL")


def trl_odds_ratio_loss(policy_chosen_logps, policy_rejected_logps, beta):
    """TRL ORPOTrainer.odds_ratio_loss (logps are length-averaged there)."""
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        torch.log1p(-torch.exp(policy_chosen_logps)) - torch.log1p(-torch.exp(policy_rejected_logps))
    )
    ratio = F.logsigmoid(log_odds)
    losses = beta * ratio
    chosen_rewards = beta * policy_chosen_logps.detach()
    rejected_rewards = beta * policy_rejected_logps.detach()
    return losses, chosen_rewards, rejected_rewards, ratio, log_odds


@pytest.mark.parametrize("lam,scale", [(0.1, 1.0), (0.5, 1.0), (0.1, 0.01)])
def test_orpo_matches_trl(lam, scale):
    """scale 0.01 puts mean log-probs near -0.01, where log(1 - exp(m)) is steep."""
    tok, mask, pairs = random_batch(seed=4, scale=scale)
    w, l = pairs[:, 0], pairs[:, 1]
    pi = trl_batch_logps(tok, mask, average_log_prob=True)
    losses, want_cr, want_rr, _, log_odds = trl_odds_ratio_loss(pi[w], pi[l], lam)
    # TRL: loss = policy_nll_loss - losses.mean(); per pair, with the NLL of that pair's
    # chosen response as the per-token mean (TRL averages over all chosen tokens instead).
    want = -pi[w] - losses
    got, m = orpo_loss(ours(tok, mask), None, pairs, OmegaConf.create({"orpo_lambda": lam}))
    assert_close(got, want, 1e-10, "orpo loss vs TRL")
    assert_close(m["log_odds_ratio"], log_odds, 1e-10, "log_odds_ratio vs TRL's log_odds")
    assert_close(m["nll"], -pi[w], 1e-10, "nll vs per-token mean NLL")
    assert_close(m["rewards/chosen"], want_cr, 1e-10, "rewards/chosen vs TRL")
    assert_close(m["rewards/rejected"], want_rr, 1e-10, "rewards/rejected vs TRL")


def test_sft_matches_cross_entropy():
    """SFT NLL per sequence as token-mean cross-entropy (TRL get_batch_logps, average);
    and with equal lengths, the mean over pairs equals one token-mean CE over the batch
    of the pairs' preferred responses, which is what TRL's SFT loss is."""
    tok, mask, pairs = random_batch(seed=5)
    w = pairs[:, 0]
    got, _ = sft_loss(ours(tok, mask), None, pairs, OmegaConf.create({}))
    assert_close(got, -trl_batch_logps(tok, mask, average_log_prob=True)[w], 1e-10, "sft loss vs token-mean NLL")
    full = torch.ones_like(mask)
    got, _ = sft_loss(ours(tok, full), None, pairs, OmegaConf.create({}))
    batch_ce = -(tok[w] * full[w]).sum() / full[w].sum()
    assert_close(got.mean(), batch_ce, 1e-10, "mean sft loss vs batch token-mean CE, equal lengths")


def trl_reward_loss(rewards_chosen, rewards_rejected, margin, center_rewards_coefficient):
    """TRL RewardTrainer.compute_loss after the forward (margin as a per-example tensor)."""
    loss = -F.logsigmoid(rewards_chosen - rewards_rejected - margin).mean()
    if center_rewards_coefficient is not None:
        loss += center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss


@pytest.mark.parametrize("margin,coef", [(0.0, None), (0.5, None), (0.0, 0.01), (1.0, 0.1)])
def test_reward_matches_trl(margin, coef):
    g = torch.Generator().manual_seed(6)
    _, _, pairs = random_batch(seed=6)
    rewards = torch.randn(32, generator=g, dtype=F64) * 2 + 0.7
    w, l = pairs[:, 0], pairs[:, 1]
    want = trl_reward_loss(rewards[w], rewards[l], torch.full((len(pairs),), margin, dtype=F64), coef)
    cfg = OmegaConf.create({"margin": margin, "center_coef": coef or 0.0})
    got, m = reward_loss(ResponseLogps(rewards, torch.ones_like(rewards)), None, pairs, cfg)
    # the trainer sums per-pair losses and divides by the pair count: compare that mean
    assert_close(got.mean(), want, 1e-10, "mean reward loss vs TRL")
    assert_close(m["rewards/accuracies"], (rewards[w] > rewards[l]).float(), 0, "rewards/accuracies")


# ------------------------------------------------------------------ stability and gradients

@pytest.mark.parametrize("m_w,m_l", [(-1e-9, -50.0), (-50.0, -1e-9), (0.0, -2.0), (-1e-15, -1e-9), (-50.0, -60.0)])
def test_orpo_finite_at_extremes(m_w, m_l):
    """Means near 0 (probability near 1: log(1 - exp(m)) -> -inf) and very negative
    (exp(m) underflows relative to 1) give a finite loss and finite gradients."""
    sums = torch.tensor([m_w * 4, m_l * 4], dtype=F64, requires_grad=True)
    pol = ResponseLogps(sums, torch.tensor([4.0, 4.0], dtype=F64))
    loss, m = orpo_loss(pol, None, PAIR, OmegaConf.create({"orpo_lambda": 0.1}))
    loss.sum().backward()
    assert torch.isfinite(loss).all(), f"loss {loss.tolist()} at means ({m_w}, {m_l})"
    assert torch.isfinite(sums.grad).all(), f"grad {sums.grad.tolist()} at means ({m_w}, {m_l})"
    assert torch.isfinite(m["log_odds_ratio"]).all(), f"ratio {m['log_odds_ratio'].tolist()}"


def test_orpo_log1mexp_accurate_near_zero():
    """m = -1e-9: 1 - exp(m) = 1e-9 - 5e-19 + ..., so log(1 - exp(m)) = log(1e-9) - 5e-10
    = -20.72326583694641 - 5e-10. The naive log1p(-exp(m)) keeps only about 7 digits here."""
    from ppo_train.losses.orpo import log1mexp
    got = log1mexp(torch.tensor([-1e-9, -2.0, -50.0], dtype=F64))
    want = [math.log(1e-9) - 5e-10, math.log(1 - math.exp(-2.0)), -math.exp(-50.0)]
    assert_close(got, want, 1e-12, "log1mexp")


def test_dpo_sigmoid_gradient_matches_analytic():
    """L = -log sigmoid(beta h), h = (pi_w - ref_w) - (pi_l - ref_l):
    dL/dpi_w = -beta sigmoid(-beta h), dL/dpi_l = +beta sigmoid(-beta h); with beta 0.1, h 3:
    -0.1 * sigmoid(-0.3) = -0.1 * 0.425557483188341 = -0.0425557483188341."""
    beta = 0.1
    sums = torch.tensor([-10.0, -14.0], dtype=F64, requires_grad=True)
    loss, _ = dpo_loss(ResponseLogps(sums, torch.tensor([5.0, 7.0], dtype=F64)), DPO_REF, PAIR, dpo_cfg("sigmoid"))
    loss.sum().backward()
    s = 1 / (1 + math.exp(beta * 3))
    assert_close(sums.grad, [-beta * s, beta * s], 1e-12, "dL/d(pi_w, pi_l)")
    assert_close(sums.grad[0], -0.0425557483188341, 1e-12, "dL/dpi_w (literal)")
    # random batch: accumulate -beta sigmoid(-beta h) per pair onto the responses it touches
    tok, mask, pairs = random_batch(seed=7)
    pol, ref = ours(tok, mask), ours(tok.flip(1), mask)
    sums = pol.sums.clone().requires_grad_(True)
    loss, _ = dpo_loss(ResponseLogps(sums, pol.counts), ref, pairs, dpo_cfg("sigmoid", beta=0.5))
    loss.sum().backward()
    w, l = pairs[:, 0], pairs[:, 1]
    h = (pol.sums[w] - ref.sums[w]) - (pol.sums[l] - ref.sums[l])
    g = 0.5 * torch.sigmoid(-0.5 * h)
    want = torch.zeros_like(sums).index_add(0, w, -g).index_add(0, l, g)
    assert_close(sums.grad, want, 1e-12, "dpo gradient, random pairs")


def test_reference_free_losses_accept_none():
    pol = rl([-10.0, -21.0], [5.0, 7.0])
    for fn, cfg in [(simpo_loss, {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0}),
                    (orpo_loss, {"orpo_lambda": 0.1}), (sft_loss, {}),
                    (reward_loss, {"margin": 0.0, "center_coef": 0.0})]:
        loss, metrics = fn(pol, None, PAIR, OmegaConf.create(cfg))
        assert loss.shape == (1,), f"{fn.__name__}: loss shape {tuple(loss.shape)}"
        for k, v in metrics.items():
            assert v.shape == (1,) and not v.requires_grad, f"{fn.__name__}: metric {k} {v}"
