"""A checkpoint save that fails (no space, no permission) removes its partial folder, keeps
every earlier checkpoint and raises SaveFailed naming the folder and the reason, on every rank.

The engine here is a stand-in with the four methods `checkpoint.save` calls, so the failure can
be put exactly where a full disk would put it; tests/smoke/test_resume.py makes a real run fail
to write (a file-size limit) and checks the same from the outside.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from ppo_train import checkpoint
from ppo_train.dist import DistInfo, free_port
from ppo_train.errors import SaveFailed


class FakeEngine:
    def __init__(self, fail_with: OSError | None = None, params: int = 1000, rank: int = 0, world: int = 1):
        self.dist = DistInfo(rank, world, rank, torch.device("cpu"))
        self.fail_with, self.params = fail_with, params

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    def num_parameters(self) -> int:
        return self.params

    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.bin").write_bytes(b"\0" * 4096)
        if self.fail_with is not None:
            raise self.fail_with


def test_failed_write_keeps_the_previous_checkpoint_and_says_why(tmp_path):
    first = checkpoint.save(FakeEngine(), tmp_path, 2, 0, {}, keep_last=1)
    full = FakeEngine(OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(SaveFailed) as err:
        checkpoint.save(full, tmp_path, 4, 0, {}, keep_last=1)
    text = str(err.value)
    assert "step 4" in text and str(tmp_path / "checkpoints" / "step-4") in text
    assert "No space left on device" in text and f"the previous checkpoint {first} is intact" in text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]  # no tmp-step-4
    assert checkpoint.complete_checkpoints(tmp_path) == [first]
    assert checkpoint.complete_checkpoints(tmp_path)[-1] == first


def test_permission_error_is_reported_the_same_way(tmp_path):
    with pytest.raises(SaveFailed, match=r"PermissionError: \[Errno 13\] .*there is no earlier checkpoint"):
        checkpoint.save(FakeEngine(PermissionError(errno.EACCES, "Permission denied")), tmp_path, 1, 0, {}, 1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_too_little_free_space_is_found_before_anything_is_written(tmp_path):
    huge = FakeEngine(params=10**15)  # 12 bytes per parameter: about 11 PiB
    with pytest.raises(SaveFailed, match=r"needs about [\d.]+ GiB, [\d.]+ GiB free"):
        checkpoint.save(huge, tmp_path, 1, 0, {}, keep_last=1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_old_checkpoints_are_pruned_only_after_a_successful_save(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(FakeEngine(), tmp_path, step, 0, {}, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-2", "step-3"]
    with pytest.raises(SaveFailed):
        checkpoint.save(FakeEngine(OSError(errno.EIO, "Input/output error")), tmp_path, 4, 0, {}, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-2", "step-3"]


def _rank(rank: int, port: int, root: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fail = OSError(errno.ENOSPC, "No space left on device") if rank == 1 else None
        checkpoint.save(FakeEngine(fail, rank=rank, world=2), Path(root), 3, 0, {}, keep_last=1)
        outcome = "saved"
    except SaveFailed as err:
        outcome = f"SaveFailed: {err}"
    Path(results, f"rank{rank}").write_text(outcome)
    torch.distributed.destroy_process_group()


def test_a_failure_on_one_rank_stops_every_rank_without_a_hang(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_rank, args=(free_port(), str(tmp_path / "run"), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}").read_text()
        assert text.startswith("SaveFailed") and "No space left on device" in text, text
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
