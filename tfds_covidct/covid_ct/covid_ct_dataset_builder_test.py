"""Declarative TFDS test of `covid_ct` on the synthetic `dummy_data/` (upstream layout, tiny images)."""

from unittest import mock

import numpy as np
import tensorflow_datasets as tfds

from tfds_covidct.covid_ct import covid_ct_dataset_builder

# What tools/make_dummy_data.py writes.
_DUMMY_COUNTS = {
    "train": {"COVID": 3, "NonCOVID": 3},
    "validation": {"COVID": 1, "NonCOVID": 2},
    "test": {"COVID": 2, "NonCOVID": 2},
}


class CovidCtTest(tfds.testing.DatasetBuilderTestCase):
  """Generates the dataset from dummy_data through the manual_dir path and checks every split."""

  DATASET_CLASS = covid_ct_dataset_builder.Builder
  SPLITS = {split: sum(by.values()) for split, by in _DUMMY_COUNTS.items()}

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._patches = [
        mock.patch.object(cls.DATASET_CLASS, "EXPECTED_COUNTS", _DUMMY_COUNTS),
        mock.patch.object(cls.DATASET_CLASS, "IMAGE_HASHES", cls.dummy_data / "image_hashes.tsv"),
    ]
    for p in cls._patches:
      p.start()

  @classmethod
  def tearDownClass(cls):
    for p in cls._patches:
      p.stop()
    super().tearDownClass()

  def test_examples_content(self):
    builder = self._make_builder()
    self._download_and_prepare_as_dataset(builder)
    for split in ("train", "validation", "test"):
      examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
      labels = [int(e["label"]) for e in examples]
      self.assertEqual(labels.count(1), _DUMMY_COUNTS[split]["COVID"])
      for e in examples:
        self.assertEqual(e["image"].dtype, np.uint8)
        self.assertEqual(e["image"].ndim, 3)
        self.assertEqual(e["image"].shape[-1], 1)
        self.assertTrue(e["patient_id"])
        self.assertTrue(e["filename"])
      modes = {e["original_mode"].decode() for e in examples}
      self.assertTrue(modes <= {"L", "RGB", "RGBA"})
    train = {e["filename"].decode(): e for e in tfds.as_numpy(builder.as_dataset(split="train"))}
    # The sheet names `kjr-21-e25-p1-8%1` without `.png`: it still gets its patient.
    self.assertEqual(train["kjr-21-e25-p1-8%1.png"]["patient_id"].decode(), "Patient 2")
    self.assertEqual(train["kjr-21-e25-p1-8%0.png"]["original_mode"].decode(), "RGBA")
    self.assertEqual(train["0.jpg"]["source"].decode(), "crawled")


if __name__ == "__main__":
  tfds.testing.test_main()
