"""Checks of the config: `validate(cfg)` for a composed config, `command_line_problems(args)`
for the command line before Hydra composes it.

OmegaConf rejects an unknown key while Hydra composes, but stops at the first one and
suggests nothing, and `+key=value` adds a key the schema does not have without a word.
`command_line_problems` lists every unknown key, unknown group or option, and wrong-typed
value of the command line and of the selected recipe at once, each with a suggestion;
`validate` walks a composed config for keys the schema lacks, then runs each schema's own
checks (`ppo_train/config.py`) and reports everything in one ConfigError.

Suggestions come, in this order, from the names TRL and transformers users type
(`trainer.learning_rate` -> `trainer.lr`), from the same key in another group
(`trainer.beta` -> `loss.beta`), then from the closest spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.resources
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ppo_train.config import Config, cross_group_problems, path_problems, section_problems
from ppo_train.errors import ConfigError
from ppo_train.losses import LOSSES

# Keys whose value is free-form (a transformers config dict): anything below them is accepted.
FREE_FORM = ("model.from_config",)

# What TRL / transformers / OpenRLHF users type, and what pptrain calls it.
ALIASES = {
    "learning_rate": "trainer.lr",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "per_device_train_batch_size": "trainer.micro_batch_size",
    "train_batch_size": "trainer.micro_batch_size",
    "micro_train_batch_size": "trainer.micro_batch_size",
    "batch_size": "trainer.micro_batch_size",
    "num_train_epochs": "trainer.epochs",
    "max_epochs": "trainer.epochs",
    "lr_scheduler_type": "trainer.schedule",
    "lr_scheduler": "trainer.schedule",
    "logging_steps": "trainer.log_every",
    "save_steps": "trainer.save_every",
    "eval_steps": "trainer.eval_every",
    "save_total_limit": "trainer.keep_last",
    "resume_from_checkpoint": "trainer.resume",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
    "gradient_checkpointing_enable": "trainer.gradient_checkpointing",
    "zero": "trainer.zero_stage",
    "loss_type": "loss.variant",
    "loss_weights": "loss.weights",
    "f_divergence_type": "loss.f_divergence",
    "f_alpha_divergence_coef": "loss.f_alpha",
    "use_weighting": "loss.wpo",
    "simpo_gamma": "loss.gamma",
    "gamma_beta_ratio": "loss.gamma",
    "model_name_or_path": "model.name_or_path",
    "pretrain": "model.name_or_path",
    "ref_model": "reference.name_or_path",
    "ref_model_name_or_path": "reference.name_or_path",
    "dataset_name": "dataset.path",
    "max_length": "packing.row_tokens",
    "max_len": "packing.row_tokens",
    "max_seq_length": "packing.row_tokens",
    "max_completion_length": "dataset.max_response_length",
    "padding_free": "packing.name",
    "lora_r": "model.lora.r",
    "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout",
    "lora_target_modules": "model.lora.targets",
    "target_modules": "model.lora.targets",
    "use_peft": "model.lora.enabled",
    "report_to": "logging.wandb",
}

_HELP_FLAGS = ("-h", "--help", "--hydra-help", "-i", "--info", "--shell-completion", "-sc")
_OTHER_PRIMARY = ("-cp", "-cn", "--config-path", "--config-name")
_CONFIG_DIR = ("-cd", "--config-dir")


def validate(cfg: DictConfig) -> None:
    """Check keys, values and combinations; raise one ConfigError listing every problem."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of a composed config: unknown keys, values out of range, bad combinations,
    local paths that do not exist."""
    problems = unknown_keys(cfg)
    problems += section_problems(cfg)
    if not problems or cfg.loss.get("name") in LOSSES:
        problems += cross_group_problems(cfg)
    return problems + path_problems(cfg)


def primary_config_dir() -> Path:
    """The packaged configs (`configs/` of the checkout; `ppo_train/conf` in a wheel)."""
    return Path(str(importlib.resources.files("ppo_train.conf")))


@lru_cache(maxsize=None)
def schema_keys(loss: str | None = None) -> dict[str, Any]:
    """Every dotted key of the schema (sections and leaves) -> its type hint; the loss section
    holds the keys of `loss` (of every loss when None)."""
    keys: dict[str, Any] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dotted = f"{prefix}{f.name}"
            keys[dotted] = hints[f.name]
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], dotted + ".")

    walk(Config, "")
    for name, spec in LOSSES.items():
        if loss in (None, name):
            walk(spec.schema, "loss.")
    return keys


def group_options(config_dirs: tuple[Path, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Hydra config groups -> their option names: the folders of the packaged configs and of
    any `--config-dir`, plus the losses (stored from their schemas)."""
    groups: dict[str, set[str]] = {"loss": set(LOSSES)}
    for root in (primary_config_dir(), *config_dirs):
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            if folder.is_dir() and not folder.name.startswith(("_", ".")):
                groups.setdefault(folder.name, set()).update(f.stem for f in folder.glob("*.yaml"))
    return {g: tuple(sorted(o)) for g, o in groups.items()}


def _free_form(dotted: str) -> bool:
    return any(dotted == f or dotted.startswith(f + ".") for f in FREE_FORM) and dotted not in FREE_FORM


def suggest(dotted: str, loss: str | None = None) -> str | None:
    """The valid key a user most likely meant by an unknown `dotted` key."""
    schema = schema_keys(loss)
    keys = [k for k, hint in schema.items() if not dataclasses.is_dataclass(hint)]
    section, _, leaf = dotted.rpartition(".")
    if leaf in ALIASES:
        return ALIASES[leaf]
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf[0]
    if section and section not in schema:  # a misspelt section: fix it, then the leaf
        sections = [k for k, hint in schema.items() if dataclasses.is_dataclass(hint)] + ["loss"]
        near = difflib.get_close_matches(section, sections, n=1, cutoff=0.6)
        if not near:
            return None
        fixed = f"{near[0]}.{leaf}"
        return fixed if fixed in schema else suggest(fixed, loss) or near[0]
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
    near = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if near:
        return siblings[near[0]]
    elsewhere = {**{k.rpartition(".")[2]: k for k in keys}, **ALIASES}
    near = difflib.get_close_matches(leaf, list(elsewhere), n=1, cutoff=0.75)
    if near:
        return elsewhere[near[0]]
    if not section:  # a top-level name: maybe a group or a section
        near = difflib.get_close_matches(leaf, list(schema) + list(group_options()), n=1, cutoff=0.6)
        return near[0] if near else None
    return None


def key_problem(dotted: str, where: str = "", loss: str | None = None) -> str | None:
    """None for a key of the schema (or below a free-form one), else the problem with a hint."""
    if dotted in schema_keys(loss) or _free_form(dotted):
        return None
    owners = [name for name in LOSSES if dotted in schema_keys(name)]
    if owners:
        return f"{dotted}: not a parameter of loss={loss}{where} (it belongs to loss={' or loss='.join(owners)})"
    near = suggest(dotted, loss)
    hint = f" (did you mean {near!r}?)" if near else ""
    return f"{dotted}: unknown key{where}{hint}; `pptrain --help` lists every key"


def unknown_keys(cfg: DictConfig, where: str = "", loss: str | None = None) -> list[str]:
    """Problems for every key of a (composed or recipe) config that the schema does not have."""
    if loss is None and isinstance(cfg.get("loss"), DictConfig) and cfg.loss.get("name") in LOSSES:
        loss = cfg.loss.name
    schema = schema_keys(loss)
    problems: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():
            dotted = f"{prefix}{key}"
            if dotted in FREE_FORM or dotted == "hydra":  # Hydra's own settings: Hydra checks them
                continue
            problem = key_problem(dotted, where, loss)
            if problem:
                problems.append(problem)
            elif dotted == "loss" or dataclasses.is_dataclass(schema[dotted]):  # a section: look inside
                walk(node[key], dotted + ".")

    walk(cfg, "")
    return problems


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    null = " or null" if type(None) in typing.get_args(hint) else ""
    base = args[0] if args and typing.get_origin(hint) is typing.Union else hint
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return f"one of {[m.name for m in base]}" + null
    origin = typing.get_origin(base)
    name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(base)
    if name is None:
        name = {list: "a list", dict: "a mapping"}.get(origin, str(base))
    return name + null


def value_problem(dotted: str, value: Any, loss: str | None = None) -> str | None:
    """A problem if `value` cannot be stored at schema key `dotted` (OmegaConf's own conversion)."""
    if _free_form(dotted) or dotted in FREE_FORM or (isinstance(value, str) and "${" in value):
        return None
    probe = OmegaConf.structured(Config)
    probe.loss = OmegaConf.structured(LOSSES[loss or "dpo"].schema)
    try:
        OmegaConf.update(probe, dotted, value, merge=True)
    except OmegaConfBaseException:
        hint = schema_keys(loss)[dotted]
        names = [m.name for m in hint] if isinstance(hint, type) and issubclass(hint, enum.Enum) else []
        near = difflib.get_close_matches(str(value), names, n=1)
        return f"{dotted}={value!r}: expected {_type_name(hint)}" + (f" (did you mean {near[0]!r}?)" if near else "")
    return None


def option_problem(group: str, option: str, where: str = "", config_dirs: tuple[Path, ...] = ()) -> str | None:
    options = group_options(config_dirs)[group]
    if option in options:
        return None
    near = difflib.get_close_matches(str(option), list(options), n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    path_keys = {"dataset": "dataset.path", "model": "model.name_or_path", "reference": "reference.name_or_path"}
    if group in path_keys and ("/" in str(option) or "." in str(option)):
        hint = f" (a file, folder or hub id goes in {path_keys[group]}={option})"
    return f"{group}={option!r}{where}: no such option; expected one of {list(options)}{hint}"


def _sweep_values(override) -> list[Any]:
    if not override.is_sweep_override():
        return [override.value()]
    try:
        return list(override.sweep_iterator())
    except Exception:  # glob() and other sweeps that need the config repository
        return []


def recipe_file(name: str, config_dirs: tuple[Path, ...] = ()) -> Path | None:
    """The recipe `name` as Hydra finds it: a --config-dir's `recipe/` first, then ours."""
    return next((d / "recipe" / f"{name}.yaml" for d in (*config_dirs, primary_config_dir())
                 if (d / "recipe" / f"{name}.yaml").is_file()), None)


def _recipe_loss(node: DictConfig) -> str | None:
    for entry in node.get("defaults", []) or []:
        if isinstance(entry, (dict, DictConfig)):
            for key, option in entry.items():
                if str(key).replace("override", "").strip().strip("/") == "loss":
                    return str(option)
    return None


def recipe_problems(name: str, config_dirs: tuple[Path, ...] = (), loss: str | None = None) -> list[str]:
    """Unknown keys and group options in the recipe file `name` (the user's own or ours)."""
    path = recipe_file(name, config_dirs)
    if path is None:
        return []
    where = f" in recipe {str(path)!r}"
    node = OmegaConf.load(path)
    options = group_options(config_dirs)
    problems = []
    for entry in node.get("defaults", []) or []:
        if isinstance(entry, (dict, DictConfig)):
            for key, option in entry.items():
                group = str(key).replace("override", "").strip().strip("/")
                if group in options:
                    problem = option_problem(group, str(option), where, config_dirs)
                elif group.startswith("hydra") or group == "_self_":
                    problem = None
                else:
                    problem = f"{key}{where}: no such config group; expected one of {sorted(options)}"
                if problem:
                    problems.append(problem)
    loss = loss or _recipe_loss(node)
    body = OmegaConf.masked_copy(node, [k for k in node.keys() if k != "defaults"])
    return problems + unknown_keys(body, where, loss if loss in LOSSES else None)


def _default_recipe() -> str:
    defaults = OmegaConf.load(primary_config_dir() / "config.yaml").defaults
    return next(e["recipe"] for e in defaults if isinstance(e, DictConfig) and "recipe" in e)


def config_dirs_of(args: list[str]) -> tuple[Path, ...]:
    """The folders given with --config-dir / -cd (Hydra adds them to its search path)."""
    dirs = []
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag in _CONFIG_DIR:
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value:
                dirs.append(Path(value).expanduser().resolve())
    return tuple(dirs)


def command_line_problems(args: list[str]) -> tuple[list[str], list[str]]:
    """(problems, the overrides without a problem, each sweep reduced to its first value).

    Args that are not overrides (Hydra's flags) are ignored; with `--help` or another
    primary config nothing is checked.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(a.split("=", 1)[0] in _HELP_FLAGS + _OTHER_PRIMARY for a in args):
        return [], []
    dirs = config_dirs_of(args)
    values_after = {i + 1 for i, a in enumerate(args) if a in _CONFIG_DIR}
    candidates = [a for i, a in enumerate(args)
                  if i not in values_after and not a.startswith("-") and ("=" in a or a.startswith("~"))]
    parsed = []
    problems, good = [], []
    for arg in candidates:
        try:
            parsed.append((arg, OverridesParser.create().parse_override(arg)))
        except HydraException as err:
            problems.append(f"{arg!r}: not a valid override ({str(err).splitlines()[0]})")
    options = group_options(dirs)
    recipe, loss = _default_recipe(), None
    for _, override in parsed:
        if override.key_or_group in ("recipe", "loss") and not override.is_sweep_override():
            value = str(override.value())
            if value in options[override.key_or_group]:
                recipe, loss = (value, loss) if override.key_or_group == "recipe" else (recipe, value)
    if loss is None:
        path = recipe_file(recipe, dirs)
        loss = (_recipe_loss(OmegaConf.load(path)) if path else None) or "dpo"
        loss = loss if loss in LOSSES else "dpo"
    for arg, override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or override.package is not None:
            good.append(arg)  # Hydra's own settings and packaged overrides: Hydra checks them
            continue
        values = _sweep_values(override)
        if key in options:
            found = [p for v in values if (p := option_problem(key, str(v), "", dirs))]
        elif override.is_delete():
            found = [p for p in [key_problem(key, "", loss)] if p] or ([] if _free_form(key) else [
                f"~{key}: keys of the schema cannot be deleted; set a value (null where allowed) instead"])
        else:
            found = [p for p in [key_problem(key, "", loss)] if p]
            found = found or [p for v in values if (p := value_problem(key, v, loss))]
        problems.extend(found)
        if not found:
            first = values[0] if values else None
            good.append(arg if not override.is_sweep_override() or first is None
                        else f"{override.get_key_element()}={_as_override_value(first)}")
    problems.extend(recipe_problems(recipe, dirs, loss))
    return problems, good


def _as_override_value(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
