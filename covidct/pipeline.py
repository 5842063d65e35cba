"""`covidct pipeline`: the main job, end to end, with one report.md that shows it all."""

from __future__ import annotations

import pathlib
import time

from covidct.config import BOOTSTRAP_RESAMPLES, MODEL_OF_RECORD
from covidct.cv import CV_SPLIT
from covidct.errors import CovidctError
from covidct.manifest import Manifest
from covidct.reporting import fmt_ci, table

# Overrides that change what a recipe's cross-validation chose: with any of them the record no longer applies.
SCHEDULE_FIELDS = {"epochs", "head_epochs", "image_size", "model", "learning_rate", "fine_tune_learning_rate",
                   "freeze_batch_norm", "fine_tune_from", "augment", "batch_size", "sources", "source_weights",
                   "class_balance", "epoch_images", "slices_per_patient"}


def run(out_dir, manual_dir=None, data_dir=None, recipe: str = MODEL_OF_RECORD, overrides: dict | None = None,
        formats: str = "all", n_boot: int = BOOTSTRAP_RESAMPLES, force_push: bool = False, record="auto",
        echo=print, manual_dirs: dict | None = None) -> pathlib.Path:
  """build dataset -> train -> (quantization-aware copy) -> evaluate -> export + parity -> short benchmark -> bless +
  push -> report.md.

  Args:
    out_dir: the job's folder (must not exist).
    manual_dir, data_dir: the upstream COVID-CT files and the TFDS data dir (see covidct.dataset.build).
    manual_dirs: {source: manual dir}, the sources to build (covidct.dataset.manual_dirs_for); default: covid_ct
      from `manual_dir`. Every source built is scored in the evaluation's per-source table; the training sources
      (overrides['sources'], default covid_ct) must be among them.
    recipe: a named recipe; the default is the model of record.
    overrides: TrainConfig fields replacing the recipe's.
    formats: the export formats.
    n_boot: bootstrap resamples behind every confidence interval.
    force_push: push even when the gate does not bless.
    record: the recipe's covidct.config.CrossValidated ('auto': the one in CROSS_VALIDATED, unless the overrides
      change the schedule it was chosen for). With a record the model trains on all of train + validation for its
      epochs, is made quantization-aware at its temperature (`covidct qat`, calibration only) and ships with its
      out-of-fold threshold. Without one it trains on train (the recipe's whole schedule when its patience is 0, else
      its best validation epoch), and the threshold is fitted on the validation splits of every source it trained on
      (covidct.evaluate.calibration_threshold: each reaches the target sensitivity), what the report says to expect.
    echo: called with one line per step.
  Returns:
    The path of report.md.
  Raises:
    CovidctError: bad input (the folder exists, a bad recipe or override).
  """
  from covidct import dataset  # pylint: disable=import-outside-toplevel
  from covidct.config import CROSS_VALIDATED, resolve  # pylint: disable=import-outside-toplevel
  from covidct.data import Selection  # pylint: disable=import-outside-toplevel
  from covidct.evaluate import (  # pylint: disable=import-outside-toplevel
      calibration_threshold, evaluate, evaluate_sources, write_report)
  from covidct.push import push  # pylint: disable=import-outside-toplevel
  from covidct.quantize import qat  # pylint: disable=import-outside-toplevel
  from covidct.runners import SavedModelRunner  # pylint: disable=import-outside-toplevel
  from covidct.train import train  # pylint: disable=import-outside-toplevel
  from export.errors import ParityError  # pylint: disable=import-outside-toplevel
  from export.package import export_model  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(out_dir)
  if out.exists():
    raise CovidctError(f"output folder {out} exists; choose another --out.")
  overrides = dict(overrides or {})
  if record == "auto":
    record = None if SCHEDULE_FIELDS & set(overrides) else CROSS_VALIDATED.get(recipe)
  cfg = resolve(recipe, **overrides)  # a bad recipe or override fails before anything is built
  if record is not None and cfg.head_epochs + cfg.epochs != record.epochs:
    raise CovidctError(f"the '{recipe}' schedule ({cfg.head_epochs} + {cfg.epochs} epochs) is not the "
                       f"{record.epochs} epochs its cross-validation chose; give a matching record.")
  start, times = time.time(), {}
  last = [start]

  def step(name):  # seconds since the previous step ended
    now = time.time()
    times[name] = round(now - last[0], 1)
    last[0] = now

  manual_dirs = dict(manual_dirs or {"covid_ct": manual_dir})
  missing = [s for s in cfg.sources if s not in manual_dirs]
  if missing:
    raise CovidctError(f"training on {', '.join(missing)} needs its files: give --sources-root or --manual-dir "
                       f"{missing[0]}=PATH.")
  echo("1/6 dataset: " + ", ".join(manual_dirs))
  builders = dataset.build_sources(manual_dirs, data_dir=data_dir, progress=echo if len(manual_dirs) > 1 else None)
  data_dir = str(builders[cfg.sources[0]].data_dir_root)
  step("dataset")
  cfg = resolve(recipe, data_dir=data_dir, **overrides)
  out.mkdir(parents=True)
  threshold = None
  if record is None:
    keep = "best" if cfg.patience else "last"
    echo("2/6 training on train" + (" (the best validation epoch is kept)" if keep == "best" else
                                    f" for the recipe's {cfg.head_epochs + cfg.epochs} epochs (validation untouched)"))
    summary = train(cfg, out / "model", verbose=2, keep=keep)
    model_dir = out / "model"
    step("train")
    if cfg.model.startswith("mobilenet_v2"):
      echo("    quantization-aware copy (calibrated on train, temperature fitted on validation)")
      qat(model_dir, out / "model-qat", epochs=0, data_dir=data_dir, verbose=0)
      model_dir = out / "model-qat"
      step("qat")
    echo(f"    operating threshold on the validation splits of {', '.join(cfg.sources)} (the calibration split)")
    runner = SavedModelRunner(model_dir / "saved_model")
    threshold = calibration_threshold(runner, runner.image_size, cfg.sources, data_dir=data_dir, n_boot=n_boot)
    step("calibrate")
  else:
    echo(f"2/6 training on train + validation for the {record.epochs} epochs cross-validation chose")
    summary = train(cfg, out / "model", verbose=2, train_data=Selection(CV_SPLIT), keep="last")
    step("train")
    echo(f"    quantization-aware copy (calibrated on train, temperature {record.temperature:.3f} from the "
         "out-of-fold probabilities)")
    qat(out / "model", out / "model-qat", epochs=0, temperature=record.temperature, data_dir=data_dir, verbose=0)
    model_dir = out / "model-qat"
    threshold = {"value": record.quantized_threshold(), "chosen_on": "5-fold cross-validation's out-of-fold "
                 f"probabilities (docs/results/cross-validation.md; float threshold {record.threshold:.4f}, "
                 f"temperature {record.temperature:.3f})"}
    step("qat")
  echo("3/6 evaluation on the test split, and on every source's test split")
  runner = SavedModelRunner(model_dir / "saved_model")
  report = evaluate(runner, runner.image_size, data_dir=data_dir, split="test", n_boot=n_boot, shortcut_audit=True,
                    threshold=threshold)
  report["sources"] = evaluate_sources(runner, runner.image_size, report["threshold"], data_dir=data_dir,
                                       sources=tuple(manual_dirs), trained_on=cfg.sources, n_boot=n_boot,
                                       progress=echo, done={"covid_ct": report})
  write_report(report, model_dir / "evaluation-test")
  step("evaluate")
  echo("4/6 export and parity")
  parity_error = None
  try:
    manifest = export_model(model_dir, out / "export", formats, data_dir=data_dir, n_boot=n_boot,
                            threshold=threshold, shortcut_audit=report["shortcut_audit"], progress=echo)
  except ParityError as e:
    parity_error = str(e)
    manifest = Manifest.load(out / "export")
  step("export")
  echo("5/6 short benchmark (its recommendation goes into the export's manifest, and so into the pushed version)")
  from benchmarks.run import run_benchmark  # pylint: disable=import-outside-toplevel

  bench = run_benchmark(out / "export", out / "bench", batch_sizes=(1, 8), threads=(1,), runs=20, warmup=3,
                        max_seconds=1.0, data_dir=data_dir, pipeline=False, progress=echo)
  step("bench")
  echo("6/6 bless and push")
  try:
    pushed = push(out / "export", out / "serving", data_dir=data_dir, force=force_push)
  except CovidctError as e:
    pushed = {"version": None, "blessed": False, "reasons": [str(e)]}
  step("push")
  times["total"] = round(time.time() - start, 1)
  (out / "report.md").write_text(_report(cfg, summary, manifest, pushed, parity_error, times, out, bench,
                                         report.get("shortcut_audit"), record, model_dir, report.get("sources"),
                                         threshold))
  echo(f"report: {out / 'report.md'}")
  return out / "report.md"


def _report(cfg, summary, manifest: Manifest, pushed, parity_error, times, out, bench, audit=None, record=None,
            model_dir=None, sources=None, threshold=None) -> str:
  test = manifest.metrics["saved_model"]["test"]
  ci = test.get("ci95", {})
  at = test["at_threshold"]
  if record is None and summary.get("kept") == "last":
    trained = f"trained on train for {summary['epochs_run']} epochs (all kept; validation untouched)" + (
        f", then made quantization-aware (`{model_dir.name}`: calibrated int8 steps, temperature fitted on "
        "validation)." if model_dir.name == "model-qat" else ".")
  elif record is None:
    trained = (f"trained on train; best epoch {summary['best_epoch']} of {summary['epochs_run']} (validation "
               f"{cfg.monitor}).")
  else:
    trained = (f"trained on train + validation for {summary['epochs_run']} epochs (all kept), then made "
               f"quantization-aware (`{model_dir.name}`: calibrated int8 steps, temperature {record.temperature:.3f}).")
  lines = [
      "# covidct pipeline report", "",
      f"Recipe `{cfg.recipe}`, model `{cfg.model}` at {cfg.image_size}x{cfg.image_size}, seed {cfg.seed}, trained on "
      f"{' + '.join(f'`{s}`' for s in cfg.sources)}; {trained}", "",
  ]
  if record is not None:
    lines += [
        "## Chosen by cross-validation (train + validation, never test)", "",
        f"{record.folds}-fold patient-grouped cross-validation of this recipe chose its epochs, threshold and "
        f"temperature: ROC AUC {record.roc_auc:.3f} +- {record.roc_auc_sd:.3f} over folds (pooled out-of-fold "
        f"{record.pooled_roc_auc:.3f}); at each fold's threshold chosen on the other folds, sensitivity "
        f"{record.sensitivity:.3f} and specificity {record.specificity:.3f} (means). Measured {record.measured}; "
        f"`{record.command}`. Table: docs/results/cross-validation.md.", ""]
  lines += [
      "## Test metrics (SavedModel, official test split)", "",
      f"ROC AUC {fmt_ci(test['roc_auc'], ci.get('roc_auc'))}, PR AUC {test['pr_auc']:.3f}. Operating threshold "
      f"{manifest.threshold:.4f} (chosen on {manifest.operating_threshold.get('chosen_on', 'validation')} for "
      f"sensitivity >= {manifest.operating_threshold['target_sensitivity']}):", "",
      table(["metric", "at 0.5", "at threshold (95% CI, bootstrap over patients)"],
            [(m, f"{test['at_0.5'][m]:.3f}", fmt_ci(at[m], ci.get(m)))
             for m in ("sensitivity", "specificity", "precision", "accuracy", "f1")]),
  ]
  if threshold and threshold.get("per_source"):
    from covidct.evaluate import calibration_markdown  # pylint: disable=import-outside-toplevel

    lines += ["", calibration_markdown(threshold).rstrip()]
  if audit:
    from covidct.audit import markdown as audit_markdown  # pylint: disable=import-outside-toplevel

    lines += ["", audit_markdown(audit).rstrip()]
  if sources:
    from covidct.evaluate import sources_markdown  # pylint: disable=import-outside-toplevel

    lines += ["", sources_markdown(sources, "## Every source's test split (SavedModel)").rstrip()]
  lines += ["", "## Artifacts and parity", "",
            table(["format", "file", "bytes", "max abs diff", "test ROC AUC", "sensitivity", "agreement", "parity"],
                  [(fmt, f"export/{a['file']}", f"{a['bytes']:,}", f"{a['parity']['max_abs_diff']:.1e}",
                    f"{a['parity']['roc_auc']:.4f}", f"{a['parity']['sensitivity']:.3f}",
                    f"{a['parity']['agreement']:.1%}", "pass" if a["parity"]["passed"] else "FAIL")
                   for fmt, a in manifest.artifacts.items()], align="llrrrrrl")]
  if parity_error:
    lines += ["", f"**Parity failed:** {parity_error}"]
  lines += ["", "## Push", ""]
  if pushed.get("version"):
    lines.append(f"Version {pushed['version']} pushed to `serving/{pushed['version']}/` "
                 f"({'blessed' if pushed['blessed'] else 'not blessed, forced'}); model card: "
                 f"`serving/{pushed['version']}/MODEL_CARD.md`.")
  else:
    lines.append("Not pushed: " + "; ".join(pushed["reasons"]))
  lines += ["", "## Latency (short run, 1 thread; full run: `covidct bench`)", "",
            table(["artifact / runtime", "parity", "batch 1 p50 ms", "batch 8 images/s"],
                  [(f"{r['artifact']} / {r['runtime']}",
                    {True: "pass", False: "FAIL", None: "not checked"}[(r.get("parity") or {}).get("passed")],
                    f"{r['batches']['1']['p50_ms']:.2f}", f"{r['batches']['8']['throughput_ips']:.0f}")
                   for r in bench["results"] if r["status"] == "measured"])]
  rec = (bench.get("recommendation") or {}).get("default")
  if rec:
    lines += ["", f"Recommended on this machine (fastest at batch 1 among copies that pass parity; in the manifest, "
                  f"used by `covidct predict --model {out}/serving/N`): **{rec['file']} on {rec['runtime']}**, "
                  f"{rec['p50_ms']:.2f} ms."]
  lines += ["", f"Full table: `{out}/bench/bench.md`.", "", "## Where things are", "",
            f"- model: `{out}/model` (SavedModel, model.keras, curves.png, history.json, logs/)",
            *([f"- quantization-aware model (the one shipped): `{model_dir}`"] if model_dir.name == "model-qat"
              else []),
            f"- evaluation: `{model_dir}/evaluation-test/` (report.md, roc.png, pr.png, confusion.png)",
            f"- export: `{out}/export/` (artifacts, parity.md, manifest.json)",
            f"- serving: `{out}/serving/`", "",
            "## Wall time (s)", "", " | ".join(f"{k} {v}" for k, v in times.items())]
  return "\n".join(lines) + "\n"
