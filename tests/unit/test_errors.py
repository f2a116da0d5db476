"""Missing or unsafe model and tokenizer sources give one sentence naming the path and what to
do; conversational rows without a chat template name the row; the CLI prints such errors
without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from ppo_train.cli import compose
from ppo_train.errors import DataError, ModelLoadError
from ppo_train.model import load_causal_lm, load_tokenizer
from tests.conftest import child_env, tiny_model


def model_cfg(**kw):
    cfg = OmegaConf.to_container(compose([]).model, resolve=True)
    cfg.update(kw)
    return OmegaConf.create(cfg)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=rf"model path '{tmp_path}/nope' does not exist; give a folder"):
        load_causal_lm(model_cfg(), 97, torch.float32, "sdpa", 0, name_or_path=str(tmp_path / "nope"))


def test_folder_without_weights(tmp_path):
    tiny_model().config.save_pretrained(tmp_path)  # config.json only
    with pytest.raises(ModelLoadError, match=rf"cannot load model '{tmp_path}'"):
        load_causal_lm(model_cfg(), 97, torch.float32, "sdpa", 0, name_or_path=str(tmp_path))


def test_pickle_only_weights_are_refused(tmp_path):
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # what older checkpoints hold
    with pytest.raises(ModelLoadError, match=r"only pickle weights .*safe_serialization=True"):
        load_causal_lm(model_cfg(), 97, torch.float32, "sdpa", 0, name_or_path=str(tmp_path))


def test_safetensors_weights_load(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = load_causal_lm(model_cfg(), 97, torch.float32, "sdpa", 0, name_or_path=str(tmp_path))
    assert model.config.vocab_size == 97


def test_missing_tokenizer(tmp_path):
    with pytest.raises(ModelLoadError, match=rf"model.tokenizer='{tmp_path}': cannot load a tokenizer"):
        load_tokenizer(model_cfg(tokenizer=str(tmp_path)))


def test_remote_code_is_off_unless_asked():
    assert compose([]).model.trust_remote_code is False
    assert all(compose([f"recipe={r}"]).model.trust_remote_code is False
               for r in ("tulu_dpo", "smollm2_hh_dpo", "ultrafeedback_rm"))


def test_conversational_rows_need_a_chat_template(tmp_path):
    import json

    from ppo_train.data.sources import load_examples
    from ppo_train.data.tokenize import tokenize_examples

    tok = load_tokenizer(model_cfg())
    tok.chat_template = None
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                "chosen": [{"role": "assistant", "content": "a"}],
                                "rejected": [{"role": "assistant", "content": "b"}]}) + "\n")
    cfg = compose([f"dataset.path={path}", "dataset.format=preference"]).dataset
    examples, _ = load_examples(cfg)
    with pytest.raises(DataError, match="row 0: conversational data needs a chat template"):
        tokenize_examples(examples, tok, cfg)


def test_cli_prints_data_errors_in_one_line_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "same", "rejected": "same"}\n')
    out = subprocess.run([sys.executable, "-m", "ppo_train", f"dataset.path={bad}", "dataset.format=preference",
                          "dataset.on_invalid=error", "logging.progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"pptrain: {bad} row 0: chosen is identical to rejected" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_lists_groups_and_options(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ppo_train", "--help"], cwd=tmp_path, env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for line in ("packing: ffd, none, sorted", "layout: paired, shared, unmasked", "loss: dpo, kto, orpo, reward, sft, simpo"):
        assert line in out.stdout, out.stdout[:2000]


@pytest.mark.parametrize("model_type, overrides, needle", [
    ("gemma2", {}, "final_logit_softcapping=30.0; attn_logit_softcapping=50.0"),
    ("cohere", {}, "logit_scale=0.0625"),
    ("granite", {"logits_scaling": 8.0}, "logits_scaling=8.0"),
    ("mistral", {"sliding_window": 64}, "sliding_window=64 shorter than the longest prompt + response (100 tokens"),
    ("gemma3_text", {"sliding_window": 64}, "sliding_window=64"),
])
def test_architectures_whose_log_probs_pptrain_would_get_wrong_are_refused(model_type, overrides, needle):
    from transformers import AutoConfig

    from ppo_train.model import architecture_problems

    config = AutoConfig.for_model(model_type, **overrides)
    assert needle in "; ".join(architecture_problems(config, longest_sequence=100))


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}), ("qwen2", {}), ("qwen3", {}), ("granite", {}),
    ("mistral", {"sliding_window": 4096}),      # a window longer than every sequence never binds
    ("qwen2", {"sliding_window": 64}),          # use_sliding_window is off
])
def test_supported_architectures_pass(model_type, overrides):
    from transformers import AutoConfig

    from ppo_train.model import architecture_problems

    assert architecture_problems(AutoConfig.for_model(model_type, **overrides), longest_sequence=100) == []


def test_loading_a_soft_capped_model_fails_with_the_reason():
    cfg = model_cfg(from_config={"model_type": "gemma2", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "head_dim": 16})
    with pytest.raises(ModelLoadError, match=r"model_type gemma2: final_logit_softcapping=30.0.*"
                                             r"tested architectures: llama, qwen2, mistral"):
        load_causal_lm(cfg, 97, torch.float32, "sdpa", 0)
