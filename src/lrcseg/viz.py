"""Figures of CT slices with label overlays, always in radiological orientation.

Arrays in lrcseg are ``(X, Y, Z)`` in RAS+ (+x patient Right, +y Anterior). An axial slice is
``(H, W) = (X, Y)``. Radiological display puts the patient's right on the viewer's left and
anterior at the top, so the displayed array is ``(Y, X)`` with both axes reversed:
``radiological(slice_hw) = slice_hw.T[::-1, ::-1]`` (row 0 = most anterior, column 0 = most
patient-right).

Figures are built with :class:`matplotlib.figure.Figure` on the Agg canvas (no display needed,
no pyplot global state, safe in worker threads) and written atomically by :func:`save_figure`.
"""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lrcseg.io_utils import atomic_save

# Fixed RGB colours for label ids 1..12 (id 0, background, is transparent). Chosen to be
# distinguishable on a grey CT window; ids beyond the table get golden-ratio hues.
_BASE_COLORS = (
    (0.90, 0.10, 0.10),  # 1 red
    (0.10, 0.70, 0.20),  # 2 green
    (0.15, 0.40, 0.95),  # 3 blue
    (1.00, 0.80, 0.00),  # 4 yellow
    (0.95, 0.45, 0.00),  # 5 orange
    (0.60, 0.20, 0.85),  # 6 purple
    (0.00, 0.80, 0.80),  # 7 cyan
    (1.00, 0.40, 0.70),  # 8 pink
    (0.55, 0.85, 0.10),  # 9 lime
    (0.60, 0.35, 0.15),  # 10 brown
    (0.50, 0.60, 1.00),  # 11 light blue
    (0.80, 0.80, 0.50),  # 12 khaki
)


def radiological(slice_hw: np.ndarray) -> np.ndarray:
    """Map an axial slice ``(H, W) = (X, Y)`` in RAS+ to display order ``(Y, X)``.

    Returns ``slice_hw.T[::-1, ::-1]``: rows run from anterior (top) to posterior, columns from
    the patient's right (left of the image) to the patient's left. A view, not a copy.
    """
    slice_hw = np.asarray(slice_hw)
    if slice_hw.ndim != 2:
        raise ValueError(f"radiological expects a 2D (X, Y) slice, got shape {slice_hw.shape}")
    return slice_hw.T[::-1, ::-1]


def hu_to_grey(hu: np.ndarray, window_hu: tuple[float, float]) -> np.ndarray:
    """Grey levels in [0, 1] of CT values for display: ``clip((hu - lo) / (hi - lo), 0, 1)``.

    hu: an array of any shape in HU (float32 stays float32); window_hu: ``(lo, hi)`` with
    ``lo < hi``, e.g. the preprocessing window ``PreprocessConfig.window_hu``.
    """
    lo, hi = window_hu
    if not lo < hi:
        raise ValueError(f"Illegal window_hu {window_hu}: need lo < hi")
    return np.clip((hu - lo) / (hi - lo), 0, 1)


def representative_slice(hu_xyz: np.ndarray, labels_xyz: np.ndarray,
                         window_hu: tuple[float, float]) -> tuple[int, np.ndarray]:
    """The axial slice that shows a labelled volume best, windowed for display.

    hu_xyz: the CT ``(X, Y, Z)`` in HU; labels_xyz: integer ids ``(X, Y, Z)`` on the same grid
    (0 = background). Returns ``(z, grey)``: z is the slice with the most foreground voxels
    (the first one on ties, 0 when there is no foreground) and grey the ``(X, Y)`` slice
    ``hu_to_grey(hu_xyz[:, :, z], window_hu)``.
    """
    labels_xyz = np.asarray(labels_xyz)
    if labels_xyz.ndim != 3 or np.shape(hu_xyz) != labels_xyz.shape:
        raise ValueError(f"representative_slice needs (X, Y, Z) image and labels of one shape, "
                         f"got {np.shape(hu_xyz)} and {labels_xyz.shape}")
    z = int(np.argmax((labels_xyz > 0).reshape(-1, labels_xyz.shape[2]).sum(axis=0)))
    return z, hu_to_grey(hu_xyz[:, :, z], window_hu)


def label_colors(n: int) -> np.ndarray:
    """Fixed RGBA colour table ``(n, 4)`` float in [0, 1] for label ids ``0..n-1``.

    Id 0 (background) is fully transparent; ids 1..12 come from a fixed table; later ids use
    hues spaced by the golden ratio. The same id always gets the same colour.
    """
    if n < 1:
        raise ValueError(f"label_colors needs n >= 1, got {n}")
    table = np.zeros((n, 4), dtype=np.float64)
    for i in range(1, n):
        if i <= len(_BASE_COLORS):
            rgb = _BASE_COLORS[i - 1]
        else:
            hue = (i * 0.618033988749895) % 1.0
            rgb = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
        table[i, :3] = rgb
        table[i, 3] = 1.0
    return table


def _aspect(spacing_xy: tuple[float, float] | None) -> float:
    """imshow aspect (pixel height / width) of a radiological slice: rows are y, columns x."""
    if spacing_xy is None:
        return 1.0
    sx, sy = (float(v) for v in spacing_xy)
    if sx <= 0 or sy <= 0:
        raise ValueError(f"Illegal spacing_xy {spacing_xy}: both must be > 0")
    return sy / sx


def _check_pair(image_hw: np.ndarray, labels_hw: np.ndarray | None) -> None:
    if np.ndim(image_hw) != 2:
        raise ValueError(f"image must be a 2D (X, Y) slice, got shape {np.shape(image_hw)}")
    if labels_hw is not None and np.shape(labels_hw) != np.shape(image_hw):
        raise ValueError(f"labels shape {np.shape(labels_hw)} differs from image shape "
                         f"{np.shape(image_hw)}")


def show_image(ax: Axes, image_hw: np.ndarray, spacing_xy: tuple[float, float] | None = None,
               vmin: float | None = None, vmax: float | None = None,
               z_mm: float | None = None) -> None:
    """Draw a grey-level ``(X, Y)`` slice in radiological orientation, axes hidden, with its
    orientation markers, a mm scale bar (when ``spacing_xy`` is known) and the slice position
    ``z_mm`` (when given): :func:`annotate_slice`."""
    _check_pair(image_hw, None)
    ax.imshow(radiological(image_hw), cmap="gray", vmin=vmin, vmax=vmax,
              interpolation="nearest", aspect=_aspect(spacing_xy))
    ax.set_axis_off()
    annotate_slice(ax, np.shape(image_hw), spacing_xy, z_mm)


def annotate_slice(ax: Axes, shape_xy: tuple[int, int], spacing_xy: tuple[float, float] | None,
                   z_mm: float | None = None, upsample: int = 1) -> None:
    """Orientation markers of a radiological axial slice (R on the viewer's left, L right,
    A top, P bottom), a scale bar of a round length near a fifth of the width (``spacing_xy``
    in mm; none when None) and "z = ... mm" (the slice position, when ``z_mm`` is given).
    shape_xy: the slice's ``(X, Y)`` shape; upsample: display pixels per voxel."""
    style = {"color": "white", "fontsize": 8, "fontweight": "bold",
             "transform": ax.transAxes}
    for text, x, y, ha, va in (("R", 0.01, 0.5, "left", "center"), ("L", 0.99, 0.5, "right", "center"),
                               ("A", 0.5, 0.99, "center", "top"), ("P", 0.5, 0.01, "center", "bottom")):
        ax.text(x, y, text, ha=ha, va=va, **style)
    if z_mm is not None:
        ax.text(0.01, 0.99, f"z = {z_mm:.1f} mm", ha="left", va="top", **{**style, "fontweight": "normal"})
    if spacing_xy is None:
        return
    width_mm = shape_xy[0] * float(spacing_xy[0])
    bar_mm = _scale_bar_mm(width_mm)
    bar_px = bar_mm / float(spacing_xy[0]) * upsample  # columns run along x
    height = shape_xy[1] * upsample
    x0, y0 = 0.04 * shape_xy[0] * upsample, 0.93 * height
    ax.plot([x0, x0 + bar_px], [y0, y0], color="white", linewidth=2.5, solid_capstyle="butt")
    ax.text(x0 + bar_px / 2, y0 - 0.02 * height, f"{bar_mm} mm", color="white", fontsize=7,
            ha="center", va="bottom")


def _scale_bar_mm(width_mm: float) -> int:
    """A round scale-bar length in mm near a fifth of the width."""
    return next((v for v in (200, 100, 50, 20, 10, 5, 2, 1) if v <= width_mm / 5), 1)


def overlay_labels(ax: Axes, image_hw: np.ndarray, labels_hw: np.ndarray, alpha: float = 0.4,
                   spacing_xy: tuple[float, float] | None = None, n_colors: int | None = None,
                   vmin: float | None = None, vmax: float | None = None,
                   z_mm: float | None = None) -> None:
    """Draw ``image_hw`` in grey and the label ids of ``labels_hw`` as filled colours.

    image_hw, labels_hw: ``(X, Y)`` arrays of one axial slice; labels are integer ids, 0 left
    transparent. alpha: opacity of the label colours in [0, 1]. n_colors: size of the colour
    table (default max id + 1), so panels of one figure can share colours.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Illegal alpha {alpha}: must be in [0, 1]")
    _check_pair(image_hw, labels_hw)
    show_image(ax, image_hw, spacing_xy, vmin, vmax, z_mm)
    labels = np.asarray(radiological(labels_hw)).astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError("label ids must be >= 0")
    n = max(int(labels.max(initial=0)) + 1, n_colors or 0)
    rgba = label_colors(n)[labels]
    rgba[..., 3] *= alpha
    ax.imshow(rgba, interpolation="nearest", aspect=_aspect(spacing_xy))


def new_figure(width_in: float, height_in: float, dpi: int = 100) -> Figure:
    """A Figure on the Agg canvas, independent of pyplot's global figure list."""
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int | None = None) -> None:
    """Write ``fig`` atomically (format from the suffix, e.g. ``.png``), then close it."""
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=dpi or fig.dpi,
                                                  facecolor="white", bbox_inches="tight"))
    finally:
        plt.close(fig)


def overlay_boundaries(ax: Axes, image_hw: np.ndarray, regions_hw: np.ndarray,
                       color: tuple[float, float, float] = (1.0, 0.85, 0.0),
                       spacing_xy: tuple[float, float] | None = None,
                       z_mm: float | None = None) -> None:
    """Draw region boundaries (e.g. superpixels) in ``color`` on the grey image, radiological,
    with :func:`annotate_slice`'s markers, scale bar and position.

    image_hw: ``(X, Y)`` in [0, 1]; regions_hw: ``(X, Y)`` integer ids (0 = outside, no edge
    drawn inside it).
    """
    from skimage.segmentation import mark_boundaries

    _check_pair(image_hw, regions_hw)
    # Small slices are upsampled (nearest) so one-pixel edges do not swamp the anatomy.
    k = max(1, 384 // max(image_hw.shape))
    image = np.clip(radiological(np.asarray(image_hw, dtype=np.float64)), 0, 1)
    regions = radiological(np.asarray(regions_hw, dtype=np.int64))
    image, regions = (np.kron(a, np.ones((k, k), dtype=a.dtype)) for a in (image, regions))
    rgb = mark_boundaries(image, regions, color=color, mode="inner")
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    annotate_slice(ax, np.shape(image_hw), spacing_xy, z_mm, upsample=k)


# ----------------------------------------------------------------- three planes of a volume

#: the planes through a volume, in the order figures show them
PLANES = ("axial", "coronal", "sagittal")

# (viewer's left, right, top, bottom) of each plane's display (see plane_section)
_PLANE_MARKERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"),
                  "sagittal": ("A", "P", "S", "I")}
_FIXED_AXIS = {"axial": "z", "coronal": "y", "sagittal": "x"}


def plane_section(volume_zxy: np.ndarray, plane: str, voxel_xyz: tuple[int, int, int]) -> np.ndarray:
    """The section of a volume through one voxel, in display order ``(rows, columns)``.

    volume_zxy: ``(Z, X, Y)`` in RAS+ (the slice cache's ``(Z, H, W)`` layout); voxel_xyz: the
    voxel's ``(x, y, z)`` indices. Radiological, the patient's right on the viewer's left:
    - axial (z fixed): :func:`radiological` of the slice, rows anterior to posterior,
      columns right to left, ``(Y, X)``;
    - coronal (y fixed): rows superior to inferior, columns right to left, ``(Z, X)``;
    - sagittal (x fixed): rows superior to inferior, columns anterior to posterior, ``(Z, Y)``.
    A view, not a copy.
    """
    volume_zxy = np.asarray(volume_zxy)
    if volume_zxy.ndim != 3:
        raise ValueError(f"plane_section needs a (Z, X, Y) volume, got shape {volume_zxy.shape}")
    x, y, z = voxel_xyz
    shape_xyz = (volume_zxy.shape[1], volume_zxy.shape[2], volume_zxy.shape[0])
    if not all(0 <= i < n for i, n in zip(voxel_xyz, shape_xyz, strict=True)):
        raise ValueError(f"voxel {tuple(voxel_xyz)} (x, y, z) is outside a volume of "
                         f"{shape_xyz[0]} x {shape_xyz[1]} x {shape_xyz[2]} voxels")
    if plane == "axial":
        return radiological(volume_zxy[z])
    if plane == "coronal":
        return volume_zxy[::-1, ::-1, y]
    if plane == "sagittal":
        return volume_zxy[::-1, x, ::-1]
    raise ValueError(f"Illegal plane {plane!r}: one of {PLANES}")


def section_spacing(plane: str, spacing_xyz: tuple[float, float, float]) -> tuple[float, float]:
    """``(row, column)`` spacing in mm of :func:`plane_section`'s display of ``plane``."""
    sx, sy, sz = (float(v) for v in spacing_xyz)
    if not all(v > 0 for v in (sx, sy, sz)):
        raise ValueError(f"Illegal spacing {tuple(spacing_xyz)}: all must be > 0")
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[plane]


def plane_boundaries(image_zxy: np.ndarray, regions_zxy: np.ndarray,
                     spacing_xyz: tuple[float, float, float], voxel_xyz: tuple[int, int, int],
                     plane: str, path: str | os.PathLike, title: str = "",
                     color: tuple[float, float, float] = (1.0, 0.85, 0.0),
                     panel_in: float = 6.0) -> Figure:
    """Write region boundaries (supervoxels) of one plane through a volume to ``path``.

    image_zxy: ``(Z, X, Y)`` grey levels in [0, 1]; regions_zxy: ``(Z, X, Y)`` integer ids
    (0 = outside, no edge drawn inside it); spacing_xyz: voxel size in mm; voxel_xyz and
    plane: the section (:func:`plane_section`, radiological). The section is drawn in mm
    (``extent``), so anisotropic voxels keep their shape: a 3 mm slice is twice as tall as a
    1.5 mm pixel is wide. Boundaries are one display pixel wide on the section upsampled
    (nearest) to about 384 display pixels along its longer side. Orientation markers, a mm
    scale bar and the fixed index ("y = 60 of 120") are drawn on the panel. Returns the
    (closed) figure; its image's extent is ``(0, width_mm, height_mm, 0)``.
    """
    from skimage.segmentation import mark_boundaries

    if np.shape(image_zxy) != np.shape(regions_zxy):
        raise ValueError(f"regions shape {np.shape(regions_zxy)} differs from image shape "
                         f"{np.shape(image_zxy)}")
    image = np.clip(np.asarray(plane_section(image_zxy, plane, voxel_xyz), np.float64), 0, 1)
    regions = np.asarray(plane_section(regions_zxy, plane, voxel_xyz), dtype=np.int64)
    row_mm, col_mm = section_spacing(plane, spacing_xyz)
    height_mm, width_mm = image.shape[0] * row_mm, image.shape[1] * col_mm
    pixel_mm = min(row_mm, col_mm, max(height_mm, width_mm) / 384)
    k_rows, k_cols = max(1, round(row_mm / pixel_mm)), max(1, round(col_mm / pixel_mm))
    image, regions = (np.repeat(np.repeat(a, k_rows, axis=0), k_cols, axis=1)
                      for a in (image, regions))
    rgb = mark_boundaries(image, regions, color=color, mode="inner")
    scale = panel_in / max(height_mm, width_mm)
    fig = new_figure(max(2.0, width_mm * scale), max(1.5, height_mm * scale))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb, interpolation="nearest", extent=(0, width_mm, height_mm, 0))
    ax.set_axis_off()
    style = {"color": "white", "fontsize": 8, "fontweight": "bold", "transform": ax.transAxes}
    left, right, top, bottom = _PLANE_MARKERS[plane]
    for text, x, y, ha, va in ((left, 0.01, 0.5, "left", "center"),
                               (right, 0.99, 0.5, "right", "center"),
                               (top, 0.5, 0.99, "center", "top"),
                               (bottom, 0.5, 0.01, "center", "bottom")):
        ax.text(x, y, text, ha=ha, va=va, **style)
    axis = _FIXED_AXIS[plane]
    size = {"x": np.shape(image_zxy)[1], "y": np.shape(image_zxy)[2], "z": np.shape(image_zxy)[0]}
    ax.text(0.01, 0.99, f"{axis} = {voxel_xyz['xyz'.index(axis)]} of {size[axis]}",
            ha="left", va="top",
            **{**style, "fontweight": "normal"})
    bar_mm = _scale_bar_mm(width_mm)
    x0, y0 = 0.04 * width_mm, 0.93 * height_mm
    ax.plot([x0, x0 + bar_mm], [y0, y0], color="white", linewidth=2.5, solid_capstyle="butt")
    ax.text(x0 + bar_mm / 2, y0 - 0.02 * height_mm, f"{bar_mm} mm", color="white", fontsize=7,
            ha="center", va="bottom")
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    return fig


def montage(images: Sequence[np.ndarray], labels_list: Sequence[np.ndarray | None] | None,
            titles: Sequence[str] | None, path: str | os.PathLike, ncols: int = 4,
            alpha: float = 0.4, panel_in: float = 3.0, boundaries: bool = False,
            label_names: Mapping[str, int] | None = None,
            spacing_xy: tuple[float, float] | None = None,
            z_mm: Sequence[float | None] | None = None) -> Figure:
    """Write a grid of ``(X, Y)`` slices, each optionally with its label overlay, to ``path``.

    images: N slices ``(X, Y)``; labels_list: N label slices or None entries (or None for no
    overlays); titles: N strings or None; ncols: panels per row. Panels share one colour table.
    boundaries: draw the label maps as region boundaries (superpixels) instead of filled colour.
    label_names: ``{name: id}``: a colour legend of the ids (background left out).
    spacing_xy: in-plane voxel size in mm (scale bars); z_mm: N slice positions in mm or None.
    Every panel carries orientation markers. Returns the (closed) figure, for inspection.
    """
    n = len(images)
    if n == 0:
        raise ValueError("montage needs at least one image")
    if ncols < 1:
        raise ValueError(f"Illegal ncols {ncols}: must be >= 1")
    labels_list = list(labels_list) if labels_list is not None else [None] * n
    titles = list(titles) if titles is not None else [""] * n
    if len(labels_list) != n or len(titles) != n:
        raise ValueError(f"montage got {n} images, {len(labels_list)} label maps and "
                         f"{len(titles)} titles: the counts must match")
    n_colors = max((int(np.max(lab)) + 1 for lab in labels_list if lab is not None), default=1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(panel_in * ncols, panel_in * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.set_axis_off()
            continue
        z = z_mm[k] if z_mm is not None else None
        if labels_list[k] is None:
            show_image(ax, images[k], spacing_xy, z_mm=z)
        elif boundaries:
            overlay_boundaries(ax, images[k], labels_list[k], spacing_xy=spacing_xy, z_mm=z)
        else:
            overlay_labels(ax, images[k], labels_list[k], alpha=alpha, spacing_xy=spacing_xy,
                           n_colors=n_colors, z_mm=z)
        if titles[k]:
            ax.set_title(titles[k], fontsize=9)
    if label_names:
        _add_legend(fig, label_names, sorted(i for i in label_names.values() if i > 0))
    save_figure(fig, path)
    return fig


def _add_legend(fig: Figure, label_names: Mapping[str, int], ids: Sequence[int]) -> None:
    """A colour patch per label id below the panels (names from ``label_names``)."""
    if not ids:
        return
    colors = label_colors(max(ids) + 1)
    by_id = {i: n for n, i in label_names.items()}
    handles = [Patch(color=colors[i, :3], label=by_id.get(i, f"label {i}")) for i in ids]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, -0.02))


def prediction_figure(image_hw: np.ndarray, reference_hw: np.ndarray | None,
                      prediction_hw: np.ndarray, path: str | os.PathLike, title: str = "",
                      label_names: Mapping[str, int] | None = None,
                      spacing_xy: tuple[float, float] | None = None, alpha: float = 0.4,
                      z_mm: float | None = None) -> Figure:
    """Write image | reference overlay | prediction overlay of one axial slice, with a legend.

    image_hw, reference_hw, prediction_hw: ``(X, Y)`` slices (reference may be None: two
    panels). label_names: ``{name: id}`` (background may be included; it is not in the legend).
    spacing_xy: in-plane voxel size (mm) so anisotropic pixels are drawn to scale.
    """
    _check_pair(image_hw, prediction_hw)
    panels = [("image", None), ("prediction", prediction_hw)]
    if reference_hw is not None:
        _check_pair(image_hw, reference_hw)
        panels.insert(1, ("reference", reference_hw))
    ids_present = [int(np.max(prediction_hw))]
    if reference_hw is not None:
        ids_present.append(int(np.max(reference_hw)))
    names = dict(label_names or {})
    n_colors = max([*ids_present, *names.values(), 0]) + 1
    vmin, vmax = float(np.min(image_hw)), float(np.max(image_hw))
    fig = new_figure(3.2 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, labels) in zip(axes, panels, strict=True):
        if labels is None:
            show_image(ax, image_hw, spacing_xy, vmin, vmax, z_mm)
        else:
            overlay_labels(ax, image_hw, labels, alpha=alpha, spacing_xy=spacing_xy,
                           n_colors=n_colors, vmin=vmin, vmax=vmax, z_mm=z_mm)
        ax.set_title(name, fontsize=10)
    legend_ids = sorted({i for i in names.values() if i > 0}
                        | {int(i) for i in np.unique(prediction_hw) if i > 0}
                        | ({int(i) for i in np.unique(reference_hw) if i > 0}
                           if reference_hw is not None else set()))
    _add_legend(fig, names, legend_ids)
    if title:
        fig.suptitle(title, fontsize=11)
    save_figure(fig, path)
    return fig


# ----------------------------------------------------------------- RGB arrays (TensorBoard)


def grey_rgb(image_hw: np.ndarray) -> np.ndarray:
    """An ``(Y, X, 3)`` uint8 picture of a [0, 1] ``(X, Y)`` slice, radiological."""
    return (_grey(image_hw) * 255).round().astype(np.uint8)


def _grey(image_hw: np.ndarray) -> np.ndarray:
    grey = np.clip(radiological(np.asarray(image_hw, dtype=np.float64)), 0, 1)
    return np.repeat(grey[..., None], 3, axis=-1)


def regions_rgb(image_hw: np.ndarray, regions_hw: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """An ``(Y, X, 3)`` uint8 picture of region ids over a [0, 1] slice, radiological.

    image_hw, regions_hw: ``(X, Y)``; each region id > 0 gets its fixed colour
    (:func:`label_colors`) at opacity ``alpha`` and its boundary in yellow; id 0 stays grey.
    """
    _check_pair(image_hw, regions_hw)
    rgb = _grey(image_hw)
    regions = np.asarray(radiological(regions_hw)).astype(np.int64)
    colors = label_colors(int(regions.max(initial=0)) + 1)[regions]
    inside = regions > 0
    rgb[inside] = (1 - alpha) * rgb[inside] + alpha * colors[inside, :3]
    edge = np.zeros(regions.shape, dtype=bool)
    edge[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    edge[:-1, :] |= regions[:-1, :] != regions[1:, :]
    rgb[edge & inside] = (1.0, 0.85, 0.0)
    return (rgb * 255).round().astype(np.uint8)


def labels_rgb(image_hw: np.ndarray, labels_hw: np.ndarray, n_colors: int,
               alpha: float = 0.45) -> np.ndarray:
    """An ``(Y, X, 3)`` uint8 picture of label ids (filled, :func:`label_colors`) over a [0, 1]
    slice, radiological; ``n_colors`` fixes the colour table so panels agree."""
    _check_pair(image_hw, labels_hw)
    rgb = _grey(image_hw)
    labels = np.asarray(radiological(labels_hw)).astype(np.int64)
    colors = label_colors(max(n_colors, int(labels.max(initial=0)) + 1))[labels]
    inside = labels > 0
    rgb[inside] = (1 - alpha) * rgb[inside] + alpha * colors[inside, :3]
    return (rgb * 255).round().astype(np.uint8)


def tile_rgb(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Equal-sized ``(H, W, 3)`` uint8 panels as a grid (rows of panels), ``gap`` white pixels
    between them."""
    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + gap) - gap, ncols * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = panel
    return out
