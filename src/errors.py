"""User-facing errors: bad input gets one clear line, never a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (paths, flags, checkpoints) rather than a bug."""


def cli_main(fn):
    """Decorate an entry point so that a :class:`UserError` prints ``error: <message>`` and exits 2."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapper
