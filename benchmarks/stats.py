"""Latency statistics: numpy does the arithmetic."""

from __future__ import annotations

import numpy as np


def latency_stats(samples_s, batch_size: int) -> dict:
  """Percentiles, mean and standard deviation of per-batch latency in milliseconds, and throughput in images/s."""
  ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
  if ms.size == 0:
    raise ValueError("no latency samples")
  p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
  mean = float(ms.mean())
  return {
      "runs": int(ms.size), "p50_ms": float(p50), "p90_ms": float(p90), "p95_ms": float(p95), "p99_ms": float(p99),
      "mean_ms": mean, "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
      "throughput_ips": float(batch_size * 1000.0 / mean),
  }
