"""Exceptions the engine raises for input a caller can fix.

The gateway maps these to HTTP statuses in one place; the CLI prints their message.
"""


class InvalidRequestError(ValueError):
    """A request (prompt or sampling parameters) that can never be served as given."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelConfigError(ValueError):
    """A model directory or engine configuration the engine cannot run."""


class AdapterNotFoundError(InvalidRequestError):
    """A request names an adapter the engine does not have."""
