"""Loss functions: loss(policy, reference, pairs, params, totals) -> (loss terms, per-pair metrics).

Pure functions of per-response log-probs (or, for `reward`, per-response scores carried in
`ResponseLogps.sums`); no model, no state. Each loss file holds its function and the schema of
its parameters (the `loss=NAME` config option). The trainer sums the loss terms and divides by
the whole step's pair count, or its list count for a listwise loss (`Loss.per_list`; see
train.py); `totals` (common.StepTotals) carries those counts for terms normalized otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ppo_train.losses.dpo import DpoConfig, dpo_loss, dpo_step_stats, per_list, sorts_step
from ppo_train.losses.kto import KtoConfig, kto_loss, kto_step_stats
from ppo_train.losses.orpo import OrpoConfig, orpo_loss
from ppo_train.losses.reward import RewardConfig, reward_loss
from ppo_train.losses.sft import SftConfig, sft_loss
from ppo_train.losses.simpo import SimpoConfig, simpo_loss


@dataclass(frozen=True)
class Loss:
    fn: Callable  # (policy, reference, pairs, params) -> (per-pair loss, metrics)
    schema: type  # the dataclass of its parameters, registered as the `loss=<name>` option
    needs_reference: bool = False  # compares against reference log-probs (a table or a live model)
    reward_head: bool = False  # trains a one-label sequence classifier instead of a causal LM
    per_list: Callable = lambda cfg: False  # (params) -> one term per list (normalized by lists), not per pair
    # (policy, reference, pairs, params) -> detached (P, m) per-pair values the loss needs over the
    # whole step (StepTotals.pair_stats), or None when these params need none
    step_stats: Callable = lambda policy, reference, pairs, cfg: None
    wants_step_stats: Callable = lambda cfg: False
    stats_width: int = 4  # m, the same on every rank (a rank may hold no pair of the step)
    takes_labels: bool = False  # reads each pair's label (fn and step_stats get labels=batch.pair_label)

    def label_kwargs(self, batch) -> dict:
        return {"labels": batch.pair_label} if self.takes_labels else {}

    def normalizer(self, cfg, totals) -> int:
        """What the step's summed loss terms are divided by: its lists or its pairs."""
        return max(totals.lists if self.per_list(cfg) else totals.pairs, 1)

    def batch_terms(self, cfg, batch) -> int:
        """How many of those units one micro-batch holds (the logged loss is their mean)."""
        return len(batch.example_ids) if self.per_list(cfg) else batch.num_pairs


LOSSES: dict[str, Loss] = {
    "dpo": Loss(dpo_loss, DpoConfig, needs_reference=True, per_list=per_list, step_stats=dpo_step_stats,
                wants_step_stats=sorts_step),
    "kto": Loss(kto_loss, KtoConfig, needs_reference=True, step_stats=kto_step_stats,
                wants_step_stats=lambda cfg: True, stats_width=1, takes_labels=True),
    "simpo": Loss(simpo_loss, SimpoConfig),
    "orpo": Loss(orpo_loss, OrpoConfig),
    "reward": Loss(reward_loss, RewardConfig, reward_head=True),
    "sft": Loss(sft_loss, SftConfig),
}

__all__ = ["LOSSES", "Loss", "dpo_loss", "kto_loss", "simpo_loss", "orpo_loss", "reward_loss", "sft_loss"]
