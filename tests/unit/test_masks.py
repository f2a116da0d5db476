"""Proof obligation 2: the BlockMask equals a dense reference mask token by token."""

from __future__ import annotations

import pytest
import torch

from ppo_train.data.collate import collate
from ppo_train.data.layout import build_units
from ppo_train.data.packing import plan_epoch
from ppo_train.masks import block_mask, dense_mask, doc_spans, mask_mod_for
from omegaconf import OmegaConf
from tests.conftest import random_examples


def loop_reference(doc, seg):
    """The rule written out with Python loops, independent of the vectorized code."""
    b, n = doc.shape
    out = torch.zeros(b, 1, n, n, dtype=torch.bool)
    for i in range(b):
        for q in range(n):
            for kv in range(q + 1):
                if doc[i, q] == doc[i, kv] and (seg[i, kv] == 0 or seg[i, kv] == seg[i, q]):
                    out[i, 0, q, kv] = True
    return out


def block_mask_tokens(bm, mask_mod, b, n) -> torch.Tensor:
    """Expand a BlockMask to tokens: full blocks True, partial blocks by mask_mod, others False."""
    out = torch.zeros(b, 1, n, n, dtype=torch.bool)
    q_idx = torch.arange(n)
    size = bm.BLOCK_SIZE[0]
    for i in range(b):
        for qb in range(n // size):
            qs = slice(qb * size, (qb + 1) * size)
            nfull = int(bm.full_kv_num_blocks[i, 0, qb]) if bm.full_kv_num_blocks is not None else 0
            for kb in bm.full_kv_indices[i, 0, qb, :nfull].tolist() if nfull else []:
                out[i, 0, qs, kb * size:(kb + 1) * size] = True
            for kb in bm.kv_indices[i, 0, qb, :int(bm.kv_num_blocks[i, 0, qb])].tolist():
                ks = torch.arange(kb * size, (kb + 1) * size)
                vals = mask_mod(torch.tensor(i), torch.tensor(0), q_idx[qs][:, None], ks[None, :])
                out[i, 0, qs, kb * size:(kb + 1) * size] = vals
    return out


def _batch(layout, k, packing):
    units = build_units(random_examples(9, k, seed=k, prompt=(3, 60), response=(1, 50)), layout)
    cfg = OmegaConf.create({"name": packing, "row_tokens": 384, "rows_per_batch": 2, "pad_multiple": 128})
    return collate(units, plan_epoch(units, cfg, 3, seed=0, epoch=0)[0], pad_id=0)


@pytest.mark.parametrize("layout,k,packing", [("shared", 2, "ffd"), ("shared", 4, "ffd"), ("paired", 3, "ffd"),
                                              ("shared", 3, "none"), ("paired", 2, "sorted")])
def test_block_mask_equals_dense_reference_token_by_token(layout, k, packing):
    batch = _batch(layout, k, packing)
    doc, seg = batch.doc_ids, batch.segment_ids
    b, n = doc.shape
    want = loop_reference(doc, seg)
    bm = block_mask(doc, seg, block_size=128)
    got = block_mask_tokens(bm, mask_mod_for(doc, seg), b, n)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {want.numel()} entries differ"
    assert torch.equal(dense_mask(doc, seg), want)
    from torch.nn.attention.flex_attention import create_mask

    assert torch.equal(create_mask(mask_mod_for(doc, seg), b, None, n, n, device="cpu"), want)


def test_no_query_row_is_fully_masked():
    batch = _batch("shared", 4, "ffd")
    mask = dense_mask(batch.doc_ids, batch.segment_ids)
    assert bool(mask.any(dim=-1).all()), "a query row (padding included) attends to nothing"


def test_mask_blinds_responses_to_each_other():
    """In [P | R1 | R2], R2 sees P and itself, never R1; positions restart at |P|."""
    batch = _batch("shared", 2, "none")
    row = 0
    seg, pos = batch.segment_ids[row], batch.position_ids[row]
    mask = dense_mask(batch.doc_ids, batch.segment_ids)[row, 0]
    r1, r2 = (seg == 1).nonzero().flatten(), (seg == 2).nonzero().flatten()
    p = (seg[: r1[0]] == 0).sum()
    assert not mask[r2][:, r1].any()
    assert mask[r2][:, :p].all()
    assert int(pos[r1[0]]) == int(p) and int(pos[r2[0]]) == int(p)


@pytest.mark.parametrize("layout,k,packing", [("shared", 2, "ffd"), ("shared", 4, "ffd"), ("paired", 3, "ffd"),
                                              ("shared", 3, "none"), ("paired", 2, "sorted")])
def test_doc_spans_tile_each_row_and_nothing_attends_across_them(layout, k, packing):
    """The runs cover every row in order, and the dense mask is zero outside their diagonal
    blocks: attention restricted to each block is the whole attention."""
    batch = _batch(layout, k, packing)
    mask = dense_mask(batch.doc_ids, batch.segment_ids)[:, 0]
    spans = doc_spans(batch.doc_ids)
    b, n = batch.doc_ids.shape
    assert spans is not None and len(spans) == b
    inside = torch.zeros(b, n, n, dtype=torch.bool)
    for r, row in enumerate(spans):
        assert row[0][0] == 0 and row[-1][1] == n and all(e == s2 for (_, e), (s2, _) in zip(row, row[1:]))
        assert all(len(set(batch.doc_ids[r, s:e].tolist())) == 1 for s, e in row)
        for s, e in row:
            inside[r, s:e, s:e] = True
    assert packing != "ffd" or max(len(row) for row in spans) > 2  # packed rows hold several documents
    assert not (mask & ~inside).any()


def test_doc_spans_refuse_an_id_that_comes_back():
    assert doc_spans(torch.tensor([[0, 0, 1, 1, 0]])) is None
    assert doc_spans(torch.tensor([[5, 5, 5], [1, 2, 2]])) == [[(0, 3)], [(0, 1), (1, 3)]]


@pytest.mark.parametrize("layout,k,packing", [("shared", 3, "ffd"), ("paired", 2, "ffd"), ("shared", 2, "none")])
def test_segmented_sdpa_equals_one_sdpa_call(layout, k, packing):
    """Per-document SDPA (what training runs on the CPU) against transformers' SDPA over the
    whole row with the same mask: outputs and q/k/v gradients, grouped-query heads."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ppo_train.model import segmented_sdpa_forward

    batch = _batch(layout, k, packing)
    mask = dense_mask(batch.doc_ids, batch.segment_ids)
    b, n = batch.doc_ids.shape
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    gen = torch.Generator().manual_seed(0)
    q, kk, v = (torch.randn(b, h, n, 16, generator=gen, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    upstream = torch.randn(b, n, 4, 16, generator=gen, dtype=torch.float64)
    outs, grads = [], []
    for fn, extra in ((sdpa_attention_forward, {}), (segmented_sdpa_forward, {"pptrain_spans": doc_spans(batch.doc_ids)})):
        out, _ = fn(module, q, kk, v, mask, scaling=0.25, dropout=0.0, **extra)
        outs.append(out)
        grads.append(torch.autograd.grad((out * upstream).sum(), (q, kk, v)))
    assert outs[0].shape == outs[1].shape == (b, n, 4, 16)
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-12)
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, rtol=0, atol=1e-12)
