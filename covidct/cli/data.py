"""`covidct data`: build and describe the covid_ct dataset, write it as arrays."""

from __future__ import annotations

import json

import click

from covidct.cli.options import DATA_DIR, OVERWRITE, SOURCES_ROOT, friendly, positive


@click.group()
def data():
  """The covid_ct TFDS dataset and its sources (covid_ct, cc_ccii, covid_ct_md): build them, describe them."""


CONFIG = click.option("--config", "config", default=None, metavar="NAME|all",
                      help="The source (builder config): covid_ct (the default), cc_ccii, covid_ct_md, or all.")


@data.command("build")
@click.option("--manual-dir", "manual_dirs", multiple=True, type=click.Path(file_okay=False), metavar="[SOURCE=]PATH",
              help="Folder with a source's files (offline): PATH for the one source built, SOURCE=PATH for each of "
                   "several (e.g. --config all --manual-dir covid_ct=../shared/covid-ct --manual-dir "
                   "cc_ccii=../shared/cc-ccii --manual-dir covid_ct_md=../shared/covid-ct-md). Without it, covid_ct "
                   "is downloaded; the other sources are built from a local copy only.")
@SOURCES_ROOT
@CONFIG
@DATA_DIR
@friendly
def data_build(manual_dirs, sources_root, config, data_dir):
  """Build (download and prepare) covid_ct sources, verifying every image against its shipped hashes."""
  from covidct import dataset  # pylint: disable=import-outside-toplevel

  sources = dataset.parse_sources(config) if config else None
  if sources and len(sources) == 1 and not sources_root:
    dirs = dataset.parse_manual_dirs(manual_dirs, sources)
  else:  # without --config: the sources named (SOURCE=PATH) or found (--sources-root); else the default one
    dirs = dataset.manual_dirs_for(manual_dirs, sources_root, need=sources or ())
    dirs = {s: dirs.get(s) for s in sources} if sources else (dirs or {dataset.DEFAULT_SOURCE: None})
  before = set(dataset.prepared_sources(data_dir))
  built = dataset.build_sources(dirs, data_dir=data_dir, progress=click.echo if len(dirs) > 1 else None)
  for source, builder in built.items():
    splits = builder.info.splits
    reused = (f" (already prepared: {dirs[source]} was not read again; to rebuild from it, delete "
              f"{builder.data_dir} first)" if source in before and dirs.get(source) else "")
    click.echo(f"covid_ct/{source} {builder.info.version} ready in {builder.data_dir}: " +
               ", ".join(f"{s} {splits[s].num_examples}" for s in splits) + reused)


@data.command("info")
@CONFIG
@DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly
def data_info(config, data_dir, as_json):
  """Splits, counts per class (and diagnosis), patients per split and image size range of each prepared source
  (default: every source prepared in the data dir)."""
  from covidct import dataset  # pylint: disable=import-outside-toplevel

  if config:
    sources = dataset.parse_sources(config)
  else:
    sources = dataset.prepared_sources(data_dir) or (dataset.DEFAULT_SOURCE,)  # none: the default's clear error
  infos = [dataset.describe(data_dir, source) for source in sources]
  if as_json:
    click.echo(json.dumps(infos[0] if len(infos) == 1 else {"sources": infos}, indent=2))
    return
  for n, info in enumerate(infos):
    if n:
      click.echo("")
    click.echo(f"{info['dataset']} {info['version']} in {info['data_dir']}")
    diagnoses = next(iter(info["splits"].values())).get("per_diagnosis")
    extra = "".join(f"{d:>18}" for d in diagnoses) if diagnoses else ""
    click.echo(f"{'split':<11}{'images':>7}{'COVID':>7}{'NonCOVID':>9}{'patients':>9}  {'height':>11}  {'width':>11}"
               + extra)
    for split, s in info["splits"].items():
      diag = "".join(f"{v:>18}" for v in s["per_diagnosis"].values()) if diagnoses else ""
      click.echo(f"{split:<11}{s['examples']:>7}{s['per_class']['COVID']:>7}{s['per_class']['NonCOVID']:>9}"
                 f"{s['patients']:>9}  {s['height'][0]:>5}-{s['height'][1]:<5}  {s['width'][0]:>5}-{s['width'][1]:<5}"
                 + diag)


@data.command("arrays")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--split", "splits", default="train,validation,test", show_default=True,
              help="Comma-separated splits; one SPLIT.npz each.")
@click.option("--image-size", type=int, default=224, show_default=True, callback=positive)
@click.option("--config", "config", default="covid_ct", show_default=True,
              help="The source: covid_ct, cc_ccii or covid_ct_md (test only).")
@DATA_DIR
@OVERWRITE
@friendly
def data_arrays(out_dir, splits, image_size, config, data_dir, overwrite):
  """Write splits as numpy arrays (resized as training resizes them), for machines or frameworks without
  TensorFlow: SPLIT.npz with images (N, S, S, 1) uint8, labels, patient_ids and filenames."""
  from covidct.data import write_arrays  # pylint: disable=import-outside-toplevel

  from covidct.dataset import check_source  # pylint: disable=import-outside-toplevel

  for name, n, covid in write_arrays(out_dir, splits.split(","), image_size, data_dir, overwrite,
                                     source=check_source(config)):
    click.echo(f"{name}: {n} images ({covid} COVID), {image_size}x{image_size}")
