"""COVID-CT: lung CT slices of COVID-19 and non-COVID patients, with the official patient-level split; and, as builder
configs, two more sources: CC-CCII (`covid_ct/cc_ccii`) and COVID-CT-MD (`covid_ct/covid_ct_md`, an external site)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import zipfile
import zlib
from typing import Iterator

import numpy as np
import tensorflow_datasets.public_api as tfds
from etils import epath

# The upstream repository, pinned to one commit so that every download is the same bytes.
_UPSTREAM_COMMIT = "1fc10ba9d4cb35944766fd8fc3c139fa60ee13a1"
_BASE_URL = f"https://github.com/UCSD-AI4H/COVID-CT/raw/{_UPSTREAM_COMMIT}/"

_LABELS = ("NonCOVID", "COVID")  # index 1 means COVID

# Every source file, by key, as its path relative to the upstream repository (and to a manual_dir).
_FILES = {
    "covid_zip": "Images-processed/CT_COVID.zip",
    "noncovid_zip": "Images-processed/CT_NonCOVID.zip",
    "covid_meta": "COVID-CT-MetaInfo.xlsx",
    "noncovid_meta": "NonCOVID-CT-MetaInfo.csv",
    "train_COVID": "Data-split/COVID/trainCT_COVID.txt",
    "validation_COVID": "Data-split/COVID/valCT_COVID.txt",
    "test_COVID": "Data-split/COVID/testCT_COVID.txt",
    "train_NonCOVID": "Data-split/NonCOVID/trainCT_NonCOVID.txt",
    "validation_NonCOVID": "Data-split/NonCOVID/valCT_NonCOVID.txt",
    "test_NonCOVID": "Data-split/NonCOVID/testCT_NonCOVID.txt",
}
_ZIP_KEY = {"COVID": "covid_zip", "NonCOVID": "noncovid_zip"}
_ZIP_FOLDER = {"COVID": "CT_COVID", "NonCOVID": "CT_NonCOVID"}

_SPLITS = ("train", "validation", "test")
# Official counts, asserted while generating: split -> class -> number of images.
_EXPECTED_COUNTS = {
    "train": {"COVID": 191, "NonCOVID": 234},
    "validation": {"COVID": 60, "NonCOVID": 58},
    "test": {"COVID": 98, "NonCOVID": 105},
}
# Per-image SHA-256 of the upstream images: verified whatever zip they arrive in.
_IMAGE_HASHES = epath.Path(__file__).parent / "image_hashes.tsv"
# The upstream metadata sheet, metadata CSV and the six split files (path in the manual dir, size, SHA-256): checked
# before any is parsed, so that an edited, renumbered or damaged one stops the build naming it.
_METADATA_HASHES = epath.Path(__file__).parent / "metadata_hashes.tsv"

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class CovidCtError(ValueError):
  """The source files are missing, damaged or not what the official release holds."""


@dataclasses.dataclass(frozen=True)
class _Record:
  """One image as the split files and metadata sheets describe it."""

  filename: str
  label: str
  split: str
  patient_id: str
  age: str = ""
  gender: str = ""
  location: str = ""
  doi: str = ""
  source: str = ""


def _normalise_name(name) -> str:
  """Upstream file name as it is in the zip: the COVID sheet drops `.png` from some names."""
  name = str(name).strip()
  if not name.lower().endswith(_IMAGE_SUFFIXES):
    name += ".png"
  return name


def _clean(value) -> str:
  return "" if value is None else " ".join(str(value).split())


def _read_covid_meta(path: epath.Path) -> dict[str, dict[str, str]]:
  import openpyxl  # pylint: disable=import-outside-toplevel

  try:
    with path.open("rb") as f:
      sheet = openpyxl.load_workbook(io.BytesIO(f.read()), read_only=True).worksheets[0]
      rows = list(sheet.iter_rows(values_only=True))
  except Exception as e:  # openpyxl raises several unrelated types for a damaged file
    raise CovidCtError(f"{path}: cannot read the COVID metadata sheet ({e}); replace it with the upstream file.") from e
  header = [_clean(h).lower() for h in rows[0]]
  col = {name: header.index(name) for name in ("file name", "patient id", "age", "gender", "location", "doi")
         if name in header}
  if "file name" not in col or "patient id" not in col:
    raise CovidCtError(f"{path}: expected columns 'File name' and 'Patient ID', found {rows[0]}.")
  meta = {}
  for row in rows[1:]:
    if not row[col["file name"]]:
      continue
    get = lambda key: _clean(row[col[key]]) if key in col else ""  # pylint: disable=cell-var-from-loop
    meta[_normalise_name(row[col["file name"]])] = {
        "patient_id": get("patient id"), "age": get("age"), "gender": get("gender"),
        "location": get("location"), "doi": get("doi"), "source": "paper figure",
    }
  return meta


def _read_noncovid_meta(path: epath.Path) -> dict[str, dict[str, str]]:
  with path.open("r") as f:
    rows = list(csv.DictReader(f))
  if not rows or "image name" not in rows[0] or "patient id" not in rows[0]:
    raise CovidCtError(f"{path}: expected columns 'image name' and 'patient id'; replace it with the upstream file.")
  return {
      _normalise_name(r["image name"]): {
          "patient_id": _clean(r["patient id"]),
          "source": _clean(r["patient id"]).rsplit("_patient", 1)[0],  # 'crawled' or 'medpix'
      }
      for r in rows
  }


def _read_hashes(path: epath.Path) -> dict[str, str]:
  hashes = {}
  for line in path.read_text().splitlines():
    if line and not line.startswith("#"):
      member, _, sha = line.split("\t")
      hashes[member] = sha
  return hashes


def _check_metadata_files(paths: dict[str, epath.Path], manifest: epath.Path) -> None:
  """Raises CovidCtError naming the first metadata or split file whose SHA-256 is not the upstream one."""
  hashes = _read_hashes(manifest)
  for key, rel in _FILES.items():
    if rel not in hashes:
      continue  # the zips: every image in them is checked against image_hashes.tsv
    digest = hashlib.sha256(paths[key].read_bytes()).hexdigest()
    if digest != hashes[rel]:
      raise CovidCtError(f"{paths[key]}: SHA-256 {digest[:12]}... is not the upstream file's ({hashes[rel][:12]}..., "
                         f"{manifest.name}); it was edited or damaged. Replace it with the upstream one.")


def _open_zip(path: epath.Path) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path.open("rb"))
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise CovidCtError(
        f"{path}: not a readable zip ({e}); it is truncated or damaged. Delete it and download it again."
    ) from e


def read_index(paths: dict[str, epath.Path], expected_counts=None) -> dict[str, list[_Record]]:
  """Reads the split files and metadata, and checks them before any image is written.

  Returns split name -> records. Raises `CovidCtError` naming the file at fault.
  """
  expected_counts = _EXPECTED_COUNTS if expected_counts is None else expected_counts
  meta = {"COVID": _read_covid_meta(paths["covid_meta"]), "NonCOVID": _read_noncovid_meta(paths["noncovid_meta"])}
  members = {}
  for label, key in _ZIP_KEY.items():
    with _open_zip(paths[key]) as zf:
      members[label] = set(zf.namelist())
  index, seen = {}, {}
  for split in _SPLITS:
    index[split] = []
    for label in _LABELS:
      split_file = paths[f"{split}_{label}"]
      names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
      for lineno, name in enumerate(names, 1):
        if f"{_ZIP_FOLDER[label]}/{name}" not in members[label]:
          raise CovidCtError(
              f"{split_file}:{lineno}: names image {name!r}, which is not in {paths[_ZIP_KEY[label]]}. "
              "The split files and the zips are from different releases: take both from the same upstream copy.")
        if name in seen:
          raise CovidCtError(f"{split_file}:{lineno}: image {name!r} is already in split {seen[name]!r}.")
        seen[name] = split
        info = meta[label].get(name, {})
        if not info.get("patient_id"):
          raise CovidCtError(
              f"image {name!r} has no patient id in the {label} metadata sheet "
              f"({paths['covid_meta' if label == 'COVID' else 'noncovid_meta']}); replace it with the upstream file.")
        index[split].append(_Record(filename=name, label=label, split=split, **info))
      want = expected_counts[split][label]
      if len(names) != want:
        raise CovidCtError(
            f"{split_file}: lists {len(names)} images, the official split has {want}. "
            "This is not the official COVID-CT release (349 COVID, 397 non-COVID): use the upstream files.")
  patients = {split: {r.patient_id for r in records} for split, records in index.items()}
  for i, a in enumerate(_SPLITS):
    for b in _SPLITS[i + 1:]:
      shared = patients[a] & patients[b]
      if shared:
        raise CovidCtError(
            f"patients {sorted(shared)[:5]} appear in both {a!r} and {b!r}: the split is not patient-disjoint. "
            "Use the official split files.")
  return index


MAX_PIXELS = 40_000_000  # larger than any CT slice or figure (upstream's largest is 1225 x 1671): refused unread
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit (and 32-bit integer) grayscale


def decode_grayscale(data: bytes, where: str) -> tuple[np.ndarray, str]:
  """Decodes PNG/JPEG/TIFF bytes to a (H, W, 1) uint8 array and the file's original colour mode.

  RGB and RGBA become grayscale by ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B); alpha is dropped. 16-bit
  grayscale is scaled to 8 bits as the PNG specification scales sample depths (divided by 257, rounded: a 16-bit
  copy of an 8-bit image decodes to that image), not clipped. An image claiming more than MAX_PIXELS pixels is
  refused from its header, before any pixel is decoded (a decompression bomb).
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel

  try:
    with Image.open(io.BytesIO(data)) as im:
      width, height = im.size
      if width * height > MAX_PIXELS:
        raise CovidCtError(f"{where}: the image claims {width} x {height} pixels, over the limit of "
                           f"{MAX_PIXELS:,}; not decoded (a CT slice is at most a few thousand pixels a side).")
      im.load()
      mode = im.mode
      if mode in _WIDE_MODES:
        wide = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or wide.max() <= 65535 else float(wide.max())
        return np.round(np.clip(wide, 0, top) * (255.0 / top)).astype(np.uint8)[..., None], mode
      rgb = im if mode in ("L", "RGB") else im.convert("RGB")
      gray = rgb.convert("L")
  except CovidCtError:
    raise
  except Image.DecompressionBombError as e:  # Pillow's own guard, for sizes far past ours
    raise CovidCtError(f"{where}: the image claims more pixels than the limit of {MAX_PIXELS:,} ({e}); not "
                       "decoded.") from e
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
    raise CovidCtError(f"{where}: not a readable image ({e}). Replace the file with the upstream one.") from e
  return np.asarray(gray, dtype=np.uint8)[..., None], mode



# ---------------------------------------------------------------------------------------------------------------------
# The other sources: one builder config each, read from a manual dir and checked against a manifest shipped here.

# Config names; the `dataset` feature of every example holds one of them, in every config.
DEFAULT_CONFIG = "covid_ct"
CONFIG_NAMES = ("covid_ct", "cc_ccii", "covid_ct_md")
# Diagnoses of the configs that record one (CC-CCII's three classes; COVID-CT-MD's normal and COVID).
DIAGNOSES = ("normal", "common_pneumonia", "covid")

_HERE = epath.Path(__file__).parent
# path in the manual dir, split, sha256: every file each config reads (tools/make_source_manifests.py wrote them).
_SOURCE_MANIFESTS = {"cc_ccii": _HERE / "cc_ccii_files.tsv", "covid_ct_md": _HERE / "covid_ct_md_files.tsv"}
# Asserted while generating, as the official COVID-CT counts are: split -> class -> images.
_SOURCE_COUNTS = {
    "cc_ccii": {"train": {"COVID": 807, "NonCOVID": 2950}, "validation": {"COVID": 155, "NonCOVID": 604},
                "test": {"COVID": 230, "NonCOVID": 859}},
    "covid_ct_md": {"test": {"COVID": 169, "NonCOVID": 76}},
}
_SOURCE_SPLITS = {"cc_ccii": _SPLITS, "covid_ct_md": ("test",)}
_CC_CCII_DIAGNOSIS = {"NCP": "covid", "CP": "common_pneumonia", "Normal": "normal"}
_MD_CLINICAL = "meta/Clinical-data.csv"


@dataclasses.dataclass(frozen=True)
class _SourceFile:
  path: str  # relative to the manual dir
  split: str
  sha256: str


def read_source_manifest(path: epath.Path) -> list[_SourceFile]:
  """A config's shipped manifest: one `path<TAB>split<TAB>sha256` line per file."""
  rows = []
  for lineno, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
    if not line.strip() or line.startswith("#"):
      continue
    parts = line.split("\t")
    if len(parts) != 3 or len(parts[2]) != 64:
      raise CovidCtError(f"{path}:{lineno}: expected path, split and SHA-256 separated by tabs; reinstall covidct.")
    rows.append(_SourceFile(*parts))
  return rows


def _verified_bytes(root: epath.Path, entry: _SourceFile, config: str) -> bytes:
  """The file's bytes, refused with one line naming it when it is missing, unreadable or changed."""
  path = root / entry.path
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise CovidCtError(f"{path} is missing from the {config} manual dir {root}: copy the whole source folder "
                       "again (its SHA256SUMS lists every file).") from None
  except (OSError, ValueError) as e:
    raise CovidCtError(f"{path}: cannot be read ({e}); copy the file again.") from None
  digest = hashlib.sha256(data).hexdigest()
  if digest != entry.sha256:
    raise CovidCtError(f"{path}: SHA-256 {digest[:12]}... does not match the {config} manifest "
                       f"({entry.sha256[:12]}...); the file was changed or damaged. Copy it again.")
  return data


def cc_ccii_record(path: str) -> dict[str, str]:
  """What a CC-CCII file name tells: `<CLASS>_<patient>_<scan>_<slice>_128.png`, grouped by (class, patient)."""
  parts = epath.Path(path).name.split("_")
  if len(parts) != 5 or parts[0] not in _CC_CCII_DIAGNOSIS:
    raise CovidCtError(f"{path}: not a CC-CCII slice name (<CLASS>_<patient>_<scan>_<slice>_128.png).")
  return {"patient_id": f"{parts[0]}_{parts[1]}", "scan_id": parts[2], "slice_index": int(parts[3]),
          "diagnosis": _CC_CCII_DIAGNOSIS[parts[0]]}


def _check_source_index(config: str, rows: list[_SourceFile], patient_of, label_of, where, expected) -> None:
  """The shipped split matches the `expected` counts (split -> class -> images), and no patient is in two splits."""
  counts: dict[str, dict[str, int]] = {s: {"COVID": 0, "NonCOVID": 0} for s in expected}
  split_of: dict[str, str] = {}
  for r in rows:
    if r.split not in expected:
      raise CovidCtError(f"{where}: {r.path} is in split {r.split!r}; {config} has {', '.join(expected)}.")
    counts[r.split][label_of(r)] += 1
    pid = patient_of(r)
    if split_of.setdefault(pid, r.split) != r.split:
      raise CovidCtError(f"{where}: patient {pid} is in both {split_of[pid]!r} and {r.split!r}; the split must be "
                         "patient-disjoint.")
  if counts != expected:
    raise CovidCtError(f"{where}: the {config} file list gives {counts}, the release has {expected}; reinstall "
                       "covidct (the manifest was changed).")


def _label_of_path(r: _SourceFile) -> str:
  return "COVID" if r.path.startswith("COVID/") else "NonCOVID"


def _read_md_clinical(data: bytes, where: str) -> dict[str, dict[str, str]]:
  """COVID-CT-MD's clinical table: folder (P001, normal001) -> age ('39'), gender ('M', 'F')."""
  try:
    lines = data.decode("utf-8-sig").splitlines()
    rows = list(csv.reader(lines[1:]))  # the first line is a title ('clinical_data')
    header = [h.strip().lower() for h in rows[0]]
    col = {k: header.index(k) for k in ("folder", "patient gender", "patient age")}
  except (UnicodeDecodeError, csv.Error, IndexError, ValueError) as e:
    raise CovidCtError(f"{where}: not COVID-CT-MD's clinical table ({type(e).__name__}); copy it again.") from None
  out = {}
  for row in rows[1:]:
    if len(row) > max(col.values()) and row[col["folder"]].strip():
      age = row[col["patient age"]].strip().rstrip("Yy").lstrip("0")
      out[row[col["folder"]].strip()] = {"age": age, "gender": row[col["patient gender"]].strip().upper()}
  return out


_CITATION_KEYS = {"covid_ct": ("zhao2020covidct",), "cc_ccii": ("zhang2020ccccii", "gunraj2020covidnetct"),
                  "covid_ct_md": ("afshar2021covidctmd",)}


def _citation(keys) -> str:
  """The entries of CITATIONS.bib with these keys: each config cites its own source."""
  entries = ["@" + e.strip() for e in (_HERE / "CITATIONS.bib").read_text().split("@") if e.strip()]
  return "\n\n".join(e for e in entries if e.split("{", 1)[1].split(",", 1)[0].strip() in keys)


_DEFAULT_DESCRIPTION = "COVID-CT (UCSD-AI4H): 349 COVID / 397 non-COVID images, the official patient-level split."
_CC_CCII_DESCRIPTION = ("CC-CCII slices (via COVIDx-CT), 128 x 128, cropped to the lungs: 1,192 COVID / 4,413 "
                        "non-COVID (normal, common pneumonia) slices of 299 patients, split by patient here.")
_MD_DESCRIPTION = ("COVID-CT-MD, one slice per patient from one Tehran centre (169 COVID, 76 normal): an external "
                   "site, a test split only.")


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for COVID-CT (the default config, official patient-level split) and two more sources."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "349 COVID / 397 non-COVID images, official train/validation/test split.",
      "1.1.0": "Builder configs: `covid_ct` (the default, the same examples as 1.0.0), `cc_ccii` (CC-CCII, split by "
               "patient) and `covid_ct_md` (COVID-CT-MD, test only). New feature `dataset` (the config an example "
               "comes from) on every example; every split also written as ArrayRecord for `tfds.data_source`.",
  }
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="covid_ct", description=_DEFAULT_DESCRIPTION),
      tfds.core.BuilderConfig(name="cc_ccii", description=_CC_CCII_DESCRIPTION),
      tfds.core.BuilderConfig(name="covid_ct_md", description=_MD_DESCRIPTION),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = DEFAULT_CONFIG
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  covid_ct (the default): optional. Without it the files are downloaded from the upstream repository. For offline
  use, put the upstream repository's files in `manual_dir`, in its layout:
    Images-processed/CT_COVID.zip, Images-processed/CT_NonCOVID.zip,
    Data-split/COVID/{train,val,test}CT_COVID.txt, Data-split/NonCOVID/{train,val,test}CT_NonCOVID.txt,
    COVID-CT-MetaInfo.xlsx, NonCOVID-CT-MetaInfo.csv
  covid_ct/cc_ccii: required: the CC-CCII slices, COVID/*.png and NonCOVID/{Normal,CP}/*.png (5,605 files).
  covid_ct/covid_ct_md: required: COVID/*.jpg, NonCOVID/*.jpg (245 files) and meta/Clinical-data.csv.
  """

  # Class attributes so that a test on small fixtures can swap them.
  EXPECTED_COUNTS = _EXPECTED_COUNTS
  IMAGE_HASHES = _IMAGE_HASHES
  METADATA_HASHES = _METADATA_HASHES
  SOURCE_MANIFESTS = _SOURCE_MANIFESTS
  SOURCE_COUNTS = _SOURCE_COUNTS

  def _info(self) -> tfds.core.DatasetInfo:
    name = self.builder_config.name
    features = {
        "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
        "label": tfds.features.ClassLabel(names=list(_LABELS)),
        "patient_id": tfds.features.Text(),
        "filename": tfds.features.Text(),
        "dataset": tfds.features.Text(doc=f"The config the example comes from: {', '.join(CONFIG_NAMES)}."),
        "original_mode": tfds.features.Text(doc="Colour mode of the upstream file: L, RGB or RGBA."),
    }
    if name in (DEFAULT_CONFIG, "covid_ct_md"):
      features["age"] = tfds.features.Text(doc="Age in years as the source writes it ('41', '40+', 'Young Child'); "
                                                "'' if unknown.")
      features["gender"] = tfds.features.Text(doc="'M', 'F' or '' if unknown.")
    if name == DEFAULT_CONFIG:
      features.update(
          location=tfds.features.Text(doc="Where the patient was seen; '' if unknown."),
          doi=tfds.features.Text(doc="DOI of the paper the image was taken from; '' if unknown."),
          source=tfds.features.Text(doc="'paper figure' (COVID), 'crawled' or 'medpix' (non-COVID)."),
      )
    else:
      features["diagnosis"] = tfds.features.ClassLabel(names=list(DIAGNOSES))
    if name == "cc_ccii":
      features["scan_id"] = tfds.features.Text(doc="The CT scan the slice comes from (a patient may have several).")
      features["slice_index"] = tfds.features.Scalar(dtype=np.int32, doc="The slice's index in its scan.")
    homepage = {DEFAULT_CONFIG: "https://github.com/UCSD-AI4H/COVID-CT",
                "cc_ccii": "http://ncov-ai.big.ac.cn/download",
                "covid_ct_md": "https://doi.org/10.6084/m9.figshare.12991592"}[name]
    # Every shard is written twice (_write_array_record_copy): TFRecord for tf.data, ArrayRecord for random access.
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                          supervised_keys=("image", "label"), homepage=homepage,
                                          citation=_citation(_CITATION_KEYS[name]),
                                          alternative_file_formats=["array_record"])

  def _manual_root(self, dl_manager: tfds.download.DownloadManager) -> epath.Path | None:
    """The manual dir when one was given (None when the default config may download instead)."""
    name = self.builder_config.name
    given = getattr(dl_manager, "_manual_dir", None)
    user_gave = given is not None and epath.Path(given) != epath.Path(dl_manager.download_dir) / "manual"
    try:
      return epath.Path(dl_manager.manual_dir)
    except AssertionError:
      what = {DEFAULT_CONFIG: "the upstream COVID-CT files (Images-processed/, Data-split/, the two metadata files)",
              "cc_ccii": "the CC-CCII slices (COVID/, NonCOVID/Normal/, NonCOVID/CP/)",
              "covid_ct_md": "the COVID-CT-MD slices (COVID/, NonCOVID/, meta/)"}[name]
      if user_gave:
        raise CovidCtError(f"manual_dir {given} does not exist or is empty; point it at a folder holding {what}"
                           + (", or leave it out to download." if name == DEFAULT_CONFIG else ".")) from None
      if name == DEFAULT_CONFIG:
        return None
      raise CovidCtError(f"covid_ct/{name} is built from a local copy only: give its manual dir, a folder "
                         f"holding {what}.") from None

  def _locate_files(self, dl_manager: tfds.download.DownloadManager) -> dict[str, epath.Path]:
    """The default config's source files: from `manual_dir` where one is given, downloaded otherwise."""
    root = self._manual_root(dl_manager)
    if root is None:
      return {k: epath.Path(p) for k, p in dl_manager.download({k: _BASE_URL + rel for k, rel in _FILES.items()}).items()}
    paths = {k: root / rel for k, rel in _FILES.items()}
    for key, path in paths.items():
      if not path.exists():
        raise CovidCtError(f"{path} is missing from manual_dir {root}: copy {_FILES[key]} from the upstream repository.")
    return paths

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    name = self.builder_config.name
    if name != DEFAULT_CONFIG:
      return self._source_split_generators(name, dl_manager)
    paths = self._locate_files(dl_manager)
    _check_metadata_files(paths, epath.Path(self.METADATA_HASHES))
    index = read_index(paths, self.EXPECTED_COUNTS)
    hashes = _read_hashes(epath.Path(self.IMAGE_HASHES))
    return {split: self._generate_examples(paths, index[split], hashes) for split in _SPLITS}

  def _source_split_generators(self, name: str, dl_manager):
    root = self._manual_root(dl_manager)
    manifest = epath.Path(self.SOURCE_MANIFESTS[name])
    rows = read_source_manifest(manifest)
    images = [r for r in rows if r.split != "meta"]
    expected = self.SOURCE_COUNTS[name]
    if name == "cc_ccii":
      _check_source_index(name, images, lambda r: cc_ccii_record(r.path)["patient_id"], _label_of_path, manifest,
                          expected)
      extra = {}
    else:
      _check_source_index(name, images, lambda r: r.path, _label_of_path, manifest, expected)
      meta = next((r for r in rows if r.path == _MD_CLINICAL), None)
      if meta is None:
        raise CovidCtError(f"{manifest}: does not list {_MD_CLINICAL}; reinstall covidct.")
      extra = _read_md_clinical(_verified_bytes(root, meta, name), str(root / meta.path))
    for r in images:  # every file there before any example is written: a missing one stops the build at once
      if not (root / r.path).exists():
        raise CovidCtError(f"{root / r.path} is missing from the {name} manual dir {root}: copy the whole source "
                           "folder again (its SHA256SUMS lists every file).")
    return {split: self._generate_source_examples(name, root, [r for r in images if r.split == split], extra)
            for split in _SOURCE_SPLITS[name]}

  def _generate_source_examples(self, name, root, rows, clinical) -> Iterator[tuple[str, dict]]:
    for r in rows:
      data = _verified_bytes(root, r, name)
      image, mode = decode_grayscale(data, str(root / r.path))
      label = _label_of_path(r)
      example = {"image": image, "label": label, "filename": epath.Path(r.path).name, "dataset": name,
                 "original_mode": mode}
      if name == "cc_ccii":
        example.update(cc_ccii_record(r.path))
      else:  # covid_ct_md: P001_Covid_1.jpg, normal001_Normal_1.jpg: the patient's folder, then the class
        folder = epath.Path(r.path).name.split("_")[0]
        example.update(patient_id=folder, diagnosis="covid" if label == "COVID" else "normal",
                       age=clinical.get(folder, {}).get("age", ""), gender=clinical.get(folder, {}).get("gender", ""))
      yield r.path, example

  def _generate_examples(self, paths, records, hashes) -> Iterator[tuple[str, dict]]:
    zips = {label: _open_zip(paths[key]) for label, key in _ZIP_KEY.items()}
    try:
      for record in records:
        member = f"{_ZIP_FOLDER[record.label]}/{record.filename}"
        where = f"{paths[_ZIP_KEY[record.label]]}:{member}"
        try:
          data = zips[record.label].read(member)
        except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile, zlib.error) as e:
          raise CovidCtError(f"{where}: cannot be read from the zip ({e}); the zip is damaged, download it again.") from e
        if member not in hashes:
          raise CovidCtError(f"{where}: not in the image manifest {self.IMAGE_HASHES}; this is not the official release.")
        digest = hashlib.sha256(data).hexdigest()
        if digest != hashes[member]:
          raise CovidCtError(
              f"{where}: SHA-256 {digest[:12]}... does not match the manifest ({hashes[member][:12]}...); "
              "the file was changed or damaged. Replace the zip with the upstream one.")
        image, mode = decode_grayscale(data, where)
        yield record.filename, {
            "image": image,
            "label": record.label,
            "patient_id": record.patient_id,
            "filename": record.filename,
            "dataset": DEFAULT_CONFIG,
            "age": record.age,
            "gender": record.gender,
            "location": record.location,
            "doi": record.doi,
            "source": record.source,
            "original_mode": mode,
        }
    finally:
      for zf in zips.values():
        zf.close()

  def _download_and_prepare(self, dl_manager, download_config):  # pylint: disable=arguments-differ
    """TFDS's generation (TFRecord, for tf.data), then an ArrayRecord copy of every shard in the same temporary
    folder, so that `tfds.data_source` (random access, no TensorFlow at read time) works for every config and a
    failed copy leaves nothing behind either."""
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    self._write_array_record_copy()

  def _write_array_record_copy(self) -> None:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tensorflow_datasets.core import file_adapters  # pylint: disable=import-outside-toplevel

    adapter = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
    suffix = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.TFRECORD].FILE_SUFFIX
    for split_info in self.info.splits.values():
      for path in split_info.filepaths:
        out = epath.Path(str(path).replace(f".{suffix}-", f".{adapter.FILE_SUFFIX}-"))
        records = tf.data.TFRecordDataset(str(path)).as_numpy_iterator()
        adapter.write_examples(out, ((None, record) for record in records))
