"""`covidct data`: build and describe the covid_ct dataset, write it as arrays."""

from __future__ import annotations

import json

import click

from covidct.cli.options import DATA_DIR, OVERWRITE, friendly, positive


@click.group()
def data():
  """The covid_ct TFDS dataset: build it, describe it."""


@data.command("build")
@click.option("--manual-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with the upstream files (offline). Without it, they are downloaded.")
@DATA_DIR
@friendly
def data_build(manual_dir, data_dir):
  """Build (download and prepare) the covid_ct dataset, verifying every image."""
  from covidct import dataset  # pylint: disable=import-outside-toplevel

  builder = dataset.build(manual_dir=manual_dir, data_dir=data_dir)
  splits = builder.info.splits
  click.echo(f"covid_ct {builder.info.version} ready in {builder.data_dir}: " +
             ", ".join(f"{s} {splits[s].num_examples}" for s in ("train", "validation", "test")))


@data.command("info")
@DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly
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


@data.command("arrays")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--split", "splits", default="train,validation,test", show_default=True,
              help="Comma-separated splits; one SPLIT.npz each.")
@click.option("--image-size", type=int, default=224, show_default=True, callback=positive)
@DATA_DIR
@OVERWRITE
@friendly
def data_arrays(out_dir, splits, image_size, data_dir, overwrite):
  """Write splits as numpy arrays (resized as training resizes them), for machines or frameworks without
  TensorFlow: SPLIT.npz with images (N, S, S, 1) uint8, labels, patient_ids and filenames."""
  from covidct.data import write_arrays  # pylint: disable=import-outside-toplevel

  for name, n, covid in write_arrays(out_dir, splits.split(","), image_size, data_dir, overwrite):
    click.echo(f"{name}: {n} images ({covid} COVID), {image_size}x{image_size}")
