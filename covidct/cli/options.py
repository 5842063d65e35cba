"""What the command groups share: the error wrapper, option declarations and option callbacks."""

from __future__ import annotations

import errno
import functools
import re
import sys

import click

from covidct.config import BOOTSTRAP_RESAMPLES, CALIBRATION_IMAGES, RECIPES, TARGET_SENSITIVITY


def friendly(fn):
  """Turns the errors a user can fix into a one-line message and exit code 1, never a traceback."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel

    known: tuple = (CovidctError, FileNotFoundError, FileExistsError)
    try:
      from tfds_covidct.covid_ct.covid_ct_dataset_builder import CovidCtError  # pylint: disable=import-outside-toplevel
      known += (CovidCtError,)
    except ImportError:
      pass
    try:
      from export.errors import ExportError  # pylint: disable=import-outside-toplevel
      known += (ExportError,)
    except ImportError:
      pass
    try:
      return fn(*args, **kwargs)
    except known as e:
      raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except OSError as e:  # read-only, no space, permission, a file where a folder should be...
      raise click.ClickException(os_error_message(e)) from None
    except Exception as e:  # TensorFlow's own errors (e.g. a truncated TFRecord) name no remedy; ours do
      tf = sys.modules.get("tensorflow")
      if tf is None or not isinstance(e, tf.errors.OpError):
        raise
      detail = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:.*$", "", str(e.message).splitlines()[0])[:160]
      raise click.ClickException(f"TensorFlow: {type(e).__name__}: {detail}; the data or model files are damaged: "
                                 "rebuild the dataset (covidct data build) or the model.") from None

  return wrapper


def os_error_message(e: OSError) -> str:
  """One line for an operating-system error: what, where, and what to do."""
  remedy = {errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
            errno.EROFS: "the file system is read-only: choose a writable folder",
            errno.ENOSPC: "the disk is full: free some space", errno.ENOTDIR: "a file stands where a folder should be",
            errno.EISDIR: "a folder stands where a file should be"}.get(e.errno, "check the path")
  where = f" ({e.filename})" if e.filename else ""
  return f"{e.strerror or type(e).__name__}{where}: {remedy}."


DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
SOURCES_ROOT = click.option(
    "--sources-root", type=click.Path(file_okay=False), default=None, metavar="DIR",
    help="A folder holding each source's files as ../shared does (covid-ct/, cc-ccii/, covid-ct-md/): every source "
         "found there is built, offline.")
OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
BOOTSTRAP = click.option("--bootstrap", "n_boot", type=click.IntRange(min=0), default=BOOTSTRAP_RESAMPLES,
                         show_default=True, help="Resamples behind each 95% confidence interval (0: none).")
CALIBRATION = click.option("--calibration-images", type=int, default=CALIBRATION_IMAGES, show_default=True,
                           help="Train-split images that set the 8-bit ranges.")
TARGET = click.option("--target-sensitivity", type=float, default=TARGET_SENSITIVITY, show_default=True,
                      help="The operating threshold is the highest one that reaches this sensitivity.")
QUIET = click.option("--quiet", is_flag=True, help="One line per epoch instead of a progress bar.")
WEIGHTS_DIR = click.option("--weights-dir", type=click.Path(file_okay=False), default=None,
                           help="Backbones: folder with the Keras ImageNet weight files (offline); default: "
                                "Keras's cache.")


def positive(ctx, param, value):  # pylint: disable=unused-argument
  if value is not None and value <= 0:
    raise click.BadParameter(f"must be positive, got {value}.")
  return value


def int_list(ctx, param, value):
  try:
    out = tuple(int(v) for v in value.split(","))
  except ValueError:
    raise click.BadParameter(f"expected comma-separated integers, got {value!r}.") from None
  if not out or min(out) <= 0:
    raise click.BadParameter(f"expected positive integers, got {value!r}.")
  return out


def given(**kwargs) -> dict:
  """The keyword arguments the user gave (not None): the library's defaults hold for the others."""
  return {k: v for k, v in kwargs.items() if v is not None}


# The options that make a TrainConfig: `covidct train` and `covidct cv` take the same ones
# (covidct.config.config_from_options turns them into a config).
TRAINING_OPTIONS = [
    click.option("--recipe", type=click.Choice(list(RECIPES)), default="default", show_default=True,
                 help="'article': the article's recipe as written; 'default': one that learns on the official split; "
                      "'finetune': ImageNet MobileNetV2, head then whole network; 'mixed': finetune on COVID-CT and "
                      "CC-CCII at once."),
    click.option("--model", default=None, help="Architecture: final, basic, too_simple, mobilenet_v2_0.35, "
                                               "mobilenet_v2_0.5, mobilenet_v2_1.0 (default: the recipe's)."),
    click.option("--epochs", type=int, default=None, callback=positive),
    click.option("--batch-size", type=int, default=None, callback=positive, help="Per replica."),
    click.option("--image-size", type=int, default=None, callback=positive),
    click.option("--learning-rate", type=float, default=None, callback=positive),
    click.option("--seed", type=int, default=None),
    click.option("--strategy", type=click.Choice(["default", "mirrored", "multi-worker"]), default=None,
                 help="tf.distribute strategy: one device, all local devices, or the cluster in TF_CONFIG."),
    click.option("--mixed-precision", is_flag=True, default=None, help="mixed_float16 (GPU only)."),
    click.option("--augment-on", type=click.Choice(["auto", "pipeline", "model"]), default=None,
                 help="Where augmentation runs: tf.data on the CPU, or the training step on the accelerator."),
    click.option("--augment/--no-augment", default=None,
                 help="The article's augmentation on the training split (default: the recipe's choice)."),
    click.option("--noise", type=float, default=None,
                 help="Std of Gaussian pixel noise, in grey levels, added to the augmented training images (needs "
                      "augmentation)."),
    click.option("--resolution", type=float, default=None,
                 help="Simulate low-resolution sources: scale each augmented training image down to a random fraction "
                      "of its size, between this and 1, and back up (needs augmentation; 0 turns it off)."),
    click.option("--contrast", type=float, default=None, metavar="FRACTION",
                 help="Scale each augmented training image's contrast about its mean by a random factor in "
                      "[1 - FRACTION, 1 + FRACTION] (needs augmentation; 0 turns it off)."),
    click.option("--brightness", type=float, default=None, metavar="FRACTION",
                 help="Shift each augmented training image's brightness by a random fraction of 255 in "
                      "[-FRACTION, FRACTION] (needs augmentation; 0 turns it off)."),
    *[click.option(f"--{name}", type=float, default=None, metavar="FRACTION",
                   help=f"{what} each augmented training image by a random fraction up to this (needs augmentation; "
                        "the recipes use 0.05).") for name, what in (("zoom", "Zoom in or out"), ("shift", "Shift"))],
    click.option("--resize-methods/--no-resize-methods", default=None,
                 help="Resize each augmented training image by a method drawn at random (bilinear with and without "
                      "antialiasing, area, bicubic, nearest), so consumers' resizes agree (needs augmentation)."),
    click.option("--jpeg-quality", type=int, default=None, metavar="Q",
                 help="Re-compress every augmented training image as JPEG at a random quality from Q to 100, both "
                      "classes alike (needs augmentation; 0 turns it off)."),
    click.option("--head-epochs", type=int, default=None, help="Backbones: epochs on a frozen backbone first."),
    click.option("--fine-tune-learning-rate", type=float, default=None, callback=positive,
                 help="Backbones: the learning rate once the backbone is unfrozen (default: the recipe's)."),
    click.option("--fine-tune-from", default=None, metavar="LAYER",
                 help="Backbones: fine-tune only from this backbone layer up, an index or a name prefix such as "
                      "block_13 (default: the whole backbone)."),
    click.option("--label-smoothing", type=float, default=None),
    click.option("--blur", type=float, default=None, metavar="SIGMA",
                 help="A fixed Gaussian low-pass (sigma in pixels) inside the model, so every source is equally sharp."),
    click.option("--normalize", type=click.Choice(["none", "image"]), default=None,
                 help="Intensity normalisation inside the model: 'image' standardises every image by its own mean "
                      "and standard deviation (in training and in every exported copy); default: the recipe's (none)."),
    click.option("--mixup", type=float, default=None, metavar="ALPHA",
                 help="mixup on the training batches: pairs of images and their labels mixed with a Beta(ALPHA, ALPHA) "
                      "weight (0.2-0.4 is usual; 0 turns it off)."),
    click.option("--freeze-batch-norm/--train-batch-norm", default=None,
                 help="Backbones: keep batch norm in inference mode (ImageNet statistics) while fine-tuning, or let "
                      "it learn the batch statistics (default: the recipe's; `finetune` freezes it)."),
    click.option("--weights", default=None, metavar="imagenet|none|FILE",
                 help="Backbones: the starting weights: ImageNet (default), none (random), or a backbone weights file "
                      "such as the backbone.weights.h5 of `covidct pretrain`."),
    click.option("--sources", default=None, metavar="LIST",
                 help="Train on these sources' train splits at once, e.g. covid_ct,cc_ccii (default: covid_ct). "
                      "covid_ct_md is an external test site and cannot be trained on."),
    click.option("--source-weights", default=None, metavar="LIST",
                 help="With several sources: each one's share of the training images, same order (default: equal)."),
    click.option("--class-balance/--no-class-balance", default=None,
                 help="With several sources: draw each source's classes in equal shares (default) or as they come."),
    click.option("--epoch-images", type=int, default=None,
                 help="With several sources: images drawn per epoch (default 0: as many as the sources hold)."),
    click.option("--slices-per-patient", type=int, default=None,
                 help="Keep at most this many training images of each patient, drawn once from the seed (0: all)."),
    WEIGHTS_DIR,
    DATA_DIR,
]


def training_options(fn):
  for option in reversed(TRAINING_OPTIONS):
    fn = option(fn)
  return fn
