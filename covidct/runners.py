"""One runner interface, `images (N, S, S, 1) uint8 -> P(COVID) (N,)`, over every artifact we make.

Evaluation, parity, predict and the benchmarks all score models through these, so there is one place that knows
how to feed each runtime.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import numpy as np

from covidct.errors import CovidctError
from covidct.models import INPUT_NAME, OUTPUT_NAME


class Runner:
  """Base: subclasses set `kind`, `input_name`, `output_name`, `image_size`, `input_dtype` and implement `_run`."""

  kind = "?"
  input_name = INPUT_NAME
  output_name = OUTPUT_NAME
  input_dtype = np.uint8
  image_size: int

  def __call__(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 1):
      raise CovidctError(f"{self.kind}: expected images of shape (N, {self.image_size}, {self.image_size}, 1), "
                         f"got {images.shape}; resize with covidct.data.resize_image first.")
    images = images.astype(np.uint8, copy=False)
    out = [self._checked(self._run(images[i:i + batch_size]), len(images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def _checked(self, output, n: int) -> np.ndarray:
    """The model's output as n probabilities, or a CovidctError naming the model: a damaged or foreign model must
    never turn into labels."""
    what = f"{self.kind} model {getattr(self, 'path', '')}".rstrip()
    try:
      p = np.asarray(output, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
      raise CovidctError(f"{what} returned something that is not numbers; it is not a covidct model.") from None
    if p.shape != (n,):
      raise CovidctError(f"{what} returned {p.size} values for {n} images; expected one probability per image "
                         "(output 'covid_probability', shape (N, 1)).")
    if not np.all(np.isfinite(p)):
      raise CovidctError(f"{what} returned {int(np.sum(~np.isfinite(p)))} non-finite values (NaN or inf) for {n} "
                         "images; the file is damaged: export it again.")
    if p.min() < 0 or p.max() > 1:
      raise CovidctError(f"{what} returned values outside [0, 1] ({p.min():.4g} to {p.max():.4g}); it does not "
                         "output P(COVID): it is not a covidct model, or it is damaged.")
    return p

  def raw(self, batch: np.ndarray):
    """The runtime's own output for one prepared uint8 batch, unchecked and unconverted: what a benchmark times."""
    return self._run(batch)

  def _run(self, batch: np.ndarray) -> np.ndarray:
    raise NotImplementedError


class SavedModelRunner(Runner):
  """The SavedModel's `serving_default` signature (uint8 `image` -> `covid_probability`)."""

  kind = "saved_model"

  def __init__(self, path):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    path = pathlib.Path(path)
    if not (path / "saved_model.pb").exists():
      raise CovidctError(f"{path} is not a SavedModel (no saved_model.pb); pass a training output folder or its "
                         "saved_model/ folder.")
    try:
      self.model = tf.saved_model.load(str(path))
    except Exception as e:  # TF raises many types for a damaged SavedModel
      raise CovidctError(f"{path}: cannot load the SavedModel ({type(e).__name__}); it is damaged or truncated: "
                         "export it again.") from e
    sig = self.model.signatures.get("serving_default")
    if sig is None:
      raise CovidctError(f"{path}: no 'serving_default' signature; export the model with covidct train.")
    inputs = sig.structured_input_signature[1]
    if INPUT_NAME not in inputs or OUTPUT_NAME not in sig.structured_outputs:
      raise CovidctError(f"{path}: serving_default takes {sorted(inputs)} and returns {sorted(sig.structured_outputs)}; "
                         f"expected input '{INPUT_NAME}' and output '{OUTPUT_NAME}'.")
    spec = inputs[INPUT_NAME]
    if spec.dtype != tf.uint8 or spec.shape.rank != 4 or spec.shape[1] != spec.shape[2] or spec.shape[3] != 1:
      raise CovidctError(f"{path}: input '{INPUT_NAME}' is {spec}; expected uint8 (None, S, S, 1).")
    self.image_size = int(spec.shape[1])
    self.signature = sig
    self.path = path

  def _run(self, batch):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    return self.signature(**{INPUT_NAME: tf.constant(batch)})[OUTPUT_NAME].numpy()


class KerasRunner(Runner):
  """A Keras model (float32 [0, 255] input), called directly: what users do without exporting."""

  kind = "keras"

  def __init__(self, model_or_path):
    from covidct.modelio import load_keras  # pylint: disable=import-outside-toplevel

    self.model = load_keras(model_or_path, remedy="export or train the model again") \
        if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    self.image_size = int(self.model.input_shape[1])

  def _run(self, batch):
    return self.model(batch.astype(np.float32), training=False)


class LiteRTRunner(Runner):
  """A .tflite file under ai_edge_litert (XNNPACK on CPU); handles quantized uint8/int8 inputs and outputs."""

  kind = "tflite"

  def __init__(self, path, num_threads: int | None = None):
    from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel

    path = pathlib.Path(path)
    if not path.is_file():
      raise CovidctError(f"{path} does not exist.")
    try:
      self.interpreter = litert.Interpreter(model_path=str(path), num_threads=num_threads)
    except (ValueError, RuntimeError) as e:
      raise CovidctError(f"{path}: not a loadable TFLite model ({str(e).splitlines()[0]}); export it again.") from e
    self.input = self.interpreter.get_input_details()[0]
    self.output = self.interpreter.get_output_details()[0]
    self.input_name, self.output_name = self.input["name"], self.output["name"]
    signature = self.interpreter.get_signature_list().get("serving_default")
    if signature:  # the names the SavedModel signature gave them
      self.input_name, self.output_name = signature["inputs"][0], signature["outputs"][0]
    self.input_dtype = self.input["dtype"]
    self.image_size = int(self.input["shape"][1])
    self._batch = None
    self.path = path

  def _resize(self, n):
    if self._batch != n:
      self.interpreter.resize_tensor_input(self.input["index"], [n, self.image_size, self.image_size, 1])
      self.interpreter.allocate_tensors()
      self._batch = n

  def _run(self, batch):
    self._resize(len(batch))
    x = batch
    scale, zero = self.input["quantization"]
    if self.input_dtype == np.int8:  # quantized input: real = scale * (q - zero)
      x = np.clip(np.round(batch.astype(np.float32) / scale + zero), -128, 127).astype(np.int8)
    elif self.input_dtype == np.float32:
      x = batch.astype(np.float32)
    self.interpreter.set_tensor(self.input["index"], x)
    self.interpreter.invoke()
    y = self.interpreter.get_tensor(self.output["index"])
    scale, zero = self.output["quantization"]
    if self.output["dtype"] in (np.int8, np.uint8) and scale:
      y = (y.astype(np.float32) - zero) * scale
    return y


# ONNX Runtime's setting for exact int8 sums, which a user of the .onnx files needs on CPUs without VNNI too.
# session.x64quantprecision: on x86-64 CPUs without VNNI (AVX2-only or AVX-512 without VNNI, e.g. AMD EPYC Zen 2/3),
# ONNX Runtime's default uint8 x int8 kernels add pairs of products in 16 bits with saturation (VPMADDUBSW), so a
# pair such as 255 x 127 + 255 x 127 is clipped to 32767; with this setting they widen to 16 bits first (U8U8) and
# compute the exact integers, as the VNNI kernels do. Without it, the int8 (QDQ) copies of a quantization-aware model
# drifted by 10 output steps on an AVX2 EPYC, first at block_1_expand. It is not free: it replaces the VNNI kernels
# too, and on a VNNI Xeon (Sapphire Rapids) it cut ONNX Runtime's int8 GEMM from 456 to 124 GOP/s on one core. So
# covidct applies it only where the default kernels saturate (onnx_session_config), which a probe decides.
ONNX_SESSION_CONFIG = {"session.x64quantprecision": "1"}
PROBE_SIZE = 8
PROBE_SCALE = 8160.0  # 64 x 255 x 127 = 2,072,640 = 254 output steps exactly


def int8_probe_model() -> bytes:
  """A QDQ int8 model laid out as the quantization-aware exports are (uint8 activations, per-channel int8 weights):
  an 8 x 8 image's 64 pixels times weights of 127, summed. All-white input makes every pair of products 255 x 127 +
  255 x 127 = 64,770, which a 16-bit saturating add (VPMADDUBSW) clips to 32,767: the sum then comes out near half
  of the true one (128/256 instead of 254/256)."""
  from onnx import TensorProto, helper, numpy_helper  # pylint: disable=import-outside-toplevel

  inits = [
      numpy_helper.from_array(np.array([1, PROBE_SIZE * PROBE_SIZE], np.int64), "flat"),
      numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
      numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
      numpy_helper.from_array(np.full((PROBE_SIZE * PROBE_SIZE, 1), 127, np.int8), "w"),
      numpy_helper.from_array(np.ones(1, np.float32), "w_scale"),
      numpy_helper.from_array(np.zeros(1, np.int8), "w_zero"),
      numpy_helper.from_array(np.array(PROBE_SCALE, np.float32), "y_scale"),
      numpy_helper.from_array(np.array(0, np.uint8), "y_zero"),
      numpy_helper.from_array(np.array(1 / (256 * PROBE_SCALE), np.float32), "to_probability"),
  ]
  nodes = [
      helper.make_node("Reshape", [INPUT_NAME, "flat"], ["x"]),
      helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["xf"]),
      helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=1),
      helper.make_node("MatMul", ["xf", "wf"], ["yf"]),
      helper.make_node("QuantizeLinear", ["yf", "y_scale", "y_zero"], ["yq"]),
      helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["y"]),
      helper.make_node("Mul", ["y", "to_probability"], [OUTPUT_NAME]),
  ]
  graph = helper.make_graph(nodes, "saturation", [helper.make_tensor_value_info(
      INPUT_NAME, TensorProto.UINT8, [1, PROBE_SIZE, PROBE_SIZE, 1])], [helper.make_tensor_value_info(
          OUTPUT_NAME, TensorProto.FLOAT, [1, 1])], inits)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@functools.lru_cache(maxsize=None)
def ort_int8_is_exact() -> bool:
  """Whether ONNX Runtime's default int8 kernels on this CPU sum exactly (VNNI, AMX, non-x86), by running the probe
  model without the setting. The CPU ONNX Runtime sees is the one asked (CPUID), under an emulator too."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel

  opts = ort.SessionOptions()
  opts.intra_op_num_threads = 1
  session = ort.InferenceSession(int8_probe_model(), opts, providers=["CPUExecutionProvider"])
  p = session.run(None, {INPUT_NAME: np.full((1, PROBE_SIZE, PROBE_SIZE, 1), 255, np.uint8)})[0]
  return bool(abs(float(np.asarray(p).reshape(-1)[0]) * 256 - 254) < 0.01)


def onnx_session_config() -> dict:
  """The session settings covidct's ONNX Runtime sessions use on this CPU: ONNX_SESSION_CONFIG where the default int8
  kernels saturate, none where they are exact (and faster)."""
  return {} if ort_int8_is_exact() else dict(ONNX_SESSION_CONFIG)


class OnnxRunner(Runner):
  """An .onnx file under ONNX Runtime (CPU execution provider unless `providers` says otherwise), with
  onnx_session_config() (exact int8 sums on every CPU)."""

  kind = "onnx"

  def __init__(self, path, num_threads: int | None = None, providers=None, optimization: str = "all"):
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel

    path = pathlib.Path(path)
    if not path.is_file():
      raise CovidctError(f"{path} does not exist.")
    opts = ort.SessionOptions()
    self.session_config = onnx_session_config()
    for key, value in self.session_config.items():
      opts.add_session_config_entry(key, value)
    if num_threads:
      opts.intra_op_num_threads = num_threads
      opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    try:
      self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
      raise CovidctError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]}); export it again.") from e
    wanted = (providers or ["CPUExecutionProvider"])[0]
    if wanted not in self.session.get_providers():  # ONNX Runtime falls back to the CPU silently: refuse that
      raise CovidctError(f"ONNX Runtime could not start {wanted} (session has {self.session.get_providers()}); check "
                         "that onnxruntime-gpu and the CUDA/cuDNN libraries it needs are installed.")
    inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
    inp, out = inputs[0], outputs[0]
    shape = list(inp.shape)
    fixed = len(shape) == 4 and all(isinstance(d, int) for d in shape[1:])
    if (len(inputs) != 1 or inp.type not in ("tensor(uint8)", "tensor(float)") or not fixed or shape[3] != 1
        or shape[1] != shape[2] or out.type != "tensor(float)"
        or not (len(out.shape) == 1 or (len(out.shape) == 2 and out.shape[1] == 1))):
      raise CovidctError(
          f"{path}: not a model covidct can run: it takes {', '.join(f'{i.name} {i.type} {list(i.shape)}' for i in inputs)}"
          f" and gives {out.name} {out.type} {list(out.shape)}; covidct runs one uint8 or float input [N, S, S, 1] "
          "(channels last, a fixed size S) giving one float probability per image, as `covidct export` writes.")
    self.input_name, self.output_name = inp.name, out.name
    self.input_dtype = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}[inp.type]
    self.image_size = int(shape[1])
    self.path = path

  def _run(self, batch):
    return self.session.run([self.output_name], {self.input_name: batch.astype(self.input_dtype)})[0]


class EnsembleRunner(Runner):
  """The mean probability of several runners (e.g. the same recipe trained with different seeds)."""

  kind = "ensemble"

  def __init__(self, runners: list[Runner]):
    sizes = {r.image_size for r in runners}
    if len(sizes) != 1:
      raise CovidctError(f"ensemble members take different image sizes {sorted(sizes)}; use models of one size.")
    self.runners = runners
    self.image_size = sizes.pop()

  def _run(self, batch):
    return np.mean([r(batch, batch_size=len(batch)) for r in self.runners], axis=0)


# OpenVINO's CPU plugin computes in bfloat16 by default on CPUs with AVX512_BF16 or AMX (Sapphire Rapids and
# later): measured on a MobileNetV2 0.5 float32 copy, that moved probabilities by up to 0.11 against the SavedModel,
# far outside the float tolerance, while float32 passed (2e-6) and was as fast or faster at batch 1 here.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


class OpenVINORunner(Runner):
  """A .onnx or .tflite file under OpenVINO's CPU plugin (its own graph compiler and oneDNN kernels), in float32."""

  kind = "openvino"

  def __init__(self, path, num_threads: int | None = None, config: dict | None = None):
    from covidct.extras import require  # pylint: disable=import-outside-toplevel

    require("openvino")
    import openvino as ov  # pylint: disable=import-outside-toplevel
    path = pathlib.Path(path)
    if not path.is_file():
      raise CovidctError(f"{path} does not exist.")
    core = ov.Core()
    try:
      model = core.read_model(str(path))
      shape = model.inputs[0].get_partial_shape()
      if not shape.is_dynamic:  # a .tflite has batch 1: let it take any batch, as the other runners do
        model.reshape({model.inputs[0]: ov.PartialShape([-1, *[shape[i] for i in range(1, len(shape))]])})
      settings = {**OPENVINO_CONFIG, **(config or {})}
      if num_threads:
        settings["INFERENCE_NUM_THREADS"] = int(num_threads)
      self.compiled = core.compile_model(model, "CPU", settings)
    except RuntimeError as e:
      raise CovidctError(f"{path}: OpenVINO cannot read or compile it ({str(e).splitlines()[0][:160]}).") from None
    self.input_name = model.inputs[0].get_any_name().split(":")[0]
    self.output_name = model.outputs[0].get_any_name().split(":")[0]
    if path.suffix == ".tflite":  # TFLite tensor names; the SavedModel signature's are the ones covidct gave
      self.input_name, self.output_name = INPUT_NAME, OUTPUT_NAME
    self.image_size = int(shape[1].get_length())
    self.path = path
    self._output = self.compiled.outputs[0]

  def _run(self, batch):
    return self.compiled(batch)[self._output]


class FlipTTARunner(Runner):
  """Test-time augmentation: the mean probability of each image and its horizontal mirror."""

  kind = "flip_tta"

  def __init__(self, runner: Runner):
    self.runner = runner
    self.image_size = runner.image_size

  def _run(self, batch):
    return (self.runner(batch, batch_size=len(batch)) + self.runner(batch[:, :, ::-1], batch_size=len(batch))) / 2


RUNTIMES = ("default", "openvino")  # the runtime a file runs under: its own (by extension), or OpenVINO


def load_runner(path, runtime: str = "default", **kwargs) -> Runner:
  """The runner for an artifact: a training output folder, a SavedModel folder, .keras, .tflite or .onnx;
  `runtime="openvino"` runs a .onnx or .tflite under OpenVINO instead of ONNX Runtime or LiteRT."""
  path = pathlib.Path(path)
  if runtime not in RUNTIMES:
    raise CovidctError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}.")
  if runtime == "openvino":
    if not path.exists() or path.suffix.lower() not in (".onnx", ".tflite"):
      raise CovidctError(f"{path}: OpenVINO runs the .onnx and .tflite copies; pass one of those.")
    from covidct.digest import check_weights  # pylint: disable=import-outside-toplevel

    check_weights(path)
    return OpenVINORunner(path, **kwargs)
  if not path.exists():
    raise CovidctError(f"{path} does not exist; pass a training output folder, a SavedModel, .keras, .tflite or .onnx.")
  if path.is_dir():
    from covidct.modelio import read_run_config  # pylint: disable=import-outside-toplevel

    read_run_config(path)  # refuses a run whose model expects preprocessing that no runner applies
    if (path / "saved_model" / "saved_model.pb").exists():
      return SavedModelRunner(path / "saved_model")
    return SavedModelRunner(path)
  suffix = path.suffix.lower()
  from covidct.digest import check_weights  # pylint: disable=import-outside-toplevel

  check_weights(path)  # a copy that records a digest of its weights must still match it
  if suffix == ".tflite":
    return LiteRTRunner(path, **kwargs)
  if suffix == ".onnx":
    return OnnxRunner(path, **kwargs)
  if suffix == ".keras":
    return KerasRunner(path)
  raise CovidctError(f"{path}: unknown model format {suffix!r}; expected a SavedModel folder, .keras, .tflite or .onnx.")


def read_onnx_meaning(path) -> dict | None:
  """Labels and operating threshold from an .onnx's own metadata (via onnxruntime), or None if it has none."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel

  try:
    props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
  except Exception:  # pylint: disable=broad-except  # an unloadable file says nothing; its runner reports why
    return None
  if "operating_threshold" not in props:
    return None
  try:
    return {"labels": json.loads(props["labels"]), "threshold": float(props["operating_threshold"])}
  except (ValueError, KeyError):
    return None
