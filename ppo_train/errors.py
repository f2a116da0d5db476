"""Errors a user can act on: the command line prints their message, without a traceback.

Each names what is wrong (file, row, config key, step) and what to do. Anything else that
escapes is a bug in pptrain and keeps its traceback.
"""

from __future__ import annotations

from safetensors import SafetensorError

# What a failed write raises: OSError itself, torch.save's RuntimeError, safetensors' own error.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class PptrainError(Exception):
    """Base class: printed as `pptrain: <message>`, exit code 1 (2 for the config)."""

    exit_code = 1


class ConfigError(PptrainError, ValueError):
    """One error listing every problem found in a composed config."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the config:\n{lines}")


class DataError(PptrainError, ValueError):
    """A bad row or file; the message names the file, the row and the field."""


class ModelLoadError(PptrainError, RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names the config key."""


class NonFiniteLoss(PptrainError, FloatingPointError):
    """A NaN or inf loss under trainer.on_nonfinite=error; names the step and the source rows."""


class SaveFailed(PptrainError, RuntimeError):
    """A checkpoint or model export that could not be written; the previous checkpoint is intact."""


class ResumeError(PptrainError, RuntimeError):
    """A checkpoint that cannot be resumed: missing, damaged, or from another job (data plan or optimization)."""


class SelfCheckFailed(PptrainError, RuntimeError):
    """The first micro-batch's scores through the training path (packing, mask, attention kernel,
    head) differ from plain separate forwards of the model past the precision's tolerance
    (ppo_train/selfcheck.py); names the device, kernel, precision and worst difference."""
