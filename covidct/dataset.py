"""Building and describing the prepared `covid_ct` TFDS dataset, one builder config per source."""

from __future__ import annotations

import os

from covidct.errors import CovidctError

DATASET = "covid_ct"
SPLITS = ("train", "validation", "test")
# The builder's configs (tfds_covidct.covid_ct), one per source; the first is the default (`tfds.load('covid_ct')`).
SOURCES = ("covid_ct", "cc_ccii", "covid_ct_md")
DEFAULT_SOURCE = SOURCES[0]
# The splits of each source, and what each source's manual dir holds (for messages).
SOURCE_SPLITS = {"covid_ct": SPLITS, "cc_ccii": SPLITS, "covid_ct_md": ("test",)}
SOURCE_FOLDERS = {  # the folder of ../shared each source's files are in, in this project's layout
    "covid_ct": "covid-ct", "cc_ccii": "cc-ccii", "covid_ct_md": "covid-ct-md"}
SOURCE_TITLES = {"covid_ct": "COVID-CT (paper figures and web images)", "cc_ccii": "CC-CCII (Chinese hospitals)",
                 "covid_ct_md": "COVID-CT-MD (Tehran, one centre)"}
# Sources no model here trains on: a test set from a site kept out of training.
EXTERNAL_ONLY = ("covid_ct_md",)


def check_source(name: str) -> str:
  if name not in SOURCES:
    raise CovidctError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}.")
  return name


def parse_sources(text: str, allow_all: bool = True) -> tuple[str, ...]:
  """'covid_ct,cc_ccii' (or 'all') -> ('covid_ct', 'cc_ccii'); one clear error for an unknown or repeated name."""
  names = [n.strip() for n in str(text).split(",") if n.strip()]
  if allow_all and names == ["all"]:
    return SOURCES
  if not names:
    raise CovidctError(f"name at least one source: {', '.join(SOURCES)}{' or all' if allow_all else ''}.")
  for n in names:
    check_source(n)
  if len(set(names)) != len(names):
    raise CovidctError(f"a source is named twice in {text!r}.")
  return tuple(names)


def parse_manual_dirs(values, sources: tuple[str, ...]) -> dict[str, str | None]:
  """`--manual-dir` values ('PATH' for the one source built, or 'SOURCE=PATH' each) -> {source: path or None}."""
  out: dict[str, str | None] = {s: None for s in sources}
  for value in values or ():
    name, sep, path = str(value).partition("=")
    if sep and name in SOURCES:
      if name not in out:
        raise CovidctError(f"--manual-dir {value}: {name} is not among the sources built ({', '.join(sources)}).")
      out[name] = path
    elif len(sources) == 1:
      out[sources[0]] = str(value)
    else:
      raise CovidctError(f"--manual-dir {value}: with several sources, name each one's folder as SOURCE=PATH "
                         f"(e.g. --manual-dir cc_ccii=../shared/cc-ccii).")
  return out


def manual_dirs_for(manual_dirs=(), sources_root: str | None = None,
                    need: tuple[str, ...] = (DEFAULT_SOURCE,)) -> dict[str, str | None]:
  """The sources to build and each one's manual dir, from `--manual-dir` values ([SOURCE=]PATH) and/or a
  `--sources-root` folder laid out as ../shared is (covid-ct/, cc-ccii/, covid-ct-md/: every one found there is
  built). The sources in `need` are always among them (covid_ct may then download; the others fail clearly)."""
  found: dict[str, str | None] = {}
  if sources_root is not None:
    if not os.path.isdir(sources_root):
      raise CovidctError(f"--sources-root {sources_root} is not a folder; point it at a folder holding "
                         f"{', '.join(f + '/' for f in SOURCE_FOLDERS.values())} (as ../shared does).")
    found = {s: os.path.join(sources_root, f) for s, f in SOURCE_FOLDERS.items()
             if os.path.isdir(os.path.join(sources_root, f))}
  named = tuple(s for s in SOURCES if any(str(v).startswith(f"{s}=") for v in manual_dirs or ()))
  plain = [v for v in manual_dirs or () if not any(str(v).startswith(f"{s}=") for s in SOURCES)]
  if len(plain) > 1 or (plain and DEFAULT_SOURCE in named):
    raise CovidctError("--manual-dir PATH (no SOURCE=) names covid_ct's folder; give it once, and SOURCE=PATH for "
                       "the others.")
  given = parse_manual_dirs([v for v in manual_dirs or () if v not in plain], named) if named else {}
  found.update({s: v for s, v in given.items() if v is not None})
  if plain:
    found[DEFAULT_SOURCE] = str(plain[0])
  for s in need:
    if s not in found:
      if s != DEFAULT_SOURCE:
        where = f"{sources_root}/{SOURCE_FOLDERS[s]}" if sources_root else f"--manual-dir {s}=PATH"
        raise CovidctError(f"{s} needs its files: none at {where}; give --manual-dir {s}=PATH or a "
                           "--sources-root that holds them.")
      found[s] = None
  return {s: found[s] for s in SOURCES if s in found}


def _builder(data_dir: str | None, source: str = DEFAULT_SOURCE):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  import tfds_covidct  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

  try:
    return tfds.builder(f"{DATASET}/{check_source(source)}", data_dir=data_dir)
  except CovidctError:
    raise
  except Exception as e:  # a damaged dataset_info.json or features.json: TFDS raises protobuf's, JSON's, OS errors
    where = os.path.join(data_dir or "~/tensorflow_datasets", DATASET, source)
    raise CovidctError(f"the prepared covid_ct/{source} in {where} is damaged (its dataset_info.json or features "
                       f"cannot be read: {type(e).__name__}); delete that folder and build it again (covidct data "
                       "build).") from None


def build(manual_dir: str | None = None, data_dir: str | None = None, source: str = DEFAULT_SOURCE):
  """Prepares one source (a `covid_ct` builder config) into `data_dir` (TFDS's default when None); returns the
  builder.

  With `manual_dir`, reads the source's files from there; without, the default config downloads them (the others
  are built from a local copy only). A failed build leaves nothing that `tfds.load` would pick up (TFDS writes to a
  temporary folder). An already prepared source is reused: TFDS checks nothing then, so a changed manual dir needs
  a new data dir.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise CovidctError(
        f"--manual-dir {manual_dir} does not exist; point it at the folder with the {source} files "
        f"(as in ../shared/{SOURCE_FOLDERS[check_source(source)]}).")
  builder = _builder(data_dir, source)
  if manual_dir is None and source != DEFAULT_SOURCE and not builder.is_prepared():
    raise CovidctError(f"covid_ct/{source} is built from a local copy only: give its manual dir (--manual-dir "
                       f"{source}=PATH, or --sources-root DIR holding {SOURCE_FOLDERS[source]}/).")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def build_sources(manual_dirs: dict[str, str | None], data_dir: str | None = None, progress=None) -> dict:
  """Builds every source in `manual_dirs` ({source: manual dir or None}); returns {source: builder}."""
  built = {}
  for source, manual in manual_dirs.items():
    if progress is not None:
      progress(f"building covid_ct/{source}" + (f" from {manual}" if manual else ""))
    built[source] = build(manual_dir=manual, data_dir=data_dir, source=source)
  return built


def load_builder(data_dir: str | None = None, source: str = DEFAULT_SOURCE):
  """The prepared builder of one source; a clear error when it was never built there."""
  builder = _builder(data_dir, source)
  if not builder.is_prepared():
    where = data_dir or "the default TFDS data dir"
    folder = SOURCE_FOLDERS[source]
    config = "" if source == DEFAULT_SOURCE else f" --config {source}"
    raise CovidctError(
        f"the covid_ct/{source} dataset is not prepared in {where}; build it first: covidct data build{config} "
        f"--manual-dir PATH/TO/{folder}{' --data-dir ' + data_dir if data_dir else ''}")
  return builder


def prepared_sources(data_dir: str | None = None) -> tuple[str, ...]:
  """The sources prepared in `data_dir`, in SOURCES order."""
  return tuple(s for s in SOURCES if _builder(data_dir, s).is_prepared())


def describe(data_dir: str | None = None, source: str = DEFAULT_SOURCE) -> dict:
  """Per split of one source: examples, per class counts, patients, image height/width range; and per diagnosis
  where the source records one."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  builder = load_builder(data_dir, source)
  names = builder.info.features["label"].names
  diagnoses = builder.info.features["diagnosis"].names if "diagnosis" in builder.info.features else None
  out = {"dataset": f"{DATASET}/{source}", "source": source, "version": str(builder.info.version),
         "data_dir": str(builder.data_dir), "splits": {}}
  for split in builder.info.splits:
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.map(lambda e: {"shape": tf.shape(tf.io.decode_png(e["image"])), "label": e["label"],
                           "patient_id": e["patient_id"],
                           "diagnosis": e["diagnosis"] if diagnoses else tf.constant(-1, tf.int64)},
                num_parallel_calls=tf.data.AUTOTUNE)
    counts, patients, heights, widths = {n: 0 for n in names}, set(), [], []
    by_diagnosis = {n: 0 for n in diagnoses or ()}
    for e in tfds.as_numpy(ds):
      counts[names[int(e["label"])]] += 1
      patients.add(e["patient_id"].decode())
      heights.append(int(e["shape"][0]))
      widths.append(int(e["shape"][1]))
      if diagnoses:
        by_diagnosis[diagnoses[int(e["diagnosis"])]] += 1
    out["splits"][split] = {
        "examples": sum(counts.values()), "per_class": counts, "patients": len(patients),
        "height": [min(heights), max(heights)], "width": [min(widths), max(widths)],
        **({"per_diagnosis": by_diagnosis} if diagnoses else {}),
    }
  return out
