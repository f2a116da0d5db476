"""Which micro-batches make optimizer step n, on this rank.

An epoch's plan (`packing.plan_epoch`) is a pure function of the units, the packing
settings, the seed and the epoch, so the step number alone is the data position: a resumed
run continues with exactly the micro-batches an uninterrupted one would have trained. A step
is `world_size x grad_accum` consecutive micro-batches of the plan; rank r trains every
world_size-th of them, starting at r. The last step of an epoch is filled with empty
micro-batches (None) so that every rank makes the same number of forward/backward calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from ppo_train.data.layout import Units
from ppo_train.data.packing import MicroBatch, group_steps, plan_epoch


@dataclass
class Step:
    index: int  # 0-based: the optimizer step that makes `index + 1` steps done
    epoch: int
    micro_batches: list[MicroBatch | None]  # this rank's share, in order
    pairs: int  # pairs in the whole step (every micro-batch, every rank): the loss normalizer
    units: list[int]  # every unit of the step (all ranks), for error messages
    chosen_tokens: int = 0  # the preferred responses' tokens over the step's pairs (sft in a DPO mix)


class Schedule:
    def __init__(self, units: Units, packing, micro_batch_size: int, seed: int, world_size: int = 1,
                 rank: int = 0, grad_accum: int = 1, max_steps: int = -1, epochs: int = 1):
        self.units, self.packing, self.micro_batch_size, self.seed = units, packing, micro_batch_size, seed
        self.world_size, self.rank, self.per_step = world_size, rank, world_size * grad_accum
        self._plans: dict[int, list[MicroBatch]] = {}
        self._groups: dict[int, list[list[MicroBatch | None]]] = {}
        self.steps_per_epoch = math.ceil(len(self.plan(0)) / self.per_step)
        self.total_steps = max_steps if max_steps > 0 else epochs * self.steps_per_epoch

    @classmethod
    def from_config(cls, cfg, units: Units, dist) -> "Schedule":
        t = cfg.trainer
        return cls(units, cfg.packing, t.micro_batch_size, t.seed, dist.world_size, dist.rank, t.grad_accum,
                   t.max_steps, t.epochs)

    def plan(self, epoch: int) -> list[MicroBatch]:
        """Every micro-batch of one epoch, in training order (the latest epoch is kept)."""
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.units, self.packing, self.micro_batch_size, self.seed, epoch)}
        return self._plans[epoch]

    def steps(self, start: int = 0) -> Iterator[Step]:
        """Steps start, start + 1, ..., total_steps - 1."""
        for index in range(start, self.total_steps):
            epoch, within = divmod(index, self.steps_per_epoch)
            if epoch not in self._groups:
                self._groups = {epoch: group_steps(self.plan(epoch), self.per_step)}
            group = self._groups[epoch][within]
            members = [u for mb in group if mb is not None for u in mb.units]
            yield Step(index, epoch, group[self.rank::self.world_size],
                       int(self.units.num_pairs[members].sum()), members,
                       int(self.units.examples.chosen_tokens[members].sum()))
