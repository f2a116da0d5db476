"""`loss=kto` (ppo_train/losses/kto.py, ppo_train/data/kto.py): the loss against a float64 hand
computation, the step's KL estimate split over micro-batches, the KL partners and labels of the
KTO view of unpaired and paired data, shared + ffd equal to paired + none in loss and gradients,
the unpaired format's loading and refusals, and (slow) TRL 1.16's own KTOTrainer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ppo_train.data.examples import Examples
from ppo_train.data.kto import kto_examples
from ppo_train.data.tokenize import TokenizedExample
from ppo_train.errors import DataError
from ppo_train.logps import ResponseLogps
from ppo_train.losses.common import StepTotals
from ppo_train.losses.kto import kto_loss, kto_step_stats
from tests.conftest import random_examples, tiny_model


def cfg(beta=0.1, desirable=1.0, undesirable=1.0):
    return OmegaConf.create({"name": "kto", "beta": beta, "desirable_weight": desirable,
                             "undesirable_weight": undesirable})


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand(pol, ref, pairs, labels, beta, wd, wu):
    """Per completion, plain float math: KTO eq. 7 with z0 = max(0, mean KL log-ratio)."""
    kl = [float(pol[b] - ref[b]) for _, b in pairs]
    z0 = max(0.0, sum(kl) / len(kl))
    out = []
    for (a, _), y in zip(pairs, labels):
        r = float(pol[a] - ref[a])
        out.append(wd * (1 - sig(beta * (r - z0))) if y else wu * (1 - sig(beta * (z0 - r))))
    return out, z0


@pytest.mark.parametrize("shift", [-3.0, 3.0])  # z0 > 0, and a negative mean clamped to 0
def test_kto_equals_the_hand_formula_and_splits_like_one_batch(shift):
    gen = torch.Generator().manual_seed(2)
    n = 6  # 6 labelled completions, responses 0..5 theirs, 6..11 their KL completions
    pol_base = -10 * torch.rand(2 * n, generator=gen, dtype=torch.float64)
    ref = pol_base + torch.randn(2 * n, generator=gen, dtype=torch.float64)
    ref[n:] += shift  # moves the KL log-ratios' mean
    pairs = torch.tensor([[i, n + i] for i in range(n)])
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    beta, wd, wu = 0.7, 1.3, 0.6
    c = cfg(beta, wd, wu)
    pol = ResponseLogps(pol_base.clone().requires_grad_(), torch.ones(2 * n))
    refl = ResponseLogps(ref, torch.ones(2 * n))
    got, metrics = kto_loss(pol, refl, pairs, c, labels=labels)
    want, z0 = hand(pol_base.tolist(), ref.tolist(), pairs.tolist(), labels.tolist(), beta, wd, wu)
    assert torch.allclose(got.detach(), torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert abs(float(metrics["kl"][0]) - z0) < 1e-12 and (z0 == 0.0) == (shift > 0)
    good = labels.bool()
    r = (pol_base - ref)[:n]
    # per completion, NaN where the label differs: the trainer's means are within each label
    assert abs(float(metrics["rewards/chosen"].nanmean()) - beta * float(r[good].mean())) < 1e-12
    assert abs(float(metrics["rewards/rejected"].nanmean()) - beta * float(r[~good].mean())) < 1e-12
    from ppo_train.dist import SINGLE
    from ppo_train.metrics import StepMetrics

    tracker = StepMetrics()
    tracker.add_pairs(got, metrics)
    row = tracker.reduce(SINGLE)
    assert abs(row["rewards/margins"] - beta * float(r[good].mean() - r[~good].mean())) < 1e-12
    tracker = StepMetrics()  # a step with desirable completions only: no rejected means
    tracker.add_pairs(got[good], {k: v[good] for k, v in metrics.items()})
    row = tracker.reduce(SINGLE)
    assert row["rewards/rejected"] is None and row["rewards/margins"] is None and row["rewards/chosen"] is not None
    (g_whole,) = torch.autograd.grad(got.mean(), pol.sums)
    assert float(g_whole[n:].abs().max()) == 0.0  # the KL estimate is detached

    # two micro-batches of the same step with the step's table: the same sum and gradient
    table = kto_step_stats(pol, refl, pairs, c, labels)
    totals = StepTotals(n, n, 0, table)
    pol2 = ResponseLogps(pol_base.clone().requires_grad_(), torch.ones(2 * n))
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    parts = [kto_loss(pol2, refl, pairs[order[s]], c, totals=totals.for_batch(order[s]), labels=labels[order[s]])[0]
             for s in (slice(0, 2), slice(2, None))]
    split = torch.cat(parts).sum() / n
    assert abs(float(split.detach()) - float(got.detach().mean())) < 1e-12
    (g_split,) = torch.autograd.grad(split, pol2.sums)
    assert torch.allclose(g_split, g_whole, atol=1e-15)


def test_the_kto_view_of_unpaired_and_paired_examples():
    """Each example keeps its own completions and gets the previous example's (cyclic) as KL
    completions; one (completion, KL completion) pair per own completion; labels from the
    unpaired score, or chosen 1 / rejected 0; the per-example arrays match the examples."""
    unpaired = [TokenizedExample(i, [1, 2, i], [[10 + i] * (i + 1)], [], [float(i % 2)]) for i in range(4)]
    view = kto_examples(Examples.from_list(unpaired), "u.jsonl")
    for i in range(4):
        ex = view[i]
        assert ex.response_ids == [[10 + i] * (i + 1), [10 + (i - 1) % 4] * ((i - 1) % 4 + 1)]
        assert ex.pairs == [(0, 1)] and ex.labels == [float(i % 2)]
    paired = [TokenizedExample(i, [5, i], [[20 + i] * 2, [30 + i] * (i + 1)], [(1, 0)] if i == 2 else [(0, 1)])
              for i in range(3)]
    view = kto_examples(Examples.from_list(paired), "p.jsonl")
    ex = view[0]
    assert ex.response_ids[2:] == paired[2].response_ids and ex.pairs == [(0, 2), (1, 3)]
    assert ex.labels == [1.0, 0.0] and view[2].labels == [0.0, 1.0]  # row 2 prefers its second response
    flat = [len(r) for i in range(3) for r in view[i].response_ids]
    assert view.flat_response_lengths.tolist() == flat
    assert view.num_pairs.tolist() == [2, 2, 2] and view.shared_length.tolist() == [view[i].shared_length
                                                                                   for i in range(3)]
    ranked = [TokenizedExample(0, [1], [[2], [3], [4]], [(0, 1), (0, 2), (1, 2)])]
    with pytest.raises(DataError, match="r.jsonl row 0: loss=kto reads labelled completions or pairs"):
        kto_examples(Examples.from_list(ranked), "r.jsonl")


def _kto_run(examples, layout, packing_name):
    """Total loss and gradients of one step over every unit (KTO view), as the trainer sums it."""
    from ppo_train.data.collate import collate
    from ppo_train.data.layout import Units
    from ppo_train.data.packing import plan_epoch
    from ppo_train.masks import build_mask
    from ppo_train.scoring import PolicyModule, forward_scores

    packing = OmegaConf.create({"name": packing_name, "row_tokens": 512, "rows_per_batch": 2, "pad_multiple": 128})
    units = Units(kto_examples(Examples.from_list(examples), "x"), layout)
    model = tiny_model("llama")
    module = PolicyModule(model, logits_chunk=16)
    batches = []
    for mb in plan_epoch(units, packing, 2, seed=5, epoch=0):
        batch = collate(units, mb, pad_id=96)
        batches.append((batch, forward_scores(module, batch, build_mask(batch.doc_ids, batch.segment_ids, "sdpa"))))

    def reference(batch, out):  # a fixed reference that differs per response
        return ResponseLogps(-(batch.response_unit.double() * 7 % 5) - batch.response_k.double() * 1.5, out.counts)

    total_pairs = sum(b.num_pairs for b, _ in batches)
    from ppo_train.train import pair_rows
    from ppo_train.data.schedule import Step

    step = Step(0, 0, [], total_pairs, list(range(len(units))))
    table = torch.zeros(total_pairs, 1, dtype=torch.float64)
    for batch, out in batches:
        table[pair_rows(step, units, batch)] = kto_step_stats(out, reference(batch, out), batch.pairs, cfg(0.5),
                                                              batch.pair_label)
    totals = StepTotals(total_pairs, len(units), 0, table)
    loss = 0.0
    for batch, out in batches:
        terms, _ = kto_loss(out, reference(batch, out), batch.pairs, cfg(0.5, 1.0, 1.4),
                            totals=totals.for_batch(pair_rows(step, units, batch)), labels=batch.pair_label)
        (terms.sum() / total_pairs).backward()
        loss += float(terms.detach().sum()) / total_pairs
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("unpaired", [False, True])
def test_kto_shared_packed_equals_paired(unpaired):
    """The KL completions as extra responses of the prompt's unit (shared rows, ffd) give the same
    loss and gradients as each (prompt, completion) as its own sequence (paired, none)."""
    examples = random_examples(7, 2, seed=12)
    if unpaired:
        examples = [TokenizedExample(e.index, e.prompt_ids, e.response_ids[:1], [], [float(e.index % 3 == 0)])
                    for e in examples]
    base_loss, base = _kto_run(examples, "paired", "none")
    loss, grads = _kto_run(examples, "shared", "ffd")
    assert abs(loss - base_loss) <= 1e-6
    scale = max(float(g.abs().max()) for g in base.values())
    worst = max(float((grads[n] - base[n]).abs().max()) for n in base)
    assert scale > 0 and worst <= 1e-4 * scale + 1e-6, (worst, scale)


def test_the_unpaired_format_loads_and_checks_its_labels(tmp_path):
    from ppo_train.data.sources import load_examples

    rows = [{"prompt": "Hi", "completion": " there.", "label": True},
            {"prompt": [{"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Go away."}], "label": False}]
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from ppo_train.cli import compose

    dcfg = compose([f"dataset.path={path}", "dataset.format=auto"]).dataset
    examples, report = load_examples(dcfg)
    assert [e.scores for e in examples] == [[1.0], [0.0]] and all(e.pairs == [] for e in examples)
    path.write_text(json.dumps({"prompt": "Hi", "completion": "x", "label": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"row 0\.label: expected true or false"):
        load_examples(dcfg)


def test_unpaired_rows_need_loss_kto(tmp_path):
    from ppo_train.cli import compose
    from ppo_train.inputs import prepare
    from ppo_train.model import load_tokenizer

    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": f" A{i}.", "label": i % 2 == 0}) + "\n"
                            for i in range(6)))
    overrides = [f"dataset.path={path}", "dataset.format=unpaired", f"dataset.cache_dir={tmp_path / 'cache'}"]
    cfg = compose(overrides)
    with pytest.raises(DataError, match="unpaired.*loss=kto"):
        prepare(cfg, load_tokenizer(cfg.model))
    cfg = compose(overrides + ["loss=kto"])
    data = prepare(cfg, load_tokenizer(cfg.model))
    assert len(data.units) == 6 and data.units.num_pairs.tolist() == [1] * 6
    assert np.array_equal(data.units.num_responses, np.full(6, 2))


# --- against TRL's own KTOTrainer (slow: needs the trl extra) ---

@pytest.mark.slow
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
def test_kto_equals_trl_ktotrainers_loss(weights, tmp_path):
    """TRL 1.16's KTOTrainer computes its loss on one batch of 4 unpaired rows (its own
    tokenization, KL completions and forwards; a reference model with other weights); pptrain's
    kto_loss on float64 plain forwards of the same sequences, with the same KL partners (the
    previous row's completion, cyclic), gives the same mean loss."""
    pytest.importorskip("trl")
    import datasets
    from trl import KTOConfig, KTOTrainer

    from ppo_train.fileio import asset_path
    from ppo_train.model import load_tokenizer

    tok = load_tokenizer(OmegaConf.create({"tokenizer": str(asset_path("smollm2")), "name_or_path": None,
                                           "revision": None, "trust_remote_code": False}))
    model = tiny_model("llama", vocab=len(tok), seed=0).train()
    reference = tiny_model("llama", vocab=len(tok), seed=1).eval()
    rows = [{"prompt": f"Question {i}: what is {i} plus {i + 2}?", "completion": f" It is {2 * i + 2}." + " Yes." * i,
             "label": i in (0, 3)} for i in range(4)]
    args = KTOConfig(output_dir=str(tmp_path), beta=0.3, desirable_weight=weights[0], undesirable_weight=weights[1],
                     report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=4, max_length=None,
                     seed=0, train_sampling_strategy="sequential")
    trainer = KTOTrainer(model=model, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))

        def sequences(prefix):
            """(ids, completion mask) of each row without padding."""
            out = []
            for ids, attn, comp in zip(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                                       batch[f"{prefix}completion_mask"]):
                keep = attn.bool()
                out.append((ids[keep], comp[keep]))
            return out

        def sums(m, prefix):
            values = []
            for ids, comp in sequences(prefix):
                logps = m(input_ids=ids[None]).logits[0, :-1].double().log_softmax(-1)
                values.append(float((logps.gather(-1, ids[1:, None]).squeeze(-1) * comp[1:]).sum()))
            return values

        # TRL's KL partner of row i is row i - 1's completion (cyclic): pptrain's rule
        completions = [ids[comp.bool()].tolist() for ids, comp in sequences("")]
        partners = [ids[comp.bool()].tolist() for ids, comp in sequences("KL_")]
        assert partners == [completions[(i - 1) % len(rows)] for i in range(len(rows))]
        own = {m: sums(m, "") for m in (trainer.model, reference)}
        kl = {m: sums(m, "KL_") for m in (trainer.model, reference)}
    n = len(rows)
    pol = ResponseLogps(torch.tensor(own[trainer.model] + kl[trainer.model], dtype=torch.float64), torch.ones(2 * n))
    ref = ResponseLogps(torch.tensor(own[reference] + kl[reference], dtype=torch.float64), torch.ones(2 * n))
    labels = torch.tensor([float(bool(x)) for x in batch["label"]])
    ours, _ = kto_loss(pol, ref, torch.tensor([[i, n + i] for i in range(n)]), cfg(0.3, *weights), labels=labels)
    assert abs(float(ours.mean()) - trl_loss) <= 1e-5 * max(1.0, abs(trl_loss)), (float(ours.mean()), trl_loss)
