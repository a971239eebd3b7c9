"""Reading and validating a sweep file (schema: see the package docstring).

Everything here is checked before any work starts and without loading a model: unknown tables and
keys, wrong types, unknown step options (``workbench.steps.make_config``), values outside a
field's ``choices`` metadata. Errors name the file, line (when it can be found) and table.key.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError

try:
    import tomllib
except ImportError:          # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SWEEP_KEYS = {"name", "workspace", "executor", "ray_address", "imports", "resources", "description"}
MODEL_KEYS = {"spec", "name", "hooks"}
EXECUTORS = ("local", "ray")
SELECT_KEYS = {"models", "hooks"}
PAIR_KEYS = {"within", "across"}
SAE_PAIR_KEYS = {"pairs"}
# The part a step plays in a sweep, from its fields' declared roles (workbench.steps.ROLES) and
# what it produces (see part_of), and the field roles the sweep fills in for each part: a user may
# not set those, whatever the fields are named.
WIRED = {
    "source": {"model", "hooks", "out"},
    "per_hook": {"store", "hook", "out"},
    "per_model": {"store", "hooks", "out"},
    "per_sae": {"sae", "store", "hook", "out"},
    "pair": {"store", "store_b", "hooks", "hooks_b", "out"},
    "sae_pair": {"sae", "sae_b", "store", "store_b", "out"},
}
_WIRED_HINT = {"hook": "select hooks with hooks = [...]", "hooks": "hooks are set per model in [[models]]",
               "model": "models are set in [[models]]"}


class SweepError(WorkbenchError):
    """A sweep file that cannot be run; the message lists every problem found."""


@dataclass
class ModelEntry:
    name: str
    spec: str
    hooks: list[str]
    collect: dict[str, Any]        # collect options for this model (corpus + [collect] + own keys)
    where: str                     # "[models] #i" for messages


@dataclass
class StepEntry:
    step: str
    role: str
    variants: list[dict[str, Any]]  # grid-expanded option dicts
    grid_keys: list[str]            # the options that vary (for labels)
    models: list[str] | None
    hooks: list[str] | None
    within: bool | list[str] = True
    across: list[tuple[str, str]] = field(default_factory=list)
    where: str = ""
    pairs: list[str] = field(default_factory=list)   # sae_pair: what differs (see sweep.pairs)


@dataclass
class SweepSpec:
    name: str
    workspace: str
    executor: str
    ray_address: str | None
    imports: list[str]
    resources: dict[str, dict[str, float]]
    models: list[ModelEntry]
    steps: list[StepEntry]
    source: str                     # file path or "<dict>"
    raw: dict[str, Any]


# --------------------------------------------------------------------------- locating lines
class _Locator:
    """Find the line of `[table]` / `key = ` in the TOML text, for messages."""

    _HDR = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, text: str | None, source: str):
        self.lines = text.splitlines() if text else []
        self.source = source

    def line(self, table: str, key: str | None = None, index: int | None = None) -> int | None:
        if not self.lines:
            return None
        seen, inside, hdr_line = -1, False, None
        for no, ln in enumerate(self.lines, 1):
            m = self._HDR.match(ln)
            if m:
                name = m.group(2).replace('"', "").replace("'", "").strip()
                if name == table:
                    seen += 1
                    inside = index is None or seen == index
                    if inside:
                        hdr_line = no
                        if key is None:
                            return no
                else:
                    inside = False
                continue
            if inside and key is not None and re.match(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=", ln):
                return no
        return hdr_line

    def at(self, table: str, key: str | None = None, index: int | None = None) -> str:
        no = self.line(table, key, index)
        return f"{self.source}:{no}: " if no else f"{self.source}: "


def _didyoumean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _label(table: str, key: str | None = None, index: int | None = None) -> str:
    t = f"[{table}]" if index is None else f"[[{table}]] #{index + 1}"
    return t + (f".{key}" if key else "")


# --------------------------------------------------------------------------- types
def _unwrap(tp):
    from ..steps import unwrap_type
    base, is_list, _ = unwrap_type(tp)
    return base, is_list


def _scalar_ok(v: Any, base) -> bool:
    if base is Any or base is None:
        return True
    if base is bool:
        return isinstance(v, bool)
    if base is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if base is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if base is str:
        return isinstance(v, str)
    if isinstance(base, type):
        return isinstance(v, base)
    return True


def _tname(base) -> str:
    return getattr(base, "__name__", str(base))


def step_fields(step: str) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    from ..steps import STEPS
    cls = STEPS[step].config_cls
    return {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)


def field_roles(step: str) -> dict[str, str]:
    """field name -> declared role, for the fields of `step` that have one."""
    from ..steps import STEPS, role_of
    return {f.name: r for f in dataclasses.fields(STEPS[step].config_cls) if (r := role_of(f))}


def field_for(step: str, role: str) -> str | None:
    from ..steps import STEPS, field_for as _ff
    return _ff(STEPS[step].config_cls, role)


def part_of(step: str) -> str | None:
    """source (makes a store from a model), sae_pair, per_sae, pair, per_hook, per_model, or None
    (no input the sweep can wire, so it has no place in a sweep)."""
    from ..steps import STEPS
    roles = set(field_roles(step).values())
    if STEPS[step].produces == "store" and "model" in roles:
        return "source"
    if "sae_b" in roles and "sae" in roles:      # pairs of SAEs (match_saes): sweep.pairs
        return "sae_pair"
    if "sae" in roles:
        return "per_sae"
    if "store_b" in roles:
        return "pair"
    if "store" in roles:
        return "per_hook" if "hook" in roles else "per_model"
    return None


def wired_fields(step: str) -> set[str]:
    """Names of the fields of `step` the sweep fills in (by role)."""
    wired = WIRED.get(part_of(step), set())
    return {name for name, r in field_roles(step).items() if r in wired}


def source_step() -> str:
    """The step that turns (model, hooks, corpus) into a store: its table is [collect] etc."""
    from ..steps import STEPS
    names = [n for n in STEPS if part_of(n) == "source"]
    if not names:
        raise SweepError("no registered step makes a store from a model (the collect step)")
    return names[0]


def sae_steps() -> list[str]:
    """Per-hook steps whose output is an SAE (what steps with an `sae` input consume)."""
    from ..steps import STEPS
    return [n for n, st in STEPS.items() if st.produces == "sae" and part_of(n) == "per_hook"]


def _placeholder(base, is_list):
    v = {str: "sweep-placeholder", int: 1, float: 1.0, bool: False}.get(base, "sweep-placeholder")
    return [v] if is_list else v


# --------------------------------------------------------------------------- loading
def load(config: str | Path | dict[str, Any]) -> SweepSpec:
    """Parse and validate a sweep (file path or dict). Raises SweepError listing every problem."""
    if isinstance(config, dict):
        raw, text, source, stem = config, None, "<sweep dict>", "sweep"
    else:
        path = Path(config)
        if not path.is_file():
            raise SweepError(f"sweep file {path} not found")
        text = path.read_text()
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SweepError(f"{path}: not valid TOML: {e}") from None
        source, stem = str(path), path.stem
    return _Validator(raw, _Locator(text, source), stem).run()


class _Validator:
    def __init__(self, raw: dict, loc: _Locator, stem: str):
        self.raw, self.loc, self.stem = raw, loc, stem
        self.errors: list[str] = []

    def err(self, msg: str, table: str, key: str | None = None, index: int | None = None):
        self.errors.append(f"{self.loc.at(table, key, index)}{_label(table, key, index)}: {msg}")

    def run(self) -> SweepSpec:
        from .. import steps as steps_mod   # registers the built-in steps
        sw, name, executor, imports, resources = self._sweep_table(steps_mod.STEPS)
        src = source_step()
        shared = self._shared_options(src)
        models, names = self._models(src, shared)
        entries = self._step_tables(src, names, steps_mod.STEPS)
        self._check_sae_makers(entries)
        if self.errors:
            n = len(self.errors)
            raise SweepError(f"sweep has {n} problem{'s' * (n > 1)}:\n  " + "\n  ".join(self.errors))
        return SweepSpec(name=name, workspace=sw.get("workspace", "ws"), executor=executor,
                         ray_address=sw.get("ray_address") or None, imports=imports,
                         resources=resources, models=models, steps=entries,
                         source=self.loc.source, raw=self.raw)

    # ------------------------------------------------------------------ tables
    def _sweep_table(self, step_names):
        """[sweep]: keys, imports (imported now: they may register steps), name, executor, resources.
        Returns (table, name, executor, imports, resources)."""
        sw = self.raw.get("sweep", {})
        if not isinstance(sw, dict):
            self.err("must be a table", "sweep")
            sw = {}
        for k in sorted(set(sw) - SWEEP_KEYS):
            self.err(f"unknown key{_didyoumean(k, SWEEP_KEYS)}; valid keys: {', '.join(sorted(SWEEP_KEYS))}",
                     "sweep", k)
        imports = sw.get("imports", [])
        if not (isinstance(imports, list) and all(isinstance(m, str) for m in imports)):
            self.err("must be a list of module names", "sweep", "imports")
            imports = []
        for mod in imports:
            try:
                __import__(mod)
            except Exception as e:   # noqa: BLE001 - reported as a sweep error
                self.err(f"cannot import {mod!r}: {type(e).__name__}: {e}", "sweep", "imports")
        name = sw.get("name", self.stem)
        for key, val in (("name", name), ("workspace", sw.get("workspace", "ws")),
                         ("ray_address", sw.get("ray_address", ""))):
            if not isinstance(val, str):
                self.err(f"must be a string, got {val!r}", "sweep", key)
        if isinstance(name, str) and not name.strip():
            self.err("must not be empty", "sweep", "name")
        executor = sw.get("executor", "local")
        if executor not in EXECUTORS:
            self.err(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}", "sweep", "executor")
        resources = sw.get("resources", {})
        if not isinstance(resources, dict):
            self.err("must be a table of step = {num_cpus = N, num_gpus = N}", "sweep", "resources")
            resources = {}
        for st, res in resources.items():
            if st not in step_names:
                self.err(f"unknown step {st!r}{_didyoumean(st, step_names)}; steps: "
                         f"{', '.join(step_names)}", "sweep", "resources")
            elif not (isinstance(res, dict) and set(res) <= {"num_cpus", "num_gpus"}
                      and all(_scalar_ok(v, float) and v >= 0 for v in res.values())):
                self.err(f"{st}: expected {{num_cpus = N, num_gpus = N}}, got {res!r}", "sweep", "resources")
        return sw, name, executor, imports, resources

    def _shared_options(self, src: str) -> dict[str, Any]:
        """Collect options shared by every model: [corpus] then [collect]."""
        cfields, chints = step_fields(src)
        shared: dict[str, Any] = {}
        corpus = self.raw.get("corpus", {})
        if not isinstance(corpus, dict):
            self.err("must be a table", "corpus")
            corpus = {}
        for k, v in corpus.items():
            fk = "corpus" if k == "spec" else k
            if self._check_option(src, cfields, chints, fk, v, "corpus", k, grid=False):
                shared[fk] = v
        col = self.raw.get(src, {})
        if not isinstance(col, dict):
            self.err("must be a table (one set of collect options for every model)", src)
            col = {}
        for k, v in col.items():
            if self._check_option(src, cfields, chints, k, v, src, k, grid=False):
                shared[k] = v
        return shared

    def _models(self, src: str, shared: dict[str, Any]) -> tuple[list[ModelEntry], set[str]]:
        """[[models]]: one entry per model (its collect options = shared + its own); and their names."""
        cfields, chints = step_fields(src)
        models: list[ModelEntry] = []
        mlist = self.raw.get("models")
        if mlist is None:
            self.errors.append(f"{self.loc.source}: no [[models]] table; add at least one "
                               "([[models]] spec = \"smollm2-135m\" hooks = [...])")
            mlist = []
        elif isinstance(mlist, dict):
            mlist = [mlist]
        elif not isinstance(mlist, list):
            self.err("must be an array of tables ([[models]])", "models")
            mlist = []
        names: set[str] = set()
        for i, m in enumerate(mlist):
            if not isinstance(m, dict):
                self.err("must be a table", "models", index=i)
                continue
            spec = m.get("spec")
            if not isinstance(spec, str) or not spec:
                self.err("missing or not a string (a model spec, see `workbench models`)", "models", "spec", i)
                continue
            mname = m.get("name", _slug(spec))
            if not isinstance(mname, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", mname):
                self.err(f"must be a short name of letters, digits, '_', '-', '.', got {mname!r}",
                         "models", "name", i)
                continue
            if mname in names:
                self.err(f"duplicate model name {mname!r}; give each [[models]] a distinct name",
                         "models", "name", i)
            names.add(mname)
            hooks = m.get("hooks")
            if isinstance(hooks, str):
                hooks = [hooks]
            if not (isinstance(hooks, list) and hooks and all(isinstance(h, str) and h for h in hooks)):
                self.err("must be a non-empty list of hook names or patterns", "models", "hooks", i)
                hooks = []
            own = dict(shared)
            for k, v in m.items():
                if k in MODEL_KEYS:
                    continue
                if self._check_option(src, cfields, chints, k, v, "models", k, grid=False, index=i,
                                      extra_valid=MODEL_KEYS):
                    own[k] = v
            models.append(ModelEntry(mname, spec, hooks, own, _label("models", index=i)))
        if models and "corpus" not in shared and cfields.get("corpus") is not None \
                and cfields["corpus"].default is dataclasses.MISSING \
                and cfields["corpus"].default_factory is dataclasses.MISSING:
            self.errors.append(f"{self.loc.source}: [corpus].spec is required (e.g. spec = \"builtin\")")
        if models:
            self._precheck(src, "source", [{**models[0].collect}], src, None)
        return models, names

    def _step_tables(self, src: str, names: set[str], step_names) -> list[StepEntry]:
        """Every other table: a step (one table, or an array of them) run over the models' stores."""
        entries: list[StepEntry] = []
        for table, body in self.raw.items():
            if table in ("sweep", "models", "corpus", src):
                continue
            if table not in step_names:
                valid = ["sweep", "models", "corpus", *step_names]
                self.err(f"unknown table{_didyoumean(table, valid)}; valid tables: {', '.join(valid)}", table)
                continue
            role = part_of(table)
            if role is None or role == "source":
                self.err(_refusal(table, role), table)
                continue
            bodies = body if isinstance(body, list) else [body]
            for j, b in enumerate(bodies):
                idx = j if isinstance(body, list) else None
                if not isinstance(b, dict):
                    self.err("must be a table", table, index=idx)
                    continue
                e = self._step_entry(table, role, b, idx, names)
                if e is not None:
                    entries.append(e)
        return entries

    def _check_sae_makers(self, entries: list[StepEntry]) -> None:
        """Dependants of SAEs need an SAE producer in the sweep."""
        makers = sae_steps()
        needs_saes = ("per_sae", "sae_pair")
        if any(e.role in needs_saes for e in entries) and not any(e.step in makers for e in entries):
            for e in entries:
                if e.role in needs_saes:
                    self.err(f"needs SAEs, but the sweep trains none (add a [{makers[0] if makers else 'train_sae'}] "
                             "table)", e.step)

    # ------------------------------------------------------------------ helpers
    def _check_option(self, step, fields, hints, fk, v, table, key, *, grid: bool,
                      index=None, extra_valid=()) -> bool:
        """Type/choices check of one option value (a list is a grid axis when grid=True)."""
        wired = wired_fields(step)
        if fk not in fields:
            valid = sorted(set(fields) - wired | set(extra_valid))
            self.err(f"{step!r} has no option {fk!r}{_didyoumean(fk, valid)}; "
                     f"valid: {', '.join(valid)}", table, key, index)
            return False
        if fk in wired:
            hint = _WIRED_HINT.get(field_roles(step).get(fk), "")
            self.err(f"is set by the sweep (it wires steps together){'; ' + hint if hint else ''}",
                     table, key, index)
            return False
        base, is_list = _unwrap(hints[fk])
        values = [v]
        if grid and isinstance(v, list) and (not is_list or (v and all(isinstance(x, list) for x in v))):
            values = v
            if not v:
                self.err("empty list (a grid axis needs at least one value)", table, key, index)
                return False
        ok = True
        choices = (fields[fk].metadata or {}).get("choices")
        for x in values:
            if is_list:
                if not (isinstance(x, list) and all(_scalar_ok(y, base) for y in x)):
                    self.err(f"expected a list of {_tname(base)}, got {x!r}", table, key, index)
                    ok = False
                    continue
                items = x
            else:
                if not _scalar_ok(x, base):
                    self.err(f"expected {_tname(base)}{' (or a list of them: a grid)' if grid else ''}, "
                             f"got {x!r}", table, key, index)
                    ok = False
                    continue
                items = [x]
            if choices:
                for y in items:
                    if y not in choices:
                        self.err(f"unknown value {y!r}; choose from {', '.join(map(str, choices))}",
                                 table, key, index)
                        ok = False
        return ok

    def _step_entry(self, step, role, body, idx, model_names) -> StepEntry | None:
        fields, hints = step_fields(step)
        n0 = len(self.errors)
        sel_models, sel_hooks = self._selection(step, body, idx, model_names)
        within: bool | list[str] = True
        across: list[tuple[str, str]] = []
        if role == "pair":
            within, across = self._pair_keys(step, body, idx, model_names, sel_models)
        pairs: list[str] = []
        if role == "sae_pair":
            from .pairs import check_pairs
            pairs, why = check_pairs(body.get("pairs"))
            if why:
                self.err(why, step, "pairs", idx)
        special = set(SELECT_KEYS) | (PAIR_KEYS if role == "pair" else set()) \
            | (SAE_PAIR_KEYS if role == "sae_pair" else set())
        axes, fixed = self._grid(step, fields, hints, body, special, idx)
        variants = [dict(fixed, **dict(zip([a for a, _ in axes], combo)))
                    for combo in itertools.product(*[vals for _, vals in axes])]
        grid_keys = [a for a, vals in axes if len(vals) > 1]
        if len(self.errors) > n0:
            return None
        self._precheck(step, role, variants, step, idx)
        return StepEntry(step, role, variants, grid_keys, sel_models, sel_hooks, within, across,
                         _label(step, index=idx), pairs)

    def _selection(self, step, body, idx, model_names):
        """`models` / `hooks` keys of a step table: which stores it runs on (None: all)."""
        sel_models = body.get("models")
        if sel_models is not None:
            if isinstance(sel_models, str):
                sel_models = [sel_models]
            if not (isinstance(sel_models, list) and all(isinstance(m, str) for m in sel_models)):
                self.err("must be a list of model names", step, "models", idx)
                sel_models = None
            else:
                for m in sel_models:
                    if m not in model_names:
                        self.err(f"no model named {m!r}; models: {', '.join(sorted(model_names))}",
                                 step, "models", idx)
        sel_hooks = body.get("hooks")
        if sel_hooks is not None:
            if isinstance(sel_hooks, str):
                sel_hooks = [sel_hooks]
            if not (isinstance(sel_hooks, list) and all(isinstance(h, str) for h in sel_hooks)):
                self.err("must be a list of hook names or patterns", step, "hooks", idx)
                sel_hooks = None
        return sel_models, sel_hooks

    def _pair_keys(self, step, body, idx, model_names, sel_models):
        """`within` / `across` keys of a pair step. Returns (within, across pairs)."""
        within = body.get("within", True)
        across: list[tuple[str, str]] = []
        if isinstance(within, list):
            for m in within:
                if m not in model_names:
                    self.err(f"no model named {m!r}; models: {', '.join(sorted(model_names))}",
                             step, "within", idx)
        elif not isinstance(within, bool):
            self.err("must be true, false or a list of model names", step, "within", idx)
        a = body.get("across", [])
        if a == "all":
            pool = sel_models or sorted(model_names)
            across = list(itertools.combinations(pool, 2))
        elif isinstance(a, list) and all(isinstance(p, list) and len(p) == 2 for p in a):
            for p in a:
                for m in p:
                    if m not in model_names:
                        self.err(f"no model named {m!r}; models: {', '.join(sorted(model_names))}",
                                 step, "across", idx)
                if p[0] == p[1]:
                    self.err(f"pair {p!r} compares a model with itself; use within", step, "across", idx)
            across = [tuple(p) for p in a]
        else:
            self.err('must be "all" or a list of [model_a, model_b] pairs', step, "across", idx)
        return within, across

    def _grid(self, step, fields, hints, body, special, idx):
        """Step options: a list is a grid axis (`seeds = [...]` is an axis of `seed`).
        Returns (axes [(option, values)], fixed {option: value})."""
        axes: list[tuple[str, list[Any]]] = []
        fixed: dict[str, Any] = {}
        for k, v in body.items():
            if k in special:
                continue
            fk = k
            if k not in fields and k.endswith("s") and k[:-1] in fields:
                fk = k[:-1]
                if not isinstance(v, list):
                    v = [v]
                _, is_list = _unwrap(hints[fk])
                if is_list:
                    v = [x if isinstance(x, list) else [x] for x in v]
            if not self._check_option(step, fields, hints, fk, v, step, k, grid=True, index=idx,
                                      extra_valid=special):
                continue
            _, is_list = _unwrap(hints[fk])
            if fk in fixed or fk in dict(axes):
                self.err(f"option {fk!r} given twice", step, k, idx)
                continue
            if isinstance(v, list) and (not is_list or (v and all(isinstance(x, list) for x in v))):
                axes.append((fk, v))
            else:
                fixed[fk] = v
        return axes, fixed

    def _precheck(self, step, role, variants, table, idx):
        """make_config on every variant, wired fields filled with placeholders (catches missing
        required options and whatever the config's own __post_init__ checks)."""
        from ..steps import make_config
        fields, hints = step_fields(step)
        wired = wired_fields(step)
        for var in variants:
            vals = dict(var)
            for fk in wired:
                vals[fk] = _placeholder(*_unwrap(hints[fk]))
            try:
                make_config(step, vals)
            except (WorkbenchError, ValueError, TypeError) as e:
                what = ", ".join(f"{k}={v!r}" for k, v in var.items() if k not in wired)
                self.err(f"{e}" + (f" (for {what})" if what and len(variants) > 1 else ""), table, None, idx)
                return


def _refusal(step: str, role: str | None) -> str:
    """Why a registered step cannot be a table of its own (says what it does take)."""
    if role == "source":
        return f"step {step!r} makes a store from a model; a sweep has one such step ([{source_step()}])"
    roles = sorted(set(field_roles(step).values()) - {"out"})
    took = f" (its inputs: {', '.join(roles)})" if roles else ""
    from .pairs import SUMMARY_STEP
    extra = "; [match_saes] pairs = \"layer\" adds it by itself" if step == SUMMARY_STEP else ""
    return (f"step {step!r} has no input the sweep can wire{took}: a table needs a store, an SAE "
            f"or a pair of SAEs{extra}")


def _slug(s: str, n: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9_.\-]+", "_", s).strip("_.")
    return s[:n] or "x"
