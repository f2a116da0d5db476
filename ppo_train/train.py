"""train(cfg): the one readable loop, from a composed config to a saved model."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ppo_train import checkpoint
from ppo_train.data.collate import collate
from ppo_train.data.packing import group_steps, plan_epoch
from ppo_train.data.pipeline import prepare
from ppo_train.engine import Engine, dtype_of, init_distributed
from ppo_train.errors import WRITE_ERRORS, NonFiniteLoss
from ppo_train.lora import apply_lora, export_lora
from ppo_train.losses import LOSSES, NEEDS_REFERENCE, REWARD_MODEL
from ppo_train.masks import build_mask, resolve_backend
from ppo_train.metrics import MetricsWriter, StepMetrics, summary_table
from ppo_train.model import PolicyModule, RewardModule, batch_logps, load_causal_lm, load_tokenizer
from ppo_train.reference import LiveReference, ReferenceTable, compute_reference, fingerprint
from ppo_train.signals import StopRequest


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
    is_reward = cfg.loss.name in REWARD_MODEL
    if is_reward and tokenizer.pad_token_id == tokenizer.eos_token_id:
        # the exported classifier pools at the last non-pad token, which must not be EOS
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.bos_token
    data = prepare(cfg, tokenizer)
    if dist.is_main:  # written before training, so a run that stops early still has it
        (run_dir / "data_report.json").write_text(
            json.dumps({**data.report(), "skipped_rows": data.skipped_rows()}, indent=2))
    units, pad_id = data.units, tokenizer.pad_token_id
    per_step = dist.world_size * t.grad_accum
    plans = {0: plan_epoch(units, cfg.packing, t.micro_batch_size, t.seed, 0)}
    steps_per_epoch = math.ceil(len(plans[0]) / per_step)
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch

    # model, engine, reference scores (before the first update; DPO only)
    backend = resolve_backend(cfg.model.attention, dist.device)
    model = load_causal_lm(cfg.model, len(tokenizer), dtype_of(t.precision), backend, t.seed,
                           reward=is_reward, pad_token_id=pad_id, longest_sequence=data.longest_sequence)
    if cfg.model.lora.enabled:
        peft_model, model = apply_lora(model, cfg.model.lora, reward=is_reward)
        if dist.is_main:
            peft_model.print_trainable_parameters()
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    module = RewardModule(model) if is_reward else PolicyModule(model, cfg.model.logits_chunk)
    engine = Engine(module, t, total_steps, dist)
    loss_fn = LOSSES[cfg.loss.name]
    reference = eval_reference = None
    if NEEDS_REFERENCE[cfg.loss.name] and cfg.reference.live:
        reference = eval_reference = _live_reference(cfg, tokenizer, backend, dist)
    elif NEEDS_REFERENCE[cfg.loss.name]:
        reference = _reference(cfg, engine, units, plans[0], backend, pad_id, dist, run_dir, tokenizer, "train")
        if data.eval_units:
            eval_plan = plan_epoch(data.eval_units, cfg.packing, t.micro_batch_size, t.seed, 0)
            eval_reference = _reference(cfg, engine, data.eval_units, eval_plan, backend, pad_id, dist, run_dir,
                                        tokenizer, "eval")

    resume_from = checkpoint.find_resume(run_dir, t.resume)
    step = 0
    if resume_from is not None:
        step = checkpoint.load(engine, resume_from)["step"]
        if dist.is_main:
            print(f"pptrain: resumed from {resume_from} at step {step}", file=sys.stderr)
    writer = MetricsWriter(run_dir, total_steps, dist.is_main, cfg.logging.progress,
                           _wandb_run(cfg, run_dir) if dist.is_main else None, resume_step=step if resume_from else None)
    stop = StopRequest()
    engine.train()
    start, skipped = time.perf_counter(), 0
    while step < total_steps:
        epoch = step // steps_per_epoch
        if epoch not in plans:
            plans = {epoch: plan_epoch(units, cfg.packing, t.micro_batch_size, t.seed, epoch)}
        for group in group_steps(plans[epoch], per_step)[step % steps_per_epoch:]:
            if step >= total_steps:
                break
            # the global pair count of this step (all micro-batches, all ranks), before any backward
            step_pairs = sum(len(units[u].pairs) for mb in group if mb is not None for u in mb.units)
            tracker = StepMetrics()
            for mb in group[dist.rank::dist.world_size]:
                batch = collate(units, mb, pad_id, cfg.packing.pad_multiple, **collate_options(cfg)).to(dist.device)
                mask = build_mask(batch.doc_ids, batch.segment_ids, backend)  # once per batch
                policy = batch_logps(engine, batch, mask)
                ref = reference.scores(batch, mask) if reference is not None else None
                per_pair, metrics = loss_fn(policy, ref, batch.pairs, cfg.loss)
                if not _finite_everywhere(per_pair, dist):
                    if t.on_nonfinite == "error":
                        ids = sorted(data.examples[u].index for m in group if m for u in m.units)
                        raise NonFiniteLoss(
                            f"non-finite loss at step {step + 1} (source rows {ids}); the last checkpoint is "
                            "intact; trainer.on_nonfinite=skip drops such micro-batches instead")
                    # every rank skips together (the flag is all-reduced); an empty batch's zero
                    # loss keeps DeepSpeed's backward/step sequence intact without the bad values
                    skipped += 1
                    empty = collate(units, None, pad_id, cfg.packing.pad_multiple).to(dist.device)
                    empty_scores = batch_logps(engine, empty, build_mask(empty.doc_ids, empty.segment_ids, backend))
                    engine.backward(empty_scores.sums.sum() * 0.0)
                else:
                    engine.backward(per_pair.sum() / max(step_pairs, 1))
                    tracker.add_pairs(per_pair, metrics)
                engine.step()
                tracker.add_batch(batch)
            step += 1
            row = tracker.reduce(dist.world_size, dist.device)
            row.update(step=step, epoch=epoch, lr=engine.lr(), skipped_nonfinite=skipped)
            if not writer.history:  # the data counts once, on the first row of metrics.jsonl (kept on resume)
                row.update({f"data/{k}": v for k, v in data.report().items()})
            if step % t.log_every == 0 or step == total_steps:
                writer.write(row)
            if data.eval_units and ((t.eval_every and step % t.eval_every == 0) or step == total_steps):
                writer.write(evaluate(engine, data.eval_units, eval_reference, cfg, backend, pad_id, dist) | {"step": step})
            stopping = stop.any_rank(dist.world_size, dist.device)
            if stopping or (t.save_every and step % t.save_every == 0 and step < total_steps):
                checkpoint.save(engine, run_dir, step, epoch, {"total_steps": total_steps}, t.keep_last)
            if stopping:
                break
        if stop.requested or step >= total_steps:
            break
    stop.restore()
    writer.close()

    if stop.requested and step < total_steps:
        writer.close()
        if dist.is_main:
            print(f"pptrain: stopped by a signal at step {step}; checkpoint saved, resume with trainer.resume=auto",
                  file=sys.stderr)
        return writer.history
    if t.save_model:
        writer_fn = None
        if cfg.model.lora.enabled:
            def writer_fn(state, out_dir):
                fresh = load_causal_lm(cfg.model, len(tokenizer), dtype_of(t.precision), "sdpa", t.seed,
                                       reward=is_reward, pad_token_id=pad_id)
                export_lora(state, fresh, cfg.model.lora, out_dir, tokenizer, reward=is_reward)
        engine.export(run_dir / "model", tokenizer, writer_fn)
    if dist.is_main:
        facts = {"run directory": run_dir, "steps": step, "wall seconds": f"{time.perf_counter() - start:.1f}",
                 **{k: v for k, v in data.report().items() if v}}
        from rich.console import Console

        Console(stderr=True).print(summary_table(writer.history, facts))
    return writer.history


def collate_options(cfg: DictConfig) -> dict:
    """layout=unmasked: one causal document per row (no document or response mask)."""
    return {"mask_documents": cfg.layout.name != "unmasked", "restart_positions": cfg.layout.restart_positions}


def _finite_everywhere(values: torch.Tensor, dist) -> bool:
    ok = torch.tensor([1.0 if bool(torch.isfinite(values.detach()).all()) else 0.0], device=dist.device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item() > 0)


@torch.no_grad()
def evaluate(engine, units, reference, cfg, backend, pad_id, dist) -> dict:
    """Loss and metrics over the whole evaluation split, averaged over its pairs ("eval/..." keys)."""
    engine.train(False)
    tracker = StepMetrics()
    plan = plan_epoch(units, cfg.packing, cfg.trainer.micro_batch_size, cfg.trainer.seed, 0)
    for group in group_steps(plan, dist.world_size):
        batch = collate(units, group[dist.rank], pad_id, cfg.packing.pad_multiple,
                        **collate_options(cfg)).to(dist.device)
        mask = build_mask(batch.doc_ids, batch.segment_ids, backend)
        scores = batch_logps(engine, batch, mask)
        ref = reference.scores(batch, mask) if reference is not None else None
        per_pair, metrics = LOSSES[cfg.loss.name](scores, ref, batch.pairs, cfg.loss)
        tracker.add_pairs(per_pair, metrics)
        tracker.add_batch(batch)
    engine.train(True)
    row = tracker.reduce(dist.world_size, dist.device)
    keep = [k for k in row if k in ("loss", "nll", "log_odds_ratio", "pairs") or "/" in k]
    return {f"eval/{k}": row[k] for k in keep}


def _reference_module(cfg, tokenizer, backend) -> PolicyModule:
    """A fresh copy of the initial policy (same seed, same weights) or of reference.name_or_path."""
    ref_model = load_causal_lm(cfg.model, len(tokenizer), dtype_of(cfg.trainer.precision), backend,
                               cfg.trainer.seed, cfg.reference.name_or_path, cfg.reference.gguf_file)
    return PolicyModule(ref_model, cfg.model.logits_chunk)


def _live_reference(cfg, tokenizer, backend, dist) -> LiveReference:
    return LiveReference(_reference_module(cfg, tokenizer, backend), cfg.trainer, dist)


def _reference(cfg, engine, units, plan, backend, pad_id, dist, run_dir, tokenizer, split) -> ReferenceTable:
    """The reference table, computed once before training (or found in the run directory)."""
    identity = {"reference": OmegaConf.to_container(cfg.reference, resolve=True),
                "model": OmegaConf.to_container(cfg.model, resolve=True), "seed": cfg.trainer.seed,
                "precision": cfg.trainer.precision, "layout": cfg.layout.name, "split": split}
    fp = fingerprint(units, identity)
    table = ReferenceTable.load(run_dir, fp, split) if cfg.reference.cache else None
    if table is not None:
        return table
    if cfg.reference.name_or_path is None:
        module = engine.engine  # the initial policy, before any update
    else:
        module = _reference_module(cfg, tokenizer, backend).to(dist.device)
    table = compute_reference(module, units, plan, backend, pad_id, dist.device, dist.rank, dist.world_size, fp)
    if cfg.reference.cache and dist.is_main:
        try:
            table.save(run_dir, split)
        except WRITE_ERRORS as err:  # only a cache: training goes on with the table in memory
            print(f"pptrain: warning: could not write the reference cache to {run_dir} ({err}); "
                  "training goes on, a resumed run recomputes it", file=sys.stderr)
    return table
