"""Issue 29, items 1-2, from the outside: a finished run is a checkpoint that the same command
leaves alone and a larger trainer.max_steps with trainer.resume=auto extends; a resume under
another job (loss, learning rate, ZeRO stage, ...) is refused naming the key, before anything
is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ppo_train.cli import compose
from ppo_train.engine import lr_lambda
from ppo_train.errors import ResumeError, SaveFailed
import ppo_train.train as train_module
from ppo_train.train import train
from tests.conftest import child_env

LR = 1e-4
SMALL = ["trainer.precision=fp32", "dataset.num_rows=40", "packing.row_tokens=1024", "packing.rows_per_batch=2", "logging.progress=false",
         f"trainer.lr={LR}", "trainer.schedule=linear", "trainer.warmup_ratio=0.25", "trainer.self_check=false"]


def _cli(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "ppo_train", f"hydra.run.dir={run_dir}", *SMALL, *overrides]
    return subprocess.run(args, cwd=run_dir.parent, env=child_env(), capture_output=True, text=True, timeout=600)


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of the run directory with its size and modification time (ns), except what
    Hydra itself writes on each invocation (.hydra/, its log)."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "run.lock"
            and not p.relative_to(run_dir).parts[0] == ".hydra" and p.suffix != ".log"}


def test_the_same_command_leaves_a_finished_run_alone_and_resume_auto_extends_it(tmp_path):
    """The command line for what a user sees (the one line, the exit status); the trainings
    themselves in this process."""
    run_dir = tmp_path / "run"
    rows = _train(run_dir, "trainer.max_steps=4")  # save_every=500: only the final checkpoint
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-4"]
    assert json.loads((run_dir / "finished.json").read_text()) == {"step": 4, "model": True}
    before = _snapshot(run_dir)

    again = _cli(run_dir, "trainer.max_steps=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.strip().splitlines()[-1] == (
        f"pptrain: {run_dir} finished at step 4; a larger trainer.max_steps with trainer.resume=auto extends it; "
        "delete the directory to start over")
    assert _snapshot(run_dir) == before  # nothing retrained, nothing rewritten (make run stays repeatable)
    assert _train(run_dir, "trainer.max_steps=4", "trainer.resume=auto") == rows
    assert _snapshot(run_dir) == before

    longer = _cli(run_dir, "trainer.max_steps=6")  # without resume: would start over and overwrite the model
    assert longer.returncode == 1 and "Traceback" not in longer.stderr, longer.stderr[-3000:]
    assert longer.stderr.strip().splitlines()[-1] == (
        f"pptrain: {run_dir} holds a run that finished at step 4; this command asks for 6 steps: the same command "
        "with trainer.resume=auto continues it; to start over, delete the directory or give the run another one "
        "(hydra.run.dir=...)")
    assert _snapshot(run_dir) == before

    now = _train(run_dir, "trainer.max_steps=6", "trainer.resume=auto")
    assert now[:4] == rows and [r["step"] for r in now] == [1, 2, 3, 4, 5, 6]
    # the lr column is the rate of the next step; an extension follows the 6-step schedule
    # (warmup round(0.25 * 6) = 2) from step 4 on: the 4-step schedule had reached 0
    old, new = lr_lambda("linear", 1, 4), lr_lambda("linear", 2, 6)
    assert [r["lr"] for r in rows] == pytest.approx([LR * old(k) for k in (1, 2, 3, 4)], rel=1e-12, abs=0)
    assert rows[-1]["lr"] == 0.0
    assert [r["lr"] for r in now[4:]] == pytest.approx([LR * new(5), LR * new(6)], rel=1e-12, abs=0)
    assert now[4]["loss"] != rows[3]["loss"]
    assert json.loads((run_dir / "finished.json").read_text()) == {"step": 6, "model": True}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-6"]


def _train(run_dir: Path, *overrides: str) -> list[dict]:
    return train(compose([*SMALL, "run_name=t", *overrides]), run_dir)


def test_save_every_zero_keeps_the_final_state(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "trainer.max_steps=3", "trainer.save_every=0", "trainer.save_model=false")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-3"]
    assert json.loads((run_dir / "finished.json").read_text()) == {"step": 3, "model": False}
    assert not (run_dir / "model").exists()
    rows = _train(run_dir, "trainer.max_steps=3", "trainer.save_every=0", "trainer.save_model=false")
    assert [r["step"] for r in rows] == [1, 2, 3]  # the finished run's rows, nothing trained
    # asking for the model of a run that did not export one: resume=auto exports it, trains nothing
    with pytest.raises(ResumeError, match="asks for the exported model"):
        _train(run_dir, "trainer.max_steps=3")
    rows = _train(run_dir, "trainer.max_steps=3", "trainer.resume=auto")
    assert [r["step"] for r in rows] == [1, 2, 3] and (run_dir / "model" / "config.json").is_file()
    assert json.loads((run_dir / "finished.json").read_text()) == {"step": 3, "model": True}


def test_an_export_that_failed_is_written_by_resume_auto(tmp_path, monkeypatch):
    """The disk fills during the export of an extension (save_pretrained writes part of a file,
    then fails): the error names the final checkpoint, which is intact, and model/ keeps the
    earlier export. The run is not finished: the same command with trainer.resume=auto trains
    nothing and writes the export."""
    from transformers import PreTrainedModel

    run_dir = tmp_path / "run"
    _train(run_dir, "trainer.max_steps=3")
    exported = _snapshot(run_dir / "model")

    def full_disk(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "save_pretrained", full_disk)
        with pytest.raises(SaveFailed) as err:
            _train(run_dir, "trainer.max_steps=4", "trainer.resume=auto")
    assert str(err.value).startswith(f"could not write the model to {run_dir / 'model'}: OSError"), err.value
    assert f"the newest checkpoint {run_dir / 'checkpoints' / 'step-4'} is intact" in str(err.value), err.value
    assert _snapshot(run_dir / "model") == exported and not (run_dir / "model.tmp").exists()
    assert json.loads((run_dir / "finished.json").read_text())["step"] == 3  # older than the newest checkpoint
    with pytest.raises(ResumeError, match=r"holds checkpoints of an earlier run \(newest: step-4\)"):
        _train(run_dir, "trainer.max_steps=4")
    rows = _train(run_dir, "trainer.max_steps=4", "trainer.resume=auto")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert _snapshot(run_dir / "model") != exported
    assert json.loads((run_dir / "finished.json").read_text()) == {"step": 4, "model": True}


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """4 steps with a checkpoint at step 2, as if killed during step 4 (step 2 is the newest)."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    _train(run_dir, "trainer.max_steps=4", "trainer.save_every=2", "trainer.save_model=false")
    (run_dir / "finished.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    return run_dir


@pytest.mark.parametrize("change, named", [
    (["packing=sorted", "trainer.micro_batch_size=3", "dataset.num_rows=41"],  # the data plan
     ["packing.name 'ffd' -> 'sorted'", "trainer.micro_batch_size", "dataset.num_rows '40' -> '41'"]),
    (["loss=simpo", "trainer.lr=0.01"], ["loss.name \"dpo\" -> \"simpo\"", "trainer.lr 0.0001 -> 0.01"]),
    (["trainer.zero_stage=3"], ["trainer.zero_stage 0 -> 3"]),
    (["trainer.adam_betas=[0.9,0.95]", "trainer.precision=bf16"],
     ["trainer.adam_betas [0.9, 0.999] -> [0.9, 0.95]", "trainer.precision \"fp32\" -> \"bf16\""]),
])
def test_a_resume_under_another_job_is_refused_before_the_model_loads(interrupted_run, tmp_path, monkeypatch,
                                                                      change, named):
    """A recipe edited between runs (here: the overrides of the second start) or an explicit
    checkpoint path: refused naming every changed key, before the model loads; nothing of the
    run directory is touched (no mixed losses in metrics.jsonl, no config.resumed.yaml)."""
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted_run, run_dir)
    before = _snapshot(run_dir)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_module, "build_policy", no_model)
    for setting in ("auto", str(run_dir / "checkpoints" / "step-2")):
        with pytest.raises(ResumeError) as err:
            _train(run_dir, "trainer.max_steps=6", "trainer.save_model=false", f"trainer.resume={setting}", *change)
        message = str(err.value)
        assert "was trained as another job" in message, message
        for key in named:
            assert key in message, (key, message)
        assert _snapshot(run_dir) == before
