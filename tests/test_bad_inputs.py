"""The bad-input suite: every command, given what a careless or hostile user gives it, answers with one clear line
and a non-zero exit, never a traceback, and leaves nothing half-written behind.

Each case builds its bad input in a fresh folder, runs the command in-process, and asserts the exit code, the
message, that the message is the last and only `Error:` line, and that no output folder, `*.partial-*` or
`incomplete.*` leftover exists afterwards. More cases live beside the features they guard (test_inputs.py,
test_export.py, test_dataset_errors.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from covidct.cli import main
from tests.conftest import DUMMY_DATA, SIZE

OUT = "out"  # each case's output path, relative to its folder: it must not exist after a refused command


def _png(path, size=96, value=None):
  rng = np.random.default_rng(0)
  pixels = np.full((size, size), value, np.uint8) if value is not None else (rng.random((size, size)) * 255).astype(
      np.uint8)
  Image.fromarray(pixels).save(path)
  return str(path)


def _copy(src, dst) -> pathlib.Path:
  shutil.copytree(src, dst, symlinks=True)
  return pathlib.Path(dst)


def _truncated_data(ctx):
  data = _copy(ctx["data"], ctx["tmp"] / "data")
  for f in data.rglob("*.tfrecord*"):
    b = f.read_bytes()
    f.write_bytes(b[:len(b) // 2])
  return str(data)


def _edited_manifest(ctx, edit):
  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  (copy / "manifest.json").write_text(edit(json.loads((copy / "manifest.json").read_text())))
  return str(copy)


def _class_folders(ctx, covid=1, noncovid=1, bad=False, missing=None):
  root = ctx["tmp"] / "folder"
  for name, n in (("COVID", covid), ("NonCOVID", noncovid)):
    if name == missing:
      continue
    (root / name).mkdir(parents=True)
    for i in range(n):
      _png(root / name / f"{i}.png")
  if bad:
    (root / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  return str(root)


def _run_with_damaged_keras(ctx):
  run = ctx["tmp"] / "run"
  run.mkdir()
  (run / "model.keras").write_bytes(b"PK\x03\x04 not really a zip")
  (run / "config.json").write_text(json.dumps({"model": "mobilenet_v2_0.35", "image_size": SIZE}))
  return str(run)


def _only_default(ctx):
  """A data dir holding only the default config (a copy of the shared dummy one)."""
  data = ctx["tmp"] / "data-default"
  shutil.copytree(pathlib.Path(ctx["data"]) / "covid_ct" / "covid_ct", data / "covid_ct" / "covid_ct")
  return str(data)


def _busy_port(ctx) -> str:
  """A loopback port another socket listens on, for as long as the case runs."""
  import socket

  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  s.listen()
  ctx["_busy"] = s  # kept open until the case's context goes
  return str(s.getsockname()[1])


def _damaged_info(ctx):
  data = _copy(ctx["data"], ctx["tmp"] / "data")
  for f in data.glob("covid_ct/covid_ct/*/dataset_info.json"):
    f.write_text("not json {")
  return str(data)


def _patients(ctx, content: bytes):
  path = ctx["tmp"] / "patients.csv"
  path.write_bytes(content)
  return str(path)


def _onnx_threshold(ctx, value: str):
  """A lone copy of the export's ONNX whose metadata threshold was edited to `value`."""
  import onnx

  model = onnx.load(str(ctx["exported"] / "model_float32.onnx"))
  for prop in model.metadata_props:
    if prop.key == "operating_threshold":
      prop.value = value
  (ctx["tmp"] / "lone").mkdir(exist_ok=True)
  path = ctx["tmp"] / "lone" / "model.onnx"
  onnx.save(model, str(path))
  return str(path)


def _blessing(ctx, text):
  serving = ctx["tmp"] / "serving"
  (serving / "1").mkdir(parents=True)
  (serving / "1" / "blessing.json").write_text(text)
  return str(serving)


def _flipped(ctx, name):
  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  data = bytearray((copy / name).read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  (copy / name).write_bytes(bytes(data))
  return str(copy / name)


def _flip_weights(path: pathlib.Path, sign: bool = False) -> None:
  """Flips bytes inside the largest weight tensor of an .onnx or .tflite, leaving a file that still loads: for an
  .onnx through onnx (re-saved, metadata kept); for a .tflite in place, where that tensor's bytes lie."""
  if path.suffix == ".onnx":
    import onnx

    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(init.raw_data)
    for i in range(0, min(len(raw), 3000)):
      raw[i] ^= 0x5A
    init.raw_data = bytes(raw)
    onnx.save(model, str(path))
    return
  from ai_edge_litert import schema_py_generated as schema

  data = bytearray(path.read_bytes())
  model = schema.Model.GetRootAs(bytes(data), 0)
  biggest = max(range(model.BuffersLength()), key=lambda i: model.Buffers(i).DataLength())
  blob = model.Buffers(biggest).DataAsNumpy().tobytes()
  start = bytes(data).find(blob[:256])
  assert start > 0
  for i in range(start, start + min(len(blob), 20000)):
    if sign:
      if i % 2 == 1:  # float16, little-endian: the sign bit is the high byte's top bit
        data[i] ^= 0x80
    else:
      data[i] ^= 0x5A
  path.write_bytes(bytes(data))


def _lone_flipped(ctx, name, sign=False):
  lone = ctx["tmp"] / "lone"
  lone.mkdir(exist_ok=True)
  path = pathlib.Path(shutil.copy(ctx["exported"] / name, lone))
  _flip_weights(path, sign)
  return str(path)


def _flipped_with_vectors(ctx, name="model_float32.onnx"):
  """An export copy without its manifest (the SHA-256 check gone), a weight-flipped copy and its vectors."""
  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  (copy / "manifest.json").unlink()
  _flip_weights(copy / name)
  return str(copy / name)


def _unlisted_in_export(ctx):
  """A loadable model of the right shape that the export's manifest does not list, in a subfolder of the export."""
  import onnx
  from onnx import TensorProto, helper

  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  size = json.loads((copy / "manifest.json").read_text())["input"]["shape"][1]
  nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
           helper.make_node("ReduceMean", ["xf", "axes"], ["m"], keepdims=0),
           helper.make_node("Unsqueeze", ["m", "one"], ["m1"]),
           helper.make_node("Div", ["m1", "top"], ["y"])]
  graph = helper.make_graph(
      nodes, "foreign", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", size, size, 1])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
      initializer=[helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
                   helper.make_tensor("one", TensorProto.INT64, [1], [1]),
                   helper.make_tensor("top", TensorProto.FLOAT, [1], [255.0])])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  model.ir_version = 8
  (copy / "foreign").mkdir()
  onnx.save(model, copy / "foreign" / "model.onnx")
  return str(copy / "foreign" / "model.onnx")


def _recommending(ctx, file):
  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  manifest = json.loads((copy / "manifest.json").read_text())
  from covidct.versions import cpu_label

  manifest["recommended"] = {"batch": 1, "threads": 1, "artifact": "onnx_float32", "runtime": "ort", "file": file,
                             "measured_on": cpu_label()}
  (copy / "manifest.json").write_text(json.dumps(manifest))
  return str(copy)


def _cut_tail(ctx, name):
  lone = ctx["tmp"] / "lone"
  lone.mkdir(exist_ok=True)
  path = pathlib.Path(shutil.copy(ctx["exported"] / name, lone))
  data = path.read_bytes()
  path.write_bytes(data[:-60])  # the zip's end-of-central-directory record, and a little more
  return str(path)


def _nested_manifest(ctx, folder="saved_model"):
  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  manifest = json.loads((copy / "manifest.json").read_text())
  manifest["operating_threshold"]["value"] = 0.99
  (copy / folder / "manifest.json").write_text(json.dumps(manifest))
  return str(copy)


def _truncated_in_export(ctx, name):
  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  (copy / name).write_bytes((copy / name).read_bytes()[:5000])
  return str(copy)


def _missing_in_export(ctx, name):
  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  (copy / name).unlink()
  return str(copy)


def _file(ctx, name, content: bytes):
  path = ctx["tmp"] / name
  path.write_bytes(content)
  return str(path)


def _no_permission(ctx):  # /sys refuses new entries to everyone, root included: a real EPERM/EACCES
  probe = pathlib.Path("/sys/covidct-bad-input-test")
  try:
    probe.mkdir()
  except OSError:
    return str(probe)
  probe.rmdir()
  pytest.skip(reason="/sys accepts new folders on this machine: there is no place here that refuses writes")


G = ["--min-roc-auc", "0", "--min-sensitivity", "0", "--min-specificity", "0"]

# (id, function of ctx -> argv, exit code, expected text in the error line)
# kind -> (input type, input shape, output type): ONNX models from elsewhere that covidct cannot run as they are
FOREIGN_ONNX = {
    "channels first": ("FLOAT", ["N", 1, 48, 48], "FLOAT"),
    "symbolic height and width": ("FLOAT", ["N", "H", "W", 1], "FLOAT"),
    "int32 input": ("INT32", ["N", 48, 48, 1], "FLOAT"),
    "int64 output": ("UINT8", ["N", 48, 48, 1], "INT64"),
    "three channels": ("UINT8", ["N", 48, 48, 3], "FLOAT"),
}


CASES = [
    # data
    ("data build: no manual dir", lambda c: ["data", "build", "--manual-dir", str(c["tmp"] / "nope"),
                                            "--data-dir", str(c["tmp"] / OUT)], 1, "does not exist; point it at"),
    ("data build: manual dir is a file", lambda c: ["data", "build", "--manual-dir", _file(c, "f", b"x"),
                                                   "--data-dir", str(c["tmp"] / OUT)], 2, "is a file"),
    ("data info: nothing built", lambda c: ["data", "info", "--data-dir", str(c["tmp"])], 1, "is not prepared"),
    # data: the sources
    ("data build: unknown config", lambda c: ["data", "build", "--config", "mnist", "--data-dir", str(c["tmp"] / OUT)],
     1, "unknown source 'mnist'"),
    ("data build: cc_ccii with no local copy", lambda c: ["data", "build", "--config", "cc_ccii", "--data-dir",
                                                         str(c["tmp"] / OUT)], 1, "built from a local copy only"),
    ("data build: all, one folder given", lambda c: ["data", "build", "--config", "all", "--manual-dir",
                                                    str(c["tmp"]), "--data-dir", str(c["tmp"] / OUT)], 1,
     "cc_ccii needs its files"),
    ("data build: sources root is not a folder", lambda c: ["data", "build", "--sources-root", str(c["tmp"] / "no"),
                                                           "--data-dir", str(c["tmp"] / OUT)], 1, "is not a folder"),
    ("data build: a folder for a source not built", lambda c: ["data", "build", "--config", "cc_ccii", "--manual-dir",
                                                              f"covid_ct_md={c['tmp']}", "--data-dir",
                                                              str(c["tmp"] / OUT)], 1, "is not among the sources"),
    ("data build: a source named twice", lambda c: ["data", "build", "--config", "cc_ccii,cc_ccii", "--data-dir",
                                                   str(c["tmp"] / OUT)], 1, "named twice"),
    ("data info: unknown config", lambda c: ["data", "info", "--config", "covid", "--data-dir", c["data"]], 1,
     "unknown source 'covid'"),
    ("data info: config not built", lambda c: ["data", "info", "--config", "cc_ccii", "--data-dir", str(c["tmp"])], 1,
     "covid_ct/cc_ccii dataset is not prepared"),
    ("data arrays: a split the source lacks", lambda c: ["data", "arrays", "--config", "covid_ct_md", "--split", "train",
                                                        "--out", str(c["tmp"] / OUT), "--data-dir", c["data"]], 1,
     "--split takes test (covid_ct_md has no other)"),
    ("train: the external site", lambda c: ["train", "--sources", "covid_ct,covid_ct_md", "--out", str(c["tmp"] / OUT),
                                            "--data-dir", c["data"]], 1, "external test site"),
    ("train: a weight per source", lambda c: ["train", "--sources", "covid_ct,cc_ccii", "--source-weights", "1,2,3",
                                              "--out", str(c["tmp"] / OUT), "--data-dir", c["data"]], 1,
     "one weight > 0 per source"),
    ("train: weights that are not numbers", lambda c: ["train", "--sources", "covid_ct,cc_ccii", "--source-weights",
                                                       "half,half", "--out", str(c["tmp"] / OUT)], 1,
     "comma-separated numbers"),
    ("train: a source not built", lambda c: ["train", "--sources", "covid_ct,cc_ccii", "--out", str(c["tmp"] / OUT),
                                             "--data-dir", _only_default(c), "--epochs", "1"], 1,
     "covid_ct/cc_ccii dataset is not prepared"),
    ("cv: one source left out of one", lambda c: ["cv", "--leave-one-source-out", "--out", str(c["tmp"] / OUT),
                                                  "--data-dir", c["data"]], 1, "needs at least two --sources"),
    ("evaluate: unknown source", lambda c: ["evaluate", str(c["model_dir"]), "--sources", "mnist", "--out",
                                            str(c["tmp"] / OUT), "--data-dir", c["data"]], 1, "unknown source"),
    ("evaluate: sources with a folder", lambda c: ["evaluate", str(c["model_dir"]), "--sources", "cc_ccii",
                                                   "--folder", _class_folders(c), "--out", str(c["tmp"] / OUT)], 2,
     "--sources goes with the test split"),
    ("pipeline: a training source without files", lambda c: ["pipeline", "--out", str(c["tmp"] / OUT), "--manual-dir",
                                                             str(c["tmp"]), "--sources", "covid_ct,cc_ccii"], 1,
     "cc_ccii needs its files"),
    # train
    ("train: zero epochs", lambda c: ["train", "--epochs", "0", "--out", str(c["tmp"] / OUT)], 2, "must be positive"),
    ("train: tiny images", lambda c: ["train", "--image-size", "7", "--out", str(c["tmp"] / OUT), "--data-dir",
                                      c["data"]], 1, "at least 32 pixels"),
    ("train: unknown recipe", lambda c: ["train", "--recipe", "magic", "--out", str(c["tmp"] / OUT)], 2,
     "is not one of"),
    ("train: unknown model", lambda c: ["train", "--model", "resnet9000", "--out", str(c["tmp"] / OUT),
                                        "--data-dir", c["data"]], 1, "resnet9000"),
    ("train: negative learning rate", lambda c: ["train", "--learning-rate", "-1", "--out", str(c["tmp"] / OUT)], 2,
     "must be positive"),
    ("train: output exists", lambda c: ["train", "--out", str(c["model_dir"]), "--data-dir", c["data"]], 1,
     "exists; choose another or pass --overwrite"),
    ("train: no dataset", lambda c: ["train", "--out", str(c["tmp"] / OUT), "--data-dir", str(c["tmp"]),
                                     "--epochs", "1"], 1, "is not prepared"),
    ("train: no backbone weights", lambda c: ["train", "--recipe", "finetune", "--weights-dir", str(c["tmp"]),
                                              "--out", str(c["tmp"] / OUT), "--data-dir", c["data"], "--epochs", "1",
                                              "--image-size", str(SIZE)], 1, "ImageNet no-top weights"),
    ("train: truncated TFRecords", lambda c: ["train", "--out", str(c["tmp"] / OUT), "--data-dir", _truncated_data(c),
                                              "--epochs", "1", "--image-size", str(SIZE), "--batch-size", "4"], 1,
     "DataLossError: truncated record"),
    ("train: no permission to write", lambda c: ["train", "--out", _no_permission(c), "--data-dir", c["data"],
                                                 "--epochs", "1", "--image-size", str(SIZE), "--batch-size", "4"], 1,
     "check the permissions"),
    # evaluate
    ("evaluate: no such model", lambda c: ["evaluate", str(c["tmp"] / "nope"), "--data-dir", c["data"]], 1,
     "does not exist; pass a training output folder"),
    ("evaluate: damaged .keras", lambda c: ["evaluate", str(pathlib.Path(_run_with_damaged_keras(c)) / "model.keras"),
                                            "--data-dir", c["data"], "--out", str(c["tmp"] / OUT)], 1,
     "not a loadable Keras model"),
    ("evaluate: a text file as model", lambda c: ["evaluate", _file(c, "model.txt", b"x"), "--data-dir", c["data"]], 1,
     "unknown model format '.txt'"),
    ("evaluate: unknown split", lambda c: ["evaluate", str(c["exported"]), "--split", "holdout"], 2, "is not one of"),
    ("evaluate --folder: empty class", lambda c: ["evaluate", str(c["exported"] / "model_float32.onnx"), "--folder",
                                                  _class_folders(c, noncovid=0), "--out", str(c["tmp"] / OUT)], 1,
     "holds no image"),
    ("evaluate --folder: missing class", lambda c: ["evaluate", str(c["exported"] / "model_float32.onnx"), "--folder",
                                                    _class_folders(c, missing="NonCOVID"), "--out",
                                                    str(c["tmp"] / OUT)], 1, "has no NonCOVID/ folder"),
    ("evaluate --folder: unreadable image", lambda c: ["evaluate", str(c["exported"] / "model_float32.onnx"),
                                                       "--folder", _class_folders(c, bad=True), "--out",
                                                       str(c["tmp"] / OUT)], 1, "broken.png: not a readable image"),
    ("evaluate --folder: patients CSV without columns", lambda c: [
        "evaluate", str(c["exported"] / "model_float32.onnx"), "--folder", _class_folders(c), "--patients",
        _file(c, "p.csv", b"garbage\n1,2\n"), "--out", str(c["tmp"] / OUT)], 1, "cannot read columns file,patient_id"),
    ("evaluate: truncated TFRecords", lambda c: ["evaluate", str(c["exported"] / "model_float32.onnx"), "--data-dir",
                                                 _truncated_data(c), "--out", str(c["tmp"] / OUT)], 1,
     "rebuild the dataset"),
    # export
    ("export: no SavedModel", lambda c: ["export", str(c["tmp"]), "--out", str(c["tmp"] / OUT)], 1,
     "holds no SavedModel"),
    ("export: unknown format", lambda c: ["export", str(c["model_dir"]), "--out", str(c["tmp"] / OUT), "--formats",
                                          "tflite_int3"], 1, "unknown format(s) ['tflite_int3']"),
    ("export: output exists", lambda c: ["export", str(c["model_dir"]), "--out", str(c["exported"])], 1,
     "exists; choose another or pass --overwrite"),
    ("export: truncated variables", lambda c: ["export", _truncated_variables(c), "--out", str(c["tmp"] / OUT),
                                               "--data-dir", c["data"], "--formats", "tflite_float32"], 1,
     "cannot load the SavedModel"),
    ("export: config.json not JSON", lambda c: ["export", _run_copy(c, config="{oops"), "--out", str(c["tmp"] / OUT),
                                                "--data-dir", c["data"], "--formats", "tflite_float32"], 1,
     "config.json is not a covidct training config (JSONDecodeError"),
    ("export: config.json a list", lambda c: ["export", _run_copy(c, config="[1, 2]"), "--out", str(c["tmp"] / OUT),
                                              "--data-dir", c["data"], "--formats", "tflite_float32"], 1,
     "not a covidct training config (a JSON list)"),
    ("export: out under a file", lambda c: ["export", str(c["model_dir"]), "--out",
                                            str(pathlib.Path(_file(c, "a_file", b"x")) / OUT), "--data-dir",
                                            c["data"], "--formats", "tflite_float32"], 1,
     "a file stands where a folder should be"),
    # push
    ("push: empty manifest", lambda c: ["push", _edited_manifest(c, lambda m: ""), "--serving",
                                        str(c["tmp"] / OUT), "--data-dir", c["data"], "--force"], 1,
     "manifest.json is not a covidct manifest (JSONDecodeError"),
    ("push: manifest a list", lambda c: ["push", _edited_manifest(c, lambda m: "[]"), "--serving",
                                         str(c["tmp"] / OUT), "--data-dir", c["data"]], 1, "(a JSON list, not an object)"),
    ("push: manifest without fields", lambda c: ["push", _edited_manifest(c, lambda m: "{}"), "--serving",
                                                 str(c["tmp"] / OUT), "--data-dir", c["data"]], 1, "(missing labels"),
    ("push: manifest from the future", lambda c: ["push", _edited_manifest(
        c, lambda m: json.dumps({**m, "schema_version": 99})), "--serving", str(c["tmp"] / OUT), "--data-dir",
        c["data"]], 1, "has schema version 99"),
    ("push: manifest threshold not a number", lambda c: ["push", _edited_manifest(
        c, lambda m: json.dumps({**m, "operating_threshold": {"value": "high"}})), "--serving", str(c["tmp"] / OUT),
        "--data-dir", c["data"]], 1, "are malformed"),
    ("push: manifest with zeroed hashes", lambda c: ["push", _edited_manifest(c, lambda m: json.dumps(
        {**m, "files": {k: {**v, "sha256": "0" * 64} for k, v in m["files"].items()}})), "--serving",
        str(c["tmp"] / OUT), "--data-dir", c["data"], "--force"], 1, "does not match its SHA-256"),
    ("push: damaged blessing.json", lambda c: ["push", str(c["exported"]), "--serving", _blessing(c, "{oops"),
                                               "--data-dir", c["data"], *G], 1,
     "blessing.json is not a covidct blessing record"),
    ("push: empty blessing.json", lambda c: ["push", str(c["exported"]), "--serving", _blessing(c, ""),
                                             "--data-dir", c["data"], *G], 1, "move version 1 out of"),
    ("push: blessing.json a number", lambda c: ["push", str(c["exported"]), "--serving", _blessing(c, "3"),
                                                "--data-dir", c["data"], *G], 1, "(a JSON int)"),
    ("push --list: blessing test figures a list", lambda c: ["push", "--list", "--serving",
                                                             _blessing(c, '{"blessed": true, "test": [0.9]}')], 1,
     "'test' is not a record of figures"),
    ("push --list: blessing ROC AUC a word", lambda c: ["push", "--list", "--serving",
                                                        _blessing(c, '{"test": {"roc_auc": "high"}}')], 1,
     "test roc_auc 'high' is not a number from 0 to 1"),
    ("push --list: blessed a string", lambda c: ["push", "--list", "--serving", _blessing(c, '{"blessed": "yes"}')],
     1, "'blessed' is not true or false"),
    ("export: the output is its own input", lambda c: ["export", str(_copy(c["model_dir"], c["tmp"] / "run")),
                                                      "--out", str(c["tmp"] / "run"), "--overwrite"], 1,
     "is this command's input"),
    ("evaluate: the output holds the model", lambda c: ["evaluate", _lone(c), "--folder", _class_folders(c), "--out",
                                                        str(c["tmp"] / "lone"), "--overwrite"], 1,
     "holds this command's input"),
    ("qat: the output is the run", lambda c: ["qat", str(_copy(c["model_dir"], c["tmp"] / "run")), "--out",
                                              str(c["tmp"] / "run"), "--overwrite"], 1, "is this command's input"),
    ("evaluate: negative bootstrap", lambda c: ["evaluate", str(c["model_dir"]), "--bootstrap", "-5", "--out",
                                                str(c["tmp"] / OUT), "--data-dir", c["data"]], 2,
     "is not in the range x>=0"),
    ("evaluate --patients: a row without a comma", lambda c: ["evaluate", str(c["exported"] / "model_float32.onnx"),
                                                             "--folder", _class_folders(c), "--patients",
                                                             _patients(c, b"file,patient_id\nCOVID/0.png\n"),
                                                             "--out", str(c["tmp"] / OUT)], 1,
     "expected two columns, file,patient_id"),
    ("evaluate --patients: binary", lambda c: ["evaluate", str(c["exported"] / "model_float32.onnx"), "--folder",
                                               _class_folders(c), "--patients", _patients(c, bytes(range(256)) * 4),
                                               "--out", str(c["tmp"] / OUT)], 1, "give a text CSV"),
    ("data info: damaged dataset_info.json", lambda c: ["data", "info", "--data-dir", _damaged_info(c)], 1,
     "is damaged (its dataset_info.json"),
    ("serve: port out of range", lambda c: ["serve", str(c["tmp"]), "--http-port", "70000"], 2,
     "is not in the range"),
    ("serve: port in use", lambda c: ["serve", str(c["tmp"]), "--http-port", _busy_port(c)], 1,
     "is in use by another process"),
    ("predict: ONNX metadata threshold NaN", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                       _onnx_threshold(c, "nan"), "--json"], 1,
     "is not a probability strictly between 0 and 1"),
    ("predict: ONNX metadata threshold 5", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                     _onnx_threshold(c, "5"), "--json"], 1,
     "operating threshold 5.0 is not a probability"),
    ("predict: ONNX metadata threshold -1", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                      _onnx_threshold(c, "-1")], 1,
     "operating threshold -1.0 is not a probability"),
    # foreign ONNX models: refused at load with what they take and give, never a traceback or a made-up label
    *[(f"predict: foreign ONNX, {kind}", lambda c, kind=kind: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                               _foreign_onnx(c, kind), "--threshold", "0.5"], 1,
       "not a model covidct can run") for kind in FOREIGN_ONNX],
    *[(f"bulk-predict: foreign ONNX, {kind}", lambda c, kind=kind: [
        "bulk-predict", "--input", _png(c["tmp"] / "a.png"), "--model", _foreign_onnx(c, kind), "--threshold", "0.5", "--out",
        str(c["tmp"] / OUT)], 1, "not a model covidct can run") for kind in ("channels first", "int64 output")],
    # a manifest speaks for the copies it lists, no others; and it is what push checked
    ("predict: an unlisted model in an export subfolder", lambda c: [
        "predict", _png(c["tmp"] / "a.png"), "--model", _unlisted_in_export(c)], 1, "is not one of the copies"),
    *[(f"predict: recommendation {what}", lambda c, file=file: [
        "predict", _png(c["tmp"] / "a.png"), "--model", _recommending(c, file)], 1,
       "is not one of the copies it lists")
      for what, file in (("outside the version", "../../elsewhere/model.onnx"), ("an absolute path", "/tmp/m.onnx"),
                         ("a file the manifest does not list", "model_int8.onnx"))],
    *[(f"predict: a {name} whose metadata files were cut off", lambda c, name=name: [
        "predict", _png(c["tmp"] / "a.png"), "--model", _cut_tail(c, name)], 1, "associated files cannot be read")
      for name in ("model_float32.tflite", "model_float16.tflite")],
    ("push: an unlisted manifest.json inside saved_model", lambda c: [
        "push", _nested_manifest(c), "--serving", str(c["tmp"] / OUT), "--data-dir", c["data"]], 1,
     "does not list (saved_model/manifest.json)"),
    ("push: the manifest's threshold edited", lambda c: [
        "push", _edited_manifest(c, lambda m: json.dumps({**m, "operating_threshold": {
            **m["operating_threshold"], "value": 0.99}})), "--serving", str(c["tmp"] / OUT), "--data-dir",
        c["data"]], 1, "the manifest was edited"),
    ("push: the manifest's threshold nudged", lambda c: [
        "push", _edited_manifest(c, lambda m: json.dumps({**m, "operating_threshold": {
            **m["operating_threshold"], "value": m["operating_threshold"]["value"] + 1e-6}})), "--serving",
        str(c["tmp"] / OUT), "--data-dir", c["data"]], 1, "the manifest was edited"),
    # the same refusals on every path that runs a copy
    *[(f"evaluate: weights flipped in a lone {name[-5:]}", lambda c, name=name: [
        "evaluate", _lone_flipped(c, name), "--folder", _class_folders(c), "--out", str(c["tmp"] / OUT)], 1,
       "do not match the digest in its own metadata") for name in ("model_float32.onnx", "model_float32.tflite")],
    *[(f"evaluate: foreign ONNX, {kind}", lambda c, kind=kind: [
        "evaluate", _foreign_onnx(c, kind), "--folder", _class_folders(c), "--threshold", "0.5", "--out",
        str(c["tmp"] / OUT)], 1, "not a model covidct can run") for kind in ("channels first", "int64 output")],
    ("bulk-predict: weights flipped in a lone .tflite", lambda c: [
        "bulk-predict", "--input", _png(c["tmp"] / "a.png"), "--model", _lone_flipped(c, "model_float32.tflite"),
        "--out", str(c["tmp"] / OUT)], 1, "do not match the digest in its own metadata"),
    ("bulk-predict: foreign ONNX, symbolic height and width", lambda c: [
        "bulk-predict", "--input", _png(c["tmp"] / "a.png"), "--model",
        _foreign_onnx(c, "symbolic height and width"), "--threshold", "0.5", "--out", str(c["tmp"] / OUT)], 1,
     "not a model covidct can run"),
    ("bulk-predict: a .tflite whose metadata files were cut off", lambda c: [
        "bulk-predict", "--input", _png(c["tmp"] / "a.png"), "--model", _cut_tail(c, "model_float32.tflite"),
        "--out", str(c["tmp"] / OUT)], 1, "associated files cannot be read"),
    ("verify: weights flipped in a .tflite, vectors beside it", lambda c: [
        "verify", _flipped_with_vectors(c, "model_float32.tflite")], 1, "do not match the digest in its own metadata"),
    ("predict --json: weights flipped in a lone .onnx", lambda c: [
        "predict", _png(c["tmp"] / "a.png"), "--model", _lone_flipped(c, "model_float32.onnx"), "--json"], 1,
     "do not match the digest in its own metadata"),
    ("predict --strict: an unlisted model in an export subfolder", lambda c: [
        "predict", _png(c["tmp"] / "a.png"), "--model", _unlisted_in_export(c), "--strict"], 1,
     "is not one of the copies"),
    ("push: a manifest.json inside test_data", lambda c: [
        "push", _nested_manifest(c, "test_data"), "--serving", str(c["tmp"] / OUT), "--data-dir", c["data"]], 1,
     "does not list (test_data/manifest.json)"),
    ("predict --json: foreign ONNX, three channels", lambda c: [
        "predict", _png(c["tmp"] / "a.png"), "--model", _foreign_onnx(c, "three channels"), "--json"], 1,
     "not a model covidct can run"),
    ("push --list: damaged blessing.json", lambda c: ["push", "--list", "--serving", _blessing(c, "{oops")], 1,
     "is not a covidct blessing record"),
    ("push: floor above 1", lambda c: ["push", str(c["exported"]), "--serving", str(c["tmp"] / OUT),
                                       "--min-roc-auc", "1.5"], 1, "must be a number from 0 to 1"),
    ("push: no export", lambda c: ["push", "--serving", str(c["tmp"] / OUT)], 2, "EXPORT_DIR is required"),
    ("push: a training folder", lambda c: ["push", str(c["model_dir"]), "--serving", str(c["tmp"] / OUT)], 1,
     "has no manifest.json; pass a folder written by `covidct export`"),
    # predict
    ("predict: a folder as image", lambda c: ["predict", str(c["tmp"]), "--model", str(c["exported"])], 1,
     "no such file"),
    ("predict: empty file", lambda c: ["predict", _file(c, "e.png", b""), "--model", str(c["exported"])], 1,
     "not a readable image"),
    ("predict: truncated PNG", lambda c: ["predict", _file(c, "t.png", pathlib.Path(_png(c["tmp"] / "ok.png"))
                                                        .read_bytes()[:200]), "--model", str(c["exported"])], 1,
     "not a readable image"),
    ("predict: no such model", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                          str(c["tmp"] / "m.onnx")], 1, "does not exist"),
    ("predict: random bytes as .onnx", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                  _file(c, "r.onnx", os.urandom(2000))], 1, "not a loadable ONNX model"),
    ("predict: random bytes as .tflite", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                    _file(c, "r.tflite", os.urandom(2000))], 1,
     "not a loadable TFLite model"),
    ("predict: empty .tflite", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model", _file(c, "e.tflite", b"")],
     1, "not a loadable TFLite model"),
    ("predict: unknown model format", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                 _file(c, "m.pt", b"x")], 1, "unknown model format '.pt'"),
    ("predict: bytes flipped in an exported .tflite", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                                 _flipped(c, "model_float32.tflite")], 1,
     "does not match the SHA-256 that"),
    ("predict: bytes flipped in an exported .onnx", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                               _flipped(c, "model_float32.onnx"), "--threshold",
                                                               "0.5"], 1, "does not match the SHA-256 that"),
    # a copy that travels alone carries a digest of its own weights: flipped weights are refused everywhere
    ("predict: weights flipped in a lone .onnx", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                            _lone_flipped(c, "model_float32.onnx")], 1,
     "do not match the digest in its own metadata"),
    ("predict: weights flipped in a lone .tflite", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                              _lone_flipped(c, "model_float32.tflite")], 1,
     "do not match the digest in its own metadata"),
    ("predict: sign bits flipped in a lone float16 .tflite", lambda c: [
        "predict", _png(c["tmp"] / "a.png"), "--model", _lone_flipped(c, "model_float16.tflite", sign=True)], 1,
     "do not match the digest in its own metadata"),
    ("bulk-predict: weights flipped in a lone .onnx", lambda c: [
        "bulk-predict", "--input", _png(c["tmp"] / "a.png"), "--model", _lone_flipped(c, "model_float32.onnx"),
        "--out", str(c["tmp"] / OUT)], 1, "do not match the digest in its own metadata"),
    ("verify: weights flipped, vectors beside it", lambda c: ["verify", _flipped_with_vectors(c)], 1,
     "do not match the digest in its own metadata"),
    ("predict: damaged manifest beside the model", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                              _edited_manifest(c, lambda m: "{")], 1,
     "is not a covidct manifest"),
    ("predict: damaged guard.json", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model", _damaged_guard(c)], 1,
     "does not match the SHA-256 that its manifest records"),
    ("predict: damaged guard.json, no manifest", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model",
                                                            _damaged_guard(c, manifest=False), "--threshold", "0.5"],
     1, "not a covidct input guard"),
    ("predict --strict: a blank image", lambda c: ["predict", _png(c["tmp"] / "blank.png", value=0), "--model",
                                                   str(c["exported"]), "--strict"], 1, "refused (--strict)"),
    ("predict: threshold 1", lambda c: ["predict", _png(c["tmp"] / "a.png"), "--model", str(c["exported"]),
                                        "--threshold", "1"], 1, "strictly between 0 and 1"),
    # verify
    ("verify: a lone copy without vectors", lambda c: ["verify", _lone(c)], 1, "no test vectors"),
    ("verify: junk vectors", lambda c: ["verify", _junk_vectors(c)], 1, "are damaged"),
    # each kind of damage to a vector file is one line naming it, never a traceback nor a pass (issue 32)
    ("verify: truncated .npz", lambda c: ["verify", _npz_vectors(c, truncate=True)], 1, "are damaged"),
    ("verify: vectors with no image", lambda c: ["verify", _npz_vectors(c, n=0)], 1, "hold no image"),
    ("verify: 8 images, 3 answers", lambda c: ["verify", _npz_vectors(c, answers=3)], 1, "need 8 probabilities"),
    ("verify: an array as tolerance", lambda c: ["verify", _npz_vectors(c, tolerance=[0.1, 0.2])], 1,
     "must be one number"),
    ("verify: an infinite tolerance", lambda c: ["verify", _npz_vectors(c, tolerance=float("inf"))], 1,
     "must be one number from 0 to 0.1"),
    ("verify: a negative tolerance", lambda c: ["verify", _npz_vectors(c, tolerance=-1.0)], 1, "must be one number"),
    ("verify: float images", lambda c: ["verify", _npz_vectors(c, dtype="float32")], 1, "not uint8"),
    ("verify: probabilities out of range", lambda c: ["verify", _npz_vectors(c, scale=5.0)], 1, "in [0, 1]"),
    ("verify: random bytes as input_0.pb", lambda c: ["verify", _onnx_vectors(c, "input_0.pb", os.urandom(300))], 1,
     "are damaged"),
    ("verify: tolerance.json a list", lambda c: ["verify", _onnx_vectors(c, "../tolerance.json", b"[1, 2]")], 1,
     "are damaged"),
    ("verify: tolerance.json null", lambda c: ["verify", _onnx_vectors(c, "../tolerance.json",
                                                                      b'{"max_abs_diff": null}')], 1,
     "must be one number"),
    ("verify: tolerance.json raised to 1e9", lambda c: ["verify", _onnx_vectors(c, "../tolerance.json",
                                                                               b'{"max_abs_diff": 1e9}')], 1,
     "must be one number from 0 to 0.1"),
    # bench
    ("bench: not an export", lambda c: ["bench", str(c["tmp"]), "--out", str(c["tmp"] / OUT)], 1,
     "has no manifest.json"),
    ("bench: damaged manifest", lambda c: ["bench", _edited_manifest(c, lambda m: "nope"), "--out",
                                           str(c["tmp"] / OUT)], 1, "is not a covidct manifest"),
    # bench times only what export checked: a copy changed, cut or gone since is refused, never timed or recommended
    *[(f"bench: {what} {name} in the export", lambda c, damage=damage, name=name: [
        "bench", damage(c, name), "--out", str(c["tmp"] / OUT)], 1, want)
      for what, damage, want in (
          ("a bit-flipped", lambda c, n: str(pathlib.Path(_flipped(c, n)).parent), "does not match the SHA-256 that"),
          ("a truncated", _truncated_in_export, "does not match the SHA-256 that"),
          ("no", _missing_in_export, "but missing"))
      for name in ("model_float32.onnx", "model_float16.tflite")],
    # compare
    ("compare: not a run", lambda c: ["compare", str(c["tmp"])], 1, "has no config.json"),
    ("compare: config.json a list", lambda c: ["compare", _run_copy(c, config="[]")], 1, "cannot read its config.json"),
    # cv
    ("cv: one fold", lambda c: ["cv", "--folds", "1", "--out", str(c["tmp"] / OUT), "--data-dir", c["data"]], 1,
     "cross-validation needs 2 <= k"),
    ("cv: more folds than patients", lambda c: ["cv", "--folds", "1000", "--out", str(c["tmp"] / OUT), "--data-dir",
                                                c["data"]], 1, "got k=1000"),
    # qat, ensemble
    ("qat: not a MobileNetV2", lambda c: ["qat", str(c["model_dir"]), "--out", str(c["tmp"] / OUT), "--data-dir",
                                          c["data"]], 1, "supports the MobileNetV2 models"),
    ("qat: damaged model.keras", lambda c: ["qat", _run_with_damaged_keras(c), "--out", str(c["tmp"] / OUT),
                                            "--data-dir", c["data"]], 1, "not a loadable Keras model"),
    ("ensemble: damaged member", lambda c: ["ensemble", str(c["model_dir"]), _run_with_damaged_keras(c), "--out",
                                            str(c["tmp"] / OUT)], 1, "not a loadable Keras model"),
    # pipeline
    ("pipeline: no manual dir", lambda c: ["pipeline", "--recipe", "finetune", "--manual-dir", str(c["tmp"] / "nope"),
                                           "--out", str(c["tmp"] / OUT), "--data-dir", str(c["tmp"] / "data")], 1,
     "does not exist; point it at"),
    ("pipeline: the model of record given COVID-CT alone", lambda c: [
        "pipeline", "--manual-dir", str(DUMMY_DATA), "--out", str(c["tmp"] / OUT), "--data-dir",
        str(c["tmp"] / "data")], 1, "cc_ccii needs its files"),
]


def _truncated_variables(ctx):
  run = _copy(ctx["model_dir"], ctx["tmp"] / "run")
  for f in (run / "saved_model" / "variables").glob("*.data*"):
    f.write_bytes(f.read_bytes()[:100])
  return str(run)


def _run_copy(ctx, config: str):
  run = _copy(ctx["model_dir"], ctx["tmp"] / "run")
  (run / "config.json").write_text(config)
  return str(run)


def _damaged_guard(ctx, manifest=True):
  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  (copy / "guard.json").write_text("{")
  if not manifest:
    (copy / "manifest.json").unlink()
  return str(copy / "model_float32.onnx")


def _lone(ctx):
  (ctx["tmp"] / "lone").mkdir()
  return str(shutil.copy(ctx["exported"] / "model_float32.tflite", ctx["tmp"] / "lone"))


def _junk_vectors(ctx):
  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  for f in (copy / "test_data").rglob("*.npz"):
    f.write_bytes(b"junk")
  return str(copy / "model_float32.tflite")


def _npz_vectors(ctx, truncate=False, n=None, answers=None, tolerance=None, dtype=None, scale=None):
  import numpy as np

  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  path = copy / "test_data" / "model_float32.npz"
  if truncate:
    path.write_bytes(path.read_bytes()[:-200])
    return str(copy / "model_float32.tflite")
  with np.load(path) as z:
    arrays = dict(z)
  images, probs = arrays["image"], arrays["covid_probability"]
  if n is not None:
    images, probs = images[:n], probs[:n]
  if answers is not None:
    images, probs = np.concatenate([images] * (8 // len(images) + 1))[:8], probs[:answers]
  arrays.update(image=images.astype(dtype) if dtype else images, covid_probability=probs * (scale or 1))
  if tolerance is not None:
    arrays["tolerance"] = np.asarray(tolerance)
  np.savez(path, **arrays)
  return str(copy / "model_float32.tflite")


def _onnx_vectors(ctx, name, content: bytes):
  copy = _copy(ctx["exported"], ctx["tmp"] / "export")
  (copy / "test_data" / "model_float32" / "test_data_set_0" / name).write_bytes(content)
  return str(copy / "model_float32.onnx")


def _foreign_onnx(ctx, kind):
  """A loadable ONNX model with `kind`'s signature: the mean of its input, as the output type."""
  import onnx
  from onnx import TensorProto, helper

  in_type, shape, out_type = FOREIGN_ONNX[kind]
  nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
           helper.make_node("ReduceMean", ["xf", "axes"], ["m"], keepdims=0),
           helper.make_node("Unsqueeze", ["m", "one"], ["m1"]),
           helper.make_node("Cast", ["m1"], ["y"], to=getattr(TensorProto, out_type))]
  graph = helper.make_graph(
      nodes, "foreign", [helper.make_tensor_value_info("x", getattr(TensorProto, in_type), shape)],
      [helper.make_tensor_value_info("y", getattr(TensorProto, out_type), ["N", 1])],
      initializer=[helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
                   helper.make_tensor("one", TensorProto.INT64, [1], [1])])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  model.ir_version = 8
  path = ctx["tmp"] / f"foreign_{kind.replace(' ', '_')}.onnx"
  onnx.save(model, path)
  return str(path)


def test_the_suite_is_large_enough():
  assert len(CASES) >= 150 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, code, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(argv, code, message, exported, model_dir, dummy_data_dir, tmp_path):
  ctx = {"tmp": tmp_path, "exported": exported, "model_dir": model_dir, "data": str(dummy_data_dir)}
  before = sorted(p.name for p in exported.iterdir())
  res = CliRunner().invoke(main, argv(ctx))
  assert res.exit_code == code, res.output
  assert "Traceback" not in res.output and not (res.exception and not isinstance(res.exception, SystemExit)), \
      repr(res.exception)
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("Error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], res.stderr  # one error line, and the last word
  assert message in errors[0], errors[0]
  assert not (tmp_path / OUT).exists()
  left = [str(p) for p in tmp_path.rglob("*") if ".partial" in p.name or p.name.startswith("incomplete.")]
  assert not left, left
  assert sorted(p.name for p in exported.iterdir()) == before  # the shared export is never touched
