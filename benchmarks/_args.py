"""Command-line options of a benchmark from its defaults, so each script states its sizes once."""

from __future__ import annotations

import argparse
from typing import Any


def parse(doc: str | None, **defaults: Any) -> argparse.Namespace:
    """`--some-name` for every keyword `some_name=default`; the option's type follows the default
    (a list takes one or more values, a tuple ``(default, [choices])`` restricts the choices)."""
    ap = argparse.ArgumentParser(description=doc)
    for name, default in defaults.items():
        flag, kw = "--" + name.replace("_", "-"), {}
        if isinstance(default, tuple):
            default, kw["choices"] = default
        if isinstance(default, list):
            kw.update(nargs="+", type=type(default[0]))
        elif isinstance(default, bool):
            kw["action"] = "store_false" if default else "store_true"
        elif default is not None:
            kw["type"] = type(default)
        ap.add_argument(flag, default=default, **kw)
    return ap.parse_args()
