"""Training: fit under a tf.distribute strategy, keep the best validation epoch, write a SavedModel and friends."""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np

from covidct.config import TrainConfig
from covidct.errors import CovidctError
from covidct.fsutil import atomic_dir, refuse_existing
from covidct.modelio import export_saved_model
from covidct.models import build_model, fine_tune_start


def make_strategy(name: str):
  """'default' (one device), 'mirrored' (all local devices), 'multi-worker' (cluster from TF_CONFIG)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "multi-worker":
    if "TF_CONFIG" not in os.environ:
      raise CovidctError("strategy 'multi-worker' reads the cluster from TF_CONFIG, which is not set; set it on "
                         "every worker, or use --strategy mirrored for one machine.")
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise CovidctError(f"unknown strategy {name!r}; choose default, mirrored or multi-worker.")


def plot_history(history: dict, path, best_epoch: int | None = None) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  metrics = [m for m in ("loss", "auc", "binary_accuracy", "recall") if m in history or f"val_{m}" in history]
  fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
  for ax, m in zip(np.atleast_1d(axes), metrics):
    for key, label in ((m, "train"), (f"val_{m}", "validation")):
      if key in history:
        ax.plot(np.arange(1, len(history[key]) + 1), history[key], label=label)
    if best_epoch is not None:
      ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept (epoch {best_epoch})")
    ax.set_title(m)
    ax.set_xlabel("epoch")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def validation_callback(model, val_ds):
  """Validation metrics by `predict` + scikit-learn, written into the epoch logs as val_*.

  Keras 3.15's `evaluate` fails under a multi-replica strategy on a partial last batch (AddN shape mismatch), and
  `predict` does not; one path for every strategy, with exact (not interpolated) ROC AUC.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from sklearn import metrics as skm  # pylint: disable=import-outside-toplevel

  labels = np.concatenate([y.numpy() for _, y in val_ds]).astype(int)

  class Validation(keras.callbacks.Callback):

    def __init__(self):
      super().__init__()
      self.labels = labels
      self.probabilities: list[np.ndarray] = []  # one array per epoch, in the validation data's order

    def on_epoch_end(self, epoch, logs=None):
      raw = model.predict(val_ds, verbose=0).reshape(-1).astype(np.float64)
      self.probabilities.append(raw.astype(np.float32))
      p = np.clip(raw, 1e-7, 1 - 1e-7)
      pred = (p >= 0.5).astype(int)
      logs.update({
          "val_loss": float(skm.log_loss(labels, p, labels=[0, 1])),
          "val_auc": float(skm.roc_auc_score(labels, p)) if len(set(labels)) == 2 else float("nan"),
          "val_binary_accuracy": float(skm.accuracy_score(labels, pred)),
          "val_precision": float(skm.precision_score(labels, pred, zero_division=0)),
          "val_recall": float(skm.recall_score(labels, pred, zero_division=0)),
      })

  return Validation()


def KeepBest(monitor: str, mode: str, model):  # pylint: disable=invalid-name
  """A callback keeping the weights of the best epoch by `monitor` across several `fit` calls (EarlyStopping's
  restore_best_weights forgets them at each new fit)."""
  import keras  # pylint: disable=import-outside-toplevel

  class _KeepBest(keras.callbacks.Callback):

    def __init__(self):
      super().__init__()
      self.best, self.best_epoch, self.best_weights = None, None, None

    def on_epoch_end(self, epoch, logs=None):
      value = (logs or {}).get(monitor)
      if value is None or value != value:  # missing or NaN
        return
      if self.best is None or (value > self.best if mode == "max" else value < self.best):
        self.best, self.best_epoch = value, epoch
        self.best_weights = [w.copy() for w in model.get_weights()]  # the model, not a training wrapper

  return _KeepBest()


def class_weight(data_dir, enabled: bool, split="train"):
  """Loss weights that balance the classes of `split` (a split name or covidct.data.Selection); None if disabled."""
  if not enabled:
    return None
  from covidct.data import split_labels  # pylint: disable=import-outside-toplevel

  labels = split_labels(split, data_dir)["labels"]
  counts = np.bincount(labels, minlength=2)
  return {c: float(len(labels) / (2 * counts[c])) for c in (0, 1)}


def _Deadline(deadline: float):  # pylint: disable=invalid-name
  """A callback stopping training at the end of the first epoch that ends after `deadline` (a time.time())."""
  import keras  # pylint: disable=import-outside-toplevel

  class _Stop(keras.callbacks.Callback):
    stopped = False

    def on_epoch_end(self, epoch, logs=None):
      if time.time() > deadline:
        self.stopped = True
        self.model.stop_training = True

  return _Stop()


def train(cfg: TrainConfig, out_dir, overwrite: bool = False, verbose: int = 1, train_data="train",
          validation_data="validation", deadline: float | None = None, keep: str = "best") -> dict:
  """Trains `cfg` and writes `out_dir`: saved_model/, model.keras, config.json, history.json, logs/, curves.png,
  and validation_predictions.npz (the validation data's probabilities after every epoch).

  Args:
    cfg: the training config.
    out_dir: the output folder; everything is written to a temporary sibling folder and renamed at the end, so an
      interrupted run leaves nothing under it.
    overwrite: replace an existing `out_dir`.
    verbose: Keras's fit verbosity.
    train_data, validation_data: split names or covidct.data.Selection (cross-validation folds); the epoch kept is
      the best on `validation_data`.
    deadline: a time.time() after which training stops at the end of the current epoch (summary['stopped']).
    keep: 'best', the epoch best on `validation_data`; or 'last', the whole schedule with no early stopping (a
      final model trained on train + validation for the epochs its cross-validation chose).

  Returns:
    A summary: best epoch, validation metrics, wall time.
  """
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from covidct import data as inputs  # pylint: disable=import-outside-toplevel
  from covidct.dataset import load_builder  # pylint: disable=import-outside-toplevel

  if keep not in ("best", "last"):
    raise CovidctError(f"keep must be 'best' or 'last', got {keep!r}.")
  out = pathlib.Path(out_dir)
  refuse_existing(out, overwrite)
  for source in cfg.sources:  # a clear error before anything is written when a source is missing
    load_builder(cfg.data_dir, source)
  train_data = inputs.training_view(cfg, train_data)
  validation_data = (tuple(inputs.Selection(validation_data, source=s) for s in cfg.sources)
                     if isinstance(validation_data, str) else inputs.as_selections(validation_data))
  mix = inputs.mix_of(cfg)
  gpus = tf.config.list_physical_devices("GPU")
  if cfg.mixed_precision and not gpus:
    raise CovidctError("mixed precision needs a GPU and none is visible; drop --mixed-precision.")
  augment_on = cfg.augment_on if cfg.augment_on != "auto" else ("model" if gpus else "pipeline")

  with atomic_dir(out, overwrite) as tmp:
    start = time.time()
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    if cfg.mixed_precision:
      keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = make_strategy(cfg.strategy)
    with strategy.scope():
      model = build_model(cfg)
    backbone = next((l for l in model.layers if l.name == "backbone"), None)
    if backbone is None and cfg.fine_tune_from:  # refused before any data is read
      raise CovidctError(f"fine_tune_from applies to backbone models (mobilenet_v2_*), not {cfg.model!r}.")
    frozen_below = fine_tune_start(backbone, cfg.fine_tune_from) if backbone is not None else 0
    batch = cfg.batch_size * strategy.num_replicas_in_sync
    train_ds = inputs.build_inputs(train_data, data_dir=cfg.data_dir, image_size=cfg.image_size, batch_size=batch,
                            training=True, augment=cfg.augment if augment_on == "pipeline" else None,
                            seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                            drop_remainder=strategy.num_replicas_in_sync > 1, mixup=cfg.mixup,
                            lung_crop=cfg.lung_crop, mix=mix)
    val_ds = inputs.build_inputs(validation_data, data_dir=cfg.data_dir, image_size=cfg.image_size, batch_size=batch,
                          lung_crop=cfg.lung_crop)
    with strategy.scope():
      fit_model = model
      if augment_on == "model" and cfg.augment is not None:
        # Augmentation in the training step (on the accelerator), in a wrapper: `model` itself never holds it.
        fit_model = keras.Sequential([inputs.build_augmenter(cfg.augment, cfg.seed), model], name="train_wrapper")
    mode = "max" if cfg.monitor == "val_auc" else "min"
    keep_best = KeepBest(cfg.monitor, mode, model)
    validation = validation_callback(model, val_ds)
    # a class-balanced mix balances by sampling: weighting the loss as well would count the balance twice
    weights = None if mix is not None and mix.class_balance else class_weight(cfg.data_dir, cfg.class_weight,
                                                                               train_data)
    stopper = _Deadline(deadline) if deadline is not None else None
    history: dict[str, list[float]] = {}

    def fit(learning_rate, first_epoch, last_epoch, early_stopping: bool):
      with strategy.scope():
        fit_model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
            metrics=[keras.metrics.BinaryAccuracy(), keras.metrics.AUC(name="auc"),
                     keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall")],
        )
      callbacks = [validation, keep_best, keras.callbacks.TensorBoard(log_dir=str(tmp / "logs"))]
      if stopper is not None:
        if stopper.stopped:
          return
        callbacks.append(stopper)
      if early_stopping and keep == "best":
        callbacks.insert(2, keras.callbacks.EarlyStopping(monitor=cfg.monitor, mode=mode,
                                                          patience=cfg.patience or cfg.epochs, verbose=min(verbose, 1)))
      hist = fit_model.fit(train_ds, initial_epoch=first_epoch, epochs=last_epoch, callbacks=callbacks,
                           class_weight=weights, verbose=verbose, shuffle=False)  # tf.data shuffles, seeded
      for k, vs in hist.history.items():
        history.setdefault(k, []).extend(float(v) for v in vs)

    def unfreeze():  # the whole backbone but the layers below `fine_tune_from`
      backbone.trainable = True
      for layer in backbone.layers[:frozen_below]:
        layer.trainable = False
      if cfg.freeze_batch_norm:  # a non-trainable batch norm runs in inference mode, whatever fit's `training`
        for layer in backbone.layers:
          if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False

    if cfg.head_epochs and backbone is not None:
      backbone.trainable = False  # stage 1: the head alone, on frozen ImageNet features
      fit(cfg.learning_rate, 0, cfg.head_epochs, early_stopping=False)
      unfreeze()  # stage 2: fine-tune
      fit(cfg.fine_tune_learning_rate, cfg.head_epochs, cfg.head_epochs + cfg.epochs, early_stopping=True)
    else:
      if backbone is not None:
        unfreeze()
      fit(cfg.learning_rate, 0, cfg.epochs, early_stopping=True)
    scores = history[cfg.monitor]
    if keep == "last" or keep_best.best_weights is None:  # the whole schedule, or no monitor (one class)
      best = len(scores) - 1
    else:
      model.set_weights(keep_best.best_weights)  # the best validation epoch, over every stage
      best = keep_best.best_epoch
    model.save(tmp / "model.keras")
    export_saved_model(model, tmp / "saved_model", cfg.image_size)
    (tmp / "config.json").write_text(cfg.to_json())
    np.savez(tmp / "validation_predictions.npz", probabilities=np.stack(validation.probabilities),
             labels=validation.labels)
    plot_history(history, tmp / "curves.png", best + 1)
    summary = {
        "best_epoch": best + 1, "epochs_run": len(scores), "monitor": cfg.monitor,
        "validation": {k[4:]: history[k][best] for k in history if k.startswith("val_")},
        "augment_on": augment_on, "replicas": strategy.num_replicas_in_sync, "wall_time_s": time.time() - start,
        "train_data": inputs.describe_view(train_data),
        "validation_data": inputs.describe_view(validation_data), "kept": keep,
        **({"sampling": mix.plan(train_data, cfg.data_dir)} if mix is not None else {}),
        "stopped": bool(stopper is not None and stopper.stopped),
    }
    (tmp / "history.json").write_text(json.dumps({"history": history, "summary": summary}, indent=2))
  return summary
