"""The serving folder `covidct push` writes and `covidct serve` reads: one folder per version (serving/<N>/), each
with the blessing record of its push."""

from __future__ import annotations

import pathlib

from covidct.errors import CovidctError
from covidct.manifest import read_json

BLESSING_FILE = "blessing.json"


def versions(serving_dir) -> list[dict]:
  """Pushed versions, oldest first, each with its blessing and metrics."""
  root = pathlib.Path(serving_dir)
  out = []
  if root.is_dir():
    for d in sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
      info = read_json(d / BLESSING_FILE, "a covidct blessing record",
                       f"restore it, or move version {d.name} out of {root}") if (d / BLESSING_FILE).exists() else {}
      if not isinstance(info, dict):
        raise CovidctError(f"{d / BLESSING_FILE}: not a covidct blessing record (a JSON {type(info).__name__}); "
                           f"restore it, or move version {d.name} out of {root}.")
      _check_blessing(info, d / BLESSING_FILE, f"restore it, or move version {d.name} out of {root}")
      out.append({"version": int(d.name), "path": str(d), **info})
  return out


def _check_blessing(info: dict, path, remedy: str) -> None:
  """The fields push and `push --list` read, each of its type: a changed record is one line, never a traceback."""
  def bad(what):
    raise CovidctError(f"{path}: {what}; {remedy}.")

  for key in ("blessed", "forced"):
    if key in info and not isinstance(info[key], bool):
      bad(f"'{key}' is not true or false")
  test = info.get("test", {})
  if not isinstance(test, dict):
    bad("'test' is not a record of figures")
  for key in ("roc_auc", "sensitivity", "specificity", "threshold"):
    value = test.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
      bad(f"test {key} {value!r} is not a number from 0 to 1")
  if "pushed" in info and not isinstance(info["pushed"], str):
    bad("'pushed' is not a time")
