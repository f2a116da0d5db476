"""Proof obligation 1: prefix sharing and packing do not change the math.

Per-response log-prob sums from the shared layout with every packer equal separate,
unpacked [prompt | response] forwards of the plain model (naive label shift), within
1e-5 absolute, for K = 2, 3, 4 responses of uneven lengths, on Llama, Qwen2 and Mistral.
The DPO loss and every parameter gradient match the paired computation too
(loss: 1e-5 absolute; gradients: 1e-4 relative to the largest gradient entry + 1e-6).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ppo_train.data.collate import collate
from ppo_train.data.layout import build_units
from ppo_train.data.packing import plan_epoch
from ppo_train.logps import ResponseLogps
from ppo_train.losses import dpo_loss
from ppo_train.masks import build_mask
from ppo_train.scoring import PolicyModule
from ppo_train.scoring import forward_scores as batch_logps
from tests.conftest import random_examples, tiny_model

PACKINGS = {
    "none": OmegaConf.create({"name": "none", "pad_multiple": 128}),
    "sorted": OmegaConf.create({"name": "sorted", "pad_multiple": 128}),
    "ffd": OmegaConf.create({"name": "ffd", "row_tokens": 256, "rows_per_batch": 2, "pad_multiple": 128}),
}
PAD = 0


def separate_logps(model, examples) -> dict[tuple[int, int], float]:
    """The plain computation: one unpadded [P | R] sequence per response, logits[:-1] vs ids[1:]."""
    out = {}
    with torch.no_grad():
        for ex in examples:
            for k, r in enumerate(ex.response_ids):
                ids = torch.tensor([ex.prompt_ids + r])
                logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                targets = ids[0, 1:]
                tok = logp.gather(-1, targets[:, None]).squeeze(-1)
                out[(ex.index, k)] = float(tok[len(ex.prompt_ids) - 1:].double().sum())
    return out


def packed_logps(model, examples, layout, packing, backend="sdpa", micro=3) -> dict[tuple[int, int], float]:
    units = build_units(examples, layout)
    module = PolicyModule(model, logits_chunk=7)  # small chunks: the chunk seams are exercised too
    out = {}
    with torch.no_grad():
        for mb in plan_epoch(units, PACKINGS[packing], micro, seed=1, epoch=0):
            batch = collate(units, mb, PAD)
            lp = batch_logps(module, batch, build_mask(batch.doc_ids, batch.segment_ids, backend))
            for u, k, s in zip(batch.response_unit.tolist(), batch.response_k.tolist(), lp.sums.tolist()):
                out[(examples[u].index, k)] = s
    return out


def _compare(got: dict, want: dict, tol: float, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: responses differ: {set(got) ^ set(want)}"
    diffs = torch.tensor([abs(got[k] - want[k]) for k in want])
    assert diffs.max() <= tol, f"{what}: max |diff| {diffs.max():.3g}, mean {diffs.mean():.3g} (tol {tol})"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("packing", ["none", "sorted", "ffd"])
def test_shared_logps_equal_separate_forwards(arch, k, packing):
    model = tiny_model(arch)
    examples = random_examples(7, k, seed=k)
    want = separate_logps(model, examples)
    _compare(packed_logps(model, examples, "shared", packing), want, 1e-5, f"shared/{packing}/{arch}/K={k}")
    _compare(packed_logps(model, examples, "paired", packing), want, 1e-5, f"paired/{packing}/{arch}/K={k}")


@pytest.mark.parametrize("k", [2, 4])
def test_flex_rendering_equals_dense_on_cpu_forward(k):
    """FlexAttention (eager, forward only on the CPU) with the BlockMask = dense SDPA."""
    from ppo_train.model import FLEX

    examples = random_examples(5, k, seed=10 + k)
    dense = packed_logps(tiny_model("llama"), examples, "shared", "ffd", backend="sdpa")
    flex = packed_logps(tiny_model("llama", attn=FLEX), examples, "shared", "ffd", backend="flex")
    _compare(flex, dense, 1e-5, "flex vs sdpa")


def _dpo_loss_and_grads(model, examples, layout, packing):
    """Sum of per-pair DPO losses over all micro-batches / total pairs, and its gradients."""
    units = build_units(examples, layout)
    module = PolicyModule(model, logits_chunk=16)
    cfg = OmegaConf.create({"beta": 0.1, "variant": "sigmoid", "label_smoothing": 0.0})
    plan = plan_epoch(units, PACKINGS[packing], 2, seed=3, epoch=0)
    total_pairs = sum(len(u.pairs) for u in units)
    model.zero_grad()
    loss_total = 0.0
    for mb in plan:
        batch = collate(units, mb, PAD)
        pol = batch_logps(module, batch, build_mask(batch.doc_ids, batch.segment_ids, "sdpa"))
        # a reference that differs per response, so the loss is not at its ln 2 start
        ref = ResponseLogps(pol.sums.detach() - (batch.response_k.double() + 1.0) * 3.0, pol.counts)
        per_pair, _ = dpo_loss(pol, ref, batch.pairs, cfg)
        loss = per_pair.sum() / total_pairs
        loss.backward()
        loss_total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss_total, grads


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("packing", ["ffd", "sorted", "none"])
def test_dpo_loss_and_gradients_shared_equal_paired(k, packing):
    examples = random_examples(6, k, seed=20 + k)
    loss_p, grads_p = _dpo_loss_and_grads(tiny_model("llama"), examples, "paired", "none")
    loss_s, grads_s = _dpo_loss_and_grads(tiny_model("llama"), examples, "shared", packing)
    assert abs(loss_s - loss_p) <= 1e-5, f"loss shared {loss_s} vs paired {loss_p}"
    assert grads_s.keys() == grads_p.keys()
    scale = max(float(g.abs().max()) for g in grads_p.values())
    worst = max(float((grads_s[n] - grads_p[n]).abs().max()) for n in grads_p)
    assert scale > 0, "gradients are all zero: the test would prove nothing"
    assert worst <= 1e-4 * scale + 1e-6, f"max |grad diff| {worst:.3g} vs largest grad {scale:.3g}"
