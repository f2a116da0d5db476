"""Step metrics: accumulate per-pair values over micro-batches, reduce over ranks, write
metrics.jsonl (rank 0), and show a rich progress bar and a final summary table."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from ppo_train import fileio
from ppo_train.dist import reduce


COUNT = "#n"  # suffix of a metric's count of the pairs it applies to (not written)


class StepMetrics:
    """Sums of per-pair metrics and token counts of one optimizer step (this rank)."""

    def __init__(self, utilization=None):
        self.sums: dict[str, float] = defaultdict(float)
        self.start = time.perf_counter()
        self.utilization = utilization  # flops.Utilization: model FLOPs per batch and the peak

    def add_pairs(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], terms: int | None = None) -> None:
        """`loss`: the batch's loss terms; `terms`: how many units they are a loss of (lists for a
        listwise loss; default: one per term, i.e. per pair); `metrics`: per-pair tensors, NaN
        where a metric does not apply to a pair (KTO's rewards/chosen at an undesirable
        completion): each metric is the mean over the pairs it applies to."""
        self.sums["loss_terms"] += int(loss.numel()) if terms is None else int(terms)
        self.sums["loss"] += float(loss.detach().sum())
        for key, value in metrics.items():
            value = value.detach()
            self.sums[key] += float(value.nansum())
            self.sums[key + COUNT] += int((~torch.isnan(value)).sum())

    def add_batch(self, batch, trained: bool = True) -> None:
        """Token counts of a processed micro-batch; its pairs, responses and samples only if it
        trained (a skipped non-finite micro-batch counts as work, not as training)."""
        if trained:
            self.sums["pairs"] += batch.num_pairs
            self.sums["responses"] += batch.num_responses
            self.sums["samples"] += len(batch.example_ids)
        self.sums["tokens"] += batch.shape[0] * batch.shape[1]
        self.sums["real_tokens"] += batch.real_tokens
        self.sums["images"] += batch.images  # through the vision encoder (vision-language models)
        self.sums["image_tokens"] += batch.image_tokens
        if self.utilization is not None:
            self.sums["flops"] += self.utilization.counter.of_batch(batch)

    def reduce(self, dist) -> dict[str, float]:
        """The step's row: totals over ranks (every rank must call it, with the same keys)."""
        keys = sorted(self.sums)
        summed = reduce(torch.tensor([self.sums[k] for k in keys], dtype=torch.float64), dist)
        totals = dict(zip(keys, summed.tolist()))
        seconds = time.perf_counter() - self.start
        # each metric's mean over the pairs that entered the loss and that it applies to (skipped
        # micro-batches excluded); None when a step had none
        row = {"loss": None}
        for k, v in totals.items():
            if (k in ("nll", "log_odds_ratio", "kl") or "/" in k) and not k.endswith(COUNT):
                n = totals.get(k + COUNT, 0.0)
                row[k] = v / n if n else None
        if "rewards/margins" not in row and "rewards/chosen" in row and "rewards/rejected" in row:
            chosen, rejected = row["rewards/chosen"], row["rewards/rejected"]  # unpaired (KTO): the means' difference
            row["rewards/margins"] = None if chosen is None or rejected is None else chosen - rejected
        terms = totals.get("loss_terms", 0.0)  # pairs, or lists for a listwise loss
        row["loss"] = totals["loss"] / terms if terms and "loss" in totals else None
        for k in ("pairs", "responses", "samples", "tokens", "real_tokens"):
            row[k] = int(totals.get(k, 0))
        if totals.get("images"):  # summed over ranks first, so every rank agrees on the keys
            row["images"], row["image_tokens"] = int(totals["images"]), int(totals["image_tokens"])
        row["pad_fraction"] = 1.0 - totals.get("real_tokens", 0) / max(totals.get("tokens", 1), 1)
        row["samples_per_s"] = totals.get("samples", 0) / seconds
        row["tokens_per_s"] = totals.get("real_tokens", 0) / seconds
        row["step_seconds"] = seconds
        if self.utilization is not None:
            row.update(self.utilization.row(totals.get("flops", 0.0), seconds, dist.world_size))
        return row


def rows_up_to(path: Path, step: int) -> list[dict]:
    """The rows of `path` up to `step` (later ones are trained again). A line that does not
    parse (a kill in the middle of a write leaves a torn last line) is dropped and counted."""
    rows, torn = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            if row["step"] <= step:
                rows.append(row)
        else:
            torn += 1
    if torn:
        print(f"pptrain: warning: {path}: dropped {torn} line(s) that do not parse (a kill mid-write)", file=sys.stderr)
    return rows


class MetricsWriter:
    """metrics.jsonl, wandb and the progress bar; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, progress: bool, wandb_run=None,
                 resume_step: int | None = None):
        self.enabled, self.wandb = enabled, wandb_run
        self.history: list[dict] = []
        self.next_row: dict = {}  # keys for the next row written, once (add_to_next_row)
        self.file = None
        if enabled:
            path = run_dir / "metrics.jsonl"
            if resume_step is not None and path.exists():
                self.history = rows_up_to(path, resume_step)
                fileio.write_text(path, "".join(json.dumps(row) + "\n" for row in self.history))
            self.file = open(path, "a" if resume_step is not None else "w")
        self.progress = None
        if enabled and progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.progress.add_task("train", total=total_steps, info="",
                                               completed=resume_step or 0)
            self.progress.start()

    def add_to_next_row(self, values: dict) -> None:
        """Keys that go into the next row this process writes, and only that one (the
        self-check's result: the first row of every start, resumes included)."""
        self.next_row.update(values)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row, self.next_row = row | self.next_row, {}
        self.history.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])
        if self.progress is not None:
            fmt = lambda key, spec: "-" if row.get(key) is None else format(row[key], spec)  # noqa: E731
            info = (f"loss {fmt('loss', '.4f')}  acc {fmt('rewards/accuracies', '.2f')}  "
                    f"margin {fmt('rewards/margins', '.3f')}  {row['samples_per_s']:.1f} samples/s")
            self.progress.update(self.task, completed=row["step"], info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _num(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def summary_table(history: list[dict], extra: dict[str, object]):
    """A rich table: first and last step metrics side by side, plus run facts."""
    from rich.table import Table

    table = Table(title="pptrain summary")
    table.add_column("metric")
    table.add_column("first step", justify="right")
    table.add_column("last step", justify="right")
    steps = [row for row in history if "loss" in row]
    evals = [row for row in history if "eval/loss" in row]
    if steps:
        first, last = steps[0], steps[-1]
        for key in ("loss", "nll", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "samples_per_s", "tokens_per_s", "pad_fraction"):
            if key in last:
                table.add_row(key, _num(first.get(key)), _num(last.get(key)))
    if evals:
        for key in ("eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"):
            if key in evals[-1]:
                table.add_row(key, _num(evals[0].get(key)), _num(evals[-1].get(key)))
    for key, value in extra.items():
        table.add_row(key, "", str(value))
    return table
