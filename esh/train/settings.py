"""The trainers' settings: one vocabulary for both configs, older names accepted as aliases, and
unknown names refused with the close matches.

A config is a dataclass whose fields are declared with :func:`setting` (a default and a help
text, which ``esh train`` / ``esh lm train`` turn into their options). :func:`with_aliases`
lets the constructor, ``from_dict`` and attribute access take an older name for a field (the
LM config's ``use_amp`` for ``amp``, for example), so configs saved under the older names load.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

from esh.errors import InputError, is_whole


def setting(default: Any = None, help: str = "", *, factory=None, cli: bool = True) -> Any:
    """A config field with its help text (``cli=False``: not a command-line option)."""
    meta = {"help": help, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def unknown_names_error(unknown: Iterable[str], known: Iterable[str], what: str) -> InputError:
    """An InputError naming each unknown setting and the known ones closest to it."""
    known = sorted(known)
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    return InputError(f"unknown {what} setting {', '.join(parts)}")


def canonical(cls: type, values: Mapping[str, Any], what: str) -> dict:
    """``values`` with aliases replaced by their field names; an unknown name is an error that
    names the close matches; a field given twice (by its name and an alias) too."""
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        name = aliases.get(key, key)
        if name not in names:
            unknown.append(key)
            continue
        if name in out:
            raise InputError(f"{what} setting {name!r} given twice (also as {key!r})")
        out[name] = value
    if unknown:
        raise unknown_names_error(unknown, names | set(aliases), what)
    return out


def with_aliases(cls: type) -> type:
    """Let ``cls(...)`` take the names in ``cls.ALIASES`` (alias -> field), check unknown names,
    and read and write each alias as an attribute of the instance."""
    init = cls.__init__
    what = getattr(cls, "WHAT", cls.__name__)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **canonical(cls, kwargs, what))

    cls.__init__ = __init__
    for alias, name in cls.ALIASES.items():
        setattr(
            cls,
            alias,
            property(
                lambda self, _n=name: getattr(self, _n),
                lambda self, value, _n=name: setattr(self, _n, value),
                doc=f"The older name of ``{name}``.",
            ),
        )
    return cls


def config_from_dict(cls: type, values: Mapping[str, Any]):
    """``cls`` from a mapping (a saved config, ``config.json``); aliases accepted, unknown keys refused."""
    return cls(**canonical(cls, dict(values), getattr(cls, "WHAT", cls.__name__)))


# --- checks shared by both configs ------------------------------------------------------


def check_resume_overrides(saved: Any, overrides: Mapping[str, Any], fixed: Iterable[str]) -> None:
    """Refuse a setting in ``overrides`` that would make a resumed run differ from the ``saved``
    config (the ``fixed`` names: what the data order or the model depends on)."""
    for name in fixed:
        if name in overrides and overrides[name] != getattr(saved, name):
            raise InputError(
                f"--resume continues the saved run exactly: its {name} is {getattr(saved, name)!r}, not "
                f"{overrides[name]!r} (start a new run with another --out to change it)"
            )


def check_int(name: str, value: Any, low: int, *, optional: bool = False, what: str = "") -> None:
    if value is None and optional:
        return
    if not is_whole(value, low):
        expected = f"an integer >= {low}" + (" (or None)" if optional else "")
        raise InputError(f"{name} must be {expected}{what}; got {value!r}")


def check_float(
    name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False, optional: bool = False
) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")
        raise InputError(f"{name} must be a finite number {rng}; got {value!r}")


def check_steps_or_fraction(name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` is a length of a schedule: 0, a fraction of the run (0 < v < 1) or a whole number
    of optimizer steps (v >= 1)."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if ok and value >= 1 and float(value) != int(value):
        ok = False
    if not ok:
        raise InputError(
            f"{name} must be a fraction of the run's optimizer steps (0 <= v < 1) or a whole number of "
            f"steps (>= 1); got {value!r}"
        )


def steps_of(value: float, total_steps: int) -> int:
    """Optimizer steps of a schedule length given as steps or as a fraction of the run: a value
    >= 1 is that many steps, 0 <= v < 1 is ``round(v * total_steps)`` steps."""
    if value >= 1:
        return int(value)
    return int(round(value * total_steps))
