"""Runtime behaviour: the live reference gives the cached reference's losses; a non-finite
loss stops the run naming the step and the source rows, or is skipped and counted."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ppo_train.cli import compose
from ppo_train.train import train

BASE = ["dataset.num_rows=40", "trainer.max_steps=3", "logging.progress=false", "run_name=t",
        "trainer.save_model=false", "packing.row_tokens=1024"]


def losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


def test_live_reference_equals_cached_reference(tmp_path):
    cached = train(compose(BASE), tmp_path / "cached")
    live = train(compose(BASE + ["reference.live=true"]), tmp_path / "live")
    assert not (tmp_path / "live" / "reference_logps.safetensors").exists()
    for a, b in zip(losses(cached), losses(live)):
        assert abs(a - b) <= 1e-6, (losses(cached), losses(live))
    assert abs(losses(cached)[1] - 0.6931471805599453) > 1e-4, "step 2 should have moved off ln 2"


def _poison_reference(run_dir):
    path = run_dir / "reference_logps.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, sums, counts = f.metadata(), f.get_tensor("sums"), f.get_tensor("counts")
    sums[:] = float("nan")
    save_file({"sums": sums, "counts": counts}, str(path), metadata=meta)


def test_nonfinite_loss_stops_with_step_and_rows_or_is_skipped(tmp_path):
    run_dir = tmp_path / "run"
    train(compose(BASE + ["trainer.max_steps=1"]), run_dir)
    _poison_reference(run_dir)  # same fingerprint: the next run reuses the poisoned table
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 \(source rows \[\d+"):
        train(compose(BASE), run_dir)
    rows = train(compose(BASE + ["trainer.on_nonfinite=skip"]), run_dir)
    steps = [r for r in rows if "loss" in r]
    assert [r["skipped_nonfinite"] for r in steps] == [1, 2, 3]
    assert all(r["loss"] is None and r["pairs"] > 0 for r in steps), steps
