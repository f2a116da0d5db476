"""Issue 29, items 1-2, below the command line: an extended run's learning-rate schedule, and
what `checkpoint.plan_identity` counts as the job.

A run extended to more steps takes the schedule of its new total from the step it resumes
at (`engine.Engine`): the rate of the next step is recomputed from it after the checkpoint
loads, instead of the saved run's rate (which a LambdaLR keeps, having no function to save).
"""

from __future__ import annotations

import pytest
import torch

from ppo_train import checkpoint
from ppo_train.cli import compose
from ppo_train.dist import init_distributed
from ppo_train.engine import Engine, lr_lambda

LR = 1e-3


def _engine(total: int, schedule: str, warmup_ratio: float) -> Engine:
    torch.manual_seed(0)
    t = compose(["trainer.grad_accum=1", f"trainer.lr={LR}", f"trainer.schedule={schedule}",
                 f"trainer.warmup_ratio={warmup_ratio}"]).trainer
    return Engine(torch.nn.Linear(4, 1), t, total, init_distributed("cpu"))


def _steps(engine: Engine, n: int) -> list[float]:
    """The rate each of `n` optimizer steps ran with."""
    used = []
    for _ in range(n):
        used.append(engine.optimizer.param_groups[0]["lr"])
        engine.backward(engine(torch.ones(2, 4)).sum())
        engine.step()
    return used


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_an_extended_run_follows_the_schedule_of_its_new_total(tmp_path, schedule):
    """4 steps of a 4-step run (warmup 1), then the run extended to 8 (warmup 2): steps 5-8
    run with the 8-step schedule's rates at steps 5-8, not with the 4-step schedule's (which has
    decayed to 0 at step 4 for linear and cosine)."""
    first = _engine(4, schedule, 0.25)
    used = _steps(first, 4)
    old = lr_lambda(schedule, 1, 4)
    assert used == pytest.approx([LR * old(k) for k in range(4)], rel=0, abs=0)
    first.save_checkpoint(tmp_path / "ds")
    if schedule != "constant":
        assert first.lr() == 0.0  # the 4-step schedule ends at 0

    extended = _engine(8, schedule, 0.25)
    extended.load_checkpoint(tmp_path / "ds")
    new = lr_lambda(schedule, 2, 8)
    assert extended.lr() == LR * new(4)
    assert _steps(extended, 4) == [LR * new(k) for k in range(4, 8)]
    assert extended.lr() == LR * new(8)
    if schedule != "constant":
        assert LR * new(4) > 0.0  # the rate rose again from the finished run's 0


def test_resuming_at_the_same_length_keeps_the_saved_rates(tmp_path):
    """The recomputation is the identity when the length did not change (a plain resume stays
    bit for bit the uninterrupted run)."""
    full = _engine(6, "cosine", 0.3)
    want = _steps(full, 6)
    first = _engine(6, "cosine", 0.3)
    _steps(first, 3)
    first.save_checkpoint(tmp_path / "ds")
    again = _engine(6, "cosine", 0.3)
    again.load_checkpoint(tmp_path / "ds")
    assert _steps(again, 3) == want[3:]
    assert [p.detach().clone() for p in again.module.parameters()][0].tolist() == \
        [p.detach().clone() for p in full.module.parameters()][0].tolist()


BASE = ["trainer.grad_accum=1"]


def _identity(*overrides: str, world: int = 1) -> dict:
    return checkpoint.job_identity(compose([*BASE, *overrides]), world)


@pytest.mark.parametrize("override, key", [
    ("loss=simpo", "loss.name"), ("loss.beta=0.2", "loss.beta"), ("loss.variant=ipo", "loss.variant"),
    ("trainer.lr=0.01", "trainer.lr"), ("trainer.schedule=cosine", "trainer.schedule"),
    ("trainer.warmup_ratio=0.2", "trainer.warmup_ratio"), ("trainer.weight_decay=0.1", "trainer.weight_decay"),
    ("trainer.adam_betas=[0.9,0.95]", "trainer.adam_betas"), ("trainer.adam_eps=1e-6", "trainer.adam_eps"),
    ("trainer.max_grad_norm=0.5", "trainer.max_grad_norm"), ("trainer.precision=bf16", "trainer.precision"),
    ("trainer.zero_stage=3", "trainer.zero_stage"), ("model.from_config.num_hidden_layers=3", "model.from_config"),
    ("model.lora.enabled=true", "model.lora.enabled"), ("model.lora.r=8", "model.lora.r"),
    ("reference.name_or_path=/elsewhere/ref", "reference.name_or_path"),
])
def test_every_key_that_changes_the_optimization_is_part_of_the_job(override, key):
    before, after = _identity(), _identity(override)
    changed = [k for k in {**before, **after} if before.get(k) != after.get(k)]
    assert key in changed and (override == "loss=simpo" or changed == [key]), changed  # another loss: its own keys
    change = checkpoint.plan_changes({"job": before}, {"job": after})
    assert any(c.startswith(f"{key} ") for c in change), change


@pytest.mark.parametrize("override", [
    "trainer.max_steps=99", "trainer.epochs=3", "trainer.save_every=7", "trainer.save_every_minutes=5",
    "trainer.keep_last=5", "trainer.log_every=3", "trainer.eval_every=2", "trainer.save_model=false",
    "trainer.self_check=false", "trainer.gradient_checkpointing=true", "trainer.resume=auto",
    "model.attention=sdpa", "model.logits_chunk=64", "model.lora.merge_on_export=false", "reference.live=true",
])
def test_what_an_extension_or_a_memory_setting_changes_is_not(override):
    assert _identity(override) == _identity()


def test_auto_zero_stage_is_compared_resolved():
    """auto is 0 in one process and 3 across several: the resolved stage is the job's."""
    assert _identity("trainer.zero_stage=auto")["trainer.zero_stage"] == _identity("trainer.zero_stage=0")[
        "trainer.zero_stage"] == "0"
    assert _identity("trainer.zero_stage=auto", world=2)["trainer.zero_stage"] == "3"


def test_a_checkpoint_saved_before_the_job_was_recorded_is_compared_on_its_data_plan_only():
    now = {"examples": 3, "job": _identity("loss=simpo")}
    assert checkpoint.plan_changes({"examples": 3}, now) == []
    assert checkpoint.plan_changes({"examples": 3, "job": {"loss.name": '"dpo"'}}, now) == [
        'loss.name "dpo" -> "simpo"']
