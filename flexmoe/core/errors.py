"""The exception for a mistake in what someone gave flexmoe: a file, a path, an option, a spec.

The command line prints an :class:`InputError` (and an ``OSError``) as one line for the person
who made the mistake; any other exception is a bug in flexmoe and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: a corrupt or mismatched file, an option that does not fit, a missing
    prerequisite. The message says what was wrong, where, and what to do.

    A ``ValueError``, so code written to catch ``ValueError`` for bad input keeps working.
    """
