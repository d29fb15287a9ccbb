"""One exception type for everything the store refuses, so callers (and the CLI) can report it in one line."""


class StoreError(Exception):
    """A store cannot be created, read or appended to as asked; the message names the fix."""
