"""Step results on disk: a folder with `result.json` (typed, versioned, written last), tensors in
`tensors.safetensors`, and plotly figures as standalone HTML. Readers trust a result only when
result.json exists, so a half-written folder is never mistaken for a complete one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from analyses._util import atomic_write

from .errors import OutputExists, WorkbenchError

RESULT_FILE = "result.json"
TENSOR_FILE = "tensors.safetensors"
# The file each kind of artefact writes LAST: its presence means the artefact is complete
# (stores: workbench.store MANIFEST; SAEs: the SAELens cfg.json; results and exports: result.json).
COMPLETE_MARKERS = (RESULT_FILE, "manifest.json", "cfg.json")


def is_complete(out: str | os.PathLike | None) -> bool:
    """True when the folder holds a complete artefact (store, SAE, result or export)."""
    return out is not None and any((Path(out) / f).is_file() for f in COMPLETE_MARKERS)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same folder + fsync + rename, so readers see old or new, never
    half (the one implementation: analyses._util.atomic_write)."""
    atomic_write(path, lambda f: f.write(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), mode="wb")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


PARTIAL_MARKER = ".workbench-partial"


def prepare_out(out: str | os.PathLike, overwrite: bool, what: str = "result") -> Path:
    """Make `out` ready for a new artefact. A complete one is kept unless overwrite; one we left
    half-written (it holds PARTIAL_MARKER) is cleared; any other non-empty folder is refused, so a
    mistyped --out never deletes a user's files."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise OutputExists(f"{out} exists and is a file; choose a folder for --out")
        complete = is_complete(out)
        ours = complete or (out / PARTIAL_MARKER).exists()
        if complete and not overwrite:
            raise OutputExists(
                f"{out} already holds a {what}; pass --overwrite to replace it or choose another --out")
        if any(out.iterdir()):
            if not ours:
                raise OutputExists(
                    f"{out} is a non-empty folder that workbench did not write; choose another --out")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_MARKER).touch()
    return out


def write_result(out: str | os.PathLike, kind: str, data: dict[str, Any], *, version: int = 1,
                 tensors: dict[str, torch.Tensor] | None = None,
                 figures: dict[str, Any] | None = None) -> Path:
    """Write a result folder. `figures` maps a name to a plotly Figure (saved as NAME.html)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, out / TENSOR_FILE)
    files = {}
    for name, fig in (figures or {}).items():
        path = out / f"{name}.html"
        fig.write_html(path, include_plotlyjs="cdn", full_html=True)
        files[name] = path.name
    meta = {"kind": kind, "version": version, **data}
    if files:
        meta.setdefault("figures", {}).update(files)
    if tensors:
        meta["tensors"] = sorted(tensors)
    atomic_write_json(out / RESULT_FILE, meta)
    (out / PARTIAL_MARKER).unlink(missing_ok=True)
    return out


def read_result(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The result.json of a result folder (checked against `kind` when given)."""
    path = Path(path)
    f = path / RESULT_FILE
    if not f.exists():
        raise WorkbenchError(f"{path} is not a complete result (no {RESULT_FILE}); rerun the step that makes it")
    meta = json.loads(f.read_text())
    if kind is not None and meta.get("kind") != kind:
        raise WorkbenchError(f"{path} holds a {meta.get('kind')!r} result, expected {kind!r}")
    return meta


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    f = Path(path) / TENSOR_FILE
    if not f.exists():
        return {}
    return load_file(f)
