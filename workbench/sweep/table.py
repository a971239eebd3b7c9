"""The runs index as one table (used by `workbench runs export` and `workbench.sweep.run`)."""

from __future__ import annotations

import json
from typing import Any, Iterable

from ..workspace import Workspace

BASE_COLUMNS = ["id", "step", "status", "config_hash", "started", "ended", "seconds", "sweep", "error"]


def _flatten(prefix: str, d: Any, out: dict[str, Any]) -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(d, (list, tuple)):
        out[prefix] = json.dumps(d, default=str)
    else:
        out[prefix] = d


def results_table(ws: Workspace | str, sweep: str | None = None, step: str | None = None,
                  run_ids: Iterable[str] | None = None):
    """pandas DataFrame, one row per run (oldest first): id, step, status, config_hash, started,
    ended (pandas Timestamps, UTC), seconds, sweep, error (first line), then config.* (flattened;
    lists as JSON text), metrics.*, artifacts.* (paths relative to the workspace). Columns whose
    values mix types are turned into text so the table writes to CSV and Parquet alike."""
    import pandas as pd
    if not isinstance(ws, Workspace):
        ws = Workspace(ws, create=False)
    runs = ws.runs(sweep=sweep, step=step)
    if run_ids is not None:
        wanted = set(run_ids)
        runs = [r for r in runs if r.id in wanted]
    rows = []
    for r in reversed(runs):
        row: dict[str, Any] = {
            "id": r.id, "step": r.step, "status": r.status, "config_hash": r.config_hash,
            "started": r.started, "ended": r.ended, "seconds": r.seconds, "sweep": r.sweep,
            "error": (r.error or "").splitlines()[0] if r.error else None,
        }
        _flatten("config", r.config, row)
        _flatten("metrics", r.metrics, row)
        _flatten("artifacts", r.artifacts, row)
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else BASE_COLUMNS)
    for col in ("started", "ended"):
        df[col] = pd.to_datetime(df[col], unit="s", utc=True)
    # stable column order: base, then config.*, metrics.*, artifacts.* (each sorted)
    rest = [c for c in df.columns if c not in BASE_COLUMNS]
    order = BASE_COLUMNS + sorted(rest, key=lambda c: ({"config": 0, "metrics": 1, "artifacts": 2}
                                                       .get(c.split(".", 1)[0], 3), c))
    df = df[order]
    for col in rest:
        vals = df[col].dropna()
        kinds = {type(v) for v in vals}
        other = kinds - {int, float}
        if len(other) > 1 or (other and kinds & {int, float}):
            df[col] = df[col].map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v))
    return df.reset_index(drop=True)
