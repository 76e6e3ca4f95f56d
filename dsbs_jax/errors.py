"""Errors that reach the user as one clear message rather than a traceback."""


class ConfigError(ValueError):
  """A setting (gin binding, flag, path) that cannot work, named in the message."""


class DataError(ValueError):
  """Bad input data; the message names the file, line and field."""
