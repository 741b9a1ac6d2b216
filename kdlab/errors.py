"""The one exception type user-facing entry points raise for bad input."""


class UserError(ValueError):
  """Bad input from a user: the message names the field and the fix.

  The CLI prints it as one line and exits non-zero; nothing has been written.
  """
