"""covidct's own Keras layers, registered once: every module that loads a model imports them from here.

`FakeQuant` and `QuantConv` are the quantization-aware layers of `covidct.quantize`; a `.keras` file written by
`covidct qat` holds them, so anything that loads one (runners, ensembles, qat itself) needs this module imported.
"""

from __future__ import annotations

import keras

OUTPUT_STEP = 1.0 / 256.0  # a uint8/int8 probability's step in TFLite (scale 1/256)
# The input path's ranges are fixed, not calibrated, so that the SavedModel and its int8 copies round the same way:
# grey level k is k/255 on a [0, 1] grid (exact), 2k/255 on a [0, 2] grid (exact; without this point the TFLite
# converter gave the intermediate product a [-1, 2] range, where two grey levels share a step), and 2k/255 - 1 on a
# grid of step 1/128 with 0 on it (calibrated, [-1, 1] gets step 2/255 with its zero point nudged to 128, which puts
# every grey level exactly halfway between two steps, and TF and TFLite round those ties differently). Before this,
# 45% of the backbone's input values (then half of every layer's) differed by a step between the SavedModel and its
# int8 TFLite copy (measured on seed 0).
INPUT_RANGES = {"rescale": (0.0, 1.0), "times_2": (0.0, 2.0), "to_minus1_1": (-1.0, 127.0 / 128.0)}


@keras.saving.register_keras_serializable(package="covidct")
class FakeQuant(keras.layers.Layer):
  """Per-tensor 8-bit fake quantization over [lo, hi] (TF nudges the range so 0 is exact); identity when lo is None
  (while ranges are being calibrated)."""

  def __init__(self, lo=None, hi=None, **kwargs):
    super().__init__(**kwargs)
    self.lo = None if lo is None else float(lo)
    self.hi = None if hi is None else float(hi)

  def call(self, x):
    if self.lo is None:
      return x
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    return tf.quantization.fake_quant_with_min_max_args(x, min=self.lo, max=self.hi, num_bits=8)

  def get_config(self):
    return {**super().get_config(), "lo": self.lo, "hi": self.hi}


@keras.saving.register_keras_serializable(package="covidct")
class QuantConv(keras.layers.Layer):
  """A convolution (kind 'conv'), depthwise convolution ('dw') or dense layer ('dense') with its batch norm folded
  in: kernel and bias. With `quantize_weights`, the kernel is fake-quantized per output channel to a symmetric
  `weight_bits` grid (8: [-127, 127] times max|w| / 127; 7: [-63, 63] times max|w| / 63, still stored as int8);
  without, the kernel is used as stored (a baked copy whose kernel already lies on that grid)."""

  def __init__(self, kind, kernel_shape, strides=(1, 1), padding="valid", quantize_weights=True, weight_bits=8,
               **kwargs):
    super().__init__(**kwargs)
    if kind not in ("conv", "dw", "dense"):
      raise ValueError(f"unknown kind {kind!r}")
    self.kind, self.kernel_shape = kind, tuple(int(d) for d in kernel_shape)
    self.strides, self.padding, self.quantize_weights = tuple(strides), padding, bool(quantize_weights)
    self.weight_bits = int(weight_bits)

  def build(self, input_shape):
    self.kernel = self.add_weight(shape=self.kernel_shape, initializer="zeros", name="kernel")
    out = self.kernel_shape[2] if self.kind == "dw" else self.kernel_shape[-1]
    self.bias = self.add_weight(shape=(out,), initializer="zeros", name="bias")

  def quantized_kernel(self):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    k = tf.convert_to_tensor(self.kernel)
    if self.kind == "dw":  # (kh, kw, channels, 1): the channel axis last for the per-channel op, then back
      k = tf.transpose(k, (0, 1, 3, 2))
    m = tf.stop_gradient(tf.maximum(tf.reduce_max(tf.abs(k), axis=tuple(range(len(k.shape) - 1))), 1e-12))
    q = tf.quantization.fake_quant_with_min_max_vars_per_channel(k, -m, m, num_bits=self.weight_bits,
                                                              narrow_range=True)
    return tf.transpose(q, (0, 1, 3, 2)) if self.kind == "dw" else q

  def call(self, x):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    k = self.quantized_kernel() if self.quantize_weights else self.kernel
    strides = (1, *self.strides, 1)
    if self.kind == "dw":
      y = tf.nn.depthwise_conv2d(x, k, strides, self.padding.upper())
    elif self.kind == "conv":
      y = tf.nn.conv2d(x, k, strides, self.padding.upper())
    else:
      y = tf.matmul(x, k)
    return y + self.bias

  def get_config(self):
    return {**super().get_config(), "kind": self.kind, "kernel_shape": list(self.kernel_shape),
            "strides": list(self.strides), "padding": self.padding, "quantize_weights": self.quantize_weights,
            "weight_bits": self.weight_bits}


@keras.saving.register_keras_serializable(package="covidct")
class PerImageStandardize(keras.layers.Layer):
  """Each image to zero mean and unit standard deviation over its own pixels, then mapped to 0.5 + z / 4 (two
  standard deviations either side of the mean span [0, 1], what the backbone's input path expects). Sources window
  and export their scans differently: this removes each image's overall brightness and contrast before the network
  reads it. The standard deviation is floored at one grey level (a blank image stays finite)."""

  def call(self, x):
    from keras import ops  # pylint: disable=import-outside-toplevel

    mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
    std = ops.sqrt(ops.mean(ops.square(x - mean), axis=(1, 2, 3), keepdims=True))
    return 0.5 + (x - mean) / ops.maximum(std, 1.0 / 255.0) * 0.25
