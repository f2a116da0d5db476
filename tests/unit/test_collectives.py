"""Every collective goes through ppo_train/dist.py, which hands torch.distributed a tensor on
the rank's device (NCCL has no CPU backend: a CPU tensor fails there with "No backend type
associated with device type cpu", which 2-rank gloo tests on the CPU cannot show).

- a source scan: no module but dist.py calls a torch.distributed collective (before this rule
  the reference table was all-reduced on the CPU directly, which this test names);
- the helpers on 2 gloo ranks: sums, maxima, minima, flags and objects come back right, on the
  caller's device and in its dtype.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ppo_train.dist import DistInfo, free_port

PACKAGE = Path(__file__).resolve().parents[2] / "ppo_train"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "gather", "gather_object", "scatter", "scatter_object_list",
               "monitored_barrier"}


def direct_collective_calls(source: str) -> list[str]:
    """`torch.distributed.X(...)` (or through an alias of torch.distributed) for a collective X."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            aliases |= {f"<name>{a.asname or a.name}" for a in node.names if a.name in COLLECTIVES}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES and ast.unparse(func.value) in aliases:
            found.append(f"line {node.lineno}: {ast.unparse(func)}")
        elif isinstance(func, ast.Name) and f"<name>{func.id}" in aliases:
            found.append(f"line {node.lineno}: {func.id}")
    return found


def test_no_module_but_dist_calls_a_collective():
    offenders = {str(path.relative_to(PACKAGE)): calls for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "dist.py" and (calls := direct_collective_calls(path.read_text()))}
    assert offenders == {}, f"collectives outside ppo_train/dist.py: {offenders}"


def test_the_scan_finds_what_it_looks_for():
    """The scan itself: the code that used to all-reduce the reference table on the CPU."""
    old = "import torch\ndef f(sums):\n    torch.distributed.all_reduce(sums)\n"
    assert direct_collective_calls(old) == ["line 3: torch.distributed.all_reduce"]
    assert direct_collective_calls("import torch.distributed as d\nd.barrier()\n") == ["line 2: d.barrier"]
    assert direct_collective_calls("from torch.distributed import all_gather_object\nall_gather_object(x, y)\n")
    assert direct_collective_calls("from ppo_train.dist import reduce\nreduce(t, dist)\n") == []


def _rank(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from ppo_train import dist as d

    info = DistInfo(rank, 2, rank, torch.device("cpu"))
    table = torch.full((2, 3), float(rank + 1), dtype=torch.float64)
    summed = d.reduce(table, info)
    counts = d.reduce(torch.tensor([rank + 3]), info, "max")
    result = {"sum": summed.tolist(), "sum_dtype": str(summed.dtype), "max": counts.tolist(),
              "min": d.reduce_number(rank + 0.5, info, "min"), "any": d.any_rank(rank == 1, info),
              "all": d.all_ranks(rank == 1, info), "anys": d.any_ranks([rank == 1, False, True], info),
              "objects": d.gather_objects({"r": rank}, info),
              "caller_unchanged": table.tolist()}
    torch.save(result, f"{out}/rank{rank}.pt")
    d.barrier(info)
    torch.distributed.destroy_process_group()


def test_helpers_on_two_gloo_ranks(tmp_path):
    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["sum"] == [[3.0] * 3] * 2 and got["sum_dtype"] == "torch.float64", got
        assert got["max"] == [4] and got["min"] == 0.5 and got["any"] is True and got["all"] is False, got
        assert got["objects"] == [{"r": 0}, {"r": 1}] and got["anys"] == [True, False, True], got
        assert got["caller_unchanged"] == [[float(rank + 1)] * 3] * 2, got


def _reference_rank(rank: int, port: int, out: str) -> None:
    """Rank 0's run directory holds a valid cached table, rank 1's does not (a run directory
    that is not on a shared file system)."""
    import datetime
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    from ppo_train import reference
    from ppo_train.cli import compose
    from ppo_train.data.layout import build_units
    from ppo_train.data.schedule import Schedule
    from ppo_train.dist import SINGLE
    from ppo_train.scoring import PolicyModule, Scorer
    from tests.conftest import random_examples, tiny_model

    cfg = compose(["run_name=x", "packing=none"])
    info = DistInfo(rank, 2, rank, torch.device("cpu"))
    units = build_units(random_examples(6, 2), "shared")
    scorer, module = Scorer(units, 0), PolicyModule(tiny_model())
    run_dir = Path(out) / f"run{rank}"
    run_dir.mkdir()
    if rank == 0:  # what an earlier run left in rank 0's directory only
        from omegaconf import OmegaConf

        fp = reference.fingerprint(units, {"reference": OmegaConf.to_container(cfg.reference, resolve=True),
                                           "model": OmegaConf.to_container(cfg.model, resolve=True),
                                           "seed": cfg.trainer.seed, "precision": cfg.trainer.precision,
                                           "layout": cfg.layout.name, "split": "train", "weights": {}})
        plan = Schedule(units, cfg.packing, cfg.trainer.micro_batch_size, cfg.trainer.seed)
        reference.compute_table(module, scorer, plan, SINGLE, fp).save(run_dir)
    calls = []

    def reference_model():
        calls.append(1)
        return module

    if rank == 0:  # the cache is valid: alone, rank 0 would use it
        assert reference.ReferenceTable.load(run_dir, fp) is not None
    table = reference._table(cfg, reference_model, scorer, info, run_dir, "train", {})
    torch.save({"computed": len(calls), "sums": table.sums}, f"{out}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_a_reference_cache_miss_on_one_rank_recomputes_on_every_rank(tmp_path):
    """Each rank decided the cache hit alone: rank 0 skipped the forwards that rank 1 ran, and
    under ZeRO-3 (collective gathers) the ranks hung. The hit is now agreed across ranks."""
    mp.start_processes(_reference_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [g["computed"] for g in got] == [1, 1], got
    assert torch.equal(got[0]["sums"], got[1]["sums"])
