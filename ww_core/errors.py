"""Exceptions raised by ``ww_core`` for inputs it cannot read."""


class SourceError(ValueError):
    """A model source that cannot be read: unknown format, corrupt or truncated file, refused pickle.

    The message is one line, meant to be shown to the user as it is.
    """
