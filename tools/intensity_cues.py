"""How far each image's grey levels alone tell COVID from non-COVID, split by split (a dataset-card check).

    python tools/intensity_cues.py --data-dir D [--image-size 224]

For every split: the mean, over each class, of the per-image mean and standard deviation of the grey levels (after
the resize every model's input gets), and the ROC AUC that each of those two numbers reaches on its own as a COVID
score. A value far from 0.5 is a cue a network can learn instead of the disease; one that differs between splits
does not carry over.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score

from covidct.data import split_arrays


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--image-size", type=int, default=224)
  args = parser.parse_args()
  print("| split | mean grey level, COVID / non-COVID | ROC AUC of the mean | std of grey levels, COVID / non-COVID "
        "| ROC AUC of the std |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for split in ("train", "validation", "test"):
    arrays = split_arrays(split, args.data_dir, args.image_size)
    pixels = arrays["images"].reshape(len(arrays["labels"]), -1).astype(np.float32)
    labels = arrays["labels"]
    cells = []
    for stat in (pixels.mean(axis=1), pixels.std(axis=1)):
      cells += [f"{stat[labels == 1].mean():.1f} / {stat[labels == 0].mean():.1f}", f"{roc_auc_score(labels, stat):.3f}"]
    print(f"| {split} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
