"""Writes `tfds_covidct/covid_ct/dummy_data/`: a tiny, synthetic copy of the upstream layout for unit tests.

Run from the repository root: `python tools/make_dummy_data.py`. Deterministic images (the xlsx carries a timestamp).
Also writes `dummy_data/image_hashes.tsv`, the manifest the unit tests verify these images against, and the other
configs' fixtures (`dummy_data/cc_ccii/`, `dummy_data/covid_ct_md/`) with their manifests.
"""

import csv
import hashlib
import io
import pathlib
import zipfile

import numpy as np
import openpyxl
from PIL import Image

OUT = pathlib.Path(__file__).resolve().parents[1] / "tfds_covidct" / "covid_ct" / "dummy_data"
# split -> class -> [(file name, patient id, PIL mode, format)]; patients never cross splits.
LAYOUT = {
    "train": {
        "COVID": [("2020.01.24.919183-p27-132.png", "Patient 1", "RGB", "PNG"),
                  ("kjr-21-e25-p1-8%0.png", "Patient 2", "RGBA", "PNG"),
                  ("kjr-21-e25-p1-8%1.png", "Patient 2", "L", "PNG")],
        "NonCOVID": [("0.jpg", "crawled_patient_0", "RGB", "JPEG"),
                     ("1%0.jpg", "crawled_patient_1", "L", "JPEG"),
                     ("14.png", "medpix_patient_14", "RGBA", "PNG")],
    },
    "validation": {
        "COVID": [("2020.03.13.20035212-p23-155.png", "Patient 3", "RGB", "PNG")],
        "NonCOVID": [("23.png", "medpix_patient_23", "L", "PNG"), ("24.jpg", "crawled_patient_24", "RGB", "JPEG")],
    },
    "test": {
        "COVID": [("2020.03.22.20040782-p25-1542.png", "Patient 4", "RGBA", "PNG"),
                  ("2020.03.22.20040782-p25-1543.png", "Patient 4", "RGB", "PNG")],
        "NonCOVID": [("112.png", "medpix_patient_112", "L", "PNG"), ("166.jpg", "crawled_patient_166", "RGB", "JPEG")],
    },
}
SPLIT_FILE = {"train": "train", "validation": "val", "test": "test"}
COUNTS = {split: {label: len(items) for label, items in by.items()} for split, by in LAYOUT.items()}


def _image(rng, mode, fmt):
  h, w = rng.integers(24, 40), rng.integers(24, 48)
  channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
  pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
  if mode == "RGBA":
    pixels[..., 3] = 255
  im = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
  buf = io.BytesIO()
  im.save(buf, format=fmt)
  return buf.getvalue()


def main():
  rng = np.random.default_rng(0)
  hashes = []
  zips = {label: io.BytesIO() for label in ("COVID", "NonCOVID")}
  members = {label: [] for label in zips}
  for split, by in LAYOUT.items():
    for label, items in by.items():
      folder = OUT / "Data-split" / label
      folder.mkdir(parents=True, exist_ok=True)
      (folder / f"{SPLIT_FILE[split]}CT_{label}.txt").write_text("".join(f"{n}\n" for n, *_ in items))
      for name, _, mode, fmt in items:
        members[label].append((f"CT_{label}/{name}", _image(rng, mode, fmt)))
  (OUT / "Images-processed").mkdir(parents=True, exist_ok=True)
  for label, buf in zips.items():
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
      for member, data in sorted(members[label]):
        zf.writestr(zipfile.ZipInfo(member, date_time=(2020, 4, 1, 0, 0, 0)), data)
        hashes.append(f"{member}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}")
    (OUT / "Images-processed" / f"CT_{label}.zip").write_bytes(buf.getvalue())
  wb = openpyxl.Workbook()
  ws = wb.active
  ws.title = "positive_captions"
  ws.append(["File name", "Patient ID", "Age", "Gender", "Location", "Medical history", "Time", "Severity",
             "Other diseases", "DOI", "Captions"])
  for i, (name, pid, *_) in enumerate(n for by in LAYOUT.values() for n in by["COVID"]):
    shown = name[:-4] if i % 2 else name  # upstream drops `.png` from some names
    ws.append([shown, pid, [41, "40+", None][i % 3], ["M", "F ", None][i % 3], "Wuhan, China", None, None, None,
               None, "10.1101/2020.02.25.20021568" if i % 2 else None, "caption"])
  ws.append([None] * 10 + ["a caption continued on its own row"])
  buf = io.BytesIO()
  wb.save(buf)
  (OUT / "COVID-CT-MetaInfo.xlsx").write_bytes(buf.getvalue())
  with open(OUT / "NonCOVID-CT-MetaInfo.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["", "image name", "patient id"])
    for i, (name, pid, *_) in enumerate(n for by in LAYOUT.values() for n in by["NonCOVID"]):
      writer.writerow([i, name, pid])
  (OUT / "image_hashes.tsv").write_text("# path inside the zip\tsize in bytes\tsha256\n" + "\n".join(hashes) + "\n")


# The other configs' fixtures: dummy_data/cc_ccii/ and dummy_data/covid_ct_md/, each in its source's layout, with the
# manifest the builder checks them against (path, split, sha256), as tools/make_source_manifests.py writes the real one.
CC_CCII = {  # split -> [(path, ...)]: patients never cross splits; file names as CC-CCII's
    "train": ["COVID/NCP_1_10_0001_128.png", "COVID/NCP_2_11_0005_128.png", "NonCOVID/Normal/Normal_3_12_0001_128.png",
              "NonCOVID/Normal/Normal_3_12_0002_128.png", "NonCOVID/CP/CP_4_13_0003_128.png"],
    "validation": ["COVID/NCP_5_14_0001_128.png", "NonCOVID/CP/CP_6_15_0007_128.png"],
    "test": ["COVID/NCP_7_16_0002_128.png", "NonCOVID/Normal/Normal_8_17_0001_128.png",
             "NonCOVID/CP/CP_9_18_0004_128.png"],
}
COVID_CT_MD = ["COVID/P001_Covid_1.jpg", "COVID/P002_Covid_2.jpg", "NonCOVID/normal001_Normal_1.jpg",
               "NonCOVID/normal002_Normal_2.jpg"]
SOURCE_COUNTS = {
    "cc_ccii": {split: {"COVID": sum(p.startswith("COVID/") for p in paths),
                        "NonCOVID": sum(p.startswith("NonCOVID/") for p in paths)} for split, paths in CC_CCII.items()},
    "covid_ct_md": {"test": {"COVID": 2, "NonCOVID": 2}},
}


def _write(root: pathlib.Path, path: str, data: bytes) -> str:
  (root / path).parent.mkdir(parents=True, exist_ok=True)
  (root / path).write_bytes(data)
  return hashlib.sha256(data).hexdigest()


def sources():
  rng = np.random.default_rng(1)
  root = OUT / "cc_ccii"
  rows = []
  for split, paths in CC_CCII.items():
    for path in paths:
      pixels = rng.integers(0, 256, size=(128, 128), dtype=np.uint8)
      buf = io.BytesIO()
      Image.fromarray(pixels, "L").save(buf, format="PNG")
      rows.append(f"{path}\t{split}\t{_write(root, path, buf.getvalue())}")
  (OUT / "cc_ccii_files.tsv").write_text("# dummy CC-CCII: path, split, sha256\n" + "\n".join(rows) + "\n")
  root = OUT / "covid_ct_md"
  rows = []
  for path in COVID_CT_MD:
    grey = rng.integers(0, 256, size=(48, 48), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB").save(buf, format="JPEG")  # grey in 3 channels
    rows.append(f"{path}\ttest\t{_write(root, path, buf.getvalue())}")
  clinical = ("\ufeffclinical_data,,,,,,,,,\n,Diagnosis,Folder,Patient Gender,Patient Age,Weight,Clinical characteristics"
              " ,Surgery,Follow-up,PCR\n0,COVID-19,P001,M,039Y,80,Cough,NA,NA,\n1,COVID-19,P002,F,048Y,75,Fever,No,NA,\n"
              "2,Normal,normal001,M,049Y,82,Cough,Yes,,\n").encode()
  rows.append(f"meta/Clinical-data.csv\tmeta\t{_write(root, 'meta/Clinical-data.csv', clinical)}")
  (OUT / "covid_ct_md_files.tsv").write_text("# dummy COVID-CT-MD: path, split, sha256\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
  main()
  sources()
