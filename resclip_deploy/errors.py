"""The one exception type users see: a bad input, named, with the fix; and the two facts of
this host every command asks (an optional dependency present, CPUs to share)."""

import contextlib
import os
from typing import Iterator


class UserError(ValueError):
    """Bad user input (file, setting, vocabulary, checkpoint).

    The message names the offending value and says how to fix it; the CLI prints it as one line
    and exits non-zero. Internal invariants use ``assert`` instead.
    """


@contextlib.contextmanager
def needs_extra(needer: str, extra: str) -> Iterator[None]:
    """Imports of an optional dependency inside: a missing one becomes the one-line error
    "<needer> needs the [<extra>] extra (<module> is missing): pip install ..."."""
    try:
        yield
    except ImportError as e:
        what = "the torch side" if extra == "export" else f"the [{extra}] extra"
        raise UserError(f"{needer} needs {what} ({e.name} is missing): pip install "
                        f"'resclip-deploy[{extra}]'") from None


def cpus(share: int = 1) -> int:
    """This machine's CPUs divided among ``share`` workers (replicas, actors), at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, share))
