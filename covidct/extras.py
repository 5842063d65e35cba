"""Optional parts of covidct, each behind a pip extra: the base install holds what the dataset, training,
evaluation, export, verify and predict need; the model server, the Beam bulk path, OpenVINO and the load generator
are extras (`pip install 'covidct[all]'` for every one). A command that needs a missing extra says which, in one
line."""

from __future__ import annotations

import importlib.util

from covidct.errors import CovidctError

# extra -> (the module it brings, what needs it)
EXTRAS = {
    "serve": ("kserve", "covidct serve and push's infra validation (KServe's model server)"),
    "bulk": ("apache_beam", "covidct bulk-predict (Apache Beam)"),
    "openvino": ("openvino", "the OpenVINO runtime"),
    "bench": ("locust", "the load test (Locust)"),
}


def available(extra: str) -> bool:
  """Whether the extra's module can be imported here (without importing it)."""
  module = EXTRAS[extra][0]
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def require(extra: str, what: str | None = None) -> None:
  """Raises a one-line CovidctError naming the extra to install when it is missing."""
  if not available(extra):
    raise CovidctError(f"{what or EXTRAS[extra][1]} needs the '{extra}' extra, which is not installed: "
                       f"pip install 'covidct[{extra}]' (or 'covidct[all]' for every extra).")
