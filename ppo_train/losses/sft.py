"""Supervised fine-tuning on the preferred responses, in the loss interface of dpo_loss.

Per pair (y_w, y_l), the per-token mean negative log-likelihood of y_w:

    L = -log pi(y_w) / |y_w|

y_l and the reference are unused. Each pair is one SFT sample, so with K > 2 ranked
responses per prompt the best response appears in several pairs (K - 1 for the top one
under all-pairs) and is weighted by that count; a response that is never preferred gets
no weight. To train on every response of a prompt once, give the data as pairs whose
preferred response is each such response once.

A per-response mean, not a sum, keeps long and short responses on one scale. TRL's
SFTTrainer averages over all tokens of the batch instead, which weights responses by
length; the two agree when the preferred responses have equal lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppo_train.logps import ResponseLogps


@dataclass
class SftConfig:
    """`loss=sft`: no parameters."""

    name: str = "sft"

    def problems(self) -> list[str]:
        return []


def sft_loss(policy: ResponseLogps, reference: ResponseLogps | None, pairs: torch.Tensor,
             cfg: SftConfig, totals=None) -> tuple[torch.Tensor, dict]:
    """pairs (P, 2) -> per-pair loss (P,) and per-pair metric tensors (P,). Only pairs[:, 0] is used."""
    del reference, cfg  # SFT needs neither a reference model nor hyperparameters
    w = pairs[:, 0]
    nll = -policy.means[w]  # means clamps counts at 1: an empty response gives 0, not nan
    metrics = {
        "nll": nll.detach(),
        "logps/chosen": policy.sums[w].detach(),
    }
    return nll, metrics
