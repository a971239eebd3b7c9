"""Plotly figures the pages (and the Export page) draw from stored numbers. Layout only: every
number plotted was computed by a step and read from its result."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

_MARGIN = dict(l=10, r=10, t=50, b=10)


def scree(ratios: Sequence[float], title: str = "Scree plot", name: str | None = None,
          cumulative: Sequence[float] | None = None) -> go.Figure:
    """Explained-variance ratio per component (bars) and its running total (line).

    `cumulative` is taken from the result when it stores one; otherwise the running sum of the
    stored ratios is drawn (a display of the same numbers, not a new analysis)."""
    r = np.asarray(ratios, dtype=float)
    cum = np.asarray(cumulative, dtype=float) if cumulative is not None else np.cumsum(r)
    x = np.arange(1, len(r) + 1)
    fig = go.Figure()
    fig.add_bar(x=x, y=r, name=name or "explained variance ratio", marker_color="#4c78a8",
                hovertemplate="PC%{x}: %{y:.4f}<extra></extra>")
    fig.add_scatter(x=x, y=cum, name="cumulative", yaxis="y2", mode="lines+markers",
                    line=dict(color="#f58518"), hovertemplate="PC1..%{x}: %{y:.3f}<extra></extra>")
    fig.update_layout(title=title, xaxis_title="component", yaxis_title="variance ratio",
                      yaxis2=dict(title="cumulative", overlaying="y", side="right", range=[0, 1.02]),
                      height=330, margin=_MARGIN, legend=dict(orientation="h", y=-0.2))
    return fig


def spectra(curves: dict[str, Sequence[float]], title: str = "Spectra",
            log: bool = True) -> go.Figure:
    """Several explained-variance spectra on one plot (one line per hook)."""
    fig = go.Figure()
    for name, r in curves.items():
        r = np.asarray(r, dtype=float)
        fig.add_scatter(x=np.arange(1, len(r) + 1), y=r, name=name, mode="lines+markers",
                        hovertemplate=name + " PC%{x}: %{y:.4g}<extra></extra>")
    fig.update_layout(title=title, xaxis_title="component", yaxis_title="explained variance ratio",
                      yaxis_type="log" if log else "linear", height=330, margin=_MARGIN,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def heatmap(matrix, x_labels: Sequence[str], y_labels: Sequence[str], title: str,
            metric: str = "", x_title: str = "", y_title: str = "",
            clickable: bool = True) -> go.Figure:
    """A layer x layer matrix. With `clickable`, an invisible marker sits on every cell so a click
    is a plotly point selection (heatmap traces do not emit selections themselves)."""
    z = np.asarray(matrix, dtype=float)
    xl, yl = [str(s) for s in x_labels], [str(s) for s in y_labels]
    hover = "row %{y}<br>col %{x}<br>" + (metric or "value") + " = %{customdata:.4f}<extra></extra>"
    fig = go.Figure(go.Heatmap(z=z, x=xl, y=yl, colorscale="Viridis", colorbar=dict(title=metric),
                               hoverinfo="skip" if clickable else None,
                               hovertemplate=None if clickable else
                               hover.replace("%{customdata", "%{z")))
    if clickable:
        # one (nearly invisible) marker per cell carries hover and click: the nearest cell centre
        # answers wherever the pointer is (hoverdistance -1)
        xs = [x for _ in yl for x in xl]
        ys = [y for y in yl for _ in xl]
        fig.add_scatter(x=xs, y=ys, mode="markers", customdata=z.ravel(),
                        marker=dict(size=14, opacity=0.01, color="#000"),
                        hovertemplate=hover, showlegend=False, name="cells")
        fig.update_layout(hoverdistance=-1)
    if len(yl) * len(xl) <= 400:
        fig.update_traces(selector=dict(type="heatmap"), texttemplate="%{z:.2f}",
                          textfont=dict(size=10))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=520,
                      margin=_MARGIN, clickmode="event+select", dragmode=False)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def density_histogram(log10_density: Sequence[float], title: str = "Latent density") -> go.Figure:
    fig = go.Figure(go.Histogram(x=np.asarray(log10_density, dtype=float), nbinsx=50,
                                 marker_color="#54a24b"))
    fig.update_layout(title=title, xaxis_title="log10 firing density", yaxis_title="latents",
                      height=300, margin=_MARGIN)
    return fig


def png_available() -> bool:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return True


def png_bytes(fig: go.Figure) -> bytes | None:
    """PNG via kaleido when it is installed and finds a browser; None otherwise."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return None
    try:
        return fig.to_image(format="png", scale=2)
    except Exception:  # noqa: BLE001 - kaleido without a usable browser
        return None
