"""PackedBatch: the tensors of one micro-batch, and the bookkeeping to score responses.

Response r of the micro-batch has tokens at flat positions (row * L + column). Its
log-prob is gathered at explicit *predicting* positions: the prompt's last token for its
first token (not the previous response's last token, which is what a naive
`logits[:, :-1]` shift would use in a shared row), then its own tokens.

Images: the image references of the micro-batch are listed in the order of their tokens in
the flattened (rows x length) ids, the order in which the model scatters image features, and
turned into the processor's tensors by `images` (a `vision.ImageInputs`). M-RoPE units give
(3, B, L) position ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ppo_train.data.layout import Unit, Units
from ppo_train.data.packing import MicroBatch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, L) long
    position_ids: torch.Tensor  # (B, L) long
    doc_ids: torch.Tensor  # (B, L) long; padding is a document of its own
    segment_ids: torch.Tensor  # (B, L) long; 0 = prompt (or padding), i = response i
    pred_index: torch.Tensor  # (T,) flat index of the position predicting each target
    target_ids: torch.Tensor  # (T,) token to be predicted
    target_response: torch.Tensor  # (T,) response index (0..R-1) of each target
    last_index: torch.Tensor  # (R,) flat index of each response's last token
    response_unit: torch.Tensor  # (R,) unit uid of each response
    response_k: torch.Tensor  # (R,) index of the response within its unit
    pairs: torch.Tensor  # (P, 2) preferred, dispreferred response indices
    pair_unit: torch.Tensor  # (P,) unit uid of each pair
    pair_k: torch.Tensor  # (P,) index of the pair within its unit
    pair_label: torch.Tensor  # (P,) float64: 1 desirable, 0 undesirable (loss=kto); 1 for preference pairs
    real_tokens: int
    example_ids: list[int]  # uids of the units, for error messages
    visible_pairs: int = 0  # (query, key) pairs the mask lets attend among real tokens (FLOP counts)
    image_inputs: dict = field(default_factory=dict)  # the processor's image tensors (pixel_values, ...)
    images: int = 0  # images sent through the vision encoder for this batch
    image_tokens: int = 0  # tokens that carry image features

    @property
    def num_responses(self) -> int:
        return int(self.response_unit.shape[0])

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def to(self, device) -> "PackedBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        moved["image_inputs"] = {k: v.to(device) for k, v in self.image_inputs.items()}
        return PackedBatch(**moved)


def collate(all_units: Units, mb: MicroBatch | None, pad_id: int, empty_length: int = 128,
            mask_documents: bool = True, restart_positions: bool = True, min_rows: int = 1,
            length: int | None = None, images=None) -> PackedBatch:
    """Lay out one micro-batch. `None` gives an empty micro-batch (pad rows, no responses).

    mask_documents=False (layout=unmasked): every real token of a row is one document with
    segment 0, so the mask is plain causal across the packed sequences; restart_positions=False
    then also lets the position ids run on along the row. `min_rows` adds all-pad rows and
    `length` (>= the micro-batch's own row length) pads every row further, for fixed shapes.
    `images` turns the micro-batch's image references into tensors (needed when units have images).
    """
    rows = list(mb.rows) if mb is not None else []
    rows += [[] for _ in range(max(0, min_rows - len(rows)))]
    length = length or (mb.row_length if mb is not None else empty_length)
    members = mb.units if mb is not None else []
    units: dict[int, Unit] = {u: all_units[u] for u in members}  # built from the rows once per micro-batch
    b = len(rows)
    ids = np.full((b, length), pad_id, dtype=np.int64)
    pos = np.zeros((b, length), dtype=np.int64)
    doc = np.zeros((b, length), dtype=np.int64)
    seg = np.zeros((b, length), dtype=np.int64)
    mrope = np.zeros((3, b, length), dtype=np.int64) if any(units[u].mrope is not None for u in members) else None
    refs, image_tokens = [], 0
    base, count = {}, 0
    for u in members:
        base[u] = count
        count += units[u].num_responses
    last = np.zeros(count, dtype=np.int64)
    preds, targets, owners = [], [], []
    visible = 0
    for r, row in enumerate(rows):
        col, next_doc = 0, 0
        for piece in row:
            unit = units[piece.unit]
            n = piece.hi - piece.lo
            visible += unit.visible_pairs(piece.lo, piece.hi) if mask_documents else 0
            if col + n > length:
                raise ValueError(f"row {r} overflows its length {length}")
            sl = slice(col, col + n)
            ids[r, sl] = unit.input_ids[piece.lo:piece.hi]
            pos[r, sl] = unit.position_ids[piece.lo:piece.hi]
            if mrope is not None:
                mrope[:, r, sl] = unit.mrope[:, piece.lo:piece.hi]
            for lo, unit_refs in unit.images:  # each prompt copy inside this piece, in token order
                if piece.lo <= lo < piece.hi:
                    refs += unit_refs
                    image_tokens += unit.image_tokens
            seg[r, sl] = unit.segment_ids[piece.lo:piece.hi]
            local = unit.doc_ids[piece.lo:piece.hi]
            doc[r, sl] = local - local.min() + next_doc
            next_doc = int(doc[r, col + n - 1]) + 1
            offset = r * length + col - piece.lo  # flat index of unit offset 0
            for k in range(unit.num_responses):
                start, size = int(unit.resp_start[k]), int(unit.resp_len[k])
                if not piece.lo <= start < piece.hi:
                    continue
                g = base[piece.unit] + k
                preds.append(offset + np.concatenate(([unit.resp_pred_first[k]], np.arange(start, start + size - 1))))
                targets.append(unit.input_ids[start:start + size])
                owners.append(np.full(size, g, dtype=np.int64))
                last[g] = offset + start + size - 1
            col += n
        doc[r, col:] = next_doc  # padding: its own document, causal inside, never fully masked
        visible += 0 if mask_documents else col * (col + 1) // 2  # causal over the whole row
        if not mask_documents:
            doc[r, :col], seg[r, :col] = 0, 0
            if not restart_positions:
                pos[r, :col] = np.arange(col)
    cat = lambda xs: torch.from_numpy(np.concatenate(xs)) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    resp_unit = [units[u].uid for u in members for _ in range(units[u].num_responses)]
    resp_k = [k for u in members for k in range(units[u].num_responses)]
    pairs = [units[u].pairs + base[u] for u in members]
    pair_unit = [units[u].uid for u in members for _ in range(len(units[u].pairs))]
    pair_k = [k for u in members for k in range(len(units[u].pairs))]
    pair_label = [float(x) for u in members for x in units[u].pair_labels]
    if refs and images is None:
        raise ValueError("the micro-batch has images and no image processor was given")
    return PackedBatch(
        input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos if mrope is None else mrope),
        doc_ids=torch.from_numpy(doc), segment_ids=torch.from_numpy(seg),
        pred_index=cat(preds), target_ids=cat(targets), target_response=cat(owners),
        last_index=torch.from_numpy(last),
        response_unit=torch.tensor(resp_unit, dtype=torch.long), response_k=torch.tensor(resp_k, dtype=torch.long),
        pairs=torch.from_numpy(np.concatenate(pairs)) if pairs else torch.zeros((0, 2), dtype=torch.long),
        pair_unit=torch.tensor(pair_unit, dtype=torch.long), pair_k=torch.tensor(pair_k, dtype=torch.long),
        pair_label=torch.tensor(pair_label, dtype=torch.float64),
        real_tokens=mb.real_tokens if mb is not None else 0,
        example_ids=[units[u].uid for u in members], visible_pairs=visible,
        image_inputs=images(refs) if refs else {}, images=len(refs), image_tokens=image_tokens,
    )
