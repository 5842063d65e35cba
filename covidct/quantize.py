"""Quantization-aware fine-tuning (QAT) of a fine-tuned MobileNetV2 in Keras 3, without tensorflow-model-optimization.

Post-training full-int8 copies of our MobileNetV2s keep ROC AUC but reorder the scans (agreement with the float
model 90-95%, below the 98% gate). This module makes the quantization part of the model instead:

1. `quantized_twin` rebuilds a trained run the way TFLite's int8 kernels compute it: each convolution's batch norm
   folded into its kernel and bias, the kernel fake-quantized per output channel (symmetric int8, as the TFLite
   converter and onnxruntime quantize weights), and a per-tensor 8-bit fake quantization (`FakeQuantWithMinMaxArgs`)
   on every tensor an int8 model stores: the rescaled input, each ReLU6 output, each linear projection, each
   residual sum, the pooled features, the logit and the probability (TFLite's 1/256 output step).
2. `calibrate_ranges` sets those ranges from train images run through the float model (what post-training
   calibration does): the twin before any training simulates post-training int8.
3. `qat` fine-tunes the twin at a low learning rate (straight-through gradients), keeps the best validation epoch
   (epoch 0, calibration only, included), and writes a training output whose SavedModel *is* the quantized
   model: weights baked onto their int8 grid, the activation fake-quant ops in the graph. Its TFLite and ONNX copies
   then carry the same ranges (the TFLite converter reads them; tf2onnx turns them into QuantizeLinear pairs), so
   every copy computes what the SavedModel computes, up to integer rounding.
"""

from __future__ import annotations

import json
import pathlib
import time

import keras
import numpy as np

from covidct.config import CALIBRATION_IMAGES, QAT_WEIGHT_BITS, WEIGHT_BITS_CHOICES
from covidct.errors import CovidctError
from covidct.fsutil import atomic_dir, refuse_existing
from covidct.layers import INPUT_RANGES, OUTPUT_STEP, FakeQuant, QuantConv  # noqa: F401
from covidct.metrics import fit_temperature
from covidct.models import INPUT_NAME, OUTPUT_NAME

def _fold(conv, bn):
  """Kernel and bias of `conv` with the (inference-mode) batch norm `bn` folded in."""
  weights = conv.get_weights()
  k = weights[0]
  channels = k.shape[2] if isinstance(conv, keras.layers.DepthwiseConv2D) else k.shape[-1]
  b = weights[1] if getattr(conv, "use_bias", False) else np.zeros(channels, np.float32)
  if bn is None:
    return k.astype(np.float32), b.astype(np.float32)
  gamma, beta, mean, var = bn.get_weights()
  s = gamma / np.sqrt(var + bn.epsilon)
  k = k * (s.reshape(1, 1, -1, 1) if isinstance(conv, keras.layers.DepthwiseConv2D) else s)
  return k.astype(np.float32), (beta + (b - mean) * s).astype(np.float32)


def is_mobilenet_run(model) -> bool:
  names = {l.name for l in model.layers}
  return {"backbone", "rescale", "to_minus1_1", "covid_probability"} <= names


def check_twin_layout(model, what: str = "this model") -> None:
  """Raises unless `model` has the plain MobileNetV2 classifier layout that `quantized_twin` rebuilds."""
  if not is_mobilenet_run(model):
    raise CovidctError(f"{what} is {model.name!r}; quantization-aware training supports the MobileNetV2 models "
                       "(mobilenet_v2_*: train one with --recipe finetune).")
  expected = {INPUT_NAME, "rescale", "to_minus1_1", "gray_to_rgb", "backbone", "head_dropout", OUTPUT_NAME}
  extra = sorted(l.name for l in model.layers
                 if l.name not in expected and not isinstance(l, keras.layers.GlobalAveragePooling2D))
  if extra:  # the twin rebuilds this exact layout: a layer it does not know would silently go missing
    raise CovidctError(f"quantization-aware training rebuilds the plain MobileNetV2 layout; {what} also has "
                       f"{', '.join(extra)} (e.g. a --blur run), which it cannot rebuild yet.")


def quantized_twin(model, ranges: dict | None = None, quantize_weights: bool = True, temperature: float = 1.0,
                   weight_bits: int = 8):
  """The quantized twin of a trained MobileNetV2 classifier (covidct.models' layout); `ranges` maps each fake-quant
  point to (lo, hi), and a point missing from it is left unquantized (identity); the logit is divided by
  `temperature`; weights go on a per-channel `weight_bits` grid (covidct.config.QAT_WEIGHT_BITS for `qat`).
  Returns (twin, point names)."""
  check_twin_layout(model)
  ranges = ranges or {}
  points: list[str] = []
  folded: dict[str, tuple] = {}

  def fq(x, point):
    points.append(point)
    lo, hi = ranges.get(point, (None, None))
    return FakeQuant(lo, hi, name=f"fq_{point}")(x)

  def qconv(x, name, kind, k, b, strides=(1, 1), padding="valid"):
    folded[name] = (k, b)
    return QuantConv(kind, k.shape, strides, padding, quantize_weights, weight_bits, name=name)(x)

  inputs = keras.Input(model.input_shape[1:], name="image")
  x = fq(keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs), "rescale")
  x = fq(keras.layers.Rescaling(2.0, name="times_2")(x), "times_2")  # 2x - 1 in two stored steps (INPUT_RANGES)
  x = fq(keras.layers.Rescaling(1.0, offset=-1.0, name="to_minus1_1")(x), "to_minus1_1")
  x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
  backbone = model.get_layer("backbone")
  consumers: dict[int, list] = {}
  for layer in backbone.layers:
    for t in layer._inbound_nodes[0].input_tensors:  # pylint: disable=protected-access
      consumers.setdefault(id(t), []).append(layer)
  tensors = {id(backbone.inputs[0]): x}
  folded_bns = set()
  for layer in backbone.layers:
    if isinstance(layer, keras.layers.InputLayer) or layer.name in folded_bns:
      continue
    node = layer._inbound_nodes[0]  # pylint: disable=protected-access
    ins = [tensors[id(t)] for t in node.input_tensors]
    out = node.output_tensors[0]
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
      after = consumers.get(id(out), [])
      bn = after[0] if len(after) == 1 and isinstance(after[0], keras.layers.BatchNormalization) else None
      k, b = _fold(layer, bn)
      kind = "dw" if isinstance(layer, keras.layers.DepthwiseConv2D) else "conv"
      y = qconv(ins[0], layer.name, kind, k, b, layer.strides, layer.padding)
      if bn is not None:
        folded_bns.add(bn.name)
        out = bn._inbound_nodes[0].output_tensors[0]  # pylint: disable=protected-access
      after = consumers.get(id(out), [])
      if not (len(after) == 1 and isinstance(after[0], keras.layers.ReLU)):
        y = fq(y, layer.name)  # a linear projection is stored as is; a ReLU6 is fused and quantized after it
      tensors[id(out)] = y
    elif isinstance(layer, keras.layers.ReLU):
      tensors[id(out)] = fq(keras.layers.ReLU(max_value=layer.max_value, name=layer.name)(ins[0]), layer.name)
    elif isinstance(layer, keras.layers.Add):
      tensors[id(out)] = fq(keras.layers.Add(name=layer.name)(ins), layer.name)
    elif isinstance(layer, keras.layers.ZeroPadding2D):  # padding keeps its input's quantization
      tensors[id(out)] = keras.layers.ZeroPadding2D(layer.padding, name=layer.name)(ins[0])
    else:
      raise CovidctError(f"quantization-aware training cannot rebuild backbone layer {layer.name} "
                         f"({type(layer).__name__}).")
  x = fq(keras.layers.GlobalAveragePooling2D(name="pool")(tensors[id(backbone.outputs[0])]), "pool")
  k, b = model.get_layer("covid_probability").get_weights()
  x = fq(qconv(x, "logit", "dense", k / temperature, b / temperature), "logit")
  x = keras.layers.Activation("sigmoid", name="sigmoid")(x)
  outputs = FakeQuant(0.0, 255.0 * OUTPUT_STEP, name="covid_probability")(x)  # TFLite's uint8 probability
  twin = keras.Model(inputs, outputs, name=f"{model.name}_qat")
  for name, (k, b) in folded.items():
    twin.get_layer(name).set_weights([k, b])
  return twin, points


def logits(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """The float model's logits (before its sigmoid), computed from the head's input, not by inverting probabilities
  that float32 rounds to 0 or 1."""
  dense = model.get_layer("covid_probability")
  features = keras.Model(model.input, dense.input)
  k, b = dense.get_weights()
  f = np.concatenate([np.asarray(features(np.asarray(images[i:i + batch_size], np.float32), training=False))
                      for i in range(0, len(images), batch_size)])
  return (f @ k + b).reshape(-1).astype(np.float64)


def calibrate_ranges(model, images: np.ndarray, batch_size: int = 32, temperature: float = 1.0) -> dict:
  """Each fake-quant point's (min, max) over `images` run through the float model (weights not quantized), widened
  to include 0, as post-training calibration does."""
  twin, points = quantized_twin(model, None, quantize_weights=False, temperature=temperature)
  probe = keras.Model(twin.input, [twin.get_layer(f"fq_{p}").output for p in points])
  lo = dict.fromkeys(points, 0.0)
  hi = dict.fromkeys(points, 0.0)
  for i in range(0, len(images), batch_size):
    outs = probe(np.asarray(images[i:i + batch_size], np.float32), training=False)
    for p, o in zip(points, outs):
      o = np.asarray(o)
      lo[p], hi[p] = min(lo[p], float(o.min())), max(hi[p], float(o.max()))
  return {p: INPUT_RANGES.get(p, (lo[p], hi[p])) for p in points}


def bake(twin):
  """A copy of `twin` whose kernels hold their int8-grid values (no per-channel fake-quant op left in the graph,
  which tf2onnx cannot convert); it computes exactly what `twin` computes."""

  def clone(layer):
    if isinstance(layer, QuantConv):
      return QuantConv.from_config({**layer.get_config(), "quantize_weights": False})
    return layer.__class__.from_config(layer.get_config())

  baked = keras.models.clone_model(twin, clone_function=clone)
  for layer in twin.layers:
    if isinstance(layer, QuantConv):
      baked.get_layer(layer.name).set_weights([np.asarray(layer.quantized_kernel()), layer.get_weights()[1]])
  return baked


def is_quantization_aware(saved_model_dir) -> bool:
  """Whether a SavedModel holds fake-quant ops (a `covidct qat` output), read from its graph."""
  pb = pathlib.Path(saved_model_dir) / "saved_model.pb"
  return pb.exists() and b"FakeQuantWithMinMax" in pb.read_bytes()


def qat(run_dir, out_dir, *, epochs: int = 5, learning_rate: float = 1e-5, calibration_images: int = CALIBRATION_IMAGES,
        seed: int = 0, batch_size: int = 32, temperature: float | None = None, weight_bits: int = QAT_WEIGHT_BITS,
        data_dir=None, overwrite: bool = False, verbose: int = 1) -> dict:
  """Quantization-aware fine-tuning of the MobileNetV2 run in `run_dir`; writes a training output to `out_dir`.

  The train split calibrates the ranges and trains (with the run's augmentation, class weights and label
  smoothing); the validation split fits the temperature (unless given) and picks the epoch kept, calibration only
  (epoch 0) included. A run trained on several sources uses each source's splits (its calibration images shared
  out among them). Weights go on a per-channel `weight_bits` grid (7 by default: exact on CPUs without VNNI;
  see covidct.config.QAT_WEIGHT_BITS).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from covidct.config import TrainConfig  # pylint: disable=import-outside-toplevel
  from covidct.data import Selection, build_inputs, cap_slices, split_arrays  # pylint: disable=import-outside-toplevel
  from covidct.dataset import load_builder  # pylint: disable=import-outside-toplevel
  from covidct.modelio import export_saved_model, load_run_model, read_run_config  # pylint: disable=import-outside-toplevel
  from covidct.train import KeepBest, class_weight, plot_history, validation_callback  # pylint: disable=import-outside-toplevel

  if epochs < 0 or not learning_rate > 0 or calibration_images <= 0 or (temperature is not None and
                                                                         not temperature > 0):
    raise CovidctError("epochs must be >= 0, learning_rate > 0, calibration_images > 0 and temperature > 0.")
  if weight_bits not in WEIGHT_BITS_CHOICES:
    raise CovidctError(f"weight_bits must be one of {', '.join(map(str, WEIGHT_BITS_CHOICES))}, got {weight_bits}.")
  run = pathlib.Path(run_dir)
  out = pathlib.Path(out_dir)
  refuse_existing(out, overwrite, inputs=(run,))
  source_cfg = read_run_config(run)
  if source_cfg.get("quantization_aware"):
    raise CovidctError(f"{run} is already quantization-aware; pass the float run it came from.")
  model = load_run_model(run)
  check_twin_layout(model, f"the model in {run}")  # before any data is read or anything written
  cfg = TrainConfig.from_dict({k: v for k, v in source_cfg.items() if k in TrainConfig.__dataclass_fields__}) \
      if source_cfg.get("recipe") else TrainConfig(model=model.name, image_size=int(model.input_shape[1]))
  size = int(model.input_shape[1])
  for source in cfg.sources:  # a clear error before anything is written when a dataset is missing
    load_builder(data_dir, source)
  # A run trained on several sources is calibrated on each one's train images and fitted on each one's validation
  train_view = tuple(Selection("train", source=s) for s in cfg.sources)
  val_view = tuple(Selection("validation", source=s) for s in cfg.sources)

  with atomic_dir(out, overwrite) as tmp:
    start = time.time()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    if len(train_view) == 1:  # the first images of train, as they come
      reps = split_arrays(train_view[0], data_dir, size)["images"][:calibration_images]
    else:  # each source its share, from 2 slices per patient at most (CC-CCII's first images are one patient's)
      share = -(-calibration_images // len(train_view))
      reps = np.concatenate([split_arrays(cap_slices(v, data_dir, 2, seed), data_dir, size)["images"][:share]
                             for v in train_view])[:calibration_images]
    val = split_arrays(val_view, data_dir, size)
    temperature = fit_temperature(logits(model, val["images"]), val["labels"]) if temperature is None else temperature
    ranges = calibrate_ranges(model, reps, temperature=temperature)
    twin, _ = quantized_twin(model, ranges, temperature=temperature, weight_bits=weight_bits)
    train_ds = build_inputs(train_view, data_dir=data_dir, image_size=size, batch_size=batch_size, training=True,
                            augment=cfg.augment, seed=seed, shuffle_buffer=cfg.shuffle_buffer)
    val_ds = build_inputs(val_view, data_dir=data_dir, image_size=size, batch_size=batch_size)
    validation = validation_callback(twin, val_ds)
    keep_best = KeepBest("val_auc", "max", twin)
    logs: dict = {}
    validation.on_epoch_end(0, logs)  # epoch 0: the calibrated twin, post-training int8 as simulated
    keep_best.on_epoch_end(-1, logs)
    history = {k: [float(v)] for k, v in logs.items()}  # index 0: before any QAT epoch
    if epochs:
      twin.compile(optimizer=keras.optimizers.Adam(learning_rate),
                   loss=keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
                   metrics=[keras.metrics.BinaryAccuracy(), keras.metrics.AUC(name="auc")])
      hist = twin.fit(train_ds, epochs=epochs, callbacks=[validation, keep_best],
                      class_weight=class_weight(data_dir, cfg.class_weight, train_view), verbose=verbose,
                      shuffle=False)  # the tf.data pipeline shuffles, seeded
      for k, vs in hist.history.items():
        history.setdefault(k, [float("nan")]).extend(float(v) for v in vs)
    best = keep_best.best_epoch + 1 if keep_best.best_epoch is not None else 0  # 0: calibration only
    if keep_best.best_weights is not None:
      twin.set_weights(keep_best.best_weights)
    twin.save(tmp / "model.keras")
    export_saved_model(bake(twin), tmp / "saved_model", size)
    config = {
        "model": source_cfg.get("model", model.name), "image_size": size, "recipe": "qat",
        "quantization_aware": {"epochs": epochs, "learning_rate": learning_rate, "calibration_images": len(reps),
                               "seed": seed, "batch_size": batch_size, "epoch_kept": best,
                               "temperature": temperature,
                               "weights": f"int8 per output channel, symmetric, on a {weight_bits}-bit grid "
                                          f"([-{2 ** (weight_bits - 1) - 1}, {2 ** (weight_bits - 1) - 1}])",
                               "weight_bits": weight_bits,
                               "activations": "int8 per tensor, ranges calibrated on train then fixed"},
        "source": {"run": str(run.resolve()), "config": source_cfg},
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    val_history = {k: v for k, v in history.items() if k.startswith("val_")}
    plot_history(history, tmp / "curves.png", best + 1)  # plotted epoch 1 is the calibrated twin
    summary = {"epoch_kept": best, "epochs_run": epochs, "temperature": temperature,
               "validation": {k[4:]: v[best] for k, v in val_history.items()},
               "validation_before_qat": {k[4:]: v[0] for k, v in val_history.items()},
               "wall_time_s": time.time() - start}
    (tmp / "history.json").write_text(json.dumps({"history": history, "summary": summary}, indent=2))
  return summary
