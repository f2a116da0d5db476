"""Checkpoints: save atomically, find the newest complete one, restore the trainer state.

Layout of `<run>/checkpoints/step-<N>/`:
  ds/            DeepSpeed's checkpoint (model, optimizer, scheduler; ZeRO partitions per rank)
  trainer.json   step, epoch, data position (the plans are a pure function of seed and epoch,
                 so the step number is the data position), the reference-cache fingerprint
  rng.pt         torch/numpy/python RNG states of rank 0 (tensors only: torch.load weights_only=True)
  COMPLETE       written last; a folder without it is an interrupted save and is ignored

Every save goes to `tmp-step-<N>` and is renamed into place only when complete, so a crash
mid-save leaves the previous checkpoint whole; the oldest beyond `trainer.keep_last` are removed.
The folder must be on a file system that every rank sees (multi-node: a shared one).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / "COMPLETE").is_file():
                found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint of this run (None if there is none); a path: that one."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser().resolve()
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"trainer.resume={resume!r}: not a complete checkpoint folder (no COMPLETE file)")
    return path


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": torch.tensor(np.random.get_state()[2]),
             "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: Path, step: int, epoch: int, extra: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    dist = engine.dist
    root = checkpoint_root(run_dir)
    final, tmp = root / f"step-{step}", root / f"tmp-step-{step}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save_checkpoint(tmp / "ds")
    engine.barrier()
    if dist.is_main:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "epoch": epoch, **extra}, indent=2))
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "COMPLETE").write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


def load(engine, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG; return trainer.json."""
    engine.load_checkpoint(path / "ds")
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "trainer.json").read_text())
