"""The exceptions of stage 1. Each message is one line a user can act on.

The CLI turns `UsageError` into exit status 2 and any other `ExtractError`
into exit status 1, printing only the message.
"""


class ExtractError(Exception):
    """Something stopped the run; the message says what and how to fix it."""


class UsageError(ExtractError, ValueError):
    """Bad input from the user: a missing folder, a bad option value, a wrong file."""


class WeightsUnavailableError(ExtractError):
    """The requested backbone weights cannot be obtained (e.g. offline)."""


class CacheError(ExtractError):
    """The feature cache cannot be read or written as asked."""


class CatalogDamagedError(CacheError):
    """The catalog itself is unreadable or fails its checks (`extract-features --repair`
    rebuilds it from the shards)."""


class CacheBusyError(CacheError):
    """Another process is writing the same cache."""
