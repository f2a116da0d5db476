"""Hydra entry point: compose, validate, dispatch.

`pptrain recipe=NAME key=value ...`, also `python -m ppo_train ...` so that the
deepspeed launcher and torchrun can start it. Launchers append `--local_rank=N`, which
Hydra would reject: it is moved into the LOCAL_RANK environment variable first.
"""

from __future__ import annotations

import os
import re
import sys

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ppo_train import config
from ppo_train.config_check import config_problems, validate
from ppo_train.errors import ConfigError, PptrainError

# The packaged configs: `configs/` of the checkout, `ppo_train/conf` in a wheel. Its `recipe`
# group is the top-level `recipes/` folder (configs/recipe links to it); users add their own
# groups and recipes with Hydra's --config-dir (DIR/recipe/NAME.yaml) or hydra.searchpath.
CONFIG_MODULE = "ppo_train.conf"

_LOCAL_RANK = re.compile(r"^--local[_-]rank(?:=(\d+))?$")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove `--local_rank=N` / `--local_rank N` (deepspeed launcher) into LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        match = _LOCAL_RANK.match(argv[i])
        if match:
            value = match.group(1)
            if value is None and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            if value is not None:
                os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(argv[i])
        i += 1
    return out


def compose(overrides: list[str] | None = None, config_dirs=(), with_hydra: bool = False) -> DictConfig:
    """The composed config for these overrides, as the command line would build it (for
    tests and notebooks; `config_dirs` as --config-dir); interpolations that need Hydra's
    runtime are left unresolved unless `with_hydra` (then `cfg.hydra.run.dir` resolves too)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    config.register()
    extra = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in config_dirs)}]"] if config_dirs else []
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[*extra, *(overrides or [])],
                            return_hydra_config=with_hydra)
    if with_hydra:
        HydraConfig.instance().set_config(cfg)
    return cfg


def run_dir_problem(run_dir: str) -> str | None:
    """Why the run directory cannot be written (Hydra would fail with a traceback there)."""
    path = Path(run_dir).expanduser().absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        return f"hydra.run.dir={run_dir!r}: {existing} is a file, so the run directory cannot be created there"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"hydra.run.dir={run_dir!r}: {existing} is not writable by this user"
    return None


def preflight(args: list[str]) -> list[str]:
    """Before Hydra composes: unknown keys, groups and options, wrong types (each with the
    nearest valid name), and, when there are any, the value problems of the config that the
    remaining overrides compose, so that one message lists everything (sweeps: first values).
    Without problems (and outside a sweep), a run directory that cannot be created."""
    from hydra.errors import HydraException

    from ppo_train.config_check import command_line_problems, config_dirs_of

    problems, good = command_line_problems(args)
    multirun = any(a in ("-m", "--multirun") for a in args)
    if problems or not multirun:
        try:
            cfg = compose(good, config_dirs_of(args), with_hydra=True)
            if problems:
                problems += config_problems(cfg)
            elif not any(a.split("=", 1)[0] in ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info")
                         for a in args):
                problems += [p for p in [run_dir_problem(str(cfg.hydra.run.dir))] if p]
        except (HydraException, ValueError, OmegaConfBaseException) as err:  # Hydra or a resolver says why
            cause = err  # a resolver's own ConfigError, wrapped by OmegaConf and Hydra
            while not isinstance(cause, ConfigError) and (cause.__cause__ or cause.__context__) is not None:
                cause = cause.__cause__ or cause.__context__
            problems += cause.problems if isinstance(cause, ConfigError) else [str(err.__cause__ or err).splitlines()[0]]
    return problems


def run(cfg: DictConfig) -> None:
    validate(cfg)
    problems = config.environment_problems(cfg)  # what this machine cannot run (a recipe may be for GPUs)
    if problems:
        raise ConfigError(problems)
    out_dir = HydraConfig.get().runtime.output_dir
    if cfg.mode == "stats":  # dataset statistics and the ideal speedups; no model is loaded
        from ppo_train.stats import run_stats

        run_stats(cfg, out_dir)
        return
    from ppo_train.runlock import RunLock
    from ppo_train.train import train

    if int(os.environ.get("RANK", "0")) == 0:  # one run per directory; the other ranks share it
        with RunLock(out_dir):
            train(cfg, out_dir)
    else:
        train(cfg, out_dir)


def quiet_libraries() -> None:
    """Silence start-up noise that says nothing to a user (DeepSpeed's accelerator guess and
    op-build compiler lines, torch.distributed deprecations raised inside DeepSpeed)."""
    import logging
    import warnings

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    logging.getLogger("compilers").setLevel(logging.WARNING)


def main() -> None:
    sys.argv = [sys.argv[0]] + strip_launcher_args(sys.argv[1:])
    if int(os.environ.get("RANK", "0")) > 0:
        # one run directory written by rank 0 only: other ranks keep no Hydra log or config copy
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    quiet_libraries()
    config.register()
    problems = preflight(sys.argv[1:])
    if problems:
        print(f"pptrain: {ConfigError(problems)}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except (PptrainError, OmegaConfBaseException) as err:  # the user's to fix: what and where
            if isinstance(err, OmegaConfBaseException):  # a resolver's own error (${asset:..} outside assets)
                cause = err.__cause__ or err.__context__
                if not isinstance(cause, PptrainError):
                    raise
                err = cause
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
            print(f"pptrain: {rank}{err}", file=sys.stderr)
            sys.exit(err.exit_code)

    _main()


if __name__ == "__main__":
    main()
