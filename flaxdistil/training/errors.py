"""The error a user can fix: a config or input problem, with a message that names the fix."""


class ConfigError(ValueError):
  """A config or input problem; the message says how to fix it.

  Attributes:
    exit_code: 2, the command lines' exit status for it.
  """

  exit_code = 2
