"""scripts/gpu_check.py, the unattended first-GPU command, on the CPU: every step's command is a
valid pptrain configuration, a missing program or a step past its time cap is recorded and the
next step still runs (a bare `torchrun` missing from PATH used to kill the script before it wrote
anything), and without a GPU it writes its report and exits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ppo_train.cli import compose
from ppo_train.config_check import validate

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def test_every_training_step_is_a_valid_configuration(tmp_path):
    (tmp_path / "tiny_flex" / "model").mkdir(parents=True)  # what the tiny_flex_bf16 step exports
    trained = 0
    for step in gpu_check.steps(tmp_path, gpus=2):
        assert "torchrun" not in step.command, step.command  # not on PATH under make (no venv activated)
        if step.command[1:3] == ["-m", "ppo_train"]:
            overrides = [a for a in step.command[3:] if not a.startswith("hydra.")]
            validate(compose([*overrides, "run_name=gpu_check"]))
            trained += 1
    assert trained == 4


def test_failures_and_time_caps_are_recorded_and_the_next_step_runs(tmp_path):
    py = sys.executable
    todo = [gpu_check.Step("slow", 1, [py, "-c", "import time; time.sleep(30)"]),
            gpu_check.Step("missing", 10, [str(tmp_path / "no-such-program")]),
            gpu_check.Step("crash", 10, [py, "-c", "raise SystemExit(3)"]),
            gpu_check.Step("fine", 10, [py, "-c", "print('hello')"])]
    results = gpu_check.run_steps(todo, budget=300, out=tmp_path, log=lambda *_: None)
    assert results["slow"]["status"].startswith("not run: out of time") and not results["slow"]["ok"]
    assert results["missing"]["error"].startswith("FileNotFoundError") and not results["missing"]["ok"]
    assert results["crash"]["rc"] == 3 and not results["crash"]["ok"]
    assert results["fine"]["ok"] and "hello" in results["fine"]["tail"]
    late = gpu_check.run_steps([gpu_check.Step("late", 10, [py, "-c", "pass"])], budget=10, out=tmp_path,
                               log=lambda *_: None)
    assert late["late"]["status"].startswith("not run") and not late["late"]["ok"]


def test_without_a_gpu_the_report_is_written(tmp_path):
    out = tmp_path / "gpu_check"
    (out / "tiny_flex" / "checkpoints").mkdir(parents=True)  # an earlier check's run: would make it resume
    (out / "notes.txt").write_text("the user's own file")
    result = gpu_check.main(["--out", str(out)])
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["summary"].startswith("no GPU is visible") and result["gpus"] == 0
    assert not (out / "tiny_flex").exists() and (out / "notes.txt").is_file()
