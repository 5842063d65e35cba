"""`covidct serve`: a pushed version behind KServe's model server, started on loopback ports and stopped here."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from tests.conftest import DUMMY_DATA, SIZE

pytest.importorskip("kserve")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _post(url, body: bytes | dict, content_type="application/json"):
  data = json.dumps(body).encode() if isinstance(body, dict) else body
  req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read() or b"{}")


def _get(url):
  try:
    with urllib.request.urlopen(url, timeout=30) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
  out = tmp_path_factory.mktemp("scans")
  files = []
  with zipfile.ZipFile(DUMMY_DATA / "Images-processed" / "CT_COVID.zip") as zf:
    for i, name in enumerate(n for n in zf.namelist() if not n.endswith("/")):
      path = out / f"{i}{os.path.splitext(name)[1]}"
      path.write_bytes(zf.read(name))
      files.append(path)
  return files[:3]


@pytest.fixture(scope="module")
def server(exported, dummy_data_dir, tmp_path_factory):
  """A serving folder with version 1 pushed, and `covidct serve` on it (REST and gRPC on free loopback ports)."""
  from covidct.push import push
  from covidct.serve import wait_until_ready

  serving = tmp_path_factory.mktemp("serve") / "serving"
  push(exported, serving, data_dir=str(dummy_data_dir), force=True)
  http, grpc = _free_port(), _free_port()
  log = serving.parent / "server.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "covidct.cli", "serve", str(serving), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--max-batch", "4", "--max-body-mb", "1",
                             "--reload-seconds", "0.5", "--request-timeout", "3"], stdout=out,
                            stderr=subprocess.STDOUT)
  try:
    wait_until_ready(f"http://127.0.0.1:{http}/v2/models/covidct/ready", timeout=120, process=proc)
  except Exception:
    proc.kill()
    raise AssertionError(log.read_text()[-3000:])
  yield {"url": f"http://127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "serving": serving, "proc": proc,
         "log": log}
  proc.send_signal(signal.SIGINT)
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()


def _b64(path) -> str:
  return base64.b64encode(path.read_bytes()).decode()


def _predicted(scans, model):
  res = CliRunner().invoke(main, ["predict", *map(str, scans), "--model", str(model), "--json"])
  assert res.exit_code == 0, res.output
  return [r["probability"] for r in json.loads(res.stdout)["results"]]


def test_serve_answers_v1_v2_rest_and_grpc_as_predict_does(server, scans):
  url = server["url"]
  assert _get(f"{url}/v2/health/ready")[0] == 200 and _get(f"{url}/v2/health/live")[0] == 200
  status, meta = _get(f"{url}/v2/models/covidct")
  assert status == 200 and meta["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 1]}
  assert {o["name"] for o in meta["outputs"]} == {"covid_probability", "label", "input_warning"}
  want = _predicted(scans, server["serving"] / "1")

  status, v1 = _post(f"{url}/v1/models/covidct:predict", {"instances": [{"b64": _b64(p)} for p in scans]})
  assert status == 200, v1
  assert [p["probability"] for p in v1["predictions"]] == pytest.approx(want, abs=1e-6)
  assert v1["model_version"] == "1" and {p["label"] for p in v1["predictions"]} <= {"NonCOVID", "COVID"}

  status, v2 = _post(f"{url}/v2/models/covidct/infer", {"inputs": [
      {"name": "image_bytes", "datatype": "BYTES", "shape": [len(scans)], "data": [_b64(p) for p in scans]}]})
  assert status == 200, v2
  out = {o["name"]: o for o in v2["outputs"]}
  assert out["covid_probability"]["shape"] == [len(scans), 1]
  assert out["covid_probability"]["data"] == pytest.approx(want, abs=1e-6)
  assert out["label"]["data"] == [p["label"] for p in v1["predictions"]]

  from covidct.predict import load_image

  images = np.stack([load_image(p, SIZE) for p in scans])
  status, v2 = _post(f"{url}/v2/models/covidct/versions/1/infer", {"inputs": [
      {"name": "image", "datatype": "UINT8", "shape": list(images.shape), "data": images.reshape(-1).tolist()}]})
  assert status == 200, v2
  assert v2["outputs"][0]["data"] == pytest.approx(want, abs=1e-6)

  # gRPC, with KServe's own client.
  import asyncio

  from kserve import InferenceGRPCClient, InferInput, InferRequest

  async def grpc_infer():
    client = InferenceGRPCClient(server["grpc"], use_ssl=False)
    tensor = InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    res = await client.infer(InferRequest(model_name="covidct", infer_inputs=[tensor], request_id="r1"))
    await client.close()
    return res

  res = asyncio.run(grpc_infer())
  assert res.outputs[0].as_numpy().reshape(-1).tolist() == pytest.approx(want, abs=1e-6)


def _bomb() -> bytes:
  """A small PNG whose header claims 30000 x 30000 pixels."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  rows = zlib.compress(b"\x00" * 1000)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, scans):
  url = server["url"]
  png = scans[0].read_bytes()
  buf = io.BytesIO()
  from PIL import Image

  Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
  cases = {
      "not an image": ({"instances": [{"b64": base64.b64encode(b"hello, not a PNG").decode()}]}, 400, "not a readable"),
      "truncated PNG": ({"instances": [{"b64": base64.b64encode(png[:len(png) // 3]).decode()}]}, 400, "image 0"),
      "not base64": ({"instances": [{"b64": "%%%"}]}, 400, "base64"),
      "empty batch": ({"instances": []}, 400, "empty batch"),
      "batch over the maximum": ({"instances": [{"b64": _b64(scans[0])}] * 5}, 400, "maximum of 4"),
      "decompression bomb": ({"instances": [{"b64": base64.b64encode(_bomb()).decode()}]}, 400, "pixels"),
      "wrong shape": ({"instances": [[[1, 2], [3, 4]]]}, 400, "expected [N"),
      "values out of range": ({"instances": np.full((1, SIZE, SIZE, 1), 300).tolist()}, 400, "0 to 255"),
      "no instances key": ({"rows": []}, 400, "instances"),
  }
  for what, (body, code, words) in cases.items():
    status, answer = _post(f"{url}/v1/models/covidct:predict", body)
    assert status == code and words in answer.get("error", ""), (what, status, answer)
  v2_cases = {
      "wrong dtype": ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [0.5]}]}, 400),
      "two inputs": ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [1]}] * 2}, 400),
      "unknown version": ({"inputs": []}, 404),
  }
  for what, (body, code) in v2_cases.items():
    path = "versions/99/infer" if what == "unknown version" else "infer"
    status, answer = _post(f"{url}/v2/models/covidct/{path}", body)
    assert status == code and answer.get("error"), (what, status, answer)
  assert _post(f"{url}/v2/models/nope/infer", {"inputs": []})[0] == 404
  assert _post(f"{url}/v1/models/nope:predict", {"instances": []})[0] == 404
  assert _post(f"{url}/v1/models/covidct:predict", b"{not json")[0] in (400, 422)
  status, answer = _post(f"{url}/v1/models/covidct:predict", b"x" * (1024 * 1024 + 1))
  assert status == 413 and "limit" in answer["error"]
  # Still serving.
  assert server["proc"].poll() is None
  status, ok = _post(f"{url}/v1/models/covidct:predict", {"instances": [{"b64": _b64(scans[0])}]})
  assert status == 200 and len(ok["predictions"]) == 1


def test_malformed_v2_tensors_get_400_on_rest_and_invalid_argument_on_grpc(server):
  """Each value of a UINT8 tensor is checked as sent (never cast), and its shape against its data (issue 32)."""
  url, n = server["url"], SIZE * SIZE
  cases = {
      "floats in a UINT8 tensor": ([1, SIZE, SIZE, 1], [200.7] + [1] * (n - 1), "integers from 0 to 255"),
      "a negative float": ([1, SIZE, SIZE, 1], [-0.5] * n, "integers from 0 to 255"),
      "a value over 255": ([1, SIZE, SIZE, 1], [300] * n, "integers from 0 to 255"),
      "a short tensor": ([1, SIZE, SIZE, 1], [1] * (n - 7), f"holds {n - 7} values"),
      "a negative dimension": ([-1, SIZE, SIZE, 1], [1] * n, "integer >= 0"),
      "booleans": ([1, SIZE, SIZE, 1], [True] * n, "integers from 0 to 255"),
  }
  for what, (shape, data, words) in cases.items():
    status, answer = _post(f"{url}/v2/models/covidct/infer",
                           {"inputs": [{"name": "image", "datatype": "UINT8", "shape": shape, "data": data}]})
    assert status == 400 and words in answer.get("error", ""), (what, status, answer)
  import grpc
  from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
  from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

  def grpc_infer(shape, values, version=""):  # KServe's client checks shapes: the raw stub sends what others may
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=shape,
                                                   contents=pb.InferTensorContents(uint_contents=values))
    with grpc.insecure_channel(server["grpc"]) as channel:
      try:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(
            model_name="covidct", model_version=version, inputs=[tensor]), timeout=30)
      except grpc.RpcError as e:
        return e.code(), e.details()
    return None, None

  code, details = grpc_infer([1, SIZE, SIZE, 1], [1] * (n - 7))
  assert code == grpc.StatusCode.INVALID_ARGUMENT and f"holds {n - 7} values" in details, (code, details)
  code, details = grpc_infer([1, SIZE, SIZE, 1], [256] * n)
  assert code == grpc.StatusCode.INVALID_ARGUMENT and "0 to 255" in details, (code, details)
  code, details = grpc_infer([1, SIZE, SIZE, 1], [7] * n, version="9")  # another version is refused, not answered
  assert code == grpc.StatusCode.NOT_FOUND and "version 9 is not served; version 1 is" in details, (code, details)
  assert grpc_infer([1, SIZE, SIZE, 1], [7] * n, version="1") == (None, None)
  assert _post(f"{url}/v2/models/covidct/infer", {"inputs": [{"name": "image", "datatype": "UINT8", "shape":
                                                              [1, SIZE, SIZE, 1], "data": [7] * n}]})[0] == 200


def test_serve_applies_the_input_guard_as_predict_does(server, scans, tmp_path):
  """An all-black image and a photograph were labelled COVID with no warning by serve where predict flagged them
  (issue 32): every path that labels an image applies the version's guard."""
  import skimage.data
  from PIL import Image

  black, photo = tmp_path / "black.png", tmp_path / "astronaut.jpg"
  Image.fromarray(np.zeros((256, 256), np.uint8)).save(black)
  Image.fromarray(skimage.data.astronaut()).save(photo)
  status, v1 = _post(f"{server['url']}/v1/models/covidct:predict",
                     {"instances": [{"b64": _b64(p)} for p in (black, photo)]})
  assert status == 200, v1
  assert "near-constant" in v1["predictions"][0]["warning"] and "a colour picture" in v1["predictions"][1]["warning"]
  res = CliRunner().invoke(main, ["predict", str(black), str(photo), "--model", str(server["serving"] / "1"), "--json"])
  assert [("warning" in r) for r in json.loads(res.stdout)["results"]] == [True, True]
  status, v2 = _post(f"{server['url']}/v2/models/covidct/infer", {"inputs": [
      {"name": "image", "datatype": "UINT8", "shape": [1, SIZE, SIZE, 1], "data": [0] * (SIZE * SIZE)}]})
  out = {o["name"]: o["data"] for o in v2["outputs"]}
  assert status == 200 and "near-constant" in out["input_warning"][0], v2


def _raw_http(port: int, head: bytes, chunks=(), pause: float = 0.0, read_timeout: float = 20.0) -> bytes:
  import time

  with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
    sock.sendall(head)
    try:
      for chunk in chunks:
        sock.sendall(chunk)
        time.sleep(pause)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the server cut the sender off: what it answered is still to be read
    answer = b""
    try:
      while True:
        got = sock.recv(65536)
        if not got:
          return answer
        answer += got
    except ConnectionResetError:
      return answer


def test_a_chunked_oversized_body_and_a_slow_sender_are_cut_off(server, scans):
  """The body limit counts what arrives, not what Content-Length claims (a chunked body has none); a request whose
  headers or body trickle in is answered 408 and closed after --request-timeout (3 s here), and the server keeps
  serving (issue 32's slowloris held 20 of 20 connections for 75 s)."""
  import time

  port = int(server["url"].rsplit(":", 1)[1])
  head = (b"POST /v1/models/covidct:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Transfer-Encoding: chunked\r\n\r\n")
  block = b"x" * 65536
  chunk = b"%x\r\n%s\r\n" % (len(block), block)
  answer = _raw_http(port, head, [chunk] * 40)  # 2.5 MB against a 1 MB limit
  assert answer.startswith(b"HTTP/1.1 413") and b"limit of 1048576 bytes" in answer, answer[:300]
  start = time.time()
  answer = _raw_http(port, b"POST /v1/models/covidct:predict HTTP/1.1\r\nHost: x\r\n", [b"X-a: b\r\n"] * 10,
                     pause=1.0)
  assert answer.startswith(b"HTTP/1.1 408") and time.time() - start < 15, answer[:300]
  status, ok = _post(f"{server['url']}/v1/models/covidct:predict", {"instances": [{"b64": _b64(scans[0])}]})
  assert status == 200 and len(ok["predictions"]) == 1


def test_a_newly_pushed_version_is_served_without_a_restart(server, scans, exported, dummy_data_dir):
  import time

  from covidct.push import push

  url = server["url"]
  pushed = push(exported, server["serving"], data_dir=str(dummy_data_dir), force=True)
  assert pushed["version"] == 2
  deadline = time.time() + 30
  version = None
  while time.time() < deadline:
    try:
      status, answer = _post(f"{url}/v1/models/covidct:predict", {"instances": [{"b64": _b64(scans[0])}]})
    except TimeoutError as e:
      raise AssertionError(server["log"].read_text()[-4000:]) from e
    assert status == 200
    version = answer["model_version"]
    if version == "2":
      break
    time.sleep(0.3)
  assert version == "2"
  assert _post(f"{url}/v2/models/covidct/versions/1/infer", {"inputs": []})[0] == 404


def test_serve_refuses_a_missing_folder_or_version(tmp_path):
  res = CliRunner().invoke(main, ["serve", str(tmp_path / "none")])
  assert res.exit_code == 1 and "no such serving folder" in res.stderr
  (tmp_path / "serving").mkdir()
  res = CliRunner().invoke(main, ["serve", str(tmp_path / "serving")])
  assert res.exit_code == 1 and "no blessed version" in res.stderr
  res = CliRunner().invoke(main, ["serve", str(tmp_path / "serving"), "--version", "3"])
  assert res.exit_code == 1 and "has no version 3" in res.stderr
  shutil.rmtree(tmp_path / "serving")


def test_push_serves_the_candidate_first_and_refuses_one_that_fails_in_the_server(exported, dummy_data_dir, tmp_path,
                                                                                    monkeypatch):
  import covidct.vectors
  from covidct.errors import CovidctError
  from covidct.push import push

  serving = tmp_path / "serving"
  info = push(exported, serving, data_dir=str(dummy_data_dir), force=True)
  check = json.loads((serving / "1" / "blessing.json").read_text())["infra_validation"]
  assert check == info["infra_validation"] and check["canaries"] >= 1 and check["max_abs_diff"] <= check["tolerance"]
  before = sorted(p.name for p in serving.iterdir())
  # A server that answers differently from the recorded answers (here: the recorded answers moved by 0.3).
  original = covidct.vectors.load_vectors
  monkeypatch.setattr(covidct.vectors, "load_vectors",
                      lambda a: (lambda i, w, t: (i, np.clip(w + 0.3, 0, 1), t))(*original(a)))
  with pytest.raises(CovidctError, match="infra validation: the served .* canary images"):
    push(exported, serving, data_dir=str(dummy_data_dir), force=True)
  assert sorted(p.name for p in serving.iterdir()) == before  # nothing left behind, no version taken
  monkeypatch.setattr(covidct.vectors, "load_vectors", original)
  # A candidate the server cannot load (its SavedModel damaged after the push's own checks).
  from covidct.serve import infra_validate

  candidate = tmp_path / "candidate"
  shutil.copytree(serving / "1", candidate)
  pb = candidate / "saved_model.pb"
  pb.write_bytes(pb.read_bytes()[:100])
  with pytest.raises(CovidctError, match="infra validation: the server exited"):
    infra_validate(candidate, exported)


def test_load_test_with_locust_against_the_served_export(exported, tmp_path):
  import importlib.util

  if importlib.util.find_spec("locust") is None:  # found, not imported: Locust monkey-patches the process (gevent)
    pytest.skip(reason="Locust is not installed")
  from benchmarks.serving import load_test, markdown

  res = load_test(exported, tmp_path / "load", concurrencies=(1, 4), seconds=4)
  assert [r["concurrency"] for r in res["rows"]] == [1, 4]
  for r in res["rows"]:
    assert r["requests"] > 0 and r["errors"] == 0 and 0 < r["p50_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
    assert r["server_peak_rss_mb"] > 50
  table = markdown(res)
  assert "| 4 |" in table and "Locust" in table
  assert (tmp_path / "load" / "locust_c4_stats.csv").exists()


def test_a_server_child_dies_with_its_parent_even_on_kill_9(tmp_path):
  """push's infra validation starts `covidct serve` with die_with_parent: a parent killed with SIGKILL (no cleanup
  runs) must not leave its child listening."""
  import os
  import signal
  import subprocess
  import sys
  import time

  parent = subprocess.Popen(
      [sys.executable, "-c", "import subprocess, sys, time\n"
       "from covidct.serve import die_with_parent\n"
       "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], preexec_fn=die_with_parent)\n"
       "print(child.pid, flush=True)\n"
       "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
  child = int(parent.stdout.readline())
  os.kill(parent.pid, signal.SIGKILL)
  parent.wait()
  deadline = time.time() + 10
  while time.time() < deadline:
    try:
      os.kill(child, 0)
    except ProcessLookupError:
      return  # gone (reaped by init)
    try:
      with open(f"/proc/{child}/stat") as fh:  # a zombie waiting for init to reap it is gone too
        if fh.read().split(")")[-1].split()[0] == "Z":
          return
    except FileNotFoundError:
      return
    time.sleep(0.1)
  os.kill(child, signal.SIGKILL)
  raise AssertionError("the child outlived its killed parent")
