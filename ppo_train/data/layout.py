"""Units: one prompt with all its responses, laid out as the model will see them.

- shared: tokens [P | R1 | ... | RK] in one document. Position ids: P is 0..|P|-1 and
  every Ri restarts at |P|, so each response looks as if it followed the prompt alone.
  Segment ids: 0 for P, i for Ri (1-based); the mask lets Ri see only P and itself.
- paired: K documents [P | Ri], each with positions from 0 (the usual format).
- unmasked: the paired documents, packed under a causal mask only (see collate): cheaper
  attention, inexact math; LoRA is expected to learn to ignore the neighbours.

Images belong to the prompt: `shared` carries the prompt's images once (one vision-encoder
pass for all K responses), `paired` once per document (K passes). M-RoPE models get (3, T)
positions: the prompt's from the model's rule, each response's continuing from the prompt
(1-D position + the prompt's rope delta) on every axis.

A unit is what the packer places: all of it lands in one micro-batch (and, under ffd,
in one row), so a prompt's pairs are always scored together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ppo_train.data.examples import Examples
from ppo_train.data.tokenize import TokenizedExample


@dataclass
class Unit:
    uid: int  # index of the example in the tokenized list (the reference cache key)
    input_ids: np.ndarray  # (T,) int64
    position_ids: np.ndarray  # (T,)
    segment_ids: np.ndarray  # (T,) 0 = prompt, i = response i-1
    doc_ids: np.ndarray  # (T,) document within the unit: 0 (shared) or k (paired)
    resp_start: np.ndarray  # (K,) offset of response k's first token
    resp_len: np.ndarray  # (K,)
    resp_pred_first: np.ndarray  # (K,) offset of the token that predicts response k's first token
    doc_bounds: list[tuple[int, int]]  # [lo, hi) of each document
    pairs: np.ndarray  # (P, 2) (preferred, dispreferred) response indices
    images: list[tuple[int, list]] = field(default_factory=list)  # (offset of a prompt copy, its image refs)
    mrope: np.ndarray | None = None  # (3, T) M-RoPE positions (M-RoPE models only)
    image_tokens: int = 0  # tokens carrying image features in one prompt copy
    pair_labels: np.ndarray | None = None  # (P,) float64: 1 desirable, 0 undesirable (loss=kto); None: 1 each

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_responses(self) -> int:
        return int(self.resp_len.shape[0])

    def visible_pairs(self, lo: int = 0, hi: int | None = None) -> int:
        """(query, key) pairs the exact mask lets attend within tokens [lo, hi) (whole documents):
        per document, the prompt causally, and each response the prompt and itself causally."""
        hi = self.length if hi is None else hi
        total = 0
        for d_lo, d_hi in self.doc_bounds:
            if d_lo < lo or d_hi > hi:
                continue
            inside = (self.resp_start >= d_lo) & (self.resp_start < d_hi)
            responses = self.resp_len[inside].astype(np.int64)
            p = (d_hi - d_lo) - int(responses.sum())
            total += p * (p + 1) // 2 + int((responses * p + responses * (responses + 1) // 2).sum())
        return total


def build_unit(ex: TokenizedExample, uid: int, layout: str) -> Unit:
    prompt = np.asarray(ex.prompt_ids, dtype=np.int64)
    responses = [np.asarray(r, dtype=np.int64) for r in ex.response_ids]
    p, lens = len(prompt), np.array([len(r) for r in responses], dtype=np.int64)
    if layout == "shared":
        copies = [0]
        ids = np.concatenate([prompt, *responses])
        pos = np.concatenate([np.arange(p), *(np.arange(p, p + n) for n in lens)])
        seg = np.repeat(np.arange(len(lens) + 1), np.concatenate(([p], lens)))
        starts = p + np.concatenate(([0], np.cumsum(lens)[:-1]))
        preds = np.full(len(lens), p - 1, dtype=np.int64)
        doc = np.zeros(len(ids), dtype=np.int64)
        bounds = [(0, len(ids))]
    elif layout in ("paired", "unmasked"):  # unmasked differs only in the mask (collate)
        docs = p + lens
        lo = np.concatenate(([0], np.cumsum(docs)[:-1]))
        copies = lo.tolist()
        ids = np.concatenate([x for r in responses for x in (prompt, r)])
        pos = np.concatenate([np.arange(n) for n in docs])
        seg = np.concatenate([np.repeat([0, k + 1], [p, n]) for k, n in enumerate(lens)])
        starts, preds = lo + p, lo + p - 1
        doc = np.repeat(np.arange(len(lens)), docs)
        bounds = [(int(a), int(a + n)) for a, n in zip(lo, docs)]
    else:
        raise ValueError(f"layout.name={layout!r}: expected shared or paired")
    as_i64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    pos = as_i64(pos)
    mrope = None
    if ex.mrope is not None:  # prompt copies take the prompt's 3-D positions, responses p + delta
        mrope = np.tile(pos + ex.rope_delta, (3, 1))
        for c in copies:
            mrope[:, c:c + p] = ex.mrope
    return Unit(uid, as_i64(ids), pos, as_i64(seg), as_i64(doc), as_i64(starts), lens, as_i64(preds), bounds,
                as_i64(ex.pairs).reshape(-1, 2), [(c, list(ex.images)) for c in copies] if ex.images else [],
                mrope, ex.image_tokens,
                np.asarray(ex.labels if ex.labels is not None else [1.0] * len(ex.pairs), dtype=np.float64))


class Units:
    """The units of a set of examples in one layout: `units[i]` is built from example i when
    asked (its micro-batch is collated); lengths, pair counts and documents come from the
    examples' per-example arrays without reading a token."""

    def __init__(self, examples: Examples, layout: str):
        if layout not in ("shared", "paired", "unmasked"):
            raise ValueError(f"layout.name={layout!r}: expected shared or paired")
        self.examples, self.layout = examples, layout

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i) -> Unit:
        if isinstance(i, slice):
            return Units(self.examples[i], self.layout)
        i = int(i)
        if i < 0:
            i += len(self)
        return build_unit(self.examples[i], i, self.layout)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def select(self, indices) -> "Units":
        """The units of the examples at `indices`, renumbered from 0 (uids are positions)."""
        return Units(self.examples.select(indices), self.layout)

    @cached_property
    def lengths(self) -> np.ndarray:
        """(n,) tokens of each unit."""
        ex = self.examples
        return ex.shared_length if self.layout == "shared" else ex.paired_length

    @property
    def num_pairs(self) -> np.ndarray:
        return self.examples.num_pairs

    @property
    def num_responses(self) -> np.ndarray:
        return self.examples.num_responses

    def doc_bounds(self, i: int) -> list[tuple[int, int]]:
        """[lo, hi) of each document of unit i (one for shared, K for paired)."""
        if self.layout == "shared":
            return [(0, int(self.lengths[i]))]
        docs = int(self.examples.prompt_length[i]) + self.examples.response_lengths(i)
        ends = np.cumsum(docs)
        return [(int(e - d), int(e)) for e, d in zip(ends, docs)]

    @property
    def doc_lengths(self) -> np.ndarray:
        """The length of every document of every unit (flat)."""
        if self.layout == "shared":
            return self.lengths
        ex = self.examples
        return np.repeat(ex.prompt_length, ex.num_responses) + ex.flat_response_lengths

    @property
    def docs_per_unit(self) -> np.ndarray:
        return np.ones(len(self), dtype=np.int64) if self.layout == "shared" else self.examples.num_responses

    def digest(self) -> str:
        """Identifies every unit's tokens, pairs and images, and the layout."""
        return f"{self.layout}:{self.examples.digest()}"


def build_units(examples, layout: str) -> Units:
    """The units of `examples` (an Examples, or a list of TokenizedExample) in `layout`."""
    if not isinstance(examples, Examples):
        examples = Examples.from_list(examples)
    return Units(examples, layout)
