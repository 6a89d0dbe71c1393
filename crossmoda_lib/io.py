"""Reading, writing and validating crossMoDA 2022 data.

Every stage calls :func:`validate_dataset` (or :func:`check_image_file` for loose files) before any
long work, so that a bad file is reported by name *before* hours of training, never silently used.

Why the gzip stream and the voxel bytes are checked by hand: SimpleITK (through niftilib's znzlib)
reads a truncated ``.nii.gz`` without complaint and fills the missing voxels with zeros, and ITK's
NIfTI reader turns NaN voxels into 0 (tests/test_io.py shows both). We therefore inflate the whole
stream with :mod:`zlib` first, which verifies the deflate data and the gzip CRC32 and length trailer.
The NIfTI-1 header is parsed from the same bytes (spacing sign, dimensionality, ``scl_slope``), so
problems that ITK would silently "fix" (negative pixdim is read as its absolute value) are reported.

Writes are atomic: the image goes to a temporary file in the destination folder and is renamed into
place, so an interrupted run never leaves a half-written file that looks whole.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: Name pattern of crossMoDA 2022 files (DESIGN.md section 3.1).
NAME_PATTERN = re.compile(r"^crossmoda(2021|2022)_(ldn|etz)_([0-9]+)_(ceT1|hrT2|Label)\.nii\.gz$")
#: The same with any Unicode digits (``\d``), to name a case number written in other digits.
_ANY_DIGITS = re.compile(r"^crossmoda(2021|2022)_(ldn|etz)_(\d+)_(ceT1|hrT2|Label)\.nii\.gz$")
#: Ground-truth labels of hrT2 volumes (synthetic cohort, or any truth folder).
TRUTH_PATTERN = re.compile(r"^crossmoda(2021|2022)_(ldn|etz)_([0-9]+)_hrT2_Label\.nii\.gz$")
#: Splits of the 2022 layout and the modality each holds.
SPLITS: dict[str, str] = {
    "training_source": "ceT1",
    "training_target": "hrT2",
    "validation": "hrT2",
    "test": "hrT2",
}
#: Splits a data folder may leave out. ``test`` is a held-out hrT2 split with truth that only a
#: synthetic cohort (or a user's own labelled data) has: the demo reports on it, and chooses no
#: setting by it (docs/results.md). The challenge's own test set is hidden.
OPTIONAL_SPLITS = ("test",)
CENTRES = {"ldn": "London", "etz": "Tilburg"}
LABEL_VALUES = {0: "background", 1: "VS", 2: "cochlea"}

#: Geometry tolerances for image/label agreement (ITK's own default is 1e-6 relative to spacing,
#: too strict for files written by different tools; 1e-3 mm or 1e-4 of a voxel is far below any
#: resampling effect).
SPACING_RTOL = 1e-4
ORIGIN_ATOL_VOXELS = 1e-3
DIRECTION_ATOL = 1e-4
OBLIQUE_ATOL = 1e-3

_GZIP_CHUNK = 1 << 20


class DataError(ValueError):
    """Raised when input data is invalid; the message lists every problem, each naming its file."""


@dataclass(frozen=True)
class Problem:
    """One finding of a validation: a file (or folder), a reason, and whether it is fatal."""

    path: str
    reason: str
    fatal: bool = True

    def __str__(self) -> str:
        kind = "ERROR" if self.fatal else "WARNING"
        return f"{kind} {self.path}: {self.reason}"


@dataclass
class NiftiHeader:
    """The fields of a NIfTI-1 header that validation needs."""

    dims: tuple[int, ...]
    pixdim: tuple[float, ...]
    datatype: int
    scl_slope: float
    scl_inter: float
    qform_code: int
    sform_code: int
    vox_offset: int

    @property
    def scaled(self) -> bool:
        """True when stored values are rescaled on reading (slope not 0/1 or intercept not 0)."""
        slope_is_identity = self.scl_slope in (0.0, 1.0) or not np.isfinite(self.scl_slope)
        return not slope_is_identity or (np.isfinite(self.scl_inter) and self.scl_inter != 0.0)


@dataclass
class FileInfo:
    """What validation learnt about one readable image file."""

    path: Path
    split: str
    case: str
    centre: str
    modality: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    labels: tuple[int, ...] = ()


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_dataset`: problems (errors and warnings) and per-file facts."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    files: list[FileInfo] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.fatal]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, path: Path | str, reason: str, fatal: bool = True) -> None:
        self.problems.append(Problem(str(path), reason, fatal))

    def raise_if_errors(self) -> None:
        """Raise :class:`DataError` listing every error (warnings are not fatal)."""
        if self.errors:
            lines = "\n".join(str(p) for p in self.errors)
            raise DataError(f"{len(self.errors)} problem(s) in {self.root}:\n{lines}")

    def summary(self) -> str:
        """A short human-readable summary: cases per split and centre, spacings and shapes."""
        lines = [f"crossMoDA data at {self.root}"]
        for split, modality in SPLITS.items():
            infos = [f for f in self.files if f.split == split and f.modality == modality]
            lines.append(f"  {split}: {len(infos)} {modality} volume(s)")
            for centre in sorted({f.centre for f in infos}):
                sub = [f for f in infos if f.centre == centre]
                spacings = sorted({tuple(round(s, 3) for s in f.spacing) for f in sub})
                shapes = sorted({f.size for f in sub})
                lines.append(
                    f"    {centre}: {len(sub)} case(s); spacings (mm) {_fmt_set(spacings)}; "
                    f"shapes {_fmt_set(shapes)}"
                )
        truth = [f for f in self.files if f.split == "synthetic_truth"]
        if truth:
            lines.append(f"  synthetic_truth: {len(truth)} hrT2 label(s)")
        lines.append(f"  {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(lines)


def _fmt_set(items: list[tuple]) -> str:
    shown = ", ".join("x".join(str(v) for v in it) for it in items[:4])
    return shown + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")


def parse_case_name(name: str) -> tuple[str, str, str] | None:
    """Split a crossMoDA file name into (case id, centre code, modality); None if it does not match.

    Args:
        name: a file name such as ``crossmoda2022_etz_12_ceT1.nii.gz``.

    Returns:
        ``("crossmoda2022_etz_12", "etz", "ceT1")`` or None.
    """
    m = NAME_PATTERN.match(name)
    if not m:
        return None
    return f"crossmoda{m.group(1)}_{m.group(2)}_{m.group(3)}", m.group(2), m.group(4)


def centre_of(case: str) -> str:
    """London or Tilburg, from a case id or file name."""
    for code, centre in CENTRES.items():
        if f"_{code}_" in case:
            return centre
    raise ValueError(f"{case}: not a crossMoDA case name (no _ldn_ or _etz_)")


# --------------------------------------------------------------------------------------------------
# Low-level file checks
# --------------------------------------------------------------------------------------------------


def read_gzip_checked(path: Path) -> bytes:
    """Inflate a whole gzip file, verifying its deflate stream, CRC32 and length trailer.

    Args:
        path: a ``.gz`` file.

    Returns:
        The decompressed bytes.

    Raises:
        DataError: the file is not gzip, is corrupt, or is truncated (message names the file).
    """
    try:
        with gzip.open(path, "rb") as fh:
            chunks = []
            while chunk := fh.read(_GZIP_CHUNK):
                chunks.append(chunk)
    except EOFError:
        raise DataError(f"{path}: truncated gzip stream (the file ends before the gzip trailer)") from None
    except gzip.BadGzipFile as exc:
        raise DataError(f"{path}: corrupt gzip ({exc})") from exc
    except (zlib.error, OSError) as exc:
        raise DataError(f"{path}: corrupt gzip ({exc})") from exc
    return b"".join(chunks)


def parse_nifti1_header(raw: bytes, path: Path | str = "<bytes>") -> NiftiHeader:
    """Parse the fields of a NIfTI-1 header that validation uses.

    Args:
        raw: the decompressed file (at least the first 348 bytes).
        path: for error messages.

    Raises:
        DataError: not a NIfTI-1 header (wrong ``sizeof_hdr`` in either byte order) or too short.
    """
    if len(raw) < 348:
        raise DataError(f"{path}: too short for a NIfTI header ({len(raw)} bytes)")
    for endian in "<>":
        if struct.unpack(endian + "i", raw[:4])[0] == 348:
            break
    else:
        if struct.unpack("<i", raw[:4])[0] == 540:
            raise DataError(f"{path}: NIfTI-2 files are not supported; convert to NIfTI-1")
        raise DataError(f"{path}: not a NIfTI-1 file (sizeof_hdr is not 348)")
    dims = struct.unpack(endian + "8h", raw[40:56])
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    pixdim = struct.unpack(endian + "8f", raw[76:108])
    slope, inter = struct.unpack(endian + "2f", raw[112:120])
    qform, sform = struct.unpack(endian + "2h", raw[252:256])
    vox_offset = struct.unpack(endian + "f", raw[108:112])[0]
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise DataError(f"{path}: invalid NIfTI dim[0] = {ndim}")
    return NiftiHeader(
        dims=tuple(int(d) for d in dims[1 : ndim + 1]),
        pixdim=tuple(float(p) for p in pixdim[1 : ndim + 1]),
        datatype=int(datatype),
        scl_slope=float(slope),
        scl_inter=float(inter),
        qform_code=int(qform),
        sform_code=int(sform),
        vox_offset=int(vox_offset),
    )


def _nifti_data_bytes(header: NiftiHeader) -> int:
    bits = {2: 8, 4: 16, 8: 32, 16: 32, 64: 64, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64}
    nbits = bits.get(header.datatype)
    if nbits is None:
        return -1
    return int(np.prod(header.dims, dtype=np.int64)) * nbits // 8


def check_image_file(path: Path, *, is_label: bool = False) -> tuple[sitk.Image | None, list[Problem]]:
    """Check one NIfTI file and read it.

    Checks, in order: gzip integrity (truncation, corruption), NIfTI-1 header, dimensionality (3D, or
    4D with a singleton 4th axis), spacing > 0, data length, readability by SimpleITK, finite values,
    not constant (images), integer values in {0, 1, 2} (labels). Warnings: oblique direction, scaled
    integer storage, empty label.

    Args:
        path: the ``.nii.gz`` (or ``.nii``) file.
        is_label: check label values instead of image contrast.

    Returns:
        The image (3D; None when it could not be read) and the problems found.
    """
    path = Path(path)
    problems: list[Problem] = []

    def fail(reason: str) -> tuple[None, list[Problem]]:
        problems.append(Problem(str(path), reason))
        return None, problems

    if not path.is_file():
        return fail("missing or not a regular file")
    try:
        raw = read_gzip_checked(path) if path.name.endswith(".gz") else path.read_bytes()
        header = parse_nifti1_header(raw, path)
    except DataError as exc:
        return fail(str(exc).split(": ", 1)[1])
    dims = header.dims
    if len(dims) == 4 and dims[3] == 1:
        dims = dims[:3]
    if len(dims) != 3:
        return fail(f"not a 3D volume (dimensions {'x'.join(map(str, header.dims))})")
    if any(d < 1 for d in dims):
        return fail(f"invalid size {'x'.join(map(str, dims))}")
    spacing = header.pixdim[:3]
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        return fail(f"zero, negative or non-finite voxel spacing {tuple(round(s, 4) for s in spacing)}")
    expected = _nifti_data_bytes(header)
    if expected > 0 and len(raw) < header.vox_offset + expected:
        return fail(f"data too short ({len(raw) - header.vox_offset} bytes for {expected} expected)")
    float_dtype = {16: "f4", 64: "f8"}.get(header.datatype)
    if float_dtype:  # ITK reads NaN as 0: check the stored values themselves
        endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
        stored = np.frombuffer(raw, dtype=endian + float_dtype, count=expected // int(float_dtype[1]), offset=header.vox_offset)
        finite = np.isfinite(stored)
        if not finite.all():
            n_nan = int(np.isnan(stored).sum())
            return fail(f"non-finite voxels ({n_nan} NaN, {int((~finite).sum()) - n_nan} Inf)")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        return fail(f"unreadable by SimpleITK ({first})")
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    arr = sitk.GetArrayViewFromImage(image)
    if is_label:
        if arr.dtype.kind == "f":
            if not np.all(arr == np.round(arr)):
                return fail("label values are not integers")
        values = np.unique(arr)
        bad = [v for v in values.tolist() if v not in LABEL_VALUES]
        if bad:
            return fail(f"label values {bad[:5]} outside {{0, 1, 2}}")
        if values.size == 1 and values[0] == 0:
            problems.append(Problem(str(path), "empty label (no VS, no cochlea)", fatal=False))
    else:
        if float(arr.min()) == float(arr.max()):
            return fail(f"constant image (every voxel is {float(arr.min()):g})")
    if header.scaled:
        problems.append(
            Problem(
                str(path),
                f"scaled integer storage (scl_slope={header.scl_slope:g}, scl_inter={header.scl_inter:g}); "
                "values are rescaled on reading",
                fatal=False,
            )
        )
    if is_oblique(image):
        problems.append(Problem(str(path), "oblique direction cosines (not axis-aligned)", fatal=False))
    return image, problems


def is_oblique(image: sitk.Image) -> bool:
    """True when the direction matrix is not a signed permutation (within :data:`OBLIQUE_ATOL`)."""
    d = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    return not np.allclose(np.sort(d, axis=1)[:, :2], 0.0, atol=OBLIQUE_ATOL)


def geometry_mismatch(a: sitk.Image, b: sitk.Image) -> str | None:
    """Describe how two images' grids differ (size, spacing, origin, direction), or None if they agree.

    Tolerances: spacing relative 1e-4; origin 1e-3 of a voxel; direction cosines 1e-4.
    """
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.allclose(sa, sb, rtol=SPACING_RTOL, atol=0):
        return f"spacing {tuple(np.round(sa, 5))} vs {tuple(np.round(sb, 5))} mm"
    oa, ob = np.array(a.GetOrigin()), np.array(b.GetOrigin())
    if np.any(np.abs(oa - ob) > ORIGIN_ATOL_VOXELS * sa):
        return f"origin {tuple(np.round(oa, 4))} vs {tuple(np.round(ob, 4))} mm"
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=DIRECTION_ATOL):
        return "direction cosines differ"
    return None


# --------------------------------------------------------------------------------------------------
# Dataset validation
# --------------------------------------------------------------------------------------------------


def _geometry(image: sitk.Image) -> dict:
    return {
        "size": tuple(int(v) for v in image.GetSize()),
        "spacing": tuple(float(v) for v in image.GetSpacing()),
        "origin": tuple(float(v) for v in image.GetOrigin()),
        "direction": tuple(float(v) for v in image.GetDirection()),
    }


def validate_dataset(root: Path | str, *, check_truth: bool = True) -> ValidationReport:
    """Validate a folder in the crossMoDA 2022 layout; never stops half way and writes nothing.

    Errors: missing folder or empty split; file names not matching the pattern or the split's
    modality; every per-file error of :func:`check_image_file`; a ceT1 without its Label (or a Label
    without its ceT1); image/label geometry mismatch. Warnings: empty labels, oblique directions,
    scaled integer storage, cases missing from ``infos_source_training.csv``.

    Args:
        root: the data folder (holding ``training_source/``, ``training_target/``, ``validation/``,
            and optionally ``test/``: :data:`OPTIONAL_SPLITS`).
        check_truth: also validate ``synthetic_truth/`` when it exists.

    Returns:
        A :class:`ValidationReport`.
    """
    root = Path(root)
    report = ValidationReport(root=root)
    if not root.is_dir():
        report.add(root, "data folder does not exist")
        return report
    hrt2_images: dict[str, sitk.Image] = {}
    split_of: dict[str, str] = {}  # case -> the split it was first seen in
    numbered: dict[tuple[str, str, int], str] = {}  # (year, centre, number) -> case as written
    for split, modality in SPLITS.items():
        folder = root / split
        if not folder.is_dir():
            if split not in OPTIONAL_SPLITS:
                report.add(folder, "missing split folder")
            continue
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        if not names:
            report.add(folder, "empty split (no files)")
            continue
        images: dict[str, sitk.Image] = {}
        labels: dict[str, Path] = {}
        for name in names:
            path = folder / name
            parsed = parse_case_name(name)
            if parsed is None:
                if _ANY_DIGITS.match(name):
                    report.add(path, "the case number has non-ASCII digits; write it with 0-9")
                else:
                    report.add(path, "name does not match crossmoda(2021|2022)_(ldn|etz)_<n>_(ceT1|hrT2|Label).nii.gz")
                continue
            case, centre_code, kind = parsed
            if kind == "Label":
                if split != "training_source":
                    report.add(path, f"labels do not belong in {split}/")
                    continue
                labels[case] = path
                continue
            if kind != modality:
                report.add(path, f"{kind} file in {split}/ (expected {modality})")
                continue
            if split_of.setdefault(case, split) != split:
                report.add(path, f"case {case} is also in {split_of[case]}/: one case in two splits would be trained on and scored (a leak)")
                continue
            year_centre_number = (case[9:13], centre_code, int(case.rsplit("_", 1)[1]))
            if numbered.setdefault(year_centre_number, case) != case:
                report.add(path, f"case {case} and {numbered[year_centre_number]} are the same number written two ways (leading zeros); keep one spelling")
                continue
            image, probs = check_image_file(path)
            report.problems.extend(probs)
            if image is None:
                continue
            images[case] = image
            g = _geometry(image)
            report.files.append(FileInfo(path, split, case, CENTRES[centre_code], modality, **g))
            if modality == "hrT2":
                hrt2_images[case] = image
        if split == "training_source":
            _check_labels(report, folder, images, labels, split)
    truth = root / "synthetic_truth"
    if check_truth and truth.is_dir():
        _check_truth(report, truth, hrt2_images)
    _check_infos(report, root)
    return report


def _check_labels(
    report: ValidationReport, folder: Path, images: dict[str, sitk.Image], labels: dict[str, Path], split: str
) -> None:
    """Pair ceT1 images with their labels and check label content and geometry."""
    for case in sorted(set(labels) - set(images)):
        if not (folder / f"{case}_ceT1.nii.gz").exists():
            report.add(labels[case], "Label without its ceT1 image")
    for case, image in sorted(images.items()):
        if case not in labels:
            report.add(folder / f"{case}_ceT1.nii.gz", f"ceT1 without its Label ({case}_Label.nii.gz missing)")
            continue
        _check_label_against(report, labels[case], image, split, "ceT1")


def _check_label_against(report: ValidationReport, path: Path, image: sitk.Image, split: str, modality: str) -> None:
    label, probs = check_image_file(path, is_label=True)
    report.problems.extend(probs)
    if label is None:
        return
    mismatch = geometry_mismatch(image, label)
    if mismatch:
        report.add(path, f"geometry differs from its {modality} image: {mismatch}")
        return
    values = tuple(int(v) for v in np.unique(sitk.GetArrayViewFromImage(label)))
    parsed = TRUTH_PATTERN.match(path.name) or NAME_PATTERN.match(path.name)
    case = f"crossmoda{parsed.group(1)}_{parsed.group(2)}_{parsed.group(3)}"
    report.files.append(
        FileInfo(path, split, case, centre_of(case), "Label", labels=values, **_geometry(label))
    )


def _check_truth(report: ValidationReport, truth: Path, hrt2_images: dict[str, sitk.Image]) -> None:
    root = truth.parent
    for path in sorted(p for p in truth.iterdir() if not p.name.startswith(".")):
        m = TRUTH_PATTERN.match(path.name)
        if not m:
            report.add(path, "name does not match <case>_hrT2_Label.nii.gz")
            continue
        case = f"crossmoda{m.group(1)}_{m.group(2)}_{m.group(3)}"
        if case not in hrt2_images:
            if not any((root / split / f"{case}_hrT2.nii.gz").exists() for split, modality in SPLITS.items() if modality == "hrT2"):
                report.add(path, "truth label without a matching hrT2 in training_target/, validation/ or test/")
            continue
        _check_label_against(report, path, hrt2_images.pop(case), "synthetic_truth", "hrT2")
    for case in sorted(hrt2_images):
        report.add(truth, f"no truth label for {case} ({case}_hrT2_Label.nii.gz)", fatal=False)


def _check_infos(report: ValidationReport, root: Path) -> None:
    infos = root / "infos_source_training.csv"
    if not infos.exists():
        return
    import csv

    try:
        with infos.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        report.add(infos, f"unreadable CSV ({exc})")
        return
    if not rows or not {"crossmoda_name", "koos"} <= set(rows[0]):
        report.add(infos, "expected columns crossmoda_name, koos")
        return
    known = {r["crossmoda_name"] for r in rows}
    for f in report.files:
        if f.split == "training_source" and f.modality == "ceT1" and f.case not in known:
            report.add(infos, f"no Koos grade for {f.case}", fatal=False)


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


class WriteError(OSError):
    """An output could not be written whole (a full disk, a file-size limit, a failed rename); the
    message names the file. Nothing is left in its place: the previous file, if any, is untouched."""


#: Temporary siblings of outputs being written (``.<name>.<random>.partial<suffix>``) and of
#: folders being built (``.<name>.partial-<random>``): left only by a killed process, never read.
PARTIAL_GLOBS = (".*.partial*",)


def _temp_sibling(path: Path, suffix: str) -> Path:
    # What a killed writer of this same file left (a SIGTERM or SIGKILL skips the cleanup below):
    # the new write replaces it, so partial files do not pile up across reruns.
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.partial{glob_escape(suffix)}"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters made literal."""
    import glob

    return glob.escape(text)


class FolderLocked(DataError):
    """Another process works in the folder; the message names it (pid, command, since when)."""


class folder_lock:
    """Hold ``<folder>/.lock`` exclusively while a run works in ``folder`` (``with folder_lock(out):``).

    A second run on the same folder is refused at once with a message that names the holder, rather
    than both doing all the work while one deletes what the other reads. The lock is the kernel's
    (``flock``): it ends with its holder however the holder ends, SIGKILL included, so a killed run
    never leaves a lock behind. Processes the holder starts do not hold it. ``name``: the lock file
    (in ``folder``); ``wait``: wait for the holder to finish instead of refusing (for short work,
    such as generating a data folder that two runs share).
    """

    def __init__(self, folder: Path | str, what: str = "a run", *, name: str = ".lock", wait: bool = False) -> None:
        self.folder, self.what, self.name, self.wait, self.fh = Path(folder), what, name, wait, None

    def __enter__(self) -> folder_lock:
        import fcntl
        import json as _json
        import sys
        import time as _time

        if self.folder.exists() and not self.folder.is_dir():
            raise DataError(f"{self.folder}: is a file; the output must be a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.name
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "{}"
            fh.close()
            try:
                info = _json.loads(holder)
            except ValueError:
                info = {}
            raise FolderLocked(
                f"{self.folder}: another process works in this folder (pid {info.get('pid', '?')}, "
                f"{info.get('what', 'a run')}, since {info.get('since', '?')}: {info.get('command', '?')}); "
                "wait for it to end, or stop it, then run again"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(_json.dumps({"pid": os.getpid(), "what": self.what, "since": _time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}) + "\n")
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            self.fh.seek(0)
            self.fh.truncate()
            self.fh.close()  # releases the flock
            self.fh = None


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path | str, *, folder: bool = False) -> None:
    """Give a file made by :func:`tempfile.mkstemp` (always 0600) or a folder made by
    :func:`tempfile.mkdtemp` (0700) the mode an ordinary ``open``/``mkdir`` would have given it."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def remove_partials(folder: Path | str) -> list[Path]:
    """Delete what killed writers left under ``folder`` (recursively): temporary files and folders
    matching :data:`PARTIAL_GLOBS`. Call it only where no other writer works (a run holds the
    folder's lock, :func:`crossmoda_lib.runs.output_lock`). Returns what was removed."""
    import shutil

    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for pattern in PARTIAL_GLOBS:
        for path in sorted(folder.rglob(pattern), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _commit(tmp: Path, path: Path) -> None:
    """Rename a verified temporary file into place with the umask's mode."""
    apply_umask(tmp)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(f"{path}: could not move the written file into place ({exc})") from exc


@contextlib.contextmanager
def _staged(path: Path, suffix: str | None = None) -> Iterator[Path]:
    """The temporary sibling that a block writes ``path`` through: renamed into place (with the
    umask's mode) when the block ends without an error, removed in every case. Parent folders are
    created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, path.suffix if suffix is None else suffix)
    try:
        yield tmp
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _squeezed(size: tuple[int, ...]) -> tuple[int, ...]:
    """A size without trailing singleton axes past the third (ITK reads x*y*z*1 back as x*y*z)."""
    size = tuple(size)
    while len(size) > 3 and size[-1] == 1:
        size = size[:-1]
    return size


def _verify_image(tmp: Path, path: Path, image: sitk.Image) -> None:
    """Read back what was written: SimpleITK reports a short write (a full disk) on stderr and does
    not raise, which would leave an empty or truncated NIfTI that looks finished."""
    problem = None
    try:
        back = sitk.ReadImage(str(tmp)) if tmp.stat().st_size else None
        if back is None:
            problem = "0 bytes written"
        elif _squeezed(back.GetSize()) != _squeezed(image.GetSize()) or back.GetPixelID() != image.GetPixelID():
            problem = f"read back as {back.GetSize()} {back.GetPixelIDTypeAsString()}, not {image.GetSize()} {image.GetPixelIDTypeAsString()}"
        else:
            ours, theirs = sitk.GetArrayViewFromImage(image).ravel(), sitk.GetArrayViewFromImage(back).ravel()
            if np.issubdtype(ours.dtype, np.floating):  # ITK reads NaN back as 0 (tests/test_io.py)
                finite = np.isfinite(ours)
                ours, theirs = ours[finite], theirs[finite]
            if not np.array_equal(ours, theirs):
                problem = "voxels read back differ from those written"
    except (RuntimeError, OSError) as exc:
        problem = f"cannot be read back ({str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__})"
    if problem:
        raise WriteError(f"{path}: writing failed: {problem}; is the disk full? Nothing was written in its place")


def write_image(image: sitk.Image, path: Path | str, *, compress: bool = True) -> Path:
    """Write an image atomically (temporary file in the same folder, read back, then rename).

    Args:
        image: the image.
        path: destination (``.nii.gz`` or ``.nii``); parent folders are created.
        compress: gzip the data (byte-identical output for identical input).

    Raises:
        WriteError: the file could not be written whole (checked by reading it back).
    """
    path = Path(path)
    with _staged(path, ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            raise WriteError(f"{path}: writing failed ({str(exc).strip().splitlines()[-1]})") from exc
        _verify_image(tmp, path, image)
    return path


def write_scaled_nifti(image: sitk.Image, path: Path | str, slope: float, inter: float = 0.0) -> Path:
    """Write an integer image with NIfTI ``scl_slope``/``scl_inter`` set, atomically.

    SimpleITK always writes slope 1; Philips-like files (Tilburg) store raw integers with a scaling.
    The header fields are patched in the uncompressed stream and the result gzipped with mtime 0, so
    output bytes are deterministic. Reading the file returns ``stored * slope + inter``.

    Args:
        image: the *stored* integer image.
        path: destination ``.nii.gz``.
        slope: ``scl_slope``.
        inter: ``scl_inter``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw_tmp = _temp_sibling(path, ".nii")
    try:
        sitk.WriteImage(image, str(raw_tmp), False)
        raw = bytearray(raw_tmp.read_bytes())
    finally:
        raw_tmp.unlink(missing_ok=True)
    expected = 352 + image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * np.dtype(sitk.GetArrayViewFromImage(image).dtype).itemsize
    if len(raw) < expected:  # SimpleITK reports a short write on stderr only
        raise WriteError(f"{path}: writing failed: {len(raw)} of {expected} bytes written; is the disk full? Nothing was written in its place")
    raw[112:120] = struct.pack("<2f", slope, inter)
    write_bytes_atomic(path, gzip.compress(bytes(raw), compresslevel=6, mtime=0))
    return path


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    """Write bytes atomically (temporary sibling file, size checked, then rename).

    Raises:
        WriteError: the bytes could not all be written (a full disk); nothing is left in their place.
    """
    path = Path(path)
    with _staged(path) as tmp:
        try:
            _write_synced(tmp, lambda fh: fh.write(data))
        except OSError as exc:
            raise WriteError(f"{path}: writing failed ({exc.strerror or exc}); is the disk full? Nothing was written in its place") from exc
        if tmp.stat().st_size != len(data):
            raise WriteError(f"{path}: writing failed: {tmp.stat().st_size} of {len(data)} bytes written")
    return path


def _write_synced(tmp: Path, write) -> None:
    """``write(file)`` into ``tmp``, then flush and fsync: the bytes are on the disk (or an OSError)."""
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def save_torch_atomic(path: Path | str, payload: object) -> Path:
    """``torch.save`` atomically (temporary sibling, archive verified, then rename): checkpoints are
    never half written.

    Raises:
        WriteError: the checkpoint could not be written whole; the previous one is untouched.
    """
    import zipfile

    import torch

    path = Path(path)
    with _staged(path) as tmp:
        try:
            torch.save(payload, tmp)
            with zipfile.ZipFile(tmp) as archive:  # torch's format: every member's CRC is checked
                bad = archive.testzip()
        except (OSError, RuntimeError, zipfile.BadZipFile) as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise WriteError(f"{path}: writing the checkpoint failed ({reason}); is the disk full? The previous checkpoint is untouched") from exc
        if bad is not None:
            raise WriteError(f"{path}: the checkpoint was written corrupt (member {bad}); the previous one is untouched")
    return path


def save_npy_atomic(path: Path | str, array: np.ndarray) -> Path:
    """``np.save`` atomically, read back (memory-mapped: shape and dtype) before the rename.

    Raises:
        WriteError: the array could not be written whole (a full disk).
    """
    path = Path(path)
    with _staged(path, ".npy") as tmp:
        try:
            _write_synced(tmp, lambda fh: np.save(fh, np.ascontiguousarray(array)))
            back = np.load(tmp, mmap_mode="r")
            whole = back.shape == array.shape and back.dtype == array.dtype
            del back
        except (OSError, ValueError) as exc:
            raise WriteError(f"{path}: writing failed ({exc}); is the disk full? Nothing was written in its place") from exc
        if not whole:
            raise WriteError(f"{path}: writing failed: the array read back is not the one written")
    return path


def load_checkpoint(path: Path | str) -> dict:
    """``torch.load`` of a checkpoint this project wrote (on the CPU), with an error that names the file.

    Raises:
        DataError: the file is missing, truncated or not a checkpoint.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable checkpoint ({reason}); it is truncated or was not written by this project. Delete it (its stage retrains) or restore it") from exc


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def truth_label_path(root: Path | str, case: str) -> Path:
    """The ground-truth label of hrT2 case ``case`` under ``root/synthetic_truth/``.

    ``case`` is a case name (``crossmoda_<centre>_<id>``) or the file name of its hrT2
    (``..._hrT2.nii.gz``). ``root`` is a dataset folder or stage 01's output; only a synthetic cohort
    has such a folder, so callers check that the file exists.
    """
    case = Path(case).name.removesuffix(".nii.gz").removesuffix("_hrT2")
    return Path(root) / "synthetic_truth" / f"{case}_hrT2_Label.nii.gz"


def folder_stamps(root: Path | str) -> dict[str, list[int]]:
    """``{relative path: [size, modification time in ns]}`` of every NIfTI and CSV of a data folder's
    splits and truth: what a stage that keeps finished outputs compares to notice a replaced input."""
    root = Path(root)
    stamps = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and (path.name.endswith(".nii.gz") or path.suffix == ".csv"):
            st = path.stat()
            stamps[path.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns]
    return stamps


def iter_split(root: Path | str, split: str) -> Iterable[tuple[str, Path]]:
    """Yield ``(case, image path)`` of one split's images in name order."""
    modality = SPLITS[split]
    for path in sorted((Path(root) / split).glob(f"*_{modality}.nii.gz")):
        parsed = parse_case_name(path.name)
        if parsed:
            yield parsed[0], path
