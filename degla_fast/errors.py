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


def from_worker(err: DeglaError) -> DeglaError:
    """The user error a DataLoader worker raised, as itself: torch re-raises it in the main
    process with the worker's whole traceback as its message ("Caught DataError in DataLoader
    worker process 0. Original Traceback ..."); the original one-line message is its last line."""
    text = str(err)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return err
    last = text.rstrip().splitlines()[-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    for prefix in (name, f"{type(err).__name__}: "):
        if last.startswith(prefix):
            return type(err)(last[len(prefix):])
    return type(err)(last)


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception from a library, for a one-line error."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
