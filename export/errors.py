"""Typed export errors: each says what failed, against what, and what to do."""

from covidct.errors import CovidctError


class ExportError(CovidctError):
  """An artifact could not be written or is not what was asked for."""


class UnknownFormatError(ExportError):
  """A format name we do not export."""


class UnsupportedOpError(ExportError):
  """A TFLite model needs ops outside the builtin set (Flex / select TF ops)."""


class ParityError(ExportError):
  """An artifact does not give the SavedModel's answers: names, shapes, values or metrics differ."""

  def __init__(self, message: str, failures: list[str] | None = None):
    super().__init__(message)
    self.failures = failures or []
