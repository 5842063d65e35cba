"""Commands on exported artifacts: export, verify, push, predict, bulk-predict."""

from __future__ import annotations

import json

import click

from covidct.cli.options import BOOTSTRAP, CALIBRATION, DATA_DIR, OVERWRITE, friendly, given


@click.command("export")
@click.argument("model_dir", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--formats", default="all", show_default=True,
              help="Comma-separated: tflite_float32, tflite_float16, tflite_dynamic, tflite_int8, onnx_float32, "
                   "onnx_int8, or all.")
@CALIBRATION
@BOOTSTRAP
@DATA_DIR
@OVERWRITE
@friendly
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


@click.command("verify")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@friendly
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


@click.command("push")
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
@click.option("--skip-infra-validation", is_flag=True,
              help="Do not serve the candidate (covidct serve, loopback) and check its canary answers before the push.")
@DATA_DIR
@friendly
def push_cmd(export_dir, serving_dir, min_roc_auc, min_sensitivity, min_specificity, max_regression, force, list_only,
             skip_infra_validation, data_dir):
  """Verify EXPORT_DIR, measure it on every prepared source's test split, bless it against the floors (each source
  held to them, the external site to the ROC AUC floor) and push it to SERVING/<N>/ (or --list the versions)."""
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
  gate = GateConfig(**given(min_roc_auc=min_roc_auc, min_sensitivity=min_sensitivity,
                             min_specificity=min_specificity, max_regression=max_regression))
  info = push(export_dir, serving_dir, gate, data_dir=data_dir, force=force,
              infra_validation=not skip_infra_validation)
  state = "blessed" if info["blessed"] else "NOT blessed, forced"
  infra = info.get("infra_validation")
  click.echo(f"pushed version {info['version']} ({state}) to {info['path']}"
             + (f"; served by covidct serve, {infra['canaries']} canaries answered within {infra['max_abs_diff']:.1e}"
                if infra else "; infra validation skipped"))


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_path", required=True, type=click.Path(),
              help="A training or export folder, SavedModel, .keras, .tflite or .onnx.")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold (default: the manifest's operating threshold, else 0.5).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--strict", is_flag=True, help="Refuse (as errors) images the input guard flags as not CT slices.")
@friendly
def predict_cmd(images, model_path, threshold, as_json, strict):
  """Probability of COVID and a label for each image file; a warning where the image does not look like a CT slice."""
  from covidct.predict import predict_files, predict_stream  # pylint: disable=import-outside-toplevel

  if as_json:  # one JSON document: collected, then printed
    results, errors, source = predict_files(model_path, images, threshold, strict=strict)
    guard, model = source.pop("input_guard"), source.pop("model")
    click.echo(json.dumps({"results": results, "errors": errors, "threshold": source, "input_guard": guard,
                           "model": model}, indent=2))
  else:  # a line per file as it is scored
    source, stream = predict_stream(model_path, images, threshold, strict=strict)
    click.echo(f"model {source['model']}; threshold {source['value']:.4f} (from {source['from']}); input guard "
               f"{source['input_guard']}")
    errors = [r["error"] for r in map(_print_record, stream) if "error" in r]
  for e in errors:
    click.echo(f"Error: {e}", err=True)
  if errors:
    raise SystemExit(1)


def _print_record(r: dict) -> dict:
  if "error" not in r:
    click.echo(f"{r['probability']:.4f}  {r['label']:<8}  {r['file']}" + (f"  WARNING: {r['warning']}" if "warning" in r
                                                                           else ""))
  return r


@click.command("bulk-predict", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True})
@click.option("--model", "model_path", required=True, type=click.Path(),
              help="Any artifact `covidct predict` takes, readable by every worker.")
@click.option("--input", "patterns", multiple=True, metavar="GLOB",
              help="Images to score: a glob, local or on any Beam filesystem (gs://, s3://, hdfs://); repeatable.")
@click.option("--files-from", type=str, default=None, metavar="LIST", help="A text file with one image path per line.")
@click.option("--out", "out_dir", required=True, help="Output folder (must not exist): results-*, errors-*.jsonl.")
@click.option("--format", "output_format", type=click.Choice(["jsonl", "csv", "parquet"]), default="jsonl",
              show_default=True)
@click.option("--threshold", type=float, default=None, help="Decision threshold (default: the artifact's own).")
@click.option("--strict", is_flag=True, help="Send images the input guard flags to the errors output.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Largest batch given to the model.")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
@friendly
def bulk_predict_cmd(model_path, patterns, files_from, out_dir, output_format, threshold, strict, batch_size,
                     beam_args):
  """Score an archive with Apache Beam's RunInference; any other option goes to Beam (e.g. --runner DataflowRunner
  --project P --region R --temp_location gs://..., or --direct_num_workers 2 --direct_running_mode
  multi_processing). Unreadable files go to errors-*.jsonl and never stop the job."""
  from covidct.bulk import bulk_predict  # pylint: disable=import-outside-toplevel

  summary = bulk_predict(model_path, out_dir, patterns=patterns, files_from=files_from, output_format=output_format,
                         threshold=threshold, strict=strict, batch_size=batch_size, beam_args=beam_args,
                         progress=lambda m: click.echo(m, err=True))
  click.echo(f"{summary['results']} images scored, {summary['errors']} refused, in {summary['seconds']:.1f} s on "
             f"{summary['runner']}; results in {out_dir}")
