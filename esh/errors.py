"""esh's error types. Every error that reports bad input or a missing resource derives from
:class:`EshError`; the ``esh`` command prints those as one line and exits 2, and shows a full
traceback for anything else (a bug), or for everything with ``--debug`` / ``ESH_DEBUG=1``."""

from __future__ import annotations


class EshError(Exception):
    """Base of the errors esh raises on purpose: bad input, a missing file or package, a
    resource that is not there. Anything else escaping esh is a bug."""


class InputError(EshError, ValueError):
    """An argument, a file or a setting that is not what esh expects; the message says what is."""


class MissingDependencyError(EshError, ImportError):
    """An optional package that a feature needs is not installed; the message names the install."""


def is_whole(value: object, low: int) -> bool:
    """``value`` is an ``int`` (a ``bool`` is not) of at least ``low``: the check behind every
    "must be an integer >= N" error."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def require(module: str, extra: str, feature: str):
    """Import an optional package, or raise :class:`MissingDependencyError` naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{feature} needs the {module.split('.')[0]!r} package: pip install 'esh[{extra}]' ({e})"
        ) from e
