"""Commands that score models: evaluate, compare."""

from __future__ import annotations

import json

import click

from covidct.cli.options import DATA_DIR, OVERWRITE, friendly


@click.command("evaluate")
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
@DATA_DIR
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
@friendly
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
