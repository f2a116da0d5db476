"""Checkpoints: save atomically, find the newest complete one, restore the trainer state.

Layout of `<run>/checkpoints/step-<N>/`:
  ds/            DeepSpeed's checkpoint (model, optimizer, scheduler; ZeRO partitions per rank)
  trainer.json   step, epoch, data position (the plans are a pure function of seed and epoch,
                 so the step number is the data position), the reference-cache fingerprint
  rng.pt         torch/numpy/python RNG states of rank 0 (tensors only: torch.load weights_only=True)
  COMPLETE       written last; a folder without it is an interrupted save and is ignored

The last step of a run always saves one (also with trainer.save_every=0): a finished run is a
checkpoint, and a larger trainer.max_steps (or trainer.epochs) with trainer.resume=auto
continues it. `<run>/finished.json` is written after the final checkpoint and the export: it
names the step the run finished at, so that the same command run again does nothing
(`check_finished`).

Every save goes to `tmp-step-<N>` and is renamed into place only when complete, so a crash
mid-save leaves the previous checkpoint whole; the oldest beyond `trainer.keep_last` are removed
only after the new one is in place. A save that fails (disk full, permissions) says why on every
rank and leaves the earlier checkpoints as they were.
The folder must be on a file system that every rank sees (multi-node: a shared one).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ppo_train import fileio
from ppo_train.dist import gather_objects
from ppo_train.errors import WRITE_ERRORS, ResumeError, SaveFailed

STEP_DIR = re.compile(r"^step-(\d+)$")
FINISHED = "finished.json"


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


def manifest(folder: Path) -> dict[str, int]:
    """Every file below `folder` (relative path -> size in bytes)."""
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def plan_identity(cfg, units, dist) -> dict:
    """What a resume must not change. The data plan fixes the step-to-data mapping: the tokens
    of every unit, the layout, the packer and its budget, the micro-batch and accumulation
    settings, the seed and the world size (under another value the step number would map onto
    other examples). The job (`job_identity`) fixes what each step does with them."""
    p = cfg.packing
    budget = {"packing.row_tokens": p.row_tokens, "packing.rows_per_batch": p.rows_per_batch} if p.name == "ffd" \
        else {"trainer.micro_batch_size": cfg.trainer.micro_batch_size}
    return {"data tokens": hashlib.sha256(units.digest().encode()).hexdigest()[:16], "examples": len(units), "layout.name": str(cfg.layout.name),
            "packing.name": str(p.name), **budget, "trainer.grad_accum": cfg.trainer.grad_accum,
            "trainer.seed": cfg.trainer.seed, "world size": dist.world_size,
            "dataset": {k: str(v) for k, v in cfg.dataset.items()}, "model.tokenizer": str(cfg.model.tokenizer
                                                                                         or cfg.model.name_or_path),
            "job": job_identity(cfg, dist.world_size)}


# the trainer keys that change the optimization; the step counts (max_steps, epochs), when to
# save, log or evaluate, the device and the memory settings (offload, gradient checkpointing,
# which compute the same numbers) are not part of a job: an extension changes them freely
JOB_TRAINER_KEYS = ("lr", "schedule", "warmup_ratio", "weight_decay", "adam_betas", "adam_eps", "max_grad_norm",
                    "precision")
JOB_MODEL_KEYS = ("name_or_path", "from_config", "gguf_file", "revision", "train_vision_tower")


def job_identity(cfg, world_size: int) -> dict[str, str]:
    """Every key that changes the optimization, as `key -> value` (JSON text, resolved): the
    loss and all its parameters, the optimizer and schedule, the precision, the resolved ZeRO
    stage, the policy (and its LoRA settings) and the reference model. A resume under another
    value would continue another job under the old run's name (and DeepSpeed would keep the
    saved learning rate), so it is refused naming the key."""
    from ppo_train.engine import zero_stage

    def plain(value) -> str:
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
        return json.dumps(str(value) if isinstance(value, Enum) else value, sort_keys=True)

    t, m = cfg.trainer, cfg.model
    keys = {f"loss.{k}": v for k, v in cfg.loss.items()}
    keys.update({f"trainer.{k}": t[k] for k in JOB_TRAINER_KEYS})
    keys["trainer.zero_stage"] = zero_stage(t, world_size)
    keys.update({f"model.{k}": m[k] for k in JOB_MODEL_KEYS})
    keys.update({f"model.lora.{k}": v for k, v in m.lora.items() if k != "merge_on_export"})
    keys.update({f"reference.{k}": cfg.reference[k] for k in ("name_or_path", "gguf_file")})
    return {k: plain(v) for k, v in keys.items()}


def plan_changes(saved: dict, now: dict) -> list[str]:
    """`key old -> new` for every part of the data plan or the job that differs (empty: the
    same job). A checkpoint saved before a key was recorded is not compared on that key."""
    changes = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in now
               if k not in ("dataset", "model.tokenizer", "data tokens", "job") and saved.get(k) != now.get(k)]
    old_job = saved.get("job", {})
    changes += [f"{k} {old_job[k]} -> {v}" for k, v in now.get("job", {}).items() if k in old_job and old_job[k] != v]
    if saved.get("data tokens") != now.get("data tokens"):
        keys = [f"dataset.{k} {saved['dataset'].get(k)!r} -> {v!r}" for k, v in now["dataset"].items()
                if saved.get("dataset", {}).get(k) != v]
        if saved.get("model.tokenizer") != now.get("model.tokenizer"):
            keys.append(f"model.tokenizer {saved.get('model.tokenizer')!r} -> {now.get('model.tokenizer')!r}")
        changes.append("the training data (" + ("; ".join(keys) if keys else
                       "same settings, other tokens: the data file or the tokenizer changed") + ")")
    return changes


def _unusable(path: Path) -> str | None:
    """Why the complete checkpoint `path` cannot be loaded (None if every file is there)."""
    try:
        meta = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer.json unreadable ({err})"
    files = meta.get("files")
    if files is None:
        return None  # written before manifests existed: nothing to compare
    have = manifest(path)
    missing = [f for f in files if f not in have]
    short = [f for f, size in files.items() if f in have and have[f] != size]
    if missing or short:
        return (f"{len(missing)} file(s) missing ({', '.join(missing[:3])}), "
                f"{len(short)} of another size ({', '.join(short[:3])})")
    return None


def will_resume(run_dir: Path, setting: str | None) -> bool:
    """Before anything is written: whether this start continues a checkpoint. A fresh start
    (trainer.resume=null) in a directory that holds checkpoints is refused, so that one run's
    checkpoints are never mixed with another's (keep_last would keep the older run's later
    steps, and trainer.resume=auto would pick them up); a finished run is let through, for
    `check_finished` to decide once the step count is known."""
    found = complete_checkpoints(run_dir)
    if setting is None and found and finished_at(run_dir) is None:
        raise ResumeError(f"{run_dir} holds checkpoints of an earlier run (newest: {found[-1].name}); "
                          "trainer.resume=auto continues it; to start over, delete "
                          f"{checkpoint_root(run_dir)} or give the run another directory (hydra.run.dir=...)")
    return setting is not None and (setting != "auto" or bool(found))


def finished_at(run_dir: Path) -> dict | None:
    """finished.json of a run whose last step is still its newest complete checkpoint, else
    None (never finished, or extended since: a newer checkpoint exists, or that one is gone)."""
    try:
        meta = json.loads((run_dir / FINISHED).read_text())
    except (OSError, ValueError):
        return None
    found = complete_checkpoints(run_dir)
    if not isinstance(meta, dict) or not found or found[-1].name != f"step-{meta.get('step')}":
        return None
    return meta


def mark_finished(run_dir: Path, step: int, exported: bool) -> None:
    """Rank 0, after the final checkpoint and the export: the run is complete at `step`."""
    fileio.write_text(run_dir / FINISHED, json.dumps({"step": step, "model": exported}, indent=2) + "\n")


def check_finished(run_dir: Path, setting: str | None, total_steps: int, want_model: bool,
                   identity: dict) -> int | None:
    """A run directory that holds a finished run: the step it finished at when this start has
    nothing to do (the same command again, with or without trainer.resume=auto: the caller says
    so and exits), None when it goes on (an extension with trainer.resume=auto, or an explicit
    trainer.resume=PATH). The finished run must be the same job (`plan_identity`). Refused
    without trainer.resume: a larger step count (it would start over and overwrite the model)."""
    meta = finished_at(run_dir)
    if meta is None or setting not in (None, "auto"):
        return None
    step, path = meta["step"], checkpoint_root(run_dir) / f"step-{meta['step']}"
    try:
        saved = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError):
        saved = {}  # damaged: resume() names it and falls back
    _refuse_another_plan(path, saved, identity)
    if step >= total_steps and (meta.get("model") or not want_model):
        return step
    if setting is None:
        wanted = (f"asks for {total_steps} steps" if step < total_steps
                  else "asks for the exported model (trainer.save_model=true), which that run did not write")
        raise ResumeError(f"{run_dir} holds a run that finished at step {step}; this command {wanted}: the same "
                          "command with trainer.resume=auto continues it; to start over, delete the directory or "
                          "give the run another one (hydra.run.dir=...)")
    return None


def _candidates(run_dir: Path, setting: str | None) -> list[Path]:
    """The checkpoints `trainer.resume` allows, newest first (auto: every complete one of the run)."""
    if setting is None:
        return []
    if setting == "auto":
        return complete_checkpoints(run_dir)[::-1]
    path = Path(setting).expanduser().resolve()
    if not (path / "COMPLETE").is_file():
        found = [p.name for p in complete_checkpoints(path.parent.parent)] if path.parent.name == "checkpoints" else []
        raise ResumeError(f"trainer.resume={setting!r}: not a complete checkpoint folder (no COMPLETE file: the "
                          "save was interrupted or it is not a checkpoint)"
                          + (f"; complete ones beside it: {found}" if found else ""))
    return [path]


def _refuse_another_plan(path: Path, meta: dict, identity: dict) -> None:
    changes = plan_changes(meta["plan"], identity) if "plan" in meta else []
    if changes:
        raise ResumeError(f"trainer.resume: {path} was trained as another job ({'; '.join(changes)}): from step "
                          f"{meta['step']} this run would not train what that run would have (other examples, the "
                          "same ones in other micro-batches and optimizer steps, or another loss, optimizer or "
                          "model). Resume with the settings it was saved with, or start a new run directory")


def check_plan(run_dir: Path, setting: str | None, identity: dict) -> None:
    """Before the model loads: refuse to continue a checkpoint of another job (another data
    plan or another optimization: `plan_identity`), naming each change."""
    for path in _candidates(run_dir, setting):
        try:
            meta = json.loads((path / "trainer.json").read_text())
        except (OSError, ValueError):
            continue  # damaged: resume() names it and falls back
        _refuse_another_plan(path, meta, identity)
        return


def resume(engine, run_dir: Path, setting: str | None, identity: dict) -> int | None:
    """Restore the checkpoint that `trainer.resume` names and return its step; None when
    training starts fresh. `auto` takes the newest complete checkpoint of the run directory and
    falls back to the one before it when the newest is damaged (each damaged one is named); a
    checkpoint of another job is refused (check_plan)."""
    dist = engine.dist
    candidates = _candidates(run_dir, setting)
    if setting == "auto" and not candidates:
        if dist.is_main:
            print(f"pptrain: trainer.resume=auto: no complete checkpoint in {checkpoint_root(run_dir)}; "
                  "starting at step 0", file=sys.stderr)
        return None
    damaged = []
    for path in candidates:
        problem = _unusable(path)
        if problem is None:
            meta = json.loads((path / "trainer.json").read_text())  # readable: _unusable checked it
            _refuse_another_plan(path, meta, identity)
            problem = _attempt_load(engine, path)
        problem = next((p for p in gather_objects(problem, dist) if p), None)  # every rank falls back together
        if problem is None:
            step = meta["step"]
            if dist.is_main:
                for name, why in damaged:
                    print(f"pptrain: warning: skipped the damaged checkpoint {name}: {why}", file=sys.stderr)
                print(f"pptrain: resumed from {path} at step {step}", file=sys.stderr)
            return step
        damaged.append((path, problem))
    if not damaged:
        return None
    raise ResumeError("trainer.resume: no usable checkpoint: " + "; ".join(f"{p}: {why}" for p, why in damaged))


def _attempt_load(engine, path: Path) -> str | None:
    try:
        load(engine, path)
    except Exception as err:  # noqa: BLE001 - a damaged file can fail in many ways; the next checkpoint is tried
        return f"{type(err).__name__}: {str(err)[:300]}"
    return None


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
    """Collective: every rank calls it. Returns the final checkpoint folder.

    A save that cannot be written (no space, no permission, an I/O error) removes its
    `tmp-step-N` folder, leaves the previous checkpoints untouched and raises SaveFailed on
    every rank, naming the folder and the reason. Free space is checked first against the size
    of the newest checkpoint (or 12 bytes per parameter), so a full disk is found before any
    rank starts writing; an error inside DeepSpeed's own collective save on one rank only
    cannot be caught on the others (they wait in DeepSpeed's barrier until the timeout).
    """
    dist = engine.dist
    root = checkpoint_root(run_dir)
    final, tmp = root / f"step-{step}", root / f"tmp-step-{step}"
    previous = complete_checkpoints(run_dir)

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        need = _folder_bytes(previous[-1]) if previous else 12 * engine.num_parameters()
        free = shutil.disk_usage(tmp).free
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left for the checkpoint: it needs about {_size(need)}, "
                                        f"{_size(free)} free on that file system")

    def finish() -> None:
        torch.save(_rng_state(), tmp / "rng.pt")
        files = manifest(tmp)  # the DeepSpeed files of every rank and rng.pt, checked on resume
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "epoch": epoch, **extra, "files": files}, indent=2))
        (tmp / "COMPLETE").write_text("ok\n")
        fileio.publish(tmp, final)

    error = _agree(_attempt(prepare) if dist.is_main else None, dist)
    if error is None:
        error = _agree(_attempt(lambda: engine.save_checkpoint(tmp / "ds")), dist)
    if error is None:
        error = _agree(_attempt(finish) if dist.is_main else None, dist)
    if error is not None:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no earlier checkpoint"
        raise SaveFailed(f"could not save the checkpoint of step {step} to {final}: {error} ({diagnose(root)}); "
                         f"{kept}. Free space or fix the permissions, then rerun with trainer.resume=auto")
    if dist.is_main:
        for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


def _attempt(action) -> str | None:
    """Run `action`; None on success, else the reason (OSError and its kin: disk, permissions)."""
    try:
        action()
    except WRITE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def _agree(error: str | None, dist) -> str | None:
    """Every rank learns the first rank's error (a collective: it is also the barrier)."""
    return next((e for e in gather_objects(error, dist) if e is not None), None)


def diagnose(folder: Path) -> str:
    """What a failed write's own message may hide (torch.save reports a full disk as a position
    mismatch): the free space, whether the folder is writable, a file-size limit (ulimit -f)."""
    import resource

    where = next((p for p in [folder, *folder.parents] if p.exists()), Path("/"))
    facts = [f"checked after the failure: {_size(shutil.disk_usage(where).free)} free at {where}"]
    if not os.access(where, os.W_OK):
        facts.append(f"{where} is not writable by this user")
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        facts.append(f"a file-size limit (ulimit -f) of {_size(soft)} is set")
    return ", ".join(facts)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def load(engine, path: Path) -> None:
    """Restore model, optimizer, scheduler and RNG (resume() has read trainer.json)."""
    engine.load_checkpoint(path / "ds")
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
