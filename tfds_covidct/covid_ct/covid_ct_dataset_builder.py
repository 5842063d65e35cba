"""COVID-CT: lung CT slices of COVID-19 and non-COVID patients, with the official patient-level split."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import zipfile
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


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for the COVID-CT dataset (UCSD-AI4H), official patient-level split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "349 COVID / 397 non-COVID images, official train/validation/test split."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Optional. Without it the files are downloaded from the upstream repository.
  For offline use, put the upstream repository's files in `manual_dir`, in its layout:
    Images-processed/CT_COVID.zip, Images-processed/CT_NonCOVID.zip,
    Data-split/COVID/{train,val,test}CT_COVID.txt, Data-split/NonCOVID/{train,val,test}CT_NonCOVID.txt,
    COVID-CT-MetaInfo.xlsx, NonCOVID-CT-MetaInfo.csv
  """

  # Class attributes so that a test on small fixtures can swap them.
  EXPECTED_COUNTS = _EXPECTED_COUNTS
  IMAGE_HASHES = _IMAGE_HASHES

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(_LABELS)),
            "patient_id": tfds.features.Text(),
            "filename": tfds.features.Text(),
            "age": tfds.features.Text(doc="As upstream writes it ('41', '40+', 'Young Child'); '' if unknown."),
            "gender": tfds.features.Text(doc="'M', 'F' or '' if unknown."),
            "location": tfds.features.Text(doc="Where the patient was seen; '' if unknown."),
            "doi": tfds.features.Text(doc="DOI of the paper the image was taken from; '' if unknown."),
            "source": tfds.features.Text(doc="'paper figure' (COVID), 'crawled' or 'medpix' (non-COVID)."),
            "original_mode": tfds.features.Text(doc="Colour mode of the upstream file: L, RGB or RGBA."),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/UCSD-AI4H/COVID-CT",
    )

  def _locate_files(self, dl_manager: tfds.download.DownloadManager) -> dict[str, epath.Path]:
    """The source files: from `manual_dir` where one is given, downloaded otherwise."""
    given = getattr(dl_manager, "_manual_dir", None)
    try:
      root = dl_manager.manual_dir
    except AssertionError:
      if given is not None and epath.Path(given) != epath.Path(dl_manager.download_dir) / "manual":
        raise CovidCtError(
            f"manual_dir {given} does not exist or is empty; point it at a folder holding the upstream "
            "COVID-CT files (Images-processed/, Data-split/, the two metadata files), or leave it out to download."
        ) from None
      root = None
    if root is None:
      return {k: epath.Path(p) for k, p in dl_manager.download({k: _BASE_URL + rel for k, rel in _FILES.items()}).items()}
    paths = {k: epath.Path(root) / rel for k, rel in _FILES.items()}
    for key, path in paths.items():
      if not path.exists():
        raise CovidCtError(f"{path} is missing from manual_dir {root}: copy {_FILES[key]} from the upstream repository.")
    return paths

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = self._locate_files(dl_manager)
    index = read_index(paths, self.EXPECTED_COUNTS)
    hashes = _read_hashes(epath.Path(self.IMAGE_HASHES))
    return {split: self._generate_examples(paths, index[split], hashes) for split in _SPLITS}

  def _generate_examples(self, paths, records, hashes) -> Iterator[tuple[str, dict]]:
    zips = {label: _open_zip(paths[key]) for label, key in _ZIP_KEY.items()}
    try:
      for record in records:
        member = f"{_ZIP_FOLDER[record.label]}/{record.filename}"
        where = f"{paths[_ZIP_KEY[record.label]]}:{member}"
        try:
          data = zips[record.label].read(member)
        except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as e:
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
