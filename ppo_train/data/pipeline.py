"""Rows -> examples -> token ids -> units, with the reports of what was truncated or dropped."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ppo_train.data.layout import Unit, build_units
from ppo_train.data.sources import LoadReport, load_examples
from ppo_train.data.tokenize import TokenizedExample, TokenizeReport, tokenize_examples


@dataclass
class PreparedData:
    units: list[Unit]
    examples: list[TokenizedExample]
    load_report: LoadReport
    tokenize_report: TokenizeReport

    def report(self) -> dict[str, int]:
        return {"rows": self.load_report.rows, "invalid_skipped": self.load_report.skipped,
                **self.tokenize_report.as_dict()}


def prepare(cfg: DictConfig, tokenizer) -> PreparedData:
    examples, load_report = load_examples(cfg.dataset)
    tokenized, tokenize_report = tokenize_examples(examples, tokenizer, cfg.dataset)
    return PreparedData(build_units(tokenized, cfg.layout.name), tokenized, load_report, tokenize_report)
