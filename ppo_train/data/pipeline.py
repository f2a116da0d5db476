"""Rows -> examples -> token ids -> units, with the reports of what was truncated or dropped.

The evaluation split is a seeded `dataset.eval_fraction` of the examples or a separate
file (`dataset.eval_path`). Under ffd, a unit longer than `packing.row_tokens` (possible
with more than two responses per prompt) cannot be placed: it is dropped and counted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
from torch.profiler import record_function
from omegaconf import DictConfig

from ppo_train.data.layout import Unit, build_units
from ppo_train.data.packing import resolve_budget
from ppo_train.dist import device_for
from ppo_train.data.sources import DataError, LoadReport, load_examples
from ppo_train.data.tokenize import TokenizedExample, TokenizeReport, VisionText, tokenize_examples


@dataclass
class PreparedData:
    units: list[Unit]
    examples: list[TokenizedExample]
    load_report: LoadReport
    tokenize_report: TokenizeReport
    eval_units: list[Unit] = field(default_factory=list)
    eval_examples: list[TokenizedExample] = field(default_factory=list)
    dropped_over_row_budget: int = 0
    eval_file_reports: tuple[LoadReport, TokenizeReport] | None = None  # dataset.eval_path only
    vision: VisionText | None = None  # a vision-language model's processor (model.load_vision)

    def report(self) -> dict[str, int]:
        """Counts of everything read, skipped, truncated or dropped (summary, metrics, data_report.json)."""
        out = {"rows": self.load_report.rows, "invalid_skipped": self.load_report.skipped,
               "of_which_all_tied": self.load_report.tied_rows,
               "tied_pairs_dropped": self.load_report.tied_pairs,
               "responses_over_max_responses": self.load_report.capped_responses,
               **self.tokenize_report.as_dict(), "dropped_over_row_budget": self.dropped_over_row_budget,
               "train_examples": len(self.units), "eval_examples": len(self.eval_units)}
        if self.vision is not None:
            out.update({"images": sum(len(ex.images or ()) for ex in self.examples + self.eval_examples),
                        "image_tokens": sum(ex.image_tokens for ex in self.examples + self.eval_examples)})
        if self.eval_file_reports is not None:
            loaded, tokenized = self.eval_file_reports
            out.update({"eval_file_rows": loaded.rows, "eval_file_invalid_skipped": loaded.skipped,
                        **{f"eval_file_{k}": v for k, v in tokenized.as_dict().items() if k != "examples"}})
        return out

    @property
    def longest_sequence(self) -> int:
        """The longest [prompt | response] of any example, training or eval, in tokens."""
        return max((len(ex.prompt_ids) + max(len(r) for r in ex.response_ids)
                    for ex in self.examples + self.eval_examples), default=0)

    def skipped_rows(self, limit: int = 1000) -> list[str]:
        """Why each skipped row was skipped (the first `limit`, training file then eval file)."""
        messages = list(self.load_report.skip_messages) + list(self.tokenize_report.skip_messages)
        if self.eval_file_reports is not None:
            messages += self.eval_file_reports[0].skip_messages + self.eval_file_reports[1].skip_messages
        return messages[:limit]


def _fits(units: list[Unit], examples: list[TokenizedExample], cfg: DictConfig):
    """Under ffd, the units that fit one row of packing.row_tokens (the budget is checked
    against the real units, not against the length limits); the others are dropped, counted
    and, with the longest of them, reported on stderr."""
    if cfg.packing.name != "ffd":
        return units, examples, 0
    keep = [i for i, u in enumerate(units) if u.length <= cfg.packing.row_tokens]
    if len(keep) < len(units):
        longest = max(u.length for u in units)
        print(f"pptrain: warning: {len(units) - len(keep)} of {len(units)} units are longer than packing.row_tokens="
              f"{cfg.packing.row_tokens} (the longest has {longest} tokens) and are dropped; raise the row budget or "
              "lower dataset.max_prompt_length / max_response_length to keep them", file=sys.stderr)
    examples = [examples[i] for i in keep]
    return build_units(examples, cfg.layout.name), examples, len(units) - len(keep)


@record_function("pptrain.prepare")
def prepare(cfg: DictConfig, tokenizer) -> PreparedData:
    """Load, tokenize, split and lay out the data. A null ffd budget (auto) is resolved here, in
    `cfg.packing`, from the real units. A vision-language model's processor is loaded here too."""
    from ppo_train.model import load_vision

    d = cfg.dataset
    vision = load_vision(cfg.model, tokenizer)
    if vision is not None and cfg.layout.name == "unmasked":
        raise DataError("layout=unmasked is not supported for vision-language models; use layout=shared or paired")
    examples, load_report = load_examples(d)
    tokenized, tokenize_report = tokenize_examples(examples, tokenizer, d, vision=vision)
    eval_tokenized: list[TokenizedExample] = []
    eval_file_reports = None
    if d.eval_path:
        eval_rows, eval_load_report = load_examples(d, d.eval_path)
        eval_tokenized, eval_tokenize_report = tokenize_examples(eval_rows, tokenizer, d, d.eval_path, vision)
        eval_file_reports = (eval_load_report, eval_tokenize_report)
    elif d.eval_fraction:
        order = np.random.default_rng([cfg.trainer.seed, 7]).permutation(len(tokenized))
        n_eval = max(1, int(round(d.eval_fraction * len(tokenized))))
        held = set(order[:n_eval].tolist())
        eval_tokenized = [ex for i, ex in enumerate(tokenized) if i in held]
        tokenized = [ex for i, ex in enumerate(tokenized) if i not in held]
    units, eval_units = build_units(tokenized, cfg.layout.name), build_units(eval_tokenized, cfg.layout.name)
    chosen = resolve_budget(cfg.packing, [u.length for u in units + eval_units], device_for(cfg.trainer.device).type,
                            cfg.trainer)
    if chosen:
        print(f"pptrain: packing=ffd, auto budget: {', '.join(chosen)}", file=sys.stderr)
    units, tokenized, dropped = _fits(units, tokenized, cfg)
    eval_units, eval_tokenized, eval_dropped = _fits(eval_units, eval_tokenized, cfg)
    if not units:
        raise DataError(f"{d.path}: no training examples left ({dropped} longer than packing.row_tokens="
                        f"{cfg.packing.row_tokens}); raise the row budget or lower the length limits")
    return PreparedData(units, tokenized, load_report, tokenize_report, eval_units, eval_tokenized,
                        dropped + eval_dropped, eval_file_reports, vision)
