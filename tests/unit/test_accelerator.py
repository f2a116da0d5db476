"""DeepSpeed's accelerator follows `trainer.device` (issue: on a machine with a GPU, DeepSpeed
picked CUDA by itself under trainer.device=cpu, moved the model to cuda:N while the batches
stayed on the CPU, and the first forward failed). This machine has no GPU, so DeepSpeed's own
choice of CUDA is forced the way a GPU machine makes it: DS_ACCELERATOR=cuda in the environment
(before the fix: `AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO, child_env


def _python(code: str, tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**child_env(), "DS_ACCELERATOR": "cuda"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_engine_runs_on_the_cpu_after_deepspeed_chose_cuda(tmp_path):
    """DeepSpeed imported first (it chooses its accelerator on import), then a CPU run."""
    proc = _python(f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        assert get_accelerator().device_name() == "cuda", get_accelerator().device_name()
        import torch
        from ppo_train.cli import compose
        from ppo_train.dist import init_distributed
        from ppo_train.engine import Engine
        dist = init_distributed("cpu")
        engine = Engine(torch.nn.Linear(4, 1), compose(["trainer.grad_accum=1"]).trainer, 10, dist)
        loss = engine(torch.ones(2, 4)).sum()
        engine.backward(loss)
        engine.step()
        print("devices", get_accelerator().device_name(), engine.engine.device, next(engine.module.parameters()).device)
        """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "devices cpu cpu cpu" in proc.stdout, proc.stdout


def test_default_job_trains_on_the_cpu_when_deepspeed_would_pick_cuda(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ppo_train", f"hydra.run.dir={run_dir}", "logging.progress=false",
                           "dataset.num_rows=8", "trainer.max_steps=1", "trainer.save_model=false"],
                          cwd=tmp_path, env={**child_env(), "DS_ACCELERATOR": "cuda"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1
