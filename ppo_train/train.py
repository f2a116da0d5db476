"""train(cfg): the one readable loop, from a composed config to a saved model."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ppo_train.data.collate import collate
from ppo_train.data.packing import group_steps, plan_epoch
from ppo_train.data.pipeline import prepare
from ppo_train.engine import Engine, dtype_of, init_distributed
from ppo_train.losses import LOSSES, NEEDS_REFERENCE
from ppo_train.masks import build_mask, resolve_backend
from ppo_train.metrics import MetricsWriter, StepMetrics, summary_table
from ppo_train.model import PolicyModule, batch_logps, load_causal_lm, load_tokenizer
from ppo_train.reference import ReferenceTable, compute_reference, fingerprint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _wandb_run(cfg: DictConfig, run_dir: Path):
    if cfg.logging.wandb == "disabled":
        return None
    import wandb

    return wandb.init(project=cfg.logging.wandb_project, mode=cfg.logging.wandb, dir=str(run_dir),
                      name=run_dir.name, config=OmegaConf.to_container(cfg, resolve=True))


def train(cfg: DictConfig, run_dir: str | Path) -> list[dict]:
    """Train as configured; returns the metrics rows (rank 0) and writes the run directory."""
    run_dir = Path(run_dir)
    t = cfg.trainer
    dist = init_distributed(t.device)
    seed_everything(t.seed)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # data: rows -> units, and the epoch plans (deterministic, identical on every rank)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg, tokenizer)
    units, pad_id = data.units, tokenizer.pad_token_id
    per_step = dist.world_size * t.grad_accum
    plans = {0: plan_epoch(units, cfg.packing, t.micro_batch_size, t.seed, 0)}
    steps_per_epoch = math.ceil(len(plans[0]) / per_step)
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch

    # model, engine, reference log-probs (before the first update)
    backend = resolve_backend(cfg.model.attention, dist.device)
    dtype = dtype_of(t.precision)
    model = load_causal_lm(cfg.model, len(tokenizer), dtype, backend, t.seed)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    engine = Engine(PolicyModule(model, cfg.model.logits_chunk), t, total_steps, dist)
    loss_fn = LOSSES[cfg.loss.name]
    reference = None
    if NEEDS_REFERENCE[cfg.loss.name]:
        reference = _reference(cfg, engine, units, plans[0], backend, pad_id, dist, run_dir, tokenizer)

    writer = MetricsWriter(run_dir, total_steps, dist.is_main, cfg.logging.progress, _wandb_run(cfg, run_dir)
                           if dist.is_main else None)
    engine.train()
    step, start = 0, time.perf_counter()
    while step < total_steps:
        epoch = step // steps_per_epoch
        if epoch not in plans:
            plans = {epoch: plan_epoch(units, cfg.packing, t.micro_batch_size, t.seed, epoch)}
        for group in group_steps(plans[epoch], per_step)[step % steps_per_epoch:]:
            if step >= total_steps:
                break
            # the global pair count of this step, known before any backward
            step_pairs = sum(len(units[u].pairs) for mb in group if mb is not None for u in mb.units)
            tracker = StepMetrics()
            for mb in group[dist.rank::dist.world_size]:
                batch = collate(units, mb, pad_id, cfg.packing.pad_multiple).to(dist.device)
                mask = build_mask(batch.doc_ids, batch.segment_ids, backend)  # built once per batch
                policy = batch_logps(engine, batch, mask)
                ref = reference.lookup(batch) if reference is not None else None
                per_pair, metrics = loss_fn(policy, ref, batch.pairs, cfg.loss)
                engine.backward(per_pair.sum() / max(step_pairs, 1))
                engine.step()
                tracker.add_pairs(per_pair, metrics)
                tracker.add_batch(batch)
            step += 1
            row = tracker.reduce(dist.world_size, dist.device)
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"non-finite loss {row['loss']} at step {step}")
            row.update(step=step, epoch=epoch, lr=engine.lr())
            if step % t.log_every == 0 or step == total_steps:
                writer.write(row)
    writer.close()

    if t.save_model:
        engine.export(run_dir / "model", tokenizer)
    if dist.is_main:
        facts = {"run directory": run_dir, "steps": step, "wall seconds": f"{time.perf_counter() - start:.1f}",
                 **{k: v for k, v in data.report().items() if v}}
        (run_dir / "data_report.json").write_text(json.dumps(data.report(), indent=2))
        from rich.console import Console

        Console(stderr=True).print(summary_table(writer.history, facts))
    return writer.history


def _reference(cfg, engine, units, plan, backend, pad_id, dist, run_dir, tokenizer) -> ReferenceTable:
    identity = {"reference": OmegaConf.to_container(cfg.reference, resolve=True),
                "model": OmegaConf.to_container(cfg.model, resolve=True), "seed": cfg.trainer.seed,
                "precision": cfg.trainer.precision, "layout": cfg.layout.name}
    fp = fingerprint(units, identity)
    table = ReferenceTable.load(run_dir, fp) if cfg.reference.cache else None
    if table is not None:
        return table
    if cfg.reference.name_or_path is None:
        module = engine.engine  # the initial policy, before any update
    else:
        ref_model = load_causal_lm(cfg.model, len(tokenizer), dtype_of(cfg.trainer.precision), backend,
                                   cfg.trainer.seed, cfg.reference.name_or_path, cfg.reference.gguf_file)
        module = PolicyModule(ref_model, cfg.model.logits_chunk).to(dist.device)
    table = compute_reference(module, units, plan, backend, pad_id, dist.device, dist.rank, dist.world_size, fp)
    if cfg.reference.cache and dist.is_main:
        table.save(run_dir)
    return table
