"""Examples: the tokenized examples of one file, as per-example arrays and rows read on demand.

What training keeps of the data is per example, never per token: the source row, the prompt
length, each response's length, the pair count, the images and image tokens (numpy arrays,
about 40 bytes per example). The tokens of an example are read only when its micro-batch is
collated: from the memory-mapped store (data/store.py), or from a list of `TokenizedExample`
(`ListRows`: tests, scripts, small in-memory data).

`Examples.select(indices)` is a view (the eval split, the examples that fit the row budget):
it shares the rows and the arrays of the whole set.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Protocol

import numpy as np

from ppo_train.data.tokenize import TokenizedExample


class Rows(Protocol):
    """Where the examples live. The arrays have one entry per example (`response_lengths`:
    one per response, `response_offsets`: n + 1 bounds into it)."""

    source_index: np.ndarray  # (n,) row number in the source file
    prompt_lengths: np.ndarray  # (n,)
    response_offsets: np.ndarray  # (n + 1,)
    response_lengths: np.ndarray  # (sum of K,)
    pair_counts: np.ndarray  # (n,)
    chosen_token_counts: np.ndarray  # (n,) tokens of the preferred response, summed over the example's pairs
    image_counts: np.ndarray  # (n,)
    image_token_counts: np.ndarray  # (n,)

    def __len__(self) -> int: ...

    def get(self, row: int) -> TokenizedExample: ...

    def digest(self) -> str: ...


def _i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def ragged_take(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The runs values[offsets[r]:offsets[r + 1]] of `rows`, back to back (no Python loop)."""
    starts, counts = offsets[rows], offsets[rows + 1] - offsets[rows]
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return values[np.repeat(starts, counts) + np.arange(int(counts.sum())) - first]


class ListRows:
    """Examples held as a list of TokenizedExample (tests, scripts, small data)."""

    def __init__(self, examples: list[TokenizedExample]):
        self.examples = list(examples)
        self.source_index = _i64([ex.index for ex in self.examples])
        self.prompt_lengths = _i64([len(ex.prompt_ids) for ex in self.examples])
        self.response_offsets = _i64(np.cumsum([0] + [len(ex.response_ids) for ex in self.examples]))
        self.response_lengths = _i64([len(r) for ex in self.examples for r in ex.response_ids])
        self.pair_counts = _i64([len(ex.pairs) for ex in self.examples])
        self.chosen_token_counts = _i64([sum(len(ex.response_ids[w]) for w, _ in ex.pairs) for ex in self.examples])
        self.image_counts = _i64([len(ex.images or ()) for ex in self.examples])
        self.image_token_counts = _i64([ex.image_tokens for ex in self.examples])

    def __len__(self) -> int:
        return len(self.examples)

    def get(self, row: int) -> TokenizedExample:
        return self.examples[row]

    def digest(self) -> str:
        """Every token, pair and image reference of every example."""
        from ppo_train.data.images import image_digest

        h = hashlib.sha256()
        for ex in self.examples:
            h.update(_i64(ex.prompt_ids).tobytes())
            for r in ex.response_ids:
                h.update(_i64(len(r)).tobytes() + _i64(r).tobytes())
            h.update(_i64(ex.pairs).tobytes())
            h.update(image_digest(ex.images or []))
        return h.hexdigest()


class Examples:
    """A sequence of tokenized examples (`examples[i]` is a TokenizedExample read on demand)
    with per-example arrays for everything that plans, packs and reports."""

    def __init__(self, rows: Rows, members: np.ndarray | None = None):
        self.rows = rows
        self.members = np.arange(len(rows), dtype=np.int64) if members is None else _i64(members)

    @classmethod
    def from_list(cls, examples: list[TokenizedExample]) -> "Examples":
        return cls(ListRows(examples))

    def __len__(self) -> int:
        return int(self.members.shape[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        return self.rows.get(int(self.members[i]))

    def __iter__(self):
        for row in self.members:
            yield self.rows.get(int(row))

    def select(self, indices) -> "Examples":
        """The examples at `indices` (positions in this set), in that order."""
        return Examples(self.rows, self.members[_i64(indices)])

    # per-example arrays, in this set's order
    @cached_property
    def index(self) -> np.ndarray:
        return self.rows.source_index[self.members]

    @cached_property
    def prompt_length(self) -> np.ndarray:
        return self.rows.prompt_lengths[self.members]

    @cached_property
    def num_responses(self) -> np.ndarray:
        off = self.rows.response_offsets
        return off[self.members + 1] - off[self.members]

    @cached_property
    def response_total(self) -> np.ndarray:
        """Tokens of all responses of each example."""
        sums = np.concatenate(([0], np.cumsum(self.rows.response_lengths)))
        off = self.rows.response_offsets
        return sums[off[self.members + 1]] - sums[off[self.members]]

    @cached_property
    def longest_response(self) -> np.ndarray:
        lengths, off = self.rows.response_lengths, self.rows.response_offsets
        if lengths.size == 0:
            return np.zeros(len(self), dtype=np.int64)
        longest = np.maximum.reduceat(lengths, off[:-1]) if len(self.rows) else lengths[:0]
        return longest[self.members]

    @cached_property
    def flat_response_lengths(self) -> np.ndarray:
        """Every response's length, example after example, in this set's order."""
        return ragged_take(self.rows.response_lengths, self.rows.response_offsets, self.members)

    def response_lengths(self, i: int) -> np.ndarray:
        row = self.members[i]
        return self.rows.response_lengths[self.rows.response_offsets[row]:self.rows.response_offsets[row + 1]]

    @cached_property
    def num_pairs(self) -> np.ndarray:
        return self.rows.pair_counts[self.members]

    @cached_property
    def chosen_tokens(self) -> np.ndarray:
        """Tokens of the preferred response summed over each example's pairs (a response preferred
        in several pairs counts once per pair): the normalizer of `sft` in a DPO loss mix."""
        return self.rows.chosen_token_counts[self.members]

    @cached_property
    def image_count(self) -> np.ndarray:
        return self.rows.image_counts[self.members]

    @cached_property
    def image_tokens(self) -> np.ndarray:
        return self.rows.image_token_counts[self.members]

    @property
    def shared_length(self) -> np.ndarray:
        """Tokens of each example in layout=shared: [P | R1 | ... | RK]."""
        return self.prompt_length + self.response_total

    @property
    def paired_length(self) -> np.ndarray:
        """Tokens of each example in layout=paired: K x [P | Rk]."""
        return self.prompt_length * self.num_responses + self.response_total

    @property
    def longest_sequence(self) -> int:
        """The longest [prompt | response] in tokens (0 for no examples)."""
        return int((self.prompt_length + self.longest_response).max(initial=0))

    def digest(self) -> str:
        """Identifies the tokens, pairs and images of these examples, in this order."""
        return hashlib.sha256(f"{self.rows.digest()}:".encode() + self.members.tobytes()).hexdigest()
