"""Model files, in one place: load a `.keras` (covidct's layers registered), a run's model, write a SavedModel."""

from __future__ import annotations

import os
import pathlib

from covidct.errors import CovidctError
from covidct.models import INPUT_NAME, OUTPUT_NAME


def load_keras(path, remedy: str = "train it again"):
  """The Keras model in the `.keras` file `path`, with covidct's own layers known; a damaged file is a
  CovidctError that names it and `remedy`."""
  import keras  # pylint: disable=import-outside-toplevel

  import covidct.layers  # pylint: disable=import-outside-toplevel,unused-import  # registers FakeQuant, QuantConv

  path = pathlib.Path(path)
  if not path.is_file():
    raise CovidctError(f"{path} does not exist or is not a file; pass a .keras file written by covidct.")
  try:
    return keras.saving.load_model(os.fspath(path), compile=False)
  except Exception as e:  # Keras raises many types (ValueError, KeyError, BadZipFile, OSError) for a damaged archive
    detail = str(e).splitlines()[0][:120] if str(e) else ""
    raise CovidctError(f"{path}: not a loadable Keras model ({type(e).__name__}{': ' + detail if detail else ''}); "
                       f"{remedy}.") from None


def read_run_config(run_dir) -> dict:
  """A run folder's config.json as a dict ({} when the folder has none); a damaged one is a one-line CovidctError."""
  from covidct.manifest import read_json  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(run_dir) / "config.json"
  if not path.is_file():
    return {}
  config = read_json(path, "a covidct training config", "train that run again")
  if not isinstance(config, dict):
    raise CovidctError(f"{path}: not a covidct training config (a JSON {type(config).__name__}); train that run again.")
  if config.get("lung_crop"):
    raise CovidctError(f"{run_dir} was trained on lung-cropped images (--lung-crop), which only `covidct cv` applies "
                       "so far; its model cannot score whole images. Train without --lung-crop.")
  return config


def trained_on(run_dir) -> str:
  """The data a training output trained on ('train', or 'train+validation' for a model of record), following a
  quantization-aware run to the run it came from; '' when the folder does not say (a bare SavedModel)."""
  from covidct.manifest import read_json  # pylint: disable=import-outside-toplevel

  run = pathlib.Path(run_dir)
  for _ in range(4):  # a qat output (its own history has no train_data) points at its source run
    source = (read_run_config(run).get("source") or {}).get("run")
    if source:
      run = pathlib.Path(source)
      continue
    history = run / "history.json"
    if not history.is_file():
      return ""
    return str((read_json(history, "a covidct training history", "train that run again").get("summary") or {})
               .get("train_data", "train"))
  return ""


def trained_sources(model_path) -> tuple[str, ...] | None:
  """The sources (covid_ct builder configs) a model trained on: from its training run's config.json (following a
  quantization-aware or ensemble run to the run it came from), or from the training config in its export's
  manifest; ('covid_ct',) for a config written before there were several; None when nothing says."""
  path = pathlib.Path(model_path)
  run = path if path.is_dir() else path.parent
  for _ in range(4):
    config = read_run_config(run) if (run / "config.json").is_file() else {}
    if not config:
      break
    source = (config.get("source") or {}).get("run") if isinstance(config.get("source"), dict) else None
    if source and "sources" not in config:
      run = pathlib.Path(source)
      continue
    return tuple(config.get("sources") or ("covid_ct",))
  from covidct.manifest import MANIFEST_FILE, Manifest  # pylint: disable=import-outside-toplevel

  here = path.resolve() if path.is_dir() else path.resolve().parent
  found = next((c for d in (here, here.parent) for c in (d / MANIFEST_FILE, d / "assets.extra" / MANIFEST_FILE)
                if c.is_file()), None)
  training = (Manifest.load(found).training_config or {}) if found else {}
  return config_sources(training) if training else None


def config_sources(config: dict) -> tuple[str, ...]:
  """The sources a run's config.json says it trained on, following a quantization-aware or ensemble run's config to
  the training config it came from (its 'source': {'config'}); ('covid_ct',) for a config from before sources."""
  for _ in range(4):
    if "sources" in config or not isinstance(config.get("source"), dict):
      break
    config = config["source"].get("config") or {}
  return tuple(config.get("sources") or ("covid_ct",))


def load_run_model(run_dir):
  """The Keras model of one `covidct train` (or `qat`, `ensemble`) output folder."""
  path = pathlib.Path(run_dir) / "model.keras"
  if not path.exists():
    raise CovidctError(f"{run_dir} has no model.keras; pass folders written by `covidct train`.")
  return load_keras(path, remedy="train that run again")


def export_saved_model(model, path, image_size: int) -> None:
  """SavedModel with `serving_default`: uint8 `image` (None, S, S, 1) -> `covid_probability` (None, 1).

  No augmentation layer is ever in `model`, so the exported copy is the inference model.
  """
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  archive = keras.export.ExportArchive()
  archive.track(model)

  @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 1], tf.uint8, name=INPUT_NAME)])
  def serve(image):
    return {OUTPUT_NAME: tf.cast(model(tf.cast(image, tf.float32), training=False), tf.float32)}

  archive.add_endpoint("serving_default", serve)
  archive.write_out(str(path), verbose=False)
