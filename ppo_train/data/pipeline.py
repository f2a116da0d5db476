"""Rows -> the tokenized store -> examples -> units, with the reports of what was truncated or dropped.

The rows of `dataset.path` (and `dataset.eval_path`) are tokenized once into a memory-mapped
store (data/store.py) that later starts read. The evaluation split is a seeded
`dataset.eval_fraction` of the examples or the separate file. Under ffd, a unit longer than
`packing.row_tokens` (possible with more than two responses per prompt) cannot be placed: it
is dropped and counted. The data layer is given what it needs from the rest of the package
(the tokenizer, a vision-language model's processor, the device type, how the processes of a
machine take turns) and imports nothing above it: ppo_train.inputs wires it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from ppo_train.data.examples import Examples
from ppo_train.data.kto import kto_examples
from ppo_train.data.layout import Units
from ppo_train.data.packing import resolve_budget
from ppo_train.data.sources import DataError, LoadReport
from ppo_train.data.store import Store, load_store_examples
from ppo_train.data.tokenize import TokenizeReport, VisionText


@dataclass
class PreparedData:
    units: Units
    load_report: LoadReport
    tokenize_report: TokenizeReport
    eval_units: Units
    dropped_over_row_budget: int = 0
    eval_file_reports: tuple[LoadReport, TokenizeReport] | None = None  # dataset.eval_path only
    vision: VisionText | None = None  # a vision-language model's processor (model.load_vision)
    stores: tuple[Store, ...] = ()  # the tokenized stores read or built (training file, eval file)
    seconds: float = 0.0  # data preparation time of this start (ppo_train.inputs.prepare)

    @property
    def examples(self) -> Examples:
        """The training examples (uid u is examples[u])."""
        return self.units.examples

    @property
    def eval_examples(self) -> Examples:
        return self.eval_units.examples

    def report(self) -> dict[str, int]:
        """Counts of everything read, skipped, truncated or dropped (summary, metrics, data_report.json)."""
        out = {"rows": self.load_report.rows, "invalid_skipped": self.load_report.skipped,
               "of_which_all_tied": self.load_report.tied_rows,
               "tied_pairs_dropped": self.load_report.tied_pairs,
               "responses_over_max_responses": self.load_report.capped_responses,
               **self.tokenize_report.as_dict(), "dropped_over_row_budget": self.dropped_over_row_budget,
               "train_examples": len(self.units), "eval_examples": len(self.eval_units),
               "stores_built": sum(s.built for s in self.stores), "prepare_seconds": round(self.seconds, 3)}
        if self.vision is not None:
            out.update({"images": int(self.examples.image_count.sum() + self.eval_examples.image_count.sum()),
                        "image_tokens": int(self.examples.image_tokens.sum() + self.eval_examples.image_tokens.sum())})
        if self.eval_file_reports is not None:
            loaded, tokenized = self.eval_file_reports
            out.update({"eval_file_rows": loaded.rows, "eval_file_invalid_skipped": loaded.skipped,
                        **{f"eval_file_{k}": v for k, v in tokenized.as_dict().items() if k != "examples"}})
        return out

    @property
    def longest_sequence(self) -> int:
        """The longest [prompt | response] of any example, training or eval, in tokens."""
        return max(self.examples.longest_sequence, self.eval_examples.longest_sequence)

    def skipped_rows(self, limit: int = 1000) -> list[str]:
        """Why each skipped row was skipped (the first `limit`, training file then eval file)."""
        messages = list(self.load_report.skip_messages) + list(self.tokenize_report.skip_messages)
        if self.eval_file_reports is not None:
            messages += self.eval_file_reports[0].skip_messages + self.eval_file_reports[1].skip_messages
        return messages[:limit]


def _fits(units: Units, cfg: DictConfig) -> tuple[Units, int]:
    """Under ffd, the units that fit one row of packing.row_tokens (the budget is checked
    against the real units, not against the length limits); the others are dropped, counted
    and, with the longest of them, reported on stderr."""
    if cfg.packing.name != "ffd" or not len(units):
        return units, 0
    keep = np.flatnonzero(units.lengths <= cfg.packing.row_tokens)
    if len(keep) < len(units):
        print(f"pptrain: warning: {len(units) - len(keep)} of {len(units)} units are longer than packing.row_tokens="
              f"{cfg.packing.row_tokens} (the longest has {int(units.lengths.max())} tokens) and are dropped; raise "
              "the row budget or lower dataset.max_prompt_length / max_response_length to keep them", file=sys.stderr)
        return units.select(keep), len(units) - len(keep)
    return units, 0


def prepare(cfg: DictConfig, tokenizer, vision: VisionText | None = None, device_type: str = "cpu",
            local_main_first=None) -> PreparedData:
    """Read (or build) the store, split and lay out the data. A null ffd budget (auto) is
    resolved here, in `cfg.packing`, from the real units and `device_type`. `vision`: a
    vision-language model's processor (None: a text model). `local_main_first`: a context
    manager in which the first process of each machine builds a missing store while the
    others wait (ppo_train.dist.local_main_first)."""
    d = cfg.dataset
    if vision is not None and cfg.layout.name == "unmasked":
        raise DataError("layout=unmasked is not supported for vision-language models; use layout=shared or paired")
    examples, load_report, tokenize_report, store = load_store_examples(d, d.path, tokenizer, vision, local_main_first)
    stores = [store]
    eval_examples = Examples.from_list([])
    eval_file_reports = None
    if d.eval_path:
        eval_examples, eval_load, eval_tokens, eval_store = load_store_examples(d, d.eval_path, tokenizer, vision,
                                                                                local_main_first)
        eval_file_reports = (eval_load, eval_tokens)
        stores.append(eval_store)
    elif d.eval_fraction:
        order = np.random.default_rng([cfg.trainer.seed, 7]).permutation(len(examples))
        n_eval = max(1, int(round(d.eval_fraction * len(examples))))
        held = np.zeros(len(examples), dtype=bool)
        held[order[:n_eval]] = True
        examples, eval_examples = examples.select(np.flatnonzero(~held)), examples.select(np.flatnonzero(held))
    if cfg.loss.name == "kto":  # labelled completions, each with its KL completion (data/kto.py)
        examples, eval_examples = kto_examples(examples, d.path), kto_examples(eval_examples, d.eval_path or d.path)
    else:
        for split, source in ((examples, d.path), (eval_examples, d.eval_path or d.path)):
            if len(split) and int(split.num_pairs.min()) == 0:
                raise DataError(f"{source}: unpaired rows (prompt/completion/label) have no preference pair; they "
                                "train only with loss=kto")
    units, eval_units = Units(examples, cfg.layout.name), Units(eval_examples, cfg.layout.name)
    chosen = resolve_budget(cfg.packing, np.concatenate([units.lengths, eval_units.lengths]).tolist(), device_type,
                            cfg.trainer)
    if chosen:
        print(f"pptrain: packing=ffd, auto budget: {', '.join(chosen)}", file=sys.stderr)
    units, dropped = _fits(units, cfg)
    eval_units, eval_dropped = _fits(eval_units, cfg)
    if not len(units):
        raise DataError(f"{d.path}: no training examples left ({dropped} longer than packing.row_tokens="
                        f"{cfg.packing.row_tokens}); raise the row budget or lower the length limits")
    return PreparedData(units, load_report, tokenize_report, eval_units,
                        dropped + eval_dropped, eval_file_reports, vision, tuple(stores))
