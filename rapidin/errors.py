"""Errors shown to users as one line, never as a stack trace."""


class RapidInError(Exception):
    """A user-facing failure: the message names what went wrong and where."""


class DataError(RapidInError):
    """A data file or row is missing, unreadable or malformed."""


class ModelError(RapidInError):
    """A model, tokenizer or adapter cannot be loaded or does not fit."""


class CacheError(RapidInError):
    """A gradient cache is missing, corrupted, or was built with other settings."""


class StorageError(RapidInError):
    """Object storage is unreachable or refused the request."""
