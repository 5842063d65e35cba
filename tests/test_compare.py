"""`covidct compare`: runs grouped by what they changed, seeds averaged, on real (tiny) training runs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from covidct.compare import agreement, options_of
from covidct.config import resolve
from covidct.train import train


@pytest.fixture(scope="module")
def runs(dummy_data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("compare")
  made = {}
  for name, kw in {"a-s1": dict(seed=1), "a-s2": dict(seed=2), "mix-s1": dict(seed=1, mixup=0.3)}.items():
    cfg = resolve("default", epochs=2, image_size=48, batch_size=4, data_dir=str(dummy_data_dir), **kw)
    train(cfg, root / name, verbose=0)
    made[name] = root / name
  for name in ("a-s1", "a-s2"):  # the test split scored for two runs of three
    res = CliRunner().invoke(main, ["evaluate", str(made[name]), "--data-dir", str(dummy_data_dir),
                                    "--bootstrap", "10"])
    assert res.exit_code == 0, res.output
  return made


def test_options_of_says_what_differs_from_the_recipe():
  as_dict = lambda cfg: json.loads(cfg.to_json())  # what config.json holds
  assert options_of(as_dict(resolve("finetune", seed=3, data_dir="/x"))) == "as is"
  assert options_of(as_dict(resolve("finetune", image_size=288, fine_tune_from="block_13", mixup=0.2))) == \
      "fine_tune_from=block_13, mixup=0.2"  # the input size has its own column
  from covidct.config import AugmentConfig

  on = as_dict(resolve("default", augment=AugmentConfig(noise=2.0)))
  assert options_of(on) == "augment=on, augment.noise=2.0"
  assert options_of(as_dict(dataclasses.replace(resolve("finetune"), augment=None))) == "augment=off"
  assert options_of({"recipe": "qat"}) == "recipe qat"


def test_compare_groups_seeds_and_averages(runs, tmp_path):
  out = tmp_path / "cmp"
  res = CliRunner().invoke(main, ["compare", *(str(r) for r in runs.values()), "--out", str(out)])
  assert res.exit_code == 0, res.output
  result = json.loads((out / "compare.json").read_text())
  groups = {g["options"]: g for g in result["groups"]}
  short = "batch_size=4, epochs=2"  # what these tiny runs changed from the default recipe
  assert set(groups) == {short, f"{short}, mixup=0.3"}
  plain, mixed = groups[short], groups[f"{short}, mixup=0.3"]
  assert plain["seeds"] == [1, 2] and mixed["seeds"] == [1]
  val = [json.loads((runs[n] / "history.json").read_text())["summary"]["validation"]["auc"] for n in ("a-s1", "a-s2")]
  test = [json.loads((runs[n] / "evaluation-test" / "report.json").read_text())["roc_auc"] for n in ("a-s1", "a-s2")]
  assert plain["val_auc"] == pytest.approx(np.mean(val)) and plain["test_auc"] == pytest.approx(np.mean(test))
  assert mixed["test_auc"] is None  # not evaluated: no test score, no mean
  assert f"{val[0]:.3f} / {val[1]:.3f} (mean {np.mean(val):.3f})" in res.output
  assert (out / "compare.md").read_text() in res.output
  assert (out / "validation_vs_test.png").stat().st_size > 1000
  again = CliRunner().invoke(main, ["compare", str(runs["a-s1"]), "--out", str(out)])
  assert again.exit_code == 1 and "exists" in again.output


def test_compare_refuses_what_is_not_a_run(runs, tmp_path):
  res = CliRunner().invoke(main, ["compare", str(runs["a-s1"]), str(tmp_path)])
  assert res.exit_code == 1 and "has no config.json" in res.output and "Traceback" not in res.output
  (tmp_path / "config.json").write_text("{not json")
  res = CliRunner().invoke(main, ["compare", str(tmp_path)])
  assert res.exit_code == 1 and "cannot read" in res.output and "Traceback" not in res.output


def test_agreement_of_validation_and_test():
  rows = [{"val_auc": v, "test_auc": t} for v, t in ((0.70, 0.90), (0.80, 0.85), (0.90, 0.70), (0.75, None))]
  fit = agreement(rows)
  assert fit["runs"] == 3 and fit["spearman"] == pytest.approx(-1.0) and -1 < fit["pearson"] < -0.9
  # a perfect ranking of 3 runs happens by chance in 2 of the 6 orderings (either direction): exact p = 1/3, not 0
  assert fit["spearman_p"] == pytest.approx(1 / 3) and fit["pearson_p"] == pytest.approx(1 / 3)
  many = [{"val_auc": 0.70 + 0.01 * i, "test_auc": 0.90 - 0.01 * i + 0.005 * (i % 2)} for i in range(12)]
  big = agreement(many)  # beyond a few runs, scipy's usual p-values
  assert big["runs"] == 12 and big["spearman"] < -0.9 and big["spearman_p"] < 1e-3 and big["pearson_p"] < 1e-3
  assert agreement(rows[:2]) is None  # too few runs to say
  assert agreement([{"val_auc": 0.8, "test_auc": t} for t in (0.7, 0.8, 0.9)]) is None  # one validation value


def test_legend_label_shortens_weight_paths():
  from covidct.compare import legend_label

  group = {"model": "mobilenet_v2_0.5", "image_size": 224,
           "options": "freeze_batch_norm=True, weights=/tmp/x/simclr/checkpoints/epoch_0600.weights.h5"}
  assert legend_label(group) == ("mobilenet_v2_0.5 224: freeze_batch_norm=True, "
                                 "weights=.../checkpoints/epoch_0600.weights.h5")
  assert legend_label(dict(group, options="x" * 200)).endswith("...") and len(legend_label(dict(group, options="x" * 200))) == 100
