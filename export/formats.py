"""One function per export format: each writes its file (temporary name, then rename) and returns an ExportResult."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

from covidct.fsutil import sha256
from export.errors import ExportError, UnknownFormatError, UnsupportedOpError

# Format name -> (file name, float tolerance on the probability, or None where rounding makes the value a report
# only and the copy is judged by its metrics: ROC AUC and decision agreement, export.parity).
# float32: 1e-4. Other kernels summing in another order give up to 1.6e-5 on the fine-tuned MobileNetV2s (4e-7 on
# the `final` CNN) with identical decisions; an export that computes something else is off by orders of magnitude
# more (the shifted bias in tests/test_export.py: over 1e-3). float16 weights round every weight to 11 significant
# bits: on the fine-tuned MobileNetV2s that moved probabilities by up to 2.5e-2 to 3.5e-2 with 99-100% of decisions
# unchanged, so float16 is judged like the quantized copies and its max difference is reported.
FORMATS = {
    "tflite_float32": ("model_float32.tflite", 1e-4),
    "tflite_float16": ("model_float16.tflite", None),
    "tflite_dynamic": ("model_dynamic_int8.tflite", None),
    "tflite_int8": ("model_int8.tflite", None),
    "onnx_float32": ("model_float32.onnx", 1e-4),
    "onnx_int8": ("model_int8.onnx", None),
}
QUANTIZED = {"tflite_dynamic", "tflite_int8", "onnx_int8"}
ONNX_OPSET = 18


@dataclasses.dataclass(frozen=True)
class ExportResult:
  format: str
  path: str
  size_bytes: int
  sha256: str
  seconds: float
  details: dict = dataclasses.field(default_factory=dict)


def parse_formats(spec: str | list[str]) -> list[str]:
  names = spec.split(",") if isinstance(spec, str) else list(spec)
  names = [n.strip() for n in names if n.strip()]
  if names == ["all"]:
    return list(FORMATS)
  unknown = [n for n in names if n not in FORMATS]
  if unknown or not names:
    raise UnknownFormatError(f"unknown format(s) {unknown or names}; choose from {', '.join(FORMATS)} or 'all'.")
  return names


def _finish(fmt, tmp: pathlib.Path, final: pathlib.Path, start: float, **details) -> ExportResult:
  os.replace(tmp, final)
  return ExportResult(fmt, str(final), final.stat().st_size, sha256(final), time.time() - start, details)


def _tmp_for(final: pathlib.Path) -> pathlib.Path:
  return final.with_name(f".{final.name}.partial-{os.getpid()}")


def tflite_ops(path) -> list[str]:
  """The op names a .tflite model uses (from LiteRT's own op details)."""
  from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel

  interp = litert.Interpreter(model_path=str(path))
  return sorted({op["op_name"] for op in interp._get_ops_details()})  # pylint: disable=protected-access


def export_tflite(saved_model_dir, out_path, mode: str = "float32", representative: np.ndarray | None = None
                  ) -> ExportResult:
  """TFLite from the SavedModel's serving signature: float32, float16, dynamic (int8 weights) or int8 (full integer:
  uint8 image in, uint8 probability out, calibrated on `representative` images). Builtin ops only."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  fmt = f"tflite_{mode}"
  if fmt not in FORMATS:
    raise UnknownFormatError(f"unknown TFLite mode {mode!r}; choose float32, float16, dynamic or int8.")
  start = time.time()
  converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=["serving_default"])
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if mode in ("float16", "dynamic", "int8"):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if mode == "float16":
    converter.target_spec.supported_types = [tf.float16]
  if mode == "int8":
    if representative is None or len(representative) == 0:
      raise ExportError("full-integer TFLite needs representative images (from the train split) for calibration.")
    reps = np.asarray(representative, np.uint8)
    converter.representative_dataset = lambda: ([reps[i:i + 1]] for i in range(len(reps)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
  try:
    flat = converter.convert()
  except Exception as e:  # the converter raises ConverterError and others
    raise ExportError(f"TFLite {mode} conversion of {saved_model_dir} failed: {str(e).splitlines()[0][:300]}") from e
  regridded = 0
  if mode != "float32":
    flat, regridded = tflite_weights_to_7bit_grid(flat)
  final = pathlib.Path(out_path)
  tmp = _tmp_for(final)
  tmp.write_bytes(flat)
  ops = tflite_ops(tmp)
  flex = [op for op in ops if op.lower().startswith("flex") or op == "CUSTOM"]
  if flex:
    tmp.unlink()
    raise UnsupportedOpError(f"TFLite {mode} model needs non-builtin ops {flex}; only builtin ops are allowed.")
  return _finish(fmt, tmp, final, start, ops=ops, **({"weights_on_7bit_grid": regridded} if regridded else {}))


def tflite_weights_to_7bit_grid(flat: bytes) -> tuple[bytes, int]:
  """Puts a quantized TFLite model's int8 weights back on the 7-bit grid a `covidct qat` model was trained on;
  returns (the model, how many weight tensors), or (`flat` unchanged, 0) when they are not on it.

  The TFLite converter quantizes weights per channel at max|w| / 127, so a weight k * max|w| / 63 (|k| <= 63) is
  stored as round(k * 127 / 63): up to half an 8-bit step off the trained value (22-25 output steps measured), and
  back in the range whose products saturate 16-bit pair sums on CPUs without VNNI (OpenVINO's AVX2 kernels then
  failed parity). Each k is recovered exactly (k = round(q * 63 / 127), as k * 127 / 63 is never within 0.25 of a
  half) and stored with scale max|w| / 63; the int32 bias, in units of input scale x weight scale, is rescaled to
  match (rounded to its new unit, far below one output step). Applied only when every channel of every conv,
  depthwise and fully connected weight maps back this way, which 8-bit weights do not (each value does with
  probability about 1/2).
  """
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=import-outside-toplevel
  from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=import-outside-toplevel

  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flat))
  kinds = (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D,
           schema.BuiltinOperator.FULLY_CONNECTED)
  pairs, seen = [], set()
  for graph in model.subgraphs:
    for op in graph.operators:
      code = model.operatorCodes[op.opcodeIndex]
      if max(code.builtinCode, code.deprecatedBuiltinCode) not in kinds or len(op.inputs) < 2:
        continue
      w = graph.tensors[op.inputs[1]]
      if w.buffer in seen:  # a weight shared by two operators is rescaled once
        continue
      seen.add(w.buffer)
      data = model.buffers[w.buffer].data if w.buffer < len(model.buffers) else None
      if w.type != schema.TensorType.INT8 or w.quantization is None or w.quantization.scale is None or data is None:
        return flat, 0  # a float or dynamically quantized weight: not a quantization-aware int8 model
      q = np.asarray(data, np.uint8).view(np.int8).astype(np.int64)
      k = np.round(q * 63 / 127)
      if not np.array_equal(np.round(k * 127 / 63), q):
        return flat, 0
      # Per channel: 127/63, or 1 for a channel whose weights are all zero (a dead channel keeps its scale, which
      # the converter makes tiny, and its bias, which that tiny unit may have clipped to the int32 limit).
      channels = len(w.quantization.scale)
      per_channel = np.moveaxis(q.reshape(w.shape), w.quantization.quantizedDimension, 0).reshape(channels, -1) \
          if channels > 1 else q.reshape(1, -1)
      factor = np.where(np.any(per_channel != 0, axis=1), 127.0 / 63.0, 1.0)
      b = graph.tensors[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
      if b is not None and (b.type != schema.TensorType.INT32 or b.quantization is None
                            or b.quantization.scale is None or model.buffers[b.buffer].data is None
                            or len(b.quantization.scale) not in (1, channels)
                            or (len(b.quantization.scale) == 1 and len(set(factor)) > 1)):
        return flat, 0  # a bias laid out otherwise: leave the model as the converter wrote it
      pairs.append((w, k, b, factor))
  if not pairs:
    return flat, 0
  for w, k, b, factor in pairs:
    model.buffers[w.buffer].data = k.astype(np.int8).view(np.uint8)
    w.quantization.scale = [float(v) * f for v, f in zip(w.quantization.scale, factor)]
    if b is not None:  # factor has one value per channel, or one for all (checked above)
      bias = np.asarray(model.buffers[b.buffer].data, np.uint8).view(np.int32).astype(np.float64)
      model.buffers[b.buffer].data = np.round(bias / factor).astype(np.int32).view(np.uint8)
      b.quantization.scale = [float(v) * f for v, f in zip(b.quantization.scale, factor)]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), len(pairs)


def export_onnx(saved_model_dir, out_path, opset: int = ONNX_OPSET) -> ExportResult:
  """ONNX float32 from the SavedModel with tf2onnx (dynamic batch, input `image`, output `covid_probability`)."""
  import onnx  # pylint: disable=import-outside-toplevel

  if opset > ONNX_OPSET:
    raise ExportError(f"opset {opset} is above {ONNX_OPSET}, the highest tf2onnx handles here.")
  start = time.time()
  final = pathlib.Path(out_path)
  tmp = _tmp_for(final)
  cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model_dir), "--signature_def",
         "serving_default", "--opset", str(opset), "--output", str(tmp)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if res.returncode != 0 or not tmp.exists():
    tmp.unlink(missing_ok=True)
    last = [l for l in res.stderr.splitlines() if "Error" in l][-1:] or res.stderr.splitlines()[-1:]
    raise ExportError(f"tf2onnx could not convert {saved_model_dir}: {' '.join(last)[:300]}")
  model = onnx.load(str(tmp))
  quantized = has_qdq(model)
  if quantized:  # a quantization-aware model: its weights go on their int8 grid too (see weights_to_qdq)
    weights_to_qdq(model)
  flattened = flatten_input_elementwise(model)
  gray_first = gray_to_rgb_channels_first(model)
  for value in list(model.graph.input) + list(model.graph.output):  # a readable name for the dynamic batch axis
    dim = value.type.tensor_type.shape.dim[0]
    if not dim.HasField("dim_value"):
      dim.dim_param = "batch"
  try:
    onnx.checker.check_model(model)
  except onnx.checker.ValidationError as e:
    tmp.unlink(missing_ok=True)
    raise ExportError(f"the ONNX model from {saved_model_dir} fails onnx.checker: {str(e).splitlines()[0]}") from e
  onnx.save(model, str(tmp))
  return _finish("onnx_float32", tmp, final, start, opset=opset, quantization_aware=quantized,
                 preprocessing_flattened=flattened, gray_to_rgb_channels_first=gray_first,
                 inputs=[i.name for i in model.graph.input], outputs=[o.name for o in model.graph.output])


ELEMENTWISE = {"Cast", "Mul", "Add", "Sub", "Div", "QuantizeLinear", "DequantizeLinear", "Clip", "Relu"}


def flatten_input_elementwise(model) -> int:
  """Runs the elementwise preprocessing at the graph's input on a flat (N, S*S) view; returns the nodes it covers.

  ONNX Runtime (1.32) ran a Mul or Add by a scalar on an (N, S, S, 1) tensor 37x slower than on the same values as
  (N, S*S): 0.73 against 0.019 ms at 224 px on one core, its broadcasting stepping through the innermost dimension
  of size 1 one element at a time. The model's preprocessing (the cast, the rescale to [-1, 1], a quantization-aware
  model's 8-bit input rounding) is such a chain: 3.3 of a MobileNetV2 0.5's 7.3 ms. A Reshape after the input and
  one back before the first node that is not elementwise with scalar constants make it flat. Exact: the same ops on
  the same values in the same order.
  """
  from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel

  graph = model.graph
  shape = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
  if len(shape) != 4 or not all(shape[1:]) or shape[3] != 1:
    return 0
  scalars = {i.name for i in graph.initializer if int(np.prod(i.dims)) == 1}
  source = graph.input[0].name
  region, tensors, changed = [], {source}, True
  while changed:
    changed = False
    for node in graph.node:
      if node in region or node.op_type not in ELEMENTWISE:
        continue
      ins = [i for i in node.input if i]
      if any(i in tensors for i in ins) and all(i in tensors or i in scalars for i in ins):
        region.append(node)
        tensors.update(node.output)
        changed = True
  if not region:
    return 0
  inside = {id(n) for n in region}
  outside_uses = {i for n in graph.node if id(n) not in inside for i in n.input} | {o.name for o in graph.output}
  flat = {t: f"{t}__flat" for t in tensors}
  for node in region:
    node.input[:] = [flat.get(i, i) for i in node.input]
    node.output[:] = [flat[o] for o in node.output]
  size = shape[1] * shape[2]
  graph.initializer.extend([numpy_helper.from_array(np.array([-1, size], np.int64), "flatten__shape"),
                            numpy_helper.from_array(np.array([-1, *shape[1:]], np.int64), "unflatten__shape")])
  first = [helper.make_node("Reshape", [source, "flatten__shape"], [flat[source]], name="flatten_input")]
  back = [helper.make_node("Reshape", [flat[t], "unflatten__shape"], [t], name=f"unflatten_{i}")
          for i, t in enumerate(sorted(t for t in tensors if t in outside_uses and t != source))]
  nodes = first + region + back + [n for n in graph.node if id(n) not in inside]
  del graph.node[:]
  graph.node.extend(nodes)
  return len(region)


def gray_to_rgb_channels_first(model) -> bool:
  """Copies the gray channel to RGB on a channels-first view; returns whether the graph had the pattern.

  tf2onnx writes the model's gray-to-RGB step as Concat(x, x, x) on the last axis of (N, S, S, 1), then a Transpose
  to (N, 3, S, S) for the first convolution. OpenVINO (2026.4) runs that Concat with its reference kernel, and
  the dequantization it moves behind it on an interleaved 3-channel layout: 1.5 + 0.8 of a quantization-aware
  MobileNetV2 0.5's 4.7 ms at 224 px on one core, more than all its convolutions together. A Reshape of x to
  (N, 1, S, S) (the same bytes, as the moved axis has size 1) and the Concat on axis 1 give the Transpose's output
  directly: the same values, copied rather than computed, so exact.
  """
  from onnx import helper, numpy_helper, shape_inference  # pylint: disable=import-outside-toplevel

  graph = model.graph

  def dims(value):
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]

  shapes = {v.name: dims(v) for v in [*shape_inference.infer_shapes(model).graph.value_info, *graph.input]}
  for concat in graph.node:
    ins = list(concat.input)
    axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
    shape = shapes.get(ins[0] if ins else "", [])
    if (concat.op_type != "Concat" or len(ins) != 3 or len(set(ins)) != 1 or len(shape) != 4 or shape[3] != 1
        or axis not in (3, -1) or min(shape[1:3]) <= 0):
      continue
    users = [n for n in graph.node if concat.output[0] in n.input]
    if concat.output[0] in {o.name for o in graph.output} or len(users) != 1 or users[0].op_type != "Transpose" \
        or [list(a.ints) for a in users[0].attribute if a.name == "perm"] != [[0, 3, 1, 2]]:
      continue
    transpose = users[0]
    name = f"{concat.output[0]}__channels_first"
    graph.initializer.append(numpy_helper.from_array(np.array([-1, 1, shape[1], shape[2]], np.int64), f"{name}_shape"))
    reshape = helper.make_node("Reshape", [ins[0], f"{name}_shape"], [name], name=f"{name}_reshape")
    concat.input[:] = [name] * 3
    for a in concat.attribute:
      if a.name == "axis":
        a.i = 1
    concat.output[:] = [transpose.output[0]]
    nodes = [m for n in graph.node if n is not transpose for m in ((reshape, n) if n is concat else (n,))]
    del graph.node[:]
    graph.node.extend(nodes)
    return True
  return False


def has_qdq(model) -> bool:
  """Whether an ONNX graph already holds QuantizeLinear nodes (tf2onnx's form of a quantization-aware model's
  fake-quant ops)."""
  return any(node.op_type == "QuantizeLinear" for node in model.graph.node)


def weight_levels(w: np.ndarray, axis: int) -> int:
  """63 when every output channel of `w` lies on a symmetric 7-bit grid (max|w| / 63 steps: a `covidct qat` model's
  default, see covidct.config.QAT_WEIGHT_BITS), else 127 (8 bits)."""
  other = tuple(i for i in range(w.ndim) if i != axis)
  m = np.abs(w).max(axis=other, keepdims=True)
  steps = w / np.where(m > 0, m, 1.0) * 63
  return 63 if np.abs(steps - np.round(steps)).max() < 1e-3 else 127


def weights_to_qdq(model) -> int:
  """Stores each Conv/MatMul/Gemm float weight as int8 per output channel (symmetric, max|w| / 127, or / 63 for
  weights on a 7-bit grid: weight_levels) behind a DequantizeLinear, in place; returns how many. For a
  quantization-aware model, whose baked weights already lie on that grid, this is exact. Without it, onnxruntime's WeightBiasQuantization pass quantizes the float weights
  between quantized activations itself, per tensor, which wrecks depthwise convolutions (measured: decisions agreed
  on 67% of test scans instead of 99%)."""
  from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel

  graph = model.graph
  inits = {i.name: i for i in graph.initializer}
  added, done = [], 0
  for node in graph.node:
    if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
      continue
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    axis = 0 if node.op_type == "Conv" or trans_b else 1  # the output-channel axis of the weight
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    levels = weight_levels(w, axis)
    scale = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis)) / float(levels)
    scale[scale == 0] = 1.0
    q = np.clip(np.round(w / scale.reshape(shape)), -levels, levels).astype(np.int8)
    name = node.input[1]
    graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                              numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
                              numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}_zero_point")])
    added.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                                  [f"{name}_dequantized"], axis=axis, name=f"{name}_DequantizeLinear"))
    node.input[1] = f"{name}_dequantized"
    done += 1
  used = {i for n in graph.node for i in n.input} | {i for n in added for i in n.input}
  keep = [i for i in graph.initializer if i.name in used]
  del graph.initializer[:]
  graph.initializer.extend(keep)
  nodes = added + list(graph.node)
  del graph.node[:]
  graph.node.extend(nodes)
  return done


def export_onnx_int8(onnx_float_path, out_path, representative: np.ndarray) -> ExportResult:
  """ONNX int8 by onnxruntime's static quantization (QDQ, int8 weights and activations), calibrated on
  `representative` images (the train split)."""
  import onnx  # pylint: disable=import-outside-toplevel
  from onnxruntime import quantization as q  # pylint: disable=import-outside-toplevel

  start = time.time()
  final = pathlib.Path(out_path)
  tmp = _tmp_for(final)
  pre = final.with_name(f".{final.stem}.pre-{os.getpid()}.onnx")
  float_model = onnx.load(str(onnx_float_path))
  if has_qdq(float_model):  # quantization-aware: already int8 (QDQ) from its own ranges; quantizing again adds error
    shutil.copyfile(onnx_float_path, tmp)
    return _finish("onnx_int8", tmp, final, start, quant_format="QDQ (from quantization-aware training)",
                   calibration_images=0)
  input_name = float_model.graph.input[0].name
  reps = np.asarray(representative, np.uint8)

  class Reader(q.CalibrationDataReader):

    def __init__(self):
      self._it = iter(reps[i:i + 1] for i in range(len(reps)))

    def get_next(self):
      batch = next(self._it, None)
      return None if batch is None else {input_name: batch}

  try:
    q.quant_pre_process(str(onnx_float_path), str(pre), skip_symbolic_shape=True)
    q.quantize_static(str(pre), str(tmp), Reader(), quant_format=q.QuantFormat.QDQ,
                      activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8, per_channel=True,
                      calibrate_method=q.CalibrationMethod.MinMax)
    onnx.checker.check_model(str(tmp))
  except Exception as e:
    tmp.unlink(missing_ok=True)
    raise ExportError(f"ONNX int8 quantization of {onnx_float_path} failed: {str(e).splitlines()[0][:300]}") from e
  finally:
    pre.unlink(missing_ok=True)
  return _finish("onnx_int8", tmp, final, start, quant_format="QDQ", calibration_images=len(reps))


def export_format(fmt: str, saved_model_dir, out_dir, representative=None, onnx_float_path=None) -> ExportResult:
  """Dispatches one format name to its export function; files are named by FORMATS."""
  out = pathlib.Path(out_dir) / FORMATS[fmt][0]
  if fmt.startswith("tflite_"):
    return export_tflite(saved_model_dir, out, fmt.split("_", 1)[1], representative)
  if fmt == "onnx_float32":
    return export_onnx(saved_model_dir, out)
  if fmt == "onnx_int8":
    if onnx_float_path is None:
      raise ExportError("onnx_int8 quantizes the float32 ONNX model: export onnx_float32 first.")
    return export_onnx_int8(onnx_float_path, out, representative)
  raise UnknownFormatError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}.")
