"""The one exception type users see: a bad input, named, with the fix."""


class UserError(ValueError):
    """Bad user input (file, setting, vocabulary, checkpoint).

    The message names the offending value and says how to fix it; the CLI prints it as one line
    and exits non-zero. Internal invariants use ``assert`` instead.
    """
