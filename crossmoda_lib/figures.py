"""Figures drawn from files on disk, saved with fixed metadata so that re-runs give identical files.

Images are shown in physical space: each volume is reoriented to LPS (``sitk.DICOMOrient``) and drawn
with its extent in mm, so panels of different grids (0.41 mm London, 0.8 mm Tilburg ceT1, the 0.6 mm
crop) line up and a reader can check that preprocessing kept the anatomy where it was.
"""

from __future__ import annotations

import io as _io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk

from crossmoda_lib import io as cio

LABEL_COLOURS = {1: "#e8453c", 2: "#f6c744"}  # VS red, cochlea yellow


def save_figure(fig: plt.Figure, path: Path | str, formats: tuple[str, ...] = ("png",), dpi: int = 110) -> list[Path]:
    """Save a figure atomically in each format, without timestamps or software versions in metadata.

    Args:
        fig: the figure.
        path: destination without (or with) extension.
        formats: e.g. ``("png", "pdf")``.
        dpi: raster resolution.
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in {".png", ".pdf", ".svg"} else path
    written = []
    for fmt in formats:
        metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}, "svg": {"Date": None, "Creator": None}}[fmt]
        buf = _io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
        written.append(cio.write_bytes_atomic(stem.with_suffix(f".{fmt}"), buf.getvalue()))
    return written


def lps(image: sitk.Image) -> sitk.Image:
    """The image reoriented so that array axes run along +x, +y, +z of LPS (no resampling)."""
    return sitk.DICOMOrient(image, "LPS")


def axial_slice(image: sitk.Image, z_mm: float) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The axial slice nearest to physical z (mm) of an LPS-oriented image and its extent in mm.

    Returns:
        ``(slice array (y, x), extent for imshow: (x0, x1, y1, y0))``.
    """
    sx, sy, sz = image.GetSpacing()
    ox, oy, oz = image.GetOrigin()
    k = int(np.clip(round((z_mm - oz) / sz), 0, image.GetSize()[2] - 1))
    # A copy: a view would borrow the image's memory, and matplotlib keeps the array until it draws.
    arr = np.array(sitk.GetArrayViewFromImage(image)[k])
    nx, ny = image.GetSize()[:2]
    extent = (ox - sx / 2, ox + (nx - 0.5) * sx, oy + (ny - 0.5) * sy, oy - sy / 2)
    return arr, extent


def label_centroid_mm(label: sitk.Image, value: int) -> np.ndarray | None:
    """Physical centroid (mm) of a label value, or None when absent."""
    arr = sitk.GetArrayViewFromImage(label)
    kz, jy, ix = np.nonzero(arr == value)
    if kz.size == 0:
        return None
    index = np.array([ix.mean(), jy.mean(), kz.mean()])
    matrix = np.array(label.GetDirection()).reshape(3, 3) * np.array(label.GetSpacing())
    return np.asarray(label.GetOrigin()) + matrix @ index


def show_slice(ax: plt.Axes, image: sitk.Image, label: sitk.Image | None, z_mm: float, title: str) -> None:
    """Draw the axial slice at z (mm) of an image (any orientation) with label contours, in mm."""
    img = lps(image)
    arr, extent = axial_slice(img, z_mm)
    lo, hi = np.percentile(arr, [1, 99.5])
    ax.imshow(arr, cmap="gray", extent=extent, vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    if label is not None:
        lab_image = lps(label)
        lab, _ = axial_slice(lab_image, z_mm)
        sx, sy, _ = lab_image.GetSpacing()
        ox, oy, _ = lab_image.GetOrigin()
        xs = ox + sx * np.arange(lab.shape[1])
        ys = oy + sy * np.arange(lab.shape[0])
        for value, colour in LABEL_COLOURS.items():
            if (lab == value).any():
                ax.contour(xs, ys, (lab == value).astype(float), levels=[0.5], colors=[colour], linewidths=0.9)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (mm, LPS)", fontsize=8)
    ax.set_ylabel("y (mm)", fontsize=8)
    ax.tick_params(labelsize=7)


def cohort_overview(data_dir: Path | str, cases: dict[str, tuple[str, str | None]]) -> plt.Figure:
    """One panel per case: its image at the VS centroid slice with VS and cochlea contours.

    Args:
        data_dir: the crossMoDA folder.
        cases: title -> (image path, label path or None), relative to ``data_dir``.
    """
    data_dir = Path(data_dir)
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4.4), squeeze=False)
    for ax, (title, (image_rel, label_rel)) in zip(axes[0], cases.items()):
        image = sitk.ReadImage(str(data_dir / image_rel))
        label = sitk.ReadImage(str(data_dir / label_rel)) if label_rel and (data_dir / label_rel).exists() else None
        centre = label_centroid_mm(label, 1) if label is not None else None
        z = centre[2] if centre is not None else float(lps(image).TransformContinuousIndexToPhysicalPoint([0, 0, (image.GetSize()[2] - 1) / 2])[2])
        show_slice(ax, image, label, z, title)
    fig.tight_layout()
    return fig


def before_after(original: sitk.Image, original_label: sitk.Image | None, processed: sitk.Image, processed_label: sitk.Image | None, title: str) -> plt.Figure:
    """Original and preprocessed volumes at the same physical slice, same mm axes, crop outlined."""
    ref = original_label if original_label is not None else None
    centre = label_centroid_mm(ref, 1) if ref is not None else None
    z = centre[2] if centre is not None else float(np.mean([processed.TransformIndexToPhysicalPoint([0, 0, 0])[2], processed.TransformIndexToPhysicalPoint([0, 0, processed.GetSize()[2] - 1])[2]]))
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.6))
    show_slice(axes[0], original, original_label, z, f"{title}: original {_grid_text(original)}")
    show_slice(axes[1], processed, processed_label, z, f"preprocessed {_grid_text(processed)}")
    corners = np.array(
        [
            processed.TransformContinuousIndexToPhysicalPoint([i, j, 0])
            for i, j in ((-0.5, -0.5), (processed.GetSize()[0] - 0.5, -0.5), (processed.GetSize()[0] - 0.5, processed.GetSize()[1] - 0.5), (-0.5, processed.GetSize()[1] - 0.5), (-0.5, -0.5))
        ]
    )
    axes[0].plot(corners[:, 0], corners[:, 1], color="#4fc3f7", lw=1.2, label="crop")
    axes[0].legend(loc="lower right", fontsize=7)
    xlims = [ax.get_xlim() for ax in axes]
    ylims = [ax.get_ylim() for ax in axes]
    for ax in axes:  # the same millimetre window in both panels (y grows downwards)
        ax.set_xlim(min(x[0] for x in xlims), max(x[1] for x in xlims))
        ax.set_ylim(max(y[0] for y in ylims), min(y[1] for y in ylims))
    fig.tight_layout()
    return fig


def _grid_text(image: sitk.Image) -> str:
    size = "x".join(str(v) for v in image.GetSize())
    spacing = "x".join(f"{v:.2f}" for v in image.GetSpacing())
    return f"{size} @ {spacing} mm"


def image_grid(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], vmin: float = 0.0, vmax: float = 1.0) -> plt.Figure:
    """A grid of 2D images: one row per entry ``(row title, [(panel title, array), ...])``."""
    n_cols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(3.0 * n_cols, 3.0 * len(rows)), squeeze=False)
    for r, (row_title, panels) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(panels):
                title, arr = panels[c]
                ax.imshow(arr, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
                ax.set_title(title, fontsize=8)
        axes[r, 0].text(-0.04, 0.5, row_title, transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def loss_curves(history, columns: tuple[str, ...], title: str) -> plt.Figure:
    """Loss curves (one axis per group of columns sharing a prefix) from a loss-history table."""
    groups: dict[str, list[str]] = {}
    for col in columns:
        groups.setdefault(col.split("_")[0], []).append(col)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.0 * len(groups), 3.2), squeeze=False)
    for ax, (name, cols) in zip(axes[0], groups.items()):
        for col in cols:
            ax.plot(history["iteration"], history[col], label=col)
        ax.set_xlabel("iteration")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def label_panels(rows: list[tuple[str, list[tuple[str, np.ndarray, np.ndarray | None]]]], size: float = 3.0) -> plt.Figure:
    """A grid of images with label contours (red VS, yellow cochlea): one row per
    ``(row title, [(panel title, image, label or None), ...])``."""
    n_cols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(size * n_cols, size * len(rows)), squeeze=False)
    for r, (row_title, panels) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(panels):
                continue
            title, image, lab = panels[c]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title if lab is not None else f"{title} (none)", fontsize=8)
            for value, colour in LABEL_COLOURS.items():
                if lab is not None and (lab == value).any():
                    ax.contour((lab == value).astype(float), levels=[0.5], colors=[colour], linewidths=0.9)
        axes[r, 0].text(-0.04, 0.5, row_title, transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def overlay_grid(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]) -> plt.Figure:
    """Per row: the image with predicted contours, and (when given) with the ground-truth contours."""
    return label_panels([(title, [("prediction", image, pred), ("ground truth", image, truth)]) for title, image, pred, truth in rows], size=3.8)
