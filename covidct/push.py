"""TFX-style bless and push: a blessed export goes to serving/<N>/ (TF Serving's layout), atomically."""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import shutil
import time

from covidct.errors import CovidctError
from covidct.fsutil import remove_stale_partials
from covidct.manifest import MANIFEST_FILE, Manifest, write_json
from covidct.modelio import config_sources
from covidct.reporting import fmt_ci, table
from covidct.repository import BLESSING_FILE, versions  # noqa: F401  (versions: push --list)

MODEL_CARD_FILE = "MODEL_CARD.md"


def report_folders(src: pathlib.Path) -> set[str]:
  """The folders that `covidct bench EXPORT` (bench/, with its bench.json) and `covidct evaluate EXPORT/FILE`
  (<stem>-evaluation-<name>/, with its report.md) write inside an export by default: reports about the export, not
  part of it. Push neither checks nor ships them (the documented export, bench, push flow)."""
  found = set()
  for d in (p for p in src.iterdir() if p.is_dir() and not p.is_symlink()):
    if (d.name == "bench" and (d / "bench.json").is_file()) or (
        "evaluation-" in d.name and (d / "report.md").is_file() and d.name not in ("saved_model", "test_data")):
      found.add(d.name)
  return found


def check_files(src: pathlib.Path, manifest: Manifest) -> None:
  """Raises unless the export folder holds exactly the files its manifest lists (besides the report folders of
  bench and evaluate), with their sizes and SHA-256, and no symbolic link (a link would ship whatever it points to)."""
  from covidct.fsutil import sha256  # pylint: disable=import-outside-toplevel

  listed = manifest.files
  if not listed:
    raise CovidctError(f"{src}/{MANIFEST_FILE} lists no files; export the model again with `covidct export`.")
  present = {}
  reports = report_folders(src)
  for p in sorted(src.rglob("*")):
    if p.is_symlink():
      raise CovidctError(f"{p} is a symbolic link; an export ships its own files only. Export again.")
    if p.is_file() and p != src / MANIFEST_FILE and p.relative_to(src).parts[0] not in reports:
      present[str(p.relative_to(src))] = p
  unlisted = sorted(set(present) - set(listed))
  if unlisted:
    raise CovidctError(f"{src} holds files its manifest does not list ({', '.join(unlisted[:3])}); export again.")
  for name, info in listed.items():
    p = present.get(name)
    if p is None:
      raise CovidctError(f"{src}/{name} is listed in the manifest but missing; export again.")
    if not isinstance(info, dict) or p.stat().st_size != info.get("bytes") or sha256(p) != info.get("sha256"):
      raise CovidctError(f"{src}/{name} does not match its SHA-256 in the manifest (changed or damaged); export "
                         "again.")


def check_thresholds(src: pathlib.Path, manifest: Manifest) -> None:
  """Raises unless every .onnx and .tflite copy carries the manifest's operating threshold in its own metadata:
  serve labels by the manifest, predict on a copy by its metadata, and the two must agree (an edited manifest
  threshold would make them disagree)."""
  from covidct.runners import read_onnx_meaning  # pylint: disable=import-outside-toplevel
  from covidct.tflite_metadata import read_meaning  # pylint: disable=import-outside-toplevel

  for info in manifest.artifacts.values():
    path = src / info["file"]
    own = (read_onnx_meaning if path.suffix == ".onnx" else read_meaning)(path)
    if own is not None and own["threshold"] != manifest.threshold:
      raise CovidctError(f"{src / MANIFEST_FILE}'s operating threshold {manifest.threshold!r} is not the one "
                         f"{info['file']} carries ({own['threshold']!r}): the manifest was edited. Export again.")


def replay_vectors(src: pathlib.Path, manifest: Manifest) -> None:
  """Loads the SavedModel and every artifact in a fresh process (`covidct verify`) and replays their test vectors;
  raises unless each gives the answers recorded at export."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  targets = [src / "saved_model"] + [src / a["file"] for a in manifest.artifacts.values()]
  res = subprocess.run([sys.executable, "-m", "covidct.cli", "verify", *map(str, targets)], capture_output=True,
                       text=True, check=False)
  if res.returncode != 0:
    failed = [l for l in (res.stdout + res.stderr).splitlines() if l.startswith(("FAIL", "Error"))]
    raise CovidctError(f"{src}: a shipped model does not give its recorded answers in a fresh process: "
                       f"{(failed or ['verify failed'])[0]}. Export again.")


def measure(src: pathlib.Path, threshold: float, data_dir=None, runner=None) -> dict:
  """The SavedModel's test split figures at `threshold`, computed now (not read from a file the export wrote)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from covidct.data import eval_set  # pylint: disable=import-outside-toplevel
  from covidct.metrics import ranking_metrics, threshold_metrics  # pylint: disable=import-outside-toplevel
  from covidct.runners import SavedModelRunner  # pylint: disable=import-outside-toplevel

  runner = runner or SavedModelRunner(src / "saved_model")
  test = eval_set("covid_ct", "test", runner.image_size, data_dir)
  p = runner(test.images)
  at = threshold_metrics(test.labels, p, threshold)
  return {"split": "test", "examples": int(len(p)), "roc_auc": ranking_metrics(test.labels, np.asarray(p))["roc_auc"],
          "threshold": threshold, "sensitivity": at["sensitivity"], "specificity": at["specificity"]}


def measure_sources(runner, manifest: Manifest, data_dir=None, shortcut_audit: bool = True) -> dict:
  """The SavedModel on every prepared source's test split at the export's threshold, computed now (with each
  source's shortcut audit, for the model card; covidct.evaluate.evaluate_sources); without the per-image
  predictions."""
  from covidct.evaluate import evaluate_sources  # pylint: disable=import-outside-toplevel

  trained = config_sources(manifest.training_config) if manifest.training_config else None
  result = evaluate_sources(runner, runner.image_size, {"value": manifest.threshold, "from": "the export's manifest"},
                            data_dir=data_dir, trained_on=trained, shortcut_audit=shortcut_audit)
  for row in result["rows"]:
    row.pop("predictions", None)
  return result


def bless(measured: dict, current: dict | None, gate, parity_passed: bool,
          sources: dict | None = None) -> tuple[bool, list[str]]:
  """Test figures against the gate's floors and against the last blessed version's (no worse by more than
  gate.max_regression); returns (blessed, reasons it is not). With `sources` (measure_sources), every other
  source's test split must clear the same floors too, each refusal naming its source; an external site
  (covidct.dataset.EXTERNAL_ONLY), one no model trains on, is held to the ROC AUC floor."""
  from covidct.dataset import EXTERNAL_ONLY  # pylint: disable=import-outside-toplevel

  reasons = []
  floors = (("roc_auc", gate.min_roc_auc), ("sensitivity", gate.min_sensitivity), ("specificity", gate.min_specificity))
  for key, floor in floors:
    if measured[key] < floor:
      reasons.append(f"test {key.replace('_', ' ')} {measured[key]:.3f} < {floor}")
  for row in (sources or {}).get("rows", []):
    if row["source"] == "covid_ct":  # `measured`, above
      continue
    figures = {"roc_auc": row["roc_auc"], **{k: row["at_threshold"][k] for k in ("sensitivity", "specificity")}}
    for key, floor in floors[:1] if row["source"] in EXTERNAL_ONLY else floors:
      if not figures[key] >= floor:  # NaN (one class only) fails too
        reasons.append(f"{row['source']} test {key.replace('_', ' ')} {figures[key]:.3f} < {floor}")
  best = (current or {}).get("test", {}).get("roc_auc")
  if best is not None and measured["roc_auc"] < best - gate.max_regression:
    reasons.append(f"test ROC AUC {measured['roc_auc']:.3f} is worse than blessed version {current['version']} "
                   f"({best:.3f}) by more than {gate.max_regression}")
  if not parity_passed:
    reasons.append("the export failed parity")
  return not reasons, reasons


def _expected_lines(threshold: dict) -> str:
  """What the calibration split said to expect at the shipped threshold, per source ('' when none was fitted)."""
  expected = threshold.get("expected") or []
  if not expected:
    return ""
  rows = [(f"`{r['source']}` validation", f"{r['examples']} ({r['positives']})", fmt_ci(r["sensitivity"],
           r.get("ci95", {}).get("sensitivity")), fmt_ci(r["specificity"], r.get("ci95", {}).get("specificity")))
          for r in expected]
  return ("\nExpected at this threshold, from the calibration split it was fitted on (data the model never trained "
          "on):\n\n" + table(["split", "images (COVID)", "sensitivity", "specificity"], rows, align="lrrr") + "\n")


def model_card(manifest: Manifest, version: int, sources: dict | None = None) -> str:
  from tfds_covidct.covid_ct.covid_ct_dataset_builder import Builder  # pylint: disable=import-outside-toplevel

  test = manifest.metrics["saved_model"]["test"]
  row = next((r for r in (sources or {}).get("rows", []) if r["source"] == "covid_ct"), None)
  if row is not None:  # measured at push, not the manifest's claim (which an edit could forge)
    test = {"roc_auc": row["roc_auc"], "at_threshold": row["at_threshold"], "ci95": row.get("ci95", {})}
  at, ci = test["at_threshold"], test.get("ci95", {})
  thr = manifest.operating_threshold
  fmt = lambda m: fmt_ci(at[m], ci.get(m), label="95% CI ")  # noqa: E731
  auc = fmt_ci(test["roc_auc"], ci.get("roc_auc"), label="95% CI ")
  counts = {s: sum(c.values()) for s, c in Builder.EXPECTED_COUNTS.items()}
  trained = ", ".join(f"`{s}`" for s in config_sources(manifest.training_config or {}))
  by_class = {k: sum(c[k] for c in Builder.EXPECTED_COUNTS.values()) for k in ("COVID", "NonCOVID")}
  metrics = table(["metric", "value"], [("ROC AUC", auc)] + [(m, fmt(m)) for m in
                                                             ("sensitivity", "specificity", "precision", "accuracy")],
                  align="ll")
  rows = table(["format", "file", "bytes", "test ROC AUC (at export)", "max abs diff vs SavedModel",
                "decision agreement"],
               [(k, v["file"], f"{v['bytes']:,}", f"{manifest.metrics[k]['test']['roc_auc']:.4f}",
                 f"{v['parity']['max_abs_diff']:.1e}", f"{v['parity']['agreement']:.1%}")
                for k, v in manifest.artifacts.items()], align="llrrrr")
  audit = _audit_lines(manifest.shortcut_audit)
  if sources and sources.get("rows"):
    from covidct.evaluate import sources_markdown  # pylint: disable=import-outside-toplevel

    per_source = "\n" + sources_markdown(sources, "## Every source's test split (SavedModel, measured at push)")
  else:
    per_source = ""
  qat = ("\nThe SavedModel is quantization-aware (`covidct qat`): it computes in 8-bit steps itself, and every copy is "
         "compared with it by the quantized rules (ROC AUC within 0.01, decisions agreeing on >= 98% of test scans).\n"
         if manifest.quantization_aware else "")
  return f"""# Model card: covidct COVID-19 CT classifier, version {version}

## Intended use
A research and triage aid that ranks lung CT slices by the probability of COVID-19.
It is **not a diagnostic device**: it must not be used to diagnose, rule out or treat anyone. A clinician reads
every scan.

## Data
COVID-CT (Zhao et al., arXiv:2003.13865), {sum(counts.values())} CT slices ({by_class['COVID']} COVID, {by_class['NonCOVID']} non-COVID), official
patient-level split: train {counts['train']}, validation {counts['validation']}, test {counts['test']}; no patient in two splits. Input: one
grayscale slice, {manifest.input['dtype']} {manifest.input['shape']}. Preprocessing: {manifest.preprocessing}.
Trained on: {trained}. The other sources (CC-CCII, patient split; COVID-CT-MD, one Tehran centre) are described in
the dataset card; a source the model never trained on is marked external below.

## Metrics (COVID-CT test split, SavedModel{", measured at push" if row is not None else ""})
Operating threshold {thr['value']:.4f}, chosen on {thr.get('chosen_on', 'validation')} for sensitivity >= {thr['target_sensitivity']}.
Confidence intervals: bootstrap over patients.
{_expected_lines(thr)}
{metrics}
{per_source}
## Artifacts
{rows}
{qat}
## Known limits
- Small datasets: COVID-CT has 746 slices; CC-CCII's 5,605 come from only 299 patients (its test split from 60).
  Metrics have wide confidence intervals.
- **Source and label are one variable.** Every COVID image is a figure cut from a paper; every non-COVID image was
  crawled from the web or taken from MedPix. On the test split, a logistic regression on how the file looks (JPEG
  or PNG, grey-level mean, size; no model, no lungs) ranks the scans about as well as the fine-tuned networks do,
  and a fine-tuned MobileNetV2 kept most of its score with the lungs hidden and fell near chance on the lungs alone
  (`covidct evaluate` reports this shortcut audit). The test split therefore does **not** establish performance on
  scanner images from a new site: on a held-out set of real scanner slices, models from this recipe scored near or
  below chance. Before any use, score the model on your own labelled scans: `covidct evaluate MODEL --folder DIR`.
{audit}- Inputs that do not look like the training slices are flagged by the input guard (`covidct predict` warns;
  `--strict` refuses); a slice that passes the guard can still be outside what the model knows.
- Labels are per slice, not per patient or per study; a non-COVID label does not exclude other disease.
"""


AUDIT_HIDDEN_MAX = 0.60  # what a model that reads the lungs shows (issue 17): lungs hidden at most this ROC AUC,
AUDIT_ONLY_WITHIN = 0.03  # and lungs only within this of the full image's


def _audit_lines(audit: dict | None) -> str:
  """This model's own shortcut audit, for the model card's known limits (empty for an export made without one)."""
  if not audit:
    return ""
  auc = audit["roc_auc"]
  stats = audit.get("image_statistics") or {}
  reads = auc["lungs_hidden"] <= AUDIT_HIDDEN_MAX and abs(auc["full"] - auc["lungs_only"]) <= AUDIT_ONLY_WITHIN
  verdict = ("It behaves as a model that reads the lungs would." if reads else
             f"It does **not** behave as a model that reads the lungs (that would score <= {AUDIT_HIDDEN_MAX:.2f} with "
             f"the lungs hidden and within {AUDIT_ONLY_WITHIN:.2f} of the full image on the lungs alone): its score "
             "comes mostly from outside the lung field and from how the image was made.")
  statistics = (f"; image statistics alone, no model: {stats['roc_auc']:.3f}" if stats.get("roc_auc") is not None
                else "")
  return (f"- **This model's shortcut audit** (test split, ROC AUC): full image {auc['full']:.3f}; lungs hidden "
          f"{auc['lungs_hidden']:.3f}; lungs only {auc['lungs_only']:.3f}{statistics}. {verdict}\n")


def stage_version(export_dir, dst) -> None:
  """Lays an export out as a pushed version in `dst`: the SavedModel at the top (TF Serving reads
  serving/<N>/saved_model.pb) and the export's files (copies, manifest, parity, guard) in assets.extra/."""
  src, dst = pathlib.Path(export_dir), pathlib.Path(dst)
  shutil.copytree(src / "saved_model", dst)
  extra = dst / "assets.extra"
  extra.mkdir(exist_ok=True)
  for p in src.iterdir():
    if p.is_file():
      shutil.copy2(p, extra / p.name)


def check_staged(version_dir: pathlib.Path, manifest: Manifest) -> None:
  """Raises unless every file a staged version holds from the export matches the manifest's SHA-256 (the SavedModel
  at the top, the other files in assets.extra/), and its manifest is the one that was checked."""
  from covidct.fsutil import sha256  # pylint: disable=import-outside-toplevel

  for name, info in manifest.files.items():
    parts = pathlib.Path(name).parts
    staged = (version_dir.joinpath(*parts[1:]) if parts[0] == "saved_model" else
              version_dir / "assets.extra" / name if len(parts) == 1 else None)
    if staged is None:  # test vectors stay in the export
      continue
    if not staged.is_file() or sha256(staged) != info.get("sha256"):
      raise CovidctError(f"{name} changed while it was being pushed (the copy written does not match the SHA-256 "
                         "that was checked); nothing was pushed. Push again.")
  if Manifest.load(version_dir / "assets.extra").to_dict() != manifest.to_dict():
    raise CovidctError(f"{MANIFEST_FILE} changed while it was being pushed; nothing was pushed. Push again.")


PUSH_ATTEMPTS = 20  # versions tried when pushes run at once


def _claim_version(tmp: pathlib.Path, root: pathlib.Path, prepare) -> int:
  """Renames the finished `tmp` to root/<N>, N the next free version; a push running at the same time that takes N
  first makes this one try N + 1 (the rename never overwrites a version). `prepare(N)` writes what names N."""
  listed = versions(root)
  version = (listed[-1]["version"] + 1) if listed else 1
  for _ in range(PUSH_ATTEMPTS):
    while (root / str(version)).exists():
      version += 1
    prepare(version)
    try:
      os.rename(tmp, root / str(version))
      return version
    except OSError as e:
      if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
        raise
      version += 1
  raise CovidctError(f"{root} is busy: other pushes took {PUSH_ATTEMPTS} versions while this one was writing; push "
                     "again.")


def push(export_dir, serving_dir, gate=None, data_dir=None, force: bool = False, infra_validation: bool = True) -> dict:
  """Checks the export's files against its manifest, measures its SavedModel on the test split, blesses it against
  `gate` (covidct.config.GateConfig) and, when blessed (or forced), copies it to serving_dir/<N>/ atomically, after
  (with `infra_validation`) the candidate has been served by `covidct serve` and answered its canaries.

  Raises:
    CovidctError: the export is damaged, changed or incomplete, or the candidate fails in the server (never pushed,
      even with `force`), or it is not blessed and not forced.
  """
  from covidct.config import GateConfig  # pylint: disable=import-outside-toplevel

  gate = gate or GateConfig()
  if infra_validation:  # before anything is measured: the candidate is served by covidct serve
    from covidct.extras import require  # pylint: disable=import-outside-toplevel

    require("serve", "push's infra validation (it serves the candidate first; --skip-infra-validation skips it)")
  src = pathlib.Path(export_dir)
  manifest = Manifest.load(src)
  threshold = manifest.threshold
  check_files(src, manifest)
  check_thresholds(src, manifest)
  replay_vectors(src, manifest)
  from covidct.runners import SavedModelRunner  # pylint: disable=import-outside-toplevel

  runner = SavedModelRunner(src / "saved_model")
  gated = measure_sources(runner, manifest, data_dir, shortcut_audit=False)  # every prepared source's test split
  row = next((r for r in gated["rows"] if r["source"] == "covid_ct"), None)
  measured = measure(src, threshold, data_dir, runner) if row is None else {  # COVID-CT's row: scored once
      "split": "test", "examples": row["examples"], "roc_auc": row["roc_auc"], "threshold": threshold,
      "sensitivity": row["at_threshold"]["sensitivity"], "specificity": row["at_threshold"]["specificity"]}
  root = pathlib.Path(serving_dir)
  existing = versions(root)
  blessed = [v for v in existing if v.get("blessed")]
  ok, reasons = bless(measured, blessed[-1] if blessed else None, gate, manifest.parity_passed, gated)
  if not ok and not force:
    raise CovidctError("not blessed: " + "; ".join(reasons) + ". Improve the model, or pass --force to push anyway.")
  per_source = measure_sources(runner, manifest, data_dir)  # with each source's audit, for the model card
  root.mkdir(parents=True, exist_ok=True)
  remove_stale_partials(root / "push")  # what a killed push left
  tmp = root / f".push.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    stage_version(src, tmp)
    check_staged(tmp, manifest)  # what was written, not what was read: a file swapped after the checks is caught
    info = {"blessed": ok, "forced": bool(force and not ok), "reasons": reasons, "test": measured,
            "sources": per_source,
            "gate": dataclasses.asdict(gate), "source": str(src.resolve()),
            "pushed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if infra_validation:
      from covidct.serve import infra_validate  # pylint: disable=import-outside-toplevel

      info["infra_validation"] = infra_validate(tmp, src)
    write_json(tmp / BLESSING_FILE, info)
    card = lambda v: (tmp / MODEL_CARD_FILE).write_text(model_card(manifest, v, per_source))  # noqa: E731
    version = _claim_version(tmp, root, card)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"version": version, "path": str(root / str(version)), **info}
