"""Errors a user can cause.

Every family derives from :class:`DeglaError`; the command line prints the message as one
line and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class DeglaError(Exception):
    """Base class of user-facing errors (bad paths, formats, shapes or settings)."""


class ConfigError(DeglaError, ValueError):
    """A configuration field or command-line flag has a bad value."""


class DataError(DeglaError, ValueError):
    """A data file, record or image is missing or malformed."""


class ShapeError(DeglaError, ValueError):
    """Tensors given to a loss or kernel do not have the expected shapes, dtypes or devices."""


class NonFiniteError(DeglaError, FloatingPointError):
    """A loss input or value is NaN or infinite."""
