"""A workspace: a folder of artefacts plus a small SQLite index of the runs that made them.

Layout::

    WS/workbench.db     runs index (this module)
    WS/stores/NAME/     activation stores (workbench.store)
    WS/saes/NAME/       SAEs in SAELens 6.x format (analyses.sae)
    WS/results/NAME/    step results: result.json (typed, versioned) + tensors + plots
    WS/exports/NAME/    SAEs exported for other tools (made on demand)

The index is the one place the CLI (`workbench runs`), sweeps and the UI learn what
exists and how it was made. SQLite in WAL mode so a UI can read while a step writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import NotFound, UnknownName

INDEX_NAME = "workbench.db"
SUBDIRS = ("stores", "saes", "results")
# What a step produces -> the folder its output goes to by default (the one rule; steps declare
# `produces` when they register, see workbench.steps.register).
OUTPUT_DIRS = {"store": "stores", "sae": "saes", "result": "results", "export": "exports"}
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          TEXT PRIMARY KEY,
    step        TEXT NOT NULL,
    config      TEXT NOT NULL,      -- JSON
    config_hash TEXT NOT NULL,
    status      TEXT NOT NULL,      -- running | done | failed
    started     REAL NOT NULL,
    ended       REAL,
    metrics     TEXT NOT NULL DEFAULT '{}',   -- JSON
    artifacts   TEXT NOT NULL DEFAULT '{}',   -- JSON name -> path (relative to the workspace when inside it)
    error       TEXT,
    sweep       TEXT
);
CREATE INDEX IF NOT EXISTS runs_hash ON runs(config_hash);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def config_hash(step: str, config: dict[str, Any]) -> str:
    """Stable identity of a step: sha256 of its name and canonical JSON config (first 16 hex)."""
    blob = json.dumps({"step": step, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Run:
    id: str
    step: str
    config: dict[str, Any]
    config_hash: str
    status: str
    started: float
    ended: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    sweep: str | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["seconds"] = self.seconds
        return d


class Workspace:
    """Open (or create) a workspace folder. Cheap: no connection is kept open."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root).expanduser().resolve()
        if not create and not (self.root / INDEX_NAME).exists():
            raise NotFound(
                f"{self.root} is not a workspace (no {INDEX_NAME}); "
                "run `workbench demo --workspace DIR` or pass a folder made by workbench"
            )
        if create:
            for sub in SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.executescript(_SCHEMA)
                db.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )

    # ------------------------------------------------------------------ paths
    @property
    def stores(self) -> Path:
        return self.root / "stores"

    @property
    def saes(self) -> Path:
        return self.root / "saes"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    def output_dir(self, produces: str) -> Path:
        """The folder a step that produces `produces` (store, sae, result, export) writes into."""
        return self.root / OUTPUT_DIRS[produces]

    @classmethod
    def find(cls, path: str | os.PathLike) -> "Workspace | None":
        """The workspace containing `path` (walking up), or None."""
        p = Path(path).expanduser().resolve()
        for cand in [p, *p.parents]:
            if (cand / INDEX_NAME).is_file():
                return cls(cand, create=False)
        return None

    def rel(self, path: str | os.PathLike) -> str:
        """Path relative to the workspace when inside it (so a workspace can be moved)."""
        p = Path(path).expanduser().resolve()
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    def abs(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    # ------------------------------------------------------------------ index
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.root / INDEX_NAME, timeout=30)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            with con:
                yield con
        finally:
            con.close()

    def start_run(self, step: str, config: dict[str, Any], sweep: str | None = None) -> Run:
        run = Run(
            id=uuid.uuid4().hex[:12],
            step=step,
            config=config,
            config_hash=config_hash(step, config),
            status="running",
            started=time.time(),
            sweep=sweep,
        )
        with self._db() as db:
            db.execute(
                "INSERT INTO runs(id, step, config, config_hash, status, started, sweep) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run.id, step, json.dumps(config, default=str), run.config_hash, run.status,
                 run.started, sweep),
            )
        return run

    def finish_run(self, run: Run, status: str, metrics: dict | None = None,
                   artifacts: dict[str, str] | None = None, error: str | None = None) -> Run:
        run.status, run.ended, run.error = status, time.time(), error
        run.metrics = dict(metrics or {})
        run.artifacts = {k: self.rel(v) for k, v in (artifacts or {}).items()}
        with self._db() as db:
            db.execute(
                "UPDATE runs SET status=?, ended=?, metrics=?, artifacts=?, error=? WHERE id=?",
                (status, run.ended, json.dumps(run.metrics, default=float),
                 json.dumps(run.artifacts), error, run.id),
            )
        return run

    def runs(self, step: str | None = None, status: str | None = None,
             config_hash: str | None = None, sweep: str | None = None) -> list[Run]:
        """Runs, newest first, optionally filtered."""
        q, args = "SELECT * FROM runs WHERE 1=1", []
        for col, val in (("step", step), ("status", status), ("config_hash", config_hash),
                         ("sweep", sweep)):
            if val is not None:
                q += f" AND {col}=?"
                args.append(val)
        q += " ORDER BY started DESC"
        with self._db() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(q, args).fetchall()
        return [self._row(r) for r in rows]

    def get_run(self, run_id: str) -> Run:
        with self._db() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM runs WHERE id LIKE ?", (run_id + "%",)).fetchall()
        if not rows:
            raise UnknownName(f"no run {run_id!r} in {self.root}; `workbench runs list` shows them")
        if len(rows) > 1:
            raise UnknownName(f"run id prefix {run_id!r} is ambiguous ({len(rows)} runs); give more characters")
        return self._row(rows[0])

    def delete_run(self, run_id: str) -> Run:
        run = self.get_run(run_id)
        with self._db() as db:
            db.execute("DELETE FROM runs WHERE id=?", (run.id,))
        return run

    @staticmethod
    def _row(r: sqlite3.Row) -> Run:
        return Run(
            id=r["id"], step=r["step"], config=json.loads(r["config"]),
            config_hash=r["config_hash"], status=r["status"], started=r["started"],
            ended=r["ended"], metrics=json.loads(r["metrics"] or "{}"),
            artifacts=json.loads(r["artifacts"] or "{}"), error=r["error"], sweep=r["sweep"],
        )

    # --------------------------------------------------------------- listing
    def list_stores(self) -> list[Path]:
        return sorted(p for p in self.stores.iterdir() if (p / "manifest.json").exists()) \
            if self.stores.exists() else []

    def list_saes(self) -> list[Path]:
        return sorted(p for p in self.saes.iterdir() if (p / "cfg.json").exists()) \
            if self.saes.exists() else []

    def list_results(self, kind: str | None = None) -> list[Path]:
        out = []
        if self.results.exists():
            for p in sorted(self.results.iterdir()):
                f = p / "result.json"
                if f.exists():
                    if kind is None:
                        out.append(p)
                    else:
                        try:
                            if json.loads(f.read_text()).get("kind") == kind:
                                out.append(p)
                        except (OSError, json.JSONDecodeError):
                            continue
        return out
