"""TFLite model metadata: what a lone .tflite means, inside the file, in the TFLite Metadata schema.

The standard layout (tensorflow/tflite-support, metadata_schema.fbs, file identifier "M001"): a `ModelMetadata`
flatbuffer stored as a buffer of the model and named by the model's `TFLITE_METADATA` metadata entry, and the
associated files (here labels.txt and covidct_meaning.json) appended to the .tflite as a zip archive, so that
`zipfile` (and the Task Library / MediaPipe) read them. LiteRT ignores both when it runs the model.

Why not the metadata writers of tflite-support or MediaPipe: tflite-support 0.4.4 declares protobuf < 4, which
cannot live beside TensorFlow 2.21, and with `--no-deps` its metadata module fails to import here
(`_pywrap_metadata_version` needs the system's libusb-1.0); MediaPipe 1.2.3's Python metadata module imports a
native `mediapipe.tasks.cc` extension its wheel no longer ships. So the few tables covidct needs are written here
with `flatbuffers` (a TensorFlow dependency) at the schema's field slots, and the model is edited with
ai_edge_litert's own `flatbuffer_utils`. tests/test_meaning.py reads the result back with tflite-support's generated
schema code where it is installed.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import zipfile

from covidct.errors import CovidctError

METADATA_NAME = "TFLITE_METADATA"  # the model metadata entry the TFLite Metadata readers look for
FILE_IDENTIFIER = b"M001"
MIN_PARSER_VERSION = "1.0.0"  # the fields written here are all in the schema's first version
LABELS_FILE = "labels.txt"
MEANING_FILE = "covidct_meaning.json"
GRAYSCALE = 2  # ColorSpaceType.GRAYSCALE
IMAGE_PROPERTIES = 2  # ContentProperties.ImageProperties
FEATURE_PROPERTIES = 1  # ContentProperties.FeatureProperties
TENSOR_AXIS_LABELS = 2  # AssociatedFileType.TENSOR_AXIS_LABELS
DESCRIPTIONS = 1  # AssociatedFileType.DESCRIPTIONS

# Field slots of the tables written (metadata_schema.fbs; each table's fields in declaration order).
MODEL_SLOTS = {"name": 0, "description": 1, "version": 2, "subgraph_metadata": 3, "author": 4, "license": 5,
               "associated_files": 6, "min_parser_version": 7}
SUBGRAPH_SLOTS = {"name": 0, "description": 1, "input_tensor_metadata": 2, "output_tensor_metadata": 3}
TENSOR_SLOTS = {"name": 0, "description": 1, "content": 3, "stats": 5, "associated_files": 6}
CONTENT_SLOTS = {"content_properties_type": 0, "content_properties": 1}
FILE_SLOTS = {"name": 0, "description": 1, "type": 2}
N_FIELDS = {"model": 8, "subgraph": 10, "tensor": 7, "content": 3, "image": 2, "stats": 2, "file": 5, "feature": 0}


def _build(meta: dict) -> bytes:
  """The ModelMetadata flatbuffer for `meta` (see `write`)."""
  import flatbuffers  # pylint: disable=import-outside-toplevel

  b = flatbuffers.Builder(1024)

  def strings(d, keys):
    return {k: b.CreateString(d[k]) for k in keys if d.get(k) is not None}

  def vector(offsets):
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
      b.PrependUOffsetTRelative(off)
    return b.EndVector()

  def floats(values):
    b.StartVector(4, len(values), 4)
    for v in reversed(values):
      b.PrependFloat32(float(v))
    return b.EndVector()

  def table(kind, slots, offsets, scalars=()):
    b.StartObject(N_FIELDS[kind])
    for name, off in offsets.items():
      b.PrependUOffsetTRelativeSlot(slots[name], off, 0)
    for slot, prepend, value in scalars:
      prepend(slot, value, 0)
    return b.EndObject()

  def files(entries):
    out = []
    for f in entries:
      s = strings(f, ("name", "description"))
      out.append(table("file", FILE_SLOTS, s, [(FILE_SLOTS["type"], b.PrependInt8Slot, f["type"])]))
    return vector(out)

  def tensor(t):
    offsets = strings(t, ("name", "description"))
    if t.get("image"):
      b.StartObject(N_FIELDS["image"])
      b.PrependInt8Slot(0, GRAYSCALE, 0)
      props, kind = b.EndObject(), IMAGE_PROPERTIES
    else:
      b.StartObject(N_FIELDS["feature"])
      props, kind = b.EndObject(), FEATURE_PROPERTIES
    offsets["content"] = table("content", CONTENT_SLOTS, {"content_properties": props},
                               [(CONTENT_SLOTS["content_properties_type"], b.PrependUint8Slot, kind)])
    if t.get("range"):
      mx, mn = floats([t["range"][1]]), floats([t["range"][0]])
      b.StartObject(N_FIELDS["stats"])
      b.PrependUOffsetTRelativeSlot(0, mx, 0)
      b.PrependUOffsetTRelativeSlot(1, mn, 0)
      offsets["stats"] = b.EndObject()
    if t.get("associated_files"):
      offsets["associated_files"] = files(t["associated_files"])
    return table("tensor", TENSOR_SLOTS, offsets)

  inputs = vector([tensor(t) for t in meta["inputs"]])
  outputs = vector([tensor(t) for t in meta["outputs"]])
  subgraph = table("subgraph", SUBGRAPH_SLOTS, {**strings(meta, ("name",)), "input_tensor_metadata": inputs,
                                                "output_tensor_metadata": outputs})
  offsets = strings(meta, ("name", "description", "version", "author", "license"))
  offsets["subgraph_metadata"] = vector([subgraph])
  offsets["associated_files"] = files(meta["associated_files"])
  offsets["min_parser_version"] = b.CreateString(MIN_PARSER_VERSION)
  b.Finish(table("model", MODEL_SLOTS, offsets), file_identifier=FILE_IDENTIFIER)
  return bytes(b.Output())


def write(path, meta: dict, files: dict[str, bytes]) -> None:
  """Writes metadata into the .tflite at `path`, in place (temp file, then rename).

  Args:
    path: the .tflite file.
    meta: name, description, version, author, license; inputs and outputs (lists of {name, description, image:
      bool, range: (min, max), associated_files}); associated_files (model level), each {name, description, type}.
    files: the associated files' contents by name (appended as a zip).
  Raises:
    CovidctError: the file is not a TFLite model, or already holds metadata.
  """
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=import-outside-toplevel
  from ai_edge_litert.tools import flatbuffer_utils  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  data = path.read_bytes()
  if data[4:8] != b"TFL3":
    raise CovidctError(f"{path} is not a TFLite model (no TFL3 identifier).")
  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
  if any(m.name in (METADATA_NAME, METADATA_NAME.encode()) for m in (model.metadata or [])):
    raise CovidctError(f"{path} already holds TFLite metadata.")
  buffer = schema.BufferT()
  buffer.data = list(_build(meta))
  model.buffers.append(buffer)
  entry = schema.MetadataT()
  entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
  model.metadata = (model.metadata or []) + [entry]
  out = io.BytesIO(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
  out.seek(0, os.SEEK_END)
  with zipfile.ZipFile(out, "a") as z:  # appended after the flatbuffer, as the metadata populator does
    for name, content in files.items():
      z.writestr(name, content)
  tmp = path.with_name(f".{path.name}.metadata-tmp")
  tmp.write_bytes(out.getvalue())
  os.replace(tmp, path)


def _table(buf: bytes, pos: int):
  import flatbuffers  # pylint: disable=import-outside-toplevel

  return flatbuffers.table.Table(bytearray(buf), pos)


def _string(t, slot):
  o = t.Offset(4 + 2 * slot)
  return t.String(o + t.Pos).decode() if o else None


def _tables(t, slot):
  o = t.Offset(4 + 2 * slot)
  if not o:
    return []
  start = t.Vector(o)
  return [_table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(t.VectorLen(o))]


def _int8(t, slot):
  import flatbuffers  # pylint: disable=import-outside-toplevel

  o = t.Offset(4 + 2 * slot)
  return t.Get(flatbuffers.number_types.Int8Flags, o + t.Pos) if o else 0


def _metadata_buffer(path) -> bytes | None:
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=import-outside-toplevel

  data = pathlib.Path(path).read_bytes()
  if data[4:8] != b"TFL3":
    return None
  model = schema.Model.GetRootAs(data, 0)
  for i in range(model.MetadataLength()):
    m = model.Metadata(i)
    if m.Name() in (METADATA_NAME.encode(), METADATA_NAME):
      return model.Buffers(m.Buffer()).DataAsNumpy().tobytes()
  return None


def read(path) -> dict | None:
  """The TFLite metadata of `path` as a dict (the fields `write` writes, and the associated files' names), or None
  when it has none."""
  buf = _metadata_buffer(path)
  if buf is None or buf[4:8] != FILE_IDENTIFIER:
    return None
  import flatbuffers  # pylint: disable=import-outside-toplevel

  root = _table(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, bytearray(buf), 0))

  def files(t, slot):
    return [{"name": _string(f, 0), "description": _string(f, 1), "type": _int8(f, 2)} for f in _tables(t, slot)]

  def tensor(t):
    o = t.Offset(4 + 2 * TENSOR_SLOTS["content"])
    kind = None
    if o:
      content = _table(t.Bytes, t.Indirect(o + t.Pos))
      kind = {IMAGE_PROPERTIES: "image", FEATURE_PROPERTIES: "feature"}.get(content.GetSlot(
          4 + 2 * CONTENT_SLOTS["content_properties_type"], 0, flatbuffers.number_types.Uint8Flags))
    return {"name": _string(t, 0), "description": _string(t, 1), "content": kind,
            "associated_files": files(t, TENSOR_SLOTS["associated_files"])}

  subgraphs = _tables(root, MODEL_SLOTS["subgraph_metadata"])
  out = {k: _string(root, slot) for k, slot in MODEL_SLOTS.items()
         if k not in ("subgraph_metadata", "associated_files")}
  out["associated_files"] = files(root, MODEL_SLOTS["associated_files"])
  out["inputs"] = [tensor(t) for s in subgraphs for t in _tables(s, SUBGRAPH_SLOTS["input_tensor_metadata"])]
  out["outputs"] = [tensor(t) for s in subgraphs for t in _tables(s, SUBGRAPH_SLOTS["output_tensor_metadata"])]
  return out


def associated_file(path, name: str) -> bytes | None:
  """An associated file's content from the zip appended to the .tflite, or None when the model has no metadata.
  CovidctError when it has metadata (a TFLITE_METADATA buffer) but its appended files cannot be read: a copy whose
  tail was cut must not be taken for one without a threshold, and label at 0.5 without a word."""
  try:
    with zipfile.ZipFile(path) as z:
      return z.read(name)
  except KeyError:  # metadata from another tool, without this file
    return None
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    try:  # metadata that names the file promised it (covidct's lists covidct_meaning.json and labels.txt)
      promised = name.encode() in (_metadata_buffer(path) or b"")
    except Exception:  # pylint: disable=broad-except  # not a readable model at all: its runner says why
      promised = False
    if promised:
      raise CovidctError(f"{path}: its TFLite metadata is there but its associated files cannot be read "
                         f"({type(e).__name__}): the file is truncated or damaged; copy it again from the export.") \
          from None
    return None


def read_meaning_dict(path) -> dict | None:
  """The .tflite's own covidct_meaning.json as written (string values), or None."""
  raw = associated_file(path, MEANING_FILE)
  if raw is None:
    return None
  try:
    meaning = json.loads(raw)
  except ValueError:
    return None
  return meaning if isinstance(meaning, dict) else None


def read_meaning(path) -> dict | None:
  """{'labels', 'threshold'} from the .tflite's own associated covidct_meaning.json, or None."""
  meaning = read_meaning_dict(path)
  if meaning is None:
    return None
  try:
    return {"labels": json.loads(meaning["labels"]), "threshold": float(meaning["operating_threshold"])}
  except (ValueError, KeyError, TypeError):
    return None
