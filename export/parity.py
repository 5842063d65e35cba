"""One parity check for every artifact against the SavedModel: names, then shapes, then values, then metrics."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from covidct.metrics import ranking_metrics, threshold_metrics
from covidct.models import INPUT_NAME, OUTPUT_NAME
from export.errors import ParityError
from export.formats import FORMATS, QUANTIZED

MAX_AUC_DROP = 0.01  # a quantized copy may lose at most this much test ROC AUC
MIN_AGREEMENT = 0.98  # and must agree with the SavedModel's decisions at the operating threshold this often


@dataclasses.dataclass
class ParityResult:
  format: str
  path: str
  input_name: str
  output_name: str
  max_abs_diff: float
  tolerance: float | None
  roc_auc: float
  reference_roc_auc: float
  sensitivity: float
  specificity: float
  agreement: float
  failures: list[str]
  median_abs_diff: float = float("nan")  # on the test images alone (max_abs_diff includes the edge inputs)
  rank_correlation: float = float("nan")  # Spearman, candidate against SavedModel probabilities on the test images

  @property
  def passed(self) -> bool:
    return not self.failures

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "passed": self.passed}


def edge_inputs(size: int, test_images: np.ndarray) -> dict[str, np.ndarray]:
  return {
      "all_black": np.zeros((1, size, size, 1), np.uint8),
      "all_white": np.full((1, size, size, 1), 255, np.uint8),
      "batch_of_one": test_images[:1],
      "batch_of_many": test_images,
  }


def check_parity(reference, candidate, fmt: str, test: dict, threshold: float, ref_probs=None,
                 quantized_reference: bool = False) -> ParityResult:
  """Compares `candidate` to `reference` (runners) on the test images and edge inputs.

  Checks, in order: input/output names, output shapes, probability values (max |diff| against the format's
  tolerance; reported only for quantized formats), then metric parity on the test split: ROC AUC within
  MAX_AUC_DROP and decisions at `threshold` agreeing on at least MIN_AGREEMENT of the scans (quantized formats).
  With `quantized_reference` (a quantization-aware SavedModel, whose graph already rounds every stored tensor to
  8 bits) every format is held to the quantized rules: one integer rounding that falls the other way moves a value by
  a quantization step, far above a float tolerance, while the decisions still agree.
  """
  failures = []
  if candidate.input_name != INPUT_NAME:
    failures.append(f"input name {candidate.input_name!r} != {INPUT_NAME!r}")
  if candidate.output_name != OUTPUT_NAME:
    failures.append(f"output name {candidate.output_name!r} != {OUTPUT_NAME!r}")
  if candidate.image_size != reference.image_size:
    failures.append(f"input size {candidate.image_size} != {reference.image_size}")
    raise ParityError(f"{fmt}: " + "; ".join(failures), failures)
  images, labels = test["images"], test["labels"]
  max_diff = 0.0
  for name, batch in edge_inputs(reference.image_size, images).items():
    want = reference(batch, batch_size=len(batch))
    got = candidate(batch, batch_size=len(batch))
    if got.shape != want.shape:
      failures.append(f"{name}: output shape {got.shape} != {want.shape}")
      continue
    max_diff = max(max_diff, float(np.max(np.abs(got.astype(np.float64) - want))))
  tolerance = None if quantized_reference else FORMATS[fmt][1]
  if tolerance is not None and max_diff > tolerance:
    failures.append(f"max |probability difference| {max_diff:.2e} > tolerance {tolerance:.0e}")
  ref_p = reference(images) if ref_probs is None else ref_probs
  cand_p = candidate(images)
  ref_auc = ranking_metrics(labels, ref_p)["roc_auc"]
  auc = ranking_metrics(labels, cand_p)["roc_auc"]
  agreement = float(np.mean((ref_p >= threshold) == (cand_p >= threshold)))
  at = threshold_metrics(labels, cand_p, threshold)
  if fmt in QUANTIZED or tolerance is None:
    if ref_auc - auc > MAX_AUC_DROP:
      failures.append(f"test ROC AUC {auc:.4f} is {ref_auc - auc:.4f} below the SavedModel's {ref_auc:.4f} "
                      f"(allowed {MAX_AUC_DROP})")
    if agreement < MIN_AGREEMENT:
      failures.append(f"decisions at threshold {threshold:.4f} agree on {agreement:.1%} of scans (< {MIN_AGREEMENT:.0%})")
  from scipy.stats import spearmanr  # pylint: disable=import-outside-toplevel

  diffs = np.abs(cand_p.astype(np.float64) - ref_p)
  rank = float(spearmanr(cand_p, ref_p)[0]) if len(cand_p) > 1 else float("nan")
  return ParityResult(fmt, str(getattr(candidate, "path", "")), candidate.input_name, candidate.output_name, max_diff,
                      tolerance, auc, ref_auc, at["sensitivity"], at["specificity"], agreement, failures,
                      float(np.median(diffs)), rank)


# The contract across CPUs, stated in every parity report (see covidct.runners.ONNX_SESSION_CONFIG).
CPU_CONTRACT = (
    "Checked on {cpu}. The int8 copies compute integers, and the runtimes compute the same integers on every x86-64 "
    "CPU (AVX2 or AVX-512, with or without VNNI) when ONNX Runtime runs with `session.x64quantprecision=1` on CPUs "
    "without VNNI (as covidct's runners do; without it ONNX Runtime saturates int8 products there; VNNI kernels are "
    "exact and faster without it). Float copies and the "
    "SavedModel sum in an order that depends on the CPU's vector width: their values may differ in the last float32 "
    "bits from one CPU kind to another, and in a quantization-aware model such a difference moves a value across a "
    "rounding step only where it lies within float32 rounding of that step.")


def markdown(results: list[ParityResult], threshold: float, quantization_aware: bool = False,
             verified_on: str = "this machine") -> str:
  qat = ["The SavedModel is quantization-aware (`covidct qat`): it computes in 8-bit steps itself, so every format, "
         "float ones included, is held to the quantized rules.", ""] if quantization_aware else []
  lines = ["# Parity against the SavedModel", "", *qat, CPU_CONTRACT.format(cpu=verified_on), "",
           f"Test split, {len(results) and 'all'} test images plus all-black, all-white, batch-of-one and batch-of-many "
           f"inputs. Operating threshold {threshold:.4f}. float32 copies pass within their value tolerance; float16 and "
           f"quantized copies (tolerance 'report') pass when their ROC AUC is within {MAX_AUC_DROP} of the "
           f"SavedModel's and decisions agree on >= {MIN_AGREEMENT:.0%} of scans.", "",
           "`median diff` and `rank corr` (Spearman) compare the probabilities on the test images alone.", "",
           "| format | max abs diff | tolerance | median diff | rank corr | ROC AUC | vs SavedModel | sensitivity "
           "| specificity | agreement | result |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
  for r in results:
    tol = f"{r.tolerance:.0e}" if r.tolerance is not None else "report"
    verdict = "pass" if r.passed else "FAIL: " + "; ".join(r.failures)
    lines.append(f"| {r.format} | {r.max_abs_diff:.2e} | {tol} | {r.median_abs_diff:.1e} | {r.rank_correlation:.4f} "
                 f"| {r.roc_auc:.4f} | {r.roc_auc - r.reference_roc_auc:+.4f} "
                 f"| {r.sensitivity:.3f} | {r.specificity:.3f} | {r.agreement:.1%} | {verdict} |")
  return "\n".join(lines) + "\n"


def write_report(results: list[ParityResult], threshold: float, out_dir, quantization_aware: bool = False,
                 verified_on: str = "this machine") -> dict:
  report = {"threshold": threshold, "max_auc_drop": MAX_AUC_DROP, "min_agreement": MIN_AGREEMENT,
            "quantization_aware": quantization_aware, "verified_on": verified_on,
            "passed": all(r.passed for r in results), "artifacts": [r.to_dict() for r in results]}
  (out_dir / "parity.json").write_text(json.dumps(report, indent=2))
  (out_dir / "parity.md").write_text(markdown(results, threshold, quantization_aware, verified_on))
  return report
