"""The project's errors, in a module of their own so that every layer can raise them
without importing another layer. `str(err)` is one line meant for the user."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config (or a location, a checkpoint, a command line) that cannot run."""


class StorageError(ConfigError):
    """A location that cannot be used: one line naming the URI and the cause."""


class StoreError(RuntimeError):
    """A problem with a file in the preference store; the message names the file."""
