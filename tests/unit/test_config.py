"""Config: schema errors while composing, value errors listed together, launcher args."""

from __future__ import annotations

import os

import pytest
from hydra.errors import ConfigCompositionException

from ppo_train.cli import compose, strip_launcher_args
from ppo_train.config import ConfigError, validate


def test_unknown_key_fails_while_composing():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["loss.bta=0.1"])
    assert "bta" in str(err.value.__cause__)


def test_wrong_type_fails_while_composing():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.lr=fast"])
    assert "trainer.lr" in str(err.value.__cause__) and "fast" in str(err.value.__cause__)


def test_every_problem_is_listed_at_once_with_suggestions():
    cfg = compose(["packing.name=fdd", "loss.beta=-1", "trainer.micro_batch_size=0", "packing.row_tokens=200"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "packing.name='fdd'" in text and "did you mean 'ffd'" in text
    assert "loss.beta=-1" in text and "trainer.micro_batch_size=0" in text
    assert "packing.row_tokens=200" in text and len(err.value.problems) >= 4


def test_row_budget_shorter_than_longest_unit_is_rejected():
    cfg = compose(["packing.row_tokens=256", "dataset.max_prompt_length=200", "dataset.max_response_length=100"])
    with pytest.raises(ConfigError, match="shorter than the longest allowed unit"):
        validate(cfg)


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
