"""Writing folders atomically: build under a temporary sibling name, rename at the end, remove on any failure."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil

from covidct.errors import CovidctError


def refuse_existing(out, overwrite: bool = False, inputs=()) -> None:
  """Raises unless `out` is free (or `overwrite`): checked before any slow work starts. Whatever `overwrite` says,
  `out` may not be one of the command's `inputs` nor a folder holding one: replacing it would delete what the
  command reads (`export RUN --out RUN --overwrite` once replaced a training run with its export)."""
  target = pathlib.Path(out).resolve()
  for given in inputs:
    source = pathlib.Path(given).resolve()
    if source == target or target in source.parents:
      raise CovidctError(f"output folder {out} {'is' if source == target else 'holds'} this command's input "
                         f"{given}; writing there would delete it. Choose another --out.")
  if pathlib.Path(out).exists() and not overwrite:
    raise CovidctError(f"output folder {out} exists; choose another or pass --overwrite.")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def remove_stale_partials(out) -> list[pathlib.Path]:
  """Removes what killed runs left beside `out` (`.NAME.partial-PID` of processes no longer alive); returns them."""
  out = pathlib.Path(out)
  removed = []
  for p in out.parent.glob(f".{out.name}.partial-*") if out.parent.is_dir() else []:
    pid = p.name.rsplit("-", 1)[-1]
    if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
      shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
      removed.append(p)
  return removed


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False):
  """Yields a temporary folder that becomes `out` when the block succeeds; nothing is left under `out` otherwise."""
  out = pathlib.Path(out)
  refuse_existing(out, overwrite)
  remove_stale_partials(out)
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


def sha256(path) -> str:
  """The SHA-256 of a file's bytes, as hex, read 1 MiB at a time."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def atomic_write(path, text: str) -> None:
  """Writes `text` to `path` through a temporary sibling and a rename: readers see the old file or the new one,
  never half of one, and a failure leaves no temporary file."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
  try:
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
