"""Pairs of SAEs in a sweep: the ``[match_saes]`` table (any step with ``sae`` and ``sae_b`` inputs).

    [match_saes]
    pairs = ["seed", "width", "layer"]   # what differs between the two SAEs of a pair

A pair is two SAE nodes of the sweep that differ in what ``pairs`` names and agree on everything
else (model, hook, every other training option) except the seed: when the sweep trains several
seeds, non-seed pairs also take different seeds, so that no pair shares its random initialisation
(``sae_pairs``):

    seed     the SAEs' `seed` option (needs a grid: [train_sae] seed = [0, 1])
    width    `d_sae`
    layer    the hook (same model); also adds one ``match_layers`` node per group: the layer x
             layer matrix of "fraction of latents with a mutual match at r >= threshold"
    model    the model (every hook of one model against every hook of the other, same options)
    NAME     any other option of the SAE-making step (k, arch, ...)

Each pair becomes one node that needs both SAE nodes and both stores; the step itself pairs the
rows (same store, equal token ids, or character offsets across tokenisers).
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Callable

PAIR_KINDS = {"seed": "seed", "width": "d_sae", "layer": "hook", "model": "model"}
SUMMARY_STEP = "match_layers"      # the layer x layer summary of the `layer` pairs


def pair_options() -> set[str]:
    """Option names `pairs` may name besides the PAIR_KINDS: those of the SAE-making steps."""
    from .spec import sae_steps, step_fields, wired_fields
    names: set[str] = set()
    for st in sae_steps():
        names |= set(step_fields(st)[0]) - wired_fields(st) - {"out", "overwrite", "progress"}
    return names


def check_pairs(value: Any) -> tuple[list[str], str | None]:
    """(kinds, error) of a ``pairs = ...`` value (a string or a list of strings)."""
    kinds = [value] if isinstance(value, str) else value
    valid = sorted(PAIR_KINDS) + sorted(pair_options() - set(PAIR_KINDS.values()))
    if value is None:
        return [], (f"missing: say what differs between the two SAEs of a pair, e.g. pairs = "
                    f"[\"seed\", \"width\", \"layer\"] (one or more of {', '.join(valid)})")
    if not (isinstance(kinds, list) and kinds and all(isinstance(k, str) for k in kinds)):
        return [], f"must be a string or a non-empty list of strings from {', '.join(valid)}, got {value!r}"
    allowed = set(PAIR_KINDS) | pair_options()
    bad = [k for k in kinds if k not in allowed]
    if bad:
        return [], f"unknown pair kind(s) {', '.join(map(repr, bad))}; choose from {', '.join(valid)}"
    if len(set(PAIR_KINDS.get(k, k) for k in kinds)) < len(kinds):
        return [], f"{kinds!r} names one kind twice (width is d_sae, layer is hook)"
    return list(kinds), None


def _opts(node) -> dict[str, Any]:
    return {k: v for k, v in node.labels.items() if k not in ("model", "hook")}


def _same(a: dict[str, Any], b: dict[str, Any], but: str | None) -> bool:
    keys = (set(a) | set(b)) - {but}
    return all(json.dumps(a.get(k), sort_keys=True) == json.dumps(b.get(k), sort_keys=True) for k in keys)


def sae_pairs(saes: list, kind: str, model_order: list[str]) -> list[tuple[Any, Any]]:
    """The (A, B) SAE nodes that differ in `kind` (A: the earlier model / hook / grid value).

    Seed pairs differ in the seed only. Other pairs differ in `kind` and, when the SAEs of the
    sweep have several seeds, ALSO in the seed (A's seed -> the next seed, cyclically): SAEs of one
    seed start from one random dictionary (``torch.randn(d_sae, d_in)``, so a wider SAE shares the
    narrow one's first rows), and a layer pair of one seed matches partly by its initialisation (two
    smollm2 SAEs on layers 6 and 9, one seed: 24% of the Hungarian pairs were the same index)."""
    key = PAIR_KINDS.get(kind, kind)
    seeds = sorted({json.dumps(s.labels.get("seed")) for s in saes})
    follow = {s: seeds[(i + 1) % len(seeds)] for i, s in enumerate(seeds)} if len(seeds) > 1 else None
    rank = {id(s): i for i, s in enumerate(saes)}
    out = []
    for a, b in itertools.combinations(saes, 2):
        if a.step != b.step:
            continue
        ma, mb, ha, hb = a.labels["model"], b.labels["model"], a.labels["hook"], b.labels["hook"]
        oa, ob = _opts(a), _opts(b)
        if key == "seed":
            ok = ma == mb and ha == hb and json.dumps(oa.get("seed")) != json.dumps(ob.get("seed")) \
                and _same(oa, ob, "seed")
        else:
            if key == "model":
                differ = ma != mb
            elif key == "hook":
                differ = ma == mb and ha != hb
            else:
                differ = ma == mb and ha == hb and json.dumps(oa.get(key)) != json.dumps(ob.get(key))
            oa2 = {k: v for k, v in oa.items() if k not in (key, "seed")}
            ob2 = {k: v for k, v in ob.items() if k not in (key, "seed")}
            ok = differ and _same(oa2, ob2, None)
            if ok:
                # A = the earlier model (sweep order) or the earlier SAE (hook / grid order)
                if key == "model" and model_order.index(ma) > model_order.index(mb):
                    a, b = b, a
                elif key != "model" and _order(a, key) > _order(b, key):
                    a, b = b, a
                sa, sb = json.dumps(a.labels.get("seed")), json.dumps(b.labels.get("seed"))
                ok = sa == sb if follow is None else follow[sa] == sb
        if ok:
            out.append((a, b))
    return sorted(out, key=lambda p: (rank[id(p[0])], rank[id(p[1])]))


def _order(node, key: str):
    """Where an SAE sits along `key`: its hook's layer, or its value of the option."""
    if key == "hook":
        from .dag import _layer_rank
        return _layer_rank(node.labels["hook"])
    v = node.labels.get(key)
    return (0, v) if isinstance(v, (int, float)) else (1, json.dumps(v))


def _vl(node) -> str:
    """The grid label of an SAE node (the last part of its key, '' without a grid)."""
    parts = node.key.split("/", 3)
    return parts[3] if len(parts) > 3 else ""


def _both(x: str, y: str) -> str:
    return x if x == y else f"{x}-vs-{y}"


def add_pair_nodes(b, e, saes: list, stores: dict[str, Any], model_order: list[str],
                   keep: Callable[[Any], bool], short: Callable[[str], str]) -> None:
    """Add the nodes of one ``[match_saes]`` entry (and its ``match_layers`` summaries) to the
    builder `b` (``dag._Builder``). `keep(sae_node)` applies the table's models / hooks selection."""
    from .spec import SweepError
    pool = [s for s in saes if keep(s)]
    for kind in e.pairs:
        pairs = sae_pairs(pool, kind, model_order)
        if not pairs:
            raise SweepError(f"{b.spec.source}: {e.where}.pairs: no two SAEs of the sweep differ only in "
                             f"{kind!r} ({len(pool)} SAEs selected); {_hint(kind)}")
        groups: dict[tuple[str, str], list] = {}
        for var in e.variants:
            vl = ",".join(f"{k}={var[k]}" for k in e.grid_keys)
            for sa, sb in pairs:
                ma, mb, ha, hb = sa.labels["model"], sb.labels["model"], sa.labels["hook"], sb.labels["hook"]
                parts = [e.step, _both(ma, mb), _both(ha, hb) if ha == hb else f"{short(ha)}-vs-{short(hb)}",
                         _both(_vl(sa), _vl(sb)), vl]
                key = "/".join(p for p in parts if p)
                node = b.add(key, e.step, {}, var,
                             {"sae": sa, "sae_b": sb, "store": stores[ma], "store_b": stores[mb]},
                             f"match-{_both(ma, mb)}-{_both(short(ha), short(hb))}-{_both(_vl(sa), _vl(sb))}-{vl}",
                             {"pair": kind, "model": ma, "model_b": mb, "hook": ha, "hook_b": hb,
                              "sae": sa.key, "sae_b": sb.key, **var})
                if kind == "layer":
                    groups.setdefault((f"{ma}/{_vl(sa)}", vl), []).append(node)
        for (where, vl), nodes in groups.items():
            m, _, svl = where.partition("/")
            key = "/".join(p for p in (SUMMARY_STEP, m, svl, vl) if p)
            b.add(key, SUMMARY_STEP, {}, {}, {"result": nodes}, f"match-layers-{m}-{svl}-{vl}",
                  {"model": m, "matches": [n.key for n in nodes]})


def _hint(kind: str) -> str:
    return {"seed": "give the SAE step a seed grid, e.g. [train_sae] seed = [0, 1]",
            "width": "give the SAE step a width grid, e.g. [train_sae] d_sae = [2304, 4608]",
            "layer": "train SAEs on two or more hooks of one model ([train_sae] hooks = [...])",
            "model": "add a second [[models]] whose SAEs use the same training options"}.get(
        kind, f"give the SAE step a grid over {kind!r}")
