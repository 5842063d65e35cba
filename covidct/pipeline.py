"""`covidct pipeline`: the main job, end to end, with one report.md that shows it all."""

from __future__ import annotations

import pathlib
import time

from covidct.config import BOOTSTRAP_RESAMPLES
from covidct.errors import CovidctError
from covidct.manifest import Manifest
from covidct.reporting import fmt_ci, table


def run(out_dir, manual_dir=None, data_dir=None, recipe: str = "default", overrides: dict | None = None,
        formats: str = "all", n_boot: int = BOOTSTRAP_RESAMPLES, force_push: bool = False, echo=print) -> pathlib.Path:
  """build dataset -> train -> evaluate -> export + parity -> short benchmark -> bless + push -> report.md."""
  from covidct import dataset  # pylint: disable=import-outside-toplevel
  from covidct.config import resolve  # pylint: disable=import-outside-toplevel
  from covidct.evaluate import evaluate, write_report  # pylint: disable=import-outside-toplevel
  from covidct.push import push  # pylint: disable=import-outside-toplevel
  from covidct.runners import SavedModelRunner  # pylint: disable=import-outside-toplevel
  from covidct.train import train  # pylint: disable=import-outside-toplevel
  from export.errors import ParityError  # pylint: disable=import-outside-toplevel
  from export.package import export_model  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(out_dir)
  if out.exists():
    raise CovidctError(f"output folder {out} exists; choose another --out.")
  start, times = time.time(), {}
  last = [start]

  def step(name):  # seconds since the previous step ended
    now = time.time()
    times[name] = round(now - last[0], 1)
    last[0] = now

  echo("1/6 dataset")
  builder = dataset.build(manual_dir=manual_dir, data_dir=data_dir)
  data_dir = str(builder.data_dir_root)
  step("dataset")
  echo("2/6 training")
  cfg = resolve(recipe, data_dir=data_dir, **(overrides or {}))
  out.mkdir(parents=True)
  summary = train(cfg, out / "model", verbose=2)
  step("train")
  echo("3/6 evaluation on the test split")
  runner = SavedModelRunner(out / "model" / "saved_model")
  report = evaluate(runner, runner.image_size, data_dir=data_dir, split="test", n_boot=n_boot, shortcut_audit=True)
  write_report(report, out / "model" / "evaluation-test")
  step("evaluate")
  echo("4/6 export and parity")
  parity_error = None
  try:
    manifest = export_model(out / "model", out / "export", formats, data_dir=data_dir, n_boot=n_boot, progress=echo)
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
                                         report.get("shortcut_audit")))
  echo(f"report: {out / 'report.md'}")
  return out / "report.md"


def _report(cfg, summary, manifest: Manifest, pushed, parity_error, times, out, bench, audit=None) -> str:
  test = manifest.metrics["saved_model"]["test"]
  ci = test.get("ci95", {})
  at = test["at_threshold"]
  lines = [
      "# covidct pipeline report", "",
      f"Recipe `{cfg.recipe}`, model `{cfg.model}` at {cfg.image_size}x{cfg.image_size}, seed {cfg.seed}; best epoch "
      f"{summary['best_epoch']} of {summary['epochs_run']} (validation {cfg.monitor}).", "",
      "## Test metrics (SavedModel, official test split)", "",
      f"ROC AUC {fmt_ci(test['roc_auc'], ci.get('roc_auc'))}, PR AUC {test['pr_auc']:.3f}. Operating threshold "
      f"{manifest.threshold:.4f} (chosen on validation for sensitivity >= "
      f"{manifest.operating_threshold['target_sensitivity']}):", "",
      table(["metric", "at 0.5", "at threshold (95% CI, bootstrap over patients)"],
            [(m, f"{test['at_0.5'][m]:.3f}", fmt_ci(at[m], ci.get(m)))
             for m in ("sensitivity", "specificity", "precision", "accuracy", "f1")]),
  ]
  if audit:
    from covidct.audit import markdown as audit_markdown  # pylint: disable=import-outside-toplevel

    lines += ["", audit_markdown(audit).rstrip()]
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
            f"- evaluation: `{out}/model/evaluation-test/` (report.md, roc.png, pr.png, confusion.png)",
            f"- export: `{out}/export/` (artifacts, parity.md, manifest.json)",
            f"- serving: `{out}/serving/`", "",
            "## Wall time (s)", "", " | ".join(f"{k} {v}" for k, v in times.items())]
  return "\n".join(lines) + "\n"
