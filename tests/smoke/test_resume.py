"""Checkpoints survive: SIGKILL mid-training then trainer.resume=auto gives metrics.jsonl
losses identical (bitwise, CPU, one rank) to an uninterrupted run; SIGTERM saves and exits 0."""

from __future__ import annotations

from tests.conftest import child_env  # noqa: E402

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.smoke.test_recipes import run_pptrain

ARGS = ["trainer.precision=fp32", "dataset.num_rows=160", "trainer.max_steps=8", "trainer.save_every=2", "packing.rows_per_batch=3",
        "packing.row_tokens=768"]


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = child_env()
    args = [sys.executable, "-m", "ppo_train", f"hydra.run.dir={run_dir}", "logging.progress=false", *ARGS, *overrides]
    return subprocess.Popen(args, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(proc: subprocess.Popen, metrics: Path, rows: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return
        assert proc.poll() is None, f"the run ended before step {rows}: {proc.communicate()[1][-3000:]}"
        time.sleep(0.05)
    raise TimeoutError(f"no step {rows} within {timeout} s")


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _user_command(*overrides: str) -> list[str]:
    """What a user types: no hand-set run directory (it follows from the overrides)."""
    return [sys.executable, "-m", "ppo_train", "logging.progress=false", *ARGS, *overrides]


def _only_run_dir(cwd: Path) -> Path:
    found = list((cwd / "outputs" / "tiny_dpo").iterdir())
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow  # 55 s; the default suite resumes bit for bit in test_damaged_newest_... and test_finished_runs
def test_sigkill_then_the_same_command_with_resume_auto_continues(tmp_path):
    """SIGKILL at a random step after the first checkpoint, then the literal same command plus
    trainer.resume=auto: the run continues in its own directory, bit for bit."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    for cwd in (full, killed):
        cwd.mkdir()
    done = subprocess.run(_user_command(), cwd=full, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kill_after = random.Random().randint(3, 7)  # steps written before the kill (a checkpoint every 2)
    print(f"killing after step {kill_after}")
    proc = subprocess.Popen(_user_command(), cwd=killed, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (killed / "outputs").exists() or not list((killed / "outputs" / "tiny_dpo").glob("*/metrics.jsonl")):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    run_dir = _only_run_dir(killed)
    wait_for_rows(proc, run_dir / "metrics.jsonl", kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(losses(run_dir)) < 8, "the run finished before the kill"
    resumed = subprocess.run(_user_command("trainer.resume=auto"), cwd=killed, env=child_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _only_run_dir(killed) == run_dir and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    want, got = losses(_only_run_dir(full)), losses(run_dir)
    assert got == want, f"resumed {got}\nuninterrupted {want}"
    assert not list((run_dir / "checkpoints").glob("tmp-*")), "an unfinished save was left behind"


def test_ctrl_c_under_a_launcher_saves_a_checkpoint_and_exits_zero(tmp_path):
    """Ctrl-C under the deepspeed launcher: the terminal's SIGINT, then the launcher's SIGTERM
    (a second signal used to abort without saving)."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, "trainer.save_every=0")
    wait_for_rows(proc, run_dir / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    done = losses(run_dir)
    assert (run_dir / "checkpoints" / f"step-{done[-1][0]}" / "COMPLETE").is_file(), err[-2000:]
    assert "stopped by a signal" in err and not (run_dir / "model").exists()
    run_pptrain(run_dir, *ARGS, "trainer.save_every=0", "trainer.resume=auto")
    assert [s for s, _ in losses(run_dir)] == list(range(1, 9))


def _limit_file_size() -> None:
    import resource

    # any file written past 4 MiB fails with EFBIG ("File too large"; Python ignores SIGXFSZ):
    # the tiny model's checkpoint files are larger, everything else the run writes is smaller
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))


@pytest.mark.slow  # 24 s; the default suite writes a failed export in test_finished_runs
def test_a_save_that_cannot_be_written_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    small = ["dataset.num_rows=40", "packing.row_tokens=1024", "trainer.save_every=2"]
    run_pptrain(run_dir, *small, "trainer.max_steps=3", "trainer.save_model=false")
    args = [sys.executable, "-m", "ppo_train", f"hydra.run.dir={run_dir}", "logging.progress=false", *small,
            "trainer.max_steps=5", "trainer.resume=auto"]
    proc = subprocess.run(args, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=_limit_file_size)
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("pptrain: could not save the checkpoint of step 4"), proc.stderr[-3000:]
    assert "a file-size limit (ulimit -f) of 4.0 MiB is set" in message, message  # torch.save hides EFBIG
    assert f"{run_dir / 'checkpoints' / 'step-3'} is intact" in message, message  # the final one of 3 steps
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-3"]
    run_pptrain(run_dir, *small, "trainer.max_steps=5", "trainer.resume=auto")  # the limit gone: it goes on
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4, 5]
    # a failed export: tests/smoke/test_finished_runs.py (the checkpoint before it is written first)


def _pptrain(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "ppo_train", f"hydra.run.dir={run_dir}", "logging.progress=false", *overrides]
    return subprocess.run(args, cwd=run_dir.parent, env=child_env(), capture_output=True, text=True, timeout=600)


SMALL = ["trainer.precision=fp32", "dataset.num_rows=40", "packing.row_tokens=1024", "trainer.save_every=2", "trainer.max_steps=6",
         "trainer.save_model=false"]


@pytest.mark.slow  # 21 s; the default suite resumes from checkpoints in test_finished_runs and test_resume_errors
def test_damaged_newest_checkpoint_and_torn_metrics_line_fall_back(tmp_path):
    run_dir = tmp_path / "run"
    run_pptrain(run_dir, *SMALL, "trainer.keep_last=3")  # checkpoints at steps 2, 4 and 6 (the final one)
    full = losses(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    shutil.rmtree(run_dir / "checkpoints" / "step-6")  # as if killed during step 6
    (run_dir / "finished.json").unlink()
    shard = next((run_dir / "checkpoints" / "step-4" / "ds").rglob("*optim_states.pt"), None) or next(
        (run_dir / "checkpoints" / "step-4" / "ds").rglob("*.pt"))
    shard.unlink()  # a lost optimizer shard: COMPLETE is still there
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"loss": 0.69, "ste')  # a kill in the middle of a write
    proc = _pptrain(run_dir, *SMALL, "trainer.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped the damaged checkpoint {run_dir / 'checkpoints' / 'step-4'}: 1 file(s) missing" in proc.stderr
    assert "dropped 1 line(s) that do not parse" in proc.stderr, proc.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-2'} at step 2" in proc.stderr
    assert losses(run_dir) == full  # steps 3..6 trained again from step 2: bit for bit


def test_resume_errors_are_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "half").mkdir()
    proc = _pptrain(run_dir, *SMALL, f"trainer.resume={run_dir / 'half'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"pptrain: trainer.resume='{run_dir / 'half'}': not a complete checkpoint folder"), proc.stderr[-2000:]
    proc = _pptrain(run_dir, *SMALL, "trainer.max_steps=1", "trainer.resume=auto")
    assert proc.returncode == 0 and "no complete checkpoint in" in proc.stderr, proc.stderr[-3000:]
