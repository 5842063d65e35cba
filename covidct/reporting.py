"""Markdown for every report: one table writer and one way to show a figure with its confidence interval."""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def fmt_ci(value: float, ci: Sequence[float] | None = None, digits: int = 3, label: str = "") -> str:
  """`0.870 (0.812-0.921)`; `label` goes inside the brackets (e.g. "95% CI "). No interval when it is missing or NaN."""
  s = f"{value:.{digits}f}"
  if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci[:2]):
    return s
  return f"{s} ({label}{ci[0]:.{digits}f}-{ci[1]:.{digits}f})"


def table(header: Sequence[str], rows: Iterable[Sequence], align: str = "") -> str:
  """A Markdown table. `align` has one letter per column: l (default for the first) or r (default for the rest)."""
  header = [str(h) for h in header]
  align = align or "l" + "r" * (len(header) - 1)
  rule = ["---:" if a == "r" else "---" for a in align]
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
