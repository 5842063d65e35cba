"""The `covidct` command: a thin click group. Heavy imports live inside the commands so `--help` is instant."""

from __future__ import annotations

import functools
import json
import os

import click


def _friendly(fn):
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

  return wrapper


def _quiet_tensorflow():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="covidct")
def main():
  """COVID-CT: build the dataset, train, evaluate, export, push and benchmark a COVID-19 CT classifier."""
  _quiet_tensorflow()


@main.group()
def data():
  """The covid_ct TFDS dataset: build it, describe it."""


_DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                         help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")


@data.command("build")
@click.option("--manual-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with the upstream files (offline). Without it, they are downloaded.")
@_DATA_DIR
@_friendly
def data_build(manual_dir, data_dir):
  """Build (download and prepare) the covid_ct dataset, verifying every image."""
  from covidct import dataset  # pylint: disable=import-outside-toplevel

  builder = dataset.build(manual_dir=manual_dir, data_dir=data_dir)
  splits = builder.info.splits
  click.echo(f"covid_ct {builder.info.version} ready in {builder.data_dir}: " +
             ", ".join(f"{s} {splits[s].num_examples}" for s in ("train", "validation", "test")))


@data.command("info")
@_DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_friendly
def data_info(data_dir, as_json):
  """Splits, counts per class, patients per split and image size range of the prepared dataset."""
  from covidct import dataset  # pylint: disable=import-outside-toplevel

  info = dataset.describe(data_dir)
  if as_json:
    click.echo(json.dumps(info, indent=2))
    return
  click.echo(f"covid_ct {info['version']} in {info['data_dir']}")
  click.echo(f"{'split':<11}{'images':>7}{'COVID':>7}{'NonCOVID':>9}{'patients':>9}  {'height':>11}  {'width':>11}")
  for split, s in info["splits"].items():
    click.echo(f"{split:<11}{s['examples']:>7}{s['per_class']['COVID']:>7}{s['per_class']['NonCOVID']:>9}"
               f"{s['patients']:>9}  {s['height'][0]:>5}-{s['height'][1]:<5}  {s['width'][0]:>5}-{s['width'][1]:<5}")


if __name__ == "__main__":
  main()
