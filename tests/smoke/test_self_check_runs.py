"""Proof obligation 7 on the CPU: the self-check runs before the first update of every start
and records its result in the first metrics row; a deliberately broken mask makes it stop the
run in one line (and with trainer.self_check=false the same broken run trains, so the check is
what stopped it); layout=unmasked is skipped and says so. One step of 8-24 rows per run."""

from __future__ import annotations

import shutil

import pytest

from ppo_train.cli import compose
from ppo_train.errors import SelfCheckFailed
from ppo_train.selfcheck import SKIPPED, TOLERANCES
from ppo_train.train import train

BASE = ["trainer.precision=fp32", "dataset.num_rows=8", "trainer.max_steps=1", "packing.rows_per_batch=2", "trainer.save_model=false", "trainer.save_every=0",
        "logging.progress=false", "run_name=t"]
SETUPS = {
    "default": [],
    "reward": ["loss=reward"],
    "lora": ["model.lora.enabled=true", "loss=simpo"],
    "vlm_llava": ["recipe=tiny_vlm_dpo", "model=tiny_llava"],
    "vlm_qwen2_vl": ["recipe=tiny_vlm_dpo", "model=tiny_qwen2_vl"],
    "bf16": ["trainer.precision=bf16"],  # (later overrides win: bf16 mixed over BASE's fp32)
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_self_check_passes_and_fills_the_first_row(setup, tmp_path):
    """fp32 on the CPU: the training path and the plain forwards agree far inside the fp32
    tolerance's floor (measured: below 1e-5 for every setup; a broken mask: about 0.1). bf16
    mixed (its training path against plain fp32 forwards): inside the bf16 floor (measured 0.034
    on 6 responses of 40-200 tokens)."""
    rows = train(compose(BASE + SETUPS[setup]), tmp_path / "run")
    first = rows[0]
    checked = {k: v for k, v in first.items() if k.startswith("self_check")}
    print(setup, checked)
    assert first["step"] == 1 and first["self_check/responses"] >= 2, checked
    if setup == "bf16":
        assert first["precision"] == "bf16" and 0.0 < first["self_check/max_abs_diff"] <= 0.2 < TOLERANCES["bf16"][1]
    else:
        assert 0.0 <= first["self_check/max_abs_diff"] <= 1e-4 < TOLERANCES["fp32"][1], checked
    assert first["loss"] == first["loss"], first


def _break_the_mask(monkeypatch):
    """Responses see each other: every segment id becomes the prompt's (the training path only;
    the plain forwards never build a pptrain mask)."""
    import ppo_train.scoring
    from ppo_train.masks import build_mask

    monkeypatch.setattr(ppo_train.scoring, "build_mask", lambda doc, seg, backend: build_mask(doc, seg * 0, backend))


def test_a_broken_mask_stops_the_run_in_one_line_unless_the_check_is_off(monkeypatch, tmp_path):
    _break_the_mask(monkeypatch)
    with pytest.raises(SelfCheckFailed) as err:
        train(compose(BASE), tmp_path / "checked")
    message = str(err.value)
    print(message)
    assert "\n" not in message, message
    for part in ("on cpu", "attention kernel sdpa", "precision fp32", "difference", "tolerance",
                 "trainer.self_check=false"):
        assert part in message, (part, message)
    assert not (tmp_path / "checked" / "metrics.jsonl").read_text(), "stopped before the first update"
    rows = train(compose(BASE + ["trainer.self_check=false"]), tmp_path / "unchecked")
    assert [r["step"] for r in rows] == [1] and rows[0]["pairs"] > 0, rows
    assert not [k for k in rows[0] if k.startswith("self_check")], rows[0]


def test_unmasked_layout_is_skipped_and_says_so(tmp_path):
    rows = train(compose(BASE + ["layout=unmasked", "model.lora.enabled=true", "loss=sft"]), tmp_path / "run")
    assert rows[0]["self_check"] == SKIPPED == "skipped: layout=unmasked is inexact by design", rows[0]
    assert "self_check/max_abs_diff" not in rows[0], rows[0]


def test_the_check_changes_no_number(tmp_path):
    """No gradients, eval mode (no dropout) and the random generators forked: a run with LoRA
    dropout (which draws random numbers in train mode) trains bit for bit alike with the check
    on and off."""
    common = BASE[1:] + ["dataset.num_rows=24", "trainer.max_steps=2", "trainer.lr=1e-3", "model.lora.enabled=true",
                         "model.lora.dropout=0.1", "loss=simpo"]
    on = train(compose(common), tmp_path / "on")
    off = train(compose(common + ["trainer.self_check=false"]), tmp_path / "off")
    keys = ("loss", "rewards/margins", "logps/chosen", "logps/rejected")
    assert len(on) == len(off) == 2 and on[0]["self_check/responses"] >= 2
    for a, b in zip(on, off):
        for key in keys:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert on[1]["loss"] != on[0]["loss"], "the update moved the loss"


def test_a_resumed_start_checks_again_and_records_it_in_its_first_row(tmp_path):
    """Every start checks (a resume may run on another machine): the resumed process's first
    row (step 2) carries its own result; the kept row of step 1 keeps the first start's."""
    run = tmp_path / "run"
    base = [a for a in BASE if not a.startswith(("trainer.max_steps", "trainer.save_every"))]
    first = train(compose(base + ["trainer.max_steps=2", "trainer.save_every=1"]), run)
    assert "self_check/responses" in first[0] and "self_check/responses" not in first[1], first
    shutil.rmtree(run / "checkpoints" / "step-2")  # as if killed during step 2 (its final checkpoint)
    resumed = train(compose(base + ["trainer.max_steps=2", "trainer.save_every=1", "trainer.resume=auto"]), run)
    assert [r["step"] for r in resumed] == [1, 2], resumed
    assert resumed[0] == first[0] and resumed[1]["self_check/responses"] >= 2, resumed
    assert resumed[1]["self_check/max_abs_diff"] <= 1e-4, resumed[1]


def test_self_check_is_not_part_of_the_run_directory_or_the_data_plan():
    """Turning the check off changes neither the run directory (a resume with it off finds the
    run) nor what a resume compares (checkpoint.plan_identity)."""
    on = compose(["trainer.lr=1e-4"], with_hydra=True)
    off = compose(["trainer.lr=1e-4", "trainer.self_check=false"], with_hydra=True)
    assert off.trainer.self_check is False and on.trainer.self_check is True
    assert on.hydra.run.dir == off.hydra.run.dir, (on.hydra.run.dir, off.hydra.run.dir)
