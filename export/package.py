"""`covidct export`: every artifact, its parity report and manifest.json, in one folder written atomically."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import numpy as np

from covidct.config import BOOTSTRAP_RESAMPLES, CALIBRATION_IMAGES, TARGET_SENSITIVITY
from covidct.data import eval_set, split_arrays
from covidct.errors import CovidctError
from covidct.evaluate import evaluate
from covidct.fsutil import atomic_dir, refuse_existing, sha256
from covidct.guard import GUARD_FILE, calibrate
from covidct.manifest import MANIFEST_FILE, SCHEMA_VERSION, Manifest
from covidct.modelio import read_run_config, trained_on
from covidct.models import INPUT_NAME, OUTPUT_NAME
from covidct.quantize import is_quantization_aware
from covidct.runners import ONNX_SESSION_CONFIG, SavedModelRunner, load_runner
from covidct.versions import cpu_kind, library_versions
from export.errors import ExportError, ParityError
from export.formats import export_format, parse_formats
from export.meaning import LABELS, N_VECTORS, onnx_metadata, tflite_metadata, vector_tolerance, write_vectors
from export.serving import write_serving_saved_model, write_warmup
from export.skew import markdown as skew_markdown
from export.skew import skew_table


def encode_png(image: np.ndarray) -> bytes:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  return tf.io.encode_png(image).numpy()
from export.parity import check_parity, write_report

PREPROCESSING = ("decode to grayscale uint8 (RGB/RGBA by ITU-R 601-2 luma), resize to SxS bilinear with "
                 "antialiasing, round to uint8 (covidct.data.resize_image); rescaling to [0, 1] is inside the model")


def resolve_saved_model(model_dir) -> pathlib.Path:
  path = pathlib.Path(model_dir)
  if (path / "saved_model" / "saved_model.pb").exists():
    return path / "saved_model"
  if (path / "saved_model.pb").exists():
    return path
  raise CovidctError(f"{path} holds no SavedModel (saved_model.pb); pass a `covidct train` output folder.")


def _summary(report: dict) -> dict:
  keep = ("roc_auc", "pr_auc", "at_0.5", "at_threshold", "ci95", "threshold", "examples", "positives", "patients")
  return {k: report[k] for k in keep if k in report}


def export_model(model_dir, out_dir, formats="all", data_dir=None, overwrite: bool = False,
                 n_calibration: int = CALIBRATION_IMAGES, target_sensitivity: float = TARGET_SENSITIVITY,
                 n_boot: int = BOOTSTRAP_RESAMPLES, threshold: dict | None = None, shortcut_audit: dict | None = None,
                 progress=print) -> Manifest:
  """Exports `formats` of the SavedModel in `model_dir` into `out_dir` with parity.json/.md and manifest.json.

  Args:
    model_dir: a `covidct train` (or qat, ensemble) output folder, or its saved_model/.
    out_dir: the export folder to write (must not exist unless `overwrite`).
    formats: comma-separated format names, or "all".
    data_dir: the TFDS data dir holding covid_ct.
    overwrite: replace an existing `out_dir`.
    n_calibration: train images that calibrate the int8 formats.
    target_sensitivity: the operating threshold reaches this sensitivity on validation.
    n_boot: bootstrap resamples behind the confidence intervals.
    threshold: a fixed operating threshold ({'value', 'chosen_on'}) instead of the one chosen on validation: the
      out-of-fold one of a model trained on train + validation.
    shortcut_audit: the SavedModel's test-split audit (covidct.audit.audit) where the caller has measured it (the
      main job's evaluation); measured here when None. It goes into the manifest and so into the model card.
    progress: called with one line per step.
  Returns:
    The Manifest written to `out_dir`.
  Raises:
    CovidctError: bad input (folder exists, no SavedModel, unknown format).
    ParityError: an artifact failed parity (after the folder is written, so its report can be read).
  """
  formats = parse_formats(formats)
  out = pathlib.Path(out_dir)
  refuse_existing(out, overwrite, inputs=(model_dir,))
  saved_model = resolve_saved_model(model_dir)
  training_config = read_run_config(model_dir) or None
  quantization_aware = is_quantization_aware(saved_model)
  reference = SavedModelRunner(saved_model)
  size = reference.image_size
  progress(f"reading the validation, test and train splits at {size}x{size}")
  # validation and test as every step of this run reads them (covidct.data.eval_set: loaded once per process)
  arrays = {s: eval_set("covid_ct", s, size, data_dir).arrays() for s in ("validation", "test")}
  arrays["train"] = split_arrays("train", data_dir, size)
  reps = arrays["train"]["images"][:n_calibration]  # calibration from train, never test
  ref_val = evaluate(reference, size, split="validation", target_sensitivity=target_sensitivity, n_boot=n_boot,
                     arrays=arrays)
  ref_test = evaluate(reference, size, data_dir=data_dir, split="test", target_sensitivity=target_sensitivity,
                      n_boot=n_boot, arrays=arrays, threshold=threshold, shortcut_audit=shortcut_audit is None)
  given = threshold
  threshold, chosen_on = ref_test["threshold"]["value"], ref_test["threshold"]["chosen_on"]
  val_metrics = _summary(ref_val)
  trained = trained_on(model_dir)
  if "validation" in trained:  # a model of record: it trained on these images, so they are not held out
    val_metrics = {**val_metrics, "in_sample": True,
                   "note": f"the model trained on {trained}: in-sample figures, not a held-out estimate"}
  ref_probs = np.array([r["probability"] for r in ref_test["predictions"]])

  base = {  # what every copy means: in the manifest, and in each .onnx's own metadata
      "labels": list(LABELS),
      "input": {"name": INPUT_NAME, "shape": [None, size, size, 1], "dtype": "uint8"},
      "output": {"name": OUTPUT_NAME, "shape": [None, 1], "dtype": "float32", "meaning": "P(COVID)"},
      "preprocessing": PREPROCESSING.replace("SxS", f"{size}x{size}"),
      "operating_threshold": {"value": threshold, "target_sensitivity": target_sensitivity,
                              "chosen_on": chosen_on,
                              # a calibration split's figures at it (covidct.evaluate.calibration_threshold)
                              **({"expected": given["per_source"]} if (given or {}).get("per_source") else {})},
  }
  with atomic_dir(out, overwrite) as tmp:
    progress("writing the serving SavedModel (serving_default, serving_bytes, TF Serving warmup)")
    write_serving_saved_model(saved_model, tmp / "saved_model", threshold, LABELS)
    shipped = SavedModelRunner(tmp / "saved_model")(arrays["test"]["images"])
    if float(np.max(np.abs(shipped - ref_probs), initial=0.0)) > 1e-6:
      raise ExportError(f"the serving SavedModel's serving_default differs from {saved_model}'s; this is a bug: "
                        "report it with the model.")
    # The shipped SavedModel's own vectors: push replays them (and every copy's) in a fresh process.
    write_vectors(tmp, "saved_model", arrays["test"]["images"][:N_VECTORS], ref_probs[:N_VECTORS], 1e-5)
    warm = arrays["test"]["images"][:4]
    write_warmup(tmp / "saved_model", warm, [encode_png(im) for im in warm])
    results, parity = {}, []
    for fmt in (["onnx_float32"] if "onnx_int8" in formats and "onnx_float32" not in formats else []) + formats:
      progress(f"exporting {fmt}")
      onnx_float = results["onnx_float32"].path if "onnx_float32" in results else None
      result = export_format(fmt, saved_model, tmp, reps, onnx_float)  # from the model itself, not the wrapper
      if result.path.endswith((".onnx", ".tflite")):
        (onnx_metadata if result.path.endswith(".onnx") else tflite_metadata)(
            result.path, base, fmt, library_versions().get("covidct") or "dev")
        result = dataclasses.replace(result, size_bytes=os.path.getsize(result.path), sha256=sha256(result.path))
      results[fmt] = result
    vectors = {}
    for fmt in formats:
      progress(f"checking parity of {fmt}")
      candidate = load_runner(results[fmt].path)
      parity.append(check_parity(reference, candidate, fmt, arrays["test"], threshold, ref_probs,
                                 quantized_reference=quantization_aware))
      images, want = arrays["test"]["images"][:N_VECTORS], ref_probs[:N_VECTORS]
      measured = float(np.max(np.abs(candidate(images) - want))) if len(want) else 0.0
      tolerance = vector_tolerance(parity[-1].tolerance, measured)
      vectors[fmt] = {"path": write_vectors(tmp, os.path.basename(results[fmt].path), images, want, tolerance),
                      "images": int(len(images)), "tolerance": tolerance}
    if "onnx_int8" in formats and "onnx_float32" not in formats:
      pathlib.Path(results.pop("onnx_float32").path).unlink()
    progress("calibrating the input guard")
    guard = calibrate(arrays["train"]["images"], arrays["validation"]["images"])
    guard.save(tmp / GUARD_FILE)
    test_flags = sum(bool(guard.check(im)) for im in arrays["test"]["images"])
    # Paths relative to the export folder (the temporary folder's name is gone once it is renamed).
    parity = [dataclasses.replace(r, path=os.path.basename(r.path)) for r in parity]
    verified_on = cpu_kind()
    report = write_report(parity, threshold, tmp, quantization_aware, verified_on)
    progress("measuring the resize skew")
    skew = skew_table(reference, eval_set("covid_ct", "test", size, data_dir, raw=True).raw, ref_probs, threshold)
    with open(tmp / "parity.md", "a") as fh:
      fh.write("\n" + skew_markdown(skew, threshold))
    files = {}
    for p in sorted(tmp.rglob("*")):
      if p.is_file():
        files[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": str(pathlib.Path(model_dir).resolve()),
        **base,
        "quantization_aware": quantization_aware,
        "metrics": {"saved_model": {"validation": val_metrics, "test": _summary(ref_test)}},
        "artifacts": {},
        "input_guard": {"file": GUARD_FILE, **guard.calibration, "test_flagged": test_flags,
                        "test_images": int(len(arrays["test"]["images"]))},
        "parity_passed": report["passed"],
        "parity_verified_on": verified_on,
        "resize_skew": skew,
        "shortcut_audit": shortcut_audit or ref_test["shortcut_audit"],
        "files": files,
        "libraries": library_versions(),
    }
    for r, res in zip(parity, (results[f] for f in formats)):
      manifest["artifacts"][r.format] = {
          "file": os.path.basename(res.path), "bytes": res.size_bytes, "sha256": res.sha256,
          "export_seconds": round(res.seconds, 2), "parity": r.to_dict(), **res.details,
          "test_vectors": vectors[r.format],
          **({"onnxruntime_session_config": ONNX_SESSION_CONFIG,
              "onnxruntime_session_config_needed_on": "x86-64 CPUs without VNNI or AMX (AVX2-only, AVX-512 without "
                                                      "VNNI): there the default int8 kernels saturate; elsewhere they "
                                                      "are exact, and faster without it"}
             if r.format.startswith("onnx") else {})}
      manifest["metrics"][r.format] = {"test": {"roc_auc": r.roc_auc, "sensitivity": r.sensitivity,
                                                "specificity": r.specificity, "agreement": r.agreement}}
    if training_config is not None:
      manifest["training_config"] = training_config
    manifest = Manifest.from_dict(manifest, str(out / MANIFEST_FILE))
    manifest.save(tmp)
  if not report["passed"]:
    failed = [a for a in report["artifacts"] if not a["passed"]]
    raise ParityError(f"{len(failed)} artifact(s) failed parity ({', '.join(a['format'] for a in failed)}): "
                      f"{failed[0]['failures'][0]}; see {out / 'parity.md'}", [f for a in failed for f in a["failures"]])
  return manifest
