"""Commands that make models: train, cv, pretrain, qat, ensemble."""

from __future__ import annotations

import click

from covidct.cli.options import (CALIBRATION, DATA_DIR, OVERWRITE, QUIET, WEIGHTS_DIR, friendly, given, positive,
                                 training_options)
from covidct.config import TARGET_SENSITIVITY


@click.command("train")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@training_options
@OVERWRITE
@QUIET
@friendly
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


@click.command("cv")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--folds", type=int, default=None, callback=positive,
              help="k, the number of patient-grouped folds (default 5).")
@click.option("--fold-seed", type=int, default=0, show_default=True,
              help="Shuffles patients into folds; options compared on the same seed share their folds.")
@click.option("--target-sensitivity", type=float, default=None, callback=positive,
              help=f"Each fold's threshold is chosen on the other folds for this sensitivity (default {TARGET_SENSITIVITY}).")
@click.option("--max-minutes", type=float, default=None, callback=positive,
              help="Stop at the end of the first epoch past this time; unfinished folds are left out.")
@click.option("--lung-crop", type=click.Choice(["field", "box"]), default=None,
              help="De-confounding: cut every image down to its lung field (classical segmentation) before the model, "
                   "in training and in the out-of-fold audit: 'field', the lungs alone; 'box', all that is in their "
                   "box. cv only: no exported copy applies it yet.")
@click.option("--leave-one-source-out", "loso", is_flag=True,
              help="With several --sources: also train on all sources but one and score the one left out (its train "
                   "+ validation), for each source; written to OUT/loso/. When it and the folds disagree, it decides.")
@click.option("--only-held-out", is_flag=True,
              help="Leave one source out without the folds (a quicker screen of an option): written to OUT.")
@training_options
@OVERWRITE
@QUIET
@friendly
def cv_cmd(out_dir, folds, fold_seed, target_sensitivity, max_minutes, loso, only_held_out, overwrite, quiet,
           **options):
  """Cross-validate a training option on train + validation (patient-grouped folds; never reads test)."""
  from covidct import cv  # pylint: disable=import-outside-toplevel
  from covidct.config import config_from_options  # pylint: disable=import-outside-toplevel
  from covidct.fsutil import refuse_existing  # pylint: disable=import-outside-toplevel

  refuse_existing(out_dir, overwrite)
  result, held = cv.protocol(config_from_options(**options), out_dir, leave_one_source_out=loso or only_held_out,
                             folds=not only_held_out, overwrite=overwrite, verbose=0 if quiet else 2,
                             **given(k=folds, fold_seed=fold_seed, target_sensitivity=target_sensitivity,
                                     max_minutes=max_minutes))
  if result is not None:
    click.echo(cv.markdown(result) + f"\nWritten to {out_dir}/cv.md")
  if held is not None:
    click.echo("\n" + cv.loso_markdown(held) + f"\nWritten to {out_dir}{'' if only_held_out else '/loso'}/loso.md")



@click.command("pretrain")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--model", default=None,
              help="Backbone: mobilenet_v2_0.35, mobilenet_v2_0.5 (default) or mobilenet_v2_1.0.")
@click.option("--arrays", "arrays_dir", type=click.Path(file_okay=False), default=None,
              help="Read train.npz (and validation.npz, for the probe) from this folder, as `covidct data arrays` "
                   "writes them, instead of the TFDS dataset: no TensorFlow needed (e.g. KERAS_BACKEND=jax).")
@click.option("--epochs", type=int, default=None, callback=positive)
@click.option("--batch-size", type=int, default=None, callback=positive, help="Images per step (two views each).")
@click.option("--image-size", type=int, default=None, callback=positive)
@click.option("--learning-rate", type=float, default=None, callback=positive)
@click.option("--temperature", type=float, default=None, callback=positive, help="Of the contrastive loss.")
@click.option("--checkpoint-every", type=int, default=None,
              help="Epochs between backbone checkpoints and linear probes (0: the last epoch only).")
@click.option("--seed", type=int, default=None)
@click.option("--max-minutes", type=float, default=None, callback=positive,
              help="Stop at the first training step past this many minutes (a checkpoint is written there).")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Score each checkpoint by a linear probe (train labels, validation ROC AUC) and keep the best; "
                   "without it, the last epoch is kept.")
@WEIGHTS_DIR
@DATA_DIR
@OVERWRITE
@QUIET
@friendly
def pretrain_cmd(out_dir, model, arrays_dir, epochs, batch_size, image_size, learning_rate, temperature,
                 checkpoint_every, seed, max_minutes, probe, weights_dir, data_dir, overwrite, quiet):
  """Self-supervised (SimCLR) pretraining of a backbone on the training images, from ImageNet; writes
  backbone.weights.h5 for `covidct train --recipe finetune --weights FILE`. Labels only score the linear probe."""
  import pathlib  # pylint: disable=import-outside-toplevel

  from covidct import pretrain  # pylint: disable=import-outside-toplevel

  cfg, summary = pretrain.pretrain_from_options(
      out_dir, arrays_dir=arrays_dir, data_dir=data_dir, probe=probe, overwrite=overwrite, verbose=2 if quiet else 1,
      max_minutes=max_minutes, **given(model=model, epochs=epochs, batch_size=batch_size, image_size=image_size,
                                       learning_rate=learning_rate, temperature=temperature,
                                       checkpoint_every=checkpoint_every, seed=seed, weights_dir=weights_dir))
  kept = next((p for p in summary["probes"] if p["epoch"] == summary["kept_epoch"]), None)
  score = f" (linear probe validation ROC AUC {kept['validation_auc']:.3f})" if kept else ""
  click.echo(f"kept epoch {summary['kept_epoch']} of {summary['epochs_run']}{score}; {summary['wall_time_s']:.0f} s. "
             f"Fine-tune it: covidct train --recipe finetune --model {cfg.model} "
             f"--weights {pathlib.Path(out_dir) / pretrain.WEIGHTS_FILE}")


@click.command("qat")
@click.argument("run", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--epochs", type=int, default=None,
              help="QAT epochs (default 5); the best validation epoch is kept, calibration alone (epoch 0) included. "
                   "0: calibrate only.")
@click.option("--learning-rate", type=float, default=None, callback=positive, help="Default 1e-5.")
@CALIBRATION
@click.option("--temperature", type=float, default=None, callback=positive,
              help="Divide the logit by this (default: fitted on validation, so an over-confident model's "
                   "probabilities stay apart at the 8-bit output's 1/256 step; ROC AUC is unchanged).")
@click.option("--seed", type=int, default=None, help="Default 0.")
@click.option("--weight-bits", type=click.Choice(["7", "8"]), default=None,
              help="The weights' grid (default 7: [-63, 63], exact on CPUs without VNNI, where 8-bit weights' "
                   "int8 products saturate under OpenVINO).")
@DATA_DIR
@OVERWRITE
@QUIET
@friendly
def qat_cmd(run, out_dir, epochs, learning_rate, calibration_images, temperature, seed, weight_bits, data_dir, overwrite,
            quiet):
  """Quantization-aware fine-tuning of a MobileNetV2 RUN, so its full-int8 copies give the same answers.

  The output is a training output whose SavedModel computes in 8-bit steps (batch norm folded, int8 weights per
  channel on a 7-bit grid by default, 8-bit activation ranges calibrated on train): export, evaluate, push and bench take it.
  """
  if epochs is not None and epochs < 0:
    raise click.BadParameter(f"must be 0 or more, got {epochs}.", param_hint="--epochs")
  from covidct.quantize import qat  # pylint: disable=import-outside-toplevel

  summary = qat(run, out_dir, calibration_images=calibration_images, temperature=temperature, data_dir=data_dir,
                overwrite=overwrite, verbose=2 if quiet else 1,
                **given(epochs=epochs, learning_rate=learning_rate, seed=seed,
                        weight_bits=int(weight_bits) if weight_bits else None))
  before, kept = summary["validation_before_qat"], summary["validation"]
  click.echo(f"temperature {summary['temperature']:.3g}; validation ROC AUC {before['auc']:.4f} calibrated, "
             f"{kept['auc']:.4f} kept (epoch "
             f"{summary['epoch_kept']} of {summary['epochs_run']}); {summary['wall_time_s'] / 60:.1f} min; model in {out_dir}")


@click.command("ensemble")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@OVERWRITE
@friendly
def ensemble_cmd(runs, out_dir, overwrite):
  """Join trained RUNS (same input size) into one model that averages their probabilities.

  The output folder is a training output like any other: evaluate, export, push and bench take it.
  """
  from covidct.ensemble import ensemble_runs  # pylint: disable=import-outside-toplevel

  info = ensemble_runs(runs, out_dir, overwrite=overwrite)
  click.echo(f"ensemble of {info['members']} models ({info['parameters']:,} parameters, input "
             f"{info['image_size']}x{info['image_size']}) in {out_dir}/saved_model")
