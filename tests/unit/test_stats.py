"""Dataset statistics: hand-counted numbers on a 3-row file, invariants on the bundled HH data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ppo_train.cli import compose
from ppo_train.data.packing import round_up
from ppo_train.fileio import asset_path
from ppo_train.stats import dataset_stats, print_stats, run_stats, write_stats

ROWS = [
    {"prompt": "What is the capital of France? Please answer briefly and explain why.",
     "chosen": "Paris.", "rejected": "I think it might be Lyon, but I am not sure at all."},
    {"prompt": "Name a prime number.", "chosen": "Seven is a prime number.", "rejected": "Nine."},
    {"prompt": "Write one short sentence about the sea and the wind over it at night.",
     "chosen": "The sea breathes under a dark wind.", "rejected": "Sea."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(asset_path("smollm2")))


def _hand_count(tokenizer):
    """(prompt length, [response lengths]) per row, tokenized here the documented way."""
    out = []
    for row in ROWS:
        p = len(tokenizer(row["prompt"], add_special_tokens=True)["input_ids"])
        rs = [len(tokenizer(row[k], add_special_tokens=False)["input_ids"]) + 1 for k in ("chosen", "rejected")]
        out.append((p, rs))
    return out


def _stats_for(tmp_path, tokenizer, *extra):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # micro_batch_size 3: one micro-batch holds every prompt, so none/sorted padding is order-free
    cfg = compose([f"dataset.path={path}", "dataset.format=preference", "run_name=test",
                   "trainer.micro_batch_size=3", *extra])
    return dataset_stats(cfg, tokenizer), cfg


def test_numbers_match_a_hand_count(tmp_path, tokenizer):
    stats, cfg = _stats_for(tmp_path, tokenizer)
    hand = _hand_count(tokenizer)
    prompts = [p for p, _ in hand]
    responses = [r for _, rs in hand for r in rs]
    paired = [2 * p + sum(rs) for p, rs in hand]
    shared = [p + sum(rs) for p, rs in hand]
    assert stats["rows"] == 3 and stats["examples"] == 3 and stats["excluded_over_row_budget"] == 0
    assert stats["responses_per_prompt"] == {"mean": 2.0, "histogram": {"2": 3}}
    assert stats["prompt_tokens"] == {"median": np.median(prompts), "p95": np.percentile(prompts, 95)}
    assert stats["response_tokens"] == {"median": np.median(responses), "p95": np.percentile(responses, 95)}
    ratio = np.median([p / np.mean(rs) for p, rs in hand])
    assert stats["prefix_completion_ratio_median"] == pytest.approx(ratio, abs=1e-12)
    assert (stats["paired_tokens"], stats["shared_tokens"]) == (sum(paired), sum(shared))
    assert stats["ideal_speedup"] == pytest.approx(sum(paired) / sum(shared), abs=1e-12)
    assert stats["ideal_speedup_median"] == pytest.approx(np.median(np.divide(paired, shared)), abs=1e-12)

    cells = {(c["layout"], c["packer"]): c for c in stats["packing"]}
    pad = cfg.packing.pad_multiple
    # none and sorted: one micro-batch, every document its own row, padded to the longest
    docs = {"paired": [p + r for p, rs in hand for r in rs], "shared": shared}
    for layout, lengths in docs.items():
        for packer in ("none", "sorted"):
            c = cells[(layout, packer)]
            expect_total = len(lengths) * round_up(max(lengths), pad)
            assert (c["real_tokens"], c["total_tokens"]) == (sum(lengths), expect_total), (layout, packer, c)
            assert c["nonpad_fraction"] == pytest.approx(sum(lengths) / expect_total)
        # ffd: the three units fit one row of packing.row_tokens
        c = cells[(layout, "ffd")]
        assert (c["real_tokens"], c["total_tokens"], c["rows"]) == (sum(lengths), cfg.packing.row_tokens, 1), c
    base = cells[("paired", "none")]["total_tokens"]
    for c in cells.values():
        assert c["pad_tokens"] == c["total_tokens"] - c["real_tokens"]
        assert c["token_speedup_incl_padding"] == pytest.approx(base / c["total_tokens"])


def test_k2_speedup_formula(tmp_path, tokenizer):
    """The docstring's closed form 2(p+c)/(p+2c) for equal response lengths c."""
    from ppo_train.data.tokenize import TokenizedExample
    from ppo_train.stats import prefix_sharing_ideal

    p, c = 90, 30
    ideal = prefix_sharing_ideal([TokenizedExample(0, [1] * p, [[2] * c, [3] * c], [(0, 1)])])
    assert ideal["ideal_speedup"] == pytest.approx(2 * (p + c) / (p + 2 * c))


def test_print_write_and_run_stats(tmp_path, tokenizer):
    from rich.console import Console

    stats, cfg = _stats_for(tmp_path, tokenizer)
    console = Console(record=True, width=140)
    print_stats(stats, console)
    text = console.export_text()
    assert "ideal prefix-sharing speedup" in text and "shared" in text and "ffd" in text
    assert json.loads(write_stats(stats, tmp_path / "out" / "s.json").read_text()) == stats
    again = run_stats(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "stats.json").read_text()) == again
    assert again["data_report"]["stores_built"] == 0  # read: an earlier start built it

    def this_start(s):  # what differs between starts: whether the store was built, the time
        return {**s, "data_report": {**s["data_report"], "stores_built": None, "prepare_seconds": None}}

    assert this_start(again) == this_start(stats)


def test_bundled_hh_invariants(tokenizer):
    cfg = compose(["dataset.num_rows=50", "run_name=test"])
    stats = dataset_stats(cfg, tokenizer)
    cells = {(c["layout"], c["packer"]): c for c in stats["packing"]}
    assert stats["responses_per_prompt"]["histogram"] == {"2": stats["examples"]}
    assert 1.0 < stats["ideal_speedup"] < 2.0, stats["ideal_speedup"]
    assert 1.0 < stats["ideal_speedup_median"] < 2.0
    for layout in ("paired", "shared"):
        fractions = {p: cells[(layout, p)]["nonpad_fraction"] for p in ("none", "sorted", "ffd")}
        assert fractions["ffd"] >= fractions["none"], (layout, fractions)
    # shared: a unit is one row, so length-sorted groups pad no more than any other grouping
    shared = {p: cells[("shared", p)]["nonpad_fraction"] for p in ("none", "sorted")}
    assert shared["sorted"] >= shared["none"] - 1e-12, shared
    # the same examples in every cell: real tokens depend on the layout only
    assert {cells[("shared", p)]["real_tokens"] for p in ("none", "sorted", "ffd")} == {stats["shared_tokens"]}
    assert {cells[("paired", p)]["real_tokens"] for p in ("none", "sorted", "ffd")} == {stats["paired_tokens"]}
