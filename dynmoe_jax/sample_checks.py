"""The limits of a sampling request, shared by the command line (checked before JAX loads)
and ``inference.sample_workdir`` / ``sample_file`` (checked before a checkpoint is read)."""

from __future__ import annotations

import json
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


PLAIN, JSONL = "text", "JSON Lines"  # the two formats a prompts file may have


def read_prompts(path: str | Path, field: str = "--prompts_file") -> list[str]:
    """The prompts of ``path`` (``read_prompt_file``), without its format."""
    return read_prompt_file(path, field)[0]


def read_prompt_file(path: str | Path, field: str = "--prompts_file") -> tuple[list[str], str]:
    """(prompts, format) of a prompts file: plain text, one prompt per line, or JSON Lines,
    one ``{"prompt": ...}`` object per line (a file whose first non-blank line is a JSON object
    is read as JSON Lines); blank lines are skipped. One line naming ``field`` when the file is
    missing, unreadable, holds no prompt or is JSON Lines with a line that is not a prompt."""
    file = Path(path)
    if not file.is_file():
        invalid(field, str(path), "a text file with one prompt per line")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        invalid(field, str(path), f"a readable UTF-8 text file ({type(e).__name__})")
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    check(bool(numbered), field, str(path), "a file with at least one non-blank line")
    if not numbered[0][1].lstrip().startswith("{"):
        return [line for _, line in numbered], PLAIN
    return [_json_prompt(line, n, path, field) for n, line in numbered], JSONL


def _json_prompt(line: str, number: int, path: str | Path, field: str) -> str:
    """The prompt of one JSON Lines record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str) or not prompt:
        allowed = f'JSON Lines of {{"prompt": "non-empty text"}} (line {number} is not)'
        invalid(field, str(path), allowed)
    return prompt
