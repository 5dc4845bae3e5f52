"""Map a settings dataclass onto argparse flags whose defaults come from LORAGATE_*
environment variables, so every knob is settable both ways with one definition."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing


def _env_name(field: str) -> str:
    return "LORAGATE_" + field.upper()


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, help_texts: dict[str, str], skip: set[str] = frozenset()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        hint = hints[f.name]
        options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        base = options[0] if len(options) == 1 else str  # e.g. int | str sizes: parsed by the dataclass
        env = os.environ.get(_env_name(f.name))
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        text = f"{help_texts.get(f.name, '')} (env {_env_name(f.name)}; default: {default})"
        if base is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True,
                                default=_parse_bool(env) if env is not None else default, metavar="BOOL", help=text)
        else:
            conv = int if base is int else float if base is float else str
            # metadata "several": the flag takes several values (vLLM's --lora-modules a=/x b=/y),
            # which reach the field one per line
            parser.add_argument(flag, type=conv, nargs="+" if f.metadata.get("several") else None,
                                default=conv(env) if env is not None else default, help=text)


def dataclass_from_args(cls, args: argparse.Namespace, skip: set[str] = frozenset()):
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return cls(**{n: "\n".join(v) if isinstance(v, list) else v for n, v in values.items()})
