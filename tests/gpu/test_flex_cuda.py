"""The CUDA path (`make test-gpu`, and part of `make gpu-check`): compiled FlexAttention with
the BlockMask, forward and backward, equals SDPA with the dense mask; per-response log-probs
from shared packed rows equal separate forwards; the compiled-graph count over whole epochs
stays within the static-shape bound."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ppo_train.data.layout import build_units
from ppo_train.data.schedule import Schedule
from ppo_train.model import FLEX  # importing ppo_train.model registers the flex attention function
from ppo_train.scoring import PolicyModule, Scorer, static_shapes
from tests.conftest import random_examples, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICE = torch.device("cuda", 0)
# compiled flex on CUDA needs a head dimension of at least 16 (conftest's tiny model has 8)
WIDE = dict(hidden_size=64, intermediate_size=128)


def packing(name: str):
    return OmegaConf.create({"name": name, "row_tokens": 512, "rows_per_batch": 2, "pad_multiple": 128})


def _scores(module, scorer, plan, grad: bool):
    out, grads = {}, None
    for mb in plan:
        with torch.set_grad_enabled(grad):
            scored = scorer(module, mb)
        if grad:
            scored.scores.sums.sum().backward()
        for u, k, s in zip(scored.batch.response_unit.tolist(), scored.batch.response_k.tolist(),
                           scored.scores.sums.tolist()):
            out[(u, k)] = s
    if grad:
        grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        module.zero_grad()
    return out, grads


@pytest.mark.parametrize("packer", ["ffd", "sorted"])
def test_compiled_flex_equals_dense_sdpa_forward_and_backward(packer):
    units = build_units(random_examples(12, 3, seed=7), "shared")
    plan = Schedule(units, packing(packer), 3, seed=0).plan(0)
    rows, lengths = static_shapes([units], packing(packer), 3)
    results = {}
    for backend, impl in (("flex", FLEX), ("sdpa", "sdpa")):
        model = tiny_model("llama", attn=impl, **WIDE).to(DEVICE).train()
        scorer = Scorer(units, 96, backend, DEVICE, rows=rows if backend == "flex" else 1,
                        lengths=lengths if backend == "flex" else ())
        results[backend] = _scores(PolicyModule(model, 16), scorer, plan, grad=True)
    (flex, flex_grads), (sdpa, sdpa_grads) = results["flex"], results["sdpa"]
    worst = max(abs(flex[key] - sdpa[key]) for key in sdpa)
    assert flex.keys() == sdpa.keys() and worst <= 1e-3, f"log-prob sums differ by {worst:.3g}"
    scale = max(float(g.abs().max()) for g in sdpa_grads.values())
    diff = max(float((flex_grads[n] - sdpa_grads[n]).abs().max()) for n in sdpa_grads)
    assert diff <= 1e-3 * scale + 1e-5, f"gradients differ by {diff:.3g} (scale {scale:.3g})"


def test_compiled_graphs_stay_within_the_bound_over_two_epochs():
    from torch._dynamo.utils import counters

    units = build_units(random_examples(30, 2, seed=3, prompt=(3, 300)), "paired")
    rows, lengths = static_shapes([units], packing("none"), 2)
    model = tiny_model("llama", attn=FLEX, **WIDE).to(DEVICE).train()
    module = PolicyModule(model, 16)
    scorer = Scorer(units, 96, "flex", DEVICE, rows=rows, lengths=lengths)
    torch._dynamo.reset()
    before = int(counters["stats"]["unique_graphs"])
    schedule = Schedule(units, packing("none"), 2, seed=0, epochs=2)
    for step in schedule.steps():
        for mb in step.micro_batches:
            scorer(module, mb).scores.sums.sum().backward()
            with torch.no_grad():
                scorer(module, mb)
    graphs = int(counters["stats"]["unique_graphs"]) - before
    assert graphs <= 6, f"{graphs} graphs compiled for lengths {lengths}"
