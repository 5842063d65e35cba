"""Score image files with any artifact: the same decode + resize as training, then the model, in batches."""

from __future__ import annotations

import pathlib
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from covidct.errors import CovidctError

LABELS = ("NonCOVID", "COVID")  # label 0, label 1
BATCH_SIZE = 64  # images decoded and held at once: memory stays flat however many files there are


def find_manifest(model_path):
  """(Manifest, its path) from a manifest.json beside or above the artifact, or None if there is none."""
  from covidct.manifest import MANIFEST_FILE, Manifest  # pylint: disable=import-outside-toplevel

  p = pathlib.Path(model_path).resolve()
  for d in [p if p.is_dir() else p.parent, p.parent, p.parent.parent]:
    for cand in (d / MANIFEST_FILE, d / "assets.extra" / MANIFEST_FILE):
      if cand.exists():
        try:
          return Manifest.load(cand), cand
        except CovidctError as e:
          raise CovidctError(f"{str(e).rstrip('.')}, or pass --threshold.") from None
  return None


RECOMMENDED_RUNTIMES = {"tf_signature": "default", "litert": "default", "ort": "default", "openvino": "openvino"}


def resolve_model(model_path) -> tuple[pathlib.Path, str, str | None]:
  """(artifact, runtime, why): for an export folder (or a pushed version) whose manifest holds `covidct bench`'s
  recommendation measured on this kind of CPU, the recommended copy and runtime; otherwise `model_path` as given,
  under its own runtime (with why, when a recommendation from another CPU was set aside).

  A recommendation is kept only on the CPU it was measured on (model and instruction sets): the fastest copy that
  passed parity there may not pass here. Measured: a quantization-aware model with 8-bit weights ran exactly under
  OpenVINO's VNNI kernels and agreed with the SavedModel on 93.6% of test decisions under its AVX2 ones.
  """
  from covidct.manifest import MANIFEST_FILE, Manifest  # pylint: disable=import-outside-toplevel
  from covidct.versions import cpu_label  # pylint: disable=import-outside-toplevel

  p = pathlib.Path(model_path)
  if p.is_dir():
    for base in (p, p / "assets.extra"):
      if (base / MANIFEST_FILE).is_file():
        manifest = Manifest.load(base)
        rec = manifest.recommended or {}
        copies = {a.get("file") for a in manifest.artifacts.values() if isinstance(a, dict)} | {"saved_model"}
        if rec.get("file") and rec["file"] not in copies:  # a plain name among the version's own copies, or nothing
          raise CovidctError(f"{base / MANIFEST_FILE}: its recommended copy {rec['file']!r} is not one of the copies "
                             "it lists (the manifest was edited); run covidct bench on the export again, or pass a "
                             "copy with --model.")
        runtime = RECOMMENDED_RUNTIMES.get(rec.get("runtime"))
        target = (base / rec["file"]) if rec.get("file") else None
        if target is not None and rec.get("file") == "saved_model" and base.name == "assets.extra":
          target = base.parent  # a pushed version: the SavedModel is the version folder itself
        here = cpu_label()
        if rec.get("measured_on") and rec["measured_on"] != here:
          return p, "default", (f"covidct bench's recommendation was measured on {rec['measured_on']}, not on this "
                                f"CPU ({here}): run covidct bench here to choose a copy for it")
        if runtime and target is not None and target.exists():
          return target, runtime, f"recommended by covidct bench on {rec.get('measured_on', '?')}"
  return p, "default", None


def listed_in(model_path, manifest, manifest_path) -> bool:
  """Whether `model_path` is a file the manifest lists, or a folder (a SavedModel, an export or pushed version)."""
  p = pathlib.Path(model_path).resolve()
  if not p.is_file():
    return True
  base = pathlib.Path(manifest_path).resolve().parent
  return p.is_relative_to(base) and str(p.relative_to(base)) in manifest.files


def check_listed_file(model_path, manifest, manifest_path) -> None:
  """Raises if `model_path` is a file that `manifest` lists and its bytes no longer match: a damaged copy must not
  give labels (a flipped byte in the weights can still give probabilities in [0, 1])."""
  from covidct.fsutil import sha256  # pylint: disable=import-outside-toplevel

  p = pathlib.Path(model_path).resolve()
  if not p.is_file():
    return
  base = pathlib.Path(manifest_path).resolve().parent
  info = manifest.files.get(str(p.relative_to(base))) if p.is_relative_to(base) else None
  if isinstance(info, dict) and info.get("sha256") and sha256(p) != info["sha256"]:
    raise CovidctError(f"{model_path} does not match the SHA-256 that {manifest_path} records for it (changed or "
                       "damaged); copy it again from the export, or export again.")


def check_threshold(threshold: float) -> float:
  if not 0 < threshold < 1:
    raise CovidctError(f"the threshold must be a probability strictly between 0 and 1, got {threshold}.")
  return float(threshold)


class Original(NamedTuple):
  """What the input guard needs of the file as it came: its size, and the share of its pixels in colour (a CT
  slice is grey; COVID-CT's paper figures, coloured arrows and all, stay under 8%)."""

  height: int
  width: int
  colour: float = 0.0


def colour_share(data: bytes) -> float:
  """The share of an encoded colour image's pixels whose channels differ by more than 40 grey levels."""
  import io  # pylint: disable=import-outside-toplevel

  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(io.BytesIO(data)) as im:
    rgb = np.asarray(im.convert("RGB"), np.int16)
  return float(np.mean(rgb.max(axis=-1) - rgb.min(axis=-1) > 40))


def decode_image(data: bytes, name: str, size: int):
  """An encoded image's bytes -> ((size, size, 1) uint8 resized as in training, the file's Original: height, width,
  colour share), or a CovidctError naming `name` and why it cannot be read. `covidct predict`, the bulk path and
  `covidct serve` all decode here."""
  from covidct.data import resize_image  # pylint: disable=import-outside-toplevel
  from tfds_covidct.covid_ct.covid_ct_dataset_builder import CovidCtError, decode_grayscale  # pylint: disable=import-outside-toplevel

  try:
    image, mode = decode_grayscale(data, name)
  except CovidCtError as e:
    if "claims" in str(e):
      raise CovidctError(str(e)) from e
    raise CovidctError(f"{name}: not a readable image (PNG, JPEG or TIFF expected).") from e
  colour = colour_share(data) if mode not in GREY_MODES else 0.0
  return resize_image(image, size).numpy(), Original(*image.shape[:2], colour)


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # Pillow modes with no colour


def load_image(path, size: int, with_size: bool = False):
  """A file -> (size, size, 1) uint8 (and, `with_size`, the file's (height, width)), or CovidctError saying why it
  cannot be read."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CovidctError(f"{path}: no such file.")
  try:
    data = path.read_bytes()
  except OSError as e:
    raise CovidctError(f"{path}: cannot be read ({e.strerror or e}).") from e
  resized, original = decode_image(data, str(path), size)
  return (resized, original) if with_size else resized


def record(file: str, probability: float, threshold: float, reasons: str = "", strict: bool = False) -> dict:
  """What predict (and the bulk path) report for one scored file: {'file', 'probability', 'label', 'threshold'},
  plus 'warning' when the input guard gave `reasons`, or {'file', 'error'} for a flagged image under `strict`."""
  if reasons and strict:
    return {"file": file, "error": f"{file}: does not look like a CT slice ({reasons}); refused (--strict)."}
  r = {"file": file, "probability": float(probability), "label": LABELS[int(probability >= threshold)],
       "threshold": threshold}
  if reasons:
    r["warning"] = f"does not look like a CT slice: {reasons}; do not trust this result"
  return r


def predictions(runner, files: Iterable, threshold: float, batch_size: int | None = None, guard=None,
                strict: bool = False) -> Iterator[dict]:
  """One dict per file, in order: {'file', 'probability', 'label', 'threshold'} (plus 'warning' when `guard` flags
  the image) or {'file', 'error'}. Files are decoded and scored `batch_size` at a time; one bad file never stops the
  others. With `strict`, a flagged image is an error instead of a result."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  def flush(batch):
    good = [(f, im) for f, im in batch if not isinstance(im, str)]
    probs = iter(runner(np.stack([im for _, im in good])) if good else [])
    for f, im in batch:
      if isinstance(im, str):
        yield {"file": f, "error": im}
        continue
      yield record(f, float(next(probs)), threshold, warnings.get(f, ""), strict)

  batch_size = batch_size or BATCH_SIZE
  batch, warnings = [], {}
  for f in files:
    try:
      image, original = load_image(f, runner.image_size, with_size=True)
      batch.append((str(f), image))
      reasons = guard.check(image, original) if guard is not None else []
      if reasons:
        warnings[str(f)] = "; ".join(reasons)
    except CovidctError as e:
      batch.append((str(f), str(e)))
    if len(batch) == batch_size:
      yield from flush(batch)
      batch = []
  yield from flush(batch)


def model_threshold(model_path, threshold: float | None = None, manifest=None) -> dict:
  """{'value', 'from'}: `threshold` if given, else the artifact's own metadata (.onnx metadata_props, .tflite
  TFLite metadata), else a manifest.json beside or above it (`manifest`: find_manifest's answer, when the caller has
  it and has checked the file), else 0.5."""
  from covidct.runners import read_onnx_meaning  # pylint: disable=import-outside-toplevel
  from covidct.tflite_metadata import read_meaning  # pylint: disable=import-outside-toplevel

  if threshold is not None:
    return {"value": check_threshold(threshold), "from": "--threshold"}
  suffix = pathlib.Path(model_path).suffix.lower()
  own = {".onnx": read_onnx_meaning, ".tflite": read_meaning}.get(suffix, lambda _: None)(model_path)
  if own:
    kind = "ONNX" if suffix == ".onnx" else "TFLite"
    value = own["threshold"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:  # NaN fails too
      raise CovidctError(f"{model_path}: its {kind} metadata's operating threshold {value!r} is not a probability "
                         "strictly between 0 and 1 (the file was changed); export it again, or pass --threshold.")
    found = (float(value), f"{model_path} (its {kind} metadata)")
  else:
    manifest = manifest or find_manifest(model_path)
    if manifest and not listed_in(model_path, *manifest):
      raise CovidctError(f"{model_path} is not one of the copies {manifest[1]} lists, so that manifest's threshold "
                         "does not apply to it; pass --threshold, or use a copy the export wrote.")
    found = (manifest[0].threshold, str(manifest[1])) if manifest else None
  return {"value": found[0], "from": found[1]} if found else {"value": 0.5, "from": "default (no manifest found)"}


def open_model(model_path, threshold: float | None = None):
  """(artifact, runtime, runner, threshold source) for predict and the bulk path: the copy `covidct bench`
  recommended when given an export folder, its SHA-256 checked against its manifest once, its threshold found."""
  from covidct.runners import load_runner  # pylint: disable=import-outside-toplevel

  artifact, runtime, why = resolve_model(model_path)
  found = find_manifest(artifact)
  if found is not None:
    check_listed_file(artifact, *found)
  runner = load_runner(artifact, runtime=runtime)
  source = model_threshold(artifact, threshold, manifest=found)
  source["model"] = f"{artifact.name} on {runner.kind}" + (f" ({why})" if why else "")
  return artifact, runtime, runner, source


def predict_stream(model_path, files, threshold: float | None = None, strict: bool = False) -> tuple[dict, Iterator]:
  """(where the threshold came from, an iterator of one record per file, in order): `threshold` if given, else the
  artifact's own metadata (.onnx), else a manifest.json beside or above it, else 0.5. Files are read as the iterator
  is consumed, BATCH_SIZE at a time, so memory stays flat however many there are."""
  from covidct.guard import load_guard_near  # pylint: disable=import-outside-toplevel

  artifact, _, runner, source = open_model(model_path, threshold)
  guard = load_guard_near(artifact)
  source["input_guard"] = "on" if guard is not None else "off (no guard.json beside the model: export it)"
  return source, predictions(runner, files, source["value"], guard=guard, strict=strict)


def predict_files(model_path, files, threshold: float | None = None, strict: bool = False
                  ) -> tuple[list[dict], list[str], dict]:
  """Scores every readable file; returns (results, errors, where the threshold came from) (see predict_stream)."""
  source, stream = predict_stream(model_path, files, threshold, strict)
  results, errors = [], []
  for r in stream:
    if "error" in r:
      errors.append(r["error"])
    else:
      results.append(r)
  return results, errors, source
