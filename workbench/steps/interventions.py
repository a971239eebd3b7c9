"""Steps `steer` and `attribute` (the CLI commands ``workbench steer`` / ``workbench attribute``).

    workbench steer --model smollm2-135m --sae SAE --latent 123 --value 40 [--latent 7 --value -5]
                    [--mode clamp|add] [--pca PCA_RESULT --component 0 --coef 20] --prompt "..."
                    [--max-new-tokens 32] [--temperature 0] [--seed 0] [--out DIR]
    workbench attribute --sae SAE --text "..." [--metric loss|logit --target ' Paris' --position -1]
                    [--n-exact 16] [--out DIR]

Both print their summary (generations / agreement and the top entries) and, with --out, write a result
folder (kind ``steer`` / ``attribute``): result.json + ``table.csv`` (the DataFrame that
``workbench.steer`` / ``workbench.attribute`` return). Read them back ONLY through
``read_steer_result(path) -> SteerResult`` / ``read_attribute_result(path) -> AttributeResult``
(``.table`` is that DataFrame again, token columns kept as text). The maths is in workbench.interventions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import StepResult, arg, register
from ..errors import WorkbenchError


@dataclass
class SteerConfig:
    prompt: str = field(metadata=arg("text to continue"))
    sae: str = field(default="", metadata=arg("SAE folder whose latents to steer (SAELens format)", role="sae"))
    latent: list[int] = field(default_factory=list, metadata=arg("latent index (repeat for several)"))
    value: list[float] = field(default_factory=list, metadata=arg(
        "value per --latent (one value applies to all): clamp sets the latent to it, add adds it"))
    mode: str = field(default="clamp", metadata=arg("clamp: x + (v - f_i) W_dec[i]; add: x + v W_dec[i]",
                                                    choices=["clamp", "add"]))
    pca: str = field(default="", metadata=arg("a `pca` result folder: steer along its components", role="result"))
    component: list[int] = field(default_factory=list, metadata=arg("principal component (0-based; repeatable)"))
    coef: list[float] = field(default_factory=list, metadata=arg("coefficient per --component"))
    pca_mode: str = field(default="add", metadata=arg("add: x + c u; clamp: set (x - mean) . u to c",
                                                      choices=["clamp", "add"]))
    model: str = field(default="", metadata=arg("model spec (default: the SAE's metadata model_name)", role="model"))
    hook: str = field(default="", metadata=arg("hook (default: the SAE's / PCA result's hook)", role="hook"))
    max_new_tokens: int = field(default=32, metadata=arg("tokens to generate"))
    temperature: float = field(default=0.0, metadata=arg("0 = greedy; > 0 samples (seeded)"))
    seed: int = field(default=0, metadata=arg("sampling seed (both runs use it)"))
    n_top: int = field(default=3, metadata=arg("tokens listed per position in the probability shifts"))
    device: str = field(default="cpu", metadata=arg("cpu | cuda | auto"))
    out: str = field(default="", metadata=arg("write a result folder here (optional)", role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


@dataclass
class AttributeConfig:
    text: str = field(metadata=arg("text to attribute"))
    sae: str = field(metadata=arg("SAE folder (SAELens format)", role="sae"))
    model: str = field(default="", metadata=arg("model spec (default: the SAE's metadata model_name)", role="model"))
    hook: str = field(default="", metadata=arg("hook (default: the SAE's metadata hook_name)", role="hook"))
    metric: str = field(default="loss", metadata=arg(
        "loss: summed next-token cross-entropy of the text; logit: --target's logit at --position",
        choices=["loss", "logit"]))
    target: str = field(default="", metadata=arg("token (string that is one token, or id) for --metric logit"))
    position: int = field(default=-1, metadata=arg("position of the logit for --metric logit"))
    n_exact: int = field(default=16, metadata=arg("exact zero-ablations for the largest estimates"))
    n_show: int = field(default=5, metadata=arg("latents per token in the printed summary"))
    device: str = field(default="cpu", metadata=arg("cpu | cuda | auto"))
    out: str = field(default="", metadata=arg("write a result folder here (optional)", role="out"))
    overwrite: bool = field(default=False, metadata=arg("replace an existing result"))


def _device(d: str) -> str:
    from analyses._util import resolve_device      # the one device rule
    return str(resolve_device(d))


def _write(cfg, kind: str, df, data: dict) -> dict[str, str]:
    if not cfg.out:
        return {}
    from ..results import prepare_out, write_result
    try:
        out = prepare_out(cfg.out, cfg.overwrite)
    except FileExistsError as e:
        raise WorkbenchError(str(e)) from None
    df.to_csv(Path(out) / "table.csv", index=False)
    write_result(out, kind, {**data, "table": "table.csv"})
    return {"result": str(out), "table": str(Path(out) / "table.csv")}


@register("steer", SteerConfig, help="generate with and without steering an SAE latent / PCA direction")
def steer_step(cfg: SteerConfig) -> StepResult:
    from ..interventions import steer
    df = steer(cfg.prompt, sae=cfg.sae or None, latents=cfg.latent, values=cfg.value, mode=cfg.mode,
               model=cfg.model or None, hook=cfg.hook or None, pca=cfg.pca or None,
               components=cfg.component, coefs=cfg.coef, pca_mode=cfg.pca_mode,
               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
               n_top=cfg.n_top, device=_device(cfg.device))
    a = df.attrs
    shifts = df.reindex(df["kl"].abs().sort_values(ascending=False).index).head(5)
    summary = {"model": a["model"], "hook": a["hook"], "edits": a["edits"], "prompt": cfg.prompt,
               "unsteered": a["unsteered"], "steered": a["steered"], "mean_kl": a["mean_kl"],
               "decode_path": a.get("path", "bridge"),      # fast HF decode or the TransformerLens bridge
               "largest_shifts": shifts[["position", "token", "next_token", "p_clean", "p_steered", "kl",
                                         "top_up"]].to_dict("records")}
    data = {k: v for k, v in summary.items() if k != "largest_shifts"}
    arts = _write(cfg, "steer", df, {**data, "sae": cfg.sae, "pca": cfg.pca, "temperature": cfg.temperature,
                                     "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens})
    return StepResult(summary=summary, metrics={"mean_kl": a["mean_kl"]}, artifacts=arts)


@register("attribute", AttributeConfig, help="per-token latent effects: exact zero-ablation + linear estimate")
def attribute_step(cfg: AttributeConfig) -> StepResult:
    from ..interventions import attribute, top_per_token
    df = attribute(cfg.text, sae=cfg.sae, model=cfg.model or None, hook=cfg.hook or None, metric=cfg.metric,
                   target=cfg.target or None, position=cfg.position, n_exact=cfg.n_exact,
                   device=_device(cfg.device))
    a = df.attrs
    per_token = []
    for p, g in top_per_token(df, cfg.n_show).groupby("position"):
        per_token.append({"position": int(p), "token": a["tokens"][int(p)],
                          "latents": [{"latent": int(r.latent), "activation": round(float(r.activation), 4),
                                       "attribution": float(r.attribution),
                                       "exact": None if r.exact != r.exact else float(r.exact)}
                                      for r in g.itertuples()]})
    summary = {"model": a["model"], "hook": a["hook"], "metric": a["metric"], "metric_value": a["metric_value"],
               "n_active": len(df), "agreement": a["agreement"], "per_token": per_token}
    arts = _write(cfg, "attribute", df, {k: v for k, v in summary.items() if k != "per_token"}
                  | {"sae": cfg.sae, "text": cfg.text, "tokens": a["tokens"]})
    metrics = {f"agreement_{k}": float(v) for k, v in a["agreement"].items()}
    return StepResult(summary=summary, metrics=metrics, artifacts=arts)


# ------------------------------------------------------------------------------------- readers
# Columns of table.csv that hold text: read as str with no NA parsing (a token " NA" or "nan" stays text).
STEER_TEXT = ("phase", "token", "next_token", "top_up", "top_down", "steered_token")
ATTRIBUTE_TEXT = ("token",)


def _table(path: Path, meta: dict, text_cols: tuple[str, ...]):
    import pandas as pd
    f = path / str(meta.get("table") or "table.csv")
    if not f.exists():
        raise WorkbenchError(f"{path}: the {meta.get('kind')} result has no {f.name}; rerun the step with --out")
    head = pd.read_csv(f, nrows=0).columns
    return pd.read_csv(f, dtype={c: str for c in text_cols if c in head}, keep_default_na=False,
                       na_values={c: ["", "nan", "NaN"] for c in head if c not in text_cols})


def _need(path, meta: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        if k not in meta:
            raise WorkbenchError(f"{path}: the {meta.get('kind')} result has no {k!r}; rerun the step")


@dataclass(frozen=True)
class SteerResult:
    """A "steer" result folder (``read_steer_result``); `table` = the DataFrame ``workbench.steer``
    returned (one row per position of the unsteered sequence)."""
    path: Path
    model: str
    hook: str
    prompt: str
    edits: list[str]
    unsteered: str
    steered: str
    mean_kl: float
    table: Any = field(repr=False)
    sae: str | None = None
    pca: str | None = None
    temperature: float | None = None
    seed: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class AttributeResult:
    """An "attribute" result folder (``read_attribute_result``); `table` = the DataFrame
    ``workbench.attribute`` returned (one row per active (position, latent))."""
    path: Path
    model: str
    hook: str
    metric: str
    metric_value: float
    text: str
    tokens: list[str]
    agreement: dict[str, Any]
    table: Any = field(repr=False)
    sae: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


def _read(path: str | Path, kind: str, keys: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    from ..results import read_result
    path = Path(path)
    m = read_result(path, kind)
    _need(path, m, keys)
    return path, m


def read_steer_result(path: str | Path) -> SteerResult:
    """The one reader of a "steer" result (WorkbenchError for a missing one, another kind, a missing key)."""
    path, m = _read(path, "steer", ("model", "hook", "prompt", "edits", "unsteered", "steered", "mean_kl"))
    return SteerResult(path=path, model=str(m["model"]), hook=str(m["hook"]), prompt=str(m["prompt"]),
                       edits=list(m["edits"]), unsteered=str(m["unsteered"]), steered=str(m["steered"]),
                       mean_kl=float(m["mean_kl"]), table=_table(path, m, STEER_TEXT),
                       sae=m.get("sae") or None, pca=m.get("pca") or None, temperature=m.get("temperature"),
                       seed=m.get("seed"), meta=m)


def read_attribute_result(path: str | Path) -> AttributeResult:
    """The one reader of an "attribute" result (WorkbenchError for a missing one, another kind, a missing key)."""
    path, m = _read(path, "attribute", ("model", "hook", "metric", "metric_value", "text", "tokens", "agreement"))
    return AttributeResult(path=path, model=str(m["model"]), hook=str(m["hook"]), metric=str(m["metric"]),
                           metric_value=float(m["metric_value"]), text=str(m["text"]), tokens=list(m["tokens"]),
                           agreement=dict(m["agreement"]), table=_table(path, m, ATTRIBUTE_TEXT),
                           sae=m.get("sae") or None, meta=m)
