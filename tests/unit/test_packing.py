"""Packers: every unit placed exactly once, no row over budget, deterministic under a seed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ppo_train.data.collate import collate
from ppo_train.data.layout import build_units
from ppo_train.data.packing import first_fit_decreasing, group_steps, plan_epoch
from ppo_train.data.tokenize import TokenizedExample
from ppo_train.masks import dense_mask


def _cfg(name, row_tokens=256, rows=2):
    return OmegaConf.create({"name": name, "row_tokens": row_tokens, "rows_per_batch": rows, "pad_multiple": 128})


examples_strategy = st.lists(
    st.tuples(st.integers(1, 60), st.lists(st.integers(1, 40), min_size=2, max_size=4)), min_size=1, max_size=40)


def _examples(spec):
    return [TokenizedExample(i, [1] * p, [[2] * r for r in rs], [(0, 1)]) for i, (p, rs) in enumerate(spec)]


@settings(max_examples=60, deadline=None)
@given(spec=examples_strategy, name=st.sampled_from(["none", "sorted", "ffd"]),
       layout=st.sampled_from(["shared", "paired"]), seed=st.integers(0, 5), micro=st.integers(1, 5))
def test_every_unit_once_no_row_over_budget_deterministic(spec, name, layout, seed, micro):
    units = build_units(_examples(spec), layout)
    cfg = _cfg(name, row_tokens=512)
    plan = plan_epoch(units, cfg, micro, seed, epoch=0)
    placed = Counter(u for mb in plan for u in mb.units)
    assert placed == Counter(range(len(units))), "a unit is missing or placed twice"
    for mb in plan:
        for row in mb.rows:
            assert sum(p.hi - p.lo for p in row) <= mb.row_length
        assert mb.row_length % 128 == 0
        if name == "ffd":
            assert mb.row_length == 512 and len(mb.rows) <= 2
        pieces = Counter((p.unit, p.lo, p.hi) for row in mb.rows for p in row)
        for u in mb.units:  # all of a unit's tokens are in this micro-batch, once
            assert sum(hi - lo for (uu, lo, hi), c in pieces.items() if uu == u for _ in range(c)) == units[u].length
    again = plan_epoch(units, cfg, micro, seed, epoch=0)
    assert [(mb.units, mb.rows) for mb in again] == [(mb.units, mb.rows) for mb in plan]
    batch = collate(units, plan[0], pad_id=0)
    assert bool(dense_mask(batch.doc_ids, batch.segment_ids).any(-1).all()), "a fully masked query row"


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=200), cap=st.integers(100, 300))
def test_ffd_matches_a_plain_first_fit_decreasing(lengths, cap):
    order = np.random.default_rng(0).permutation(len(lengths))
    bins = first_fit_decreasing(lengths, cap, order)
    # plain O(n^2) first fit over the same visiting order
    plain, room = [], []
    for i in sorted(order.tolist(), key=lambda i: -lengths[i]):
        for b, r in enumerate(room):
            if r >= lengths[i]:
                plain[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            plain.append([i])
            room.append(cap - lengths[i])
    assert bins == plain


def test_ffd_rejects_a_unit_over_budget():
    with pytest.raises(ValueError, match="row budget"):
        first_fit_decreasing([10, 300], 256, np.arange(2))


def test_epochs_reshuffle_and_group_steps_pads_last_step():
    units = build_units(_examples([(5, [3, 4])] * 10), "shared")
    a = plan_epoch(units, _cfg("none"), 2, seed=0, epoch=0)
    b = plan_epoch(units, _cfg("none"), 2, seed=0, epoch=1)
    assert [mb.units for mb in a] != [mb.units for mb in b]
    steps = group_steps(a, 4)
    assert [len(s) for s in steps] == [4, 4] and steps[-1][-3:] == [None, None, None]


def test_ffd_packs_tighter_than_none_on_uneven_units():
    spec = [(3 + (37 * i) % 90, [1 + (11 * i) % 60, 2 + (7 * i) % 50]) for i in range(30)]  # 8..200 tokens
    units = build_units(_examples(spec), "shared")
    tokens = lambda plan: sum(len(mb.rows) * mb.row_length for mb in plan)  # noqa: E731
    ffd = plan_epoch(units, _cfg("ffd", 256, 1), 2, 0, 0)
    none = plan_epoch(units, _cfg("none"), 2, 0, 0)
    real = sum(u.length for u in units)
    assert tokens(ffd) < tokens(none), (tokens(ffd), tokens(none), real)


def _auto(row_tokens=None, rows=None):
    return OmegaConf.create({"name": "ffd", "row_tokens": row_tokens, "rows_per_batch": rows, "pad_multiple": 128})


def test_auto_budget_follows_the_longest_unit():
    from ppo_train.data.packing import resolve_budget

    auto, trainer = _auto(), OmegaConf.create({"grad_accum": None})
    assert resolve_budget(auto, [100, 300], "cpu", trainer)
    assert (auto.row_tokens, auto.rows_per_batch, trainer.grad_accum) == (512, 2, 4)  # 1024 per micro-batch, 4096 per step
    auto, trainer = _auto(), OmegaConf.create({"grad_accum": None})
    resolve_budget(auto, [700, 900], "cpu", trainer)
    assert (auto.row_tokens, auto.rows_per_batch, trainer.grad_accum) == (1024, 1, 4)
    auto, trainer = _auto(), OmegaConf.create({"grad_accum": None})
    resolve_budget(auto, [700, 1500], "cpu", trainer)
    assert (auto.row_tokens, auto.rows_per_batch, trainer.grad_accum) == (1536, 1, 2)  # 4096 // 1536 rows per step
    auto, trainer = _auto(), OmegaConf.create({"grad_accum": None})
    resolve_budget(auto, [5000], "cpu", trainer)
    assert (auto.row_tokens, auto.rows_per_batch, trainer.grad_accum) == (5120, 1, 1)
    auto, trainer = _auto(), OmegaConf.create({"grad_accum": None})
    resolve_budget(auto, [700, 1500], "cuda", trainer)
    assert (auto.row_tokens, auto.rows_per_batch, trainer.grad_accum) == (1536, 5, 1)  # 8192 // 1536, one micro-batch
    # explicit values are kept; an auto grad_accum beside an explicit rows_per_batch is 1
    fixed, trainer = _auto(1024, 2), OmegaConf.create({"grad_accum": None})
    assert resolve_budget(fixed, [3000], "cpu", trainer) == []
    assert (fixed.row_tokens, fixed.rows_per_batch, trainer.grad_accum) == (1024, 2, 1)
    auto, trainer = _auto(), OmegaConf.create({"grad_accum": 3})
    resolve_budget(auto, [100], "cpu", trainer)
    assert (auto.rows_per_batch, trainer.grad_accum) == (2, 3)
    for name in ("none", "sorted"):
        other, trainer = OmegaConf.merge(_auto(), {"name": name}), OmegaConf.create({"grad_accum": None})
        assert resolve_budget(other, [100], "cpu", trainer) == [] and trainer.grad_accum == 1
        assert (other.row_tokens, other.rows_per_batch) == (None, None)


@pytest.mark.parametrize("longest", [300, 512, 700, 1100, 2000, 4500])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_steps_hold_the_rows_of_one_auto_step_micro_batch(longest, device):
    """The auto budget splits a step into micro-batches, but every optimizer step trains the same
    rows (the same units, packed the same way) as one micro-batch of AUTO_TOKENS_PER_STEP tokens
    would: the plan cuts consecutive rows of one seeded order."""
    from ppo_train.data.packing import AUTO_TOKENS_PER_STEP, resolve_budget

    rng = np.random.default_rng(longest)
    spec = [(int(rng.integers(1, longest // 3)), [int(rng.integers(1, longest // 3)) for _ in range(2)])
            for _ in range(90)]
    units = build_units(_examples(spec), "shared")
    auto, trainer = _auto(), OmegaConf.create({"grad_accum": None})
    resolve_budget(auto, [u.length for u in units], device, trainer)
    whole = _auto(auto.row_tokens, max(1, AUTO_TOKENS_PER_STEP[device] // auto.row_tokens))
    split_steps = group_steps(plan_epoch(units, auto, 1, seed=5, epoch=0), trainer.grad_accum)
    whole_steps = group_steps(plan_epoch(units, whole, 1, seed=5, epoch=0), 1)
    assert auto.rows_per_batch * trainer.grad_accum == whole.rows_per_batch
    assert len(split_steps) == len(whole_steps) > 1
    for split, (one,) in zip(split_steps, whole_steps):
        rows = [row for mb in split if mb is not None for row in mb.rows]
        assert rows == one.rows and [u for mb in split if mb is not None for u in mb.units] == one.units