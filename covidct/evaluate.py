"""Evaluation clinicians ask for, of any "images in, probabilities out" function.

Metrics at 0.5 and at an operating threshold chosen on the validation split for a target sensitivity, 95%
confidence intervals by bootstrap over patients, and JSON + Markdown + PNG reports. scikit-learn computes the metrics.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import numpy as np

from covidct.config import BOOTSTRAP_RESAMPLES, TARGET_SENSITIVITY
from covidct.metrics import THRESHOLD_METRICS, choose_threshold, evaluate_probabilities, threshold_metrics
from covidct.reporting import fmt_ci

def evaluate(predict: Callable[[np.ndarray], np.ndarray], image_size: int, data_dir=None, split: str = "test",
             target_sensitivity: float = TARGET_SENSITIVITY, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
             arrays: dict | None = None, shortcut_audit: bool = False, threshold: dict | None = None,
             source: str = "covid_ct") -> dict:
  """Scores `predict` (uint8 (N, S, S, 1) -> P(COVID)) on `split` of `source`, with the threshold chosen on its
  validation split.

  `arrays` may hold preloaded {'validation': split_arrays(...), split: split_arrays(...)} to score many models
  on the same images without reading the dataset again. `shortcut_audit` adds covidct.audit's figures.
  `threshold` ({'value', 'chosen_on'}) fixes the operating threshold instead: a model trained on validation too
  takes the one its cross-validation chose on out-of-fold probabilities.
  """
  from covidct.data import eval_set  # pylint: disable=import-outside-toplevel

  arrays = dict(arrays or {})
  for s in {"validation", split}:
    if s not in arrays:
      arrays[s] = eval_set(source, s, image_size, data_dir).arrays()
  val = arrays["validation"]
  val_p = np.asarray(predict(val["images"]), dtype=np.float64).reshape(-1)
  chosen_on = "validation"
  if threshold is None:
    threshold = choose_threshold(val["labels"], val_p, target_sensitivity)
  else:
    threshold, chosen_on = float(threshold["value"]), threshold["chosen_on"]
  data = arrays[split]
  p = val_p if split == "validation" else np.asarray(predict(data["images"]), dtype=np.float64).reshape(-1)
  report = {
      "split": split, "source": source, "examples": int(len(p)), "positives": int(data["labels"].sum()),
      "patients": int(len(np.unique(data["patient_ids"]))),
      "threshold": {"value": threshold, "target_sensitivity": target_sensitivity, "chosen_on": chosen_on,
                    "validation_sensitivity": threshold_metrics(val["labels"], val_p, threshold)["sensitivity"]},
      "bootstrap": {"resamples": n_boot, "unit": "patient", "level": 0.95, "seed": seed},
      **evaluate_probabilities(data["labels"], p, data["patient_ids"], threshold, n_boot=n_boot, seed=seed),
      "predictions": [{"filename": f, "patient_id": pid, "label": int(l), "probability": float(q)}
                      for f, pid, l, q in zip(data["filenames"], data["patient_ids"], data["labels"], p)],
  }
  if shortcut_audit:
    from covidct.audit import audit  # pylint: disable=import-outside-toplevel
    from covidct.data import Selection, raw_arrays  # pylint: disable=import-outside-toplevel

    raw_train = raw_arrays(Selection("train", source=source), data_dir)
    report["shortcut_audit"] = audit(predict, data, raw_train, raw_train if split == "train"
                                     else eval_set(source, split, image_size, data_dir, raw=True).raw_arrays())
  return report


def calibration_threshold(predict: Callable[[np.ndarray], np.ndarray], image_size: int, sources, data_dir=None,
                          target_sensitivity: float = TARGET_SENSITIVITY, n_boot: int = BOOTSTRAP_RESAMPLES,
                          seed: int = 0) -> dict:
  """The operating threshold fitted on a calibration split: the validation split of every source in `sources`, data
  the model neither trained on nor chose anything on (train with keep='last'). The highest threshold that reaches
  `target_sensitivity` on each source's validation split, so one source with fewer or harder COVID images does not
  fall below it; and what to expect at it, per source, with 95% CIs by bootstrap over patients.

  Returns {'value', 'chosen_on', 'target_sensitivity', 'per_source': [{'source', 'examples', 'positives',
  'patients', 'threshold' (that source's own), 'roc_auc', 'sensitivity', 'specificity', 'ci95'}]}, the shape of
  the `threshold` argument of evaluate and export_model."""
  from covidct.data import eval_set  # pylint: disable=import-outside-toplevel

  scored = []
  for source in sources:
    data = eval_set(source, "validation", image_size, data_dir)
    p = np.asarray(predict(data.images), dtype=np.float64).reshape(-1)
    scored.append((source, data, p, choose_threshold(data.labels, p, target_sensitivity)))
  value = min(t for *_, t in scored)
  per_source = []
  for source, data, p, own in scored:
    figures = evaluate_probabilities(data.labels, p, data.patient_ids, value, n_boot=n_boot, seed=seed)
    per_source.append({"source": source, "examples": int(len(p)), "positives": int(data.labels.sum()),
                       "patients": int(len(np.unique(data.patient_ids))), "threshold": own,
                       "roc_auc": figures["roc_auc"], **{k: figures["at_threshold"][k]
                                                         for k in ("sensitivity", "specificity")},
                       "ci95": {k: figures["ci95"][k] for k in ("sensitivity", "specificity") if k in figures["ci95"]}})
  names = " + ".join(sources)
  return {"value": value, "target_sensitivity": target_sensitivity, "per_source": per_source,
          "chosen_on": f"the validation splits of {names} (a calibration split the model never trained on): the "
                       f"highest threshold with sensitivity >= {target_sensitivity:.2f} on each"}


def calibration_markdown(threshold: dict) -> str:
  """What the calibration split says to expect at the shipped threshold, per source."""
  from covidct.reporting import table  # pylint: disable=import-outside-toplevel

  rows = [(f"`{r['source']}`", f"{r['examples']} ({r['positives']})", r["patients"], f"{r['threshold']:.4f}",
           f"{r['roc_auc']:.3f}", fmt_ci(r["sensitivity"], r["ci95"].get("sensitivity")),
           fmt_ci(r["specificity"], r["ci95"].get("specificity"))) for r in threshold["per_source"]]
  return "\n".join([
      "## The operating point, fitted on a calibration split", "",
      f"Threshold {threshold['value']:.4f}, chosen on {threshold['chosen_on']}. What to expect at it on new images "
      "from these sources (each validation split at the shipped threshold; 95% CIs by bootstrap over patients):", "",
      table(["validation split", "images (COVID)", "patients", "own threshold", "ROC AUC", "sensitivity",
             "specificity"], rows, align="lrrrrrr")]) + "\n"


def evaluate_sources(predict: Callable[[np.ndarray], np.ndarray], image_size: int, threshold: dict, data_dir=None,
                     sources=None, trained_on=None, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     shortcut_audit: bool = True, progress=None, done: dict | None = None) -> dict:
  """Every source's test split side by side, at one operating threshold: how far a model holds up beyond the
  source it learned from.

  Args:
    predict: uint8 (N, S, S, 1) -> P(COVID).
    image_size: S.
    threshold: {'value', 'chosen_on' or 'from'}: the model's operating threshold.
    data_dir: the TFDS data dir; sources not prepared there are left out (and named in 'missing').
    sources: the sources to score (default: every source; those not prepared are listed as missing).
    trained_on: the sources the model trained on (a source not among them is labelled external); None: unknown.
    n_boot, seed: bootstrap over patients for the CIs.
    shortcut_audit: each source's shortcut audit (covidct.audit), with the image-statistics baseline fitted on the
      source's own train split where it has one.
    progress: called with one line per source.
    done: {source: an `evaluate` report of its test split}: taken as it is, not scored again, where it was made at
      this same threshold (and, with `shortcut_audit`, holds its audit).

  Returns:
    {'threshold', 'trained_on', 'rows': [{'source', 'external', 'examples', 'positives', 'patients', 'roc_auc',
     'ci95', 'at_threshold', 'shortcut_audit'}], 'missing': [sources not prepared]}.
  """
  from covidct.audit import audit  # pylint: disable=import-outside-toplevel
  from covidct.data import Selection, eval_set, raw_arrays  # pylint: disable=import-outside-toplevel
  from covidct.dataset import SOURCE_SPLITS, SOURCES, prepared_sources  # pylint: disable=import-outside-toplevel

  wanted = tuple(sources or SOURCES)
  ready = prepared_sources(data_dir)
  rows = []
  for source in (s for s in wanted if s in ready):
    if progress is not None:
      progress(f"    {source} test split")
    external = None if trained_on is None else source not in trained_on
    report = (done or {}).get(source)
    if (report is not None and report.get("split") == "test" and report["threshold"]["value"] == threshold["value"]
        and report["bootstrap"]["resamples"] == n_boot and (report.get("shortcut_audit") or not shortcut_audit)):
      keys = ("examples", "positives", "patients", "roc_auc", "pr_auc", "at_0.5", "at_threshold", "ci95",
              "shortcut_audit")
      rows.append({"source": source, "external": external, **{k: report[k] for k in keys if k in report}})
      continue
    data = eval_set(source, "test", image_size, data_dir, raw=shortcut_audit)
    p = np.asarray(predict(data.images), dtype=np.float64).reshape(-1)
    row = {"source": source, "external": external,
           "examples": int(len(p)), "positives": int(data.labels.sum()),
           "patients": int(len(np.unique(data.patient_ids))),
           **evaluate_probabilities(data.labels, p, data.patient_ids, float(threshold["value"]), n_boot=n_boot,
                                    seed=seed)}
    if shortcut_audit:
      raw_train = raw_arrays(Selection("train", source=source), data_dir) if "train" in SOURCE_SPLITS[source] else None
      row["shortcut_audit"] = audit(predict, data.arrays(), raw_train, data.raw_arrays() if raw_train else None)
    rows.append(row)
  return {"threshold": dict(threshold), "trained_on": list(trained_on) if trained_on is not None else None,
          "rows": rows, "missing": [s for s in wanted if s not in ready]}


def sources_markdown(result: dict, heading: str = "## Every source's test split") -> str:
  """The per-source table (and the sources not prepared), as a report section."""
  from covidct.dataset import SOURCE_TITLES  # pylint: disable=import-outside-toplevel
  from covidct.reporting import table  # pylint: disable=import-outside-toplevel

  t = result["threshold"]
  where = t.get("from") or t.get("chosen_on", "")

  def role(row):
    return {None: "-", True: "**external**", False: "trained on"}[row["external"]]

  def audit(row, key):
    a = row.get("shortcut_audit")
    return f"{a['roc_auc'][key]:.3f}" if a else "-"

  rows = [(f"`{r['source']}` {SOURCE_TITLES.get(r['source'], '')}", role(r), f"{r['examples']} ({r['positives']})",
           r["patients"], fmt_ci(r["roc_auc"], r.get("ci95", {}).get("roc_auc")),
           fmt_ci(r["at_threshold"]["sensitivity"], r.get("ci95", {}).get("sensitivity")),
           fmt_ci(r["at_threshold"]["specificity"], r.get("ci95", {}).get("specificity")),
           audit(r, "lungs_hidden"), audit(r, "lungs_only")) for r in result["rows"]]
  lines = [heading, "",
           f"At the operating threshold {t['value']:.4f} ({where}); 95% CIs by bootstrap over patients. Shortcut "
           "audit: ROC AUC with the lung field hidden (a model that reads the lungs falls to about 0.5) and on the "
           "lungs alone (it keeps its score).", "",
           table(["source", "role", "images (COVID)", "patients", "ROC AUC (95% CI)", "sensitivity", "specificity",
                  "lungs hidden", "lungs only"], rows, align="llrrrrrrr")]
  if result.get("missing"):
    lines += ["", "Not prepared in this data dir, so not scored: " + ", ".join(f"`{s}`" for s in result["missing"])
              + " (`covidct data build --config all --manual-dir SOURCE=PATH ...`)."]
  return "\n".join(lines) + "\n"


def markdown(report: dict, title: str = "Evaluation") -> str:
  t, ci = report["threshold"], report.get("ci95", {})
  lines = [
      f"# {title}", "",
      f"{'Split' if report['split'] in ('train', 'validation', 'test') else 'Data'} `{report['split']}`: "
      f"{report['examples']} images ({report['positives']} COVID) from {report['patients']} "
      f"{report['bootstrap']['unit']}s. Operating threshold {t['value']:.4f}, "
      + (f"the model's own ({t.get('from')})" if t.get("chosen_on") == "the model"
         else f"chosen on {t['chosen_on']} for sensitivity >= {t['target_sensitivity']:.2f}")
      + f". 95% CIs: bootstrap over {report['bootstrap']['unit']}s ({report['bootstrap']['resamples']} resamples).", "",
      f"ROC AUC {fmt_ci(report['roc_auc'], ci.get('roc_auc'))}, PR AUC {fmt_ci(report['pr_auc'], ci.get('pr_auc'))}", "",
      "| metric | at 0.5 | at operating threshold (95% CI) |", "| --- | ---: | ---: |",
  ]
  for m in THRESHOLD_METRICS:
    lines.append(f"| {m} | {report['at_0.5'][m]:.3f} | {fmt_ci(report['at_threshold'][m], ci.get(m))} |")
  lines += ["", "Confusion matrix (rows: truth, columns: prediction)", "",
            "| | at 0.5: NonCOVID | COVID | at threshold: NonCOVID | COVID |", "| --- | ---: | ---: | ---: | ---: |"]
  a, b = report["at_0.5"]["confusion_matrix"], report["at_threshold"]["confusion_matrix"]
  lines.append(f"| NonCOVID | {a['tn']} | {a['fp']} | {b['tn']} | {b['fp']} |")
  lines.append(f"| COVID | {a['fn']} | {a['tp']} | {b['fn']} | {b['tp']} |")
  if "shortcut_audit" in report:
    from covidct.audit import markdown as audit_markdown  # pylint: disable=import-outside-toplevel

    lines += ["", audit_markdown(report["shortcut_audit"])]
  if report.get("sources"):
    lines += ["", sources_markdown(report["sources"]).rstrip()]
  return "\n".join(lines) + "\n"


def plot_report(report: dict, out_dir) -> None:
  """roc.png, pr.png and confusion.png."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from sklearn import metrics as skm  # pylint: disable=import-outside-toplevel

  out_dir = pathlib.Path(out_dir)
  y = np.array([r["label"] for r in report["predictions"]])
  p = np.array([r["probability"] for r in report["predictions"]])
  thr = report["threshold"]["value"]
  at = report["at_threshold"]
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  skm.RocCurveDisplay.from_predictions(y, p, ax=ax, name="model")
  ax.plot(1 - at["specificity"], at["sensitivity"], "o", label=f"threshold {thr:.3f}")
  ax.plot([0, 1], [0, 1], "--", color="grey")
  ax.legend(loc="lower right")
  ax.set_title(f"ROC, {report['split']} split")
  fig.tight_layout()
  fig.savefig(out_dir / "roc.png", dpi=100)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  skm.PrecisionRecallDisplay.from_predictions(y, p, ax=ax, name="model")
  ax.plot(at["sensitivity"], at["precision"], "o", label=f"threshold {thr:.3f}")
  ax.legend(loc="lower left")
  ax.set_title(f"Precision-recall, {report['split']} split")
  fig.tight_layout()
  fig.savefig(out_dir / "pr.png", dpi=100)
  plt.close(fig)
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
  for ax, t, name in ((axes[0], 0.5, "0.5"), (axes[1], thr, f"{thr:.3f}")):
    skm.ConfusionMatrixDisplay.from_predictions(y, (p >= t).astype(int), labels=[0, 1],
                                                display_labels=["NonCOVID", "COVID"], ax=ax, colorbar=False)
    ax.set_title(f"threshold {name}")
  fig.tight_layout()
  fig.savefig(out_dir / "confusion.png", dpi=100)
  plt.close(fig)


def write_report(report: dict, out_dir, overwrite: bool = False, title: str = "Evaluation") -> pathlib.Path:
  """report.json, report.md, predictions in the JSON, and the three PNGs; atomically (temporary folder, rename)."""
  from covidct.fsutil import atomic_dir  # pylint: disable=import-outside-toplevel

  with atomic_dir(out_dir, overwrite) as tmp:
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    (tmp / "report.md").write_text(markdown(report, title))
    plot_report(report, tmp)
  return pathlib.Path(out_dir)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
CLASS_FOLDERS = ("NonCOVID", "COVID")  # label 0, label 1


def folder_arrays(folder, image_size: int, patients_csv=None) -> dict:
  """A user's labelled images (FOLDER/COVID/*, FOLDER/NonCOVID/*; PNG, JPEG, TIFF, 16-bit too) as split_arrays
  gives a split: resized images, labels, file names, and patient ids from `patients_csv` (columns file,patient_id;
  file relative to FOLDER) or, without it, one id per image.

  Raises:
    CovidctError: a class folder missing or empty, an image that cannot be read, a patients file that does not
      cover every image.
  """
  import csv  # pylint: disable=import-outside-toplevel

  from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel
  from covidct.predict import load_image  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(folder)
  if not root.is_dir():
    raise CovidctError(f"{root} is not a folder; put the COVID images in {root}/COVID/ and the others in "
                       f"{root}/NonCOVID/.")
  files, labels = [], []
  for label, name in enumerate(CLASS_FOLDERS):
    sub = root / name
    if not sub.is_dir():
      raise CovidctError(f"{root} has no {name}/ folder; put the COVID images in {root}/COVID/ and the others in "
                         f"{root}/NonCOVID/.")
    found = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
      raise CovidctError(f"{sub} holds no image ({', '.join(IMAGE_SUFFIXES)}); both classes are needed.")
    files += found
    labels += [label] * len(found)
  names = [str(f.relative_to(root)) for f in files]
  if patients_csv is not None:
    try:
      with open(patients_csv, newline="", encoding="utf-8") as fh:
        rows, reader = {}, csv.DictReader(fh)
        if not {"file", "patient_id"} <= set(reader.fieldnames or ()):
          raise CovidctError(f"{patients_csv}: cannot read columns file,patient_id (its header is "
                             f"{','.join(reader.fieldnames or [])[:80]!r}); give a CSV with the header "
                             "file,patient_id.")
        for lineno, r in enumerate(reader, 2):
          if not isinstance(r.get("file"), str) or not isinstance(r.get("patient_id"), str):
            raise CovidctError(f"{patients_csv}:{lineno}: expected two columns, file,patient_id; found "
                               f"{[v for v in r.values() if v is not None][:2]}.")
          rows[r["file"].strip()] = r["patient_id"].strip()
    except (OSError, KeyError, csv.Error, UnicodeDecodeError) as e:
      raise CovidctError(f"{patients_csv}: cannot read columns file,patient_id ({type(e).__name__}); give a text "
                         "CSV with the header file,patient_id.") from None
    missing = [n for n in names if n not in rows]
    if missing:
      raise CovidctError(f"{patients_csv} has no patient for {len(missing)} image(s), e.g. {missing[0]}; list every "
                         "image (file relative to the folder).")
    patients = [rows[n] for n in names]
  else:
    patients = names
  images = [load_image(f, image_size) for f in files]  # an unreadable file stops with its name: no silent skip
  return {"images": np.stack(images), "labels": np.array(labels, np.int64), "filenames": np.array(names),
          "patient_ids": np.array(patients), "unit": "patient" if patients_csv is not None else "image"}


def evaluate_folder(predict: Callable[[np.ndarray], np.ndarray], image_size: int, folder, threshold: dict,
                    patients_csv=None, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0, shortcut_audit: bool = True) -> dict:
  """The report `evaluate` gives for a split, for a user's own labelled folder (folder_arrays), at the model's own
  operating threshold (`threshold`: {'value', 'from'}): how a hospital checks the model on its scans before
  trusting it. The audit leaves out the image-statistics baseline (there is no train split to fit it on)."""
  data = folder_arrays(folder, image_size, patients_csv)
  p = np.asarray(predict(data["images"]), dtype=np.float64).reshape(-1)
  report = {
      "split": str(folder), "examples": int(len(p)), "positives": int(data["labels"].sum()),
      "patients": int(len(np.unique(data["patient_ids"]))),
      "threshold": {"value": float(threshold["value"]), "from": threshold["from"], "chosen_on": "the model"},
      "bootstrap": {"resamples": n_boot, "unit": data["unit"], "level": 0.95, "seed": seed},
      **evaluate_probabilities(data["labels"], p, data["patient_ids"], threshold["value"], n_boot=n_boot, seed=seed),
      "predictions": [{"filename": f, "patient_id": pid, "label": int(l), "probability": float(q)}
                      for f, pid, l, q in zip(data["filenames"], data["patient_ids"], data["labels"], p)],
  }
  if shortcut_audit:
    from covidct.audit import audit  # pylint: disable=import-outside-toplevel

    report["shortcut_audit"] = audit(predict, data, None, None)
  return report


def evaluate_models(models, *, split: str = "test", out_dir=None, target_sensitivity: float = TARGET_SENSITIVITY,
                    n_boot: int = BOOTSTRAP_RESAMPLES, tta: bool = False, folder=None, patients_csv=None,
                    threshold: float | None = None, data_dir=None, overwrite: bool = False, sources=None,
                    progress=None):
  """`covidct evaluate`: scores one model (or the mean of several) on a split or on a labelled folder, writes the
  report folder, and returns (report, its folder, its title).

  Args:
    models: model paths (training folder, SavedModel, .keras, .tflite, .onnx); several are averaged.
    split: the split to score when no `folder` is given; its threshold is chosen on validation.
    out_dir: the report folder (default: MODEL/evaluation-<split or folder name>, or beside a model file).
    target_sensitivity: for the threshold chosen on validation.
    n_boot: bootstrap resamples.
    tta: average each image with its mirror.
    folder: FOLDER/COVID/* and FOLDER/NonCOVID/* images, scored at the model's own threshold (or `threshold`).
    patients_csv: with `folder`, file,patient_id rows so CIs resample patients.
    threshold: with `folder`, the operating threshold.
    data_dir: TFDS data dir.
    overwrite: replace an existing report folder.
    sources: with the test split, the sources whose test splits the report puts side by side (default: every
      source prepared in `data_dir`), at the model's own threshold where it has one, else the report's.
    progress: called with one line per step.
  Raises:
    CovidctError: a bad option combination, an existing report folder, an unloadable model or unreadable images.
  """
  from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel
  from covidct.fsutil import refuse_existing  # pylint: disable=import-outside-toplevel
  from covidct.runners import EnsembleRunner, FlipTTARunner, load_runner  # pylint: disable=import-outside-toplevel

  if not 0 < target_sensitivity <= 1:
    raise CovidctError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}.")
  if len(models) > 1 and not out_dir:
    raise CovidctError("an ensemble of several models needs --out for its report.")
  if (patients_csv or threshold is not None) and not folder:
    raise CovidctError("--patients and --threshold go with --folder (a split's threshold is chosen on validation).")
  path = pathlib.Path(models[0])
  name = f"evaluation-{pathlib.Path(folder).name if folder else split}"
  out = pathlib.Path(out_dir) if out_dir else (path / name if path.is_dir() else path.with_name(f"{path.stem}-{name}"))
  refuse_existing(out, overwrite, inputs=(*models, *([folder] if folder else []),
                                          *([patients_csv] if patients_csv else [])))
  runners = [load_runner(m) for m in models]
  runner = runners[0] if len(runners) == 1 else EnsembleRunner(runners)
  if tta:
    runner = FlipTTARunner(runner)
  if folder:
    from covidct.predict import model_threshold  # pylint: disable=import-outside-toplevel

    report = evaluate_folder(runner, runner.image_size, folder, model_threshold(models[0], threshold),
                             patients_csv=patients_csv, n_boot=n_boot)
  else:
    from covidct.modelio import trained_sources  # pylint: disable=import-outside-toplevel
    from covidct.predict import model_threshold  # pylint: disable=import-outside-toplevel

    trained = trained_sources(models[0]) if len(models) == 1 else None
    first = (trained or ("covid_ct",))[0]
    report = evaluate(runner, runner.image_size, data_dir=data_dir, split=split,
                      target_sensitivity=target_sensitivity, n_boot=n_boot, shortcut_audit=True, source=first)
    if split == "test":
      own = model_threshold(models[0]) if len(models) == 1 else {"from": "default"}
      operating = own if not own["from"].startswith("default") else report["threshold"]
      report["sources"] = evaluate_sources(runner, runner.image_size, operating, data_dir=data_dir, sources=sources,
                                           trained_on=trained, n_boot=n_boot, progress=progress,
                                           done={first: report})
  report["model"] = [str(m) for m in models] if len(models) > 1 else str(path)
  report["test_time_augmentation"] = "horizontal flip" if tta else None
  title = (f"Evaluation of {' + '.join(pathlib.Path(m).name for m in models)}{' with flip TTA' if tta else ''}"
           f"{f' on {folder}' if folder else ''}")
  write_report(report, out, overwrite=overwrite, title=title)
  return report, out, title
