"""Ctrl-C under the deepspeed launcher, on the CPU with two ranks: the terminal's SIGINT reaches
every process of the group (launcher and ranks), then the launcher SIGTERMs each rank and waits
30 s before a SIGKILL. The ranks finish their step, save one checkpoint together and exit with a
line that says how to resume; the same command with trainer.resume=auto continues from it."""

from __future__ import annotations

from tests.conftest import child_env  # noqa: E402

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ppo_train.dist import free_port

ARGS = ["logging.progress=false", "dataset.num_rows=48", "trainer.max_steps=12", "trainer.save_every=0",
        "packing=none", "trainer.micro_batch_size=1", "trainer.grad_accum=1", "trainer.save_model=false"]


def _launch(run_dir, *extra: str) -> subprocess.Popen:
    env = {**child_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "ppo_train", f"hydra.run.dir={run_dir}", *ARGS, *extra]
    # a session of its own: the test sends the group one SIGINT, as a terminal's Ctrl-C does
    return subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ctrl_c_under_the_deepspeed_launcher_saves_and_resume_auto_continues(tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(run_dir)
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    saved = sorted((run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert len(saved) == 1, out[-4000:]
    step = int(saved[0].parent.name.split("-")[1])
    assert 2 <= step < 12 and "the same command with trainer.resume=auto continues from it" in out, out[-4000:]
    assert _steps(run_dir) == list(range(1, step + 1))

    resumed = _launch(run_dir, "trainer.resume=auto")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-4000:]
    assert f"at step {step}" in out and _steps(run_dir) == list(range(1, 13)), out[-4000:]
