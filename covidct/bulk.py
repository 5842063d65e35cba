"""Bulk inference on Apache Beam (TFX's BulkInferrer): archives larger than one machine.

`bulk_predict` reads image paths from glob patterns or a file list (any filesystem Beam supports: local, gs://,
s3://, hdfs://), decodes and resizes them exactly as `covidct predict` does (covidct.predict.decode_image), scores
them with Beam's RunInference over covidct's own runners (so every exported format works: SavedModel, .keras,
.tflite, .onnx), and writes one record per image (file, probability, label, threshold, model version, artifact
SHA-256, and the input guard's warning) as JSONL, CSV or Parquet shards. Unreadable files go to `errors-*.jsonl`
with the reason and never stop the job. The same pipeline runs on the DirectRunner here and on Dataflow, Flink or
Spark with their pipeline options.

A local output folder is written under a temporary name and renamed when the pipeline succeeds; a remote one gets
a `_SUCCESS` marker last. Either way a killed run leaves nothing that looks finished, and a re-run goes to a new
output.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import time

from covidct.errors import CovidctError

FORMATS = ("jsonl", "csv", "parquet")
FIELDS = ("file", "probability", "label", "threshold", "warning", "model_version", "artifact_sha256")
RESULTS = "results"
ERRORS = "errors"
SUCCESS = "_SUCCESS"
NAMESPACE = "covidct"


def _is_remote(path: str) -> bool:
  return "://" in str(path)


def model_identity(model_path) -> dict:
  """{'model_version', 'artifact_sha256'}: the pushed version when the artifact sits in serving/<N>/ (else the
  export's creation time), and the SHA-256 of the file (of saved_model.pb for a SavedModel folder)."""
  from covidct.fsutil import sha256  # pylint: disable=import-outside-toplevel
  from covidct.predict import find_manifest  # pylint: disable=import-outside-toplevel

  p = pathlib.Path(model_path).resolve()
  target = p / "saved_model.pb" if p.is_dir() else p
  if p.is_dir() and not target.exists():
    target = p / "saved_model" / "saved_model.pb"
  version = next((d.name for d in [p, *p.parents][:4] if d.name.isdigit() and (d / "blessing.json").exists()), None)
  if version is None:
    found = find_manifest(model_path)
    version = f"export {found[0].created}" if found and found[0].created else None
  return {"model_version": version, "artifact_sha256": sha256(target) if target.is_file() else None}


class _Locked:  # pylint: disable=too-few-public-methods
  """A runner and the lock that serialises calls to it (Beam keeps a weak reference to the model it shares)."""

  def __init__(self, runner, lock):
    self.runner, self.lock = runner, lock


def _model_handler(model_path: str, max_batch: int, runtime: str = "default"):
  """A Beam ModelHandler over covidct.runners: examples are (S, S, 1) uint8 images, predictions P(COVID)."""
  from apache_beam.ml.inference.base import ModelHandler  # pylint: disable=import-outside-toplevel

  class RunnerModelHandler(ModelHandler):  # pylint: disable=abstract-method
    """Loads the artifact with covidct.runners.load_runner once per worker; scores batches of images."""

    def load_model(self):
      import threading  # pylint: disable=import-outside-toplevel

      from covidct.runners import load_runner  # pylint: disable=import-outside-toplevel

      # Beam shares one model between a worker's threads; interpreters (LiteRT's) are not thread-safe.
      return _Locked(load_runner(model_path, runtime=runtime), threading.Lock())

    def run_inference(self, batch, model, inference_args=None):
      import numpy as np  # pylint: disable=import-outside-toplevel
      from apache_beam.ml.inference.base import PredictionResult  # pylint: disable=import-outside-toplevel

      with model.lock:
        probs = model.runner(np.stack(batch), batch_size=max_batch)
      return [PredictionResult(None, float(p)) for p in probs]  # the image is not carried on

    def batch_elements_kwargs(self):
      return {"min_batch_size": 1, "max_batch_size": max_batch}

    def get_metrics_namespace(self):
      return NAMESPACE

  return RunnerModelHandler()


def _decode_fn(image_size: int, guard_path: str | None, strict: bool):
  import apache_beam as beam  # pylint: disable=import-outside-toplevel

  class Decode(beam.DoFn):
    """path -> ((path, guard reasons), image), or an error record on the ERRORS output."""

    def setup(self):
      from covidct.guard import Guard  # pylint: disable=import-outside-toplevel

      self.guard = Guard.load(guard_path) if guard_path else None
      self.errors = beam.metrics.Metrics.counter(NAMESPACE, ERRORS)

    def process(self, path):
      from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel

      from covidct.predict import decode_image  # pylint: disable=import-outside-toplevel

      try:
        if not _is_remote(path) and os.path.exists(path) and not os.path.isfile(path):
          # a FIFO, a device or a folder: reading one may block for ever, or never end
          raise CovidctError(f"{path}: not a regular file (a FIFO, device or folder); not read.")
        with FileSystems.open(path) as fh:
          data = fh.read()
        image, original = decode_image(data, path, image_size)
      except (CovidctError, OSError) as e:
        self.errors.inc()
        why = getattr(e, "strerror", None) or e
        msg = str(e) if isinstance(e, CovidctError) else f"{path}: cannot be read ({why})."
        yield beam.pvalue.TaggedOutput(ERRORS, {"file": path, "error": msg})
        return
      reasons = "; ".join(self.guard.check(image, original)) if self.guard is not None else ""
      if reasons and strict:
        self.errors.inc()
        yield beam.pvalue.TaggedOutput(ERRORS, {"file": path, "error": f"{path}: does not look like a CT slice "
                                                                       f"({reasons}); refused (--strict)."})
        return
      yield (path, reasons), image

  return Decode()


def _to_record(keyed_result, threshold: float, identity: dict) -> dict:
  from covidct.predict import record  # pylint: disable=import-outside-toplevel

  (path, reasons), result = keyed_result
  r = record(path, float(result.inference), threshold, reasons)
  return {k: r.get(k, identity.get(k)) for k in FIELDS}


def _csv_line(r: dict) -> str:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="").writerow(["" if r[k] is None else r[k] for k in FIELDS])
  return buf.getvalue()


def _list_files(files_from) -> list[str]:
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel

  try:
    with FileSystems.open(str(files_from)) as fh:
      text = fh.read().decode("utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise CovidctError(f"{files_from}: cannot read the file list ({type(e).__name__}); give one image path per "
                       "line.") from None
  return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def bulk_predict(model_path, out_dir, patterns=(), files_from=None, output_format: str = "jsonl",
                 threshold: float | None = None, strict: bool = False, batch_size: int = 64, beam_args=(),
                 progress=print) -> dict:
  """Scores every image that `patterns` (globs) and `files_from` (a list of paths) name, with Beam.

  Args:
    model_path: any artifact `covidct predict` takes (training or export folder, SavedModel, .keras, .tflite,
      .onnx), as a local path that exists on every worker (an export folder runs `covidct bench`'s recommended copy).
    out_dir: the output folder (must not exist): results-*.{jsonl,csv,parquet} and errors-*.jsonl.
    patterns: glob patterns, local or on any Beam filesystem (e.g. gs://bucket/study/**/*.png).
    files_from: a text file with one image path per line.
    output_format: jsonl, csv or parquet.
    threshold: the decision threshold (default: the artifact's own, as `covidct predict` finds it).
    strict: images the input guard flags go to the errors output instead of the results.
    batch_size: the largest batch RunInference gives the model.
    beam_args: pipeline options, e.g. ["--runner=DirectRunner", "--direct_num_workers=2",
      "--direct_running_mode=multi_processing"] or Dataflow's.
    progress: called with one line per step.
  Returns:
    {'out', 'results', 'errors', 'seconds', 'threshold', 'model_version', 'artifact_sha256', 'runner'}.
  Raises:
    CovidctError: an unknown format, an existing output, no input, an unloadable model or a bad pipeline option.
  """
  from covidct.extras import require  # pylint: disable=import-outside-toplevel

  require("bulk")
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.io import fileio  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  from apache_beam.ml.inference.base import KeyedModelHandler, RunInference  # pylint: disable=import-outside-toplevel
  from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel

  from covidct.fsutil import atomic_dir, refuse_existing  # pylint: disable=import-outside-toplevel
  from covidct.guard import find_guard  # pylint: disable=import-outside-toplevel
  from covidct import predict  # pylint: disable=import-outside-toplevel
  if output_format not in FORMATS:
    raise CovidctError(f"unknown output format {output_format!r}; choose from {', '.join(FORMATS)}.")
  if batch_size < 1:
    raise CovidctError(f"the batch size must be positive, got {batch_size}.")
  patterns = [str(p) for p in patterns]
  listed = _list_files(files_from) if files_from else []
  if not patterns and not listed:
    raise CovidctError("no input: give glob patterns (--input) or a file list (--files-from).")
  for pattern in patterns:  # a local pattern that matches nothing is a typo: say so before starting workers
    if not _is_remote(pattern) and not FileSystems.match([pattern])[0].metadata_list:
      raise CovidctError(f"no file matches {pattern!r}.")
  remote = _is_remote(out_dir)
  if remote:
    if FileSystems.exists(str(out_dir).rstrip("/") + "/"):
      raise CovidctError(f"output {out_dir} exists; choose a new one (a re-run never mixes with an earlier one).")
  else:
    refuse_existing(out_dir)
  try:
    options = pipeline_options.PipelineOptions(list(beam_args))
    runner_name = options.view_as(pipeline_options.StandardOptions).runner or "DirectRunner"
  except (SystemExit, ValueError) as e:
    raise CovidctError(f"bad pipeline options {list(beam_args)}: {e}") from None
  model_path, runtime, runner, thr = predict.open_model(model_path, threshold)  # fails here, once, if it cannot
  image_size = runner.image_size
  identity = model_identity(model_path)
  guard = find_guard(model_path)
  progress(f"scoring with {thr.pop('model')} at {image_size}x{image_size}, threshold {thr['value']:.4f} (from "
           f"{thr['from']}), on {runner_name}")

  def run(out: str):
    p = beam.Pipeline(options=options)
    sources = []
    if patterns:
      sources.append(p | "Patterns" >> beam.Create(patterns)
                     | "Match" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
                     | "Paths" >> beam.Map(lambda m: m.path))
    if listed:
      sources.append(p | "Listed" >> beam.Create(listed))
    paths = sources[0] if len(sources) == 1 else tuple(sources) | "All" >> beam.Flatten()
    decoded = (paths | "Distinct" >> beam.Distinct() | "Spread" >> beam.Reshuffle()
               | "Decode" >> beam.ParDo(_decode_fn(image_size, str(guard) if guard else None, strict))
               .with_outputs(ERRORS, main="images"))
    records = (decoded.images
               | "Score" >> RunInference(KeyedModelHandler(_model_handler(str(model_path), batch_size, runtime)))
               | "Record" >> beam.Map(_to_record, thr["value"], identity))
    prefix = f"{out.rstrip('/')}/{RESULTS}"
    if output_format == "jsonl":
      _ = records | "JSON" >> beam.Map(json.dumps) | "WriteJSONL" >> beam.io.WriteToText(
          prefix, file_name_suffix=".jsonl", compression_type=CompressionTypes.UNCOMPRESSED)
    elif output_format == "csv":
      _ = records | "CSV" >> beam.Map(_csv_line) | "WriteCSV" >> beam.io.WriteToText(
          prefix, file_name_suffix=".csv", header=",".join(FIELDS))
    else:
      import pyarrow as pa  # pylint: disable=import-outside-toplevel

      schema = pa.schema([("file", pa.string()), ("probability", pa.float64()), ("label", pa.string()),
                          ("threshold", pa.float64()), ("warning", pa.string()), ("model_version", pa.string()),
                          ("artifact_sha256", pa.string())])
      _ = records | "WriteParquet" >> beam.io.WriteToParquet(prefix, schema, file_name_suffix=".parquet")
    _ = (decoded[ERRORS] | "ErrorJSON" >> beam.Map(json.dumps)
         | "WriteErrors" >> beam.io.WriteToText(f"{out.rstrip('/')}/{ERRORS}", file_name_suffix=".jsonl"))
    result = p.run()
    result.wait_until_finish()
    return result

  start = time.time()
  try:
    if remote:
      result = run(str(out_dir))
      with FileSystems.create(f"{str(out_dir).rstrip('/')}/{SUCCESS}") as fh:
        fh.write(b"")
    else:
      with atomic_dir(out_dir) as tmp:
        result = run(str(tmp))
        (pathlib.Path(tmp) / SUCCESS).write_text("")
  except CovidctError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a runner's failure: one line, nothing left that looks done
    raise CovidctError(f"the Beam pipeline failed ({_cause(e)}); nothing was written to {out_dir}.") from None
  seconds = time.time() - start
  counts = _counts(result)
  return {"out": str(out_dir), "seconds": round(seconds, 2), "threshold": thr, "runner": runner_name,
          "format": output_format, **counts, **identity}


def _cause(e: Exception) -> str:
  """The root cause's one line: Beam wraps a worker's exception in a RuntimeError holding its whole traceback."""
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  last = next((l for l in reversed(lines) if not l.startswith(("File ", "^", "~"))), "") if lines else ""
  last = last.split(" [while running")[0]
  return (last if ":" in last else f"{type(e).__name__}: {last}")[:200]


def _counts(result) -> dict:
  """Images scored and refused (unreadable, or flagged under --strict), from the pipeline's metrics (None where a
  runner does not report them)."""
  from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=import-outside-toplevel

  out = {"results": None, "errors": None}
  try:
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
  except Exception:  # pylint: disable=broad-except  # some runners do not support metric queries
    return out
  for m in metrics:
    if m.key.metric.name == "num_inferences":
      out["results"] = (out["results"] or 0) + m.committed
    elif m.key.metric.name == ERRORS:
      out["errors"] = (out["errors"] or 0) + m.committed
  return out
