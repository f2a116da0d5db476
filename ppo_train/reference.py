"""Reference log-probs, for the losses that compare the policy against a reference (DPO).

- The cached table (default): one no-grad pass of the reference over every unit before
  training, with the same layout and mask as training, gathered on every rank, kept in
  memory and written to the run directory; a rerun reuses it when its fingerprint (model
  identity, data tokens, layout, seed, precision) matches. Indexed by (unit uid, response k),
  so any later packing or shuffling of the same units finds its values.
- `reference.live=true`: a frozen copy of the reference runs beside the policy on every
  batch, with the batch's mask (for when the table would not fit); sharded under ZeRO-3.

The reference is the initial policy (`reference.name_or_path=null`; the table is computed
before the first update) or a separate checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.profiler import record_function

from ppo_train import fileio
from ppo_train.data.layout import Units
from ppo_train.data.schedule import Schedule
from ppo_train.dist import DistInfo, all_ranks, reduce
from ppo_train.errors import WRITE_ERRORS
from ppo_train.logps import ResponseLogps
from ppo_train.losses.dpo import wants_shared_sums
from ppo_train.scoring import Scored, Scorer, forward_scores


def _file(split: str) -> str:
    return "reference_logps.safetensors" if split == "train" else f"reference_logps_{split}.safetensors"


class ReferenceTable:
    """Per (unit, response): the reference's log-prob sum and token count. With loss.ld_alpha also
    per (unit, pair): both members' sums over the pair's shared length (`shared`, (U, Pmax, 2)),
    since a response's LD-DPO log-prob depends on its partner (two numbers per pair instead of a
    per-token table)."""

    def __init__(self, sums: torch.Tensor, counts: torch.Tensor, fingerprint: str,
                 shared: torch.Tensor | None = None):
        self.sums, self.counts, self.fingerprint = sums, counts, fingerprint  # (U, Kmax) float64, CPU
        self.shared = shared

    def scores(self, scored: Scored) -> ResponseLogps:
        """The batch's reference values, looked up by (unit, response) and (unit, pair)."""
        batch = scored.batch
        u, k = batch.response_unit.cpu(), batch.response_k.cpu()
        device = batch.input_ids.device
        shared = None
        if self.shared is not None:
            shared = self.shared[batch.pair_unit.cpu(), batch.pair_k.cpu()].to(device)
        return ResponseLogps(self.sums[u, k].to(device), self.counts[u, k].to(device), shared)

    def save(self, run_dir: Path, split: str = "train") -> None:
        tensors = {"sums": self.sums, "counts": self.counts}
        if self.shared is not None:
            tensors["shared"] = self.shared
        with fileio.staged(run_dir / _file(split)) as tmp:
            save_file(tensors, str(tmp), metadata={"fingerprint": self.fingerprint})

    @classmethod
    def load(cls, run_dir: Path, fingerprint: str, split: str = "train") -> "ReferenceTable | None":
        """The cached table if it matches `fingerprint`; None when there is none, it is another
        model's or data's, or it cannot be read (truncated, not safetensors: it is only a cache,
        so it is recomputed, with a warning)."""
        path = run_dir / _file(split)
        if not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") != fingerprint:
                    return None
            tensors = load_file(str(path))
            table = cls(tensors["sums"], tensors["counts"], fingerprint, tensors.get("shared"))
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            print(f"pptrain: warning: the reference cache {path} cannot be read ({type(err).__name__}: {err}); "
                  "computing it again", file=sys.stderr)
            return None
        if table.sums.dim() != 2 or table.sums.shape != table.counts.shape:
            print(f"pptrain: warning: the reference cache {path} has the wrong shape; computing it again",
                  file=sys.stderr)
            return None
        return table


class LiveReference:
    """A frozen reference model run beside the policy on every batch, with the same mask."""

    def __init__(self, module: torch.nn.Module, trainer_cfg, dist: DistInfo):
        import deepspeed

        from ppo_train.engine import reference_config

        config = reference_config(trainer_cfg, dist.world_size)
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
        self.engine, *_ = deepspeed.initialize(model=module, config=config, dist_init_required=False)

    @torch.no_grad()
    def scores(self, scored: Scored) -> ResponseLogps:
        return forward_scores(self.engine, scored.batch, scored.mask)


def fingerprint(units: Units, identity: dict) -> str:
    """Hash of the reference model's identity and every token (and image) of every unit, in
    order (the tokenized store's digest and the selected examples: Units.digest)."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    h.update(units.digest().encode())
    return h.hexdigest()


@torch.no_grad()
def compute_table(module, scorer: Scorer, schedule: Schedule, dist: DistInfo, fp: str) -> ReferenceTable:
    """Forward every micro-batch of one epoch once (this rank's share; every rank makes the same
    number of forwards, as ZeRO-3 needs), and sum the table over ranks."""
    units = scorer.units
    kmax = int(units.num_responses.max(initial=1))
    sums = torch.zeros(len(units), kmax, dtype=torch.float64)
    counts = torch.zeros(len(units), kmax, dtype=torch.float64)
    shared = None
    if getattr(getattr(module, "module", module), "shared_sums", False):
        shared = torch.zeros(len(units), int(units.num_pairs.max(initial=1)), 2, dtype=torch.float64)
    was_training = module.training
    module.eval()
    for step in schedule.steps():
        for mb in step.micro_batches:
            scored = scorer(module, mb)
            u, k = scored.batch.response_unit.cpu(), scored.batch.response_k.cpu()
            sums[u, k] = scored.scores.sums.double().cpu()
            counts[u, k] = scored.scores.counts.double().cpu()
            if shared is not None:
                shared[scored.batch.pair_unit.cpu(), scored.batch.pair_k.cpu()] = scored.scores.shared.double().cpu()
    module.train(was_training)
    return ReferenceTable(reduce(sums, dist), reduce(counts, dist), fp,
                          None if shared is None else reduce(shared, dist))


def reference_module(cfg, tokenizer, dist: DistInfo, longest_sequence: int = 0):
    """A fresh, frozen copy of the initial policy (same seed, same weights) or of
    reference.name_or_path, wrapped for scoring."""
    from ppo_train.engine import zero3_config
    from ppo_train.masks import resolve_backend
    from ppo_train.model import load_causal_lm
    from ppo_train.precision import Numerics
    from ppo_train.scoring import PolicyModule

    numerics = Numerics.of(cfg.trainer, dist.world_size)  # the policy's: the same numbers at step 0
    model = load_causal_lm(cfg.model, len(tokenizer), numerics.param_dtype,
                           resolve_backend(cfg.model.attention, dist.device), cfg.trainer.seed,
                           cfg.reference.name_or_path, cfg.reference.gguf_file, longest_sequence=longest_sequence,
                           zero3=zero3_config(cfg.trainer, dist.world_size))
    return PolicyModule(model, cfg.model.logits_chunk, dist, autocast=numerics.autocast,
                        shared_sums=wants_shared_sums(cfg.loss))


def _table(cfg, reference_model, scorer: Scorer, dist: DistInfo, run_dir: Path, split: str,
           weights: dict) -> ReferenceTable:
    """The table of one split, computed once before training (or found in the run directory).
    `reference_model()` gives the module to score with; it is called only when the cache misses."""
    identity = {"reference": OmegaConf.to_container(cfg.reference, resolve=True),
                "model": OmegaConf.to_container(cfg.model, resolve=True), "seed": cfg.trainer.seed,
                "precision": cfg.trainer.precision, "layout": cfg.layout.name, "split": split, "weights": weights}
    if wants_shared_sums(cfg.loss):  # the table also holds per-pair shared-length sums
        identity["shared_sums"] = True
    fp = fingerprint(scorer.units, identity)
    table = ReferenceTable.load(run_dir, fp, split) if cfg.reference.cache else None
    # one decision for all ranks: a rank that misses (a run directory that is not shared, a
    # failed read) would run forwards that the others skip, and ZeRO-3's gathers would hang
    if all_ranks(table is not None, dist):
        return table
    plan = Schedule(scorer.units, cfg.packing, cfg.trainer.micro_batch_size, cfg.trainer.seed, dist.world_size,
                    dist.rank)
    table = compute_table(reference_model(), scorer, plan, dist, fp)
    if cfg.reference.cache and dist.is_main:
        try:
            table.save(run_dir, split)
        except WRITE_ERRORS as err:  # only a cache: training goes on with the table in memory
            print(f"pptrain: warning: could not write the reference cache to {run_dir} ({err}); "
                  "training goes on, a resumed run recomputes it", file=sys.stderr)
    return table


@record_function("pptrain.reference")
def build_references(cfg, engine, scorer: Scorer, data, dist: DistInfo, run_dir: Path, tokenizer):
    """(training reference, evaluation reference), each None for a reference-free loss."""
    from ppo_train.losses import LOSSES
    from ppo_train.model import weights_identity

    if not LOSSES[cfg.loss.name].needs_reference:
        return None, None
    if cfg.reference.live:
        live = LiveReference(reference_module(cfg, tokenizer, dist, data.longest_sequence), cfg.trainer, dist)
        return live, live
    loaded = []

    def reference_model():
        """The initial policy before any update, or reference.name_or_path in a DeepSpeed
        inference engine (partitioned under ZeRO-3), loaded once for both splits."""
        if cfg.reference.name_or_path is None:
            return engine.engine
        if not loaded:
            loaded.append(LiveReference(reference_module(cfg, tokenizer, dist, data.longest_sequence), cfg.trainer,
                                        dist).engine)
        return loaded[0]

    # what the weights are, not only where: the files of a local folder, the hub commit
    separate = cfg.reference.name_or_path is not None
    weights = weights_identity(cfg.reference.name_or_path if separate else cfg.model.name_or_path,
                               None if separate else cfg.model.revision)
    train = _table(cfg, reference_model, scorer, dist, run_dir, "train", weights)
    evaluation = _table(cfg, reference_model, scorer.with_units(data.eval_units), dist, run_dir, "eval",
                        weights) if data.eval_units else None
    return train, evaluation
