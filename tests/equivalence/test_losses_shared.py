"""Every loss on the fast path: shared rows with K = 2, 3, 4 responses, packed, give the
same per-response scores, per-pair losses and parameter gradients as the paired
computation; the reward read from a shared row equals the exported classifier's score on
the ordinary unshared sequence.

Tolerances: scores 1e-5 absolute; total loss 1e-5; gradients 1e-4 of the largest entry + 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ppo_train.data.collate import collate
from ppo_train.data.layout import build_units
from ppo_train.data.packing import plan_epoch
from ppo_train.logps import ResponseLogps
from ppo_train.losses import LOSSES
from ppo_train.data.schedule import Step
from ppo_train.losses.common import StepTotals
from ppo_train.train import pair_rows
from ppo_train.masks import build_mask
from ppo_train.scoring import PolicyModule, RewardModule
from ppo_train.scoring import forward_scores as batch_logps
from tests.conftest import random_examples, tiny_model

LOSS_CFG = OmegaConf.create({"beta": 0.1, "variant": "sigmoid", "label_smoothing": 0.0, "gamma": 0.5,
                             "orpo_lambda": 0.1, "margin": 0.2, "center_coef": 0.01})
PACK = {"paired-none": ("paired", OmegaConf.create({"name": "none", "pad_multiple": 128})),
        "shared-ffd": ("shared", OmegaConf.create({"name": "ffd", "row_tokens": 384, "rows_per_batch": 2,
                                                   "pad_multiple": 128})),
        "shared-sorted": ("shared", OmegaConf.create({"name": "sorted", "pad_multiple": 128}))}


def tiny_reward_model(seed=0):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model("llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  num_labels=1, pad_token_id=96)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def run(loss: str, examples, setup: str, loss_cfg=LOSS_CFG):
    """Total loss (sum of per-pair losses / all pairs), per-response scores and gradients."""
    layout, packing = PACK[setup]
    units = build_units(examples, layout)
    model = tiny_reward_model() if loss == "reward" else tiny_model("llama")
    module = RewardModule(model) if loss == "reward" else PolicyModule(
        model, logits_chunk=16, shared_sums=loss_cfg.get("ld_alpha") is not None, wpo=bool(loss_cfg.get("wpo")))
    # the whole epoch is one step: its counts normalize, cut into micro-batches however the packer cuts it
    totals = StepTotals(sum(len(u.pairs) for u in units), len(units),
                        sum(int(u.resp_len[w]) for u in units for w, _ in u.pairs))
    norm = LOSSES[loss].normalizer(loss_cfg, totals)

    def reference(batch, out):
        """A fixed reference that differs per response (and per pair: LD-DPO's shared-length
        sums), so DPO is not at its ln 2 start."""
        if not LOSSES[loss].needs_reference:
            return None
        return ResponseLogps(-(batch.response_unit.double() * 7 % 5) - batch.response_k.double() * 2.0, out.counts,
                             -(batch.pair_unit.double()[:, None] * 3 % 4) - torch.tensor([0.5, 1.5]) * batch.pair_k[:, None])

    mbs = plan_epoch(units, packing, 2, seed=5, epoch=0)
    step = Step(0, 0, [], totals.pairs, list(range(len(units))))
    if LOSSES[loss].wants_step_stats(loss_cfg):  # aot: the whole epoch's pairs first (train.step_totals)
        table = torch.zeros(totals.pairs, LOSSES[loss].stats_width, dtype=torch.float64)
        with torch.no_grad():
            for mb in mbs:
                batch = collate(units, mb, pad_id=96)
                out = batch_logps(module, batch, build_mask(batch.doc_ids, batch.segment_ids, "sdpa"))
                table[pair_rows(step, units, batch)] = LOSSES[loss].step_stats(out, reference(batch, out),
                                                                                batch.pairs, loss_cfg)
        totals = StepTotals(totals.pairs, totals.lists, totals.chosen_tokens, table)
    scores, total = {}, 0.0
    for mb in mbs:
        batch = collate(units, mb, pad_id=96)
        out = batch_logps(module, batch, build_mask(batch.doc_ids, batch.segment_ids, "sdpa"))
        terms, _ = LOSSES[loss].fn(out, reference(batch, out), batch.pairs, loss_cfg,
                                   totals=totals.for_batch(pair_rows(step, units, batch)))
        (terms.sum() / norm).backward()
        total += float(terms.sum().detach()) / norm
        for u, k, s in zip(batch.response_unit.tolist(), batch.response_k.tolist(), out.sums.tolist()):
            scores[(u, k)] = s
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, scores, grads


# loss=dpo under TRL's loss_type names: each a different use of the sums, counts and pairs
DPO_VARIANTS = {
    "sigmoid_norm": {"variant": "sigmoid_norm", "beta": 5.0},
    "exo_pair": {"variant": "exo_pair", "label_smoothing": 0.01},
    "nca_pair+apo_down": {"variant": ["nca_pair", "apo_down"], "weights": [1.0, 0.5]},
    "sppo_hard+bco_pair": {"variant": ["sppo_hard", "bco_pair"]},
    "discopop/js": {"variant": "discopop", "f_divergence": "js_divergence"},
    "ipo/alpha": {"variant": "ipo", "f_divergence": "alpha_divergence", "f_alpha": 1.5},
    "sigmoid+sft": {"variant": ["sigmoid", "sft"], "weights": [1.0, 0.7]},  # RPO: sft over the step's tokens
    "ld_alpha": {"variant": "sigmoid", "ld_alpha": 0.3},
    "ld_alpha+sigmoid_norm": {"variant": "sigmoid_norm", "ld_alpha": 0.6, "beta": 2.0},
    "wpo": {"variant": ["sigmoid", "hinge"], "wpo": True},
    "plackett_luce": {"variant": "plackett_luce", "beta": 0.5},
    "aot": {"variant": "aot", "label_smoothing": 0.1},  # sorted over the whole step
    "aot_unpaired+sigmoid": {"variant": ["aot_unpaired", "sigmoid"]},
}


@pytest.mark.parametrize("loss, variant, k", [(loss, None, k) for loss in ["dpo", "simpo", "orpo", "sft", "reward"]
                                              for k in (2, 3, 4)] + [("dpo", v, 3) for v in DPO_VARIANTS]
                         + [("dpo", "plackett_luce", 4), ("dpo", "ld_alpha", 4)])
def test_every_loss_shared_packed_equals_paired(loss, variant, k):
    """Every loss at K = 2, 3, 4; each TRL-named dpo variant (and mix, and f-divergence) at K = 3."""
    loss_cfg = LOSS_CFG if variant is None else OmegaConf.merge(
        LOSS_CFG, {"weights": None, "f_divergence": "reverse_kl", "f_alpha": 0.5, "discopop_tau": 0.05,
                   "ld_alpha": None, "wpo": False},
        DPO_VARIANTS[variant])
    examples = random_examples(7, k, seed=40 + k)
    base_loss, base_scores, base_grads = run(loss, examples, "paired-none", loss_cfg)
    for setup in ("shared-ffd", "shared-sorted"):
        total, scores, grads = run(loss, examples, setup, loss_cfg)
        diff = max(abs(scores[key] - base_scores[key]) for key in base_scores)
        assert scores.keys() == base_scores.keys() and diff <= 1e-5, f"{loss} {setup} K={k}: scores differ by {diff:.3g}"
        assert abs(total - base_loss) <= 1e-5, f"{loss} {setup} K={k}: loss {total} vs {base_loss}"
        scale = max(float(g.abs().max()) for g in base_grads.values())
        worst = max(float((grads[n] - base_grads[n]).abs().max()) for n in base_grads)
        assert scale > 0 and worst <= 1e-4 * scale + 1e-6, f"{loss} {setup} K={k}: grad diff {worst:.3g} / {scale:.3g}"


def test_reward_from_shared_row_equals_exported_classifier(tmp_path):
    """Score K=4 responses in shared, packed rows; save_pretrained; reload with
    AutoModelForSequenceClassification and score each [P | Ri] alone (HF's own pooling)."""
    from transformers import AutoModelForSequenceClassification

    examples = random_examples(5, 4, seed=3, vocab=96)  # token 96 is the pad: never inside a sequence
    _, shared_scores, _ = run("reward", examples, "shared-ffd")
    tiny_reward_model().save_pretrained(tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        for ex in examples:
            for k, r in enumerate(ex.response_ids):
                plain = float(loaded(input_ids=torch.tensor([ex.prompt_ids + r])).logits[0, 0])
                assert abs(plain - shared_scores[(ex.index, k)]) <= 1e-5, (ex.index, k, plain, shared_scores[(ex.index, k)])
            # padded batch of the unshared sequences: HF pools at the last non-pad token
            seqs = [ex.prompt_ids + r for r in ex.response_ids]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [96] * (width - len(s)) for s in seqs])
            attn = (ids != 96).long()
            padded = loaded(input_ids=ids, attention_mask=attn).logits[:, 0]
            want = torch.tensor([shared_scores[(ex.index, k)] for k in range(4)], dtype=padded.dtype)
            assert torch.allclose(padded, want, atol=1e-5), (padded, want)
