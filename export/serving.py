"""The SavedModel as a model server wants it: encoded images in, and a warmup file.

TF Serving's REST API sends binary inputs as {"b64": ...} to any input whose name ends in `_bytes`. The shipped
SavedModel keeps `serving_default` (uint8 images already at the model's size) and gains `serving_bytes`: a batch of
encoded images (PNG, 8 or 16-bit, and JPEG) decoded, turned to grayscale and resized inside the graph
exactly as `covidct predict` does it (covidct.predict.load_image), returning the probability, the label and the
operating threshold. `assets.extra/tf_serving_warmup_requests` holds PredictionLog records (TF Serving's warmup
format) so that a server loads the model warm.
"""

from __future__ import annotations

import pathlib

import numpy as np

from covidct.errors import CovidctError
from covidct.models import INPUT_NAME, OUTPUT_NAME

BYTES_SIGNATURE = "serving_bytes"
BYTES_INPUT = "image_bytes"  # the `_bytes` suffix makes TF Serving's REST API base64-decode {"b64": ...}
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode_grayscale_tf(data):
  """Encoded PNG/JPEG bytes (a scalar string tensor) -> (H, W, 1) uint8, as the builder's decode_grayscale does it
  with Pillow: RGB(A) by Pillow's integer ITU-R 601-2 luma (r*19595 + g*38470 + b*7471 + 2^15) >> 16, alpha and a
  grey+alpha image's alpha dropped, 16-bit grayscale PNG divided by 257 and rounded."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  is_png = tf.equal(tf.strings.substr(data, 0, 8), PNG_MAGIC)
  sixteen = tf.logical_and(is_png, tf.equal(tf.strings.substr(data, 24, 1), b"\x10"))  # IHDR bit depth

  def wide():
    x = tf.cast(tf.io.decode_png(data, channels=0, dtype=tf.uint16), tf.float32)
    return tf.cast(tf.round(x[..., :1] * (255.0 / 65535.0)), tf.uint8)

  def narrow():
    # JPEG with the accurate integer IDCT, as Pillow (libjpeg's default) decodes it; TF's default is the fast one,
    # which moved a probability by 1.4e-4.
    x = tf.cond(tf.io.is_jpeg(data), lambda: tf.io.decode_jpeg(data, channels=0, dct_method="INTEGER_ACCURATE"),
                lambda: tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False))
    channels = tf.shape(x)[-1]

    def luma():
      rgb = tf.cast(x[..., :3], tf.int32)
      return tf.cast((rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471 + 32768) // 65536,
                     tf.uint8)

    return tf.cond(channels >= 3, luma, lambda: x[..., :1])

  return tf.cond(sixteen, wide, narrow)


def write_serving_saved_model(source, dst, threshold: float, labels=("NonCOVID", "COVID")) -> None:
  """Saves the SavedModel in `source` to `dst` with `serving_default` unchanged and the `serving_bytes` signature."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from covidct.data import resize_image  # pylint: disable=import-outside-toplevel

  loaded = tf.saved_model.load(str(source))
  serve = loaded.signatures["serving_default"]
  size = int(serve.structured_input_signature[1][INPUT_NAME].shape[1])
  module = tf.Module()
  module.model = loaded
  names = tf.constant(list(labels))

  @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.uint8, name=INPUT_NAME)])
  def serving_default(image):
    return {OUTPUT_NAME: module.model.signatures["serving_default"](**{INPUT_NAME: image})[OUTPUT_NAME]}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
  def serving_bytes(image_bytes):
    images = tf.map_fn(lambda b: resize_image(decode_grayscale_tf(b), size), image_bytes,
                       fn_output_signature=tf.TensorSpec([size, size, 1], tf.uint8))
    p = tf.reshape(module.model.signatures["serving_default"](**{INPUT_NAME: images})[OUTPUT_NAME], [-1])
    thr = tf.fill(tf.shape(p), tf.constant(threshold, tf.float32))
    return {OUTPUT_NAME: p, "label": tf.gather(names, tf.cast(p >= thr, tf.int32)), "threshold": thr}

  tf.saved_model.save(module, str(dst), signatures={"serving_default": serving_default,
                                                    BYTES_SIGNATURE: serving_bytes})


def write_warmup(saved_model_dir, images: np.ndarray, encoded: list[bytes]) -> pathlib.Path:
  """TF Serving's warmup file: one PredictionLog per signature (uint8 images; encoded bytes)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  try:
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CovidctError("writing TF Serving's warmup file needs tensorflow-serving-api (pip install "
                       "'tensorflow-serving-api>=2.21,<2.22').") from e
  path = pathlib.Path(saved_model_dir) / WARMUP_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  with tf.io.TFRecordWriter(str(path)) as writer:
    for signature, name, value in ((("serving_default", INPUT_NAME, tf.make_tensor_proto(images))),
                                   (BYTES_SIGNATURE, BYTES_INPUT, tf.make_tensor_proto(encoded, dtype=tf.string))):
      request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature))
      request.inputs[name].CopyFrom(value)
      log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
      writer.write(log.SerializeToString())
  return path


def read_warmup(saved_model_dir) -> list:
  """The PredictionLog records of a warmup file (to check it)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=import-outside-toplevel

  logs = []
  for record in tf.data.TFRecordDataset(str(pathlib.Path(saved_model_dir) / WARMUP_FILE)):
    log = prediction_log_pb2.PredictionLog()
    log.ParseFromString(record.numpy())
    logs.append(log)
  return logs
