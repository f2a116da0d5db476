"""`loss=dpo` under TRL 1.16's loss_type names (ppo_train/losses/dpo.py): every supported name,
under every f-divergence, and weighted lists, against a hand-written per-pair reference in
float64 scalar math (the papers' formulas as TRL states them, written independently of the
vectorized code); the config refusals; shared + ffd equal to paired + none is in
tests/equivalence/test_losses_shared.py."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ppo_train.cli import compose
from ppo_train.config_check import validate
from ppo_train.errors import ConfigError
from ppo_train.logps import ResponseLogps
from ppo_train.losses.dpo import SORTED, TRL_LOSS_TYPES, dpo_loss

SUPPORTED = list(TRL_LOSS_TYPES)
PER_PAIR = [n for n in TRL_LOSS_TYPES if n not in SORTED]  # aot sorts over the step: its own tests
DIVERGENCES = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


def lsig(x: float) -> float:
    """log sigmoid(x), stable in plain math."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(lsig(x))


def f_prime(t: float, kind: str, alpha: float) -> float:
    """f'(u) at u = exp(t) (the policy/reference ratio), per Wang et al. 2023's table."""
    u = math.exp(t)
    if kind == "reverse_kl":  # f(u) = -log u ... f'(u) = log u (DPO)
        return math.log(u)
    if kind == "forward_kl":  # f(u) = u log u: f'(u) = 1 - 1/u (as TRL writes it)
        return 1 - 1 / u
    if kind == "js_divergence":  # f'(u) = log(2u / (1 + u))
        return math.log(2 * u / (1 + u))
    return (u ** (alpha - 1) - 1) / (alpha - 1)  # alpha-divergence


def hand(name: str, beta: float, c: float, r: float, nw: float, nl: float, kind: str = "reverse_kl",
         alpha: float = 0.5, eps: float = 0.0, tau: float = 0.05, sft: float = 0.0) -> float:
    """One pair's term; `sft`: that pair's share of the sft term (the caller knows the step)."""
    if name == "sft":
        return sft
    sc, sr = f_prime(c, kind, alpha), f_prime(r, kind, alpha)
    d = sc - sr
    if name == "sigmoid":
        return -lsig(beta * d)
    if name == "hinge":
        return max(0.0, 1 - beta * d)
    if name == "ipo":
        return (sc / nw - sr / nl - 1 / (2 * beta)) ** 2
    if name == "exo_pair":  # KL(q || p) over {chosen, rejected}, q = softmax of beta * scores, p = (1 - eps, eps)
        q = sig(beta * d)
        return q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)
    if name == "nca_pair":
        return -lsig(beta * c) - 0.5 * lsig(-beta * c) - 0.5 * lsig(-beta * r)
    if name == "robust":
        return ((1 - eps) * -lsig(beta * d) + eps * lsig(-beta * d)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -lsig(beta * c) - lsig(-beta * r)
    if name == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if name == "apo_zero":
        return (1 - sig(beta * c)) + sig(beta * r)
    if name == "apo_down":
        return sig(beta * c) + (1 - sig(beta * (c - r)))
    if name == "discopop":
        x = beta * d
        m = sig(x / tau)
        return (1 - m) * -lsig(x) + m * math.exp(-x)
    if name == "sigmoid_norm":
        return -lsig(beta * (sc / nw - sr / nl))
    raise AssertionError(name)


def batch(seed: int = 0):
    """6 responses with sums and counts (policy, reference) and pairs among them."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(3, 40, (6,), generator=gen).double()
    pol = -counts * (1.0 + torch.rand(6, generator=gen, dtype=torch.float64))
    ref = pol + 2.0 * torch.randn(6, generator=gen, dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 4], [5, 0]])
    return ResponseLogps(pol.requires_grad_(), counts), ResponseLogps(ref, counts), pairs


def cfg(variant, beta=0.1, **extra):
    return OmegaConf.create({"beta": beta, "variant": variant, "label_smoothing": 0.0, "weights": None,
                             "f_divergence": "reverse_kl", "f_alpha": 0.5, "discopop_tau": 0.05, **extra})


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("name", PER_PAIR)
def test_every_trl_name_equals_the_hand_reference(name, kind):
    eps = 0.1 if name in ("robust", "exo_pair") else 0.0
    for beta in (0.1, 2.0):
        pol, ref, pairs = batch(seed=len(name))
        got, metrics = dpo_loss(pol, ref, pairs, cfg(name, beta, label_smoothing=eps, f_divergence=kind, f_alpha=0.3))
        chosen_tokens = sum(float(pol.counts[w]) for w, _ in pairs.tolist())
        for i, (w, l) in enumerate(pairs.tolist()):
            c = float(pol.sums[w].detach() - ref.sums[w])
            r = float(pol.sums[l].detach() - ref.sums[l])
            sft = -float(pol.sums[w].detach()) * len(pairs) / chosen_tokens  # sum / pairs = token mean
            want = hand(name, beta, c, r, float(pol.counts[w]), float(pol.counts[l]), kind, 0.3, eps, sft=sft)
            value = float(got[i].detach())
            assert abs(value - want) <= 1e-9 * max(1.0, abs(want)), (name, kind, beta, i, value, want)
            norm = name in ("ipo", "sigmoid_norm")
            assert abs(float(metrics["rewards/chosen"][i]) - beta * c / (float(pol.counts[w]) if norm else 1)) < 1e-9
        got.sum().backward()  # finite gradients everywhere
        assert torch.isfinite(pol.sums.grad).all()
        pol.sums.grad = None


def test_alpha_one_is_reverse_kl_and_f_divergences_reach_the_policy():
    pol, ref, pairs = batch()
    base, _ = dpo_loss(pol, ref, pairs, cfg("sigmoid"))
    same, _ = dpo_loss(pol, ref, pairs, cfg("sigmoid", f_divergence="alpha_divergence", f_alpha=1.0))
    other, _ = dpo_loss(pol, ref, pairs, cfg("sigmoid", f_divergence="forward_kl"))
    assert torch.equal(base, same) and not torch.allclose(base, other)


def test_a_list_is_the_weighted_sum_of_its_terms():
    """RPO-like and MPO-like mixes: loss = sum of weight x term per pair; equal weights when unset."""
    pol, ref, pairs = batch(seed=3)
    terms = {n: dpo_loss(pol, ref, pairs, cfg(n, 0.5, label_smoothing=0.2 if n == "robust" else 0.0))[0]
             for n in ("sigmoid", "hinge", "robust", "bco_pair")}
    mixed, _ = dpo_loss(pol, ref, pairs, cfg(["sigmoid", "robust", "bco_pair"], 0.5, weights=[0.8, 0.2, 1.5],
                                             label_smoothing=0.2))
    assert torch.allclose(mixed, 0.8 * terms["sigmoid"] + 0.2 * terms["robust"] + 1.5 * terms["bco_pair"], atol=1e-12)
    equal, _ = dpo_loss(pol, ref, pairs, cfg(["sigmoid", "hinge"], 0.5))
    assert torch.allclose(equal, terms["sigmoid"] + terms["hinge"], atol=1e-12)


def test_the_four_original_variants_are_unchanged():
    """sigmoid, robust, hinge and ipo as before: the formulas of the previous dpo_loss."""
    pol, ref, pairs = batch(seed=5)
    w, l = pairs[:, 0], pairs[:, 1]
    h = (pol.sums[w] - ref.sums[w]) - (pol.sums[l] - ref.sums[l])
    hm = (pol.means[w] - ref.means[w]) - (pol.means[l] - ref.means[l])
    eps, beta = 0.2, 0.1
    want = {"sigmoid": -torch.nn.functional.logsigmoid(beta * h),
            "robust": ((1 - eps) * -torch.nn.functional.logsigmoid(beta * h)
                       + eps * torch.nn.functional.logsigmoid(-beta * h)) / (1 - 2 * eps),
            "hinge": torch.relu(1 - beta * h), "ipo": (hm - 1 / (2 * beta)) ** 2}
    for name, value in want.items():
        got, _ = dpo_loss(pol, ref, pairs, cfg(name, beta, label_smoothing=eps if name == "robust" else 0.0))
        assert torch.allclose(got, value, atol=1e-12, rtol=0), name


@pytest.mark.parametrize("overrides, needle", [
    (["loss.variant=sigmoidd"], "loss.variant=sigmoidd: expected one of"),
    (["loss.variant=aot", "loss.wpo=true"], "loss.wpo=true with aot/aot_unpaired"),
    (["loss.variant=aot", "loss.f_divergence=forward_kl"], "those terms use the plain log-ratios"),
    (["loss.variant=[sigmoid,sft]", "loss.wpo=true"], "loss.wpo=true with sft in loss.variant"),
    (["loss.ld_alpha=1.5"], "loss.ld_alpha=1.5: expected null or 0 <= value <= 1"),
    (["loss.variant=[plackett_luce,sigmoid]"], "loss.variant=plackett_luce: one loss per list"),
    (["loss.variant=plackett_luce", "loss.ld_alpha=0.5"], "it takes no loss.ld_alpha"),
    (["loss.variant=plackett_luce", "loss.f_divergence=js_divergence"], "it takes no loss.f_divergence"),
    (["loss.variant=[sigmoid,hinge]", "loss.weights=[1.0]"], "loss.weights=[1.0]: expected one weight per"),
    (["loss.variant=[sigmoid,sigmoid]"], "a name appears twice"),
    (["loss.variant=exo_pair"], "loss.label_smoothing=0 with loss.variant=exo_pair"),
    (["loss.variant=hinge", "loss.label_smoothing=0.1"], "only used by loss.variant robust, exo_pair"),
    (["loss.discopop_tau=0"], "loss.discopop_tau=0"),
    (["loss.f_divergence=kl"], "f_divergence"),
    (["loss.variant=[sigmoid,bco_pair]", "loss.f_divergence=forward_kl"], "those terms use the plain log-ratios"),
])
def test_refusals_name_the_key(overrides, needle):
    from hydra.errors import ConfigCompositionException

    try:
        validate(compose(overrides))
    except (ConfigError, ConfigCompositionException) as err:
        text = str(err) + str(getattr(err, "__cause__", ""))
        assert needle in text, text
    else:
        raise AssertionError(f"{overrides} was accepted")


def test_trl_names_and_lists_compose_from_the_command_line():
    for overrides in (["loss.variant=sigmoid_norm", "loss.beta=5"], ["loss.variant=[sigmoid,apo_zero]",
                      "loss.weights=[1.0,0.5]"], ["loss.variant=exo_pair", "loss.label_smoothing=0.001"],
                      ["loss.f_divergence=js_divergence"], ["loss.variant=discopop", "loss.discopop_tau=0.1"]):
        validate(compose(overrides))


# --- against TRL's own DPOTrainer (slow: needs the trl extra) ---

TRL_CASES = ([(n, "reverse_kl", {}) for n in SUPPORTED]
             + [(n, k, {}) for n in ("sigmoid", "ipo", "exo_pair", "discopop") for k in DIVERGENCES[1:]]
             + [(("sigmoid", "apo_zero"), "reverse_kl", {}), (("sigmoid", "sft"), "reverse_kl", {}),
                (("sigmoid", "sft"), "forward_kl", {}),
                ("sigmoid", "reverse_kl", {"ld_alpha": 0.4}), ("ipo", "reverse_kl", {"ld_alpha": 0.0}),
                ("sigmoid", "reverse_kl", {"wpo": True}), (("hinge", "bco_pair"), "reverse_kl", {"wpo": True}),
                ("sigmoid_norm", "reverse_kl", {"wpo": True, "ld_alpha": 0.7})])


def _case_id(v):
    if isinstance(v, dict):
        return "-".join(f"{k}={x}" for k, x in v.items()) or "plain"
    return v if isinstance(v, str) else "+".join(v)


@pytest.mark.slow
@pytest.mark.parametrize("names, kind, extra", TRL_CASES, ids=_case_id)
def test_dpo_variants_equal_trl_dpotrainers_loss(names, kind, extra, tmp_path):
    """TRL 1.16's DPOTrainer computes its loss on one batch of 4 pairs (its own tokenization,
    collation and forwards, a reference model with other weights); pptrain's dpo_loss on the
    log-probs of the same sequences (separate plain float64 forwards of the same two models: sums,
    LD-DPO's shared-length sums, WPO's sums) gives the same mean loss. One micro-batch is the
    step, as TRL's batch is."""
    pytest.importorskip("trl")
    import datasets
    from trl import DPOConfig, DPOTrainer

    from ppo_train.fileio import asset_path
    from ppo_train.model import load_tokenizer

    names = [names] if isinstance(names, str) else list(names)
    tok = load_tokenizer(OmegaConf.create({"tokenizer": str(asset_path("smollm2")), "name_or_path": None,
                                           "revision": None, "trust_remote_code": False}))
    from tests.conftest import tiny_model

    model = tiny_model("llama", vocab=len(tok), seed=0).train()
    reference = tiny_model("llama", vocab=len(tok), seed=1).eval()
    rows = [{"prompt": f"Question {i}: what is {i} plus {i + 2}?", "chosen": f" It is {2 * i + 2}." + " Yes." * i,
             "rejected": f" Maybe {i * 3}, or not." + " Hm." * (3 - i)} for i in range(4)]
    eps = 0.05 if {"robust", "exo_pair"} & set(names) else 0.0
    args = DPOConfig(output_dir=str(tmp_path), loss_type=names, beta=0.5, label_smoothing=eps,
                     f_divergence_type=kind, f_alpha_divergence_coef=0.7, discopop_tau=0.1, report_to="none",
                     use_cpu=True, bf16=False, per_device_train_batch_size=4, max_length=None, seed=0,
                     ld_alpha=extra.get("ld_alpha"), use_weighting=bool(extra.get("wpo")))
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))

        n = len(rows)
        pairs = torch.tensor([[i, n + i] for i in range(n)])  # TRL's batch is [chosen..., rejected...]

        def scores(m):
            """Per sequence: completion token log-probs and log sum_v p(v)^2, in float64."""
            tokens, squares = [], []
            for ids, attn, comp in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
                keep = attn.bool()
                ids, comp = ids[keep], comp[keep]
                logps = m(input_ids=ids[None]).logits[0, :-1].double().log_softmax(-1)
                at = comp[1:].bool()
                tokens.append(logps.gather(-1, ids[1:, None]).squeeze(-1)[at])
                squares.append(torch.logsumexp(2 * logps, -1)[at])
            sums = torch.stack([t.sum() for t in tokens])
            counts = torch.tensor([float(len(t)) for t in tokens], dtype=torch.float64)
            shared = torch.tensor([[float(tokens[i][:min(len(tokens[w]), len(tokens[l]))].sum()) for i in (w, l)]
                                   for w, l in pairs.tolist()], dtype=torch.float64)
            wpo = torch.stack([(t - q).sum() for t, q in zip(tokens, squares)])
            return ResponseLogps(sums, counts, shared, wpo)

        pol, ref = scores(trainer.model), scores(reference)
    ours, _ = dpo_loss(pol, ref, pairs,
                       cfg(names if len(names) > 1 else names[0], 0.5, label_smoothing=eps, f_divergence=kind,
                           f_alpha=0.7, discopop_tau=0.1, ld_alpha=extra.get("ld_alpha"),
                           wpo=bool(extra.get("wpo"))))
    assert abs(float(ours.mean()) - trl_loss) <= 1e-5 * max(1.0, abs(trl_loss)), (names, kind, float(ours.mean()), trl_loss)


# --- sft in a mix, LD-DPO, WPO, Plackett-Luce: against hand computations in float64 ---

def token_batch(seed: int = 0, k: int = 3):
    """Two lists of K responses with per-token log-probs (policy, reference), their pairs (all
    ordered pairs of a strict order: response i preferred to every j > i)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [(-(0.2 + torch.rand(int(n), generator=gen, dtype=torch.float64) * 3)).requires_grad_()
              for n in torch.randint(1, 12, (2 * k,), generator=gen)]
    ref_tokens = [t.detach() - 0.5 * torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in tokens]
    pairs = torch.tensor([[u * k + i, u * k + j] for u in range(2) for i in range(k) for j in range(i + 1, k)])
    return tokens, ref_tokens, pairs


def as_logps(tokens, pairs, squares=None):
    """ResponseLogps through the library's own helpers from per-token values laid out as collate does."""
    from ppo_train.logps import shared_sums, sum_per_response

    values = torch.cat(tokens)
    owner = torch.cat([torch.full((len(t),), i) for i, t in enumerate(tokens)])
    out = sum_per_response(values, owner, len(tokens))
    wpo = None if squares is None else sum_per_response(values.detach() - torch.cat(squares), owner, len(tokens)).sums
    return ResponseLogps(out.sums, out.counts, shared_sums(values, owner, out.counts, pairs), wpo)


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_ld_alpha_equals_the_hand_reference(alpha):
    """LD-DPO: log p = sum over the first min(n_w, n_l) tokens + alpha * the rest, per pair (the
    partner differs per pair in a list of 3); alpha = 1 is plain DPO."""
    tokens, ref_tokens, pairs = token_batch(seed=11)
    pol, ref = as_logps(tokens, pairs), as_logps(ref_tokens, pairs)
    beta = 0.7
    got, _ = dpo_loss(pol, ref, pairs, cfg("sigmoid", beta, ld_alpha=alpha))
    for i, (w, l) in enumerate(pairs.tolist()):
        m = min(len(tokens[w]), len(tokens[l]))

        def ld(t):
            t = [float(x) for x in t.detach()]
            return sum(t[:m]) + alpha * sum(t[m:])

        d = (ld(tokens[w]) - ld(ref_tokens[w])) - (ld(tokens[l]) - ld(ref_tokens[l]))
        assert abs(float(got[i]) - -lsig(beta * d)) < 1e-10, (alpha, i)
    if alpha == 1.0:
        plain, _ = dpo_loss(ResponseLogps(pol.sums, pol.counts), ResponseLogps(ref.sums, ref.counts), pairs,
                            cfg("sigmoid", beta))
        assert torch.allclose(got, plain, atol=1e-12)
    got.sum().backward()  # the gradient reaches each token with weight 1 or alpha
    for t in tokens:
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_wpo_weights_each_pair_by_its_responses_probabilities():
    """WPO: loss x exp(mean(log p - log sum p^2))(y_w) x the same of y_l, detached."""
    tokens, ref_tokens, pairs = token_batch(seed=12)
    gen = torch.Generator().manual_seed(3)
    squares = [-(0.5 + torch.rand(len(t), generator=gen, dtype=torch.float64)) for t in tokens]  # log sum p^2 < 0
    pol, ref = as_logps(tokens, pairs, squares), as_logps(ref_tokens, pairs)
    plain, _ = dpo_loss(pol, ref, pairs, cfg(["sigmoid", "ipo"], 0.3))
    got, _ = dpo_loss(pol, ref, pairs, cfg(["sigmoid", "ipo"], 0.3, wpo=True))
    for i, (w, l) in enumerate(pairs.tolist()):
        weight = math.prod(math.exp(sum(float(a) - float(b) for a, b in zip(tokens[j], squares[j])) / len(tokens[j]))
                           for j in (w, l))
        assert abs(float(got[i]) - weight * float(plain[i])) < 1e-10 * max(1.0, float(plain[i]))
    (g_plain,) = torch.autograd.grad(plain[0], tokens[int(pairs[0, 0])], retain_graph=True)
    (g_wpo,) = torch.autograd.grad(got[0], tokens[int(pairs[0, 0])])
    ratio = g_wpo / g_plain  # the weight is a constant to the gradient (detached)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-10)


def test_sft_in_a_mix_is_the_token_mean_over_the_step():
    """[sigmoid, sft]: the sft part, summed over the step's micro-batches and divided by the
    step's pairs, is -(sum of the preferred responses' log-probs) / their tokens, however the
    pairs are split (the step's StepTotals), and the batch's own counts without totals."""
    from ppo_train.losses.common import StepTotals

    pol, ref, pairs = batch(seed=9)
    sig_only, _ = dpo_loss(pol, ref, pairs, cfg("sigmoid"))
    chosen = pairs[:, 0]
    want = -float(pol.sums[chosen].sum()) / float(pol.counts[chosen].sum())
    totals = StepTotals(len(pairs), 5, int(pol.counts[chosen].sum()))
    parts = [dpo_loss(pol, ref, pairs[s], cfg(["sigmoid", "sft"], weights=[1.0, 2.0]), totals=totals)[0]
             for s in (slice(0, 2), slice(2, None))]
    step = float(torch.cat(parts).sum()) / len(pairs)
    assert abs(step - (float(sig_only.mean()) + 2.0 * want)) < 1e-10
    alone, _ = dpo_loss(pol, ref, pairs, cfg(["sigmoid", "sft"]))  # no totals: this batch is the step
    assert abs(float(alone.mean()) - (float(sig_only.mean()) + want)) < 1e-10


def hand_plackett_luce(s: list[float], order: list[list[int]]) -> float:
    """-sum over positions of log(exp(s_k) / sum_{j at or below k} exp(s_j)); `order`: tie
    groups, best first; a tied response's denominator holds itself and the groups below."""
    total = 0.0
    for g, group in enumerate(order):
        below = [j for lower in order[g + 1:] for j in lower]
        if not below:
            continue
        for k in group:
            total -= s[k] - math.log(sum(math.exp(s[j]) for j in [k] + below))
    return total


def test_plackett_luce_equals_the_hand_formula_with_and_without_ties():
    from ppo_train.data.sources import pairs_from_scores

    gen = torch.Generator().manual_seed(4)
    for scores in ([4.0, 3.0, 2.0, 1.0], [1.0, 5.0, 3.0, 2.0, 4.0], [3.0, 3.0, 1.0, 2.0], [2.0, 1.0, 1.0]):
        k = len(scores)
        pairs = torch.tensor(pairs_from_scores(scores)[0])
        pol = ResponseLogps(torch.randn(k, generator=gen, dtype=torch.float64).requires_grad_(), torch.ones(k))
        ref = ResponseLogps(torch.randn(k, generator=gen, dtype=torch.float64), torch.ones(k))
        beta = 0.8
        got, metrics = dpo_loss(pol, ref, pairs, cfg("plackett_luce", beta))
        s = [beta * float(pol.sums[i] - ref.sums[i]) for i in range(k)]
        levels = sorted(set(scores), reverse=True)
        order = [[i for i in range(k) if scores[i] == v] for v in levels]
        assert abs(float(got.sum()) - hand_plackett_luce(s, order)) < 1e-10, scores
        assert metrics["rewards/chosen"].shape == (len(pairs),)
        got.sum().backward()
        assert torch.isfinite(pol.sums.grad).all()


def test_plackett_luce_with_two_responses_is_dpo_sigmoid():
    pol, ref, pairs = batch(seed=6)
    pairs = torch.tensor([[0, 1], [3, 2], [4, 5]])  # three lists of two
    pl, _ = dpo_loss(pol, ref, pairs, cfg("plackett_luce", 0.4))
    dpo, _ = dpo_loss(pol, ref, pairs, cfg("sigmoid", 0.4))
    # one term per list, in the order of the preferred responses (0, 3, 4: the pairs' order here)
    assert torch.allclose(pl, dpo, atol=1e-14, rtol=0), (pl, dpo)


# --- aot / aot_unpaired: sorted over the whole step ---

def trl_aot(pol_w, pol_l, ref_w, ref_l, beta, eps, unpaired):
    """TRL 1.16's formulas (dpo_trainer.py, loss_type aot / aot_unpaired): sort, subtract, mean."""
    lsg = torch.nn.functional.logsigmoid
    if unpaired:
        delta = torch.sort(pol_w - ref_w).values - torch.sort(pol_l - ref_l).values
    else:
        delta = torch.sort(pol_w - pol_l).values - torch.sort(ref_w - ref_l).values
    return (-lsg(beta * delta) * (1 - eps) - lsg(-beta * delta) * eps).mean()


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_equals_trls_sorted_formula_and_splits_like_one_batch(name):
    """One batch (the step): the mean of the per-pair terms and its gradient equal TRL's sorted
    formula. The same step cut into two micro-batches, with the step's pair table
    (StepTotals.pair_stats, what train.step_totals gathers), gives the same summed loss and the
    same gradient."""
    from ppo_train.losses.common import StepTotals
    from ppo_train.losses.dpo import dpo_step_stats

    gen = torch.Generator().manual_seed(21)
    n, pairs = 12, torch.tensor([[2 * i, 2 * i + 1] for i in range(6)])
    counts = torch.randint(3, 30, (n,), generator=gen).double()
    base = -counts * (1 + torch.rand(n, generator=gen, dtype=torch.float64))
    ref = ResponseLogps(base + torch.randn(n, generator=gen, dtype=torch.float64), counts)
    beta, eps = 0.6, 0.1
    c = cfg(name, beta, label_smoothing=eps)

    pol = ResponseLogps(base.clone().requires_grad_(), counts)
    whole, _ = dpo_loss(pol, ref, pairs, c)
    w, l = pairs[:, 0], pairs[:, 1]
    want = trl_aot(pol.sums[w], pol.sums[l], ref.sums[w], ref.sums[l], beta, eps, name == "aot_unpaired")
    assert abs(float(whole.mean()) - float(want)) < 1e-12
    (g_ours,) = torch.autograd.grad(whole.mean(), pol.sums)
    pol2 = ResponseLogps(base.clone().requires_grad_(), counts)
    want2 = trl_aot(pol2.sums[w], pol2.sums[l], ref.sums[w], ref.sums[l], beta, eps, name == "aot_unpaired")
    (g_trl,) = torch.autograd.grad(want2, pol2.sums)
    assert torch.allclose(g_ours, g_trl, atol=1e-14), (g_ours, g_trl)

    table = dpo_step_stats(pol, ref, pairs, c)
    totals = StepTotals(len(pairs), len(pairs), 0, table)
    pol3 = ResponseLogps(base.clone().requires_grad_(), counts)
    order = torch.tensor([4, 0, 5, 2, 1, 3])  # the step's pairs in two micro-batches, out of order
    parts = [dpo_loss(pol3, ref, pairs[order[s]], c, totals=totals.for_batch(order[s]))[0]
             for s in (slice(0, 2), slice(2, None))]
    split = torch.cat(parts).sum() / len(pairs)
    assert abs(float(split) - float(want)) < 1e-12
    (g_split,) = torch.autograd.grad(split, pol3.sums)
    assert torch.allclose(g_split, g_trl, atol=1e-14)
