"""Loss functions: loss(policy, reference, pairs, params) -> (per-pair loss (P,), metrics).

Pure functions of per-response log-probs (or, for `reward`, per-response scores carried in
`ResponseLogps.sums`); no model, no state. Each loss file holds its function and the schema of
its parameters (the `loss=NAME` config option). The trainer sums the per-pair losses and
divides by the global step's pair count (see train.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ppo_train.losses.dpo import DpoConfig, dpo_loss
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


LOSSES: dict[str, Loss] = {
    "dpo": Loss(dpo_loss, DpoConfig, needs_reference=True),
    "simpo": Loss(simpo_loss, SimpoConfig),
    "orpo": Loss(orpo_loss, OrpoConfig),
    "reward": Loss(reward_loss, RewardConfig, reward_head=True),
    "sft": Loss(sft_loss, SftConfig),
}

__all__ = ["LOSSES", "Loss", "dpo_loss", "simpo_loss", "orpo_loss", "reward_loss", "sft_loss"]
