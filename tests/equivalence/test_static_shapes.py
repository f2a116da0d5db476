"""Padding micro-batches to static shapes (the flex path: fixed rows per micro-batch, bucketed
row lengths) changes no score: per-response log-prob sums with the padded batches equal the
unpadded ones within 1e-5, under SDPA with the dense mask and under (uncompiled, no-grad) flex
on the CPU, for every packer and both exact layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ppo_train.data.layout import build_units
from ppo_train.data.packing import plan_epoch
from ppo_train.model import FLEX  # importing ppo_train.model registers the flex attention function
from ppo_train.scoring import PolicyModule, Scorer, static_shapes
from tests.conftest import random_examples, tiny_model


def scores(module, scorer, plan) -> dict:
    out = {}
    with torch.no_grad():
        for mb in plan + [None]:  # None: the empty micro-batch of a skipped step scores nothing
            scored = scorer(module, mb)
            if mb is not None:
                assert scored.batch.input_ids.shape[0] >= scorer.rows
            for u, k, s in zip(scored.batch.response_unit.tolist(), scored.batch.response_k.tolist(),
                               scored.scores.sums.tolist()):
                out[(u, k)] = s
    return out


@pytest.mark.parametrize("layout", ["shared", "paired"])
@pytest.mark.parametrize("packer", ["none", "sorted", "ffd"])
def test_static_shapes_change_no_score(layout, packer):
    units = build_units(random_examples(10, 3, seed=11, prompt=(3, 200)), layout)
    packing = OmegaConf.create({"name": packer, "row_tokens": 512, "rows_per_batch": 2, "pad_multiple": 128})
    units = units.select(np.flatnonzero(units.lengths <= 512)) if packer == "ffd" else units
    plan = plan_epoch(units, packing, 3, seed=2, epoch=0)
    rows, lengths = static_shapes([units], packing, 3)
    assert rows > 1 or packer == "ffd"
    for backend, impl in (("sdpa", "sdpa"), ("flex", FLEX)):
        module = PolicyModule(tiny_model("llama", attn=impl), 16).eval()
        plain = scores(module, Scorer(units, 96, backend), plan)
        padded = scores(module, Scorer(units, 96, backend, rows=rows, lengths=lengths), plan)
        worst = max(abs(plain[key] - padded[key]) for key in plain)
        assert plain.keys() == padded.keys() and worst <= 1e-5, f"{backend} {layout}+{packer}: {worst:.3g}"
