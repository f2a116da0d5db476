"""One mask function over document/segment ids, rendered two ways.

    attend(q, kv) = kv <= q  and  doc[q] == doc[kv]  and  (seg[kv] == 0 or seg[kv] == seg[q])

(the prefix-sharing paper's Algorithm 3, generalized from 2 to K responses). `seg` is 0
for the prompt and i for response i, so a response sees the prompt and itself only.

- `block_mask`: a FlexAttention `BlockMask` (GPU; flex attention skips empty blocks);
- `dense_mask`: a boolean (B, 1, L, L) mask, True = attend, for SDPA (the CPU path:
  FlexAttention has no backward on the CPU).
Both come from `mask_mod`; tests compare them token by token.

`doc_spans` gives the runs of one document in each row: no token attends across them, so SDPA
can run on each run's diagonal block of the dense mask alone (model.segmented_sdpa_forward),
computing sum(len^2) instead of L^2 per row, as the flex path's block skipping does on the GPU.
"""

from __future__ import annotations

import numpy as np
import torch


def mask_mod_for(doc_ids: torch.Tensor, segment_ids: torch.Tensor):
    """The FlexAttention mask_mod for (B, L) document and segment ids."""

    def mask_mod(b, h, q, kv):
        same_doc = doc_ids[b, q] == doc_ids[b, kv]
        visible = (segment_ids[b, kv] == 0) | (segment_ids[b, kv] == segment_ids[b, q])
        return (kv <= q) & same_doc & visible

    return mask_mod


def dense_mask(doc_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B, 1, L, L) bool, the same predicate as `mask_mod_for`, vectorized."""
    length = doc_ids.shape[1]
    idx = torch.arange(length, device=doc_ids.device)
    causal = idx[None, :] <= idx[:, None]  # [q, kv]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    seg_q, seg_kv = segment_ids[:, :, None], segment_ids[:, None, :]
    visible = (seg_kv == 0) | (seg_kv == seg_q)
    return (causal[None] & same_doc & visible)[:, None]


def doc_spans(doc_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """(B, L) document ids -> each row's [start, end) runs of equal ids, in order (padding is a
    run of its own). None when an id comes back after another id in a row: the mask would join
    such runs, so they could not be attended to separately (pptrain's collate never does that)."""
    rows = []
    for row in doc_ids.cpu().numpy():
        cuts = [0, *(np.flatnonzero(row[1:] != row[:-1]) + 1).tolist(), len(row)]
        spans = list(zip(cuts[:-1], cuts[1:]))
        if len({int(row[s]) for s, _ in spans}) != len(spans):
            return None
        rows.append(spans)
    return rows


def block_mask(doc_ids: torch.Tensor, segment_ids: torch.Tensor, block_size: int = 128):
    """(B, L) ids -> FlexAttention BlockMask on the ids' device (L a multiple of block_size)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, length = doc_ids.shape
    return create_block_mask(mask_mod_for(doc_ids, segment_ids), b, None, length, length,
                             device=doc_ids.device, BLOCK_SIZE=block_size)


def build_mask(doc_ids: torch.Tensor, segment_ids: torch.Tensor, backend: str):
    """The attention mask of one batch for the chosen backend ('flex' or 'sdpa')."""
    if backend == "flex":
        return block_mask(doc_ids, segment_ids)
    if backend == "sdpa":
        return dense_mask(doc_ids, segment_ids)
    raise ValueError(f"model.attention={backend!r}: expected flex or sdpa")


def resolve_backend(setting: str, device: torch.device) -> str:
    if setting == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return str(setting)
