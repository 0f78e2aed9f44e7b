"""The base of errors a user can fix from the message alone (bad data, bad config).

The command line prints these without a traceback; anything else is a bug and keeps one.
"""


class UserError(Exception):
    pass
