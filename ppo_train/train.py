"""train(cfg): the one readable loop, from a composed config to a saved model."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ppo_train import checkpoint, fileio, hostmem, precision
from ppo_train.data.pipeline import PreparedData
from ppo_train.inputs import prepare
from ppo_train.data.schedule import Schedule, Step
from ppo_train.dist import DistInfo, all_ranks, init_distributed, reduce
from ppo_train.engine import Engine
from ppo_train.errors import ConfigError, NonFiniteLoss
from ppo_train.losses import LOSSES
from ppo_train.losses.common import StepTotals
from ppo_train.metrics import MetricsWriter, StepMetrics, rows_up_to, summary_table
from ppo_train.flops import Utilization
from ppo_train.model import build_policy, image_inputs, load_tokenizer, lora_writer
from ppo_train.precision import Numerics
from ppo_train.reference import build_references
from ppo_train.scoring import Scorer
from ppo_train.selfcheck import self_check
from ppo_train.signals import SaveClock, StopRequest


def train(cfg: DictConfig, run_dir: str | Path) -> list[dict]:
    """Train as configured; returns the metrics rows (rank 0) and writes the run directory."""
    run_dir, t, loss = Path(run_dir), cfg.trainer, LOSSES[cfg.loss.name]
    dist = init_distributed(t.device)
    t.precision = precision.resolve(t.precision, dist.device, lambda ok: all_ranks(ok, dist))  # auto -> bf16 | fp32
    seed_everything(t.seed)
    resuming = checkpoint.will_resume(run_dir, t.resume)  # every rank: a refusal stops them all

    # data: rows -> units -> the step plan (deterministic, identical on every rank)
    tokenizer = load_tokenizer(cfg.model, reward=loss.reward_head)
    data = prepare(cfg, tokenizer, dist)  # also resolves an auto ffd budget in cfg.packing
    if data.vision is not None:
        _vision_zero_stage(t, dist)
    plan = checkpoint.plan_identity(cfg, data.units, dist)  # what a resume must not change
    checkpoint.check_plan(run_dir, t.resume, plan)
    schedule = Schedule.from_config(cfg, data.units, dist)
    finished = checkpoint.check_finished(run_dir, t.resume, schedule.total_steps, t.save_model, plan)
    if finished is not None:  # the same command over a finished run: nothing to do, nothing rewritten
        if dist.is_main:
            print(f"pptrain: {run_dir} finished at step {finished}; a larger trainer.max_steps with "
                  "trainer.resume=auto extends it; delete the directory to start over", file=sys.stderr)
        metrics = run_dir / "metrics.jsonl"
        return rows_up_to(metrics, finished) if dist.is_main and metrics.exists() else []
    if dist.is_main:  # before training, so a run that stops early has them; a resumed run keeps its config.yaml
        fileio.write_text(run_dir / ("config.resumed.yaml" if resuming else "config.yaml"),
                          OmegaConf.to_yaml(cfg, resolve=True))
        fileio.write_text(run_dir / "data_report.json",
                          json.dumps({**data.report(), "skipped_rows": data.skipped_rows()}, indent=2))

    # model, engine, reference scores (before the first update)
    policy = build_policy(cfg, tokenizer, dist, data.longest_sequence)
    if data.vision is not None:
        _vision_stage_fits(t, dist, policy)
    engine = Engine(policy, t, schedule.total_steps, dist)
    scorer = Scorer.from_config(cfg, data.units, tokenizer.pad_token_id, dist.device, [data.units, data.eval_units],
                                image_inputs(data.vision))
    reference, eval_reference = build_references(cfg, engine, scorer, data, dist, run_dir, tokenizer)
    start = checkpoint.resume(engine, run_dir, t.resume, plan)
    writer = MetricsWriter(run_dir, schedule.total_steps, dist.is_main, cfg.logging.progress,
                           _wandb_run(cfg, run_dir) if dist.is_main else None, resume_step=start)

    live = cfg.reference.live and reference is not None
    utilization = Utilization.measure(engine.module.model, loss.reward_head, live, dist.device,
                                      Numerics.of(t, dist.world_size).compute_dtype, dist.is_main)
    stop, clock, skipped, done, began = StopRequest(), SaveClock(t.save_every_minutes), 0, start or 0, time.perf_counter()
    hostmem.for_training(t, dist.device)  # the loop's recurring blocks, after the start-up's one-off ones
    engine.train()
    # before the first update of every start: the training path against plain forwards (raises past tolerance)
    writer.add_to_next_row(self_check(cfg, engine, scorer, data.examples, next(schedule.steps(done), None), dist))
    for step in schedule.steps(done):
        tracker, totals = StepMetrics(utilization), step_totals(loss, cfg, engine, scorer, reference, step, dist)
        for mb in step.micro_batches:
            scored, terms, metrics = score_loss(loss, cfg, engine, scorer, reference, step, totals, mb)
            trained = all_ranks(bool(torch.isfinite(terms.detach()).all()), dist)
            if trained:
                engine.backward(terms.sum() / loss.normalizer(cfg.loss, totals))
                tracker.add_pairs(terms, metrics, loss.batch_terms(cfg.loss, scored.batch))
            else:
                skipped += _skip_nonfinite(t.on_nonfinite, step, data, engine, scorer)
            skipped += 0 if engine.step() else len(step.micro_batches)
            tracker.add_batch(scored.batch, trained)
        done = step.index + 1
        row = tracker.reduce(dist) | {"step": done, "epoch": step.epoch, "lr": engine.lr(),
                                      "skipped_nonfinite": skipped}
        if not writer.history:  # the data counts once, on the first row of metrics.jsonl (kept on resume)
            row.update({"precision": str(t.precision), **{f"data/{k}": v for k, v in data.report().items()}})
        if done % t.log_every == 0 or done == schedule.total_steps:
            writer.write(row)
        if data.eval_units and ((t.eval_every and done % t.eval_every == 0) or done == schedule.total_steps):
            writer.write(evaluate(engine, scorer.with_units(data.eval_units), eval_reference, cfg, dist) | {"step": done})
        stopping, timed = stop.poll(dist, dist.is_main and clock.due())  # rank 0's clock decides
        # the last step always saves: a finished run is a checkpoint that an extension continues
        if stopping or timed or (t.save_every and done % t.save_every == 0) or done == schedule.total_steps:
            with stop.saving():
                checkpoint.save(engine, run_dir, done, step.epoch, {"total_steps": schedule.total_steps, "plan": plan},
                                t.keep_last)
            clock.reset()
        if stopping:
            break
    writer.close()

    if stop.requested and done < schedule.total_steps:
        stop.restore()
        if dist.is_main:
            print(f"pptrain: stopped by a signal at step {done}; the checkpoint is in {checkpoint.checkpoint_root(run_dir)}; "
                  "the same command with trainer.resume=auto continues from it", file=sys.stderr)
        return writer.history
    if t.save_model:
        saver = data.vision.processor if data.vision is not None else tokenizer  # a VLM's export carries its processor
        with stop.saving():
            engine.export(run_dir / "model", saver, lora_writer(cfg, tokenizer, saver, dist.world_size) if cfg.model.lora.enabled else None)
    stop.restore()
    if dist.is_main:  # last: the final checkpoint and the export are in place
        checkpoint.mark_finished(run_dir, done, t.save_model)
    if dist.is_main:
        _print_summary(writer.history, data, run_dir, done, time.perf_counter() - began, str(t.precision))
    return writer.history


def step_totals(loss, cfg: DictConfig, engine, scorer: Scorer, reference, step: Step, dist: DistInfo) -> StepTotals:
    """The step's counts, and for a loss that sorts over the whole step (aot) the detached
    per-pair values of all its pairs: a no-grad forward of this rank's micro-batches, summed over
    ranks into one table (every pair has one row, in step order). A step of one micro-batch in
    one process needs no such pass: its batch is the step (the loss computes them itself)."""
    totals = StepTotals.of_step(step)
    if not loss.wants_step_stats(cfg.loss) or (dist.world_size == 1 and len(step.micro_batches) == 1):
        return totals
    table = torch.zeros(step.pairs, loss.stats_width, dtype=torch.float64)
    with torch.no_grad():
        for mb in step.micro_batches:  # every rank the same count (empty ones included): ZeRO-3 gathers
            scored = scorer(engine, mb)
            ref = reference.scores(scored) if reference is not None else None
            stats = loss.step_stats(scored.scores, ref, scored.batch.pairs, cfg.loss, **loss.label_kwargs(scored.batch))
            table[pair_rows(step, scorer.units, scored.batch)] = stats.double().cpu()
    return StepTotals(totals.pairs, totals.lists, totals.chosen_tokens, reduce(table, dist), None)


def score_loss(loss, cfg: DictConfig, engine, scorer: Scorer, reference, step: Step, totals: StepTotals, mb):
    """One micro-batch scored (policy and reference) and its loss terms and metrics; the step's
    pair table, when there is one, is indexed by this batch's pairs."""
    scored = scorer(engine, mb)
    ref = reference.scores(scored) if reference is not None else None
    if totals.pair_stats is not None:
        totals = totals.for_batch(pair_rows(step, scorer.units, scored.batch))
    terms, metrics = loss.fn(scored.scores, ref, scored.batch.pairs, cfg.loss, totals=totals,
                             **loss.label_kwargs(scored.batch))
    return scored, terms, metrics


def pair_rows(step: Step, units, batch) -> torch.Tensor:
    """The rows of `batch`'s pairs in the step's pair table: the step's units in order, each
    unit's pairs in order."""
    members = np.asarray(step.units, dtype=np.int64)
    first = dict(zip(members.tolist(), (np.cumsum(units.num_pairs[members]) - units.num_pairs[members]).tolist()))
    return torch.tensor([first[u] + k for u, k in zip(batch.pair_unit.tolist(), batch.pair_k.tolist())],
                        dtype=torch.long)


def _vision_zero_stage(t: DictConfig, dist: DistInfo) -> None:
    """A vision-language model across several processes: a micro-batch without images leaves the
    image parameters (projector; the vision encoder when trained) out of that rank's backward.
    ZeRO-3 would then skip their parameter gathers on one rank and hang the others, so stage 3
    and `trainer.offload_params` are refused. ZeRO-2 reduces gradients in the order they become
    ready, and the zero term that gives an image-less rank those gradients (scoring.PolicyModule)
    makes them ready at another point of its backward than on a rank with images: the ranks
    would sum unrelated gradients. ZeRO-1 (and 0) reduce in parameter order, so `auto` means
    ZeRO-1 here; an explicit stage 2 is checked against the model (_vision_stage_fits)."""
    if dist.world_size == 1:
        return
    if str(t.zero_stage) == "3" or t.offload_params:
        raise ConfigError(["trainer.zero_stage=3 / trainer.offload_params: not supported for vision-language models "
                           "across several processes (a micro-batch without images skips the image parameters' "
                           "gathers); use trainer.zero_stage=auto (ZeRO-1)"])
    if str(t.zero_stage) == "auto":
        t.zero_stage = "1"


def _vision_stage_fits(t: DictConfig, dist: DistInfo, policy: torch.nn.Module) -> None:
    """Explicit ZeRO-2 across processes is safe only when nothing outside the language model
    trains (Qwen2-VL with its vision encoder and merger frozen); see _vision_zero_stage."""
    if dist.world_size > 1 and str(t.zero_stage) == "2" and getattr(policy, "image_params", None):
        raise ConfigError(["trainer.zero_stage=2: this vision-language model trains parameters outside its language "
                           "model (its projector, or the vision encoder), which ZeRO-2 would reduce out of order "
                           "across ranks when a micro-batch has no image; use trainer.zero_stage=auto (ZeRO-1)"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _skip_nonfinite(policy: str, step: Step, data: PreparedData, engine: Engine, scorer: Scorer) -> int:
    """A non-finite loss on some rank: stop naming the step and the source rows (error), or skip
    the micro-batch on every rank together (skip): an empty batch's zero loss keeps
    DeepSpeed's backward/step sequence intact without the bad values."""
    if policy == "error":
        ids = sorted(data.examples.index[step.units].tolist())
        raise NonFiniteLoss(f"non-finite loss at step {step.index + 1} (source rows {ids}); the last checkpoint "
                            "is intact; trainer.on_nonfinite=skip drops such micro-batches instead")
    empty = scorer(engine, None)
    engine.backward(empty.scores.sums.sum() * 0.0)
    return 1


@torch.no_grad()
def evaluate(engine: Engine, scorer: Scorer, reference, cfg: DictConfig, dist: DistInfo) -> dict:
    """Loss and metrics over the whole evaluation split, averaged over its pairs (the loss over its
    lists for a listwise loss; "eval/..." keys)."""
    engine.train(False)
    tracker = StepMetrics()
    schedule = Schedule(scorer.units, cfg.packing, cfg.trainer.micro_batch_size, cfg.trainer.seed,
                        dist.world_size, dist.rank)
    loss = LOSSES[cfg.loss.name]
    for step in schedule.steps():
        totals = step_totals(loss, cfg, engine, scorer, reference, step, dist)
        for mb in step.micro_batches:
            scored, terms, metrics = score_loss(loss, cfg, engine, scorer, reference, step, totals, mb)
            tracker.add_pairs(terms, metrics, loss.batch_terms(cfg.loss, scored.batch))
            tracker.add_batch(scored.batch)
    engine.train(True)
    row = tracker.reduce(dist)
    keep = [k for k in row if k in ("loss", "nll", "log_odds_ratio", "kl", "pairs") or "/" in k]
    return {f"eval/{k}": row[k] for k in keep}


def _wandb_run(cfg: DictConfig, run_dir: Path):
    if cfg.logging.wandb == "disabled":
        return None
    import wandb

    return wandb.init(project=cfg.logging.wandb_project, mode=str(cfg.logging.wandb), dir=str(run_dir),
                      name=run_dir.name, config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def _print_summary(history: list[dict], data: PreparedData, run_dir: Path, steps: int, seconds: float,
                   precision_used: str) -> None:
    from rich.console import Console

    facts = {"run directory": run_dir, "steps": steps, "wall seconds": f"{seconds:.1f}", "precision": precision_used,
             **{k: v for k, v in data.report().items() if v}}
    Console(stderr=True).print(summary_table(history, facts))
