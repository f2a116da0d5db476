"""The fused output head (`LinearLogProbs`) against autograd through a plain log_softmax.

Values and both gradients (hidden states, head weight) in float64 ground truth, for the two
memory modes (recompute each chunk in the backward / keep the probabilities), chunk seams,
a non-uniform upstream gradient, a frozen head (LoRA), no response tokens, bf16 weights, and
the heads that must take the module path instead (biased, wrapped, ZeRO-3 partitioned).
"""

from __future__ import annotations

import pytest
import torch

from ppo_train.logps import LinearLogProbs, fusable, token_logps

H, V = 24, 97


def problem(n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 40, H, generator=g).to(dtype)
    head = torch.nn.Linear(H, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.7)
    index = torch.randperm(80, generator=g)[:n]
    targets = torch.randint(0, V, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, head, index, targets, upstream


def truth(hidden, weight, index, targets, upstream):
    """float64 autograd through log_softmax: values, d/dhidden, d/dweight."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    flat = h.reshape(-1, H)[index]
    out = torch.log_softmax(flat @ w.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


def ours(hidden, head, index, targets, upstream, chunk, recompute):
    h = hidden.detach().clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    out = token_logps(h, index, targets, head, chunk, recompute=recompute)
    (out.double() * upstream).sum().backward()
    return out.detach(), h.grad, next(head.parameters()).grad


def assert_close(got, want, name, rel=2e-6):
    """fp32 against float64: within `rel` of the largest magnitude (at least 1)."""
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    assert err <= rel * max(1.0, want.abs().max().item() if want.numel() else 0.0), (name, err)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chunk", [7, 16, 1024])
def test_values_and_gradients_equal_log_softmax(recompute, chunk):
    hidden, head, index, targets, upstream = problem(37)
    assert fusable(head)
    want = truth(hidden, head.weight, index, targets, upstream)
    got = ours(hidden, head, index, targets, upstream, chunk, recompute)
    for name, a, b in zip(("log-probs", "d hidden", "d weight"), got, want):
        assert a.dtype == torch.float32, name
        assert_close(a, b, name)


def test_both_memory_modes_agree_and_match_the_module_path():
    hidden, head, index, targets, upstream = problem(50, seed=3)
    keep = ours(hidden, head, index, targets, upstream, 16, recompute=False)
    again = ours(hidden, head, index, targets, upstream, 16, recompute=True)
    plain = ours(hidden, torch.nn.Sequential(head), index, targets, upstream, 16, recompute=True)  # module path
    for name, a, b, c in zip(("log-probs", "d hidden", "d weight"), keep, again, plain):
        assert_close(a, b.double(), name)
        assert_close(a, c.double(), name)


def test_a_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden, head, index, targets, upstream = problem(20, seed=1)
    head.weight.requires_grad_(False)
    _, d_hidden, d_weight = ours(hidden, head, index, targets, upstream, 8, recompute=False)
    want = truth(hidden, head.weight, index, targets, upstream)[1]
    assert d_weight is None
    assert_close(d_hidden, want, "d hidden")


def test_no_response_tokens_still_reach_the_head_with_a_zero_gradient():
    hidden, head, _, _, _ = problem(0)
    h = hidden.clone().requires_grad_()
    out = token_logps(h, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), head, 16)
    assert out.shape == (0,)
    out.sum().backward()  # what PolicyModule does for an empty micro-batch
    assert head.weight.grad is not None and not head.weight.grad.any()
    assert h.grad is not None and not h.grad.any()


def test_without_gradients_nothing_is_kept():
    hidden, head, index, targets, _ = problem(30, seed=2)
    with torch.no_grad():
        out = token_logps(hidden, index, targets, head, 8, recompute=False)
    want = truth(hidden, head.weight, index, targets, torch.ones(30, dtype=torch.float64))[0]
    assert out.grad_fn is None
    assert_close(out, want, "log-probs")


def test_bf16_weights_give_fp32_log_probs_close_to_the_truth():
    hidden, head, index, targets, upstream = problem(33, dtype=torch.bfloat16, seed=4)
    got = ours(hidden, head, index, targets, upstream, 8, recompute=True)
    want = truth(hidden, head.weight, index, targets, upstream)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    assert (got[0].double() - want[0]).abs().max().item() < 0.1  # bf16 logits: ~3 significant digits
    for a, b in zip(got[1:], want[1:]):
        assert (a.double() - b).abs().max().item() < 0.02 * b.abs().max().item()


def test_only_plain_whole_linear_heads_are_fused():
    head = torch.nn.Linear(H, V, bias=False)
    assert fusable(head)
    assert not fusable(torch.nn.Linear(H, V, bias=True))
    assert not fusable(torch.nn.Sequential(head))
    head.weight.ds_id = 7  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    assert not fusable(head)


def test_the_backward_is_the_autograd_function_not_a_graph_of_vocab_sized_ops():
    hidden, head, index, targets, _ = problem(12)
    out = token_logps(hidden.requires_grad_(), index, targets, head, 4, recompute=False)
    assert type(out.grad_fn).__name__ == LinearLogProbs.__name__ + "Backward"


@pytest.mark.parametrize("path", ["fused-recompute", "fused-keep", "module"])
def test_sum_of_squared_probabilities_for_wpo(path):
    """token_logps(sq=True) also gives log sum_v softmax_v^2 per position (WPO), equal to the
    float64 plain computation, on the fused head (both memory modes) and the module path (a
    biased head), with the log-probs and their gradients unchanged."""
    hidden, head, index, targets, upstream = problem(29, seed=4)
    if path == "module":
        biased = torch.nn.Linear(H, V, bias=True)
        with torch.no_grad():
            biased.weight.copy_(head.weight)
            biased.bias.normal_()
        head = biased
    assert fusable(head) == (path != "module")
    flat = hidden.double().reshape(-1, H)[index]
    logits = flat @ head.weight.detach().double().t()
    if head.bias is not None:
        logits = logits + head.bias.detach().double()
    want = torch.log((torch.softmax(logits, -1) ** 2).sum(-1))
    h = hidden.detach().clone().requires_grad_()
    out, sq = token_logps(h, index, targets, head, 8, recompute=path != "fused-keep", sq=True)
    assert not sq.requires_grad and sq.shape == out.shape
    assert_close(sq, want, "log sum p^2")
    plain = token_logps(hidden.detach().clone().requires_grad_(), index, targets, head, 8,
                        recompute=path != "fused-keep")
    assert torch.equal(out.detach(), plain.detach())
    (out.double() * upstream).sum().backward()
    assert torch.isfinite(h.grad).all()
