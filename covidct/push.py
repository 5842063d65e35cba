"""TFX-style bless and push: a blessed export goes to serving/<N>/ (TF Serving's layout), atomically."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

from covidct.errors import CovidctError


def versions(serving_dir) -> list[dict]:
  """Pushed versions, oldest first, each with its blessing and metrics."""
  root = pathlib.Path(serving_dir)
  out = []
  if root.is_dir():
    for d in sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
      info = json.loads((d / "blessing.json").read_text()) if (d / "blessing.json").exists() else {}
      out.append({"version": int(d.name), "path": str(d), **info})
  return out


def bless(manifest: dict, current: dict | None, min_roc_auc: float, min_sensitivity: float, max_regression: float
          ) -> tuple[bool, list[str], dict]:
  """Validation metrics against thresholds, and against the current blessed model (no worse by > max_regression)."""
  val = manifest["metrics"]["saved_model"]["validation"]
  metrics = {"roc_auc": val["roc_auc"], "sensitivity": val["at_threshold"]["sensitivity"],
             "specificity": val["at_threshold"]["specificity"]}
  reasons = []
  if metrics["roc_auc"] < min_roc_auc:
    reasons.append(f"validation ROC AUC {metrics['roc_auc']:.3f} < {min_roc_auc}")
  if metrics["sensitivity"] < min_sensitivity:
    reasons.append(f"validation sensitivity {metrics['sensitivity']:.3f} < {min_sensitivity}")
  if current is not None:
    best = current["validation"]["roc_auc"]
    if metrics["roc_auc"] < best - max_regression:
      reasons.append(f"validation ROC AUC {metrics['roc_auc']:.3f} is worse than blessed version "
                     f"{current['version']} ({best:.3f}) by more than {max_regression}")
  if not manifest.get("parity_passed", False):
    reasons.append("the export failed parity")
  return not reasons, reasons, metrics


def model_card(manifest: dict, version: int) -> str:
  test = manifest["metrics"]["saved_model"]["test"]
  at, ci = test["at_threshold"], test.get("ci95", {})
  thr = manifest["operating_threshold"]
  fmt = lambda m: f"{at[m]:.3f} (95% CI {ci[m][0]:.3f}-{ci[m][1]:.3f})" if m in ci else f"{at[m]:.3f}"  # noqa: E731
  auc = f"{test['roc_auc']:.3f}" + (f" (95% CI {ci['roc_auc'][0]:.3f}-{ci['roc_auc'][1]:.3f})" if "roc_auc" in ci else "")
  rows = "\n".join(f"| {k} | {v['file']} | {v['bytes']:,} | {manifest['metrics'][k]['test']['roc_auc']:.4f} | "
                   f"{v['parity']['max_abs_diff']:.1e} | {v['parity']['agreement']:.1%} |"
                   for k, v in manifest["artifacts"].items())
  qat = ("\nThe SavedModel is quantization-aware (`covidct qat`): it computes in 8-bit steps itself, and every copy is "
         "compared with it by the quantized rules (ROC AUC within 0.01, decisions agreeing on >= 98% of test scans).\n"
         if manifest.get("quantization_aware") else "")
  return f"""# Model card: covidct COVID-19 CT classifier, version {version}

## Intended use
A research and triage aid that ranks lung CT slices by the probability of COVID-19.
It is **not a diagnostic device**: it must not be used to diagnose, rule out or treat anyone. A clinician reads
every scan.

## Data
COVID-CT (Zhao et al., arXiv:2003.13865), 746 CT slices (349 COVID, 397 non-COVID), official patient-level split:
train 425, validation 118, test 203; no patient in two splits. Input: one grayscale slice,
{manifest['input']['dtype']} {manifest['input']['shape']}. Preprocessing: {manifest['preprocessing']}.

## Metrics (test split, SavedModel)
Operating threshold {thr['value']:.4f}, chosen on the validation split for sensitivity >= {thr['target_sensitivity']}.
Confidence intervals: bootstrap over patients.

| metric | value |
| --- | --- |
| ROC AUC | {auc} |
| sensitivity | {fmt('sensitivity')} |
| specificity | {fmt('specificity')} |
| precision | {fmt('precision')} |
| accuracy | {fmt('accuracy')} |

## Artifacts
| format | file | bytes | test ROC AUC | max abs diff vs SavedModel | decision agreement |
| --- | --- | ---: | ---: | ---: | ---: |
{rows}
{qat}
## Known limits
- One small dataset (746 slices); metrics have wide confidence intervals.
- Many images were taken from figures in papers (varied size, contrast, annotations, compression), not from
  scanners; performance on clinical DICOM data is unknown.
- Labels are per slice, not per patient or per study; a non-COVID label does not exclude other disease.
"""


def push(export_dir, serving_dir, min_roc_auc: float = 0.70, min_sensitivity: float = 0.85,
         max_regression: float = 0.02, force: bool = False) -> dict:
  """Blesses the export in `export_dir` and, when blessed (or forced), copies it to serving_dir/<N>/ atomically."""
  src = pathlib.Path(export_dir)
  if not (src / "manifest.json").exists():
    raise CovidctError(f"{src} has no manifest.json; pass a folder written by `covidct export`.")
  manifest = json.loads((src / "manifest.json").read_text())
  root = pathlib.Path(serving_dir)
  existing = versions(root)
  blessed = [v for v in existing if v.get("blessed")]
  ok, reasons, metrics = bless(manifest, blessed[-1] if blessed else None, min_roc_auc, min_sensitivity, max_regression)
  if not ok and not force:
    raise CovidctError("not blessed: " + "; ".join(reasons) + ". Improve the model, or pass --force to push anyway.")
  version = (existing[-1]["version"] + 1) if existing else 1
  root.mkdir(parents=True, exist_ok=True)
  tmp = root / f".{version}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    shutil.copytree(src / "saved_model", tmp)  # TF Serving reads serving/<N>/saved_model.pb
    extra = tmp / "assets.extra"
    extra.mkdir(exist_ok=True)
    for p in src.iterdir():
      if p.is_file():
        shutil.copy2(p, extra / p.name)
    info = {"blessed": ok, "forced": bool(force and not ok), "reasons": reasons, "validation": metrics,
            "test_roc_auc": manifest["metrics"]["saved_model"]["test"]["roc_auc"], "source": str(src.resolve()),
            "pushed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / "blessing.json").write_text(json.dumps(info, indent=2))
    (tmp / "MODEL_CARD.md").write_text(model_card(manifest, version))
    os.rename(tmp, root / str(version))  # fails if the version appeared meanwhile: nothing is overwritten
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"version": version, "path": str(root / str(version)), **info}
