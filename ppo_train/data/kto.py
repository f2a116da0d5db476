"""KTO's view of the examples: labelled completions, each with a mismatched KL completion.

`loss=kto` trains on single completions labelled desirable or undesirable: TRL's unpaired
format (`prompt`, `completion`, `label`), or preference pairs read as one desirable (chosen)
and one undesirable (rejected) completion, as TRL's `unpair_preference_dataset` does. KTO's KL
estimate scores each prompt with another example's completion; here that completion is one
more response of the prompt's unit, so the prompt is encoded once for both:

- example i keeps its own completions (1 unpaired, 2 from a pair) and gets the own completions
  of example i - 1 (cyclic over the split: example 0 takes the last one's) appended as its KL
  completions; completion j is matched with the neighbour's completion j (mod its count), so a
  pair's chosen gets the neighbour's chosen and its rejected the neighbour's rejected. TRL
  builds its KL completions the same way within each batch of its sequential sampler
  (`KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1]`): the same partners when the
  split is one batch;
- each own completion j is a "pair" (j, K + j'): the loss reads the first index as the labelled
  completion and the second as its KL completion, and `labels` gives 1 (desirable) or 0 per pair.

Lists of more than two ranked responses have no desirable/undesirable reading here and are
refused, naming the row.
"""

from __future__ import annotations

import numpy as np

from ppo_train.data.examples import Examples, ragged_take
from ppo_train.data.tokenize import TokenizedExample
from ppo_train.errors import DataError


class KtoRows:
    """Rows protocol (data/examples.py) over `base`: example i's own completions followed by
    example i - 1's (cyclic), with one (completion, KL completion) pair per own completion."""

    def __init__(self, base: Examples, source: str):
        n = len(base)
        self.base = base
        own = base.num_responses
        too_many = np.flatnonzero(own > 2)
        if len(too_many):
            row = int(base.index[too_many[0]])
            raise DataError(f"{source} row {row}: loss=kto reads labelled completions or pairs (chosen desirable, "
                            f"rejected undesirable); this row has {int(own[too_many[0]])} ranked responses "
                            f"({len(too_many)} such rows); use loss=dpo (all pairs or plackett_luce)")
        self.partner = (np.arange(n, dtype=np.int64) - 1) % max(n, 1)
        flat = base.flat_response_lengths
        offsets = np.concatenate(([0], np.cumsum(own))).astype(np.int64)
        both = np.stack([np.arange(n, dtype=np.int64), self.partner], axis=1).reshape(-1)
        self.source_index = base.index
        self.prompt_lengths = base.prompt_length
        self.response_lengths = ragged_take(flat, offsets, both) if n else flat[:0]
        self.response_offsets = np.concatenate(([0], np.cumsum(own + own[self.partner]))).astype(np.int64)
        self.pair_counts = own.astype(np.int64)
        self.chosen_token_counts = base.response_total.astype(np.int64)  # each own completion once
        self.image_counts = base.image_count
        self.image_token_counts = base.image_tokens

    def __len__(self) -> int:
        return len(self.base)

    def get(self, i: int) -> TokenizedExample:
        ex, partner = self.base[i], self.base[int(self.partner[i])]
        k, kp = len(ex.response_ids), len(partner.response_ids)
        if ex.pairs:  # a preference pair: chosen desirable, rejected undesirable
            labels = [0.0] * k
            labels[ex.pairs[0][0]] = 1.0
        else:  # an unpaired row: its label, kept as its one score
            labels = [float(s) for s in ex.scores]
        return TokenizedExample(ex.index, ex.prompt_ids, list(ex.response_ids) + list(partner.response_ids),
                                [(j, k + j % kp) for j in range(k)], ex.scores, ex.images, ex.mrope,
                                ex.rope_delta, ex.image_tokens, labels)

    def digest(self) -> str:
        return f"kto:{self.base.digest()}"


def kto_examples(examples: Examples, source: str) -> Examples:
    """The KTO view of a split (see the module docstring)."""
    return Examples(KtoRows(examples, source)) if len(examples) else examples
