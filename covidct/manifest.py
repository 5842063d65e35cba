"""The export's `manifest.json` as a typed, versioned record, and the one way covidct reads a JSON file it wrote.

`covidct export` writes a Manifest; push, predict, bench and the pipeline read it with `Manifest.load`, which checks
its shape and schema version and turns any damage into one clear error instead of a KeyError later.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from covidct.errors import CovidctError
from covidct.fsutil import atomic_write

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 2  # 1: the unversioned manifests of earlier exports (same fields); 2: `schema_version` recorded


def read_json(path, what: str, remedy: str) -> Any:
  """The JSON value in `path`, or a CovidctError `"<path>: not <what> (<why>); <remedy>."` if it is unreadable.

  Args:
    path: the file.
    what: what the file should be, e.g. "a covidct manifest".
    remedy: what the user should do, e.g. "export the model again".
  Raises:
    CovidctError: the file is missing, not UTF-8 text or not valid JSON.
  """
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise CovidctError(f"{path} does not exist; {remedy}.") from None
  except IsADirectoryError:
    raise CovidctError(f"{path} is a folder, not {what}; {remedy}.") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CovidctError(f"{path} is not {what} ({type(e).__name__}: {str(e).splitlines()[0][:80]}); {remedy}.") from None


def write_json(path, value, indent: int | None = 2) -> None:
  """Writes `value` as JSON to `path` atomically (a temporary sibling, then a rename): never half a file."""
  atomic_write(path, json.dumps(value, indent=indent))


@dataclasses.dataclass(frozen=True)
class Manifest:  # pylint: disable=too-many-instance-attributes
  """What an export folder holds and what it means: one record per folder, written last by `covidct export`."""

  labels: list
  input: dict  # {"name", "dtype", "shape": [None, S, S, 1], ...}
  output: dict
  preprocessing: str
  operating_threshold: dict  # {"value", "target_sensitivity", "chosen_on"}
  metrics: dict  # {"saved_model": {"validation": ..., "test": ...}, <format>: {"test": ...}}
  artifacts: dict  # <format>: {"file", "bytes", "sha256", "parity", "test_vectors", ...}
  files: dict  # relative path: {"bytes", "sha256"}, every file but manifest.json
  created: str = ""
  source_model: str = ""
  quantization_aware: bool = False
  input_guard: dict | None = None
  parity_passed: bool = False
  parity_verified_on: str = ""
  resize_skew: list = dataclasses.field(default_factory=list)
  # The SavedModel's shortcut audit on the test split (covidct.audit.audit): what the model card tells users.
  shortcut_audit: dict | None = None
  libraries: dict = dataclasses.field(default_factory=dict)
  training_config: dict | None = None
  # `covidct bench`'s choice on the machine it ran on: the fastest artifact x runtime that passes parity.
  recommended: dict | None = None
  schema_version: int = SCHEMA_VERSION

  @property
  def threshold(self) -> float:
    return float(self.operating_threshold["value"])

  @property
  def image_size(self) -> int:
    return int(self.input["shape"][1])

  def artifact_path(self, folder, fmt: str) -> pathlib.Path:
    return pathlib.Path(folder) / self.artifacts[fmt]["file"]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def save(self, folder) -> pathlib.Path:
    path = pathlib.Path(folder) / MANIFEST_FILE
    write_json(path, self.to_dict())
    return path

  @classmethod
  def from_dict(cls, d, source: str = MANIFEST_FILE) -> "Manifest":
    """Checks the shape of a manifest read from `source`; raises CovidctError naming what is wrong."""
    bad = f"{source} is not a covidct manifest"
    if not isinstance(d, dict):
      raise CovidctError(f"{bad} (a JSON {type(d).__name__}, not an object); export again.")
    version = d.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
      raise CovidctError(f"{source} has schema version {version!r}; this covidct reads versions 1-{SCHEMA_VERSION}: "
                         "upgrade covidct, or export again with this one.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [f.name for f in fields.values() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in d]
    if missing:
      raise CovidctError(f"{bad} (missing {', '.join(missing)}); export again.")
    kw = {k: v for k, v in d.items() if k in fields}
    kw["schema_version"] = version
    m = cls(**kw)
    try:
      threshold = m.threshold
      size = m.image_size
      assert isinstance(m.artifacts, dict) and isinstance(m.files, dict) and isinstance(m.metrics, dict)
      assert all(isinstance(a, dict) and isinstance(a.get("file"), str) for a in m.artifacts.values())
    except (KeyError, TypeError, ValueError, IndexError, AssertionError):
      raise CovidctError(f"{bad} (its operating_threshold, input, artifacts, files or metrics are malformed); export "
                         "again.") from None
    if not 0 <= threshold <= 1 or size <= 0:
      raise CovidctError(f"{bad} (operating threshold {threshold} or input size {size} out of range); export again.")
    return m

  @classmethod
  def load(cls, folder_or_file) -> "Manifest":
    """The manifest of an export folder (or the manifest.json file itself)."""
    path = pathlib.Path(folder_or_file)
    if path.is_dir():
      path = path / MANIFEST_FILE
      if not path.exists():
        raise CovidctError(f"{path.parent} has no {MANIFEST_FILE}; pass a folder written by `covidct export`.")
    return cls.from_dict(read_json(path, "a covidct manifest", "export again"), str(path))
