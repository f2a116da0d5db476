"""Config: schema errors while composing, value errors listed together, launcher args."""

from __future__ import annotations

import os

import pytest
from hydra.errors import ConfigCompositionException

from ppo_train.cli import compose, preflight, strip_launcher_args
from ppo_train.config_check import validate
from ppo_train.errors import ConfigError


def test_unknown_key_fails_while_composing():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["loss.bta=0.1"])
    assert "bta" in str(err.value.__cause__)


def test_wrong_type_fails_while_composing():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.lr=fast"])
    assert "trainer.lr" in str(err.value.__cause__) and "fast" in str(err.value.__cause__)


def test_every_problem_is_listed_at_once_with_suggestions():
    problems = preflight(["packing.name=fdd", "loss.beta=-1", "trainer.micro_batch_size=0", "packing.row_tokens=200"])
    text = "\n".join(problems)
    assert "packing.name='fdd'" in text and "did you mean 'ffd'" in text
    assert "loss.beta=-1" in text and "trainer.micro_batch_size=0" in text
    assert "packing.row_tokens=200" in text and len(problems) >= 4
    cfg = compose(["loss.beta=-1", "trainer.micro_batch_size=0", "packing.row_tokens=200"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert len(err.value.problems) >= 3, err.value.problems


@pytest.mark.parametrize("key, bad, choices", [
    ("model.attention", "flexx", "[auto, flex, sdpa]"),
    ("dataset.format", "jsonl", "[auto, preference, implicit, sharegpt, scored, ranked, pandalm, ultrafeedback, unpaired]"),
    ("dataset.length_policy", "cut", "[truncate, drop]"),
    ("dataset.on_invalid", "ignore", "[error, skip]"),
    ("layout.name", "packed", "[shared, paired, unmasked]"),
    ("packing.name", "fdd", "[none, ffd, sorted]"),
    ("trainer.device", "gpu", "[auto, cpu, cuda]"),
    ("trainer.schedule", "step", "[constant, linear, cosine]"),
    ("trainer.precision", "fp8", "[auto, fp32, bf16, fp16]"),
    ("loss.f_divergence", "kl", "[reverse_kl, forward_kl, js_divergence, alpha_divergence]"),
    ("trainer.on_nonfinite", "ignore", "[error, skip]"),
    ("logging.wandb", "yes", "[disabled, offline, online]"),
    ("mode", "bench", "[train, stats]"),
])
def test_each_group_rejects_an_invalid_choice_while_composing(key, bad, choices):
    """Enums: OmegaConf refuses the value while Hydra composes and lists the valid ones."""
    with pytest.raises(ConfigCompositionException) as err:
        compose([f"{key}={bad}"])
    cause = str(err.value.__cause__)
    assert f"Invalid value '{bad}', expected one of {choices}" in cause and key in cause, cause


def test_a_loss_takes_only_its_own_parameters():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["loss.gamma=0.5"])
    assert "Key 'gamma' not in 'DpoConfig'" in str(err.value.__cause__), err.value.__cause__
    assert compose(["loss=simpo", "loss.gamma=0.5"]).loss.gamma == 0.5
    assert any("loss.gamma: not a parameter of loss=dpo (it belongs to loss=simpo)" in p
               for p in preflight(["loss.gamma=0.5"]))


def test_row_budget_is_checked_against_the_real_units(capsys):
    """Length limits that would allow a unit longer than the row are fine when the data has
    none that long; units that are longer are dropped, counted and named on stderr."""
    from ppo_train.inputs import prepare
    from ppo_train.model import load_tokenizer

    cfg = compose(["packing.row_tokens=256", "dataset.max_prompt_length=200", "dataset.max_response_length=100",
                   "dataset.num_rows=40", "run_name=t"])
    validate(cfg)  # no longer refused from the limits alone
    data = prepare(cfg, load_tokenizer(cfg.model))
    assert data.dropped_over_row_budget > 0 and all(u.length <= 256 for u in data.units)
    assert data.report()["dropped_over_row_budget"] == data.dropped_over_row_budget
    err = capsys.readouterr().err
    assert f"{data.dropped_over_row_budget} of " in err and "longer than packing.row_tokens=256" in err, err


def test_missing_local_dataset_file_is_named():
    with pytest.raises(ConfigError, match="nope.jsonl"):
        validate(compose(["dataset.path=/tmp/definitely/nope.jsonl"]))


def test_launcher_local_rank_is_moved_to_the_environment(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(["--local_rank=3", "recipe=tiny_dpo"]) == ["recipe=tiny_dpo"]
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["--local-rank", "1", "packing=ffd"]) == ["packing=ffd"]
    assert os.environ["LOCAL_RANK"] == "1"


# --- unknown keys, groups, options and types: all listed at once, each with the nearest name ---

@pytest.mark.parametrize("override, named, suggested", [
    ("loss.bta=0.2", "loss.bta", "loss.beta"),                            # a typo of a sibling
    ("trainer.learning_rate=1e-5", "trainer.learning_rate", "trainer.lr"),  # what TRL calls it
    ("trainer.lerning_rate=1e-5", "trainer.lerning_rate", "trainer.lr"),    # a typo of that
    ("trainer.beta=0.2", "trainer.beta", "loss.beta"),                    # the key lives in another group
    ("trainr.seed=3", "trainr.seed", "trainer.seed"),                     # a misspelt section
    ("modl.lora.rr=4", "modl.lora.rr", "model.lora.r"),
    ("packng=ffd", "packng", "packing"),                                  # a misspelt group
    ("+trainer.gradient_accumulation_steps=4", "trainer.gradient_accumulation_steps", "trainer.grad_accum"),
])
def test_unknown_key_names_the_key_and_the_nearest_valid_one(override, named, suggested):
    problems = preflight([override])
    assert any(p.startswith(f"{named}: unknown key") and f"did you mean {suggested!r}" in p for p in problems), problems


def test_unknown_group_option_and_recipe_are_named_with_a_suggestion():
    problems = preflight(["packing=fdd", "recipe=tiny_dpoo"])
    assert any("packing='fdd'" in p and "did you mean 'ffd'" in p for p in problems), problems
    assert any("recipe='tiny_dpoo'" in p and "did you mean 'tiny_dpo'" in p for p in problems), problems


def test_wrong_types_and_value_problems_are_listed_together():
    problems = preflight(["trainer.lr=fast", "trainer.epochs=two", "loss.bta=1", "loss.beta=-1",
                          "packing.name=fdd", "trainer.micro_batch_size=0"])
    text = "\n".join(problems)
    assert "trainer.lr='fast': expected a number" in text
    assert "trainer.epochs='two': expected an integer" in text
    assert "loss.bta: unknown key" in text
    # the remaining overrides were composed and validated: their value problems come too
    assert "loss.beta=-1" in text and "trainer.micro_batch_size=0" in text and "did you mean 'ffd'" in text


def test_sweep_values_are_each_checked():
    problems = preflight(["-m", "loss.beta=0.1,abc", "packing=ffd,fdd"])
    assert any("loss.beta='abc'" in p for p in problems) and any("packing='fdd'" in p for p in problems)
    assert preflight(["-m", "loss.beta=0.1,0.2", "packing=ffd,none"]) == []


def test_a_valid_command_line_has_no_problem_and_free_form_keys_pass():
    assert preflight(["packing=none", "loss=simpo", "model.from_config.num_hidden_layers=1",
                      "+model.from_config.rope_theta=5000", "hydra.verbose=true", "--cfg", "job"]) == []


def test_deleting_a_schema_key_is_refused():
    assert any(p.startswith("~loss.gamma:") for p in preflight(["loss=simpo", "~loss.gamma"]))
    assert any(p.startswith("~loss.beta:") for p in preflight(["~loss.beta"]))


def test_added_key_is_caught_in_the_composed_config_too():
    with pytest.raises(ConfigError, match=r"trainer.foo: unknown key"):
        validate(compose(["+trainer.foo=1"]))


def test_recipe_file_problems_name_the_file(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /packing: fdd\n  - override /los: dpo\n"
        "trainer:\n  learning_rate: 1.0e-5\nloss:\n  betta: 0.2\n")
    text = "\n".join(preflight(["--config-dir", str(tmp_path), "recipe=mine"]))
    where = f"in recipe {str(tmp_path / 'recipe' / 'mine.yaml')!r}"
    assert f"packing='fdd' {where}" in text and "did you mean 'ffd'" in text
    assert f"override /los {where}: no such config group" in text
    assert f"trainer.learning_rate: unknown key {where} (did you mean 'trainer.lr'?)" in text
    assert f"loss.betta: unknown key {where} (did you mean 'loss.beta'?)" in text


@pytest.mark.parametrize("key", ["model.name_or_path", "model.tokenizer", "reference.name_or_path",
                                 "dataset.eval_path", "trainer.resume"])
def test_local_paths_in_the_config_are_checked(key):
    with pytest.raises(ConfigError, match=rf"{key}='./no/such/place': no such file or folder"):
        validate(compose([f"{key}=./no/such/place"]))


def test_command_line_exits_2_with_the_list_before_any_model_loads(tmp_path):
    import subprocess
    import sys

    from tests.conftest import child_env

    out = subprocess.run([sys.executable, "-m", "ppo_train", "trainer.lerning_rate=1e-5", "packing=fdd"],
                         cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "2 problem(s)" in out.stderr and "did you mean 'trainer.lr'" in out.stderr, out.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_path_given_as_a_group_option_points_to_the_path_key():
    problems = preflight(["dataset=data/mine.jsonl", "model=Qwen/Qwen2.5-0.5B"])
    assert any("(a file, folder or hub id goes in dataset.path=data/mine.jsonl)" in p for p in problems), problems
    assert any("model.name_or_path=Qwen/Qwen2.5-0.5B" in p for p in problems), problems


def test_a_user_recipe_folder_is_found_through_hydras_search_path(tmp_path):
    """`pptrain --config-dir DIR recipe=NAME` with DIR/recipe/NAME.yaml: Hydra's own mechanism."""
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /loss: simpo\n  - override /packing: sorted\n"
        "loss:\n  gamma: 0.3\ntrainer:\n  lr: 1.0e-5\n")
    cfg = compose(["recipe=mine"], config_dirs=(tmp_path,))
    assert (cfg.loss.name, cfg.loss.gamma, cfg.packing.name, cfg.trainer.lr) == ("simpo", 0.3, "sorted", 1.0e-5)
    assert compose(["recipe=mine", "packing=ffd"], config_dirs=(tmp_path,)).packing.name == "ffd"
    assert preflight(["--config-dir", str(tmp_path), "recipe=mine"]) == []
    assert any("recipe='mine'" in p for p in preflight(["recipe=mine"]))  # without the folder: unknown


def test_auto_grad_accum_is_refused_until_resolved_but_a_model_load_needs_none():
    """trainer.grad_accum=null is resolved with the data's budget; the engine's DeepSpeed config
    refuses it unresolved, while building a partitioned model (no batch size involved) takes it."""
    from ppo_train.engine import deepspeed_config, zero3_config

    t = compose([]).trainer
    assert t.grad_accum is None
    with pytest.raises(ValueError, match="trainer.grad_accum is auto"):
        deepspeed_config(t, 1)
    assert zero3_config(t, 2)["gradient_accumulation_steps"] == 1
    t.grad_accum = 4
    assert deepspeed_config(t, 2)["train_batch_size"] == 8
    with pytest.raises(ConfigError, match=r"trainer.grad_accum=0: expected a positive integer or null \(auto\)"):
        validate(compose(["trainer.grad_accum=0"]))
