"""Bad input to the covid_ct builder: each gives a clear error naming the file, and leaves no dataset behind."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
from click.testing import CliRunner

from covidct import dataset
from covidct.cli import main
from covidct.errors import CovidctError
from tfds_covidct import CovidCtError


def _rewrite_member(zip_path, member, transform):
  """Rewrites one member of a zip with transform(bytes); returns the new bytes."""
  with zipfile.ZipFile(zip_path) as zf:
    items = [(info, zf.read(info.filename)) for info in zf.infolist()]
  new = None
  with zipfile.ZipFile(zip_path, "w") as zf:
    for info, data in items:
      if info.filename == member:
        data = new = transform(data)
      zf.writestr(info, data)
  return new


def _update_manifest(manual, member, data):
  manifest = manual / "image_hashes.tsv"
  lines = [f"{member}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}" if line.startswith(member + "\t") else line
           for line in manifest.read_text().splitlines()]
  manifest.write_text("\n".join(lines) + "\n")


def _rehash_metadata(builder, monkeypatch, manual):
  """The copy's metadata_hashes.tsv made to match its (edited) metadata and split files, and used: for tests of the
  checks that come after the hash check."""
  lines = []
  for line in (manual / "metadata_hashes.tsv").read_text().splitlines():
    if line.startswith("#"):
      lines.append(line)
      continue
    rel = line.split("\t")[0]
    data = (manual / rel).read_bytes()
    lines.append(f"{rel}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}")
  (manual / "metadata_hashes.tsv").write_text("\n".join(lines) + "\n")
  monkeypatch.setattr(builder, "METADATA_HASHES", manual / "metadata_hashes.tsv")


def _build_fails(manual, data_dir, match, builder_cls=None):
  with pytest.raises((CovidCtError, CovidctError), match=match) as err:
    dataset.build(manual_dir=str(manual), data_dir=str(data_dir))
  import tensorflow_datasets as tfds

  assert not tfds.builder("covid_ct", data_dir=str(data_dir)).is_prepared()
  assert not list(data_dir.glob("covid_ct/*/[0-9]*"))  # no version folder of any config
  return str(err.value)


COVID_MEMBER = "CT_COVID/2020.01.24.919183-p27-132.png"


def test_hash_mismatch(dummy_builder, manual_copy, tmp_path):
  _rewrite_member(manual_copy / "Images-processed/CT_COVID.zip", COVID_MEMBER, lambda b: b[:-12] + b"\0" * 12)
  msg = _build_fails(manual_copy, tmp_path / "d", "SHA-256")
  assert COVID_MEMBER in msg and "CT_COVID.zip" in msg


@pytest.mark.parametrize("damage", [lambda b: b"this is not a png at all", lambda b: b[: len(b) // 2]],
                         ids=["corrupt", "truncated"])
def test_unreadable_image(dummy_builder, monkeypatch, manual_copy, tmp_path, damage):
  new = _rewrite_member(manual_copy / "Images-processed/CT_COVID.zip", COVID_MEMBER, damage)
  _update_manifest(manual_copy, COVID_MEMBER, new)  # the hash matches: the decoder must catch it
  monkeypatch.setattr(dummy_builder, "IMAGE_HASHES", manual_copy / "image_hashes.tsv")
  msg = _build_fails(manual_copy, tmp_path / "d", "not a readable image")
  assert COVID_MEMBER in msg


def test_truncated_zip(dummy_builder, manual_copy, tmp_path):
  path = manual_copy / "Images-processed/CT_NonCOVID.zip"
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  msg = _build_fails(manual_copy, tmp_path / "d", "not a readable zip")
  assert "CT_NonCOVID.zip" in msg and "download it again" in msg


def test_missing_split_file(dummy_builder, manual_copy, tmp_path):
  (manual_copy / "Data-split/COVID/valCT_COVID.txt").unlink()
  _build_fails(manual_copy, tmp_path / "d", r"valCT_COVID.txt is missing")


def test_split_names_absent_image(dummy_builder, monkeypatch, manual_copy, tmp_path):
  split = manual_copy / "Data-split/NonCOVID/testCT_NonCOVID.txt"
  split.write_text(split.read_text() + "no-such-image.png\n")
  _rehash_metadata(dummy_builder, monkeypatch, manual_copy)
  msg = _build_fails(manual_copy, tmp_path / "d", "no-such-image.png")
  assert "testCT_NonCOVID.txt:3" in msg


def test_changed_count(dummy_builder, monkeypatch, manual_copy, tmp_path):
  counts = {s: dict(c) for s, c in dummy_builder.EXPECTED_COUNTS.items()}
  counts["test"]["COVID"] = 98
  monkeypatch.setattr(dummy_builder, "EXPECTED_COUNTS", counts)
  msg = _build_fails(manual_copy, tmp_path / "d", "the official split has 98")
  assert "testCT_COVID.txt" in msg


def test_patient_in_two_splits(dummy_builder, monkeypatch, manual_copy, tmp_path):
  meta = manual_copy / "NonCOVID-CT-MetaInfo.csv"
  meta.write_text(meta.read_text().replace("medpix_patient_112", "crawled_patient_0"))
  _rehash_metadata(dummy_builder, monkeypatch, manual_copy)
  _build_fails(manual_copy, tmp_path / "d", "crawled_patient_0.*both 'train' and 'test'")


def test_manual_dir_missing(dummy_builder, tmp_path):
  _build_fails(tmp_path / "nowhere", tmp_path / "d", "does not exist")


def test_manual_dir_missing_through_tfds(dummy_builder, tmp_path):
  """The builder itself (as `tfds build --manual_dir` uses it) refuses a missing manual_dir."""
  import tensorflow_datasets as tfds

  builder = tfds.builder("covid_ct", data_dir=str(tmp_path / "d"))
  with pytest.raises(CovidCtError, match="does not exist or is empty"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "nowhere")))


def test_cli_one_line_error(dummy_builder, manual_copy, tmp_path):
  (manual_copy / "Images-processed/CT_COVID.zip").write_bytes(b"PK\x03\x04 truncated")
  result = CliRunner().invoke(main, ["data", "build", "--manual-dir", str(manual_copy), "--data-dir",
                                     str(tmp_path / "d")])
  assert result.exit_code == 1
  assert "Traceback" not in result.output
  assert result.stderr.startswith("Error: ") and "CT_COVID.zip" in result.stderr
  assert result.stderr.count("\n") == 1


def test_cli_build_and_info(dummy_builder, tmp_path):
  from tests.conftest import DUMMY_DATA

  runner = CliRunner()
  built = runner.invoke(main, ["data", "build", "--manual-dir", str(DUMMY_DATA), "--data-dir", str(tmp_path)])
  assert built.exit_code == 0, built.output
  assert "train 6, validation 3, test 4" in built.output
  info = runner.invoke(main, ["data", "info", "--data-dir", str(tmp_path), "--json"])
  assert info.exit_code == 0, info.output
  import json

  splits = json.loads(info.output)["splits"]
  assert splits["validation"] == {"examples": 3, "per_class": {"NonCOVID": 2, "COVID": 1}, "patients": 3,
                                  "height": splits["validation"]["height"], "width": splits["validation"]["width"]}
  assert 24 <= splits["train"]["height"][0] <= splits["train"]["height"][1] < 40


def test_cli_info_without_dataset(tmp_path):
  result = CliRunner().invoke(main, ["data", "info", "--data-dir", str(tmp_path)])
  assert result.exit_code == 1 and "covidct data build" in result.output


@pytest.mark.parametrize("rel, damage", [
    ("NonCOVID-CT-MetaInfo.csv", lambda b: b.replace(b"medpix_patient_112", b"medpix_patient_113")),  # renumbered
    ("NonCOVID-CT-MetaInfo.csv", lambda b: bytes(range(256)) * 4),  # binary
    ("Data-split/COVID/trainCT_COVID.txt", lambda b: b"\x00\xff\xfe" * 50),  # binary split file
    ("COVID-CT-MetaInfo.xlsx", lambda b: b[: len(b) // 2]),  # truncated workbook
])
def test_an_edited_or_damaged_metadata_or_split_file_stops_the_build(dummy_builder, manual_copy, tmp_path, rel,
                                                                      damage):
  """Metadata and split files are checked against their upstream SHA-256 before they are parsed (issue 32: a CSV
  that renumbered patients built silently; binary ones gave tracebacks)."""
  path = manual_copy / rel
  path.write_bytes(damage(path.read_bytes()))
  msg = _build_fails(manual_copy, tmp_path / "d", "is not the upstream file's")
  assert rel.split("/")[-1] in msg


def test_a_damaged_deflate_stream_in_a_zip_is_one_line(dummy_builder, manual_copy, tmp_path):
  """Bytes flipped inside a compressed member: zlib's error names the member, no traceback."""
  path = manual_copy / "Images-processed/CT_COVID.zip"
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(COVID_MEMBER)
  data = bytearray(path.read_bytes())
  start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
  for i in range(start + 10, start + min(info.compress_size, 200)):
    data[i] ^= 0x55
  path.write_bytes(bytes(data))
  msg = _build_fails(manual_copy, tmp_path / "d", "cannot be read from the zip|does not match the manifest")
  assert "CT_COVID.zip" in msg


def test_a_manual_dir_given_for_a_prepared_source_is_said_to_be_unread(dummy_builder, manual_copy, tmp_path):
  """A damaged manual dir pointed at a data dir that already holds the source: the build reuses what was verified
  when it was made, and says that it did not read the folder (it used to answer 'ready' as if it had)."""
  runner = CliRunner()
  data = ["--data-dir", str(tmp_path / "d")]
  assert runner.invoke(main, ["data", "build", "--manual-dir", str(manual_copy), *data]).exit_code == 0
  (manual_copy / "NonCOVID-CT-MetaInfo.csv").write_bytes(b"\x00" * 10)
  res = runner.invoke(main, ["data", "build", "--manual-dir", str(manual_copy), *data])
  assert res.exit_code == 0 and f"already prepared: {manual_copy} was not read again" in res.output, res.output
  assert "delete" in res.output
