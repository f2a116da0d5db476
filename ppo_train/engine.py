"""Every DeepSpeed call: the generated DeepSpeed config, the engine (AdamW and a warmup
schedule), backward, step, checkpoint save/load and the final export."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.profiler import record_function

from ppo_train import fileio
from ppo_train.dist import DistInfo, barrier
from ppo_train.errors import WRITE_ERRORS, NonFiniteLoss, SaveFailed
from ppo_train.precision import Numerics


def zero_stage(t: DictConfig, world_size: int) -> int:
    """`trainer.zero_stage`; auto = 0 in one process (nothing to partition), 3 with several or
    when anything is offloaded to the CPU."""
    if str(t.zero_stage) == "auto":
        return 0 if world_size == 1 and not (t.offload_optimizer or t.offload_params) else 3
    return int(t.zero_stage)


def deepspeed_config(t: DictConfig, world_size: int, loading: bool = False) -> dict:
    """The DeepSpeed config of a run. An auto `trainer.grad_accum` (null) must have been resolved
    from the data (data.packing.resolve_budget) unless the config only builds a model
    (`loading`: partitioning needs no batch size, so 1 stands in)."""
    accum = t.grad_accum
    if accum is None:
        if not loading:
            raise ValueError("trainer.grad_accum is auto (null): resolve it from the data's units first "
                             "(data.packing.resolve_budget, which prepare() calls)")
        accum = 1
    stage = zero_stage(t, world_size)
    zero: dict = {"stage": stage}
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True})
    if stage == 1:  # reduce at the step boundary in parameter order, not in backward-hook order
        zero["overlap_comm"] = False  # (train._vision_zero_stage relies on it)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        # Our micro-batches hold a variable number of pairs; DeepSpeed's batch size is
        # nominal (1 per micro-batch) and the loss is normalized by train.py itself.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accum,
        "train_batch_size": accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        **Numerics.of(t, world_size).deepspeed(),  # trainer.precision (ppo_train/precision.py)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def reference_config(t: DictConfig, world_size: int) -> dict:
    """The DeepSpeed config of a frozen reference model (no optimizer): ZeRO-3 when the trainer
    runs ZeRO-3 (the reference is then partitioned like the policy), else stage 0. Stages 1 and
    2 partition optimizer state and gradients, which a frozen model has none of (DeepSpeed
    refuses them without an optimizer); TRL prepares its reference model the same way."""
    config = deepspeed_config(t, world_size)
    zero = config["zero_optimization"]
    config.pop("optimizer", None)
    config.pop("data_types", None)  # gradient accumulation: a frozen model has no gradients
    zero.pop("offload_optimizer", None)
    if zero["stage"] != 3:
        config["zero_optimization"] = {"stage": 0}
    return config


def zero3_config(t: DictConfig, world_size: int) -> dict | None:
    """The DeepSpeed config under which models are built partitioned (ZeRO-3), else None."""
    return deepspeed_config(t, world_size, loading=True) if zero_stage(t, world_size) == 3 else None


def lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


class Engine:
    """A DeepSpeed engine around the policy module, with AdamW and a warmup schedule.

    The schedule is a function of the run's total step count: warmup is `warmup_ratio` of it,
    and linear/cosine decay reach 0 at its end. A finished run extended to more steps
    (trainer.resume=auto with a larger trainer.max_steps) takes the schedule of its new total
    from the step it resumes at: the steps already taken keep the rates they had, the next ones
    follow the longer schedule (after a decay to 0 the rate rises again to where that schedule
    stands)."""

    def __init__(self, module: torch.nn.Module, t: DictConfig, total_steps: int, dist: DistInfo):
        import deepspeed

        self.t, self.dist = t, dist
        self.stage = zero_stage(t, dist.world_size)
        self.ds_config = deepspeed_config(t, dist.world_size)
        warmup = int(round(t.warmup_ratio * total_steps))
        schedule = lr_lambda(str(t.schedule), warmup, total_steps)
        params = [p for p in module.parameters() if p.requires_grad]
        if t.offload_optimizer:
            self.ds_config["optimizer"] = {"type": "AdamW", "params": {
                "lr": t.lr, "betas": list(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay}}
            optimizer = None
        else:
            # the fused kernel (CPU and CUDA): one pass over each parameter instead of a dozen
            optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                          weight_decay=t.weight_decay, fused=dist.device.type in ("cpu", "cuda"))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=params if optimizer is None else None, optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.ds_config, dist_init_required=False)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; our loss is already normalized by the
        # global pair count, so undo the average by scaling with the world size.
        with record_function("pptrain.backward"), self._local():
            self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def _local(self):
        """One process at ZeRO stage 0 has nothing to reduce: DeepSpeed would still flatten every
        gradient into one buffer, all-reduce it over one rank, multiply by 1 and copy it back
        (a cat and a copy of the whole model per optimizer step; the same bits)."""
        return self.engine.no_sync() if self.stage == 0 and self.dist.world_size == 1 else contextlib.nullcontext()

    def step(self) -> bool:
        """After every micro-batch; DeepSpeed applies the update at the accumulation boundary.
        There, non-finite gradients (possible from a finite loss) are caught before the update
        (ZeRO stage 0, where every rank holds the whole gradient; stages 1-3 keep them inside
        DeepSpeed's partitions and are not checked): trainer.on_nonfinite=error stops with the
        last checkpoint intact, skip applies no change to the weights (learning rate 0 for this
        update, gradients zeroed; Adam's moments still decay) and returns False."""
        if self.engine.is_gradient_accumulation_boundary() and not self._grads_finite():
            if self.t.on_nonfinite == "error":
                raise NonFiniteLoss("non-finite gradients from a finite loss at this optimizer step; the last "
                                    "checkpoint is intact; trainer.on_nonfinite=skip skips such updates instead")
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.zero_()  # NaN gradients would make Adam's moments NaN even at learning rate 0
            groups = self.optimizer.param_groups
            saved = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] = 0.0
            self.engine.step()
            for g, lr in zip(groups, saved):
                g["lr"] = lr
            return False
        with record_function("pptrain.optimizer"):
            self.engine.step()
        return True

    def _grads_finite(self) -> bool:
        if self.stage != 0:
            return True
        # one pass over the gradients (torch's fused per-tensor norms) and one device sync: the
        # norm is finite exactly when every gradient is, except that a sum of squares beyond the
        # dtype's range (fp32 entries above about 1.8e19) counts as non-finite too; gradient
        # clipping could not use such a norm either
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def barrier(self) -> None:
        barrier(self.dist)

    def num_parameters(self) -> int:
        """All parameters, also those partitioned away by ZeRO-3 (their full size is ds_numel)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters())

    def save_checkpoint(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="state")

    def load_checkpoint(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")
        # The saved scheduler holds the step count and the rate for the next step under the
        # saved run's length (a LambdaLR saves no function). A run extended to more steps goes
        # on with this run's schedule: recompute the next step's rate from it (the same value
        # when the length did not change).
        self.scheduler.last_epoch -= 1
        self.scheduler.step()

    def export(self, out_dir: Path, tokenizer, writer=None) -> None:
        """Gather the (possibly ZeRO-3 partitioned) weights and write them with save_pretrained,
        or hand them to `writer(state, out_dir)` on rank 0 (LoRA: adapters and merged model)."""
        model = self.module.model
        if self.stage == 3:
            full = self.engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
        else:
            full = self.module.state_dict()
        if not self.dist.is_main:
            return
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        try:
            if writer is not None:
                writer(state, out_dir)
                return
            with fileio.staged(out_dir) as tmp:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
        except WRITE_ERRORS as err:  # disk full, permissions: say so, keep what exists
            from ppo_train.checkpoint import complete_checkpoints, diagnose

            found = complete_checkpoints(out_dir.parent)
            kept = f"the newest checkpoint {found[-1]} is intact" if found else "no checkpoint was saved"
            raise SaveFailed(f"could not write the model to {out_dir}: {type(err).__name__}: {err} "
                             f"({diagnose(out_dir.parent)}); {kept}. "
                             "Free space or fix the permissions; rerunning with trainer.resume=auto continues "
                             "from that checkpoint") from err
