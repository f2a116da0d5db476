"""Loading and tokenizing: the TRL formats, the shared-prefix convention, the length policy."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from ppo_train.data.sources import DataError, load_examples, split_implicit
from ppo_train.data.tokenize import tokenize_examples
from ppo_train.fileio import asset_path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(asset_path("smollm2")))


def dcfg(path, **kw):
    """The dataset group's defaults (DatasetConfig) with long length limits and `kw` on top."""
    from ppo_train.config import DatasetConfig

    base = dict(path=str(path), max_prompt_length=4096, max_response_length=4096)
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), {**base, **kw})


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_string_preference_convention(tmp_path, tok):
    """Prompt with the tokenizer's specials, responses without, each ending in EOS; ids are
    exactly tokenize(prompt) + tokenize(response) + [eos]."""
    path = write_jsonl(tmp_path, [{"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5."}])
    examples, _ = load_examples(dcfg(path))
    (ex,), report = tokenize_examples(examples, tok, dcfg(path))
    assert ex.prompt_ids == tok("What is 2+2?")["input_ids"]
    assert ex.response_ids[0] == tok(" 4.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.response_ids[1][-1] == tok.eos_token_id and ex.pairs == [(0, 1)]


def test_conversational_uses_chat_template_and_single_eos(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "Hi"}],
             "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}]
    path = write_jsonl(tmp_path, rows)
    examples, _ = load_examples(dcfg(path))
    (ex,), _ = tokenize_examples(examples, tok, dcfg(path))
    prompt_text = tok.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex.prompt_ids) == prompt_text
    assert tok.decode(ex.response_ids[0]) == "Hello!<|im_end|>"
    assert ex.response_ids[0].count(tok.eos_token_id) == 1


def test_implicit_prompt_from_messages_and_strings():
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    p, a, b = split_implicit(turns + [{"role": "assistant", "content": "yes"}],
                             turns + [{"role": "assistant", "content": "no"}], "", "x")
    assert p == turns and a[0]["content"] == "yes" and b[0]["content"] == "no"
    p, a, b = split_implicit("\n\nHuman: hi\n\nAssistant: I am fine", "\n\nHuman: hi\n\nAssistant: I am not",
                             "\n\nAssistant:", "x")
    assert p == "\n\nHuman: hi\n\nAssistant:" and a == " I am fine" and b == " I am not"


def test_hh_rlhf_real_rows(tok):
    path = asset_path("hh_rlhf/harmless_base_600.jsonl")
    examples, report = load_examples(dcfg(path, num_rows=200, on_invalid="skip", format="implicit"))
    assert report.rows == 200 and report.kept + report.skipped == 200 and report.kept > 190
    first = json.loads(path.open().readline())
    assert examples[0].prompt + examples[0].responses[0] == first["chosen"]
    assert examples[0].prompt.endswith("\n\nAssistant:")


def test_ultrafeedback_and_sharegpt_real_rows(tok):
    uf, _ = load_examples(dcfg(asset_path("ultrafeedback/binarized_sample_200.jsonl"), num_rows=20))
    assert uf[0].conversational is False and isinstance(uf[0].prompt, str) and len(uf[0].responses) == 2
    lf, _ = load_examples(dcfg(asset_path("llamafactory/dpo_en_demo_120.json"), num_rows=20))
    assert lf[0].conversational and lf[0].prompt[-1]["role"] == "user"
    tokenized, _ = tokenize_examples(lf, tok, dcfg("x"))
    assert all(t.response_ids[0][-1] == tok.eos_token_id for t in tokenized)


def test_length_policy_counts_truncations_and_drops(tmp_path, tok):
    rows = [{"prompt": "word " * 50, "chosen": " yes " * 40, "rejected": " no"},
            {"prompt": "short", "chosen": " a", "rejected": " b"}]
    path = write_jsonl(tmp_path, rows)
    examples, _ = load_examples(dcfg(path))
    kept, rep = tokenize_examples(examples, tok, dcfg(path, max_prompt_length=10, max_response_length=8))
    assert rep.truncated_prompts == 1 and rep.truncated_responses == 1 and rep.dropped_too_long == 0
    assert len(kept[0].prompt_ids) == 10 and len(kept[0].response_ids[0]) == 8
    assert kept[0].prompt_ids == tok("word " * 50)["input_ids"][-10:]  # the prompt keeps its end
    kept, rep = tokenize_examples(examples, tok, dcfg(path, max_prompt_length=10, length_policy="drop"))
    assert rep.dropped_too_long == 1 and len(kept) == 1


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "p", "chosen": "", "rejected": "x"}, "chosen: empty"),
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, needle):
    path = write_jsonl(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as err:
        load_examples(dcfg(path, format="preference"))
    assert str(path) in str(err.value) and "row 1" in str(err.value) and needle in str(err.value)
    examples, report = load_examples(dcfg(path, format="preference", on_invalid="skip"))
    assert len(examples) == 1 and report.skipped == 1


@pytest.mark.parametrize("row,needle", [
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "robot", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "chosen[0].role: unknown role 'robot'"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "chosen: no final assistant turn"),
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "chosen: expected a string or a non-empty list"),
])
def test_bad_conversational_rows(tmp_path, row, needle):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([row]))
    with pytest.raises(DataError) as err:
        load_examples(dcfg(path, format="preference"))
    assert f"{path} row 0" in str(err.value) and needle in str(err.value), str(err.value)


def test_scored_lists_form_all_strict_pairs_and_count_ties(tmp_path):
    from ppo_train.data.sources import pairs_from_scores

    pairs, ties = pairs_from_scores([3.0, 1.0, 3.0, 2.0])
    assert sorted(pairs) == [(0, 1), (0, 3), (2, 1), (2, 3), (3, 1)] and ties == 1
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 1, 1]},
            {"prompt": "q", "responses": ["a", "b", "c", "d", "e"], "scores": [5, 4, 4, 1, 0]}]
    path = write_jsonl(tmp_path, rows)
    examples, report = load_examples(dcfg(path, on_invalid="skip", max_responses=4))
    assert report.tied_rows == 1 and report.capped_responses == 1 and report.tied_pairs == 1
    assert len(examples) == 1 and len(examples[0].responses) == 4 and len(examples[0].pairs) == 5
    # eight scored responses per prompt (AlpacaEval's shape), with ties among the scores
    rng = __import__("random").Random(3)
    rows = [{"prompt": f"p{i}", "responses": [f"r{i}-{j}" for j in range(8)],
             "scores": [rng.choice([0.1, 0.5, 0.9, 0.9]) + rng.randrange(3) for _ in range(8)]} for i in range(10)]
    ranked, rep = load_examples(dcfg(write_jsonl(tmp_path, rows, "k8.jsonl")))
    assert rep.kept == 10 and all(len(e.responses) == 8 for e in ranked)
    for ex, row in zip(ranked, rows):
        s = row["scores"]
        assert ex.scores == s and all(s[w] > s[l] for w, l in ex.pairs)
        assert len(ex.pairs) + sum(s[i] == s[j] for i in range(8) for j in range(i + 1, 8)) == 28


@pytest.mark.slow
def test_alpaca_eval_ranked_real_rows(shared_data):
    """AlpacaEval K = 8 (CC BY-NC 4.0, so not bundled): read from ../shared/data when present."""
    alpaca, rep = load_examples(dcfg(shared_data / "alpaca_eval" / "ranked_k8_dev.jsonl", num_rows=10))
    assert rep.kept == 10 and all(len(e.responses) == 8 for e in alpaca)
    s = alpaca[0].scores
    assert all(s[w] > s[l] for w, l in alpaca[0].pairs)
    assert len(alpaca[0].pairs) + sum(s[i] == s[j] for i in range(8) for j in range(i + 1, 8)) == 28


def test_pandalm_majority_and_ties():
    path = asset_path("pandalm/testset_v1_300.json")
    examples, report = load_examples(dcfg(path, on_invalid="skip"))
    raw = json.loads(path.read_text())
    row = raw[examples[0].index]
    votes = [row[f"annotator{i}"] for i in (1, 2, 3)]
    want = (0, 1) if votes.count(1) > votes.count(2) else (1, 0)
    assert examples[0].pairs == [want] and report.tied_rows > 0
    assert report.kept + report.skipped == report.rows == 300


GOOD = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()


@pytest.mark.parametrize("line,needle", [
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "undecodable text: byte 0xe9 at column 16 is not UTF-8"),
    (b'{"prompt": "x \\ud800 y", "chosen": "a", "rejected": "b"}', "undecodable text: a lone surrogate \\ud800"),
    (b'{"prompt": "x", "chosen": "a", "rejected": "b\\udc00"}', "undecodable text: a lone surrogate \\udc00"),
    (b'{"prompt": "cut off', "not JSON (Unterminated string"),
    (b'["p", "a", "b"]', "expected a JSON object per line, got list"),
])
def test_undecodable_or_malformed_lines_name_file_row_and_line(tmp_path, monkeypatch, line, needle):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "d.jsonl"
    # a blank line is not a row: the bad line is line 4 and row 2
    path.write_bytes(b"\n".join([GOOD, GOOD, b"", line, GOOD]) + b"\n")
    with pytest.raises(DataError) as err:
        load_examples(dcfg(path, format="preference"))
    assert f"{path} row 2 (line 4): " in str(err.value) and needle in str(err.value), str(err.value)
    examples, report = load_examples(dcfg(path, format="preference", on_invalid="skip"))
    assert [e.index for e in examples] == [0, 1, 3] and report.skipped == 1 and report.rows == 4
    assert f"{path} row 2 (line 4): " in report.skip_messages[0] and needle in report.skip_messages[0]


def test_surrogate_pairs_are_text_not_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "smile \\ud83d\\ude00", "chosen": "a", "rejected": "b"}\n')
    (ex,), _ = load_examples(dcfg(path, format="preference"))
    assert ex.prompt == "smile \U0001F600"


def test_undecodable_json_document_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n {"prompt": "p", "chosen": "a", "rejected": "b"},\n {"prompt": "\xff", "chosen": "a", '
                     b'"rejected": "b"}\n]\n')
    with pytest.raises(DataError, match=rf"{path} line 3: undecodable text: byte 0xff"):
        load_examples(dcfg(path, format="preference", on_invalid="skip"))
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p" "chosen": "a"}]')
    with pytest.raises(DataError, match=rf"{path} line 1 column \d+: not JSON"):
        load_examples(dcfg(path, format="preference"))
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "\\udfff", "chosen": "a", '
                    '"rejected": "b"}]')
    with pytest.raises(DataError, match=rf"{path} row 1: undecodable text: a lone surrogate"):
        load_examples(dcfg(path, format="preference"))


def test_eval_file_counts_and_skip_reasons_are_reported(tmp_path, monkeypatch, tok):
    from ppo_train.cli import compose
    from ppo_train.inputs import prepare

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_path.write_bytes(b"\n".join([GOOD] * 6 + [b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}']) + b"\n")
    eval_path.write_bytes(b"\n".join([GOOD, b'{"prompt": "p", "chosen": "a", "rejected": "a"}', GOOD]) + b"\n")
    cfg = compose([f"dataset.path={train_path}", f"dataset.eval_path={eval_path}", "dataset.format=preference",
                   "dataset.on_invalid=skip", "packing.row_tokens=1024"])
    data = prepare(cfg, tok)
    report = data.report()
    assert report["rows"] == 7 and report["invalid_skipped"] == 1 and report["train_examples"] == 6
    assert report["eval_file_rows"] == 3 and report["eval_file_invalid_skipped"] == 1 and report["eval_examples"] == 2
    reasons = data.skipped_rows()
    assert len(reasons) == 2 and "row 6 (line 7): undecodable text" in reasons[0] and "identical" in reasons[1]


@pytest.mark.parametrize("first, second, needle", [
    ([1.0, 0.5], [1.0, float("nan")], "row 1.scores: expected 2 finite numbers"),  # parquet keeps a NaN
    ([True, False], [False, True], "row 0.scores: expected 2 finite numbers"),
    ([1.0, 0.5], [1.0], "row 1.scores: expected 2 finite numbers"),
    ([1.0, 0.5], {"a": 1}, "row 1.scores: expected 2 finite numbers"),  # another type than row 0's
])
def test_bad_scores_are_named_not_turned_into_ties(tmp_path, first, second, needle):
    import math

    import datasets

    rows = [{"prompt": "p", "responses": ["a", "b"], "scores": first},
            {"prompt": "q", "responses": ["a", "b"], "scores": second}]
    if any(isinstance(x, float) and math.isnan(x) for x in second):
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path = write_jsonl(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_examples(dcfg(path, format="scored"))
    assert f"{path} {needle}" in str(err.value), str(err.value)


def test_rows_whose_fields_change_type_are_checked_row_by_row(tmp_path):
    """datasets keeps a field whose JSON type changes between rows (its Json feature), so each
    row is judged by its own values."""
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
            {"prompt": "r", "chosen": True, "rejected": "c"},
            {"prompt": "s", "chosen": "a", "rejected": "c"}]
    path = write_jsonl(tmp_path, rows)
    examples, report = load_examples(dcfg(path, format="preference", on_invalid="skip"))
    assert [e.index for e in examples] == [0, 3] and report.skipped == 2
    assert "row 1: prompt, chosen and rejected mix strings and message lists" in report.skip_messages[0]
    assert "row 2.chosen: expected a string or a non-empty list of messages, got bool" in report.skip_messages[1]


def test_json_lines_under_a_json_name_are_read_and_scanned_by_line(tmp_path, monkeypatch):
    """datasets reads a .json file in JSON Lines form; so does the check (by line, not as one document)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "d.json"
    path.write_bytes(b"\n".join([GOOD, GOOD]) + b"\n")
    examples, _ = load_examples(dcfg(path, format="preference"))
    assert len(examples) == 2
    path.write_bytes(b"\n".join([GOOD, b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}', GOOD]) + b"\n")
    with pytest.raises(DataError, match=rf"{path} row 1 \(line 2\): undecodable text"):
        load_examples(dcfg(path, format="preference"))
    examples, report = load_examples(dcfg(path, format="preference", on_invalid="skip"))
    assert [e.index for e in examples] == [0, 2] and report.skipped == 1


def test_a_recipes_format_on_a_users_file_names_the_format_its_columns_read_as(tmp_path):
    """The default recipe's bundled data sets dataset.format=implicit; a user's own dataset.path
    in another format fails in one line that names the format its columns read as: missing
    columns before anything is tokenized, a file whose every row fails (a `prompt` column that
    implicit ignores) when nothing is left. Both the store and the in-process path say it."""
    from ppo_train.cli import compose
    from ppo_train.inputs import prepare
    from ppo_train.model import load_tokenizer

    unpaired, preference = tmp_path / "u.jsonl", tmp_path / "p.jsonl"
    unpaired.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": " A.", "label": True}) + "\n"
                                for i in range(4)))
    preference.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": " Yes.", "rejected": " No."}) + "\n"
                                  for i in range(4)))
    wants = {unpaired: "dataset.format=implicit expects the columns ['chosen', 'rejected'], but the file lacks "
                       "['chosen', 'rejected']; its columns read as format 'unpaired': set dataset.format=unpaired",
             preference: "no valid rows (4 rows, 4 invalid; the first:"}
    for path, want in wants.items():
        cfg = compose([f"dataset.path={path}", f"dataset.cache_dir={tmp_path / 'cache'}"])
        assert cfg.dataset.format == "implicit"
        for load in (lambda: prepare(cfg, load_tokenizer(cfg.model)), lambda: load_examples(cfg.dataset)):
            with pytest.raises(DataError) as err:
                load()
            assert want in str(err.value) and "\n" not in str(err.value), str(err.value)
            if path == preference:
                assert str(err.value).endswith("its columns read as format 'preference': set dataset.format="
                                               "preference or auto"), str(err.value)
