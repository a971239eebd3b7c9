"""Shared by the pages that steer (Interventions, a latent's dashboard on Features, a principal
component on Activations): the cached model / SAE / ``workbench.steer`` call, the generation inputs,
the button that keeps its answer on screen, and the rendering of the two generations with the
next-token probability shifts. The computing is all ``workbench.interventions``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from workbench.ui import common

SHIFT_COLUMNS = ["position", "phase", "token", "next_token", "p_clean", "p_steered", "delta_p", "kl",
                 "top_up", "top_down", "steered_token"]


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def model(spec: str):
    from workbench._fast_decode import prepare
    from workbench.models import load_model
    m = load_model(spec, device="cpu")
    prepare(m)          # the fast decode path, checked now rather than on the first steering answer
    return m


@st.cache_resource(show_spinner="Loading the SAE…", max_entries=2)
def _sae(path: str, key: int):
    from workbench.interventions import resolve_sae
    return resolve_sae(path)


def sae_info(path: Path) -> tuple[Any, str, str]:
    """(SAE object, its metadata model_name, its hook_name), cached per cfg.json version."""
    sae, hook = _sae(str(path), common.stamp(path, "cfg.json"))
    md = getattr(sae.cfg, "metadata", {}) or {}
    md = md if isinstance(md, dict) else vars(md)
    return sae, str(md.get("model_name") or ""), str(hook or "")


@st.cache_data(show_spinner=False, max_entries=32)
def _steer(sae_path: str | None, key: int, spec: str, hook: str, kw: dict) -> tuple[Any, dict]:
    from workbench.interventions import steer
    sae = sae_info(Path(sae_path))[0] if sae_path else None
    df = steer(sae=sae, model=model(spec), hook=hook or None, **kw)
    return df, dict(df.attrs)


def steer(sae_path: str | Path | None, spec: str, hook: str, **kw) -> tuple[Any, dict]:
    """``workbench.steer`` with the page's inputs; cached on all of them (generation is seeded, so the
    same inputs give the same answer)."""
    key = common.stamp(Path(sae_path), "cfg.json", "sae_weights.safetensors") if sae_path else 0
    if kw.get("pca"):
        key = hash((key, common.stamp(Path(kw["pca"]), "result.json", "tensors.safetensors")))
    return _steer(str(sae_path) if sae_path else None, key, spec, hook, kw)


def generation_inputs(cols, prefix: str) -> dict:
    """new tokens / temperature / seed in the given columns (two or three)."""
    n_new = cols[0].number_input("new tokens", 1, 256, 32, key=f"{prefix}_new")
    temp = cols[1].number_input("temperature (0 = greedy)", 0.0, 5.0, 0.0, key=f"{prefix}_temp")
    seed = cols[-1].number_input("seed", 0, 2**31 - 1, 0, key=f"{prefix}_seed")
    return {"max_new_tokens": int(n_new), "temperature": float(temp), "seed": int(seed)}


def pressed(label: str, key: str, inputs: Any, help: str | None = None) -> bool:
    """A button whose answer stays on screen while `inputs` stay the same (other widgets rerun the
    page; the cached computation is not repeated)."""
    mark = f"_{key}_shown"
    if st.button(label, type="primary", key=key, help=help):
        st.session_state[mark] = repr(inputs)
    return st.session_state.get(mark) == repr(inputs)


def show_steering(prompt: str, df, attrs: dict, title: str | None = None) -> None:
    """The two generations side by side, then the next-token probability shifts along the unsteered
    text (KL per position and the table of what rose / fell)."""
    left, right = st.columns(2)
    left.markdown("**unsteered**")
    left.code(prompt + attrs["unsteered"], language=None, wrap_lines=True)
    right.markdown(f"**steered** ({title or ', '.join(attrs['edits'])})")
    right.code(prompt + attrs["steered"], language=None, wrap_lines=True)
    st.caption(f"next-token probability shifts along the unsteered text · mean KL(clean || steered) = "
               f"{attrs['mean_kl']:.4f} nats · decoded on the {attrs.get('path', 'bridge')} path")
    st.bar_chart(df.set_index("position")["kl"], height=180)
    st.dataframe(df[SHIFT_COLUMNS], hide_index=True, width="stretch")
