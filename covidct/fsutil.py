"""Writing folders atomically: build under a temporary sibling name, rename at the end, remove on any failure."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil

from covidct.errors import CovidctError


def refuse_existing(out, overwrite: bool = False) -> None:
  """Raises unless `out` is free (or `overwrite`): checked before any slow work starts."""
  if pathlib.Path(out).exists() and not overwrite:
    raise CovidctError(f"output folder {out} exists; choose another or pass --overwrite.")


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False):
  """Yields a temporary folder that becomes `out` when the block succeeds; nothing is left under `out` otherwise."""
  out = pathlib.Path(out)
  refuse_existing(out, overwrite)
  tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    yield tmp
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
