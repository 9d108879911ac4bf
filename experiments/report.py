"""Writers of the experiments' results: JSON-safe values, markdown tables, the results files
and the command line that produced them (plots: ``plots.py``)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "experiments" / "results"


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays as lists and non-finite floats as None (valid JSON)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; every row must have one cell per header column."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(
    stem: str,
    title: str,
    tables: dict[str, tuple[Sequence[str], Sequence[Sequence[Any]]]],
    data: dict[str, Any],
    command: str,
    results_dir: Path = RESULTS_DIR,
) -> tuple[Path, Path]:
    """Writes ``stem.md`` (a title, the command and each named table) and ``stem.json`` (the
    raw numbers, with the command)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n", f"Command: `{command}`\n"]
    for name, (header, rows) in tables.items():
        parts.append(f"## {name}\n\n" + markdown_table(header, rows))
    md = results_dir / f"{stem}.md"
    md.write_text("\n".join(parts))
    js = results_dir / f"{stem}.json"
    js.write_text(json.dumps(jsonable({"command": command, **data}), indent=1) + "\n")
    return md, js


def command_line(module: str) -> str:
    """How the script ``module`` (e.g. 'experiments.compare_routers') was invoked, for the
    results files."""
    return " ".join([".venv/bin/python", "-m", module, *sys.argv[1:]])


def aligned_series(
    records_per_seed: Sequence[list[dict]], key: str
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values [seeds, steps]) of ``key`` over the steps every seed logged."""
    common = sorted(set.intersection(*[{r["step"] for r in recs} for recs in records_per_seed]))
    values = [
        [next(r[key] for r in recs if r["step"] == s) for s in common] for recs in records_per_seed
    ]
    return np.asarray(common), np.asarray(values, np.float64)
