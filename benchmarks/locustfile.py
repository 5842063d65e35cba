"""Locust user for `benchmarks.serving.load_test`: TF-Serving-style v1 `:predict` requests, one base64 PNG each,
cycling through real test images (COVIDCT_LOAD_IMAGES: a .npz of the PNGs' bytes, `data`, and where each ends, `ends`)."""

from __future__ import annotations

import base64
import itertools
import os

import numpy as np
from locust import HttpUser, constant, task

with np.load(os.environ["COVIDCT_LOAD_IMAGES"], allow_pickle=False) as _z:
  _DATA, _ENDS = _z["data"].tobytes(), [0, *_z["ends"].tolist()]
_BODIES = itertools.cycle([{"instances": [{"b64": base64.b64encode(_DATA[a:b]).decode()}]}
                           for a, b in zip(_ENDS, _ENDS[1:])])


class Client(HttpUser):
  wait_time = constant(0)  # closed loop: each user sends its next request when the last one is answered

  @task
  def predict(self):
    with self.client.post("/v1/models/covidct:predict", json=next(_BODIES), catch_response=True) as r:
      if r.status_code != 200 or len(r.json().get("predictions", [])) != 1:
        r.failure(f"status {r.status_code}")
