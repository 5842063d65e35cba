"""Frozen configs with good defaults, and the named training recipes."""

from __future__ import annotations

import dataclasses
import json

from covidct.errors import CovidctError

# Defaults that several commands share, each written once here.
TARGET_SENSITIVITY = 0.90  # the operating threshold is the highest one that reaches this sensitivity
BOOTSTRAP_RESAMPLES = 1000  # resamples behind every 95% confidence interval
CALIBRATION_IMAGES = 200  # train images that calibrate int8 ranges (export, qat)
# Quantization-aware weights on a 7-bit grid ([-63, 63] per output channel, stored as int8). CPUs without VNNI (AVX2:
# AMD EPYC Zen 2/3, older Xeons) multiply uint8 activations by int8 weights with VPMADDUBSW, which adds each pair of
# products in 16 bits with saturation: 255 x 127 x 2 = 64,770 is clipped to 32,767, while 255 x 63 x 2 = 32,130 fits.
# OpenVINO has no setting against it (ONNX Runtime's exact one costs VNNI CPUs their fast kernels): with 8-bit
# weights its int8 copies of the model of record agreed with the SavedModel on 93.6% of test decisions under
# oneDNN's AVX2 kernels (parity fails), with 7-bit weights they compute what its VNNI kernels compute.
QAT_WEIGHT_BITS = 7
WEIGHT_BITS_CHOICES = (7, 8)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The article's light augmentation (Keras ImageDataGenerator settings), as fractions and degrees."""

  horizontal_flip: bool = True
  rotation_degrees: float = 5.0
  shift: float = 0.05
  shear: float = 0.05
  zoom: float = 0.05
  noise: float = 0.0  # std of Gaussian pixel noise, in grey levels (0-255); not in the article's recipe
  # Smallest simulated source resolution, as a fraction of the input size: each image is scaled down to one of
  # RESOLUTION_LEVELS fractions between this and 1 and back up, so sharpness stops telling classes apart
  # (train COVID images are much smaller than the others; val/test ones are not). 0 (or 1) turns it off.
  resolution: float = 0.0
  # Intensity, per image, after the warp: contrast scales about the image's mean by a factor in [1 - c, 1 + c];
  # brightness adds a shift in [-b, b] x 255. Sources window and export their scans differently. 0 turns each off.
  contrast: float = 0.0
  brightness: float = 0.0
  # Each training image resized (from its original size) by a method drawn per image and epoch from
  # covidct.data.RESIZE_VARIANTS (antialiased bilinear as in inference, bilinear, area, bicubic, nearest), so a
  # consumer who resizes another way gets the same decisions (the parity report's skew table).
  resize_methods: bool = False
  # JPEG re-compression of every training image (both classes) at a quality drawn per image and epoch from
  # [jpeg_quality, 100): the crawled non-COVID images are JPEGs and the paper figures PNGs (the shortcut audit's
  # largest image-statistics coefficient), so compression artefacts stop telling the classes apart. 0: off.
  jpeg_quality: int = 0

  def __post_init__(self):
    if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int) or not (
        self.jpeg_quality == 0 or 1 <= self.jpeg_quality < 100):
      raise CovidctError(f"jpeg_quality must be 0 (off) or a JPEG quality from 1 to 99, got {self.jpeg_quality!r}.")


# How `lung_crop` cuts an image down (covidct.audit.crop_to_lungs): the lung field alone, or everything in its box.
LUNG_CROPS = ("field", "box")
NORMALIZATIONS = ("", "image")  # TrainConfig.normalize


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run depends on; written next to the model as config.json."""

  recipe: str = "default"
  model: str = "final"
  image_size: int = 248
  batch_size: int = 32
  epochs: int = 40
  learning_rate: float = 1e-3
  monitor: str = "val_auc"  # the validation metric that selects the epoch kept
  patience: int = 20  # early stopping on `monitor`; best weights restored
  class_weight: bool = True  # balance the classes in the loss
  augment: AugmentConfig | None = dataclasses.field(default_factory=AugmentConfig)
  augment_on: str = "auto"  # 'pipeline' (tf.data, CPU), 'model' (the training step, on the accelerator), 'auto'
  seed: int = 0
  strategy: str = "default"  # 'default', 'mirrored', 'multi-worker'
  mixed_precision: bool = False
  data_dir: str | None = None
  shuffle_buffer: int = 1024
  # Pretrained backbones (mobilenet_v2_*): weights, head, and the two-stage fine-tuning schedule.
  weights: str | None = "imagenet"  # 'imagenet', a file path, or None for a random init
  weights_dir: str | None = None  # a folder holding the Keras weight files (offline); else Keras's cache/download
  dropout: float = 0.2  # before the sigmoid head of a backbone model
  head_epochs: int = 0  # > 0: first train the head on a frozen backbone for this many epochs, then fine-tune
  fine_tune_learning_rate: float = 1e-4
  # Backbone layers below this one stay frozen while fine-tuning: a layer index, or a layer name or name prefix
  # ('block_13' = from the first layer of MobileNetV2's block 13 up). 0 fine-tunes the whole backbone.
  fine_tune_from: int | str = 0
  label_smoothing: float = 0.0
  # Per-image intensity normalisation inside the model (covidct.layers.PerImageStandardize): 'image' standardises
  # every image by its own mean and standard deviation, in training and in every exported copy; '' for none.
  normalize: str = ""
  blur: float = 0.0  # sigma, in pixels at image_size, of a fixed Gaussian low-pass inside the model; 0: none
  # mixup's alpha: training batches mixed pairwise, lam ~ Beta(alpha, alpha); labels become soft and the class
  # weight follows the rounded label. 0: off. In the tf.data pipeline, whatever `augment_on` says.
  mixup: float = 0.0
  # Fine-tuning: keep the backbone's batch norm layers frozen (inference mode: ImageNet statistics, fixed scale and
  # shift). Off, the unfrozen layers normalise with batch statistics and update them: in Keras 3, fit's
  # training=True overrides the training=False the backbone is called with (keras-team/keras#20285).
  freeze_batch_norm: bool = False
  # De-confounding preprocessing outside the model (covidct.audit.crop_to_lungs): every image cut down to its lung
  # field ('field': the field alone, the rest black) or to the field's box ('box': all that is inside it) before it
  # reaches the model; '' for none. Only `covidct cv` runs it so far (its audit applies it); a model trained with
  # it cannot score uncropped images, so evaluate, export and predict refuse its runs.
  lung_crop: str = ""
  # The sources trained on (covid_ct builder configs), each from its own train split (or train + validation, or
  # cross-validation's folds). With more than one, every epoch samples them (covidct.data.Mix): each source with its
  # weight in `source_weights` (same order; empty: equal shares), its classes in equal shares with `class_balance`
  # (then the loss's class_weight is not applied: the sampling balances), `epoch_images` images an epoch (0: as many
  # as the sources hold). `slices_per_patient` > 0 keeps at most that many training images of each patient, drawn
  # once from `seed` (CC-CCII has up to ~100 slices of one patient).
  sources: tuple[str, ...] = ("covid_ct",)
  source_weights: tuple[float, ...] = ()
  class_balance: bool = True
  epoch_images: int = 0
  slices_per_patient: int = 0

  def __post_init__(self):
    for name in ("image_size", "batch_size", "epochs"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise CovidctError(f"{name} must be a positive integer, got {value!r}.")
    if self.image_size < 32:
      raise CovidctError(f"image_size must be at least 32 pixels, got {self.image_size}.")
    if not self.learning_rate > 0:
      raise CovidctError(f"learning_rate must be positive, got {self.learning_rate!r}.")
    if self.patience < 0:
      raise CovidctError(f"patience must be zero or more, got {self.patience}.")
    if self.augment_on not in ("auto", "pipeline", "model"):
      raise CovidctError(f"augment_on must be 'auto', 'pipeline' or 'model', got {self.augment_on!r}.")
    if self.strategy not in STRATEGIES:
      raise CovidctError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    if self.head_epochs < 0 or not self.fine_tune_learning_rate > 0 or not 0 <= self.label_smoothing < 1:
      raise CovidctError("head_epochs must be >= 0, fine_tune_learning_rate > 0 and label_smoothing in [0, 1).")
    if isinstance(self.fine_tune_from, bool) or not (
        (isinstance(self.fine_tune_from, int) and self.fine_tune_from >= 0)
        or (isinstance(self.fine_tune_from, str) and self.fine_tune_from)):
      raise CovidctError(f"fine_tune_from must be a layer index >= 0 or a layer name, got {self.fine_tune_from!r}.")
    if not 0 <= self.blur <= 8:
      raise CovidctError(f"blur must be a Gaussian sigma from 0 (off) to 8 pixels, got {self.blur!r}.")
    if self.normalize not in NORMALIZATIONS:
      raise CovidctError(f"normalize must be 'image' (per-image standardisation) or empty for none, got "
                         f"{self.normalize!r}.")
    if not 0 <= self.mixup <= 10:
      raise CovidctError(f"mixup must be a Beta alpha from 0 (off) to 10, got {self.mixup!r}.")
    if self.lung_crop not in ("",) + LUNG_CROPS:
      raise CovidctError(f"lung_crop must be one of {', '.join(LUNG_CROPS)} (or empty for none), got {self.lung_crop!r}.")
    if self.monitor not in ("val_auc", "val_loss"):
      raise CovidctError(f"monitor must be 'val_auc' or 'val_loss', got {self.monitor!r}.")
    from covidct.dataset import EXTERNAL_ONLY, SOURCES  # pylint: disable=import-outside-toplevel

    sources = tuple(self.sources) if isinstance(self.sources, (list, tuple)) else ()
    if not sources or len(set(sources)) != len(sources) or any(s not in SOURCES for s in sources):
      raise CovidctError(f"sources must name different sources among {', '.join(SOURCES)}, got {self.sources!r}.")
    external = [s for s in sources if s in EXTERNAL_ONLY]
    if external:
      raise CovidctError(f"{', '.join(external)} is an external test site (a test split only): it cannot be trained "
                         "on; train on covid_ct and/or cc_ccii.")
    object.__setattr__(self, "sources", sources)
    weights = tuple(float(w) for w in self.source_weights)
    if weights and (len(weights) != len(sources) or any(not w > 0 for w in weights)):
      raise CovidctError(f"source_weights needs one weight > 0 per source ({', '.join(sources)}), got {weights}.")
    if weights and abs(sum(weights) - 1) > 1e-6:
      weights = tuple(w / sum(weights) for w in weights)
    if not weights and len(sources) > 1:  # equal shares, written out so that config.json records them
      weights = tuple(1 / len(sources) for _ in sources)
    object.__setattr__(self, "source_weights", weights)
    for name in ("epoch_images", "slices_per_patient"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CovidctError(f"{name} must be an integer >= 0 (0: all), got {value!r}.")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    d = dict(d)
    if d.get("augment") is not None:
      d["augment"] = AugmentConfig(**d["augment"])
    for name in ("sources", "source_weights"):  # JSON lists
      if isinstance(d.get(name), list):
        d[name] = tuple(d[name])
    return cls(**d)


STRATEGIES = ("default", "mirrored", "multi-worker")

# The named recipes. `article` is the article's, as written; `default` is one that learns on the official split.
RECIPES = {
    "article": TrainConfig(recipe="article", batch_size=64, epochs=40, learning_rate=0.01, monitor="val_loss",
                           patience=7, class_weight=False),
    # Measured on validation (seed 0): with the article's augmentation the final model had not started to learn
    # after 23 epochs (validation AUC ~0.55); without it, validation AUC reached 0.766 by epoch 25. So: no
    # augmentation, 40 epochs, keep the best validation-AUC epoch.
    "default": TrainConfig(recipe="default", augment=None, patience=40),
    # Transfer learning: ImageNet MobileNetV2, head on a frozen backbone, then the whole network at a lower rate.
    # Each choice by patient-grouped 5-fold cross-validation (docs/results/cross-validation.md): batch norm stays in
    # inference mode (ImageNet statistics; 0.886 +- 0.046 against 0.820 +- 0.044 trained, ahead on all 5 folds);
    # 2 head + 10 fine-tuning epochs at 3e-4 tie the 8 + 25 at 1e-4 (0.880 +- 0.049 against 0.886; paired difference
    # 0.006, 0.3 standard errors) in 43% of the training time, so the cheaper schedule is the recipe.
    "finetune": TrainConfig(recipe="finetune", model="mobilenet_v2_0.5", image_size=224, batch_size=32,
                            head_epochs=2, epochs=10, learning_rate=1e-3, fine_tune_learning_rate=3e-4, patience=10,
                            freeze_batch_norm=True),
    # `finetune` on two sources at once: COVID-CT and CC-CCII's train splits, each half of every epoch and each class
    # half of its source's share, at most 4 slices per patient (CC-CCII has up to ~100 of one patient). Patience 0:
    # the whole schedule, so that the main job keeps the validation splits untouched and fits its operating threshold
    # there (covidct.evaluate.calibration_threshold). By the protocol (docs/results/sources.md): patient-grouped folds
    # 0.947 +- 0.016, leave-one-source-out 0.572 (COVID-CT held out) and 0.826 (CC-CCII held out).
    "mixed": TrainConfig(recipe="mixed", model="mobilenet_v2_0.5", image_size=224, batch_size=32, head_epochs=2,
                         epochs=10, learning_rate=1e-3, fine_tune_learning_rate=3e-4, patience=0,
                         freeze_batch_norm=True, sources=("covid_ct", "cc_ccii"), slices_per_patient=4),
}


# The recipe the main job (`covidct pipeline`) trains and ships by default: `finetune` on COVID-CT and CC-CCII, its
# threshold fitted on both validation splits (docs/results/sources.md has the protocol that chose it).
MODEL_OF_RECORD = "mixed"


@dataclasses.dataclass(frozen=True)
class CrossValidated:
  """What `covidct cv` fixed for a recipe's final model, which trains on all of train + validation, so that no
  held-out data is left to pick its epoch or its threshold: the schedule (the epoch count with the best mean fold
  ROC AUC), and the operating threshold and temperature chosen on the pooled out-of-fold probabilities. The
  figures are the ones it was chosen by (mean +- sd over folds), for the reports; `command` reproduces them."""

  epochs: int  # head + fine-tuning epochs: the recipe's head_epochs + epochs
  threshold: float  # for TARGET_SENSITIVITY on the out-of-fold probabilities of the float model
  temperature: float  # fitted on the out-of-fold probabilities; `covidct qat` divides the logits by it
  roc_auc: float
  roc_auc_sd: float
  pooled_roc_auc: float
  sensitivity: float  # each fold at the threshold chosen on the other folds, mean over folds
  specificity: float
  folds: int
  command: str
  measured: str  # where and when

  def __post_init__(self):
    if self.epochs <= 0 or not 0 < self.threshold < 1 or not self.temperature > 0 or self.folds < 2:
      raise CovidctError("a cross-validation record needs epochs > 0, a threshold in (0, 1), a temperature > 0 "
                         "and at least 2 folds.")

  def quantized_threshold(self) -> float:
    """The threshold for the quantization-aware copy, whose probabilities are sigmoid(logit / temperature)."""
    import math  # pylint: disable=import-outside-toplevel

    return 1.0 / (1.0 + math.exp(-math.log(self.threshold / (1.0 - self.threshold)) / self.temperature))


# docs/results/cross-validation.md holds the table each record comes from.
CROSS_VALIDATED = {
    "finetune": CrossValidated(
        epochs=12, threshold=0.14451168477535248, temperature=1.5030534932970885, roc_auc=0.880, roc_auc_sd=0.049,
        pooled_roc_auc=0.835, sensitivity=0.880, specificity=0.542, folds=5,
        command="covidct cv --recipe finetune --weights-dir ../shared/keras-weights --out CV --data-dir D",
        measured="2026-12-01 on a 2-core Intel Xeon (Sapphire Rapids, AVX-512), fold seed 0, training seed 0"),
}


def config_from_options(recipe: str = "default", *, augment: bool | None = None, noise: float | None = None,
                        resolution: float | None = None, contrast: float | None = None,
                        brightness: float | None = None, zoom: float | None = None, shift: float | None = None,
                        weights: str | None = None,
                        fine_tune_from: int | str | None = None, resize_methods: bool | None = None,
                        jpeg_quality: int | None = None, sources: str | tuple | None = None,
                        source_weights: str | tuple | None = None, **overrides) -> TrainConfig:
  """The TrainConfig that `covidct train` / `covidct cv` options describe: the recipe, with every option given (not
  None) replacing its value. `augment` turns the recipe's augmentation on (the article's) or off; noise, resolution,
  contrast and brightness change it and need it on; `weights` is 'imagenet', 'none' or a weights file;
  `fine_tune_from` a layer index or name (digits are an index); `sources` and `source_weights` comma-separated
  lists. Raises CovidctError on any bad value."""
  import os  # pylint: disable=import-outside-toplevel

  from covidct.dataset import parse_sources  # pylint: disable=import-outside-toplevel

  if overrides.get("normalize") == "none":
    overrides["normalize"] = ""
  if isinstance(sources, str):
    overrides["sources"] = parse_sources(sources, allow_all=False)
  elif sources is not None:
    overrides["sources"] = tuple(sources)
  if isinstance(source_weights, str):
    try:
      overrides["source_weights"] = tuple(float(w) for w in source_weights.split(","))
    except ValueError:
      raise CovidctError(f"--source-weights takes comma-separated numbers, got {source_weights!r}.") from None
  elif source_weights is not None:
    overrides["source_weights"] = tuple(source_weights)

  from covidct.models import MODELS  # pylint: disable=import-outside-toplevel

  model = overrides.get("model")
  if model is not None and model not in MODELS:
    raise CovidctError(f"unknown model {model!r}; choose one of {', '.join(sorted(MODELS))}.")
  if isinstance(fine_tune_from, str) and fine_tune_from.lstrip("-").isdigit():
    fine_tune_from = int(fine_tune_from)
  cfg = resolve(recipe, fine_tune_from=fine_tune_from, **overrides)
  if augment is not None:
    cfg = dataclasses.replace(cfg, augment=(cfg.augment or AugmentConfig()) if augment else None)
  if weights is not None:
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
      raise CovidctError(f"--weights {weights}: no such file; give imagenet, none, or a backbone weights file.")
    cfg = dataclasses.replace(cfg, weights=None if weights == "none" else weights if weights == "imagenet"
                              else os.path.abspath(weights))
  extra = {}
  if noise is not None:
    if noise < 0:
      raise CovidctError(f"--noise must be zero or more grey levels, got {noise}.")
    extra["noise"] = noise
  for name, value in (("resolution", resolution), ("contrast", contrast), ("brightness", brightness), ("zoom", zoom),
                      ("shift", shift)):
    if value is not None:
      if not 0 <= value < 1:
        raise CovidctError(f"--{name} must be a fraction from 0 (off) up to, not including, 1; got {value}.")
      extra[name] = value
  if resize_methods or (resize_methods is not None and cfg.augment is not None):
    extra["resize_methods"] = resize_methods
  if jpeg_quality is not None:
    if not 0 <= jpeg_quality < 100:
      raise CovidctError(f"--jpeg-quality must be 0 (off) or a JPEG quality from 1 to 99, got {jpeg_quality}.")
    if jpeg_quality or cfg.augment is not None:
      extra["jpeg_quality"] = jpeg_quality
  if extra:
    if cfg.augment is None:
      names = " and ".join(f"--{k.replace('_', '-')}" for k in extra)
      verb = "needs" if len(extra) == 1 else "need"
      raise CovidctError(f"{names} {verb} augmentation, and the '{recipe}' recipe has none: add --augment.")
    cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, **extra))
  return cfg


def resolve(recipe: str = "default", **overrides) -> TrainConfig:
  """The recipe's config with the given fields replaced (None means: keep the recipe's value)."""
  if recipe not in RECIPES:
    raise CovidctError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}.")
  overrides = {k: v for k, v in overrides.items() if v is not None}
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise CovidctError(f"unknown config fields {sorted(unknown)}; known: {sorted(fields)}.")
  return dataclasses.replace(RECIPES[recipe], **overrides)


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """When `covidct push` blesses a model: on its test split figures, recomputed from the SavedModel at push time
  (the test split chose nothing: the threshold was chosen on validation), against fixed floors and against the last
  blessed version. The floors are the least any shipped version may do; the specificity floor refuses a threshold
  pushed down until everything is called COVID. covidct.push.bless holds every prepared source's test split to the
  same floors (the external site, COVID-CT-MD, to the ROC AUC floor)."""

  min_roc_auc: float = 0.70
  min_sensitivity: float = 0.75  # at the shipped operating threshold
  min_specificity: float = 0.50  # at the shipped operating threshold
  max_regression: float = 0.02  # test ROC AUC at most this far below the last blessed version's

  def __post_init__(self):
    for name in ("min_roc_auc", "min_sensitivity", "min_specificity", "max_regression"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise CovidctError(f"{name} must be a number from 0 to 1, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Self-supervised (SimCLR) pretraining of a backbone on unlabeled images, before `finetune` (covidct.pretrain)."""

  model: str = "mobilenet_v2_0.5"
  image_size: int = 224
  epochs: int = 600
  batch_size: int = 128  # images per step; the contrastive loss sees twice as many views
  learning_rate: float = 2e-4  # AdamW, for the backbone and the projection head alike (the backbone starts trained)
  weight_decay: float = 1e-5
  temperature: float = 0.2
  projection_dim: int = 128
  hidden_dim: int = 512
  seed: int = 0
  weights: str | None = "imagenet"  # the starting point: as in TrainConfig
  weights_dir: str | None = None
  checkpoint_every: int = 50  # epochs between backbone checkpoints (and linear probes); 0: only the last epoch
  # The two views' augmentation: zoom in by up to `crop` of the side (a random crop), rotation, shift, contrast,
  # brightness (fractions) and Gaussian noise (grey levels).
  crop: float = 0.4
  rotation_degrees: float = 15.0
  shift: float = 0.1
  contrast: float = 0.4
  brightness: float = 0.2
  noise: float = 5.0

  def __post_init__(self):
    for name in ("image_size", "batch_size", "epochs", "projection_dim", "hidden_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise CovidctError(f"{name} must be a positive integer, got {value!r}.")
    if self.image_size < 32:
      raise CovidctError(f"image_size must be at least 32 pixels, got {self.image_size}.")
    if self.batch_size < 2:
      raise CovidctError(f"batch_size must be at least 2 (the loss contrasts images of a batch), got {self.batch_size}.")
    if not self.learning_rate > 0 or not self.temperature > 0 or self.weight_decay < 0:
      raise CovidctError("learning_rate and temperature must be positive, weight_decay zero or more; got "
                         f"{self.learning_rate!r}, {self.temperature!r}, {self.weight_decay!r}.")
    if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
      raise CovidctError(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}.")
    if not (0 <= self.crop < 1 and 0 <= self.shift < 1 and 0 <= self.contrast < 1 and 0 <= self.brightness < 1):
      raise CovidctError("crop, shift, contrast and brightness are fractions from 0 up to, not including, 1.")
    if self.rotation_degrees < 0 or self.noise < 0:
      raise CovidctError("rotation_degrees and noise must be zero or more.")
