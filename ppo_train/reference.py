"""Reference log-probs: computed once before training, with the same layout and mask as
training, kept in memory and written to the run directory (reused when it matches).

The table is indexed by (unit uid, response k), so any later packing or shuffling of the
same units finds its values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ppo_train.data.collate import PackedBatch, collate
from ppo_train.data.layout import Unit
from ppo_train.data.packing import MicroBatch, group_steps
from ppo_train.errors import WRITE_ERRORS
from ppo_train.logps import ResponseLogps
from ppo_train.masks import build_mask
from ppo_train.model import batch_logps

def _file(split: str) -> str:
    return "reference_logps.safetensors" if split == "train" else f"reference_logps_{split}.safetensors"


class ReferenceTable:
    def __init__(self, sums: torch.Tensor, counts: torch.Tensor, fingerprint: str):
        self.sums, self.counts, self.fingerprint = sums, counts, fingerprint  # (U, Kmax)

    def scores(self, batch: PackedBatch, mask=None) -> ResponseLogps:
        """The batch's reference values, looked up by (unit, response); `mask` is unused (it
        matches LiveReference.scores)."""
        u, k = batch.response_unit.cpu(), batch.response_k.cpu()
        device = batch.input_ids.device
        return ResponseLogps(self.sums[u, k].to(device), self.counts[u, k].to(device))

    def save(self, run_dir: Path, split: str = "train") -> None:
        tmp = run_dir / (_file(split) + ".tmp")
        try:
            save_file({"sums": self.sums, "counts": self.counts}, str(tmp), metadata={"fingerprint": self.fingerprint})
            tmp.rename(run_dir / _file(split))
        except WRITE_ERRORS:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, run_dir: Path, fingerprint: str, split: str = "train") -> "ReferenceTable | None":
        path = run_dir / _file(split)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
        tensors = load_file(str(path))
        return cls(tensors["sums"], tensors["counts"], fingerprint)


def fingerprint(units: list[Unit], identity: dict) -> str:
    """Hash of the reference model's identity and every token of every unit."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for u in units:
        h.update(u.input_ids.tobytes())
        h.update(u.resp_len.tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_reference(module, units: list[Unit], plan: list[MicroBatch], backend: str, pad_id: int,
                      device: torch.device, rank: int, world_size: int, fp: str) -> ReferenceTable:
    """Forward every micro-batch of `plan` once (this rank's share), gather the table on all ranks."""
    kmax = max(u.num_responses for u in units)
    sums = torch.zeros(len(units), kmax, dtype=torch.float64)
    counts = torch.zeros(len(units), kmax, dtype=torch.float64)
    was_training = module.training
    module.eval()
    for group in group_steps(plan, world_size):  # equal forward counts on every rank (ZeRO-3)
        batch = collate(units, group[rank], pad_id).to(device)
        mask = build_mask(batch.doc_ids, batch.segment_ids, backend)
        out = batch_logps(module, batch, mask)
        u, k = batch.response_unit.cpu(), batch.response_k.cpu()
        sums[u, k] = out.sums.double().cpu()
        counts[u, k] = out.counts.double().cpu()
    module.train(was_training)
    if world_size > 1:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(counts)
    return ReferenceTable(sums, counts, fp)


class LiveReference:
    """A frozen reference model run beside the policy on every batch, with the same mask
    (for when the cache would not fit). Under ZeRO-3 it is sharded like the policy."""

    def __init__(self, module: torch.nn.Module, trainer_cfg, dist):
        import deepspeed

        from ppo_train.engine import deepspeed_config

        config = deepspeed_config(trainer_cfg, dist.world_size)
        config.pop("optimizer", None)
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
        self.engine, *_ = deepspeed.initialize(model=module, config=config, dist_init_required=False)

    @torch.no_grad()
    def scores(self, batch: PackedBatch, mask) -> ResponseLogps:
        return batch_logps(self.engine, batch, mask)
