"""Patient-grouped, class-stratified k-fold cross-validation over train + validation (`covidct cv`).

The 118-image validation split cannot choose between options (over 30 runs it ranked them opposite to test), so
options are compared by cross-validation on the 543 train + validation images (289 patients): every image is
scored once, by a model that never saw its patient. The test split is never read here.

Each fold trains the full schedule (no early stopping) and records the held-out fold's probabilities after every
epoch. The number of epochs the option should train for is the one with the best mean fold ROC AUC (the earliest
of ties): that is the schedule a final model trained on all of train + validation runs. At that epoch, each fold's
operating threshold is chosen on the *other* folds' out-of-fold probabilities (for the target sensitivity), so its
sensitivity and specificity are honest; the threshold for a final model is chosen on all out-of-fold probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np

from covidct.config import TARGET_SENSITIVITY, TrainConfig
from covidct.errors import CovidctError
from covidct.fsutil import atomic_dir, refuse_existing
from covidct.metrics import choose_threshold, fit_temperature, logit, ranking_metrics, threshold_metrics
from covidct.reporting import table

CV_SPLIT = "train+validation"  # what cross-validation reads; never the test split
DEFAULT_FOLDS = 5


def make_folds(labels, patients, k: int = DEFAULT_FOLDS, seed: int = 0) -> np.ndarray:
  """The fold (0..k-1) of every example: no patient in two folds, classes stratified as far as patients allow
  (scikit-learn's StratifiedGroupKFold, shuffled by `seed`)."""
  from sklearn.model_selection import StratifiedGroupKFold  # pylint: disable=import-outside-toplevel

  labels, patients = np.asarray(labels), np.asarray(patients)
  n_patients = len(np.unique(patients))
  if k < 2 or k > n_patients:
    raise CovidctError(f"cross-validation needs 2 <= k <= the number of patients ({n_patients}); got k={k}.")
  fold = np.full(len(labels), -1, np.int64)
  splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
  for i, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, patients)):
    fold[held_out] = i
  return fold


def fold_summary(probabilities: list[np.ndarray], labels: list[np.ndarray],
                 target_sensitivity: float = TARGET_SENSITIVITY) -> dict:
  """Cross-validated figures from each fold's held-out probabilities by epoch ((epochs, n_i) arrays) and labels.

  Returns the epoch count chosen (best mean fold ROC AUC, earliest of ties), each fold's ROC AUC, sensitivity and
  specificity there (each fold's threshold chosen on the other folds' out-of-fold probabilities), mean and sd, and
  the threshold chosen on all out-of-fold probabilities (for a model trained on everything).
  """
  epochs = min(len(p) for p in probabilities)
  if epochs == 0:
    raise CovidctError("no fold finished an epoch; nothing to summarise.")
  auc_by_epoch = np.array([[ranking_metrics(y, p[e])["roc_auc"] for p, y in zip(probabilities, labels)]
                           for e in range(epochs)])  # (epochs, folds)
  mean_by_epoch = np.nanmean(auc_by_epoch, axis=1)
  best = int(np.nanargmax(np.round(mean_by_epoch, 6)))  # the earliest of (rounding) ties: the cheaper schedule
  folds = []
  for i, (p, y) in enumerate(zip(probabilities, labels)):
    others_y = np.concatenate([yy for j, yy in enumerate(labels) if j != i])
    others_p = np.concatenate([pp[best] for j, pp in enumerate(probabilities) if j != i])
    threshold = choose_threshold(others_y, others_p, target_sensitivity)
    at = threshold_metrics(y, p[best], threshold)
    folds.append({"fold": i, "examples": int(len(y)), "positives": int(np.sum(y)),
                  "roc_auc": float(auc_by_epoch[best, i]), "threshold": threshold,
                  "sensitivity": at["sensitivity"], "specificity": at["specificity"]})
  all_y = np.concatenate(labels)
  all_p = np.concatenate([p[best] for p in probabilities])

  def stat(key):
    values = np.array([f[key] for f in folds], np.float64)
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "se": float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0}

  return {
      "epochs": best + 1, "target_sensitivity": target_sensitivity, "folds": folds,
      "roc_auc": stat("roc_auc"), "sensitivity": stat("sensitivity"), "specificity": stat("specificity"),
      "mean_roc_auc_by_epoch": [float(v) for v in mean_by_epoch],
      "pooled_roc_auc": ranking_metrics(all_y, all_p)["roc_auc"],
      "threshold": choose_threshold(all_y, all_p, target_sensitivity),
      # Temperature scaling fitted on the out-of-fold probabilities: what `covidct qat` divides the final model's
      # logits by (the threshold maps with it: sigmoid(logit(threshold) / temperature)).
      "temperature": fit_temperature(logit(all_p), all_y),
  }


def cross_validate(cfg: TrainConfig, out_dir, k: int = DEFAULT_FOLDS, fold_seed: int = 0,
                   target_sensitivity: float = TARGET_SENSITIVITY, max_minutes: float | None = None,
                   overwrite: bool = False, verbose: int = 0, progress: bool = True, audit: bool = True) -> dict:
  """Cross-validates the training config `cfg` over train + validation and writes `out_dir`.

  Args:
    cfg: the option to judge (a recipe plus overrides, as `covidct train` builds it). Its early stopping is turned
      off: every fold trains the full schedule.
    out_dir: written atomically: folds.json (the patients of each fold, reproducible from `fold_seed`), config.json,
      fold_<i>/ (each fold's training output), cv.json and cv.md.
    k: the number of folds.
    fold_seed: shuffles the patients into folds; two options compared on the same seed share their folds.
    target_sensitivity: what each fold's threshold is chosen for, on the other folds.
    max_minutes: stop training at the end of the first epoch past this many minutes; folds that did not finish
      are listed and left out of the figures.
    overwrite: replace an existing `out_dir`.
    verbose: Keras's fit verbosity for each fold.
    progress: a progress bar over the folds.
    audit: add the out-of-fold shortcut audit and resize skew (out_of_fold_audit) to the summary and report.

  Returns:
    The summary written to cv.json.

  Raises:
    CovidctError: the output exists, k does not fit the data, or no fold finished.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  from covidct.data import Selection, cap_slices, split_labels  # pylint: disable=import-outside-toplevel
  from covidct.train import train  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(out_dir)
  refuse_existing(out, overwrite)
  if not 0 < target_sensitivity <= 1:
    raise CovidctError(f"target sensitivity must be in (0, 1], got {target_sensitivity}.")
  view = tuple(Selection(CV_SPLIT, source=source) for source in cfg.sources)
  meta = split_labels(view, cfg.data_dir)
  # Several sources: patients are grouped per source (ids of two sources never meet), and folds are stratified by
  # source and class together, so every fold holds each source's classes in their shares.
  keys = np.array([f"{s}/{p}" for s, p in zip(meta["sources"], meta["patient_ids"])])
  strata = meta["labels"] + 2 * np.array([cfg.sources.index(s) for s in meta["sources"]])
  fold_of = make_folds(strata, keys, k, fold_seed)
  by_source = [{s: tuple(sorted(set(meta["patient_ids"][(fold_of == i) & (meta["sources"] == s)])))
                for s in cfg.sources} for i in range(k)]
  fold_patients = [sorted(set(keys[fold_of == i])) if len(cfg.sources) > 1 else list(by_source[i][cfg.sources[0]])
                   for i in range(k)]
  cfg = dataclasses.replace(cfg, patience=0)  # 0: no early stopping (see TrainConfig / train)
  deadline = time.time() + 60 * max_minutes if max_minutes else None
  with atomic_dir(out, overwrite) as tmp:
    (tmp / "config.json").write_text(cfg.to_json())
    (tmp / "folds.json").write_text(json.dumps({
        "split": CV_SPLIT, "sources": list(cfg.sources), "k": k, "seed": fold_seed,
        "grouped_by": "patient_id" if len(cfg.sources) == 1 else "source/patient_id",
        "stratified_by": "label" if len(cfg.sources) == 1 else "source and label",
        "folds": [{"fold": i, "patients": fold_patients[i], "filenames": sorted(meta["filenames"][fold_of == i]),
                   "examples": int(np.sum(fold_of == i)), "positives": int(meta["labels"][fold_of == i].sum())}
                  for i in range(k)]}, indent=2))
    start = time.time()
    probabilities, labels, times, finished, stopped, fold_sources = [], [], [], [], [], []
    bar = tqdm(range(k), desc=f"cv {k} folds", unit="fold", disable=not progress)
    for i in bar:
      if deadline is not None and time.time() > deadline:
        stopped.append(i)
        continue
      held_out = tuple(Selection(CV_SPLIT, by_source[i][s], source=s) for s in cfg.sources)
      scored = held_out  # with slices_per_patient, the held-out patients are scored on as many slices each
      if cfg.slices_per_patient:
        scored = tuple(cap_slices(h, cfg.data_dir, cfg.slices_per_patient, cfg.seed) for h in held_out)
      # keep="last": the fold's model is the whole schedule, never an epoch picked on its held-out patients
      summary = train(cfg, tmp / f"fold_{i}", verbose=verbose,
                      train_data=tuple(dataclasses.replace(h, exclude=True) for h in held_out),
                      validation_data=scored, deadline=deadline, keep="last")
      if summary["stopped"]:
        stopped.append(i)
        continue
      saved = np.load(tmp / f"fold_{i}" / "validation_predictions.npz")
      probabilities.append(saved["probabilities"])
      labels.append(saved["labels"])
      fold_sources.append(split_labels(scored, cfg.data_dir)["sources"])  # the order validation scored them in
      times.append(summary["wall_time_s"])
      finished.append(i)
      bar.set_postfix(fold_auc=f"{ranking_metrics(saved['labels'], saved['probabilities'][-1])['roc_auc']:.3f}")
    if len(finished) < 2:
      raise CovidctError(f"only {len(finished)} of {k} folds finished within --max-minutes {max_minutes}; "
                         "cross-validation needs at least 2: allow more time.")
    result = fold_summary(probabilities, labels, target_sensitivity)
    for f, i, seconds in zip(result["folds"], finished, times):
      f["fold"], f["train_minutes"] = i, seconds / 60
    result.update(k=k, fold_seed=fold_seed, finished_folds=finished, stopped_folds=stopped,
                  train_minutes={"mean": float(np.mean(times) / 60), "total": float(np.sum(times) / 60)},
                  wall_minutes=(time.time() - start) / 60, recipe=cfg.recipe, model=cfg.model,
                  image_size=cfg.image_size, seed=cfg.seed, sources=list(cfg.sources))
    if len(cfg.sources) > 1:  # each source's pooled out-of-fold ROC AUC at the chosen epoch
      best = result["epochs"] - 1
      all_p = np.concatenate([p[best] for p in probabilities])
      all_y, all_s = np.concatenate(labels), np.concatenate(fold_sources)
      result["per_source"] = {s: {"images": int(np.sum(all_s == s)), "positives": int(all_y[all_s == s].sum()),
                                  "pooled_roc_auc": ranking_metrics(all_y[all_s == s], all_p[all_s == s])["roc_auc"]}
                              for s in cfg.sources}
    if audit:
      result["audit"] = out_of_fold_audit(tmp, result["folds"], cfg.data_dir, progress=progress, sources=cfg.sources)
    (tmp / "cv.json").write_text(json.dumps(result, indent=2))
    (tmp / "cv.md").write_text(markdown(result))
  return result


def protocol(cfg: TrainConfig, out_dir, leave_one_source_out: bool = False, folds: bool = True,
             **kwargs) -> tuple[dict | None, dict | None]:
  """`covidct cv`: the patient-grouped folds (cross_validate, with `kwargs`; unless `folds` is False) and, with
  `leave_one_source_out`, each source held out in turn (held_out_sources, into out_dir/loso/, or out_dir itself
  without the folds). Returns (the folds'
  summary or None, the leave-one-source-out summary or None)."""
  if leave_one_source_out and len(cfg.sources) < 2:  # refused before anything is trained
    raise CovidctError("--leave-one-source-out needs at least two --sources, e.g. covid_ct,cc_ccii.")
  if not folds and not leave_one_source_out:
    raise CovidctError("nothing to do: without the folds, give --leave-one-source-out.")
  result = cross_validate(cfg, out_dir, **kwargs) if folds else None
  if not leave_one_source_out:
    return result, None
  where = pathlib.Path(out_dir) / "loso" if folds else out_dir  # alone, it is the whole output
  return result, held_out_sources(cfg, where, verbose=kwargs.get("verbose", 0), overwrite=bool(kwargs.get("overwrite")))


def held_out_sources(cfg: TrainConfig, out_dir, overwrite: bool = False, verbose: int = 0,
                         progress: bool = True) -> dict:
  """Leave-one-source-out: for each source of `cfg.sources`, a model trained on the other sources' train +
  validation (the option's whole schedule, the last epoch kept) scores the held-out source's train + validation
  (never a test split), with its shortcut audit there. What within-source folds cannot see: whether what an option
  learns on some sources carries to another. With `cfg.slices_per_patient`, the held-out source is scored on that
  many slices per patient too (drawn once from the seed).

  Returns (and writes to out_dir/loso.json, loso.md, without_<source>/): {'held_out': [{'source', 'trained_on',
  'images', 'positives', 'patients', 'roc_auc', 'roc_auc_by_epoch', 'audit': {input: roc_auc}}], ...}.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  from covidct.audit import lung_masks, masked_scores  # pylint: disable=import-outside-toplevel
  from covidct.data import Selection, cap_slices, split_arrays  # pylint: disable=import-outside-toplevel
  from covidct.runners import SavedModelRunner  # pylint: disable=import-outside-toplevel
  from covidct.train import train  # pylint: disable=import-outside-toplevel

  if len(cfg.sources) < 2:
    raise CovidctError("leave-one-source-out needs at least two sources: give --sources covid_ct,cc_ccii.")
  out = pathlib.Path(out_dir)
  refuse_existing(out, overwrite)
  rows = []
  with atomic_dir(out, overwrite) as tmp:
    for held in tqdm(cfg.sources, desc="leave one source out", unit="source", disable=not progress):
      others = tuple(s for s in cfg.sources if s != held)
      fold_cfg = dataclasses.replace(cfg, sources=others, source_weights=(), patience=0)
      target = Selection(CV_SPLIT, source=held)
      if cfg.slices_per_patient:
        target = cap_slices(target, cfg.data_dir, cfg.slices_per_patient, cfg.seed)
      summary = train(fold_cfg, tmp / f"without_{held}", verbose=verbose, train_data=CV_SPLIT,
                      validation_data=(target,), keep="last")
      saved = np.load(tmp / f"without_{held}" / "validation_predictions.npz")
      by_epoch = [ranking_metrics(saved["labels"], p)["roc_auc"] for p in saved["probabilities"]]
      runner = SavedModelRunner(tmp / f"without_{held}" / "saved_model")
      data = split_arrays(target, cfg.data_dir, runner.image_size)
      audit, _ = masked_scores(runner, data["images"], data["labels"], lung_masks(data["images"]))
      rows.append({"source": held, "trained_on": list(others), "images": int(len(data["labels"])),
                   "positives": int(data["labels"].sum()), "patients": int(len(set(data["patient_ids"]))),
                   "roc_auc": by_epoch[-1], "roc_auc_by_epoch": by_epoch, "audit": audit,
                   "train_minutes": summary["wall_time_s"] / 60})
    result = {"split": CV_SPLIT, "sources": list(cfg.sources), "recipe": cfg.recipe, "model": cfg.model,
              "image_size": cfg.image_size, "seed": cfg.seed, "slices_per_patient": cfg.slices_per_patient,
              "held_out": rows}
    (tmp / "config.json").write_text(cfg.to_json())
    (tmp / "loso.json").write_text(json.dumps(result, indent=2))
    (tmp / "loso.md").write_text(loso_markdown(result))
  return result


def loso_markdown(result: dict) -> str:
  """The leave-one-source-out table: one row per held-out source."""
  rows = [(f"`{r['source']}`", " + ".join(f"`{s}`" for s in r["trained_on"]), f"{r['images']} ({r['positives']})",
           r["patients"], f"{r['roc_auc']:.3f}", f"{r['audit']['lungs_hidden']:.3f}", f"{r['audit']['lungs_only']:.3f}",
           f"{r['train_minutes']:.1f}") for r in result["held_out"]]
  return "\n".join([
      "## Leave one source out", "",
      f"Each source's train + validation (never its test split) scored by a model trained on the other sources' "
      "train + validation for the whole schedule"
      + (f" ({result['slices_per_patient']} slices per patient at most, in training and scoring)"
         if result.get("slices_per_patient") else "")
      + "; the lungs hidden and lungs only columns are that model's shortcut audit on the held-out source. When "
      "these figures and the within-source folds disagree, these decide.", "",
      table(["held out", "trained on", "images (COVID)", "patients", "ROC AUC", "lungs hidden", "lungs only",
             "training minutes"], rows, align="llrrrrrr")]) + "\n"


def out_of_fold_audit(cv_dir, folds: list[dict], data_dir=None, progress: bool = True,
                      sources: tuple[str, ...] = ("covid_ct",)) -> dict:
  """The shortcut audit and the resize skew of each fold's model on its held-out patients, pooled over the folds.

  What the test split's audit (covidct.audit) asks of one model, asked of the options that cross-validation
  compares, without reading the test split: each fold's model (`cv_dir/fold_<i>/saved_model`) scores its own held-out
  images as they are, with the lungs hidden and with the lungs only; a logistic regression on image statistics,
  fitted on the other folds, scores them too; and each fold's decisions, at its threshold chosen on the other folds,
  are compared under the other common resizes (covidct.data.consumer_resize). For a `lung_crop` option every input is
  cut down as in training, with the lung field found on the image as it is (so "lungs hidden" leaves the field's
  silhouette alone). The ROC AUCs are means over the folds (as the cross-validated ROC AUC is); decision agreement is
  pooled over all held-out images.

  Args:
    cv_dir: a cross-validation folder (folds.json and the fold_<i>/ training outputs).
    folds: the per-fold figures of fold_summary, whose "fold" and "threshold" say which folds to audit and where.
    data_dir: the TFDS data dir the folds were read from.
    progress: a progress bar over the folds.
    sources: the sources cross-validated (their train + validation splits).

  Returns:
    {"roc_auc": {input: {"mean", "sd"}}, "per_fold": [...], "resize_agreement": {method: share},
     "images": n, "without_lung_field": n, "fold_model": what each fold's model is}.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  # pylint: disable=import-outside-toplevel
  from covidct.audit import AUDIT_INPUTS, crop_to_lungs, lung_masks, masked_scores, statistics_auc
  from covidct.data import CONSUMER_RESIZES, TRAINING_RESIZE, Selection, consumer_resize, raw_arrays
  from covidct.runners import SavedModelRunner

  cv_dir = pathlib.Path(cv_dir)
  lung_crop = json.loads((cv_dir / "config.json").read_text()).get("lung_crop") or ""
  lung_crop = "field" if lung_crop is True else lung_crop  # a cv of session 12 before 'box' existed

  def prepare(images, masks):  # what --lung-crop leaves of each image
    return np.stack([crop_to_lungs(im, m, keep=lung_crop) for im, m in zip(images, masks)])

  fold_files = [set(f["filenames"]) for f in json.loads((cv_dir / "folds.json").read_text())["folds"]]
  raw = raw_arrays(tuple(Selection(CV_SPLIT, source=s) for s in sources), data_dir)
  fold_of = np.array([next(i for i, files in enumerate(fold_files) if name in files) for name in raw["filenames"]])
  per_fold, agree, without = [], {m: 0 for m in CONSUMER_RESIZES}, 0
  for f in tqdm(folds, desc="out-of-fold audit", unit="fold", disable=not progress):
    i = f["fold"]
    held, rest = np.flatnonzero(fold_of == i), np.flatnonzero(fold_of != i)
    runner = SavedModelRunner(cv_dir / f"fold_{i}" / "saved_model")
    images = np.stack([consumer_resize(raw["images"][j], runner.image_size, TRAINING_RESIZE) for j in held])
    labels = raw["labels"][held]
    masks = lung_masks(images)
    without += int(np.sum(~masks.reshape(len(masks), -1).any(axis=1)))
    auc, full = masked_scores(runner, images, labels, masks, prepare if lung_crop else None)
    row = {"fold": i, **auc}
    subset = lambda idx: {k: ([raw[k][j] for j in idx] if k == "images" else raw[k][idx])  # noqa: E731
                          for k in ("images", "labels", "filenames")}
    row["image_statistics"] = statistics_auc(subset(rest), subset(held))["roc_auc"]
    per_fold.append(row)
    decided = full >= f["threshold"]
    for method in CONSUMER_RESIZES:
      resized = np.stack([consumer_resize(raw["images"][j], runner.image_size, method) for j in held])
      q = np.asarray(runner(prepare(resized, lung_masks(resized)) if lung_crop else resized)).reshape(-1)
      agree[method] += int(np.sum((q >= f["threshold"]) == decided))
  n = int(sum(np.sum(fold_of == f["fold"]) for f in folds))

  def stat(key):
    values = np.array([r[key] for r in per_fold], np.float64)
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}

  return {"roc_auc": {key: stat(key) for key in AUDIT_INPUTS + ("image_statistics",)},
          "per_fold": per_fold, "resize_agreement": {m: agree[m] / n for m in CONSUMER_RESIZES}, "images": n,
          "without_lung_field": without, "lung_crop": lung_crop,
          "fold_model": _fold_model_kind(cv_dir / f"fold_{folds[0]['fold']}")}


def _fold_model_kind(fold_dir: pathlib.Path) -> str:
  """'last' (the whole schedule) or 'best' (the epoch best on the held-out fold: runs before `cv` kept the last)."""
  summary = json.loads((fold_dir / "history.json").read_text()).get("summary", {})
  return summary.get("kept") or "best"


def audit_markdown(audit: dict) -> str:
  """The out-of-fold audit as a report section."""
  auc = audit["roc_auc"]

  def ms(key):
    return f"{auc[key]['mean']:.3f} +- {auc[key]['sd']:.3f}"

  rows = [("full image", ms("full"), ""),
          ("lungs hidden (lung field filled with its mean grey)", ms("lungs_hidden"), "<= 0.60"),
          ("lungs only (everything else black)", ms("lungs_only"), "within 0.03 of the full image"),
          ("image statistics alone, no model (fitted on the other folds)", ms("image_statistics"), "-")]
  model = ("at the end of the whole schedule" if audit["fold_model"] == "last"
           else "at the epoch best on its held-out fold, as `cv` kept it before it kept the last epoch; so its "
                "full-image figure is optimistic")
  lines = ["## Out-of-fold shortcut audit and resize skew", "",
           f"Each fold's model, {model}, on its held-out patients; ROC AUC as mean +- sd over the folds; "
           f"{audit['without_lung_field']} of {audit['images']} images had no lung field (scored as they are).", "",
           table(["input", "ROC AUC", "a model that reads the lungs"], rows, align="lrl"), "",
           "Decisions at each fold's threshold that stay the same when the image is resized another way than in "
           "training, pooled over the held-out images:", "",
           table(["resize", "decision agreement"], [(m, f"{a:.1%}") for m, a in audit["resize_agreement"].items()],
                 align="lr")]
  return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
  """The cross-validation report: one row per fold, then mean +- sd."""
  def ms(key, digits=3):
    return f"{result[key]['mean']:.{digits}f} +- {result[key]['sd']:.{digits}f}"

  lines = [f"# Cross-validation: {result['recipe']} ({result['model']}, {result['image_size']} px, seed {result['seed']})",
           "",
           f"{len(result['finished_folds'])} of {result['k']} patient-grouped folds of train + validation (fold seed "
           f"{result['fold_seed']}); the test split was not read. Every fold trained the full schedule; the figures "
           f"are at epoch {result['epochs']}, the best mean fold ROC AUC. Each fold's threshold was chosen on the other "
           f"folds' out-of-fold probabilities for sensitivity {result['target_sensitivity']:.2f}.", ""]
  if result["stopped_folds"]:
    lines += [f"Folds {result['stopped_folds']} did not finish within the time limit and are left out.", ""]
  rows = [(f["fold"], f["examples"], f["positives"], f"{f['roc_auc']:.3f}", f"{f['threshold']:.4f}",
           f"{f['sensitivity']:.3f}", f"{f['specificity']:.3f}", f"{f['train_minutes']:.1f}") for f in result["folds"]]
  rows.append(("mean +- sd", "", "", ms("roc_auc"), "", ms("sensitivity"), ms("specificity"),
               f"{result['train_minutes']['mean']:.1f}"))
  lines += [table(["fold", "images", "COVID", "ROC AUC", "threshold", "sensitivity", "specificity",
                   "training minutes"], rows, align="r" * 8), "",
            f"Pooled out-of-fold ROC AUC {result['pooled_roc_auc']:.3f}; threshold for a model trained on all of "
            f"train + validation for {result['epochs']} epochs: {result['threshold']:.4f}"
            + (f"; temperature fitted on the out-of-fold probabilities: {result['temperature']:.3f}."
               if "temperature" in result else ".")]
  if result.get("per_source"):
    lines += ["", "Each source's pooled out-of-fold ROC AUC at that epoch:", "",
              table(["source", "images (COVID)", "pooled out-of-fold ROC AUC"],
                    [(f"`{s}`", f"{v['images']} ({v['positives']})", f"{v['pooled_roc_auc']:.3f}")
                     for s, v in result["per_source"].items()], align="lrr")]
  if result.get("audit"):
    lines += ["", audit_markdown(result["audit"])]
  return "\n".join(lines) + "\n"
