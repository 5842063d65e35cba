"""An experiment, not part of the package: would quantization-aware training (QAT) make a fine-tuned MobileNetV2's
full-int8 TFLite copy agree with its float model? (Post-training int8 agrees on ~90% of decisions; see README.)
Kept as the record of that measurement; `covidct qat` now does quantization-aware training in Keras 3, in the package.

QAT needs tensorflow-model-optimization, which works with Keras 2 (tf_keras) only, outside this project's stack.
Install both beside the project's environment, then run from the repository root:

  pip install --no-deps --target /tmp/qatlib tf_keras==2.21.0 tensorflow-model-optimization==0.8.1
  python tools/qat_check.py RUN --data-dir D [--epochs 5] [--learning-rate 1e-5] [--lib /tmp/qatlib]

RUN is a `covidct train --recipe finetune` output (MobileNetV2 0.5 at 224). The script rebuilds it in tf_keras
(one flat graph, the grayscale-to-RGB step done outside), copies the weights, checks that the two agree, converts it
to int8 as is (post-training quantization), then runs QAT (batch norm frozen, fake-quant ranges first calibrated
with a zero learning rate) and converts again. For each it prints test ROC AUC and how the int8 copy agrees with its
float model at the validation-chosen threshold (sensitivity >= 0.90).
"""

import argparse
import os
import sys


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("run")
  ap.add_argument("--data-dir", required=True)
  ap.add_argument("--epochs", type=int, default=5)
  ap.add_argument("--learning-rate", type=float, default=1e-5)
  ap.add_argument("--lib", default="/tmp/qatlib", help="Where tf_keras and tensorflow-model-optimization are.")
  ap.add_argument("--out", default="/tmp", help="Folder for the two .tflite files.")
  args = ap.parse_args()
  os.environ["TF_USE_LEGACY_KERAS"] = "1"
  sys.path.insert(0, args.lib)

  import keras as keras3  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_model_optimization as tfmot  # pylint: disable=import-outside-toplevel
  import tf_keras as K  # pylint: disable=import-outside-toplevel
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
  from scipy.stats import spearmanr  # pylint: disable=import-outside-toplevel
  from sklearn.metrics import roc_auc_score  # pylint: disable=import-outside-toplevel

  from covidct.data import split_arrays  # pylint: disable=import-outside-toplevel
  from covidct.evaluate import choose_threshold  # pylint: disable=import-outside-toplevel

  arrays = {s: split_arrays(s, args.data_dir, 224) for s in ("train", "validation", "test")}
  x = {s: np.repeat(a["images"].astype(np.float32) * (2.0 / 255.0) - 1.0, 3, axis=-1) for s, a in arrays.items()}
  y = {s: a["labels"] for s, a in arrays.items()}

  trained = keras3.models.load_model(os.path.join(args.run, "model.keras"), compile=False)
  inputs = K.Input((224, 224, 3))
  backbone = K.applications.MobileNetV2(input_tensor=inputs, alpha=0.5, include_top=False, weights=None)
  h = K.layers.Dropout(0.2)(K.layers.GlobalAveragePooling2D()(backbone.output))
  model = K.Model(inputs, K.layers.Dense(1, activation="sigmoid", name="head")(h))
  for layer in backbone.layers:
    if layer.weights:
      layer.set_weights(trained.get_layer("backbone").get_layer(layer.name).get_weights())
  model.get_layer("head").set_weights([l for l in trained.layers if l.__class__.__name__ == "Dense"][-1].get_weights())
  diff = np.abs(trained.predict(arrays["test"]["images"].astype(np.float32), verbose=0).ravel()
                - model.predict(x["test"], verbose=0).ravel()).max()
  print(f"rebuilt in tf_keras: max difference from the trained model {diff:.1e}", flush=True)

  def to_int8(m, path):
    conv = tf.lite.TFLiteConverter.from_keras_model(m)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x["train"][i:i + 1]] for i in range(200))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with open(path, "wb") as f:
      f.write(conv.convert())
    it = Interpreter(model_path=path)
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def run(images):
      out = []
      for image in images:
        it.set_tensor(i, image[None])
        it.invoke()
        out.append(float(it.get_tensor(o).ravel()[0]))
      return np.array(out)

    return {s: run(x[s]) for s in ("validation", "test")}

  def report(name, m, path):
    fl = {s: m.predict(x[s], verbose=0).ravel() for s in ("validation", "test")}
    q = to_int8(m, path)
    thr = choose_threshold(y["validation"], fl["validation"], 0.90)
    agree = np.mean((fl["test"] >= thr) == (q["test"] >= thr))
    print(f"{name}: float test ROC AUC {roc_auc_score(y['test'], fl['test']):.4f}, int8 "
          f"{roc_auc_score(y['test'], q['test']):.4f}; threshold {thr:.4f}: decisions agree on {agree:.1%}, "
          f"rank correlation {spearmanr(fl['test'], q['test'])[0]:.4f}", flush=True)

  report("post-training int8", model, os.path.join(args.out, "ptq_int8.tflite"))

  for layer in backbone.layers:
    if isinstance(layer, K.layers.BatchNormalization):
      layer.trainable = False  # inference mode, as in covidct's fine-tuning
  qat = tfmot.quantization.keras.quantize_model(model)
  qat.compile(optimizer=K.optimizers.SGD(0.0), loss="binary_crossentropy")
  qat.fit(x["train"], y["train"].astype(np.float32), batch_size=32, epochs=2, verbose=0)  # ranges only
  qat.compile(optimizer=K.optimizers.Adam(args.learning_rate), loss="binary_crossentropy")
  counts = np.bincount(y["train"], minlength=2)
  class_weight = {c: len(y["train"]) / (2 * counts[c]) for c in (0, 1)}
  rng = np.random.default_rng(0)
  for epoch in range(args.epochs):
    idx = rng.permutation(len(y["train"]))
    batch = x["train"][idx].copy()
    flip = rng.random(len(idx)) < 0.5
    batch[flip] = batch[flip][:, :, ::-1]
    qat.fit(batch, y["train"][idx].astype(np.float32), batch_size=32, epochs=1, class_weight=class_weight, verbose=0)
    val = roc_auc_score(y["validation"], qat.predict(x["validation"], verbose=0).ravel())
    print(f"QAT epoch {epoch + 1}: validation ROC AUC {val:.4f}", flush=True)
  report("after QAT", qat, os.path.join(args.out, "qat_int8.tflite"))


if __name__ == "__main__":
  main()
