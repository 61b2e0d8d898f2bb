"""The errors runbooks raise on purpose: each says what failed and what to fix.

`RunbookError` subclasses are permanent (bad config, missing backup, failed
verification): retrying cannot help, so `tasks.retries` never retries them.
"""


class RunbookError(Exception):
    """A failure with a message meant for the operator; never retried."""


class ConfigError(RunbookError):
    """The configuration is missing, malformed or names an unknown target."""


class BackupNotFound(RunbookError):
    """The requested backup does not exist in the store."""


class InvalidBackupId(RunbookError):
    """A backup id that is not one (path characters, wrong shape)."""


class IntegrityError(RunbookError):
    """A stored backup does not match its manifest (checksum, decompression, archive)."""


class VerificationError(RunbookError):
    """A restored database does not match what the backup promised."""


class DatabaseError(RunbookError):
    """A database could not be reached or a PostgreSQL tool failed."""


class StoreError(RunbookError):
    """A backup store failed for good (after retries) or is misconfigured."""


class ObjectNotFound(StoreError):
    """The store has no object under that key."""


class TransientStoreError(Exception):
    """A store call failed in a way that may pass on retry (5xx, throttling, refused)."""


class DatabaseUnavailable(Exception):
    """A database could not be reached for now (refused, timed out, shutting down)."""
