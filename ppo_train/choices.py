"""Choice: the base of every config Enum.

OmegaConf checks an Enum field while Hydra composes and lists the valid names in its error
(`packing.name=fdd` fails before anything runs). Members are named as they are spelled in
configs, and the `str` base makes a member compare, hash and print as that spelling, so code
reads `cfg.packing.name == "ffd"` and f-strings print `ffd`.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
