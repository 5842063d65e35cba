"""Self-supervised pretraining of a backbone on unlabeled CT images (SimCLR, Chen et al. 2020), before fine-tuning.

The COVID-CT authors' best model (Self-Trans, He et al. 2020) added contrastive self-supervised pretraining on CT
images to ImageNet transfer. This is the small form of it for our backbones: starting from the ImageNet weights,
two random views of each training image are pulled together and pushed away from the other images' views (NT-Xent
loss on a projection head). Labels are never used for that; they only score a linear probe on the features
(logistic regression fitted on train, ROC AUC on validation) at each checkpoint, and the checkpoint the probe rates
best on validation becomes `backbone.weights.h5`, which `covidct train --weights FILE` fine-tunes.

The backbone's batch norm normalises with batch statistics and updates its moving statistics here, as in SimCLR
(Keras 3's fit overrides the training=False the classifier calls the backbone with, keras-team/keras#20285).

Everything here is backend-agnostic Keras (`keras.ops`, Keras layers) and numpy: it runs under
TensorFlow, and under JAX on a GPU machine that has no TensorFlow (`tools/gpu_pretrain.sh`), fed by the arrays that
`covidct data arrays` writes.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time

import numpy as np

from covidct.config import PretrainConfig, TrainConfig
from covidct.errors import CovidctError
from covidct.fsutil import atomic_dir, refuse_existing

WEIGHTS_FILE = "backbone.weights.h5"


def view_augmenter(cfg: PretrainConfig, seed: int, name: str):
  """One view's random augmentation of a float (B, S, S, 1) batch in [0, 255], active only in training.

  Flip, rotation, zoom in by up to `crop` of the side (a random crop) and shift are composed into one affine warp
  per image, resampled once (bilinear, black fill; `keras.ops.image.affine_transform`); then contrast and
  brightness (per image) and Gaussian pixel noise. All in `keras.ops`, so it compiles into the training step on
  any backend: a chain of Keras's Random* layers resamples the image once per layer, and under JAX each of those
  (map_coordinates) made one epoch on an H200 take over three minutes.
  """
  import math  # pylint: disable=import-outside-toplevel

  import keras  # pylint: disable=import-outside-toplevel
  from keras import ops  # pylint: disable=import-outside-toplevel

  class ViewAugment(keras.layers.Layer):

    def __init__(self):
      super().__init__(name=name)
      self.generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
      if not training:
        return x
      b = ops.shape(x)[0]
      h, w = float(x.shape[1]), float(x.shape[2])

      def uniform(lo, hi):
        return keras.random.uniform((b,), lo, hi, seed=self.generator)

      one, zero = ops.ones((b,)), ops.zeros((b,))
      flip = ops.where(uniform(0.0, 1.0) < 0.5, -one, one)
      angle = uniform(-1.0, 1.0) * (cfg.rotation_degrees * math.pi / 180.0)
      zoom = uniform(1.0, 1.0 / (1.0 - cfg.crop))  # output pixels per input pixel
      tx, ty = uniform(-1.0, 1.0) * cfg.shift * w, uniform(-1.0, 1.0) * cfg.shift * h
      cx, cy = (w - 1) / 2, (h - 1) / 2
      # output -> input coordinates: x_in = R^-1 S^-1 (x_out - c - t) + c, with the flip in S
      cos, sin = ops.cos(angle), ops.sin(angle)
      a0, a1 = cos * flip / zoom, sin * flip / zoom
      b0, b1 = -sin / zoom, cos / zoom
      ox, oy = -cx - tx, -cy - ty
      transform = ops.stack([a0, a1, a0 * ox + a1 * oy + cx, b0, b1, b0 * ox + b1 * oy + cy, zero, zero], axis=-1)
      y = ops.image.affine_transform(x, transform, interpolation="bilinear", fill_mode="constant", fill_value=0.0)
      shape4 = (b, 1, 1, 1)
      if cfg.contrast:
        mean = ops.mean(y, axis=(1, 2, 3), keepdims=True)
        y = (y - mean) * ops.reshape(uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast), shape4) + mean
      if cfg.brightness:
        y = y + ops.reshape(uniform(-cfg.brightness, cfg.brightness), shape4) * 255.0
      if cfg.noise:
        y = y + keras.random.normal(ops.shape(y), stddev=cfg.noise, seed=self.generator)
      return ops.clip(y, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
      return input_shape

  return ViewAugment()


def Batches(x: np.ndarray, batch_size: int, seed: int):  # pylint: disable=invalid-name
  """Full batches of `x` in a new seeded order each epoch (the remainder left out, a different one each time): one
  batch shape, so the training step compiles once."""
  import keras  # pylint: disable=import-outside-toplevel

  class _Batches(keras.utils.PyDataset):

    def __init__(self):
      super().__init__()
      self.rng = np.random.default_rng(seed)
      self.order = self.rng.permutation(len(x))

    def __len__(self):
      return len(x) // batch_size

    def __getitem__(self, i):
      idx = np.sort(self.order[i * batch_size:(i + 1) * batch_size])
      return x[idx], np.zeros((batch_size, 1), np.float32)

    def on_epoch_end(self):
      self.order = self.rng.permutation(len(x))

  return _Batches()


def nt_xent(temperature: float):
  """SimCLR's loss on projections (B, 2, D): each view's positive is the other view of its image, its negatives
  the 2B - 2 views of the other images. Per image: the mean of its two views' cross-entropies."""
  import keras  # pylint: disable=import-outside-toplevel
  from keras import ops  # pylint: disable=import-outside-toplevel

  def loss(y_true, y_pred):  # pylint: disable=unused-argument
    z = y_pred / ops.maximum(ops.norm(y_pred, axis=-1, keepdims=True), 1e-12)
    b = ops.shape(z)[0]
    z = ops.concatenate([z[:, 0], z[:, 1]], axis=0)
    logits = ops.matmul(z, ops.transpose(z)) / temperature - ops.eye(2 * b) * 1e9  # a view is not its own pair
    targets = ops.concatenate([ops.arange(b) + b, ops.arange(b)], axis=0)
    per_view = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    return (per_view[:b] + per_view[b:]) / 2.0

  return loss


def build_pretrain_model(cfg: PretrainConfig):
  """(model, encoder, backbone): `model` maps a batch to two views' projections (B, 2, D); `encoder` is the
  classifier's own feature path (rescaling, grayscale to RGB, backbone, pooling) that `build_model` builds, so the
  weights learnt here are the ones fine-tuning starts from."""
  import keras  # pylint: disable=import-outside-toplevel

  from covidct.models import build_model  # pylint: disable=import-outside-toplevel

  classifier = build_model(TrainConfig(model=cfg.model, image_size=cfg.image_size, weights=cfg.weights,
                                       weights_dir=cfg.weights_dir, augment=None))
  backbone = next((l for l in classifier.layers if l.name == "backbone"), None)
  if backbone is None:
    raise CovidctError(f"pretraining applies to backbone models (mobilenet_v2_*), not {cfg.model!r}.")
  encoder = keras.Model(classifier.input, classifier.get_layer("head_dropout").input, name="encoder")
  projector = keras.Sequential([
      keras.layers.Dense(cfg.hidden_dim, use_bias=False), keras.layers.BatchNormalization(), keras.layers.ReLU(),
      keras.layers.Dense(cfg.projection_dim)], name="projector")
  images = keras.Input((cfg.image_size, cfg.image_size, 1), dtype="float32", name="image")
  views = [view_augmenter(cfg, cfg.seed * 100 + 10 * i, f"view_{i}")(images) for i in (1, 2)]
  z = [projector(encoder(v)) for v in views]
  model = keras.Model(images, keras.ops.stack(z, axis=1), name="simclr")
  return model, encoder, backbone


def features(encoder, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  return np.asarray(encoder.predict(images.astype(np.float32), batch_size=batch_size, verbose=0), dtype=np.float64)


def linear_probe(encoder, train: dict, validation: dict) -> dict:
  """Logistic regression on pooled features (standardised), fitted on train; ROC AUC on train and validation."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from sklearn.metrics import roc_auc_score  # pylint: disable=import-outside-toplevel
  from sklearn.pipeline import make_pipeline  # pylint: disable=import-outside-toplevel
  from sklearn.preprocessing import StandardScaler  # pylint: disable=import-outside-toplevel

  ftr, fva = features(encoder, train["images"]), features(encoder, validation["images"])
  clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=5000, class_weight="balanced"))
  clf.fit(ftr, train["labels"])
  return {"train_auc": float(roc_auc_score(train["labels"], clf.predict_proba(ftr)[:, 1])),
          "validation_auc": float(roc_auc_score(validation["labels"], clf.predict_proba(fva)[:, 1]))}


def check_arrays(arrays: dict, image_size: int, what: str) -> None:
  images = arrays.get("images")
  if images is None or images.ndim != 4 or images.shape[1:] != (image_size, image_size, 1):
    got = None if images is None else images.shape
    raise CovidctError(f"{what} images must be (N, {image_size}, {image_size}, 1), got {got}; write them with "
                       f"`covidct data arrays --image-size {image_size}`, or pass --image-size to match.")
  if images.dtype != np.uint8:
    raise CovidctError(f"{what} images must be uint8 grey levels, got {images.dtype}.")


def load_inputs(image_size: int, arrays_dir=None, data_dir=None, probe: bool = True) -> tuple[dict, dict | None]:
  """The train split (and, for the linear probe, validation) from `covidct data arrays` files in `arrays_dir` (no
  TensorFlow needed), else from the TFDS dataset resized to `image_size`."""
  if arrays_dir:
    train = load_arrays(pathlib.Path(arrays_dir) / "train.npz")
    return train, load_arrays(pathlib.Path(arrays_dir) / "validation.npz") if probe else None
  from covidct.data import split_arrays  # pylint: disable=import-outside-toplevel
  from covidct.dataset import load_builder  # pylint: disable=import-outside-toplevel

  load_builder(data_dir)
  return (split_arrays("train", data_dir, image_size),
          split_arrays("validation", data_dir, image_size) if probe else None)


def load_arrays(path) -> dict:
  """A split written by `covidct data arrays` (.npz with images, labels, patient_ids, filenames)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CovidctError(f"{path} does not exist; write it with `covidct data arrays --out {path.parent}`.")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise CovidctError(f"{path} is not a readable .npz of arrays ({e}).") from None


def plot(history: dict, probes: list, path) -> bool:
  """pretrain.png: the loss by epoch and the probe's ROC AUC by checkpoint. False where matplotlib is missing
  (a GPU machine set up for pretraining alone): pretrain.json holds the same figures."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2 if probes else 1, figsize=(9 if probes else 4.5, 3.2), squeeze=False)
  axes[0, 0].plot(np.arange(1, len(history["loss"]) + 1), history["loss"])
  axes[0, 0].set(title="contrastive loss (NT-Xent)", xlabel="epoch")
  if probes:
    ep = [p["epoch"] for p in probes]
    for key, label in (("train_auc", "train"), ("validation_auc", "validation")):
      axes[0, 1].plot(ep, [p[key] for p in probes], marker="o", label=label)
    axes[0, 1].set(title="linear probe ROC AUC", xlabel="epoch (0: the starting weights)")
    axes[0, 1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def pretrain(cfg: PretrainConfig, train: dict, out_dir, validation: dict | None = None, overwrite: bool = False,
             verbose: int = 1, max_minutes: float | None = None) -> dict:
  """Pretrains on `train['images']` (uint8, (N, S, S, 1)) and writes `out_dir`: backbone.weights.h5, checkpoints/,
  pretrain.json and pretrain.png. With `validation` (and train labels), a linear probe scores each checkpoint and
  the best on validation is kept; without it, the last epoch. `max_minutes` ends training at the first step
  past that time (with a checkpoint there). Atomic: nothing under `out_dir` on failure."""
  import keras  # pylint: disable=import-outside-toplevel

  check_arrays(train, cfg.image_size, "training")
  if len(train["images"]) < cfg.batch_size:
    raise CovidctError(f"batch_size {cfg.batch_size} is more than the {len(train['images'])} training images; "
                       "pass a smaller --batch-size.")
  probe = validation is not None
  if probe:
    check_arrays(validation, cfg.image_size, "validation")
    if "labels" not in train or "labels" not in validation:
      raise CovidctError("the linear probe needs labels in both the training and validation arrays.")
  out = pathlib.Path(out_dir)
  with atomic_dir(out, overwrite) as tmp:
    start = time.time()
    keras.utils.set_random_seed(cfg.seed)
    model, encoder, backbone = build_pretrain_model(cfg)
    model.compile(optimizer=keras.optimizers.AdamW(cfg.learning_rate, weight_decay=cfg.weight_decay),
                  loss=nt_xent(cfg.temperature))
    (tmp / "checkpoints").mkdir()
    probes: list[dict] = []

    def checkpoint(epoch: int):
      path = tmp / "checkpoints" / f"epoch_{epoch:04d}.weights.h5"
      backbone.save_weights(str(path))
      if probe:
        probes.append({"epoch": epoch, **linear_probe(encoder, train, validation)})
        if verbose:
          print(f"epoch {epoch}: linear probe ROC AUC train {probes[-1]['train_auc']:.3f}, "
                f"validation {probes[-1]['validation_auc']:.3f}", flush=True)

    class Checkpoints(keras.callbacks.Callback):

      def on_train_batch_end(self, batch, logs=None):
        if max_minutes is not None and time.time() - start > 60 * max_minutes:
          self.model.stop_training = True  # ends the epoch here; on_epoch_end checkpoints it

      def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        out_of_time = max_minutes is not None and time.time() - start > 60 * max_minutes
        if done == cfg.epochs or out_of_time or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
          checkpoint(done)
        if out_of_time and done < cfg.epochs:
          self.model.stop_training = True
          if verbose:
            print(f"stopped after epoch {done} of {cfg.epochs}: past --max-minutes {max_minutes}", flush=True)

    checkpoint(0)  # the starting (ImageNet) weights, as the probe's baseline
    x = train["images"].astype(np.float32)
    hist = model.fit(Batches(x, cfg.batch_size, cfg.seed), epochs=cfg.epochs, callbacks=[Checkpoints()],
                     verbose=verbose)
    history = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
    saved = sorted(int(p.name[6:10]) for p in (tmp / "checkpoints").glob("epoch_*.weights.h5"))
    kept = max(probes, key=lambda p: (p["validation_auc"], p["epoch"]))["epoch"] if probe else saved[-1]
    shutil.copyfile(tmp / "checkpoints" / f"epoch_{kept:04d}.weights.h5", tmp / WEIGHTS_FILE)
    plotted = plot(history, probes, tmp / "pretrain.png")
    summary = {
        "config": dataclasses.asdict(cfg), "backend": keras.backend.backend(), "images": int(len(x)),
        "kept_epoch": kept, "kept_by": "linear probe validation ROC AUC" if probe else "last epoch",
        "checkpoints": saved, "epochs_run": len(history.get("loss", [])), "probes": probes, "history": history,
        "plot": "pretrain.png" if plotted else None, "wall_time_s": time.time() - start,
    }
    (tmp / "pretrain.json").write_text(json.dumps(summary, indent=2))
  return summary


def pretrain_from_options(out_dir, *, arrays_dir=None, data_dir=None, probe: bool = True, overwrite: bool = False,
                          verbose: int = 1, max_minutes: float | None = None, **overrides) -> tuple:
  """`covidct pretrain`: PretrainConfig() with `overrides`, its inputs loaded, then `pretrain`; returns
  (config, summary).

  Raises:
    CovidctError: a model that is not a backbone, an existing output folder, or unreadable inputs.
  """
  import dataclasses  # pylint: disable=import-outside-toplevel

  model = overrides.get("model", PretrainConfig.model)
  if not str(model).startswith("mobilenet_v2_"):
    raise CovidctError(f"pretraining applies to backbone models (mobilenet_v2_0.35, _0.5, _1.0), not {model!r}.")
  refuse_existing(out_dir, overwrite)
  cfg = dataclasses.replace(PretrainConfig(), **overrides)
  train, validation = load_inputs(cfg.image_size, arrays_dir, data_dir, probe)
  return cfg, pretrain(cfg, train, out_dir, validation=validation, overwrite=overwrite, verbose=verbose,
                       max_minutes=max_minutes)
