"""The `covidct` command: a thin click group. Heavy imports live inside the commands so `--help` is instant."""

from __future__ import annotations

import functools
import json
import os

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before any command imports TensorFlow


def _friendly(fn):
  """Turns the errors a user can fix into a one-line message and exit code 1, never a traceback."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel

    known: tuple = (CovidctError, FileNotFoundError, FileExistsError)
    try:
      from tfds_covidct.covid_ct.covid_ct_dataset_builder import CovidCtError  # pylint: disable=import-outside-toplevel
      known += (CovidCtError,)
    except ImportError:
      pass
    try:
      from export.errors import ExportError  # pylint: disable=import-outside-toplevel
      known += (ExportError,)
    except ImportError:
      pass
    try:
      return fn(*args, **kwargs)
    except known as e:
      raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

  return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="covidct")
def main():
  """COVID-CT: build the dataset, train, evaluate, export, push and benchmark a COVID-19 CT classifier."""
  import signal  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  # A terminated run unwinds like an interrupted one, so no temporary folder is left behind.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@main.group()
def data():
  """The covid_ct TFDS dataset: build it, describe it."""


_DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                         help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
_OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
_QUIET = click.option("--quiet", is_flag=True, help="One line per epoch instead of a progress bar.")
_WEIGHTS_DIR = click.option("--weights-dir", type=click.Path(file_okay=False), default=None,
                            help="Backbones: folder with the Keras ImageNet weight files (offline); default: "
                                 "Keras's cache.")


@data.command("build")
@click.option("--manual-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with the upstream files (offline). Without it, they are downloaded.")
@_DATA_DIR
@_friendly
def data_build(manual_dir, data_dir):
  """Build (download and prepare) the covid_ct dataset, verifying every image."""
  from covidct import dataset  # pylint: disable=import-outside-toplevel

  builder = dataset.build(manual_dir=manual_dir, data_dir=data_dir)
  splits = builder.info.splits
  click.echo(f"covid_ct {builder.info.version} ready in {builder.data_dir}: " +
             ", ".join(f"{s} {splits[s].num_examples}" for s in ("train", "validation", "test")))


@data.command("info")
@_DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_friendly
def data_info(data_dir, as_json):
  """Splits, counts per class, patients per split and image size range of the prepared dataset."""
  from covidct import dataset  # pylint: disable=import-outside-toplevel

  info = dataset.describe(data_dir)
  if as_json:
    click.echo(json.dumps(info, indent=2))
    return
  click.echo(f"covid_ct {info['version']} in {info['data_dir']}")
  click.echo(f"{'split':<11}{'images':>7}{'COVID':>7}{'NonCOVID':>9}{'patients':>9}  {'height':>11}  {'width':>11}")
  for split, s in info["splits"].items():
    click.echo(f"{split:<11}{s['examples']:>7}{s['per_class']['COVID']:>7}{s['per_class']['NonCOVID']:>9}"
               f"{s['patients']:>9}  {s['height'][0]:>5}-{s['height'][1]:<5}  {s['width'][0]:>5}-{s['width'][1]:<5}")


def _positive(ctx, param, value):
  if value is not None and value <= 0:
    raise click.BadParameter(f"must be positive, got {value}.")
  return value


@data.command("arrays")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--split", "splits", default="train,validation,test", show_default=True,
              help="Comma-separated splits; one SPLIT.npz each.")
@click.option("--image-size", type=int, default=224, show_default=True, callback=_positive)
@_DATA_DIR
@_OVERWRITE
@_friendly
def data_arrays(out_dir, splits, image_size, data_dir, overwrite):
  """Write splits as numpy arrays (resized as training resizes them), for machines or frameworks without
  TensorFlow: SPLIT.npz with images (N, S, S, 1) uint8, labels, patient_ids and filenames."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel
  from covidct.fsutil import atomic_dir  # pylint: disable=import-outside-toplevel

  names = [s.strip() for s in splits.split(",") if s.strip()]
  bad = [s for s in names if s not in ("train", "validation", "test")]
  if bad or not names:
    raise CovidctError(f"--split takes train, validation and/or test, got {splits!r}.")
  from covidct.data import split_arrays  # pylint: disable=import-outside-toplevel
  from covidct.dataset import load_builder  # pylint: disable=import-outside-toplevel

  load_builder(data_dir)  # a clear error before anything is written when the dataset is missing
  with atomic_dir(out_dir, overwrite) as tmp:
    for name in names:
      arrays = split_arrays(name, data_dir, image_size)
      np.savez_compressed(tmp / f"{name}.npz", **arrays)
      click.echo(f"{name}: {len(arrays['labels'])} images ({int(arrays['labels'].sum())} COVID), "
                 f"{image_size}x{image_size}")


# The options that make a TrainConfig: `covidct train` and `covidct cv` take the same ones
# (covidct.config.config_from_options turns them into a config).
_TRAINING_OPTIONS = [
    click.option("--recipe", type=click.Choice(["default", "article", "finetune"]), default="default", show_default=True,
                 help="'article': the article's recipe as written; 'default': one that learns on the official split; "
                      "'finetune': ImageNet MobileNetV2, head then whole network."),
    click.option("--model", default=None, help="Architecture: final, basic, too_simple, mobilenet_v2_0.35, "
                                               "mobilenet_v2_0.5, mobilenet_v2_1.0 (default: the recipe's)."),
    click.option("--epochs", type=int, default=None, callback=_positive),
    click.option("--batch-size", type=int, default=None, callback=_positive, help="Per replica."),
    click.option("--image-size", type=int, default=None, callback=_positive),
    click.option("--learning-rate", type=float, default=None, callback=_positive),
    click.option("--seed", type=int, default=None),
    click.option("--strategy", type=click.Choice(["default", "mirrored", "multi-worker"]), default=None,
                 help="tf.distribute strategy: one device, all local devices, or the cluster in TF_CONFIG."),
    click.option("--mixed-precision", is_flag=True, default=None, help="mixed_float16 (GPU only)."),
    click.option("--augment-on", type=click.Choice(["auto", "pipeline", "model"]), default=None,
                 help="Where augmentation runs: tf.data on the CPU, or the training step on the accelerator."),
    click.option("--augment/--no-augment", default=None,
                 help="The article's augmentation on the training split (default: the recipe's choice)."),
    click.option("--noise", type=float, default=None,
                 help="Std of Gaussian pixel noise, in grey levels, added to the augmented training images (needs "
                      "augmentation)."),
    click.option("--resolution", type=float, default=None,
                 help="Simulate low-resolution sources: scale each augmented training image down to a random fraction "
                      "of its size, between this and 1, and back up (needs augmentation; 0 turns it off)."),
    click.option("--contrast", type=float, default=None, metavar="FRACTION",
                 help="Scale each augmented training image's contrast about its mean by a random factor in "
                      "[1 - FRACTION, 1 + FRACTION] (needs augmentation; 0 turns it off)."),
    click.option("--brightness", type=float, default=None, metavar="FRACTION",
                 help="Shift each augmented training image's brightness by a random fraction of 255 in "
                      "[-FRACTION, FRACTION] (needs augmentation; 0 turns it off)."),
    click.option("--head-epochs", type=int, default=None, help="Backbones: epochs on a frozen backbone first."),
    click.option("--fine-tune-from", default=None, metavar="LAYER",
                 help="Backbones: fine-tune only from this backbone layer up, an index or a name prefix such as "
                      "block_13 (default: the whole backbone)."),
    click.option("--label-smoothing", type=float, default=None),
    click.option("--blur", type=float, default=None, metavar="SIGMA",
                 help="A fixed Gaussian low-pass (sigma in pixels) inside the model, so every source is equally sharp."),
    click.option("--mixup", type=float, default=None, metavar="ALPHA",
                 help="mixup on the training batches: pairs of images and their labels mixed with a Beta(ALPHA, ALPHA) "
                      "weight (0.2-0.4 is usual; 0 turns it off)."),
    click.option("--freeze-batch-norm", is_flag=True, default=None,
                 help="Backbones: keep batch norm in inference mode (ImageNet statistics) while fine-tuning."),
    click.option("--weights", default=None, metavar="imagenet|none|FILE",
                 help="Backbones: the starting weights: ImageNet (default), none (random), or a backbone weights file "
                      "such as the backbone.weights.h5 of `covidct pretrain`."),
    _WEIGHTS_DIR,
    _DATA_DIR,
]


def _training_options(fn):
  for option in reversed(_TRAINING_OPTIONS):
    fn = option(fn)
  return fn


@main.command("train")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@_training_options
@_OVERWRITE
@_QUIET
@_friendly
def train_cmd(out_dir, overwrite, quiet, **options):
  """Train a model; write a SavedModel, model.keras, config, history, TensorBoard logs and curves."""
  from covidct.config import config_from_options  # pylint: disable=import-outside-toplevel
  from covidct.fsutil import refuse_existing  # pylint: disable=import-outside-toplevel
  from covidct.train import train  # pylint: disable=import-outside-toplevel

  refuse_existing(out_dir, overwrite)
  summary = train(config_from_options(**options), out_dir, overwrite=overwrite, verbose=2 if quiet else 1)
  val = summary["validation"]
  click.echo(f"best epoch {summary['best_epoch']}/{summary['epochs_run']}: validation AUC {val.get('auc', float('nan')):.3f}, "
             f"loss {val['loss']:.3f}; {summary['wall_time_s']:.0f} s. Model in {out_dir}/saved_model")


@main.command("cv")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--folds", type=int, default=None, callback=_positive,
              help="k, the number of patient-grouped folds (default 5).")
@click.option("--fold-seed", type=int, default=0, show_default=True,
              help="Shuffles patients into folds; options compared on the same seed share their folds.")
@click.option("--target-sensitivity", type=float, default=None, callback=_positive,
              help="Each fold's threshold is chosen on the other folds for this sensitivity (default 0.90).")
@click.option("--max-minutes", type=float, default=None, callback=_positive,
              help="Stop at the end of the first epoch past this time; unfinished folds are left out.")
@_training_options
@_OVERWRITE
@_QUIET
@_friendly
def cv_cmd(out_dir, folds, fold_seed, target_sensitivity, max_minutes, overwrite, quiet, **options):
  """Cross-validate a training option on train + validation (patient-grouped folds; never reads test)."""
  from covidct.config import config_from_options  # pylint: disable=import-outside-toplevel
  from covidct.cv import cross_validate, markdown  # pylint: disable=import-outside-toplevel
  from covidct.fsutil import refuse_existing  # pylint: disable=import-outside-toplevel

  refuse_existing(out_dir, overwrite)
  result = cross_validate(config_from_options(**options), out_dir, **_given(k=folds, fold_seed=fold_seed,
                          target_sensitivity=target_sensitivity, max_minutes=max_minutes), overwrite=overwrite,
                          verbose=0 if quiet else 2)
  click.echo(markdown(result) + f"\nWritten to {out_dir}/cv.md")


def _given(**kwargs) -> dict:
  """The keyword arguments the user gave (not None): the library's defaults hold for the others."""
  return {k: v for k, v in kwargs.items() if v is not None}


@main.command("pretrain")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--model", default="mobilenet_v2_0.5", show_default=True,
              help="Backbone: mobilenet_v2_0.35, mobilenet_v2_0.5 or mobilenet_v2_1.0.")
@click.option("--arrays", "arrays_dir", type=click.Path(file_okay=False), default=None,
              help="Read train.npz (and validation.npz, for the probe) from this folder, as `covidct data arrays` "
                   "writes them, instead of the TFDS dataset: no TensorFlow needed (e.g. KERAS_BACKEND=jax).")
@click.option("--epochs", type=int, default=None, callback=_positive)
@click.option("--batch-size", type=int, default=None, callback=_positive, help="Images per step (two views each).")
@click.option("--image-size", type=int, default=None, callback=_positive)
@click.option("--learning-rate", type=float, default=None, callback=_positive)
@click.option("--temperature", type=float, default=None, callback=_positive, help="Of the contrastive loss.")
@click.option("--checkpoint-every", type=int, default=None,
              help="Epochs between backbone checkpoints and linear probes (0: the last epoch only).")
@click.option("--seed", type=int, default=None)
@click.option("--max-minutes", type=float, default=None, callback=_positive,
              help="Stop at the first training step past this many minutes (a checkpoint is written there).")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Score each checkpoint by a linear probe (train labels, validation ROC AUC) and keep the best; "
                   "without it, the last epoch is kept.")
@_WEIGHTS_DIR
@_DATA_DIR
@_OVERWRITE
@_QUIET
@_friendly
def pretrain_cmd(out_dir, model, arrays_dir, epochs, batch_size, image_size, learning_rate, temperature,
                 checkpoint_every, seed, max_minutes, probe, weights_dir, data_dir, overwrite, quiet):
  """Self-supervised (SimCLR) pretraining of a backbone on the training images, from ImageNet; writes
  backbone.weights.h5 for `covidct train --recipe finetune --weights FILE`. Labels only score the linear probe."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel

  from covidct.config import PretrainConfig  # pylint: disable=import-outside-toplevel
  from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel

  if not model.startswith("mobilenet_v2_"):
    raise CovidctError(f"pretraining applies to backbone models (mobilenet_v2_0.35, _0.5, _1.0), not {model!r}.")
  if pathlib.Path(out_dir).exists() and not overwrite:
    raise CovidctError(f"output folder {out_dir} exists; choose another or pass --overwrite.")
  given = dict(model=model, epochs=epochs, batch_size=batch_size, image_size=image_size, learning_rate=learning_rate,
               temperature=temperature, checkpoint_every=checkpoint_every, seed=seed, weights_dir=weights_dir)
  cfg = dataclasses.replace(PretrainConfig(), **{k: v for k, v in given.items() if v is not None})
  from covidct import pretrain  # pylint: disable=import-outside-toplevel

  if arrays_dir:
    train = pretrain.load_arrays(pathlib.Path(arrays_dir) / "train.npz")
    validation = pretrain.load_arrays(pathlib.Path(arrays_dir) / "validation.npz") if probe else None
  else:
    from covidct.data import split_arrays  # pylint: disable=import-outside-toplevel
    from covidct.dataset import load_builder  # pylint: disable=import-outside-toplevel

    load_builder(data_dir)
    train = split_arrays("train", data_dir, cfg.image_size)
    validation = split_arrays("validation", data_dir, cfg.image_size) if probe else None
  summary = pretrain.pretrain(cfg, train, out_dir, validation=validation, overwrite=overwrite,
                              verbose=2 if quiet else 1, max_minutes=max_minutes)
  kept = next((p for p in summary["probes"] if p["epoch"] == summary["kept_epoch"]), None)
  score = f" (linear probe validation ROC AUC {kept['validation_auc']:.3f})" if kept else ""
  click.echo(f"kept epoch {summary['kept_epoch']} of {summary['epochs_run']}{score}; {summary['wall_time_s']:.0f} s. "
             f"Fine-tune it: covidct train --recipe finetune --model {cfg.model} "
             f"--weights {pathlib.Path(out_dir) / pretrain.WEIGHTS_FILE}")


@main.command("evaluate")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--split", type=click.Choice(["test", "validation", "train"]), default="test", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Report folder (default: MODEL/evaluation-SPLIT for a folder, else next to the file).")
@click.option("--target-sensitivity", type=float, default=0.90, show_default=True,
              help="The operating threshold is the highest one reaching this sensitivity on validation.")
@click.option("--bootstrap", "n_boot", type=int, default=1000, show_default=True, help="Resamples over patients.")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average each image with its mirror.")
@click.option("--folder", type=click.Path(), default=None,
              help="Score your own labelled images instead of a split: FOLDER/COVID/* and FOLDER/NonCOVID/* (PNG, "
                   "JPEG, TIFF, 16-bit too), at the model's own operating threshold.")
@click.option("--patients", "patients_csv", type=click.Path(dir_okay=False), default=None,
              help="With --folder: a CSV (file,patient_id) so that CIs resample patients, not images.")
@click.option("--threshold", type=float, default=None,
              help="With --folder: the operating threshold (default: the model's, from its metadata or manifest).")
@_DATA_DIR
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
@_friendly
def evaluate_cmd(models, split, out_dir, target_sensitivity, n_boot, tta, folder, patients_csv, threshold, data_dir,
                 overwrite):
  """Evaluate a model (training folder, SavedModel, .keras, .tflite or .onnx) on a split, or on your own labelled
  --folder; write a report with the shortcut audit.

  Several models: their mean probability is evaluated (an ensemble); --out is then required."""
  import pathlib  # pylint: disable=import-outside-toplevel

  from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel

  if not 0 < target_sensitivity <= 1:
    raise CovidctError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}.")
  if len(models) > 1 and not out_dir:
    raise CovidctError("an ensemble of several models needs --out for its report.")
  if (patients_csv or threshold is not None) and not folder:
    raise CovidctError("--patients and --threshold go with --folder (a split's threshold is chosen on validation).")
  path = pathlib.Path(models[0])
  name = f"evaluation-{pathlib.Path(folder).name if folder else split}"
  out = pathlib.Path(out_dir) if out_dir else (path / name if path.is_dir() else path.with_name(f"{path.stem}-{name}"))
  if out.exists() and not overwrite:
    raise CovidctError(f"output folder {out} exists; choose another with --out or pass --overwrite.")
  from covidct.evaluate import evaluate, evaluate_folder, markdown, write_report  # pylint: disable=import-outside-toplevel
  from covidct.runners import EnsembleRunner, FlipTTARunner, load_runner  # pylint: disable=import-outside-toplevel

  runners = [load_runner(m) for m in models]
  runner = runners[0] if len(runners) == 1 else EnsembleRunner(runners)
  if tta:
    runner = FlipTTARunner(runner)
  if folder:
    from covidct.predict import model_threshold  # pylint: disable=import-outside-toplevel

    report = evaluate_folder(runner, runner.image_size, folder, model_threshold(models[0], threshold),
                             patients_csv=patients_csv, n_boot=n_boot)
  else:
    report = evaluate(runner, runner.image_size, data_dir=data_dir, split=split,
                      target_sensitivity=target_sensitivity, n_boot=n_boot, shortcut_audit=True)
  report["model"] = [str(m) for m in models] if len(models) > 1 else str(path)
  report["test_time_augmentation"] = "horizontal flip" if tta else None
  title = (f"Evaluation of {' + '.join(pathlib.Path(m).name for m in models)}{' with flip TTA' if tta else ''}"
           f"{f' on {folder}' if folder else ''}")
  write_report(report, out, overwrite=overwrite, title=title)
  click.echo(markdown(report, title))
  click.echo(f"Report: {out}/report.md")


@main.command("ensemble")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@_OVERWRITE
@_friendly
def ensemble_cmd(runs, out_dir, overwrite):
  """Join trained RUNS (same input size) into one model that averages their probabilities.

  The output folder is a training output like any other: evaluate, export, push and bench take it.
  """
  from covidct.ensemble import ensemble_runs  # pylint: disable=import-outside-toplevel

  info = ensemble_runs(runs, out_dir, overwrite=overwrite)
  click.echo(f"ensemble of {info['members']} models ({info['parameters']:,} parameters, input "
             f"{info['image_size']}x{info['image_size']}) in {out_dir}/saved_model")


@main.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Also write compare.md, compare.json and validation_vs_test.png to this folder.")
@_OVERWRITE
@_friendly
def compare_cmd(runs, out_dir, overwrite):
  """Compare training RUNS: what each changed from its recipe, its validation ROC AUC and, once `covidct evaluate`
  has scored it, its test metrics. Runs that differ only in their seed share a row, with their mean."""
  from covidct.compare import compare, plot_validation_vs_test, to_markdown  # pylint: disable=import-outside-toplevel
  from covidct.fsutil import atomic_dir  # pylint: disable=import-outside-toplevel

  result = compare(runs)
  text = to_markdown(result)
  click.echo(text, nl=False)
  if out_dir:
    with atomic_dir(out_dir, overwrite) as tmp:
      (tmp / "compare.md").write_text(text)
      (tmp / "compare.json").write_text(json.dumps(result, indent=2))
      plotted = plot_validation_vs_test(result, tmp / "validation_vs_test.png")
    click.echo(f"Written to {out_dir}/ (compare.md, compare.json"
               + (", validation_vs_test.png)" if plotted else "; no run has a test evaluation to plot)"))


@main.command("qat")
@click.argument("run", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--epochs", type=int, default=5, show_default=True,
              help="QAT epochs; the best validation epoch is kept, calibration alone (epoch 0) included. 0: calibrate only.")
@click.option("--learning-rate", type=float, default=1e-5, show_default=True, callback=_positive)
@click.option("--calibration-images", type=int, default=200, show_default=True, callback=_positive,
              help="Train-split images that set the 8-bit ranges.")
@click.option("--temperature", type=float, default=None, callback=_positive,
              help="Divide the logit by this (default: fitted on validation, so an over-confident model's "
                   "probabilities stay apart at the 8-bit output's 1/256 step; ROC AUC is unchanged).")
@click.option("--seed", type=int, default=0, show_default=True)
@_DATA_DIR
@_OVERWRITE
@_QUIET
@_friendly
def qat_cmd(run, out_dir, epochs, learning_rate, calibration_images, temperature, seed, data_dir, overwrite, quiet):
  """Quantization-aware fine-tuning of a MobileNetV2 RUN, so its full-int8 copies give the same answers.

  The output is a training output whose SavedModel computes in 8-bit steps (batch norm folded, int8 weights per
  channel, 8-bit activation ranges calibrated on train): export, evaluate, push and bench take it.
  """
  if epochs < 0:
    raise click.BadParameter(f"must be 0 or more, got {epochs}.", param_hint="--epochs")
  from covidct.quantize import qat  # pylint: disable=import-outside-toplevel

  summary = qat(run, out_dir, epochs=epochs, learning_rate=learning_rate, calibration_images=calibration_images,
                temperature=temperature, seed=seed, data_dir=data_dir, overwrite=overwrite, verbose=2 if quiet else 1)
  before, kept = summary["validation_before_qat"], summary["validation"]
  click.echo(f"temperature {summary['temperature']:.3g}; validation ROC AUC {before['auc']:.4f} calibrated, "
             f"{kept['auc']:.4f} kept (epoch "
             f"{summary['epoch_kept']} of {epochs}); {summary['wall_time_s'] / 60:.1f} min; model in {out_dir}")


@main.command("export")
@click.argument("model_dir", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--formats", default="all", show_default=True,
              help="Comma-separated: tflite_float32, tflite_float16, tflite_dynamic, tflite_int8, onnx_float32, "
                   "onnx_int8, or all.")
@click.option("--calibration-images", default=200, show_default=True, type=int, callback=_positive,
              help="Train-split images used to calibrate the int8 formats.")
@click.option("--bootstrap", "n_boot", type=int, default=1000, show_default=True)
@_DATA_DIR
@click.option("--overwrite", is_flag=True)
@_friendly
def export_cmd(model_dir, out_dir, formats, calibration_images, n_boot, data_dir, overwrite):
  """Export MODEL_DIR's SavedModel to TFLite and ONNX, check parity, write manifest.json."""
  from export.formats import parse_formats  # pylint: disable=import-outside-toplevel

  parse_formats(formats)  # an unknown name fails before any work
  from export.package import export_model  # pylint: disable=import-outside-toplevel

  try:
    export_model(model_dir, out_dir, formats, data_dir=data_dir, overwrite=overwrite, n_calibration=calibration_images,
                 n_boot=n_boot, progress=lambda m: click.echo(m, err=True))
  finally:
    import pathlib  # pylint: disable=import-outside-toplevel

    report = pathlib.Path(out_dir) / "parity.md"
    if report.exists():
      click.echo(report.read_text())
  click.echo(f"Artifacts, parity report and manifest.json in {out_dir}")


@main.command("push")
@click.argument("export_dir", type=click.Path(), required=False)
@click.option("--serving", "serving_dir", required=True, type=click.Path(file_okay=False),
              help="The serving folder: versions go to SERVING/<N>/.")
@click.option("--min-roc-auc", type=float, default=None, help="Bless only at or above this test ROC AUC (default 0.70).")
@click.option("--min-sensitivity", type=float, default=None,
              help="Bless only at or above this test sensitivity at the shipped threshold (default 0.75).")
@click.option("--min-specificity", type=float, default=None,
              help="Bless only at or above this test specificity at the shipped threshold (default 0.50).")
@click.option("--max-regression", type=float, default=None,
              help="Bless only if test ROC AUC is at most this much below the last blessed version's (default 0.02).")
@click.option("--force", is_flag=True, help="Push even when not blessed (recorded as forced).")
@click.option("--list", "list_only", is_flag=True, help="List the pushed versions with their metrics.")
@_DATA_DIR
@_friendly
def push_cmd(export_dir, serving_dir, min_roc_auc, min_sensitivity, min_specificity, max_regression, force, list_only,
             data_dir):
  """Verify EXPORT_DIR, measure it on the test split, bless it and push it to SERVING/<N>/ (or --list the versions)."""
  from covidct.config import GateConfig  # pylint: disable=import-outside-toplevel
  from covidct.push import push, versions  # pylint: disable=import-outside-toplevel

  if list_only:
    rows = versions(serving_dir)
    if not rows:
      click.echo(f"no versions in {serving_dir}")
    for v in rows:
      test = v.get("test", {})
      click.echo(f"{v['version']:>4}  {'blessed' if v.get('blessed') else 'FORCED' if v.get('forced') else '-':<8} "
                 f"test AUC {test.get('roc_auc', v.get('test_roc_auc', float('nan'))):.3f}  "
                 f"sens {test.get('sensitivity', float('nan')):.3f}  spec {test.get('specificity', float('nan')):.3f}  "
                 f"{v.get('pushed', '')}")
    return
  if export_dir is None:
    raise click.UsageError("EXPORT_DIR is required unless --list is given.")
  gate = GateConfig(**_given(min_roc_auc=min_roc_auc, min_sensitivity=min_sensitivity,
                             min_specificity=min_specificity, max_regression=max_regression))
  info = push(export_dir, serving_dir, gate, data_dir=data_dir, force=force)
  state = "blessed" if info["blessed"] else "NOT blessed, forced"
  click.echo(f"pushed version {info['version']} ({state}) to {info['path']}")


@main.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_path", required=True, type=click.Path(),
              help="A training or export folder, SavedModel, .keras, .tflite or .onnx.")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold (default: the manifest's operating threshold, else 0.5).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--strict", is_flag=True, help="Refuse (as errors) images the input guard flags as not CT slices.")
@_friendly
def predict_cmd(images, model_path, threshold, as_json, strict):
  """Probability of COVID and a label for each image file; a warning where the image does not look like a CT slice."""
  from covidct.predict import predict_files  # pylint: disable=import-outside-toplevel

  results, errors, source = predict_files(model_path, images, threshold, strict=strict)
  guard = source.pop("input_guard")
  if as_json:
    click.echo(json.dumps({"results": results, "errors": errors, "threshold": source, "input_guard": guard}, indent=2))
  else:
    click.echo(f"threshold {source['value']:.4f} (from {source['from']}); input guard {guard}")
    for r in results:
      click.echo(f"{r['probability']:.4f}  {r['label']:<8}  {r['file']}"
                 + (f"  WARNING: {r['warning']}" if "warning" in r else ""))
  for e in errors:
    click.echo(f"Error: {e}", err=True)
  if errors:
    raise SystemExit(1)


@main.command("verify")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@_friendly
def verify_cmd(artifacts):
  """Replay each exported ARTIFACT's test vectors (kept beside it by `covidct export`) on the runtime installed here;
  exit 1 if any copy is off."""
  from export.meaning import verify  # pylint: disable=import-outside-toplevel

  failed = 0
  for artifact in artifacts:
    r = verify(artifact)
    failed += not r["passed"]
    click.echo(f"{'pass' if r['passed'] else 'FAIL'}  {r['artifact']}: max |difference| {r['max_abs_diff']:.2e} from "
               f"the SavedModel on {r['images']} test images (tolerance {r['tolerance']:.2e}, {r['runtime']} here)")
  if failed:
    raise click.ClickException(f"{failed} of {len(artifacts)} artifact(s) do not give the SavedModel's answers here.")


def _int_list(ctx, param, value):
  try:
    out = tuple(int(v) for v in value.split(","))
  except ValueError:
    raise click.BadParameter(f"expected comma-separated integers, got {value!r}.") from None
  if not out or min(out) <= 0:
    raise click.BadParameter(f"expected positive integers, got {value!r}.")
  return out


@main.command("bench")
@click.argument("artifacts_dir", type=click.Path())
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Report folder (default: ARTIFACTS_DIR/bench).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=_int_list)
@click.option("--threads", default="1,2", show_default=True, callback=_int_list)
@click.option("--runs", default=50, show_default=True, type=int, callback=_positive, help="Timed runs per batch size.")
@click.option("--warmup", default=5, show_default=True, type=int)
@click.option("--max-seconds", default=5.0, show_default=True, type=float,
              help="Stop timing a batch size after this long (at least 5 runs).")
@click.option("--no-pipeline", is_flag=True, help="Skip the input-pipeline measurement.")
@click.option("--runtimes", default=None, metavar="LIST",
              help="Only these runtimes, comma-separated: tf_signature, keras_predict, keras_call, litert, ort, "
                   "tf_signature_gpu, ort_cuda, ort_tensorrt (default: all). E.g. 'ort,ort_cuda' on a GPU machine "
                   "without TensorFlow.")
@_DATA_DIR
@click.option("--overwrite", is_flag=True)
@_friendly
def bench_cmd(artifacts_dir, out_dir, batch_sizes, threads, runs, warmup, max_seconds, no_pipeline, runtimes, data_dir,
              overwrite):
  """Latency and throughput of every artifact in ARTIFACTS_DIR (a `covidct export` folder) on every runtime."""
  import pathlib  # pylint: disable=import-outside-toplevel

  from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(out_dir) if out_dir else pathlib.Path(artifacts_dir) / "bench"
  if out.exists() and not overwrite:
    raise CovidctError(f"output folder {out} exists; choose another with --out or pass --overwrite.")
  from benchmarks.report import markdown  # pylint: disable=import-outside-toplevel
  from benchmarks.run import run_benchmark  # pylint: disable=import-outside-toplevel

  report = run_benchmark(artifacts_dir, out, batch_sizes, threads, runs, warmup, max_seconds, data_dir=data_dir,
                         pipeline=not no_pipeline, overwrite=overwrite, progress=lambda m: click.echo(m, err=True),
                         runtimes=[r.strip() for r in runtimes.split(",") if r.strip()] if runtimes else None)
  click.echo(markdown(report))
  click.echo(f"Report: {out}/bench.md")


@main.command("pipeline")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--manual-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with the upstream files (offline). Without it, they are downloaded.")
@_DATA_DIR
@click.option("--epochs", type=int, default=None, callback=_positive, help="Override the recipe's epochs.")
@click.option("--image-size", type=int, default=None, callback=_positive)
@click.option("--seed", type=int, default=None)
@click.option("--formats", default="all", show_default=True)
@click.option("--bootstrap", "n_boot", type=int, default=1000, show_default=True)
@click.option("--force-push", is_flag=True, help="Push even if the model is not blessed.")
@_friendly
def pipeline_cmd(out_dir, manual_dir, data_dir, epochs, image_size, seed, formats, n_boot, force_push):
  """The main job: build the dataset, train (default recipe), evaluate, export, check parity, push, report."""
  from covidct.pipeline import run  # pylint: disable=import-outside-toplevel

  overrides = {k: v for k, v in dict(epochs=epochs, image_size=image_size, seed=seed).items() if v is not None}
  run(out_dir, manual_dir=manual_dir, data_dir=data_dir, overrides=overrides, formats=formats, n_boot=n_boot,
      force_push=force_push, echo=lambda m: click.echo(m, err=True))
  click.echo((__import__("pathlib").Path(out_dir) / "report.md").read_text())


if __name__ == "__main__":
  main()
