"""Errors a user can act on: each message says what happened and how to fix it."""


class CovidctError(ValueError):
  """Bad input or state that the user can fix (a missing dataset, a bad option, an existing folder)."""
