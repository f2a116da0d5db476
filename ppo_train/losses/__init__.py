"""Loss functions: loss(policy, reference, pairs, cfg) -> (per-pair loss (P,), metrics).

Pure functions of per-response log-probs (or, for `reward`, per-response scores carried in
`ResponseLogps.sums`); no model, no state. The trainer sums the per-pair losses and divides
by the global step's pair count (see train.py).
"""

from ppo_train.losses.dpo import dpo_loss
from ppo_train.losses.orpo import orpo_loss
from ppo_train.losses.reward import reward_loss
from ppo_train.losses.sft import sft_loss
from ppo_train.losses.simpo import simpo_loss

LOSSES = {"dpo": dpo_loss, "simpo": simpo_loss, "orpo": orpo_loss, "reward": reward_loss, "sft": sft_loss}
# Only DPO compares against a reference model; the others must not compute or cache one.
NEEDS_REFERENCE = {"dpo": True, "simpo": False, "orpo": False, "reward": False, "sft": False}
# The reward model trains a scalar head (AutoModelForSequenceClassification), the rest a causal LM.
REWARD_MODEL = {"reward"}
