"""Several sources: the builder's other configs through covidct, reading without TensorFlow, training on a mix of
sources, cross-validation over them, and evaluation that puts every source's test split side by side."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from covidct.errors import CovidctError
from tests.conftest import DUMMY_DATA, DUMMY_SOURCE_COUNTS, ROOT, SIZE

SOURCES = ("covid_ct", "cc_ccii", "covid_ct_md")


def test_data_info_prints_every_prepared_source(dummy_data_dir):
  res = CliRunner().invoke(main, ["data", "info", "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 0, res.output
  for name in SOURCES:
    assert f"covid_ct/{name} 1.1.0" in res.output
  assert "common_pneumonia" in res.output  # the diagnosis columns of the configs that record one
  res = CliRunner().invoke(main, ["data", "info", "--config", "cc_ccii", "--json", "--data-dir", str(dummy_data_dir)])
  info = json.loads(res.output)
  for split, counts in DUMMY_SOURCE_COUNTS["cc_ccii"].items():
    assert info["splits"][split]["per_class"] == counts
  assert info["splits"]["train"]["per_diagnosis"] == {"normal": 2, "common_pneumonia": 1, "covid": 2}
  assert info["splits"]["train"]["patients"] == 4  # Normal_3 has two slices


def test_an_unknown_config_or_a_missing_manual_dir_is_one_line(dummy_data_dir, tmp_path):
  for args, want in ((["data", "info", "--config", "nope"], "unknown source 'nope'"),
                     (["data", "build", "--config", "cc_ccii"], "built from a local copy only"),
                     (["data", "build", "--config", "all", "--manual-dir", str(DUMMY_DATA)], "cc_ccii needs its files"),
                     (["data", "build", "--manual-dir", "cc_ccii=/no/such/dir"], "does not exist")):
    res = CliRunner().invoke(main, [*args, "--data-dir", str(tmp_path / "d")])
    assert res.exit_code == 1 and want in res.output and "Traceback" not in res.output, (args, res.output)
    assert len(res.output.strip().splitlines()) == 1, res.output


def _damaged_copy(tmp_path, config):
  dst = tmp_path / config
  shutil.copytree(DUMMY_DATA / config, dst)
  return dst


@pytest.mark.parametrize("config,path,damage", [
    ("cc_ccii", "COVID/NCP_5_14_0001_128.png", lambda b: b[:-10] + b"\0" * 10),
    ("cc_ccii", "NonCOVID/CP/CP_9_18_0004_128.png", None),
    ("covid_ct_md", "NonCOVID/normal002_Normal_2.jpg", lambda b: b[: len(b) // 2]),
    ("covid_ct_md", "meta/Clinical-data.csv", lambda b: b.replace(b"039Y", b"093Y")),
], ids=["cc_ccii-hash", "cc_ccii-missing", "md-truncated", "md-clinical-changed"])
def test_a_damaged_source_file_stops_its_build_naming_it(dummy_builder, tmp_path, config, path, damage):
  manual = _damaged_copy(tmp_path, config)
  if damage is None:
    (manual / path).unlink()
  else:
    (manual / path).write_bytes(damage((manual / path).read_bytes()))
  data_dir = tmp_path / "d"
  res = CliRunner().invoke(main, ["data", "build", "--config", config, "--manual-dir", str(manual),
                                  "--data-dir", str(data_dir)])
  assert res.exit_code == 1 and "Traceback" not in res.output, res.output
  assert path in res.output and ("missing" if damage is None else "SHA-256") in res.output
  assert not list(data_dir.glob(f"covid_ct/{config}/[0-9]*"))  # nothing half-built for tfds.load to pick up


def test_a_changed_shipped_split_is_refused(dummy_builder, monkeypatch, tmp_path):
  manifest = tmp_path / "cc_ccii_files.tsv"
  # the test patient NCP_7 moved to train, next to its own slices in test: counts and disjointness both break
  lines = (DUMMY_DATA / "cc_ccii_files.tsv").read_text().splitlines()
  manifest.write_text("\n".join(l.replace("\ttest\t", "\ttrain\t") if "NCP_7" in l else l for l in lines) + "\n")
  monkeypatch.setattr(dummy_builder, "SOURCE_MANIFESTS", {**dummy_builder.SOURCE_MANIFESTS, "cc_ccii": manifest})
  from covidct import dataset

  with pytest.raises(Exception, match="the cc_ccii file list gives"):
    dataset.build(manual_dir=str(DUMMY_DATA / "cc_ccii"), data_dir=str(tmp_path / "d"), source="cc_ccii")


# TensorFlow is installed here; the process must read every config without ever importing it.
_NO_TENSORFLOW = """
import sys
import json
import tensorflow_datasets as tfds
import tfds_covidct  # registers covid_ct
out = {}
for config in ("covid_ct", "cc_ccii", "covid_ct_md"):
  splits = tfds.data_source(f"covid_ct/{config}", data_dir=sys.argv[1])
  first = splits["test"][0]
  out[config] = {"sizes": {s: len(v) for s, v in splits.items()}, "dataset": first["dataset"].decode(),
                 "shape": list(first["image"].shape), "dtype": str(first["image"].dtype), "label": int(first["label"])}
out["tensorflow_loaded"] = any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
print(json.dumps(out))
"""


def test_every_config_reads_by_random_access_in_a_process_without_tensorflow(dummy_data_dir):
  res = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW, str(dummy_data_dir)], capture_output=True, text=True,
                       cwd=ROOT, check=False, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["tensorflow_loaded"] is False
  assert out["covid_ct"]["sizes"] == {"train": 6, "validation": 3, "test": 4}
  assert out["cc_ccii"]["sizes"] == {s: sum(c.values()) for s, c in DUMMY_SOURCE_COUNTS["cc_ccii"].items()}
  assert out["covid_ct_md"]["sizes"] == {"test": 4}
  for config in SOURCES:
    assert out[config]["dataset"] == config and out[config]["dtype"] == "uint8" and out[config]["shape"][-1] == 1


def test_mix_streams_keep_each_sources_weight_and_class_balance(dummy_data_dir):
  from covidct.data import Mix, Selection

  view = (Selection("train"), Selection("train", source="cc_ccii"))
  streams = Mix({"covid_ct": 0.25, "cc_ccii": 0.75}).streams(view, str(dummy_data_dir))
  got = {(s.source, s.label): (round(p, 6), n) for s, p, n in streams}
  assert got == {("covid_ct", 0): (0.125, 3), ("covid_ct", 1): (0.125, 3), ("cc_ccii", 0): (0.375, 3),
                 ("cc_ccii", 1): (0.375, 2)}
  as_they_come = Mix({"covid_ct": 0.5, "cc_ccii": 0.5}, class_balance=False).streams(view, str(dummy_data_dir))
  assert [round(p, 6) for _, p, _ in as_they_come] == [0.25, 0.25, 0.3, 0.2]
  with pytest.raises(CovidctError, match="sum to 1"):
    Mix({"covid_ct": 0.5, "cc_ccii": 0.6})


def test_cap_slices_keeps_at_most_n_per_patient_the_same_way_every_time(dummy_data_dir):
  from covidct.data import Selection, cap_slices, split_labels

  sel = Selection("train", source="cc_ccii")
  capped = cap_slices(sel, str(dummy_data_dir), 1, seed=3)
  assert capped == cap_slices(sel, str(dummy_data_dir), 1, seed=3) and len(capped.files) == 4
  meta = split_labels(capped, str(dummy_data_dir))
  assert len(meta["patient_ids"]) == len(set(meta["patient_ids"])) == 4
  assert cap_slices(sel, str(dummy_data_dir), 2) is sel  # nobody has more than two: the selection itself


def test_training_on_two_sources_records_its_sampling(dummy_data_dir, tmp_path):
  res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--image-size", str(SIZE),
                                  "--batch-size", "4", "--sources", "covid_ct,cc_ccii", "--source-weights", "1,3",
                                  "--epoch-images", "16", "--data-dir", str(dummy_data_dir), "--quiet"])
  assert res.exit_code == 0, res.output
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["sources"] == ["covid_ct", "cc_ccii"] and config["source_weights"] == [0.25, 0.75]
  assert config["class_balance"] is True
  summary = json.loads((tmp_path / "run" / "history.json").read_text())["summary"]
  sampling = summary["sampling"]
  assert sampling["epoch_images"] == 16 and sampling["weights"] == {"covid_ct": 0.25, "cc_ccii": 0.75}
  assert [(s["source"], s["class"], s["probability"]) for s in sampling["streams"]] == [
      ("covid_ct", "NonCOVID", 0.125), ("covid_ct", "COVID", 0.125), ("cc_ccii", "NonCOVID", 0.375),
      ("cc_ccii", "COVID", 0.375)]
  assert summary["validation_data"] == "validation + cc_ccii:validation"
  # validation: both sources' validation splits (3 images, 1 COVID; then 2, 1 COVID)
  saved = np.load(tmp_path / "run" / "validation_predictions.npz")
  assert len(saved["labels"]) == 5 and saved["labels"][:3].sum() == 1 and saved["labels"][3:].sum() == 1
  from covidct.modelio import trained_sources

  assert trained_sources(tmp_path / "run") == ("covid_ct", "cc_ccii")


@pytest.mark.parametrize("args,want", [
    (["--sources", "covid_ct,covid_ct_md"], "external test site"),
    (["--sources", "covid_ct,cc_ccii", "--source-weights", "1"], "one weight > 0 per source"),
    (["--sources", "covid_ct,covid_ct"], "named twice"),
    (["--sources", "mnist"], "unknown source"),
    (["--slices-per-patient", "-1"], "slices_per_patient must be an integer >= 0"),
])
def test_bad_source_options_are_one_line(dummy_data_dir, tmp_path, args, want):
  res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--data-dir", str(dummy_data_dir), *args])
  assert res.exit_code != 0 and want in res.output and "Traceback" not in res.output, res.output
  assert not (tmp_path / "run").exists()


def test_cv_over_two_sources_groups_patients_per_source(dummy_data_dir, tmp_path):
  from covidct.config import resolve
  from covidct.cv import cross_validate

  cfg = resolve("default", epochs=1, image_size=SIZE, batch_size=4, data_dir=str(dummy_data_dir),
                sources=("covid_ct", "cc_ccii"), epoch_images=8)
  result = cross_validate(cfg, tmp_path / "cv", k=2, progress=False, audit=False)
  folds = json.loads((tmp_path / "cv" / "folds.json").read_text())
  assert folds["sources"] == ["covid_ct", "cc_ccii"] and folds["grouped_by"] == "source/patient_id"
  seen = [set(f["patients"]) for f in folds["folds"]]
  assert not seen[0] & seen[1]
  assert {p.split("/")[0] for f in seen for p in f} == {"covid_ct", "cc_ccii"}
  assert sum(f["examples"] for f in result["folds"]) == 9 + 7  # every train + validation image scored once
  assert {s: v["images"] for s, v in result["per_source"].items()} == {"covid_ct": 9, "cc_ccii": 7}
  assert "Each source's pooled out-of-fold ROC AUC" in (tmp_path / "cv" / "cv.md").read_text()


def test_evaluate_puts_every_source_side_by_side_and_labels_the_external_ones(model_dir, dummy_data_dir, tmp_path):
  out = tmp_path / "eval"
  res = CliRunner().invoke(main, ["evaluate", str(model_dir), "--data-dir", str(dummy_data_dir), "--out", str(out),
                                  "--bootstrap", "20"])
  assert res.exit_code == 0, res.output
  report = json.loads((out / "report.json").read_text())
  rows = {r["source"]: r for r in report["sources"]["rows"]}
  assert list(rows) == list(SOURCES)
  assert [rows[s]["external"] for s in SOURCES] == [False, True, True]  # model_dir trained on covid_ct only
  assert [rows[s]["examples"] for s in SOURCES] == [4, 3, 4]
  for row in rows.values():
    assert 0 <= row["roc_auc"] <= 1 and set(row["shortcut_audit"]["roc_auc"]) >= {"full", "lungs_hidden", "lungs_only"}
  # the covid_ct row is the main report's own figure, at the same threshold
  assert rows["covid_ct"]["roc_auc"] == pytest.approx(report["roc_auc"])
  text = (out / "report.md").read_text()
  assert "## Every source's test split" in text and "**external**" in text and "`cc_ccii`" in text
  only = CliRunner().invoke(main, ["evaluate", str(model_dir), "--data-dir", str(dummy_data_dir), "--out",
                                   str(tmp_path / "e2"), "--bootstrap", "0", "--sources", "covid_ct_md"])
  assert only.exit_code == 0, only.output
  assert [r["source"] for r in json.loads((tmp_path / "e2" / "report.json").read_text())["sources"]["rows"]] == [
      "covid_ct_md"]


def test_evaluate_names_the_sources_not_prepared(model_dir, dummy_builder, tmp_path):
  from covidct import dataset

  data_dir = tmp_path / "only-default"
  dataset.build(manual_dir=str(DUMMY_DATA), data_dir=str(data_dir))
  res = CliRunner().invoke(main, ["evaluate", str(model_dir), "--data-dir", str(data_dir), "--out",
                                  str(tmp_path / "e"), "--bootstrap", "0"])
  assert res.exit_code == 0, res.output
  assert "Not prepared in this data dir, so not scored: `cc_ccii`, `covid_ct_md`" in res.output


_BLOCK_EXTRA = """
import sys

class _Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {blocked!r}:
      raise ImportError(name + " is blocked")
    return None

sys.meta_path.insert(0, _Block())
import importlib.util
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in {blocked!r} else _find(name, *a)
sys.argv = ["covidct", *sys.argv[1:]]
from covidct.cli import main
main()
"""


@pytest.mark.parametrize("module,extra,args", [
    ("kserve", "serve", ["serve", "SERVING"]),
    ("apache_beam", "bulk", ["bulk-predict", "--model", "MODEL", "--input", "*.png", "--out", "OUT"]),
])
def test_a_command_whose_extra_is_missing_names_it_in_one_line(tmp_path, module, extra, args):
  args = [str(tmp_path / a) if a in ("SERVING", "MODEL", "OUT") else a for a in args]
  res = subprocess.run([sys.executable, "-c", _BLOCK_EXTRA.format(blocked=[module]), *args], capture_output=True,
                       text=True, cwd=ROOT, check=False)
  assert res.returncode == 1, res.stderr
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and f"'{extra}' extra" in lines[0] and f"covidct[{extra}]" in lines[0], res.stderr
  assert "Traceback" not in res.stderr


def test_the_base_install_leaves_out_the_extras():
  import configparser

  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  base = cfg["options"]["install_requires"]
  extras = cfg["options.extras_require"]
  for package, extra in (("kserve", "serve"), ("apache-beam", "bulk"), ("openvino", "openvino"), ("locust", "bench")):
    assert package not in base
    assert package in extras[extra] and package in extras["all"] and package in extras["test"]


def test_the_shipped_cc_ccii_split_is_patient_disjoint_and_stratified():
  from tfds_covidct.covid_ct.covid_ct_dataset_builder import (_SOURCE_COUNTS, _SOURCE_MANIFESTS, cc_ccii_record,
                                                              read_source_manifest)

  rows = read_source_manifest(_SOURCE_MANIFESTS["cc_ccii"])
  split_of, diagnoses = {}, {}
  for r in rows:
    record = cc_ccii_record(r.path)
    assert split_of.setdefault(record["patient_id"], r.split) == r.split
    diagnoses.setdefault(r.split, set()).add(record["diagnosis"])
  assert all(d == {"normal", "common_pneumonia", "covid"} for d in diagnoses.values())
  assert len(rows) == sum(sum(c.values()) for c in _SOURCE_COUNTS["cc_ccii"].values()) == 5605
  assert len({r.sha256 for r in rows}) == 5605  # every file its own hash
  hashes = {r.path: r.sha256 for r in read_source_manifest(_SOURCE_MANIFESTS["covid_ct_md"])}
  assert len(hashes) == 246 and "meta/Clinical-data.csv" in hashes


@pytest.mark.slow
def test_the_real_sources_build_with_their_documented_counts(sources_data_dir):
  """Against the real files in ../shared: every config's counts, patients never in two splits, a source on every
  example, and the default config unchanged (the same 203 test examples)."""
  from covidct import dataset

  want = {"cc_ccii": {"train": (3757, 807, 195), "validation": (759, 155, 44), "test": (1089, 230, 60)},
          "covid_ct_md": {"test": (245, 169, 245)},
          "covid_ct": {"train": (425, 191, 233), "validation": (118, 60, 56), "test": (203, 98, 95)}}
  for source, splits in want.items():
    info = dataset.describe(str(sources_data_dir), source)
    got = {s: (v["examples"], v["per_class"]["COVID"], v["patients"]) for s, v in info["splits"].items()}
    assert got == splits, source
  # tfds.load from a fresh process, as another project would: the documented sizes, a source on every example
  script = ("import json, sys, tensorflow_datasets as tfds, tfds_covidct\n"
            "out = {}\n"
            "for c in ('covid_ct', 'covid_ct/cc_ccii', 'covid_ct/covid_ct_md'):\n"
            "  splits = tfds.load(c, data_dir=sys.argv[1])\n"
            "  out[c] = {s: [int(ds.cardinality()), sorted({bytes(e['dataset'].numpy()).decode() for e in ds})]\n"
            "            for s, ds in splits.items()}\n"
            "print(json.dumps(out))\n")
  res = subprocess.run([sys.executable, "-c", script, str(sources_data_dir)], capture_output=True, text=True,
                       cwd=sources_data_dir, check=False, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert res.returncode == 0, res.stderr[-2000:]
  loaded = json.loads(res.stdout.strip().splitlines()[-1])
  for source, splits in want.items():
    name = "covid_ct" if source == "covid_ct" else f"covid_ct/{source}"
    assert {s: v[0] for s, v in loaded[name].items()} == {s: v[0] for s, v in splits.items()}
    assert all(v[1] == [source] for v in loaded[name].values())
  from covidct.data import Selection, split_labels

  for source in ("cc_ccii", "covid_ct"):
    by_split = {s: set(split_labels(Selection(s, source=source), str(sources_data_dir))["patient_ids"])
                for s in ("train", "validation", "test")}
    assert not (by_split["train"] & by_split["test"] or by_split["train"] & by_split["validation"]
                or by_split["validation"] & by_split["test"])
  for source in dataset.SOURCES:
    meta = split_labels(Selection("test", source=source), str(sources_data_dir))
    assert set(meta["sources"]) == {source}
  # The default config's test split is 1.0.0's, value for value in every field it had: the digest below was taken
  # from a 1.0.0 build (commit d369218) of the same files.
  import tensorflow_datasets as tfds

  fields = ("filename", "label", "patient_id", "age", "gender", "location", "doi", "source", "original_mode")
  builder = dataset.load_builder(str(sources_data_dir))
  rows = sorted(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False)), key=lambda e: e["filename"])
  h = hashlib.sha256()
  for e in rows:
    for k in fields:
      h.update(repr(e[k]).encode())
    h.update(np.ascontiguousarray(e["image"]).tobytes())
    h.update(repr(e["image"].shape).encode())
  assert len(rows) == 203 and h.hexdigest() == "7b465c4c81109aed01f98b350bc630d1de99b65ae46ed071182852dfb4f4af3f"
  assert {e["dataset"] for e in rows} == {b"covid_ct"}


def test_leave_one_source_out_scores_each_source_with_a_model_that_never_saw_it(dummy_data_dir, tmp_path):
  res = CliRunner().invoke(main, ["cv", "--out", str(tmp_path / "cv"), "--folds", "2", "--epochs", "1",
                                  "--image-size", str(SIZE), "--batch-size", "4", "--sources", "covid_ct,cc_ccii",
                                  "--epoch-images", "8", "--leave-one-source-out", "--data-dir", str(dummy_data_dir),
                                  "--quiet"])
  assert res.exit_code == 0, res.output
  loso = json.loads((tmp_path / "cv" / "loso" / "loso.json").read_text())
  rows = {r["source"]: r for r in loso["held_out"]}
  assert rows["covid_ct"]["trained_on"] == ["cc_ccii"] and rows["cc_ccii"]["trained_on"] == ["covid_ct"]
  assert rows["covid_ct"]["images"] == 9 and rows["cc_ccii"]["images"] == 7  # train + validation, never test
  for row in rows.values():
    assert set(row["audit"]) == {"full", "lungs_hidden", "lungs_only"} and len(row["roc_auc_by_epoch"]) == 1
  trained = json.loads((tmp_path / "cv" / "loso" / "without_covid_ct" / "config.json").read_text())
  assert trained["sources"] == ["cc_ccii"]
  assert "## Leave one source out" in res.output
  alone = CliRunner().invoke(main, ["cv", "--out", str(tmp_path / "cv1"), "--leave-one-source-out",
                                    "--data-dir", str(dummy_data_dir)])
  assert alone.exit_code == 1 and "needs at least two --sources" in alone.output
  assert not (tmp_path / "cv1").exists()


def test_only_held_out_screens_an_option_without_the_folds(dummy_data_dir, tmp_path):
  """`--only-held-out`: leave-one-source-out alone, written to OUT, with the option in its config."""
  res = CliRunner().invoke(main, ["cv", "--out", str(tmp_path / "screen"), "--only-held-out", "--epochs", "1",
                                  "--image-size", str(SIZE), "--batch-size", "4", "--sources", "covid_ct,cc_ccii",
                                  "--epoch-images", "8", "--augment", "--zoom", "0.3", "--shift", "0.1",
                                  "--data-dir", str(dummy_data_dir), "--quiet"])
  assert res.exit_code == 0, res.output
  out = tmp_path / "screen"
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "loso.json", "loso.md", "without_cc_ccii",
                                                    "without_covid_ct"]
  config = json.loads((out / "config.json").read_text())
  assert config["augment"]["zoom"] == 0.3 and config["augment"]["shift"] == 0.1
  assert "## Leave one source out" in res.output and "cv.md" not in res.output
  bad = CliRunner().invoke(main, ["cv", "--out", str(tmp_path / "bad"), "--only-held-out", "--zoom", "1.5",
                                  "--augment", "--sources", "covid_ct,cc_ccii", "--data-dir", str(dummy_data_dir)])
  assert bad.exit_code == 1 and "--zoom must be a fraction" in bad.output and not (tmp_path / "bad").exists()
