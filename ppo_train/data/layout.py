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

import numpy as np

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

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    def image_digest(self) -> bytes:
        """What identifies the unit's images (empty for a text unit): for caches and resumes."""
        from ppo_train.vision import image_digest

        return image_digest([r for _, refs in self.images[:1] for r in refs]) if self.images else b""

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
    p = len(ex.prompt_ids)
    ids, pos, seg, doc = [], [], [], []
    starts, preds, bounds, copies = [], [], [], []
    if layout == "shared":
        copies.append(0)
        ids += ex.prompt_ids
        pos += range(p)
        seg += [0] * p
        for k, r in enumerate(ex.response_ids):
            starts.append(len(ids))
            preds.append(p - 1)
            ids += r
            pos += range(p, p + len(r))
            seg += [k + 1] * len(r)
        doc = [0] * len(ids)
        bounds = [(0, len(ids))]
    elif layout in ("paired", "unmasked"):  # unmasked differs only in the mask (collate)
        for k, r in enumerate(ex.response_ids):
            lo = len(ids)
            copies.append(lo)
            ids += ex.prompt_ids
            starts.append(len(ids))
            preds.append(len(ids) - 1)
            ids += r
            pos += range(p + len(r))
            seg += [0] * p + [k + 1] * len(r)
            doc += [k] * (p + len(r))
            bounds.append((lo, len(ids)))
    else:
        raise ValueError(f"layout.name={layout!r}: expected shared or paired")
    as_i64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    pos = as_i64(pos)
    mrope = None
    if ex.mrope is not None:  # prompt copies take the prompt's 3-D positions, responses p + delta
        mrope = np.tile(pos + ex.rope_delta, (3, 1))
        for lo in copies:
            mrope[:, lo:lo + p] = ex.mrope
    return Unit(uid, as_i64(ids), pos, as_i64(seg), as_i64(doc), as_i64(starts),
                as_i64([len(r) for r in ex.response_ids]), as_i64(preds), bounds,
                as_i64(ex.pairs).reshape(-1, 2), [(lo, list(ex.images)) for lo in copies] if ex.images else [],
                mrope, ex.image_tokens)


def build_units(examples: list[TokenizedExample], layout: str) -> list[Unit]:
    return [build_unit(ex, i, layout) for i, ex in enumerate(examples)]
