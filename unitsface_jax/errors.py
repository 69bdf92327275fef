"""The one distinction every command line makes about an exception: the user's mistake or not.

``UserError`` marks errors caused by the user's input (a config value, a data file, a path, a
weight file, a resume that does not match the checkpoint): the command lines
(``unitsface_jax.cli``) print its message in one line, without a traceback, and exit 2. Each
such error of the package derives from it and from the built-in type it always had
(``ValueError``, ``ImportError``, ...), so code that caught those still does. Everything else
that escapes a command is either a run stopped from outside (storage, numbers: exit 1, one
line) or a bug in the package, which keeps its traceback.
"""


class UserError(Exception):
  """The user's input is wrong; the message says which field, file or record, and what to do."""


class ConfigError(UserError, ValueError):
  """A config field holds a value the run cannot use."""
