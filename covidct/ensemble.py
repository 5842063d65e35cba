"""An ensemble of trained runs as one model: the mean of the members' probabilities, in one SavedModel that
`covidct export`, `push`, `predict` and the benchmarks take like any training output."""

from __future__ import annotations

import json
import pathlib

from covidct.errors import CovidctError
from covidct.fsutil import atomic_dir, refuse_existing


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


def ensemble_runs(run_dirs, out_dir, overwrite: bool = False) -> dict:
  """Writes `out_dir` like a training output: saved_model/, model.keras and config.json (the members' configs)."""
  from covidct.modelio import export_saved_model, load_run_model, read_run_config  # pylint: disable=import-outside-toplevel

  run_dirs = [pathlib.Path(r) for r in run_dirs]
  out = pathlib.Path(out_dir)
  refuse_existing(out, overwrite, inputs=run_dirs)
  if out.resolve() in {r.resolve() for r in run_dirs}:
    raise CovidctError(f"the output folder {out} is one of the members; choose another.")
  model = build_ensemble([load_run_model(r) for r in run_dirs])
  size = int(model.input_shape[1])
  configs = [read_run_config(r) for r in run_dirs]
  config = {"model": "ensemble", "image_size": size, "members": [
      {"run": str(r.resolve()), "config": c} for r, c in zip(run_dirs, configs)]}
  with atomic_dir(out, overwrite) as tmp:
    model.save(tmp / "model.keras")
    export_saved_model(model, tmp / "saved_model", size)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
  return {"members": len(run_dirs), "image_size": size, "parameters": int(model.count_params())}
