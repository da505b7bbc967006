"""Command-line options derived from a training config's fields: one option per field declared
with ``esh.train.settings.setting(cli=True)``, its help text from the field, its default shown
(the config's, or the command's own), the value left ``None`` when not given so that a resumed
run keeps its saved settings."""

from __future__ import annotations

import argparse
import dataclasses

_TYPES = {"int": int, "float": float, "str": str}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    defaults: dict | None = None,
    aliases: dict[str, list[str]] | None = None,
) -> list[str]:
    """Add an option per command-line field of ``cls``; returns the field names. ``defaults``
    are the command's own defaults (shown in the help), ``aliases`` extra flags for a field."""
    defaults = defaults or {}
    aliases = aliases or {}
    names = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False):
            continue
        default = defaults.get(f.name, f.default)
        if default is dataclasses.MISSING:
            default = None
        text = f.metadata.get("help", "")
        if default is not None:
            text += f" (default: {_show(default)})"
        elif "default" not in text and "when not given" not in text:
            text += " (default: none)"
        flags = [_option(f.name), *aliases.get(f.name, [])]
        kind = str(f.type).replace(" | None", "").strip()
        if kind == "bool":
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind.startswith("tuple["):
            inner = _TYPES[kind[len("tuple[") : -1].split(",")[0].strip()]
            n = kind.count(",") + 1
            parser.add_argument(*flags, dest=f.name, type=inner, nargs=n, help=text, metavar=f.name.upper()[:-1])
        else:
            parser.add_argument(*flags, dest=f.name, type=_TYPES[kind], help=text, metavar=f.name.upper())
        names.append(f.name)
    return names


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def given(args: argparse.Namespace, names: list[str]) -> dict:
    """The fields given on the command line (``0`` is a value, not "unset")."""
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
