"""Loss functions: loss(policy, reference, pairs, cfg) -> (per-pair loss (P,), metrics).

Pure functions of per-response log-probs; no model, no state. The trainer sums the
per-pair losses and divides by the global step's pair count (see train.py).
"""

from ppo_train.losses.dpo import dpo_loss

LOSSES = {"dpo": dpo_loss}
NEEDS_REFERENCE = {"dpo": True}
