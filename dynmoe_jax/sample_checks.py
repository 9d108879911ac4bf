"""The limits of a sampling request, shared by the command line (checked before JAX loads)
and ``inference.sample_workdir`` / ``sample_file`` (checked before a checkpoint is read)."""

from __future__ import annotations

import math
from pathlib import Path

from dynmoe_jax.validation import check, invalid

# Keeps the key/value cache's static shape sane; RoPE itself has no largest position.
MAX_NEW_TOKENS = 1 << 15


def check_max_new_tokens(value: int, field: str = "max_new_tokens") -> None:
    """One line naming ``field`` unless value is an integer in 1..MAX_NEW_TOKENS."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_NEW_TOKENS
    check(ok, field, value, f"an integer in 1..{MAX_NEW_TOKENS}")


def check_temperature(value: float, field: str = "temperature") -> None:
    """One line naming ``field`` unless value is a finite number >= 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    check(ok and math.isfinite(value) and value >= 0, field, value, "a number >= 0 (0 = greedy)")


def read_prompts(path: str | Path, field: str = "--prompts_file") -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped); one line naming
    ``field`` when the file is missing, unreadable or holds no prompt."""
    file = Path(path)
    if not file.is_file():
        invalid(field, str(path), "a text file with one prompt per line")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        invalid(field, str(path), f"a readable UTF-8 text file ({type(e).__name__})")
    prompts = [line for line in lines if line.strip()]
    check(bool(prompts), field, str(path), "a file with at least one non-blank line")
    return prompts
