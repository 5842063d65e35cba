"""Declarative TFDS tests of each `covid_ct` config on the synthetic `dummy_data/` (each source's layout, tiny images)."""

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


class _Patched:
  """A mixin for the DatasetBuilderTestCases below: swaps the builder's class attributes named by `patches()` for
  the dummy data's, for the whole test case."""

  @classmethod
  def patches(cls) -> dict:
    raise NotImplementedError

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._patches = [mock.patch.object(cls.DATASET_CLASS, name, value) for name, value in cls.patches().items()]
    for p in cls._patches:
      p.start()

  @classmethod
  def tearDownClass(cls):
    for p in cls._patches:
      p.stop()
    super().tearDownClass()


class CovidCtTest(_Patched, tfds.testing.DatasetBuilderTestCase):
  """Generates the dataset from dummy_data through the manual_dir path and checks every split."""

  DATASET_CLASS = covid_ct_dataset_builder.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["covid_ct"]
  SPLITS = {split: sum(by.values()) for split, by in _DUMMY_COUNTS.items()}

  @classmethod
  def patches(cls) -> dict:
    return {"EXPECTED_COUNTS": _DUMMY_COUNTS, "IMAGE_HASHES": cls.dummy_data / "image_hashes.tsv",
            "METADATA_HASHES": cls.dummy_data / "metadata_hashes.tsv"}

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
    self.assertEqual({e["dataset"].decode() for e in train.values()}, {"covid_ct"})


if __name__ == "__main__":
  tfds.testing.test_main()


_ROOT = covid_ct_dataset_builder.epath.Path(covid_ct_dataset_builder.__file__).parent / "dummy_data"
# What tools/make_dummy_data.py writes for the other configs (its SOURCE_COUNTS).
_DUMMY_SOURCE_COUNTS = {
    "cc_ccii": {"train": {"COVID": 2, "NonCOVID": 3}, "validation": {"COVID": 1, "NonCOVID": 1},
                "test": {"COVID": 1, "NonCOVID": 2}},
    "covid_ct_md": {"test": {"COVID": 2, "NonCOVID": 2}},
}
_DUMMY_MANIFESTS = {name: _ROOT / f"{name}_files.tsv" for name in _DUMMY_SOURCE_COUNTS}


class _SourceConfig(_Patched):
  """A source config generated from its dummy_data/<config>/ folder through the manual_dir path."""

  DATASET_CLASS = covid_ct_dataset_builder.Builder
  SKIP_CHECKSUMS = True  # built from a local copy only: nothing is downloaded

  @classmethod
  def patches(cls) -> dict:
    return {"SOURCE_COUNTS": _DUMMY_SOURCE_COUNTS, "SOURCE_MANIFESTS": _DUMMY_MANIFESTS}

  def _examples(self, config):
    builder = self._make_builder(config=config)
    self._download_and_prepare_as_dataset(builder)
    return {split: list(tfds.as_numpy(builder.as_dataset(split=split))) for split in builder.info.splits}


class CcCciiTest(_SourceConfig, tfds.testing.DatasetBuilderTestCase):
  BUILDER_CONFIG_NAMES_TO_TEST = ["cc_ccii"]
  SPLITS = {split: sum(by.values()) for split, by in _DUMMY_SOURCE_COUNTS["cc_ccii"].items()}
  dummy_data = _ROOT / "cc_ccii"

  def test_examples_content(self):
    by_split = self._examples("cc_ccii")
    patients = {split: {e["patient_id"].decode() for e in examples} for split, examples in by_split.items()}
    self.assertFalse(patients["train"] & patients["test"] or patients["train"] & patients["validation"])
    train = {e["filename"].decode(): e for e in by_split["train"]}
    normal = train["Normal_3_12_0002_128.png"]
    self.assertEqual(normal["patient_id"].decode(), "Normal_3")
    self.assertEqual((int(normal["label"]), int(normal["diagnosis"]), int(normal["slice_index"])), (0, 0, 2))
    self.assertEqual(normal["scan_id"].decode(), "12")
    self.assertEqual(int(train["CP_4_13_0003_128.png"]["diagnosis"]), 1)
    self.assertEqual(int(train["NCP_1_10_0001_128.png"]["label"]), 1)
    for examples in by_split.values():
      for e in examples:
        self.assertEqual(e["dataset"].decode(), "cc_ccii")
        self.assertEqual(e["image"].shape, (128, 128, 1))


class CovidCtMdTest(_SourceConfig, tfds.testing.DatasetBuilderTestCase):
  BUILDER_CONFIG_NAMES_TO_TEST = ["covid_ct_md"]
  SPLITS = {"test": 4}
  dummy_data = _ROOT / "covid_ct_md"

  def test_examples_content(self):
    test = {e["filename"].decode(): e for e in self._examples("covid_ct_md")["test"]}
    covid = test["P001_Covid_1.jpg"]
    self.assertEqual((covid["patient_id"].decode(), covid["age"].decode(), covid["gender"].decode()), ("P001", "39", "M"))
    self.assertEqual((int(covid["label"]), int(covid["diagnosis"])), (1, 2))
    self.assertEqual(covid["original_mode"].decode(), "RGB")  # grey in three channels, stored as one
    self.assertEqual(test["normal002_Normal_2.jpg"]["age"].decode(), "")  # not in the clinical table
    self.assertEqual({e["dataset"].decode() for e in test.values()}, {"covid_ct_md"})
