"""Writes a synthetic "hospital archive" of N image files for the bulk-inference measurements (docs/results/bulk-inference.md).

Usage: `python tools/make_archive.py ../shared/covid-ct/Images-processed ARCHIVE --files 20000`

The dataset's 746 slices are unpacked once into ARCHIVE/_source/, then hard-linked under
ARCHIVE/study_<k>/slice_<i>.<ext> until there are N files: the bytes of real slices (PNG and JPEG, 61 to 1671 pixels
a side, as they come), spread over studies of 200 slices like a CT archive, at no extra disk space. One file in
1,000 is replaced by a truncated copy, so the errors output is exercised too.
"""

import argparse
import os
import pathlib
import zipfile


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("images_processed", type=pathlib.Path, help="the upstream Images-processed/ folder (the two zips)")
  ap.add_argument("archive", type=pathlib.Path, help="output folder (must not exist)")
  ap.add_argument("--files", type=int, default=20000)
  ap.add_argument("--per-study", type=int, default=200)
  args = ap.parse_args()
  source = args.archive / "_source"
  source.mkdir(parents=True)
  slices = []
  for name in ("CT_COVID.zip", "CT_NonCOVID.zip"):
    with zipfile.ZipFile(args.images_processed / name) as zf:
      for n in sorted(zf.namelist()):
        if n.lower().endswith((".png", ".jpg", ".jpeg")):
          path = source / f"{len(slices):04d}{pathlib.Path(n).suffix.lower()}"
          path.write_bytes(zf.read(n))
          slices.append(path)
  for i in range(args.files):
    src = slices[i % len(slices)]
    study = args.archive / f"study_{i // args.per_study:04d}"
    study.mkdir(exist_ok=True)
    dst = study / f"slice_{i % args.per_study:03d}{src.suffix}"
    if i % 1000 == 999:
      dst.write_bytes(src.read_bytes()[:100])  # a truncated file: unreadable
    else:
      os.link(src, dst)
  print(f"{args.files} files from {len(slices)} slices in {args.archive}/study_*/")


if __name__ == "__main__":
  main()
