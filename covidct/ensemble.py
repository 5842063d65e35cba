"""An ensemble of trained runs as one model: the mean of the members' probabilities, in one SavedModel that
`covidct export`, `push`, `predict` and the benchmarks take like any training output."""

from __future__ import annotations

import json
import pathlib

from covidct.errors import CovidctError
from covidct.fsutil import atomic_dir


def build_ensemble(members: list, name: str = "ensemble"):
  """One Keras model: float (None, S, S, 1) grey levels -> the mean of the members' probabilities (None, 1).

  Every member must take the same input size. The members are renamed member_0, member_1, ... (two runs of one
  architecture share a name).
  """
  import keras  # pylint: disable=import-outside-toplevel

  if len(members) < 2:
    raise CovidctError(f"an ensemble needs at least two models, got {len(members)}.")
  shapes = {tuple(m.input_shape[1:]) for m in members}
  if len(shapes) != 1:
    raise CovidctError(f"the models take different inputs {sorted(shapes)}; an ensemble needs one input size: "
                       "train the members with the same --image-size.")
  inputs = keras.Input(shapes.pop(), name="image")
  outputs = []
  for i, member in enumerate(members):
    member.name = f"member_{i}"
    outputs.append(member(inputs))
  return keras.Model(inputs, keras.layers.Average(name="mean_probability")(outputs), name=name)


def load_member(run_dir):
  """The Keras model of one `covidct train` (or `covidct qat`) output folder."""
  import keras  # pylint: disable=import-outside-toplevel

  import covidct.quantize  # pylint: disable=import-outside-toplevel,unused-import  # registers its layers

  path = pathlib.Path(run_dir) / "model.keras"
  if not path.exists():
    raise CovidctError(f"{run_dir} has no model.keras; pass folders written by `covidct train`.")
  try:
    return keras.models.load_model(path, compile=False)
  except Exception as e:  # Keras raises many types for a damaged archive
    raise CovidctError(f"{path}: cannot load it ({type(e).__name__}: {e}); train that run again.") from e


def ensemble_runs(run_dirs, out_dir, overwrite: bool = False) -> dict:
  """Writes `out_dir` like a training output: saved_model/, model.keras and config.json (the members' configs)."""
  from covidct.train import export_saved_model  # pylint: disable=import-outside-toplevel

  run_dirs = [pathlib.Path(r) for r in run_dirs]
  out = pathlib.Path(out_dir)
  if out.exists() and not overwrite:
    raise CovidctError(f"output folder {out} exists; choose another or pass --overwrite.")
  if out.resolve() in {r.resolve() for r in run_dirs}:
    raise CovidctError(f"the output folder {out} is one of the members; choose another.")
  model = build_ensemble([load_member(r) for r in run_dirs])
  size = int(model.input_shape[1])
  configs = []
  for r in run_dirs:
    cfg = r / "config.json"
    configs.append(json.loads(cfg.read_text()) if cfg.exists() else {})
  config = {"model": "ensemble", "image_size": size, "members": [
      {"run": str(r.resolve()), "config": c} for r, c in zip(run_dirs, configs)]}
  with atomic_dir(out, overwrite) as tmp:
    model.save(tmp / "model.keras")
    export_saved_model(model, tmp / "saved_model", size)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
  return {"members": len(run_dirs), "image_size": size, "parameters": int(model.count_params())}
