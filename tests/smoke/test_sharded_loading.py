"""Under ZeRO-3 a pretrained model is partitioned while it loads (zero.Init through
transformers' HfDeepSpeedConfig): on 2 CPU ranks, loading a 92M-parameter Llama (fp32, 353 MiB
in 4 safetensors shards) leaves each rank holding half of the parameter elements and no full
parameter, while an unsharded load holds all of them on every rank; and training from the
sharded load gives the same step-1 numbers as one unsharded rank with two micro-batches.

Memory (RssAnon, sampled every 2 ms during the load) is printed, not asserted: on the CPU an
unsharded load of a checkpoint in the training dtype is memory-mapped (page cache, shared by
the ranks of a node), so it grows anonymous memory by only a few MiB; the partitioned load's
gain is what it spares each GPU (DeepSpeed would otherwise move the whole model to every GPU
before partitioning it) and, on the CPU, a dtype-converting load (a full private copy per rank).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ppo_train.dist import free_port
from tests.conftest import child_env
from tests.smoke.test_recipes import run_pptrain

# hidden 640, 12 layers, MLP 1792, SmolLM2 vocabulary (tied): 92M parameters
BIG = dict(model_type="llama", hidden_size=640, intermediate_size=1792, num_hidden_layers=12, num_attention_heads=10,
           num_key_value_heads=10, max_position_embeddings=1024, tie_word_embeddings=True)
DATA = ["trainer.precision=fp32", "dataset.num_rows=8", "dataset.max_prompt_length=48", "dataset.max_response_length=24",
        "packing=none", "trainer.micro_batch_size=2", "trainer.max_steps=1", "trainer.save_model=false",
        "trainer.lr=1e-4", "trainer.warmup_ratio=0"]


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _load(rank: int, port: int, folder: str, sharded: bool, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from ppo_train.cli import compose
    from ppo_train.dist import init_distributed
    from ppo_train.engine import zero3_config
    from ppo_train.model import load_causal_lm

    dist = init_distributed("cpu")
    cfg = compose([f"model.name_or_path={folder}", "model.from_config=null", "trainer.zero_stage=3",
                   "trainer.precision=fp32"])
    before, peak, stop = _anon_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _anon_mib())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    try:  # the sampler stops whatever happens (a failed load must fail the test, not hang it)
        model = load_causal_lm(cfg.model, 49152, torch.float32, "sdpa", 0,
                               zero3=zero3_config(cfg.trainer, dist.world_size) if sharded else None)
    finally:
        stop.set()
        thread.join()
    full = sum(p.numel() for p in model.parameters())  # 0 for partitioned placeholders
    own = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps({"growth_mib": max(peak[0], _anon_mib()) - before,
                                                         "full_elements": full, "own_elements": own,
                                                         "model_elements": total}))
    torch.distributed.barrier()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("big")
    config = AutoConfig.for_model(**{**BIG, "vocab_size": 49152})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder, max_shard_size="100MB")
    return folder


def _peak_growth(folder: Path, sharded: bool, out: Path) -> list[dict]:
    out.mkdir()
    mp.start_processes(_load, args=(free_port(), str(folder), sharded, str(out)), nprocs=2, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_load_a_pretrained_model_partitioned(big_model, tmp_path):
    whole = _peak_growth(big_model, False, tmp_path / "whole")
    parts = _peak_growth(big_model, True, tmp_path / "parts")
    report = f"unsharded {whole}; sharded {parts}"
    print(report)
    total = whole[0]["model_elements"]
    assert total > 90e6 and all(w["full_elements"] == w["own_elements"] == total for w in whole), report
    assert all(p["full_elements"] == 0 for p in parts), report  # placeholders only, on every rank
    assert all(abs(p["own_elements"] - total / 2) <= 0.01 * total for p in parts), report  # half each
    assert abs(sum(p["own_elements"] for p in parts) - total) <= 0.01 * total, report


@pytest.mark.slow  # 40 s on 2 cores: the default suite keeps the partitioned load itself (above)
def test_sharded_load_trains_like_one_unsharded_rank(big_model, tmp_path):
    common = [f"model.name_or_path={big_model}", "model.from_config=null", *DATA]
    one = run_pptrain(tmp_path / "one", *common, "trainer.grad_accum=2", "trainer.zero_stage=0")
    out = tmp_path / "two"
    out.mkdir()
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "ppo_train", f"hydra.run.dir={out}", "logging.progress=false", *common, "trainer.grad_accum=1",
            "trainer.zero_stage=3"]
    proc = subprocess.run(args, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "logps/chosen", "logps/rejected", "pairs"):
        a, b = one[0][key], two[0][key]
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a)), f"step 1 {key}: one rank {a}, two sharded ranks {b}"
