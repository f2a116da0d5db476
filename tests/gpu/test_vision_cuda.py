"""Vision-language rows on the CUDA path (`make test-gpu`, part of `make gpu-check`): compiled
FlexAttention over shared, ffd-packed image units equals the model's own separate
`[images + prompt | response]` forwards (computed on the CPU in fp32), for the M-RoPE and the
LLaVA-style tiny model, with each prompt's images encoded once. The same check runs on the CPU
(unfused flex) in tests/equivalence/test_vision.py."""

from __future__ import annotations

import pytest
import torch

from tests.equivalence.test_shared_vs_paired import _compare
from tests.equivalence.test_vision import flex_image_logps, image_examples, model_of, separate_logps, tokenized

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_compiled_flex_image_logps_equal_separate_forwards(arch):
    examples = image_examples(8, 3, seed=11)
    want = separate_logps(model_of(arch), arch, examples, tokenized(arch, examples))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding is a convolution: keep it fp32
    try:
        got, encoded = flex_image_logps(arch, torch.device("cuda", 0), examples)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    _compare(got, want, 1e-3, f"compiled flex/ffd/{arch} on CUDA")
    assert encoded == sum(len(ex.images) for ex in examples)
