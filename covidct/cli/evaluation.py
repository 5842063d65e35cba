"""Commands that score models: evaluate, compare."""

from __future__ import annotations

import json

import click

from covidct.cli.options import BOOTSTRAP, DATA_DIR, OVERWRITE, TARGET, friendly


@click.command("evaluate")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--split", type=click.Choice(["test", "validation", "train"]), default="test", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Report folder (default: MODEL/evaluation-SPLIT for a folder, else next to the file).")
@TARGET
@BOOTSTRAP
@click.option("--tta", is_flag=True, help="Test-time augmentation: average each image with its mirror.")
@click.option("--folder", type=click.Path(), default=None,
              help="Score your own labelled images instead of a split: FOLDER/COVID/* and FOLDER/NonCOVID/* (PNG, "
                   "JPEG, TIFF, 16-bit too), at the model's own operating threshold.")
@click.option("--patients", "patients_csv", type=click.Path(dir_okay=False), default=None,
              help="With --folder: a CSV (file,patient_id) so that CIs resample patients, not images.")
@click.option("--threshold", type=float, default=None,
              help="With --folder: the operating threshold (default: the model's, from its metadata or manifest).")
@click.option("--sources", default=None, metavar="LIST|all",
              help="With the test split: the sources whose test splits are reported side by side (default: every "
                   "source prepared in the data dir: covid_ct, cc_ccii, covid_ct_md).")
@DATA_DIR
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
@friendly
def evaluate_cmd(models, split, out_dir, target_sensitivity, n_boot, tta, folder, patients_csv, threshold, sources,
                 data_dir, overwrite):
  """Evaluate a model (training folder, SavedModel, .keras, .tflite or .onnx) on a split, or on your own labelled
  --folder; write a report with the shortcut audit. On the test split, every prepared source's test split is
  reported side by side too (a source the model did not train on is labelled external).

  Several models: their mean probability is evaluated (an ensemble); --out is then required."""
  from covidct.dataset import parse_sources  # pylint: disable=import-outside-toplevel
  from covidct.evaluate import evaluate_models, markdown  # pylint: disable=import-outside-toplevel

  if sources and (folder or split != "test"):
    raise click.UsageError("--sources goes with the test split (not with --folder or another --split).")
  report, out, title = evaluate_models(models, split=split, out_dir=out_dir, target_sensitivity=target_sensitivity,
                                       n_boot=n_boot, tta=tta, folder=folder, patients_csv=patients_csv,
                                       threshold=threshold, data_dir=data_dir, overwrite=overwrite,
                                       sources=parse_sources(sources) if sources else None,
                                       progress=lambda m: click.echo(m, err=True))
  click.echo(markdown(report, title))
  click.echo(f"Report: {out}/report.md")


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Also write compare.md, compare.json and validation_vs_test.png to this folder.")
@OVERWRITE
@friendly
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
