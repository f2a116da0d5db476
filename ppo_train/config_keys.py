"""Config keys checked against the schema, each unknown one with the nearest valid name.

OmegaConf rejects an unknown key while Hydra composes, but stops at the first one and
suggests nothing, and `+key=value` adds a key the schema does not have without a word.
`command_line_problems(args)` runs before Hydra: every unknown key, unknown group or
option, and wrong-typed value of the command line and of the selected recipe is listed at
once, with a suggestion; `unknown_keys(cfg)` walks a composed config for `validate()`.

Suggestions come, in this order, from the names TRL and transformers users type
(`trainer.learning_rate` -> `trainer.lr`), from the same key in another group
(`trainer.beta` -> `loss.beta`), then from the closest spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ppo_train.config import Config
from ppo_train.paths import config_dir, recipe_dirs

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

_HYDRA_FLAGS_WITH_OTHER_CONFIG = ("-cp", "-cn", "-cd", "--config-path", "--config-name", "--config-dir")
_HELP_FLAGS = ("-h", "--help", "--hydra-help", "-i", "--info", "--shell-completion", "-sc")


@lru_cache(maxsize=None)
def schema_keys() -> dict[str, Any]:
    """Every dotted key of the schema (sections and leaves) -> its type hint."""
    keys: dict[str, Any] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dotted = f"{prefix}{f.name}"
            keys[dotted] = hints[f.name]
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], dotted + ".")

    walk(Config, "")
    return keys


def group_options() -> dict[str, tuple[str, ...]]:
    """Hydra config groups -> their option names (recipes included)."""
    groups = {p.name: tuple(sorted(f.stem for f in p.glob("*.yaml")))
              for p in sorted(config_dir().iterdir()) if p.is_dir() and not p.name.startswith("_")}
    groups["recipe"] = tuple(sorted({f.stem for d in recipe_dirs() for f in d.glob("*.yaml")}))
    return groups


def _free_form(dotted: str) -> bool:
    return any(dotted == f or dotted.startswith(f + ".") for f in FREE_FORM) and dotted not in FREE_FORM


def suggest(dotted: str) -> str | None:
    """The valid key a user most likely meant by an unknown `dotted` key."""
    keys = [k for k, hint in schema_keys().items() if not dataclasses.is_dataclass(hint)]
    section, _, leaf = dotted.rpartition(".")
    if leaf in ALIASES:
        return ALIASES[leaf]
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf[0]
    if section and section not in schema_keys():  # a misspelt section: fix it, then the leaf
        sections = [k for k, hint in schema_keys().items() if dataclasses.is_dataclass(hint)]
        near = difflib.get_close_matches(section, sections, n=1, cutoff=0.6)
        if not near:
            return None
        fixed = f"{near[0]}.{leaf}"
        return fixed if fixed in schema_keys() else suggest(fixed) or near[0]
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
    near = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if near:
        return siblings[near[0]]
    elsewhere = {**{k.rpartition(".")[2]: k for k in keys}, **ALIASES}
    near = difflib.get_close_matches(leaf, list(elsewhere), n=1, cutoff=0.75)
    if near:
        return elsewhere[near[0]]
    if not section:  # a top-level name: maybe a group or a section
        near = difflib.get_close_matches(leaf, list(schema_keys()) + list(group_options()), n=1, cutoff=0.6)
        return near[0] if near else None
    return None


def key_problem(dotted: str, where: str = "") -> str | None:
    """None for a key of the schema (or below a free-form one), else the problem with a hint."""
    if dotted in schema_keys() or _free_form(dotted):
        return None
    near = suggest(dotted)
    hint = f" (did you mean {near!r}?)" if near else ""
    return f"{dotted}: unknown key{where}{hint}; `pptrain --help` lists every key"


def unknown_keys(cfg: DictConfig, where: str = "") -> list[str]:
    """Problems for every key of a (composed or recipe) config that the schema does not have."""
    problems: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():
            dotted = f"{prefix}{key}"
            if dotted in FREE_FORM:
                continue
            problem = key_problem(dotted, where)
            if problem:
                problems.append(problem)
            elif dataclasses.is_dataclass(schema_keys()[dotted]):  # a section: look inside
                walk(node[key], dotted + ".")

    walk(cfg, "")
    return problems


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    null = " or null" if type(None) in typing.get_args(hint) else ""
    base = args[0] if args and typing.get_origin(hint) is typing.Union else hint
    origin = typing.get_origin(base)
    name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(base)
    if name is None:
        name = {list: "a list", dict: "a mapping"}.get(origin, str(base))
    return name + null


def value_problem(dotted: str, value: Any) -> str | None:
    """A problem if `value` cannot be stored at schema key `dotted` (OmegaConf's own conversion)."""
    if _free_form(dotted) or dotted in FREE_FORM or (isinstance(value, str) and "${" in value):
        return None
    probe = OmegaConf.structured(Config)
    try:
        OmegaConf.update(probe, dotted, value, merge=True)
    except OmegaConfBaseException:
        return f"{dotted}={value!r}: expected {_type_name(schema_keys()[dotted])}"
    return None


def option_problem(group: str, option: str, where: str = "") -> str | None:
    options = group_options()[group]
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


def recipe_problems(name: str) -> list[str]:
    """Unknown keys and group options in the recipe file `name` (the user's own or ours)."""
    path = next((d / f"{name}.yaml" for d in reversed(recipe_dirs()) if (d / f"{name}.yaml").is_file()), None)
    if path is None:
        return []
    where = f" in recipe {str(path)!r}"
    node = OmegaConf.load(path)
    problems = []
    for entry in node.get("defaults", []) or []:
        if isinstance(entry, (dict, DictConfig)):
            for key, option in entry.items():
                group = str(key).replace("override", "").strip().strip("/")
                if group in group_options():
                    problem = option_problem(group, str(option), where)
                elif group.startswith("hydra") or group == "_self_":
                    problem = None
                else:
                    problem = f"{key}{where}: no such config group; expected one of {sorted(group_options())}"
                if problem:
                    problems.append(problem)
    body = OmegaConf.masked_copy(node, [k for k in node.keys() if k != "defaults"])
    return problems + unknown_keys(body, where)


def _default_recipe() -> str:
    defaults = OmegaConf.load(Path(config_dir()) / "config.yaml").defaults
    return next(e["recipe"] for e in defaults if isinstance(e, DictConfig) and "recipe" in e)


def command_line_problems(args: list[str]) -> tuple[list[str], list[str]]:
    """(problems, the overrides without a problem, each sweep reduced to its first value).

    Args that are not overrides (Hydra's flags) are ignored; with `--help` or another
    primary config nothing is checked.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(a.split("=", 1)[0] in _HELP_FLAGS + _HYDRA_FLAGS_WITH_OTHER_CONFIG for a in args):
        return [], []
    candidates = [a for a in args if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    problems, good = [], []
    recipe = _default_recipe()
    for arg in candidates:
        try:
            override = OverridesParser.create().parse_override(arg)
        except HydraException as err:
            problems.append(f"{arg!r}: not a valid override ({str(err).splitlines()[0]})")
            continue
        key = override.key_or_group
        if key.startswith("hydra") or override.package is not None:
            continue  # Hydra's own settings and packaged overrides: Hydra checks them
        values = _sweep_values(override)
        if key in group_options():
            found = [p for v in values if (p := option_problem(key, str(v)))]
            if key == "recipe" and values and not found:
                recipe = str(values[0])
        elif override.is_delete():
            found = [p for p in [key_problem(key)] if p] or ([] if _free_form(key) else [
                f"~{key}: keys of the schema cannot be deleted; set a value (null where allowed) instead"])
        else:
            found = [p for p in [key_problem(key)] if p]
            found = found or [p for v in values if (p := value_problem(key, v))]
        problems.extend(found)
        if not found:
            first = values[0] if values else None
            good.append(arg if not override.is_sweep_override() or first is None
                        else f"{override.get_key_element()}={_as_override_value(first)}")
    problems.extend(recipe_problems(recipe))
    return problems, good


def _as_override_value(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
