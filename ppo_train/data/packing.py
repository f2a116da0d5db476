"""Packers: place units into rows and rows into micro-batches, deterministically under a seed.

- none: micro-batches of `trainer.micro_batch_size` units in a seeded random order; every
  document is its own row (shared: one row per prompt; paired: one per prompt+response),
  padded to the longest row rounded up to `packing.pad_multiple`.
- sorted: like none, but micro-batches hold units of similar length (sorted, longest first),
  and the micro-batches are visited in a seeded random order.
- ffd: first-fit-decreasing. Whole units go into rows of `packing.row_tokens` tokens (a
  fixed shape, so compiled kernels never see a new one); `packing.rows_per_batch` rows
  per micro-batch, visited in a seeded random order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ppo_train.data.layout import Units


@dataclass(frozen=True)
class Piece:
    unit: int  # index into the unit list
    lo: int  # [lo, hi) token range of the unit
    hi: int


@dataclass
class MicroBatch:
    rows: list[list[Piece]]
    row_length: int
    units: list[int]  # units in this micro-batch, in response-numbering order

    @property
    def real_tokens(self) -> int:
        return sum(p.hi - p.lo for row in self.rows for p in row)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _seeded_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _doc_rows(units: Units, members: list[int]) -> list[list[Piece]]:
    return [[Piece(u, lo, hi)] for u in members for lo, hi in units.doc_bounds(u)]


def _unpacked(units: Units, groups: list[list[int]], pad_multiple: int) -> list[MicroBatch]:
    out = []
    for members in groups:
        rows = _doc_rows(units, members)
        longest = max(p.hi - p.lo for row in rows for p in row)
        out.append(MicroBatch(rows, round_up(longest, pad_multiple), members))
    return out


def first_fit_decreasing(lengths: list[int], capacity: int, order: np.ndarray) -> list[list[int]]:
    """Bins of item indices; items visited longest first (ties in `order`), each into the
    first bin with room. A max segment tree over remaining capacity makes it O(n log n)."""
    items = sorted(order.tolist(), key=lambda i: -lengths[i])  # stable: ties keep the seeded order
    size = 1
    while size < max(1, len(items)):
        size *= 2
    tree = np.full(2 * size, capacity, dtype=np.int64)  # remaining room per bin (leaves)
    bins: list[list[int]] = []
    for i in items:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"unit of {need} tokens exceeds the row budget packing.row_tokens={capacity}")
        node = 1
        while node < size:  # descend to the leftmost leaf with room
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


# The ffd budget chosen when packing.row_tokens / rows_per_batch / trainer.grad_accum are null
# (auto). An optimizer step holds about AUTO_TOKENS_PER_STEP tokens per rank, trained as
# micro-batches of about AUTO_TOKENS_PER_MICRO_BATCH tokens (gradients accumulated in between).
# Measured on 2 CPU cores (52M Llama, 49k vocabulary, 48 HH-RLHF pairs, the real trainer):
# - rows of 512 tokens were at least as fast as longer ones at equal tokens per micro-batch
#   (512 x 2: 2.80 pairs/s, 1024 x 1: 2.69; 512 x 4: 3.24, 1024 x 2: 3.16, 2048 x 1: 2.53);
# - 4096 tokens per step: in one micro-batch, throughput rose with its size to the knee at 4096
#   (512 x 1: 2.07, x 2: 2.80, x 4: 3.24, x 6: 3.88, x 8: 3.80 pairs/s);
# - the same 4096-token step without gradient checkpointing (README, "Measurements"), one run:
#   512 x 8 rows with checkpointing (the former default) 4.60 pairs/s, 2385 MiB peak RSS;
#   without it, 512 x 4 rows x 2 micro-batches 5.45 pairs/s, 2883-3034 MiB; 512 x 2 x 4
#   5.08, 2305 MiB; 512 x 1 x 8 4.44, 2075 MiB. 1024 tokens per micro-batch holds the memory
#   of the checkpointed 4096 without recomputing anything, so the CPU trains without it.
# The step keeps the 4096 tokens (the same rows per step as one 4096-token micro-batch: the
# plan cuts consecutive rows, so the losses are those of the single micro-batch, summed in
# another order). On a GPU (not measured here) FlexAttention skips masked blocks, so attention
# costs the visible pairs, not L^2: longer rows pack tighter at no attention cost, and 8192
# tokens per micro-batch is what a 7-8B model with gradient checkpointing holds on an 80 GB
# device; one micro-batch per step there.
MIN_ROW_TOKENS = 512
AUTO_TOKENS_PER_STEP = {"cpu": 4096, "cuda": 8192}
AUTO_TOKENS_PER_MICRO_BATCH = {"cpu": 1024, "cuda": 8192}


def resolve_budget(packing, lengths: list[int], device_type: str, trainer=None) -> list[str]:
    """Fill packing.row_tokens / rows_per_batch and trainer.grad_accum left null (auto) from
    the units' lengths, in place; returns what was chosen (for a log line). An auto grad_accum
    is 1 unless rows_per_batch is auto too (ffd), where it makes the step about
    AUTO_TOKENS_PER_STEP tokens per rank."""
    chosen = []
    auto_rows = packing.name == "ffd" and packing.rows_per_batch is None
    if packing.name == "ffd" and packing.row_tokens is None:
        packing.row_tokens = max(MIN_ROW_TOKENS, round_up(max(lengths, default=1), packing.pad_multiple))
        chosen.append(f"packing.row_tokens={packing.row_tokens} (longest unit {max(lengths, default=0)} tokens)")
    kind = device_type if device_type in AUTO_TOKENS_PER_STEP else "cpu"
    if auto_rows:
        packing.rows_per_batch = max(1, AUTO_TOKENS_PER_MICRO_BATCH[kind] // packing.row_tokens)
        chosen.append(f"packing.rows_per_batch={packing.rows_per_batch}")
    if trainer is not None and trainer.grad_accum is None:
        trainer.grad_accum = 1
        if auto_rows:
            step_rows = max(1, AUTO_TOKENS_PER_STEP[kind] // packing.row_tokens)
            trainer.grad_accum = max(1, step_rows // packing.rows_per_batch)
            chosen.append(f"trainer.grad_accum={trainer.grad_accum}")
    return chosen


def plan_epoch(units: Units, packing, micro_batch_size: int, seed: int, epoch: int) -> list[MicroBatch]:
    """All micro-batches of one epoch, in the order they are trained."""
    n = len(units)
    order = _seeded_order(n, seed, epoch)
    rng = np.random.default_rng([seed, epoch, 1])
    if packing.name == "none":
        groups = [order[i:i + micro_batch_size].tolist() for i in range(0, n, micro_batch_size)]
        return _unpacked(units, groups, packing.pad_multiple)
    if packing.name == "sorted":
        by_length = order[np.argsort(-units.lengths[order], kind="stable")].tolist()  # ties keep the seeded order
        groups = [by_length[i:i + micro_batch_size] for i in range(0, n, micro_batch_size)]
        groups = [groups[i] for i in rng.permutation(len(groups))]
        return _unpacked(units, groups, packing.pad_multiple)
    if packing.name == "ffd":
        if packing.row_tokens is None or packing.rows_per_batch is None:
            raise ValueError("packing.row_tokens / rows_per_batch are auto (null): resolve them from the units first "
                             "(data.packing.resolve_budget, which prepare() calls)")
        lengths = units.lengths.tolist()
        bins = first_fit_decreasing(lengths, packing.row_tokens, order)
        bins = [bins[i] for i in rng.permutation(len(bins))]
        out = []
        for i in range(0, len(bins), packing.rows_per_batch):
            rows = bins[i:i + packing.rows_per_batch]
            out.append(MicroBatch([[Piece(u, 0, lengths[u]) for u in row] for row in rows],
                                  packing.row_tokens, [u for row in rows for u in row]))
        return out
    raise ValueError(f"packing.name={packing.name!r}: expected none, ffd or sorted")


def group_steps(micro_batches: list[MicroBatch], per_step: int) -> list[list[MicroBatch | None]]:
    """Consecutive groups of `per_step` micro-batches (world size x grad_accum); the last
    group is filled with None (empty micro-batches that add nothing) so no unit is dropped."""
    steps = [micro_batches[i:i + per_step] for i in range(0, len(micro_batches), per_step)]
    if steps and len(steps[-1]) < per_step:
        steps[-1] = steps[-1] + [None] * (per_step - len(steps[-1]))
    return steps
