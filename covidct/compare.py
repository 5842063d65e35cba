"""Comparing training runs: what each changed from its recipe, its validation score and (once evaluated) its test
score, one row a run and one row per group of runs that differ only in their seed (mean over the seeds)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np

from covidct.config import RECIPES, AugmentConfig, TrainConfig
from covidct.errors import CovidctError

# Fields that say where things are, not what was trained: never shown as an option.
_NOT_OPTIONS = {"seed", "data_dir", "weights_dir", "recipe", "model", "image_size"}

COLUMNS = [  # (key, heading)
    ("cv_auc", "CV ROC AUC"), ("cv_sensitivity", "CV sensitivity"), ("cv_specificity", "CV specificity"),
    ("cv_lungs_hidden", "CV ROC AUC, lungs hidden"), ("cv_lungs_only", "CV ROC AUC, lungs only"),
    ("cv_resize_agreement", "CV decision agreement, worst resize"),
    ("val_auc", "validation ROC AUC"), ("test_auc", "test ROC AUC"), ("test_accuracy", "test accuracy at 0.5"),
    ("test_sensitivity", "test sensitivity at 0.5"), ("test_sensitivity_thr", "test sensitivity at threshold"),
    ("test_specificity_thr", "test specificity at threshold"), ("minutes", "training minutes"),
]


def options_of(config: dict) -> str:
  """The config fields that differ from the run's recipe, as `field=value` (augmentation fields flattened)."""
  recipe = config.get("recipe")
  if recipe not in RECIPES:
    return f"recipe {recipe}" if recipe else "-"
  known = {k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__}
  base = json.loads(json.dumps(dataclasses.asdict(RECIPES[recipe])))  # as config.json holds it (tuples as lists)
  changed = []
  for key in sorted(known):
    if key in _NOT_OPTIONS or known[key] == base.get(key):
      continue
    value, default = known[key], base.get(key)
    if key == "augment":  # the one nested config: on/off, then the fields that differ
      if value is None:
        changed.append("augment=off")
        continue
      if default is None:
        changed.append("augment=on")
        default = dataclasses.asdict(AugmentConfig())
      changed += [f"augment.{k}={v}" for k, v in sorted(value.items()) if default.get(k) != v]
    else:
      changed.append(f"{key}={value}")
  return ", ".join(changed) or "as is"


def read_cv(cv_dir) -> dict:
  """A `covidct cv` output's row: its option, and the mean fold ROC AUC, sensitivity and specificity (each fold's
  threshold chosen on the other folds) at the epoch count it chose."""
  run = pathlib.Path(cv_dir)
  try:
    config = json.loads((run / "config.json").read_text())
    result = json.loads((run / "cv.json").read_text())
    if not isinstance(config, dict) or not isinstance(result, dict):
      raise TypeError("not a JSON object")
    return {
        "run": str(run), "recipe": config.get("recipe", "-"), "model": config.get("model", "-"),
        "image_size": config.get("image_size"), "options": options_of(config), "seed": config.get("seed"),
        "epoch": f"{result['epochs']} (cv, {len(result['folds'])} folds)", "val_auc": None,
        "minutes": result["train_minutes"]["mean"], "cv_auc": result["roc_auc"]["mean"],
        "cv_auc_sd": result["roc_auc"]["sd"], "cv_sensitivity": result["sensitivity"]["mean"],
        "cv_specificity": result["specificity"]["mean"], **_cv_audit_columns(result.get("audit")),
    }
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CovidctError(f"{run}: cannot read its config.json or cv.json ({e}); run `covidct cv` again.") from None


def _cv_audit_columns(audit: dict | None) -> dict:
  """The out-of-fold shortcut audit's columns (covidct.cv.out_of_fold_audit); none for a cv run without one."""
  if not audit:
    return {}
  return {"cv_lungs_hidden": audit["roc_auc"]["lungs_hidden"]["mean"],
          "cv_lungs_only": audit["roc_auc"]["lungs_only"]["mean"],
          "cv_resize_agreement": min(audit["resize_agreement"].values())}


def read_run(run_dir) -> dict:
  """One run's row: name, recipe, model, size, options, seed, kept epoch and the scores it has. Validation ROC AUC
  comes from the kept epoch (history.json), else from `covidct evaluate RUN --split validation`; test scores from
  `covidct evaluate RUN` (RUN/evaluation-test/report.json). A `covidct cv` output gives its cross-validated scores
  (read_cv)."""
  run = pathlib.Path(run_dir)
  if (run / "cv.json").exists():
    return read_cv(run)
  if not (run / "config.json").exists():
    raise CovidctError(f"{run} has no config.json; pass folders written by `covidct train`, `qat`, `ensemble` or "
                       "`cv`.")
  try:
    config = json.loads((run / "config.json").read_text())
    if not isinstance(config, dict):
      raise TypeError(f"a JSON {type(config).__name__}, not an object")
    summary = json.loads((run / "history.json").read_text())["summary"] if (run / "history.json").exists() else {}
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise CovidctError(f"{run}: cannot read its config.json or history.json ({e}); train that run again.") from None
  reports = {}
  for split in ("validation", "test"):
    path = run / f"evaluation-{split}" / "report.json"
    if path.exists():
      try:
        reports[split] = json.loads(path.read_text())
      except ValueError:
        raise CovidctError(f"{path} is not valid JSON; run `covidct evaluate` on {run} again.") from None
  kept = summary.get("best_epoch", summary.get("epoch_kept"))
  source = config.get("source", {}).get("config", {})  # a `covidct qat` output: the run it came from
  if "members" in config:
    options = f"ensemble of {len(config['members'])} runs"
  elif "quantization_aware" in config:
    qat = config["quantization_aware"]
    options = f"qat epochs={qat.get('epochs')} of ({options_of(source)})"
  else:
    options = options_of(config)
  val_auc = summary.get("validation", {}).get("auc")
  if val_auc is None and "validation" in reports:
    val_auc = reports["validation"]["roc_auc"]
  row = {
      "run": str(run), "recipe": config.get("recipe", "-"), "model": config.get("model", "-"),
      "image_size": config.get("image_size"), "options": options, "seed": config.get("seed", source.get("seed")),
      "epoch": f"{kept}/{summary.get('epochs_run', '?')}" if kept is not None else "-",
      "val_auc": val_auc, "minutes": summary["wall_time_s"] / 60 if "wall_time_s" in summary else None,
  }
  if "test" in reports:
    report = reports["test"]
    row.update(test_auc=report["roc_auc"], test_accuracy=report["at_0.5"]["accuracy"],
               test_sensitivity=report["at_0.5"]["sensitivity"],
               test_sensitivity_thr=report["at_threshold"]["sensitivity"],
               test_specificity_thr=report["at_threshold"]["specificity"])
  return row


def compare(run_dirs) -> dict:
  """Rows for `run_dirs` and groups of the runs that differ only in their seed, each with its mean scores."""
  rows = [read_run(r) for r in run_dirs]
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row["recipe"], row["model"], row["image_size"], row["options"]), []).append(row)
  summary = []
  for (recipe, model, size, options), members in groups.items():
    entry = {"recipe": recipe, "model": model, "image_size": size, "options": options,
             "seeds": [m["seed"] for m in members], "runs": [m["run"] for m in members]}
    for key, _ in COLUMNS:
      values = [m[key] for m in members if m.get(key) is not None]
      entry[key] = float(np.mean(values)) if len(values) == len(members) else None  # no mean of a partial set
      entry[f"{key}_each"] = [m.get(key) for m in members]
    summary.append(entry)
  return {"runs": rows, "groups": summary, "validation_vs_test": agreement(rows)}


EXACT_P_MAX_RUNS = 7  # up to this many runs (7! = 5040 orderings), p-values come from every permutation


def agreement(rows) -> dict | None:
  """How well validation ROC AUC predicts test ROC AUC over the runs that have both (None for fewer than 3).

  Pearson and Spearman coefficients with two-sided p-values: exact permutation tests for a few runs (the usual
  approximations call a perfect ranking of 3 runs p = 0, where the chance of it is 1 in 3), the approximations
  beyond that.
  """
  from scipy import stats  # pylint: disable=import-outside-toplevel

  pairs = [(r["val_auc"], r["test_auc"]) for r in rows if r["val_auc"] is not None and r.get("test_auc") is not None]
  if len(pairs) < 3 or len({v for v, _ in pairs}) < 2 or len({t for _, t in pairs}) < 2:
    return None
  val, test = np.array(pairs).T
  if len(pairs) <= EXACT_P_MAX_RUNS:
    exact = stats.PermutationMethod()  # its default 9999 resamples exceed 7!: it enumerates every ordering
    pearson = stats.pearsonr(val, test, method=exact)
    spearman = stats.pearsonr(stats.rankdata(val), stats.rankdata(test), method=exact)  # Spearman: Pearson on ranks
  else:
    pearson, spearman = stats.pearsonr(val, test), stats.spearmanr(val, test)
  return {"runs": len(pairs), "pearson": float(pearson.statistic), "pearson_p": float(pearson.pvalue),
          "spearman": float(spearman.statistic), "spearman_p": float(spearman.pvalue)}


def _fmt(value, digits=3):
  return "-" if value is None else f"{value:.{digits}f}"


def to_markdown(result: dict) -> str:
  """The groups (seeds as 'a / b / c (mean m)'), then every run."""
  heads = [h for _, h in COLUMNS]
  lines = ["| recipe | model | size | options | seeds | " + " | ".join(heads) + " |",
           "| --- | --- | ---: | --- | --- | " + " | ".join("---" for _ in heads) + " |"]
  for g in result["groups"]:
    cells = []
    for key, _ in COLUMNS:
      digits = 1 if key == "minutes" else 3
      each = g[f"{key}_each"]
      if len(each) == 1:
        cells.append(_fmt(each[0], digits))
      else:
        cells.append(" / ".join(_fmt(v, digits) for v in each) + (f" (mean {_fmt(g[key], digits)})"
                                                                   if g[key] is not None else ""))
    seeds = ", ".join("-" if s is None else str(s) for s in g["seeds"])
    lines.append(f"| {g['recipe']} | {g['model']} | {g['image_size']} | {g['options']} | {seeds} | "
                 + " | ".join(cells) + " |")
  fit = result.get("validation_vs_test")
  if fit:
    lines += ["", f"Validation against test ROC AUC over {fit['runs']} runs: Pearson {fit['pearson']:+.2f} "
                  f"(p {fit['pearson_p']:.2f}), Spearman {fit['spearman']:+.2f} (p {fit['spearman_p']:.2f})."]
  lines += ["", "| run | seed | epoch kept | CV ROC AUC (mean +- sd) | validation ROC AUC | test ROC AUC |",
            "| --- | ---: | --- | ---: | ---: | ---: |"]
  for r in result["runs"]:
    seed = "-" if r["seed"] is None else r["seed"]
    cv = f"{r['cv_auc']:.3f} +- {r['cv_auc_sd']:.3f}" if r.get("cv_auc") is not None else "-"
    lines.append(f"| {r['run']} | {seed} | {r['epoch']} | {cv} | {_fmt(r['val_auc'])} | {_fmt(r.get('test_auc'))} |")
  return "\n".join(lines) + "\n"


def legend_label(group: dict) -> str:
  """A group's label in the plot: a file path (weights=...) keeps its last two parts (the table has it whole), and
  the whole is cut at 100 characters."""
  label = re.sub(r"/(?:[^/,\s]+/)+([^/,\s]+/[^/,\s]+)", r".../\1",
                 f"{group['model']} {group['image_size']}: {group['options']}")
  return label if len(label) <= 100 else label[:97] + "..."


def plot_validation_vs_test(result: dict, path) -> bool:
  """Each evaluated run as a point (validation ROC AUC, test ROC AUC), a colour per group; False if none is."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6.4, 5.2))
  drawn = []
  for g in result["groups"]:
    pts = [(v, t) for v, t in zip(g["val_auc_each"], g["test_auc_each"]) if v is not None and t is not None]
    if not pts:
      continue
    xs, ys = zip(*pts)
    ax.scatter(xs, ys, label=legend_label(g), s=36)
    drawn += pts
  if not drawn:
    plt.close(fig)
    return False
  lo = min(min(p) for p in drawn) - 0.02
  hi = max(max(p) for p in drawn) + 0.02
  ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1, label="validation = test")
  ax.set_xlim(lo, hi)
  ax.set_ylim(lo, hi)
  ax.set_xlabel("validation ROC AUC (selects)")
  ax.set_ylabel("test ROC AUC (reports)")
  ax.set_title("Runs: validation against test")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True
