"""The data of a run, wired to the rest of the package: the data layer (ppo_train.data) is
given a vision-language model's processor, the device type and how the processes of a
machine take turns building the tokenized store, and imports none of them itself."""

from __future__ import annotations

import time
from functools import partial

from omegaconf import DictConfig
from torch.profiler import record_function

from ppo_train.data.pipeline import PreparedData
from ppo_train.data.pipeline import prepare as prepare_data
from ppo_train.dist import DistInfo, device_for, local_main_first


@record_function("pptrain.prepare")
def prepare(cfg: DictConfig, tokenizer, dist: DistInfo | None = None) -> PreparedData:
    """Load, tokenize (or read the store), split and lay out the data of `cfg`; resolves an auto
    ffd budget in `cfg.packing`. Under several processes (`dist`), local rank 0 of each machine
    builds a missing store while the others wait."""
    from ppo_train.model import load_vision

    vision = load_vision(cfg.model, tokenizer)
    device_type = device_for(cfg.trainer.device).type
    turns = partial(local_main_first, dist) if dist is not None and dist.world_size > 1 else None
    began = time.perf_counter()
    data = prepare_data(cfg, tokenizer, vision, device_type, turns)
    data.seconds = time.perf_counter() - began
    return data
