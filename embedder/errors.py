"""The base of errors a user can fix from the message alone (bad data, bad config).

The command line prints these without a traceback; anything else is a bug and keeps one.
"""


class UserError(Exception):
    """A problem the user fixes from the message alone (bad data, bad config, a missing
    file); the message says what and, where it can, how. Subclasses also derive from the
    built-in error that fits (ValueError, OSError, FileNotFoundError, RuntimeError), so
    callers that catch those still do."""
