"""Dataset statistics: what prefix sharing and packing can save on this data, before training.

For one example with a prompt of p tokens and K responses of c_1..c_K tokens:

    paired tokens = K * p + sum_i c_i     (K sequences [P | Ri])
    shared tokens = p + sum_i c_i         (one sequence [P | R1 | ... | RK])
    ideal speedup = paired / shared = (K p + sum_i c_i) / (p + sum_i c_i)

For K = 2 and c_1 = c_2 = c this is 2 (p + c) / (p + 2 c): 1 when the prompt is empty,
approaching 2 when the prompt dominates. The aggregate ideal speedup is
sum(paired) / sum(shared) over all examples (what a whole epoch saves); the per-example
median is reported beside it. Image tokens (vision-language data) are prompt tokens and
counted as such; the vision encoder's work is reported apart: images it encodes per epoch
in each layout (paired: each prompt's images K times; shared: once).

Both count tokens only: attention cost grows faster than
linearly with length and the output head runs on response tokens only (the same count
in both layouts), so a measured speedup sits below this number.

Padding: for every layout (paired, shared) and packer (none, sorted, ffd) the epoch is
planned at the configured budget (`trainer.micro_batch_size` prompts for none/sorted,
`packing.rows_per_batch` rows of `packing.row_tokens` for ffd, rows padded to
`packing.pad_multiple`), and the real (non-pad) and padded token totals are reported, with
"token speedup incl. padding" = padded tokens of paired+none / padded tokens of the cell.

Every cell uses the same examples: those whose paired unit fits one ffd row (a paired unit
is never shorter than the shared one); the others are counted in `excluded_over_row_budget`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ppo_train import fileio
from ppo_train.data.layout import build_units
from ppo_train.data.packing import plan_epoch, resolve_budget
from ppo_train.dist import device_for
from ppo_train.data.pipeline import PreparedData
from ppo_train.inputs import prepare
from ppo_train.data.examples import Examples

LAYOUTS = ("paired", "shared")
PACKERS = ("none", "sorted", "ffd")


def with_packer(cfg: DictConfig, name: str) -> DictConfig:
    """A copy of cfg.packing with another packer name (the budget keys kept)."""
    return OmegaConf.merge(cfg.packing, {"name": name})


def _examples(examples) -> Examples:
    return examples if isinstance(examples, Examples) else Examples.from_list(examples)


def comparable_examples(cfg: DictConfig, tokenizer) -> tuple[Examples, PreparedData, int]:
    """The training examples every (layout, packer) cell can place, the prepared data and the
    number excluded. Prepared with packer `none` so no layout-specific row-budget filter runs;
    the common filter is then the paired length (the longer one) against packing.row_tokens."""
    plain = OmegaConf.merge(cfg, {"packing": {"name": "none"}})
    data = prepare(plain, tokenizer)
    # an auto budget is resolved from the paired units (the longer layout), so every cell fits
    # them; also for none/sorted, whose grid rows plan ffd cells with it
    budget = OmegaConf.merge(cfg.packing, {"name": "ffd"})
    paired = data.examples.paired_length
    resolve_budget(budget, paired.tolist(), device_for(cfg.trainer.device).type)
    cfg.packing.row_tokens, cfg.packing.rows_per_batch = budget.row_tokens, budget.rows_per_batch
    kept = data.examples.select(np.flatnonzero(paired <= cfg.packing.row_tokens))
    return kept, data, len(data.examples) - len(kept)


def prefix_sharing_ideal(examples) -> dict[str, float]:
    """Token counts of both layouts and the ideal speedup (aggregate and per-example median)."""
    examples = _examples(examples)
    paired, shared = examples.paired_length.astype(np.float64), examples.shared_length.astype(np.float64)
    return {"paired_tokens": int(paired.sum()), "shared_tokens": int(shared.sum()),
            "ideal_speedup": float(paired.sum() / shared.sum()),
            "ideal_speedup_median": float(np.median(paired / shared))}


def packing_cell(examples, cfg: DictConfig, layout: str, packer: str) -> dict:
    """Plan epoch 0 of one (layout, packer) cell; token totals and the non-pad fraction."""
    units = build_units(_examples(examples), layout)
    plan = plan_epoch(units, with_packer(cfg, packer), cfg.trainer.micro_batch_size, cfg.trainer.seed, 0)
    real = sum(mb.real_tokens for mb in plan)
    total = sum(len(mb.rows) * mb.row_length for mb in plan)
    return {"layout": layout, "packer": packer, "micro_batches": len(plan),
            "rows": sum(len(mb.rows) for mb in plan), "real_tokens": real, "total_tokens": total,
            "pad_tokens": total - real, "nonpad_fraction": real / total}


def packing_grid(examples, cfg: DictConfig) -> list[dict]:
    examples = _examples(examples)
    cells = [packing_cell(examples, cfg, layout, packer) for layout in LAYOUTS for packer in PACKERS]
    baseline = next(c for c in cells if c["layout"] == "paired" and c["packer"] == "none")
    for c in cells:
        c["token_speedup_incl_padding"] = baseline["total_tokens"] / c["total_tokens"]
    return cells


def _median_p95(values) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(arr)), "p95": float(np.percentile(arr, 95))}


def example_stats(examples) -> dict:
    """Length and response-count statistics of tokenized examples (per-example arrays only)."""
    examples = _examples(examples)
    ks = examples.num_responses
    ratios = examples.prompt_length / (examples.response_total / ks)
    return {
        "examples": len(examples),
        "responses_per_prompt": {"mean": float(np.mean(ks)),
                                 "histogram": {str(k): int(n) for k, n in zip(*np.unique(ks, return_counts=True))}},
        "prompt_tokens": _median_p95(examples.prompt_length),
        "response_tokens": _median_p95(examples.flat_response_lengths),
        "prefix_completion_ratio_median": float(np.median(ratios)),
        **prefix_sharing_ideal(examples),
        **image_stats(examples),
    }


def image_stats(examples) -> dict:
    """Images, image tokens, and the images the vision encoder runs per epoch in each layout
    (empty for text data)."""
    examples = _examples(examples)
    images = examples.image_count
    if not images.any():
        return {}
    paired = int((images * examples.num_responses).sum())
    return {"images": int(images.sum()), "image_tokens": int(examples.image_tokens.sum()),
            "image_tokens_per_prompt": _median_p95(examples.image_tokens),
            "encoder_images": {"paired": paired, "shared": int(images.sum())},
            "encoder_images_saved": paired - int(images.sum())}


def dataset_stats(cfg: DictConfig, tokenizer, limit: int | None = None) -> dict:
    """Everything above for the configured dataset, budget and seed (a JSON-ready dict);
    `limit` keeps the first N comparable examples (what the benchmark trains on)."""
    examples, data, excluded = comparable_examples(cfg, tokenizer)
    examples = examples[:limit]  # a view
    budget = {"micro_batch_size": cfg.trainer.micro_batch_size,
              **OmegaConf.to_container(cfg.packing, resolve=True)}
    return {"dataset": str(cfg.dataset.path), "rows": data.report()["rows"], "data_report": data.report(),
            "excluded_over_row_budget": excluded, "budget": budget, **example_stats(examples),
            "packing": packing_grid(examples, cfg)}


def print_stats(stats: dict, console=None) -> None:
    """Two rich tables: the data summary and the (layout, packer) padding grid."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    summary = Table(title="dataset")
    summary.add_column("statistic")
    summary.add_column("value", justify="right")
    rpp, pt, rt = stats["responses_per_prompt"], stats["prompt_tokens"], stats["response_tokens"]
    for name, value in (
        ("rows read", stats["rows"]), ("examples kept", stats["examples"]),
        ("excluded (over ffd row budget)", stats["excluded_over_row_budget"]),
        ("responses per prompt (mean)", f"{rpp['mean']:.2f}"),
        ("responses per prompt (histogram)", ", ".join(f"{k}: {n}" for k, n in rpp["histogram"].items())),
        ("prompt tokens (median / p95)", f"{pt['median']:.0f} / {pt['p95']:.0f}"),
        ("response tokens (median / p95)", f"{rt['median']:.0f} / {rt['p95']:.0f}"),
        ("prefix/completion ratio (median)", f"{stats['prefix_completion_ratio_median']:.2f}"),
        ("ideal prefix-sharing speedup (aggregate)", f"{stats['ideal_speedup']:.3f}x"),
        ("ideal prefix-sharing speedup (median)", f"{stats['ideal_speedup_median']:.3f}x"),
    ):
        summary.add_row(name, str(value))
    if "images" in stats:
        enc = stats["encoder_images"]
        summary.add_row("images / image tokens", f"{stats['images']} / {stats['image_tokens']}")
        summary.add_row("image tokens per prompt (median / p95)",
                        f"{stats['image_tokens_per_prompt']['median']:.0f} / {stats['image_tokens_per_prompt']['p95']:.0f}")
        summary.add_row("vision-encoder images per epoch (paired / shared)", f"{enc['paired']} / {enc['shared']}")
        summary.add_row("vision-encoder images saved by sharing", str(stats["encoder_images_saved"]))
    console.print(summary)
    grid = Table(title="padding at the configured budget (vs paired+none: token speedup incl. padding)")
    for col in ("layout", "packer", "micro-batches", "real tokens", "padded tokens", "non-pad",
                "vs paired+none"):
        grid.add_column(col, justify="left" if col in ("layout", "packer") else "right")
    for c in stats["packing"]:
        grid.add_row(c["layout"], c["packer"], str(c["micro_batches"]), str(c["real_tokens"]),
                     str(c["total_tokens"]), f"{c['nonpad_fraction']:.1%}", f"{c['token_speedup_incl_padding']:.3f}x")
    console.print(grid)


def write_stats(stats: dict, path: str | Path) -> Path:
    return fileio.write_text(Path(path), json.dumps(stats, indent=2) + "\n")


def run_stats(cfg: DictConfig, out_dir: str | Path) -> dict:
    """mode=stats: load the tokenizer, compute, print, write `<out_dir>/stats.json`."""
    from ppo_train.model import load_tokenizer

    stats = dataset_stats(cfg, load_tokenizer(cfg.model))
    print_stats(stats)
    write_stats(stats, Path(out_dir) / "stats.json")
    return stats
