"""Compiled FlexAttention sees a bounded set of shapes: over two whole epochs of every packer
and layout, training and no-grad (reference, evaluation) passes, dynamo compiles at most 2
graphs (ffd) or 6 (none, sorted), under its recompile limit of 8 per function. Counted on the
CPU with a counting dynamo backend (the graphs run eagerly; only their number matters); the
training pass is traced with grad mode on (a guard of its own) but inputs that need no grad,
since FlexAttention refuses grad inputs on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch._dynamo.testing import CompileCounter
from torch.nn.attention.flex_attention import flex_attention

from ppo_train.data.layout import build_units
from ppo_train.data.schedule import Schedule
from ppo_train.scoring import Scorer, static_shapes
from tests.conftest import random_examples

HEADS, DIM = 2, 8
BOUND = {"ffd": 2, "none": 6, "sorted": 6}


def packing(name: str):
    return OmegaConf.create({"name": name, "row_tokens": 512, "rows_per_batch": 2, "pad_multiple": 128})


def examples():
    """36 prompts, K = 2..4 responses, prompt 3..300 tokens: many distinct batch shapes."""
    out = []
    for k in (2, 3, 4):
        out += random_examples(12, k, seed=k, prompt=(3, 300), response=(1, 60))
    for i, ex in enumerate(out):
        ex.index = i
    return out


def shapes_and_graphs(layout: str, packer: str, static: bool) -> tuple[set, int]:
    units = build_units(examples(), layout)
    units = units.select(np.flatnonzero(units.lengths <= 512)) if packer == "ffd" else units
    rows, lengths = static_shapes([units], packing(packer), 3) if static else (1, ())
    scorer = Scorer(units, pad_id=0, backend="flex", rows=rows, lengths=lengths)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(flex_attention, backend=counter, dynamic=False)
    seen = set()
    schedule = Schedule(units, packing(packer), 3, seed=1, world_size=2, epochs=2)
    for step in schedule.steps():
        for mb in [*step.micro_batches, None]:  # None: the empty micro-batch of a skipped step
            batch = scorer.batch(mb)
            seen.add(tuple(batch.input_ids.shape))
            b, length = batch.input_ids.shape
            mask = scorer.mask(batch)
            q = torch.randn(b, HEADS, length, DIM)
            with torch.no_grad():  # reference table, evaluation, live reference
                compiled(q, q, q, block_mask=mask)
            with torch.enable_grad():  # training: grad mode is a guard of its own (inputs that need
                compiled(q, q, q, block_mask=mask)  # grad would fail here: no flex backward on the CPU)
    return seen, counter.frame_count


@pytest.mark.parametrize("layout", ["shared", "paired"])
@pytest.mark.parametrize("packer", ["none", "sorted", "ffd"])
def test_flex_compiles_a_bounded_number_of_graphs(layout, packer):
    seen, graphs = shapes_and_graphs(layout, packer, static=True)
    limit = torch._dynamo.config.recompile_limit
    assert graphs <= BOUND[packer] < limit, f"{layout}+{packer}: {graphs} graphs for shapes {sorted(seen)}"
    assert len(seen) <= BOUND[packer] // 2, sorted(seen)


def test_without_static_shapes_the_same_epochs_exceed_the_limit():
    """The reason for static shapes: unpadded none/sorted batches take many shapes."""
    seen, _ = shapes_and_graphs("paired", "none", static=False)
    assert len(seen) > torch._dynamo.config.recompile_limit, sorted(seen)


def test_lora_training_passes_give_flex_one_grad_signature_per_row_length(monkeypatch):
    """LoRA on q_proj/v_proj over frozen embeddings: layer 0's key needs no grad while its query and
    value do. Dynamo guards on requires_grad, so without `same_grad` that doubled the training
    graphs (3 lengths x 2 + 3 no-grad = 9, past the limit of 8). Every flex call of a training
    pass is recorded (what the compiled function would be guarded on); flex itself has no CPU
    backward, so the recorder stands in for it."""
    from omegaconf import OmegaConf

    import ppo_train.model as model_module
    from ppo_train.lora import apply_lora
    from ppo_train.model import FLEX
    from ppo_train.scoring import PolicyModule
    from tests.conftest import tiny_model

    calls = []

    def recorder(query):
        def flex(q, k, v, **kwargs):
            calls.append((torch.is_grad_enabled(), q.requires_grad, k.requires_grad, v.requires_grad, q.shape[2]))
            return q * 1.0
        return flex

    monkeypatch.setattr(model_module, "_flex_kernel", recorder)
    lora = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]})
    _, model = apply_lora(tiny_model("llama", attn=FLEX).train(), lora)
    module = PolicyModule(model, 16)
    units = build_units(examples(), "paired")
    rows, lengths = static_shapes([units], packing("none"), 3)
    scorer = Scorer(units, pad_id=0, backend="flex", rows=rows, lengths=lengths)
    schedule = Schedule(units, packing("none"), 3, seed=1)
    for step in list(schedule.steps())[:6]:
        for mb in step.micro_batches:
            scorer(module, mb)
            with torch.no_grad():
                scorer(module, mb)
    trained = {c for c in calls if c[0]}
    assert trained and all(c[1:4] == (True, True, True) for c in trained), sorted(trained)
    per_length = {c[4] for c in trained}
    assert len(trained) == len(per_length) <= len(lengths), sorted(trained)
    assert {c[1:4] for c in calls if not c[0]} == {(False, False, False)}


def test_same_grad_leaves_values_and_the_trained_inputs_alone():
    from ppo_train.model import same_grad

    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8, requires_grad=True)
    q2, k2, v2 = same_grad(q, k, v)
    assert q2 is q and v2 is v and k2.requires_grad and torch.equal(k2, k)
    with torch.no_grad():
        assert same_grad(q, k, v) == (q, k, v)
    frozen = (torch.randn(1), torch.randn(1), torch.randn(1))
    assert same_grad(*frozen) == frozen
