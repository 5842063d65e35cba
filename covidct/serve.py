"""`covidct serve`: a pushed version behind KServe's model server (Open Inference Protocol v2 over REST and gRPC,
and the TF-Serving-style v1 REST API), on loopback unless told otherwise.

KServe's `ModelServer` binds every interface (`0.0.0.0` for REST, `[::]` for gRPC) with no option, so `start`
below builds the same two servers with the host given: the REST server's uvicorn config takes the host, and the
gRPC server is KServe's with its listening address made from the host. Everything else (the endpoints, their
request parsing, the v2 datamodels, the 4xx mapping of InvalidInput / ModelNotFound) is KServe's.

The model (`CovidctModel`) runs the copy `covidct bench` recommended for the version (or `--runtime`'s), with the
labels, threshold and input spec from the version's manifest. A newer blessed version pushed while serving is
picked up by `--reload-seconds` polling; a swap replaces the runner between requests, so in-flight ones finish on
the one they started with.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import pathlib
import threading
import time
import uuid

import numpy as np

from covidct.errors import CovidctError

MODEL_NAME = "covidct"
IMAGE_INPUT = "image"  # v2: uint8 [N, S, S, 1], resized as in training
BYTES_INPUT = "image_bytes"  # v2: BYTES [N], encoded PNG/JPEG (base64 strings over REST JSON, raw bytes over gRPC)
PROBABILITY_OUTPUT = "covid_probability"
LABEL_OUTPUT = "label"
WARNING_OUTPUT = "input_warning"  # the input guard's reasons per image, "" for none (v1: a "warning" key)
MAX_BATCH = 64  # images in one request
MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body larger than this is refused (413) before it is read
DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 8081
RUNTIMES = {"onnxruntime": "default", "litert": "default", "tensorflow": "default", "openvino": "openvino"}


def latest_blessed(serving_dir) -> int:
  """The newest pushed version that was blessed (or pushed with --force: a person's decision to ship it)."""
  from covidct.repository import versions  # pylint: disable=import-outside-toplevel

  blessed = [v["version"] for v in versions(serving_dir) if v.get("blessed") or v.get("forced")]
  if not blessed:
    raise CovidctError(f"{serving_dir} holds no blessed version; push one first (covidct push EXPORT --serving "
                       f"{serving_dir}).")
  return blessed[-1]


def version_artifact(version_dir: pathlib.Path, runtime: str | None) -> tuple[pathlib.Path, str]:
  """(artifact, runner runtime) for a pushed version: bench's recommendation, or the copy for `runtime`."""
  from covidct.manifest import Manifest  # pylint: disable=import-outside-toplevel
  from covidct.predict import resolve_model  # pylint: disable=import-outside-toplevel

  if runtime is None:
    artifact, how, _ = resolve_model(version_dir)
    return artifact, how
  if runtime not in RUNTIMES:
    raise CovidctError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}.")
  if runtime == "tensorflow":
    return version_dir, "default"
  manifest = Manifest.load(version_dir / "assets.extra")
  suffix = {"litert": (".tflite",), "onnxruntime": (".onnx",)}.get(runtime, (".onnx", ".tflite"))  # openvino: both
  float_first = sorted((a for a in manifest.artifacts.values() if a["file"].endswith(suffix)
                        and a["parity"]["passed"]), key=lambda a: ("float32" not in a["file"], a["file"]))
  if not float_first:
    raise CovidctError(f"version {version_dir.name} has no {' or '.join(suffix)} copy that passed parity for "
                       f"{runtime}.")
  return version_dir / "assets.extra" / float_first[0]["file"], RUNTIMES[runtime]


class Served:
  """One loaded version: its runner and what it means. Swapped whole on reload."""

  def __init__(self, serving_dir, version: int, runtime: str | None):
    from covidct.manifest import Manifest  # pylint: disable=import-outside-toplevel
    from covidct.predict import check_listed_file, find_manifest  # pylint: disable=import-outside-toplevel
    from covidct.guard import load_guard_near  # pylint: disable=import-outside-toplevel
    from covidct.runners import load_runner  # pylint: disable=import-outside-toplevel

    self.version = version
    self.dir = pathlib.Path(serving_dir) / str(version)
    self.artifact, how = version_artifact(self.dir, runtime)
    found = find_manifest(self.artifact)
    if found is not None and self.artifact.is_file():
      check_listed_file(self.artifact, *found)
    self.manifest = Manifest.load(self.dir / "assets.extra")
    self.runner = load_runner(self.artifact, runtime=how)
    self.size = int(self.manifest.input["shape"][1])
    self.labels = list(self.manifest.labels)
    self.threshold = float(self.manifest.threshold)
    self.guard = load_guard_near(self.artifact)  # the version's input guard (hash-checked), as predict applies it
    self.lock = threading.Lock()  # runners are not all safe to call from several threads at once

  def warm(self) -> None:
    """One encoded image through decode, resize and the model, so the first request is not the slow one (the
    decoder's TensorFlow loads here)."""
    import io  # pylint: disable=import-outside-toplevel

    from PIL import Image  # pylint: disable=import-outside-toplevel

    from covidct.predict import decode_image  # pylint: disable=import-outside-toplevel

    buf = io.BytesIO()
    Image.fromarray(np.full((self.size, self.size), 128, np.uint8)).save(buf, format="PNG")
    self.score(decode_image(buf.getvalue(), "warm-up", self.size)[0][None])

  def warnings(self, images: np.ndarray, originals: list | None = None) -> list[str]:
    """The input guard's reasons for each image, '' for one that looks like a training slice (as `covidct predict`
    warns); every image '' when the version has no guard."""
    if self.guard is None:
      return [""] * len(images)
    return ["; ".join(self.guard.check(im, originals[i] if originals else None)) for i, im in enumerate(images)]

  def score(self, images: np.ndarray) -> np.ndarray:
    with self.lock:
      p = np.asarray(self.runner(images), np.float64).reshape(-1)
    if p.shape[0] != images.shape[0] or not np.all((p >= 0) & (p <= 1)):
      raise CovidctError("the model returned something other than one probability in [0, 1] per image.")
    return p


def _kserve_model_class():
  """CovidctModel, defined on first use (importing kserve parses its own flags and starts its logging)."""
  import kserve  # pylint: disable=import-outside-toplevel
  from kserve.errors import InvalidInput  # pylint: disable=import-outside-toplevel
  from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # pylint: disable=import-outside-toplevel

  from covidct.predict import decode_image  # pylint: disable=import-outside-toplevel

  class CovidctModel(kserve.Model):
    """The served version behind KServe's endpoints."""

    def __init__(self, serving_dir, version: int | None, runtime: str | None, max_batch: int = MAX_BATCH):
      super().__init__(MODEL_NAME)
      self.serving_dir, self.pinned, self.runtime, self.max_batch = serving_dir, version, runtime, max_batch
      self.served: Served | None = None

    def load(self) -> bool:
      self.served = Served(self.serving_dir, self.pinned or latest_blessed(self.serving_dir), self.runtime)
      self.served.warm()
      self.ready = True
      return True

    def reload_if_newer(self) -> int | None:
      """Loads the newest blessed version if it is newer than the served one (not when pinned); its number."""
      if self.pinned is not None:
        return None
      newest = latest_blessed(self.serving_dir)
      if newest == self.served.version:
        return None
      served = Served(self.serving_dir, newest, self.runtime)
      served.warm()
      self.served = served  # one assignment: requests see the old version or the new one, warm
      return newest

    def get_input_types(self):
      s = self.served.size
      return [{"name": IMAGE_INPUT, "datatype": "UINT8", "shape": [-1, s, s, 1]},
              {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self):
      return [{"name": PROBABILITY_OUTPUT, "datatype": "FP32", "shape": [-1, 1]},
              {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
              {"name": WARNING_OUTPUT, "datatype": "BYTES", "shape": [-1]}]

    def _check_batch(self, n: int):
      if n == 0:
        raise InvalidInput("empty batch: send at least one image.")
      if n > self.max_batch:
        raise InvalidInput(f"batch of {n} images is over this server's maximum of {self.max_batch}; split it.")

    def _decode(self, items, size) -> tuple[np.ndarray, list]:
      self._check_batch(len(items))
      out, sizes = [], []
      for i, data in enumerate(items):
        try:
          image, original = decode_image(data, f"image {i}", size)
        except CovidctError as e:
          raise InvalidInput(str(e)) from e
        out.append(image)
        sizes.append(original)
      return np.stack(out), sizes

    def _images(self, served: Served, payload) -> tuple[np.ndarray, list | None]:
      """(the images, resized, and each one's original (height, width) where it came encoded)."""
      size = served.size
      if isinstance(payload, dict):  # v1: {"instances": [{"b64": ...} | nested uint8 lists]}
        instances = payload.get("instances")
        if not isinstance(instances, list):
          raise InvalidInput('expected {"instances": [...]}, each {"b64": "<base64 PNG/JPEG>"}.')
        self._check_batch(len(instances))
        if all(isinstance(x, dict) and "b64" in x for x in instances):
          return self._decode([_b64(x["b64"], i) for i, x in enumerate(instances)], size)
        return self._array(np.asarray(instances, dtype=object), size), None
      if not isinstance(payload, InferRequest) or len(payload.inputs) != 1:
        raise InvalidInput(f"expected one input, '{IMAGE_INPUT}' (UINT8 [N, {size}, {size}, 1]) or '{BYTES_INPUT}' "
                           "(BYTES [N], encoded images).")
      tensor = payload.inputs[0]
      if tensor.name == BYTES_INPUT and tensor.datatype == "BYTES":
        items = list(tensor.as_numpy().reshape(-1))
        return self._decode([_b64(x, i) if isinstance(x, str) else bytes(x) for i, x in enumerate(items)], size)
      if tensor.name == IMAGE_INPUT and tensor.datatype == "UINT8":
        return self._array(_uint8_tensor(tensor), size), None
      raise InvalidInput(f"input {tensor.name!r} of type {tensor.datatype}: expected '{IMAGE_INPUT}' UINT8 "
                         f"[N, {size}, {size}, 1] or '{BYTES_INPUT}' BYTES [N].")

    def _array(self, array, size) -> np.ndarray:
      try:
        a = np.asarray(array.tolist() if array.dtype == object else array)
      except ValueError as e:
        raise InvalidInput("the image tensor is ragged; every image must be the same shape.") from e
      if a.ndim == 3:
        a = a[..., None]
      if a.ndim != 4 or a.shape[1:] != (size, size, 1):
        raise InvalidInput(f"image tensor of shape {list(a.shape)}; expected [N, {size}, {size}, 1] uint8, resized "
                           "as in training (or send encoded images).")
      self._check_batch(a.shape[0])
      if not np.issubdtype(a.dtype, np.integer) or a.min(initial=0) < 0 or a.max(initial=0) > 255:
        raise InvalidInput("image values must be integers from 0 to 255.")
      return a.astype(np.uint8)

    async def predict(self, payload, headers=None, response_headers=None):
      served = self.served  # this request finishes on this version whatever a reload does meanwhile
      loop = asyncio.get_running_loop()  # decoding and scoring off the event loop: health checks still answer
      images, originals = await loop.run_in_executor(None, self._images, served, payload)
      try:
        p = await loop.run_in_executor(None, served.score, images)
      except CovidctError as e:
        raise InvalidInput(str(e)) from e
      warnings = await loop.run_in_executor(None, served.warnings, images, originals)
      labels = [served.labels[int(q >= served.threshold)] for q in p]
      if isinstance(payload, dict):
        return {"predictions": [{"probability": float(q), "label": l, "threshold": served.threshold,
                                 **({"warning": w} if w else {})} for q, l, w in zip(p, labels, warnings)],
                "model_version": str(served.version)}
      prob = InferOutput(PROBABILITY_OUTPUT, [len(p), 1], "FP32")
      prob.set_data_from_numpy(p.astype(np.float32).reshape(-1, 1), binary_data=False)
      lab = InferOutput(LABEL_OUTPUT, [len(p)], "BYTES")
      lab.set_data_from_numpy(np.array(labels, dtype=object), binary_data=False)
      warn = InferOutput(WARNING_OUTPUT, [len(p)], "BYTES")
      warn.set_data_from_numpy(np.array(warnings, dtype=object), binary_data=False)
      return InferResponse(model_name=MODEL_NAME, infer_outputs=[prob, lab, warn], response_id=payload.id or str(uuid.uuid4()),
                           model_version=str(served.version),
                           parameters={"threshold": repr(served.threshold)})  # KServe's gRPC: no doubles

  return CovidctModel


def _uint8_tensor(tensor) -> np.ndarray:
  """A v2 UINT8 tensor's values as sent, checked before anything casts them: a shape of dimensions >= 0, as many
  values as it needs, each an integer from 0 to 255 (a float such as 200.7 or -0.5 is refused, not cast)."""
  from kserve.errors import InvalidInput  # pylint: disable=import-outside-toplevel

  shape = list(tensor.shape or [])
  if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
    raise InvalidInput(f"tensor shape {shape}: every dimension must be an integer >= 0.")
  raw = getattr(tensor, "_raw_data", None)
  if raw is not None:  # gRPC raw contents: bytes, one per value
    values = np.frombuffer(raw, np.uint8)
  else:
    try:
      values = np.asarray(tensor.data).reshape(-1)
    except (ValueError, TypeError):
      raise InvalidInput("the image tensor's data is ragged; send a flat or evenly nested list of integers.") from None
    if values.dtype.kind not in "iu" or values.min(initial=0) < 0 or values.max(initial=0) > 255:
      raise InvalidInput("image values must be integers from 0 to 255.")
  if values.size != int(np.prod(shape)):
    raise InvalidInput(f"the image tensor holds {values.size} values; its shape {shape} needs {int(np.prod(shape))}.")
  return values.astype(np.uint8).reshape(shape)


def _b64(text, i: int) -> bytes:
  from kserve.errors import InvalidInput  # pylint: disable=import-outside-toplevel

  try:
    return base64.b64decode(text, validate=True)
  except (binascii.Error, TypeError, ValueError) as e:
    raise InvalidInput(f"image {i}: not valid base64.") from e


def _guards(app, model, max_body: int):
  """Middleware on KServe's FastAPI app: refuse an oversized body (413) before reading it and a version other than
  the served one (404); route the served version's paths (/v2/models/covidct/versions/N/...) to KServe's."""
  from fastapi.responses import JSONResponse  # pylint: disable=import-outside-toplevel

  @app.middleware("http")
  async def guard(request, call_next):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
      return JSONResponse({"error": f"request body of {int(length)} bytes is over this server's limit of "
                                    f"{max_body}."}, status_code=413)
    parts = request.url.path.strip("/").split("/")
    if len(parts) >= 5 and parts[0] == "v2" and parts[1] == "models" and parts[3] == "versions":
      served = model.served
      if parts[2] == MODEL_NAME and served is not None and parts[4] != str(served.version):
        return JSONResponse({"error": f"model {MODEL_NAME} version {parts[4]} is not served; version "
                                      f"{served.version} is."}, status_code=404)
      # The served version: KServe has no versioned routes (501), so answer on the unversioned one.
      path = "/" + "/".join(parts[:3] + parts[5:])
      request.scope["path"], request.scope["raw_path"] = path, path.encode()
    return await call_next(request)


REQUEST_TIMEOUT_S = 30.0  # a request's headers and body must arrive within this (slow senders are cut off)
HEADER_ALLOWANCE = 64 * 1024  # bytes of request line and headers counted on top of the body limit


def timed_http_protocol(max_body: int, request_timeout: float):
  """uvicorn's h11 protocol with two limits it lacks: each request (request line, headers and body) must arrive
  within `request_timeout` seconds of the connection opening or of the previous response, or the connection is
  closed (a slowloris holds nothing for long); and a body is cut off with 413 once more than `max_body` bytes of it
  have arrived, chunked or not (the Content-Length check in `_guards` answers the honest ones first)."""
  import h11  # pylint: disable=import-outside-toplevel
  from uvicorn.protocols.http.h11_impl import H11Protocol  # pylint: disable=import-outside-toplevel

  class TimedH11Protocol(H11Protocol):
    def connection_made(self, transport):
      super().connection_made(transport)
      self._arm()

    def _arm(self):
      self._received = 0
      old = getattr(self, "_deadline", None)
      if old is not None:
        old.cancel()
      self._deadline = self.loop.call_later(request_timeout, self._too_slow)

    def _too_slow(self):
      if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
        self._refuse(408, f"the request did not arrive within {request_timeout:g} s.")

    def _refuse(self, status: int, message: str):
      body = json.dumps({"error": message}).encode()
      reason = {408: b"Request Timeout", 413: b"Content Too Large"}[status]
      if self.cycle is None or not self.cycle.response_started:
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
      self.transport.close()

    def data_received(self, data: bytes) -> None:
      if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
        self._received += len(data)
        if self._received > max_body + HEADER_ALLOWANCE:
          self._refuse(413, f"request body over this server's limit of {max_body} bytes.")
          return
      super().data_received(data)

    def on_response_complete(self) -> None:
      super().on_response_complete()
      if not self.transport.is_closing():
        self._arm()

    def connection_lost(self, exc):
      if getattr(self, "_deadline", None) is not None:
        self._deadline.cancel()
      super().connection_lost(exc)

  return TimedH11Protocol


def check_port(host: str, port: int) -> None:
  """Refuses, in one line, a port out of range or one another process listens on (0: off or any, not checked)."""
  import errno  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel

  if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
    raise CovidctError(f"port {port!r} is not a TCP port (0-65535).")
  if port == 0:
    return
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind((host, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise CovidctError(f"port {port} on {host} is in use by another process; choose another (--http-port, "
                           "--grpc-port).") from None
      raise CovidctError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --host or port.") \
          from None


def serve(serving_dir, version: int | None = None, runtime: str | None = None, host: str = "127.0.0.1",
          http_port: int = DEFAULT_HTTP_PORT, grpc_port: int = DEFAULT_GRPC_PORT, max_batch: int = MAX_BATCH,
          max_body_bytes: int = MAX_BODY_BYTES, reload_seconds: float = 5.0, ready=None,
          request_timeout: float = REQUEST_TIMEOUT_S) -> None:
  """Serves a pushed version until interrupted.

  Args:
    serving_dir: the folder `covidct push` writes (serving/<N>/).
    version: serve this version; default the latest blessed, and newer blessed ones as they are pushed.
    runtime: onnxruntime, litert, tensorflow or openvino; default the copy `covidct bench` recommended.
    host: the address to bind (loopback by default; 0.0.0.0 exposes the server to the network).
    http_port, grpc_port: REST (v1 and v2) and gRPC (v2) ports; gRPC 0 turns gRPC off.
    max_batch: most images in one request.
    max_body_bytes: largest request body.
    reload_seconds: how often to look for a newer blessed version (0: never).
    request_timeout: seconds within which a REST request (headers and body) must arrive, or 408 and closed.
    ready: called with the served version once the model is loaded (tests, the push's infra validation).
  Raises:
    CovidctError: no such serving folder or version, or a bad option.
  """
  from covidct.extras import require  # pylint: disable=import-outside-toplevel

  require("serve")
  model_class = _kserve_model_class()
  from kserve.model_server import FASTAPI_APP_IMPORT_STRING, ModelServer, app  # pylint: disable=import-outside-toplevel
  from kserve.protocol.grpc.server import GRPCServer  # pylint: disable=import-outside-toplevel
  from kserve.protocol.rest.server import RESTServer  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(serving_dir)
  if not root.is_dir():
    raise CovidctError(f"{root}: no such serving folder; push a model first (covidct push EXPORT --serving {root}).")
  if version is not None and not (root / str(version)).is_dir():
    raise CovidctError(f"{root} has no version {version}; `covidct push --serving {root} --list` lists them.")
  if max_batch < 1 or max_body_bytes < 1 or reload_seconds < 0 or not request_timeout > 0:
    raise CovidctError("max batch, max body bytes and the request timeout must be positive, reload seconds zero or "
                       "more.")
  for port in (http_port, grpc_port):
    check_port(host, port)
  model = model_class(root, version, runtime, max_batch)
  model.load()

  class HostGRPCServer(GRPCServer):  # KServe's, listening on `host` rather than on every interface
    async def start(self, max_workers):
      from grpc import aio  # pylint: disable=import-outside-toplevel
      from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc  # pylint: disable=import-outside-toplevel
      from kserve.protocol.grpc.servicer import InferenceServicer  # pylint: disable=import-outside-toplevel
      from concurrent import futures  # pylint: disable=import-outside-toplevel

      import grpc  # pylint: disable=import-outside-toplevel
      from kserve.errors import InvalidInput  # pylint: disable=import-outside-toplevel

      class Servicer(InferenceServicer):  # KServe's answers UNKNOWN to a bad tensor and ignores the version asked
        async def ModelInfer(self, request, context):  # noqa: N802 (gRPC's name)
          served = model.served
          if request.model_version and served is not None and request.model_version != str(served.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {MODEL_NAME} version {request.model_version} "
                                                           f"is not served; version {served.version} is.")
          try:
            return await super().ModelInfer(request, context)
          except InvalidInput as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

      self._server = aio.server(futures.ThreadPoolExecutor(max_workers=max_workers))
      grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
          Servicer(self._data_plane, self._model_repository_extension), self._server)
      self._server.add_insecure_port(f"{host}:{self._port}")
      await self._server.start()
      await self._server.wait_for_termination()

  stopping = threading.Event()

  class HostModelServer(ModelServer):
    def stop(self, sig):  # KServe's stops gRPC; the REST server and the reloader are told here
      stopping.set()
      if self._rest_server is not None:
        self._rest_server._server.should_exit = True  # pylint: disable=protected-access
      super().stop(sig)

    def start(self, models):
      self._register_and_check_atleast_one_model_is_ready(models)
      _guards(app, model, max_body_bytes)
      self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                     self.http_port, grace_period=self.grace_period)
      self._rest_server.config.host = host
      self._rest_server.config.http = timed_http_protocol(max_body_bytes, request_timeout)
      self.servers.append(self._rest_server.start())
      if grpc_port:
        self._grpc_server = HostGRPCServer(grpc_port, self.dataplane, self.model_repository_extension, kwargs={},
                                           grace_period=self.grace_period)
        self.servers.append(self._grpc_server.start(self.max_threads))
      if reload_seconds:
        self.servers.append(_reloader(model, reload_seconds, stopping))
      if ready is not None:
        ready(model.served.version)
      self.setup_event_loop()
      self.register_signal_handler()
      asyncio.run(self._serve())

  logging.getLogger("kserve").setLevel(logging.WARNING)
  HostModelServer(http_port=http_port, grpc_port=grpc_port or DEFAULT_GRPC_PORT, enable_grpc=bool(grpc_port),
                  workers=1).start([model])


async def _reloader(model, seconds: float, stopping: threading.Event):
  log = logging.getLogger("covidct.serve")
  while True:
    waited = 0.0
    while waited < seconds:  # in small steps, so a stop is seen at once
      if stopping.is_set():
        return
      await asyncio.sleep(min(0.2, seconds - waited))
      waited += 0.2
    try:
      newer = await asyncio.get_running_loop().run_in_executor(None, model.reload_if_newer)
    except CovidctError as e:  # a damaged new version: keep serving the one loaded
      log.warning("not reloading: %s", e)
      continue
    if newer is not None:
      log.warning("now serving version %s", newer)


def wait_until_ready(url: str, timeout: float = 60.0, process=None) -> None:
  """Polls `url` (a readiness endpoint) until it answers 200; CovidctError on timeout or if `process` exits."""
  import urllib.error  # pylint: disable=import-outside-toplevel
  import urllib.request  # pylint: disable=import-outside-toplevel

  deadline = time.time() + timeout
  while time.time() < deadline:
    if process is not None and process.poll() is not None:
      raise CovidctError(f"the server exited with status {process.returncode} before it was ready.")
    try:
      with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (loopback)
        if r.status == 200:
          return
    except (urllib.error.URLError, OSError):
      pass
    time.sleep(0.2)
  raise CovidctError(f"the server did not become ready at {url} within {timeout:.0f} s.")


def die_with_parent() -> None:
  """Run in a child before it starts (Popen's preexec_fn): on Linux, the kernel sends it SIGTERM when its parent
  dies, however it dies (kill -9 included), so a killed `push` leaves no validation server listening."""
  import ctypes  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel

  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # not Linux: the parent's own cleanup is all there is
    pass


@contextlib.contextmanager
def serving_subprocess(serving_dir, version: int, log_path, timeout: float = 180.0, args=()):
  """`covidct serve SERVING_DIR --version N` in a subprocess on a free loopback port (REST only, no reloading),
  until the block ends; yields (base URL, process). CovidctError if it exits or is not ready within `timeout`."""
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with open(log_path, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "covidct.cli", "serve", str(serving_dir), "--version",
                             str(version), "--http-port", str(port), "--grpc-port", "0", "--reload-seconds", "0",
                             *args], stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
  url = f"http://127.0.0.1:{port}"
  try:
    try:
      wait_until_ready(f"{url}/v2/models/{MODEL_NAME}/ready", timeout=timeout, process=proc)
    except CovidctError as e:
      tail = [l for l in pathlib.Path(log_path).read_text(errors="replace").splitlines() if l.strip()][-1:]
      raise CovidctError(f"{e} ({tail[0][:200] if tail else 'no output'})") from None
    yield url, proc
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()


def infra_validate(candidate, export_dir, timeout: float = 180.0) -> dict:
  """TFX's InfraValidator for a push: serves the `candidate` version folder (what would become serving/<N>/) with
  `covidct serve` in a subprocess on a free loopback port, sends the export's test vectors as canary requests (OIP v2
  REST, uint8 tensors), and checks the answers against those recorded for the copy it serves.

  Returns:
    {'artifact', 'canaries', 'max_abs_diff', 'tolerance', 'seconds'}.
  Raises:
    CovidctError: the server did not start, did not answer, or answered differently.
  """
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  import urllib.error  # pylint: disable=import-outside-toplevel
  import urllib.request  # pylint: disable=import-outside-toplevel

  from covidct.vectors import load_vectors  # pylint: disable=import-outside-toplevel

  start = time.time()
  candidate, export_dir = pathlib.Path(candidate).resolve(), pathlib.Path(export_dir)
  artifact, _ = version_artifact(candidate, None)
  images, want, tolerance = load_vectors(export_dir / (artifact.name if artifact.is_file() else "saved_model"))
  if artifact.is_dir():
    tolerance = max(tolerance, 1e-5)
  stage = pathlib.Path(tempfile.mkdtemp(prefix="covidct-infra-"))
  (stage / "1").symlink_to(candidate, target_is_directory=True)
  try:
    with serving_subprocess(stage, 1, stage / "server.log", timeout=timeout) as (url, _):
      body = {"inputs": [{"name": IMAGE_INPUT, "datatype": "UINT8", "shape": list(images.shape),
                          "data": images.reshape(-1).tolist()}]}
      req = urllib.request.Request(f"{url}/v2/models/{MODEL_NAME}/infer", data=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
      try:
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 (loopback)
          answer = json.loads(r.read())
      except (urllib.error.URLError, OSError, ValueError) as e:
        raise CovidctError(f"the server did not answer the canary request ({e}).") from None
    got = np.asarray(next(o["data"] for o in answer["outputs"] if o["name"] == PROBABILITY_OUTPUT), np.float64)
    diff = float(np.max(np.abs(got.reshape(-1) - want))) if len(want) else 0.0
    if got.size != want.size or not diff <= tolerance:
      raise CovidctError(f"the served {artifact.name} answered the {len(want)} canary images {diff:.2e} away from "
                         f"their recorded answers (allowed {tolerance:.1e}).")
  except CovidctError as e:
    raise CovidctError(f"infra validation: {e}") from None
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return {"artifact": artifact.name if artifact.is_file() else "saved_model", "canaries": int(len(want)),
          "max_abs_diff": diff, "tolerance": tolerance, "seconds": round(time.time() - start, 1)}
