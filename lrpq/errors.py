"""User-facing errors: the CLI prints these as one line and exits with status 2."""


class LrpqError(Exception):
    """A problem with the user's input (model, data, bits, files), not a bug in lrpq."""
