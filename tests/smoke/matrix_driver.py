"""Run a list of pptrain configurations one after the other on every rank of one torchrun launch
(for test_config_matrix.py: torchrun's start-up is paid once, not per combination).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/smoke/matrix_driver.py SPEC.json

SPEC.json: {"results": "<file>", "run_root": "<folder>", "combos": [{"id": ..., "overrides": [...]}]}.
Each rank composes each combination (ppo_train.cli.compose), checks it at config time (validate,
environment_problems) and calls train(cfg, run_root/id). After each combination the ranks
exchange their outcomes over a process group of their own (so a rank stuck in a training
collective cannot pair up with it), and rank 0 adds {status: ok | refused | error, ...} under
the id to the results file (read first, so a relaunch keeps earlier results). After an error on
any rank the driver stops: the process group may be out of step (a rank left a collective the
other is still in), so the caller starts a fresh launch for the remaining combinations.
A collective that waits longer than COLLECTIVE_TIMEOUT_S fails instead of hanging; the `mfu`
metric's FLOP/s peak is measured once per process, not per combination, and the DeepSpeed
engines that ZeRO-3 runs leave behind are freed after each (release_deepspeed_engines).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

COLLECTIVE_TIMEOUT_S = 120


def cache_peak_flops() -> None:
    """Measure the FLOP/s peak (only the `mfu` metric uses it) once per process, not at every
    train() call: flops.calibrate_peak spends 0.6-0.8 s of GEMMs per run, about a third of a
    one-step tiny run here."""
    from functools import cache

    from ppo_train import flops

    if not hasattr(flops.calibrate_peak, "cache_info"):
        flops.calibrate_peak = cache(flops.calibrate_peak)


def release_deepspeed_engines() -> int:
    """Free the DeepSpeed engines that train() left behind; the number found.

    Under ZeRO-3 every train() call in a process leaks its whole engine (policy, optimizer
    state, reference: about 350 MB for the tiny model; 24 GB after the full one-rank product,
    killed by the OOM killer): pptrain never calls DeepSpeedEngine.destroy(), so the ZeRO-3
    gradient-accumulation hooks (closures held by autograd's C++ nodes, invisible to the cycle
    collector) keep it alive, and DeepSpeed itself keeps the module in the module-level list
    parameter_offload.FWD_MODULE_STACK and in the class-level functools.lru_cache of
    PartitionedParameterCoordinator.__params_to_release. All three are needed to free it. Call
    only between runs (no forward in flight)."""
    import gc

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    gc.collect()
    engines = [o for o in gc.get_objects() if isinstance(o, DeepSpeedEngine)]
    found = len(engines)
    while engines:  # no name left holding one
        engines.pop().destroy()
    parameter_offload.FWD_MODULE_STACK.clear()
    wrapped = getattr(coordinator.PartitionedParameterCoordinator,
                      "_PartitionedParameterCoordinator__params_to_release", None)
    for fn in (wrapped, *(c.cell_contents for c in getattr(wrapped, "__closure__", None) or ())):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
    gc.collect()
    return found


def run_one(overrides: list[str], run_dir: Path, is_main: bool) -> dict:
    from ppo_train.cli import compose
    from ppo_train.config import environment_problems
    from ppo_train.config_check import validate
    from ppo_train.errors import ConfigError
    from ppo_train.train import train

    try:
        cfg = compose(overrides)
        try:
            validate(cfg)
            problems = environment_problems(cfg)
        except ConfigError as err:
            problems = list(err.problems)
        if problems:
            return {"status": "refused", "problems": problems}
        rows = train(cfg, run_dir)
        if not is_main:
            return {"status": "ok"}
        steps = [r for r in rows if "loss" in r]
        if len(steps) != 1 or steps[0]["loss"] is None or not math.isfinite(steps[0]["loss"]):
            return {"status": "error", "error": f"expected one metrics row with a finite loss, got {rows}",
                    "traceback": ""}
        return {"status": "ok", "loss": steps[0]["loss"], "pairs": steps[0].get("pairs")}
    except Exception as err:  # noqa: BLE001 - what this driver is for: report it
        lines = traceback.format_exc().rstrip().splitlines()
        first_line = (str(err).strip().splitlines() or [""])[0]
        return {"status": "error", "error": f"{type(err).__name__}: {first_line}", "traceback": "\n".join(lines[-25:])}


def main(spec_path: str) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as td

    spec = json.loads(Path(spec_path).read_text())
    cache_peak_flops()
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S), verbose=False)
    status_group = td.new_group(backend="gloo", timeout=timedelta(seconds=4 * COLLECTIVE_TIMEOUT_S))
    rank, world = td.get_rank(), td.get_world_size()
    results_file = Path(spec["results"])
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for item in spec["combos"]:
        began = time.perf_counter()
        outcome = run_one(item["overrides"], Path(spec["run_root"]) / item["id"], rank == 0)
        outcome["seconds"] = round(time.perf_counter() - began, 2)
        release_deepspeed_engines()
        everyone: list = [None] * world
        td.all_gather_object(everyone, outcome, group=status_group)
        failed = {str(r): o for r, o in enumerate(everyone) if o["status"] == "error"}
        disagree = len({o["status"] for o in everyone}) > 1
        if rank == 0:
            merged = dict(everyone[0])
            if failed:
                first = failed[min(failed)]
                merged.update(status="error", error=first["error"], traceback=first["traceback"],
                              ranks={r: o["error"] for r, o in failed.items()})
            elif disagree:
                merged.update(status="error", error=f"ranks disagree: {[o['status'] for o in everyone]}",
                              traceback="")
            results[item["id"]] = merged
            tmp = results_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(results_file)
            print(f"matrix: {item['id']}: {merged['status']} ({outcome['seconds']} s)", file=sys.stderr, flush=True)
        if failed or disagree:  # the same decision on every rank
            break
    td.barrier(group=status_group)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
