"""QC figures as pure functions: arrays in, PNG bytes or SVG text out (matplotlib Agg, no display, no network).

Volumes are ``(I, J, K)`` arrays on a RAS+ voxel grid (the T1w's, or the target's own for the residual) with voxel
sizes ``zooms`` (mm). A 2D cut ``data[..., k]`` is drawn transposed with the origin at the bottom, so the first voxel
axis runs left to right and the second bottom to top; pixel aspect follows ``zooms``.
"""
from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

#: Screen-label letters of the positive end of each RAS+ voxel axis, and of its negative end.
_POS, _NEG = ("R", "A", "S"), ("L", "P", "I")
_PLANE = {0: "sagittal", 1: "coronal", 2: "axial"}
EDGE_COLOR = "#ff3b30"


def _png(fig: plt.Figure, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor=fig.get_facecolor())
    plt.close(fig)
    return buf.getvalue()


def _svg(fig: plt.Figure) -> str:
    buf = io.StringIO()
    # No date and a fixed id salt: the same figure gives the same bytes on every run (reruns compare equal).
    with plt.rc_context({"svg.hashsalt": "atlasgs-bids"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()


def window(data: np.ndarray, mask: np.ndarray | None = None, low: float = 0.5,
           high: float = 99.5) -> tuple[float, float]:
    """Display range ``(vmin, vmax)``: percentiles of the finite values of ``data`` inside ``mask`` (all if None).

    >>> window(np.arange(101.0), low=0, high=100)
    (0.0, 100.0)
    """
    vals = data[mask] if mask is not None and mask.any() else data.ravel()
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, [low, high]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def centre_index(shape: Sequence[int], mask: np.ndarray | None = None) -> tuple[int, int, int]:
    """Voxel index ``(i, j, k)`` of the mask's centre of mass (the grid centre without a mask)."""
    if mask is not None and mask.any():
        return tuple(int(round(c)) for c in ndimage.center_of_mass(mask))  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape[:3])  # type: ignore[return-value]


def _cut(data: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D cut at ``index`` along ``axis``, transposed for ``imshow(origin="lower")``."""
    return np.take(data, index, axis=axis).T


def _aspect(zooms: Sequence[float], axis: int) -> float:
    """imshow aspect (height/width of a pixel) for a cut along ``axis``."""
    rest = [a for a in range(3) if a != axis]
    return float(zooms[rest[1]]) / float(zooms[rest[0]])


def _orient_labels(ax: plt.Axes, axis: int) -> None:
    rest = [a for a in range(3) if a != axis]
    kw = dict(transform=ax.transAxes, color="#ffd60a", fontsize=9, fontweight="bold")
    ax.text(0.01, 0.5, _NEG[rest[0]], ha="left", va="center", **kw)
    ax.text(0.99, 0.5, _POS[rest[0]], ha="right", va="center", **kw)
    ax.text(0.5, 0.98, _POS[rest[1]], ha="center", va="top", **kw)


def edge_map(t1w_cut: np.ndarray, mask_cut: np.ndarray | None = None, sigma: float = 1.5) -> np.ndarray:
    """Boolean edges of a 2D T1w cut (scikit-image's Canny on the cut windowed to its 1st-99th percentiles).

    Parameters
    ----------
    t1w_cut : array, shape (H, W)
    mask_cut : bool array, shape (H, W), optional
        Edges are kept inside the mask dilated by 2 pixels (the brain outline stays visible).
    sigma : float
        Gaussian smoothing in pixels.
    """
    img = np.asarray(t1w_cut, dtype=np.float64)
    lo, hi = window(img, mask_cut, 1, 99)
    img = np.clip((img - lo) / (hi - lo), 0, 1)
    from skimage.feature import canny

    edges = canny(img, sigma=sigma, low_threshold=0.08, high_threshold=0.18)
    if mask_cut is not None and mask_cut.any():
        edges &= ndimage.binary_dilation(mask_cut, iterations=2)
    return edges


def edges_overlay_png(moving: np.ndarray, t1w: np.ndarray, zooms: Sequence[float], mask: np.ndarray | None = None,
                      *, title: str = "") -> bytes:
    """Three orthogonal planes of the registered target (grey) with the T1w's edges on top.

    Parameters
    ----------
    moving : array, shape (I, J, K)
        The target resampled onto the T1w grid with the estimated rigid transform.
    t1w : array, shape (I, J, K)
        The T1w on the same grid.
    zooms : 3 floats
        T1w voxel sizes, mm.
    mask : bool array, shape (I, J, K), optional
        Brain mask: chooses the planes (its centre of mass) and the display window.
    """
    centre = centre_index(t1w.shape, mask)
    vmin, vmax = window(moving, mask if mask is not None and (moving[mask] != 0).any() else moving != 0)
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.0), facecolor="black")
    for ax, axis in zip(axes, (0, 1, 2)):
        m2 = _cut(mask, axis, centre[axis]) if mask is not None else None
        ax.imshow(_cut(moving, axis, centre[axis]), cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                  aspect=_aspect(zooms, axis), interpolation="nearest")
        edges = edge_map(_cut(t1w, axis, centre[axis]), m2)
        overlay = np.zeros((*edges.shape, 4))
        overlay[edges] = matplotlib.colors.to_rgba(EDGE_COLOR)
        ax.imshow(overlay, origin="lower", aspect=_aspect(zooms, axis), interpolation="nearest")
        _orient_labels(ax, axis)
        ax.set_title(f"{_PLANE[axis]} {centre[axis]}", color="white", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def mosaic_indices(mask: np.ndarray | None, shape: Sequence[int], axis: int, n: int) -> list[int]:
    """``n`` evenly spaced cut indices along ``axis`` covering the mask's extent (the middle 80% without one)."""
    size = int(shape[axis])
    if mask is not None and mask.any():
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(present[0]), int(present[-1])
        pad = (hi - lo) // 10
        lo, hi = lo + pad, hi - pad
    else:
        lo, hi = size // 10, size - 1 - size // 10
    return sorted({int(round(v)) for v in np.linspace(lo, max(lo, hi), n)})


def _crop_box(mask: np.ndarray | None, axis: int, shape: Sequence[int], margin: int = 4) -> tuple[slice, slice]:
    """Rows/columns (of a transposed cut along ``axis``) bounding the mask with a margin."""
    rest = [a for a in range(3) if a != axis]
    if mask is None or not mask.any():
        return slice(None), slice(None)
    proj = mask.any(axis=axis).T  # (rest[1], rest[0])
    rows, cols = np.flatnonzero(proj.any(axis=1)), np.flatnonzero(proj.any(axis=0))
    r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, shape[rest[1]])
    c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, shape[rest[0]])
    return slice(r0, r1), slice(c0, c1)


def compare_mosaic_png(rows: dict[str, np.ndarray], axis: int, zooms: Sequence[float],
                       mask: np.ndarray | None = None, *, n: int = 5, window_from: str | None = None) -> bytes:
    """A mosaic: one row per named volume, ``n`` cuts along ``axis``, all with the same display window, each cut
    about 2.5 inches wide at 100 dpi (250 px), with orientation letters (R/L, A/P, S/I) on every cut.

    Parameters
    ----------
    rows : dict name -> array, shape (I, J, K)
        Volumes on one grid, e.g. ``{"cubic": ..., "atlasgs": ...}`` (row order kept).
    axis : int
        Voxel axis the cuts are taken along (choose one whose planes contain the target's slice axis, so the
        through-plane resolution shows).
    zooms : 3 floats, mm
    mask : bool array, optional
        Limits the cut range and the window's percentiles; the cuts are cropped to it.
    window_from : str, optional
        Name of the row whose intensities set the window (default: the last row).
    """
    names = list(rows)
    ref = rows[window_from or names[-1]]
    vmin, vmax = window(ref, mask, 2.0, 99.8)
    shape = ref.shape
    idx = mosaic_indices(mask, shape, axis, n)
    rs, cs = _crop_box(mask, axis, shape)
    fig, axes = plt.subplots(len(names), len(idx), figsize=(2.5 * len(idx), 2.7 * len(names) + 0.3),
                             facecolor="black", squeeze=False)
    for r, name in enumerate(names):
        for c, k in enumerate(idx):
            ax = axes[r, c]
            ax.imshow(_cut(rows[name], axis, k)[rs, cs], cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                      aspect=_aspect(zooms, axis), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            _orient_labels(ax, axis)
            if r == 0:
                ax.set_title(f"{_PLANE[axis]} {k} ({k * float(zooms[axis]):.0f} mm)", color="white", fontsize=10)
            if c == 0:
                ax.set_ylabel(name, color="white", fontsize=12)
    fig.subplots_adjust(wspace=0.03, hspace=0.08)
    return _png(fig, dpi=100)


def sd_mosaic_png(output: np.ndarray, sd: np.ndarray, axis: int, zooms: Sequence[float],
                  mask: np.ndarray | None = None, *, n: int = 5, units: str = "output units") -> bytes:
    """The output (grey, top row) and its per-voxel SD (colour, bottom row, 0 to the SD's 99th percentile in the
    mask, with a colour bar in ``units``) on the same ``n`` cuts along ``axis``.

    Parameters
    ----------
    output, sd : arrays, shape (I, J, K), one grid (the T1w's), the same units
    axis : voxel axis of the cuts; zooms : 3 floats, mm; mask : bool array, optional (cut range, windows, crop)
    """
    inside = mask if mask is not None else sd > 0
    vmin, vmax = window(output, mask, 2.0, 99.8)
    top = float(np.percentile(sd[inside], 99)) if inside.any() else 1.0
    top = top if top > 0 else 1.0
    idx = mosaic_indices(mask, sd.shape, axis, n)
    rs, cs = _crop_box(mask, axis, sd.shape)
    fig, axes = plt.subplots(2, len(idx), figsize=(2.5 * len(idx) + 0.8, 5.7), facecolor="black", squeeze=False)
    im = None
    for c, k in enumerate(idx):
        for r, (data, cmap, lo, hi) in enumerate(((output, "gray", vmin, vmax), (sd, "inferno", 0.0, top))):
            ax = axes[r, c]
            im_rc = ax.imshow(_cut(data, axis, k)[rs, cs], cmap=cmap, vmin=lo, vmax=hi, origin="lower",
                              aspect=_aspect(zooms, axis), interpolation="nearest")
            im = im_rc if r == 1 else im
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            _orient_labels(ax, axis)
        axes[0, c].set_title(f"{_PLANE[axis]} {k} ({k * float(zooms[axis]):.0f} mm)", color="white", fontsize=10)
    axes[0, 0].set_ylabel("atlasgs", color="white", fontsize=12)
    axes[1, 0].set_ylabel("SD", color="white", fontsize=12)
    fig.subplots_adjust(wspace=0.03, hspace=0.08)
    if im is not None:
        cb = fig.colorbar(im, ax=axes[1].tolist(), shrink=0.9, pad=0.02)
        cb.set_label(f"posterior SD ({units})", color="white", fontsize=9)
        cb.ax.tick_params(labelsize=8, colors="white")
    return _png(fig, dpi=100)


def residual_mosaic_png(residual: np.ndarray, slice_axis: int, zooms: Sequence[float], *, n: int = 8,
                        units: str = "target units") -> bytes:
    """The data-consistency residual (measured - predicted) on the target's own grid, acquired slices in a row.

    Parameters
    ----------
    residual : array, shape (I, J, K)
        Zero outside fitted voxels.
    slice_axis : int
        The target's slice (through-plane) voxel axis: each panel is one acquired slice.
    zooms : 3 floats
        Target voxel sizes, mm.
    """
    fitted = residual != 0
    lim = float(np.percentile(np.abs(residual[fitted]), 99)) if fitted.any() else 1.0
    lim = lim if lim > 0 else 1.0
    idx = mosaic_indices(fitted if fitted.any() else None, residual.shape, slice_axis, n)
    rs, cs = _crop_box(fitted if fitted.any() else None, slice_axis, residual.shape, margin=1)
    ncol = min(len(idx), 8)
    nrow = int(np.ceil(len(idx) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.0 * ncol + 1.0, 2.1 * nrow + 0.3), squeeze=False)
    im = None
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), idx):
        im = ax.imshow(_cut(residual, slice_axis, k)[rs, cs], cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower",
                       aspect=_aspect(zooms, slice_axis), interpolation="nearest")
        ax.set_title(f"slice {k}", fontsize=8)
    if im is not None:
        cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
        cb.set_label(f"measured - fitted ({units})", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    return _png(fig)


def convergence_svg(history: Sequence[float], *, ylabel: str = "relative residual", title: str = "") -> str:
    """The fit's convergence curve: ``history[i]`` against iteration ``i + 1`` (log scale when all positive)."""
    h = np.asarray([v for v in history if v is not None], dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    if h.size:
        ax.plot(np.arange(1, h.size + 1), h, marker="o" if h.size < 40 else None, ms=3, lw=1.5, color="#1f6feb")
        if np.all(h > 0) and h.max() / max(h.min(), 1e-300) > 5:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no history recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _svg(fig)


#: Above this many values a group metric is drawn as a histogram (every point would be a blot, and a 10,000-point SVG
#: per metric makes the page slow to open).
MAX_STRIP_POINTS = 300
#: At most this many outliers are labelled in a strip plot (the table lists all of them).
MAX_LABELS = 12


def _group_axes(values: Sequence[float | None], outlier: Sequence[bool], band: tuple[float, float] | None, *,
                vertical: bool):
    """``(values, finite, outlier & finite, fig, ax)`` of a group plot, the inlier band shaded (a vertical span for
    a histogram, a horizontal one for a strip plot) when there are values."""
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=float)
    ok = np.isfinite(v)
    out = np.asarray(outlier, dtype=bool) & ok
    fig, ax = plt.subplots(figsize=(3.4, 2.7))
    if ok.any() and band is not None and all(np.isfinite(band)):
        (ax.axvspan if vertical else ax.axhspan)(band[0], band[1], color="#2da44e", alpha=0.10, lw=0)
    return v, ok, out, fig, ax


def histogram_svg(values: Sequence[float | None], outlier: Sequence[bool], *, metric: str,
                  band: tuple[float, float] | None = None, bins: int = 40) -> str:
    """One metric over a large group: a histogram of the inliers (grey) and the outliers (red, stacked), the robust
    inlier band shaded, the counts in the title."""
    v, ok, out, fig, ax = _group_axes(values, outlier, band, vertical=True)
    if ok.any():
        edges = np.histogram_bin_edges(v[ok], bins=bins)
        ax.hist([v[ok & ~out], v[out]], bins=edges, stacked=True, color=["#6e7781", "#d1242f"])
        ax.set_ylabel("targets", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{metric} (n={int(ok.sum())}, {int(out.sum())} outliers)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _svg(fig)


def group_plot_svg(values: Sequence[float | None], outlier: Sequence[bool], labels: Sequence[str], *, metric: str,
                   band: tuple[float, float] | None = None) -> str:
    """:func:`strip_plot_svg` up to :data:`MAX_STRIP_POINTS` values, :func:`histogram_svg` above."""
    n = sum(1 for x in values if x is not None and np.isfinite(float(x)))
    if n > MAX_STRIP_POINTS:
        return histogram_svg(values, outlier, metric=metric, band=band)
    return strip_plot_svg(values, outlier, labels, metric=metric, band=band)


def strip_plot_svg(values: Sequence[float | None], outlier: Sequence[bool], labels: Sequence[str], *, metric: str,
                   band: tuple[float, float] | None = None) -> str:
    """One metric over the group: a box plot, every value as a jittered point, outliers in red and labelled (the
    :data:`MAX_LABELS` farthest from the median).

    Parameters
    ----------
    values : floats (``None``/NaN skipped), one per row of the group table
    outlier : bools, same length
    labels : row labels shown next to outliers (e.g. ``sub-01 T2w``)
    band : (low, high), optional
        The robust inlier band (median -/+ k MAD) drawn as a shaded span.
    """
    v, ok, out, fig, ax = _group_axes(values, outlier, band, vertical=False)
    if ok.any():
        ax.boxplot(v[ok], positions=[0], widths=0.5, showfliers=False, medianprops={"color": "#1f6feb"})
        rng = np.random.default_rng(0)
        x = rng.uniform(-0.18, 0.18, size=v.size)
        ax.scatter(x[ok & ~out], v[ok & ~out], s=14, color="#444", alpha=0.8, zorder=3)
        ax.scatter(x[out], v[out], s=26, color="#d1242f", zorder=4)
        far = np.argsort(-np.abs(v[out] - np.median(v[ok])))[:MAX_LABELS]
        for xi, yi, lab in zip(x[out][far], v[out][far], np.asarray(labels, dtype=object)[out][far]):
            ax.annotate(str(lab), (xi, yi), xytext=(6, 0), textcoords="offset points", fontsize=7, color="#d1242f",
                        va="center")
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(-0.6, 1.2)
    ax.set_xticks([])
    ax.set_title(metric, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _svg(fig)
