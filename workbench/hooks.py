"""Hook names and patterns: the one resolver used by the model wrapper, the steps and sweeps.

A pattern is an exact name, a glob (``blocks.*.hook_resid_post``) or braces (``blocks.{6,15}.x``,
``blocks.{0..3}.x`` an inclusive range). Several patterns may be given in one string separated by
commas or spaces outside braces (``--hooks-a a,b`` on the command line).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from .errors import WorkbenchError, closest

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\s*(?:\.\.|-)\s*(\d+)")


def split_patterns(patterns: str | Iterable[str]) -> list[str]:
    """Patterns as a flat list: strings split on commas / whitespace that are not inside braces."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for p in patterns:
        cur, depth = [], 0
        for ch in str(p):
            depth += (ch == "{") - (ch == "}" and depth > 0)
            if depth == 0 and (ch == "," or ch.isspace()):
                out.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        out.append("".join(cur))
    return [x for x in out if x]


def expand_braces(pattern: str) -> list[str]:
    """'blocks.{6,15}.x' -> ['blocks.6.x', 'blocks.15.x']; '{0..3}' is a range (inclusive)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    alts: list[str] = []
    for part in m.group(1).split(","):
        part = part.strip()
        r = _RANGE.fullmatch(part)
        alts += [str(i) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r else [part]
    return [x for a in alts for x in expand_braces(pattern[:m.start()] + a + pattern[m.end():])]


def expand_patterns(patterns: str | Iterable[str]) -> list[str]:
    """Split, then brace-expand: the exact names and globs the patterns stand for."""
    return [q for p in split_patterns(patterns) for q in expand_braces(p.strip())]


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def select_hooks(names: Iterable[str], patterns: str | Iterable[str], *, strict: bool = True,
                 keep_order: bool = False, where: str = "") -> list[str]:
    """The names matched by the patterns, without repeats: in pattern order (globs: in `names`
    order), or in `names` order with keep_order. strict: a pattern matching nothing is a
    WorkbenchError naming the closest hooks (`where` says whose hooks these are)."""
    names = list(names)
    picked: list[str] = []
    for pat in expand_patterns(patterns):
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)] if is_glob(pat) \
            else ([pat] if pat in names else [])
        if not hits and strict:
            raise WorkbenchError(f"no hook {pat!r}{' in ' + where if where else ''}; "
                                 f"closest: {closest(pat, names)}")
        picked += [h for h in hits if h not in picked]
    if keep_order:
        chosen = set(picked)
        return [n for n in names if n in chosen]
    return picked


def pick_hook(store, hook: str, hint: str | None = None) -> str:
    """The one hook of `store` a per-hook step reads: `hook` when given (it must be in the store),
    else `hint` (e.g. an SAE's hook_name) when the store has it, else the store's only hook."""
    hooks = list(store.hooks)
    if hook:
        if hook not in hooks:
            raise WorkbenchError(f"hook {hook!r} is not in store {store.path}; closest: "
                                 f"{closest(hook, hooks)}")
        return hook
    if hint and hint in hooks:
        return hint
    if len(hooks) == 1:
        return hooks[0]
    raise WorkbenchError(f"store {store.path} has several hooks ({len(hooks)}); choose one with --hook "
                         f"({', '.join(hooks[:8])}{' ...' if len(hooks) > 8 else ''})")
