"""A synthetic crossMoDA 2022 cohort with ground truth for every hrT2, generated from a seed.

Why: the real data needs registration and a download, has no hrT2 labels, and is too large for a
laptop course. This cohort has the real layout and names, a real domain gap (ceT1 vs hrT2 contrast,
two centres with different grids, intensity scales, noise, bias and storage), the difficulties the
paper targets (small and large heterogeneous VS, faint cochleae on ceT1, bright unlabelled
distractors on hrT2), and a label for every hrT2 in ``synthetic_truth/``.

How: anatomy is a set of implicit shapes (lumpy ellipsoids, capsules, tori) in a *head frame* in mm:
x from the patient's right to left, y anterior to posterior, z inferior to superior, origin between
the two internal auditory canals. Every subject draws its own shape parameters and head pose. Each
case is sampled on its centre's own voxel grid: a shape's signed distance ``d`` (mm) at a voxel
centre gives the partial-volume fraction ``clip(0.5 - d / w, 0, 1)`` with ``w`` the voxel's extent
along the surface normal (the exact fraction for a planar interface crossing a box along one axis,
a first-order model otherwise); labels are the voxels whose centre lies inside (nearest-neighbour
sampling of the continuous shape). Intensities are tissue contrasts per modality, a smooth texture in
the tumour, a multiplicative bias field and Rician noise.

All randomness derives from ``numpy.random.default_rng([seed, centre, split, index])``: the same
seed gives identical arrays, and a case is the same subject whatever the cohort size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from crossmoda_lib import io as cio

#: Bumped whenever the same seed would give different images (an older cohort is refused, not mixed in).
#: 1.1: cortical bone is signal void on ceT1 (0.10 -> 0.03), as on every conventional sequence.
GENERATOR_VERSION = "1.1"
#: The ``generator`` field of a cohort's ``manifest.json``.
GENERATOR = "crossmoda_lib.synth"

# Thresholds of the paper (papers/000 section 2): small VS < 288 mm3, large VS > 2340 mm3.
SMALL_VS_MM3 = 288.0
LARGE_VS_MM3 = 2340.0

#: Relative tissue intensities (hrT2, ceT1) before the centre's scale. CSF and labyrinth fluid are
#: bright on hrT2 and dark on ceT1; the VS enhances on ceT1; the cochlea is faint on ceT1. Cortical bone
#: has no signal on either (T2* well under a millisecond), so on ceT1 it is darker than CSF: version
#: 1.0 gave both 0.10, which left a CycleGAN nothing but shape to tell bone (dark on hrT2) from CSF
#: (bright on hrT2) and made it paint the temporal bone bright.
TISSUES: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "fat": (0.55, 0.95),
    "bone": (0.04, 0.03),
    "parenchyma": (0.32, 0.48),
    "csf": (1.00, 0.10),
    "vessel": (0.06, 0.85),
    "nerve": (0.22, 0.45),
    "labyrinth": (0.92, 0.14),
    "cochlea": (0.90, 0.17),
    "vs": (0.50, 0.90),
    "cyst": (0.95, 0.20),
}


@dataclass(frozen=True)
class CentreSpec:
    """Acquisition settings of one centre and modality (DESIGN.md section 3.1)."""

    inplane_mm: tuple[float, ...]  # candidate in-plane spacings
    slice_mm: tuple[float, ...]  # candidate slice spacings
    matrix: tuple[int, ...]  # candidate in-plane matrix sizes (head field of view)
    direction: tuple[float, ...]  # ITK (LPS) direction cosines
    scale: float  # stored value of relative intensity 1.0
    noise: float  # Rician sigma, relative to intensity 1.0
    heterogeneity: float  # VS texture amplitude on hrT2
    slope_range: tuple[float, float] | None = None  # scl_slope range (scaled integer storage)


CENTRE_SPECS: dict[tuple[str, str], CentreSpec] = {
    ("ldn", "ceT1"): CentreSpec((0.4102, 0.4297), (1.0, 1.5), (512,), (-1, 0, 0, 0, -1, 0, 0, 0, 1), 1200.0, 0.030, 0.0),
    ("ldn", "hrT2"): CentreSpec((0.4102, 0.4492), (1.0, 1.5), (384, 448), (-1, 0, 0, 0, -1, 0, 0, 0, 1), 800.0, 0.025, 0.10),
    ("etz", "ceT1"): CentreSpec((0.8,), (1.5,), (256,), (1, 0, 0, 0, 1, 0, 0, 0, 1), 1000.0, 0.035, 0.0, (0.6, 2.4)),
    ("etz", "hrT2"): CentreSpec((0.5,), (1.0,), (512,), (1, 0, 0, 0, 1, 0, 0, 0, 1), 600.0, 0.040, 0.18, (0.6, 2.4)),
}

#: Field of view of the default cohort: a box around the internal auditory canals (mm, head frame).
ROI_FOV_MM = (100.0, 90.0, 44.0)
ROI_CENTRE = (0.0, 10.0, 0.0)
HEAD_Z_MM = 90.0
HEAD_CENTRE = (0.0, 15.0, 10.0)

#: First case number of each split, as in the real 2022 release.
FIRST_CASE = {
    ("ldn", "training_source"): 1,
    ("ldn", "training_target"): 106,
    ("ldn", "validation"): 211,
    ("etz", "training_source"): 0,
    ("etz", "training_target"): 105,
    ("etz", "validation"): 210,
    ("ldn", "test"): 311,
    ("etz", "test"): 310,
}
YEAR = {"ldn": "2021", "etz": "2022"}
SPLIT_INDEX = {"training_source": 0, "training_target": 1, "validation": 2, "test": 3}
CENTRE_INDEX = {"ldn": 0, "etz": 1}


# --------------------------------------------------------------------------------------------------
# Implicit shapes in the head frame (mm); field() is an approximate signed distance, negative inside
# --------------------------------------------------------------------------------------------------


def _rot(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _local(q: tuple[np.ndarray, ...], centre: np.ndarray, rot: np.ndarray) -> tuple[np.ndarray, ...]:
    """Coordinates of q in a shape's local frame (rotation columns are the local axes)."""
    d = [q[i] - np.float32(centre[i]) for i in range(3)]
    return tuple(sum(np.float32(rot[i, a]) * d[i] for i in range(3)) for a in range(3))


@dataclass
class Ellipsoid:
    """An ellipsoid whose radius varies with direction: r(u) = radii * (1 + sum amp cos(f u.v + phase))."""

    centre: np.ndarray
    radii: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    lumps: tuple[tuple[np.ndarray, float, float, float], ...] = ()

    def field(self, q: tuple[np.ndarray, ...]) -> np.ndarray:
        x, y, z = _local(q, self.centre, self.rot)
        r = self.radii.astype(np.float32)
        nx, ny, nz = x / r[0], y / r[1], z / r[2]
        k0 = np.sqrt(nx * nx + ny * ny + nz * nz) + np.float32(1e-6)
        if self.lumps:
            rho = np.ones_like(k0)
            for v, freq, phase, amp in self.lumps:
                cos_angle = (nx * np.float32(v[0]) + ny * np.float32(v[1]) + nz * np.float32(v[2])) / k0
                rho += np.float32(amp) * np.cos(np.float32(freq) * cos_angle + np.float32(phase))
        else:
            rho = np.float32(1.0)
        k1 = np.sqrt((nx / r[0]) ** 2 + (ny / r[1]) ** 2 + (nz / r[2]) ** 2) + np.float32(1e-6)
        # Quilez's distance approximation to an ellipsoid, with the radii scaled by rho.
        return (k0 / rho) * (k0 / rho - 1.0) / (k1 / rho)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = float(self.radii.max()) * (1.0 + sum(abs(lump[3]) for lump in self.lumps))
        return self.centre - reach, self.centre + reach

    def shrunk(self, mm: float) -> Ellipsoid:
        return Ellipsoid(self.centre, np.maximum(self.radii - mm, 1.0), self.rot, self.lumps)


@dataclass
class Capsule:
    """All points within ``radius`` of the segment a-b."""

    a: np.ndarray
    b: np.ndarray
    radius: float

    def field(self, q: tuple[np.ndarray, ...]) -> np.ndarray:
        ab = (self.b - self.a).astype(np.float32)
        d = [q[i] - np.float32(self.a[i]) for i in range(3)]
        t = (d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) / np.float32(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        return np.sqrt(sum((d[i] - t * ab[i]) ** 2 for i in range(3))) - np.float32(self.radius)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.minimum(self.a, self.b) - self.radius, np.maximum(self.a, self.b) + self.radius


@dataclass
class Torus:
    """A torus of major radius R and minor radius r around the local z axis."""

    centre: np.ndarray
    major: float
    minor: float
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))

    def field(self, q: tuple[np.ndarray, ...]) -> np.ndarray:
        x, y, z = _local(q, self.centre, self.rot)
        ring = np.sqrt(x * x + y * y) - np.float32(self.major)
        return np.sqrt(ring * ring + z * z) - np.float32(self.minor)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = self.major + self.minor
        return self.centre - reach, self.centre + reach


@dataclass
class Union:
    shapes: tuple

    def field(self, q: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.minimum.reduce([s.field(q) for s in self.shapes])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lows, highs = zip(*(s.bounds() for s in self.shapes))
        return np.min(lows, axis=0), np.max(highs, axis=0)


@dataclass
class Intersection:
    shapes: tuple

    def field(self, q: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.maximum.reduce([s.field(q) for s in self.shapes])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lows, highs = zip(*(s.bounds() for s in self.shapes))
        return np.max(lows, axis=0), np.min(highs, axis=0)


@dataclass
class Layer:
    """A shape painted with a tissue; ``label`` is written where the voxel centre is inside."""

    name: str
    shape: object
    tissue: str
    label: int = 0
    textured: bool = False


# --------------------------------------------------------------------------------------------------
# Subjects
# --------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """One synthetic subject: layers in painting order, head pose, texture and bias coefficients."""

    koos: int
    vs_side: str
    layers: list[Layer]
    pose_rot: np.ndarray
    pose_shift: np.ndarray
    texture_k: np.ndarray
    texture_phase: np.ndarray
    bias_coef: np.ndarray
    contrast_jitter: dict[str, float]
    n_cysts: int


def _lumps(rng: np.random.Generator, n: int, amp: float) -> tuple:
    out = []
    for _ in range(n):
        v = rng.normal(size=3)
        out.append((v / np.linalg.norm(v), float(rng.uniform(2.0, 4.0)), float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.3, 1.0) * amp)))
    return tuple(out)


#: VS geometry per Koos grade: radius of the cisternal part (mm) and intracanalicular length (mm).
KOOS_BALL_MM = {1: (0.0, 0.0), 2: (4.0, 5.2), 3: (6.0, 7.6), 4: (9.4, 11.2)}


def make_subject(rng: np.random.Generator, koos: int) -> Subject:
    """Draw one subject's anatomy.

    Args:
        rng: the subject's generator.
        koos: Koos grade 1..4 of the VS (1: intracanalicular, 4: compresses the brainstem).
    """
    s = float(rng.uniform(0.94, 1.06))  # head size
    j = lambda sd=1.0: float(rng.normal(0.0, sd))  # noqa: E731 - small positional jitter (mm)
    layers: list[Layer] = []
    head = Ellipsoid(np.array([0.0, 15.0, 15.0]), np.array([72.0, 92.0, 75.0]) * s, lumps=_lumps(rng, 3, 0.02))
    layers += [
        Layer("scalp", head, "fat"),
        Layer("skull", head.shrunk(4.0), "bone"),
        Layer("subarachnoid", head.shrunk(10.0), "csf"),
        Layer("cerebrum", head.shrunk(12.0), "parenchyma"),
    ]
    cistern = Ellipsoid(np.array([0.0, 8.0 + j(), j()]), np.array([21.0, 16.0, 26.0]) * s, lumps=_lumps(rng, 3, 0.05))
    layers.append(Layer("cistern", cistern, "csf"))
    for sign in (-1, 1):
        cb = Ellipsoid(np.array([sign * 25.0 + j(), 41.0 + j(), -8.0 + j()]), np.array([25.0, 20.0, 20.0]) * s, lumps=_lumps(rng, 3, 0.05))
        layers.append(Layer(f"cerebellum_{sign:+d}", cb, "parenchyma"))
    brainstem = Ellipsoid(np.array([j(0.5), 12.0 + j(), 0.0]), np.array([11.0, 10.5, 32.0]) * s, _rot(0.12 * rng.normal(), 0, 0), _lumps(rng, 2, 0.04))
    layers.append(Layer("brainstem", brainstem, "parenchyma"))
    layers.append(Layer("fourth_ventricle", Ellipsoid(np.array([0.0, 27.0 + j(), -2.0]), np.array([5.0, 3.0, 8.0]) * s), "csf"))
    bx = j(0.8)
    layers.append(Layer("basilar", Capsule(np.array([bx, -3.0, -30.0]), np.array([bx + j(), -3.0 + j(), 30.0]), float(rng.uniform(1.3, 1.8))), "vessel"))

    vs_side = "left" if rng.random() < 0.5 else "right"
    side_sign = {"left": 1, "right": -1}
    iac_radius = float(rng.uniform(2.0, 2.5))
    iac_geom = {}
    for side, sign in side_sign.items():
        bone = Ellipsoid(np.array([sign * 38.0, 0.0 + j(), -2.0 + j()]), np.array([22.0 * s, 11.0, 12.0]), _rot(0, 0, sign * 0.15 + 0.05 * rng.normal()), _lumps(rng, 3, 0.05))
        layers.append(Layer(f"petrous_{side}", bone, "bone"))
        porus = np.array([sign * (16.0 + j(0.6)), 1.5 + j(0.4), j(0.4)])
        fundus = porus + np.array([sign * float(rng.uniform(10.0, 12.0)), j(0.6), j(0.4)])
        iac_geom[side] = (porus, fundus)
        layers.append(Layer(f"iac_{side}", Capsule(porus, fundus, iac_radius), "csf"))
        for dz in (-0.8, 0.8):  # facial and vestibulocochlear nerves, brainstem to fundus
            a = np.array([sign * 10.0, 1.5, dz]) + np.array([0, j(0.3), j(0.2)])
            layers.append(Layer(f"nerve_{side}_{dz:+.1f}", Capsule(a, fundus + np.array([0, 0, dz]), 0.5), "nerve"))
        vest = np.array([sign * 31.0, 4.0, 0.5]) + np.array([j(0.5), j(0.5), j(0.5)])
        layers.append(Layer(f"vestibule_{side}", Ellipsoid(vest, np.array([2.4, 1.8, 2.0])), "labyrinth"))
        for k, ang in enumerate(((np.pi / 2, 0, 0), (0, np.pi / 2, 0), (0, 0, 0))):
            off = np.array([sign * 2.0, 3.0, 2.5]) * (1 if k != 2 else 0.6)
            canal = Torus(vest + off, float(rng.uniform(2.8, 3.4)), 0.45, _rot(*ang))
            layers.append(Layer(f"canal_{side}_{k}", canal, "labyrinth"))
        # Cochlea: a torus (the modiolus in its centre is dark), about 90 mm3; axis tilted anterolaterally.
        major, minor = 2.7 * float(rng.uniform(0.95, 1.05)), 1.3 * float(rng.uniform(0.95, 1.05))
        centre = np.array([sign * 29.0, -6.0, -1.0]) + np.array([j(0.5), j(0.5), j(0.4)])
        tilt = _rot(0.6 + 0.15 * rng.normal(), sign * (0.5 + 0.15 * rng.normal()), 0.2 * rng.normal())
        layers.append(Layer(f"cochlea_{side}", Torus(centre, major, minor, tilt), "cochlea", label=2))

    porus, fundus = iac_geom[vs_side]
    sign = side_sign[vs_side]
    canal_part = Capsule(
        porus + np.array([sign * float(rng.uniform(0.0, 2.0)), 0, 0]),
        porus + (fundus - porus) * float(rng.uniform(0.55, 0.95)),
        iac_radius * float(rng.uniform(0.85, 0.98)),
    )
    n_cysts = 0
    if koos == 1:
        vs = canal_part
        vs_layers = [Layer("vs", vs, "vs", label=1, textured=True)]
    else:
        lo, hi = KOOS_BALL_MM[koos]
        radius = float(rng.uniform(lo, hi))
        radii = radius * np.array([float(rng.uniform(0.9, 1.1)) for _ in range(3)])
        radii *= radius / float(np.prod(radii) ** (1 / 3))  # keep the volume of the drawn radius
        ball_centre = porus + np.array([-sign * 0.55 * radius, j(1.0) - 0.1 * radius, j(1.0)])
        ball = Ellipsoid(ball_centre, radii, _rot(*(0.3 * rng.normal(size=3))), _lumps(rng, 4, 0.06))
        vs = Union((canal_part, ball))
        vs_layers = [Layer("vs", vs, "vs", label=1, textured=True)]
        # Hypersignal cysts in part of the large tumours (paper: heterogeneous large ETZ tumours).
        p_cyst = {2: 0.0, 3: 0.35, 4: 0.7}[koos]
        if rng.random() < p_cyst:
            n_cysts = int(rng.integers(1, 4))
            for c in range(n_cysts):
                offset = rng.normal(size=3)
                offset *= float(rng.uniform(0.2, 0.5)) * radius / np.linalg.norm(offset)
                cyst = Ellipsoid(ball_centre + offset, radius * rng.uniform(0.18, 0.38, size=3), _rot(*rng.normal(size=3)), _lumps(rng, 2, 0.08))
                vs_layers.append(Layer(f"cyst_{c}", Intersection((cyst, ball)), "cyst"))
    layers += vs_layers

    # A smooth texture (random Fourier modes, wavelengths 3-8 mm) for VS heterogeneity.
    n_modes = 16
    dirs = rng.normal(size=(n_modes, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = dirs * (2 * np.pi / rng.uniform(3.0, 8.0, size=(n_modes, 1)))
    pose_rot = _rot(*(np.deg2rad([2.0, 2.0, 4.0]) * rng.normal(size=3)))
    pose_shift = rng.normal(0.0, 3.0, size=3)
    jitter = {t: float(rng.uniform(0.95, 1.05)) for t in TISSUES}
    return Subject(
        koos=koos,
        vs_side=vs_side,
        layers=layers,
        pose_rot=pose_rot,
        pose_shift=pose_shift,
        texture_k=k,
        texture_phase=rng.uniform(0, 2 * np.pi, size=n_modes),
        bias_coef=rng.normal(0.0, 0.08, size=9),
        contrast_jitter=jitter,
        n_cysts=n_cysts,
    )


# --------------------------------------------------------------------------------------------------
# Grids and rendering
# --------------------------------------------------------------------------------------------------


@dataclass
class Grid:
    """A voxel grid: size (x, y, z), spacing (mm), origin (mm), ITK direction cosines."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def matrix(self) -> np.ndarray:
        return np.array(self.direction, dtype=float).reshape(3, 3) * np.array(self.spacing)[None, :]

    def physical(self, index: np.ndarray) -> np.ndarray:
        """Physical points (N, 3) of continuous indices (N, 3) in (x, y, z) order."""
        return np.asarray(self.origin) + index @ self.matrix.T

    def index(self, points: np.ndarray) -> np.ndarray:
        """Continuous indices (N, 3) of physical points (N, 3)."""
        return (points - np.asarray(self.origin)) @ np.linalg.inv(self.matrix).T


def make_grid(spec: CentreSpec, rng: np.random.Generator, fov: str, pose_centre: np.ndarray) -> Grid:
    """Draw a grid for one acquisition: spacing and matrix from the centre's candidates.

    Args:
        spec: the centre/modality settings.
        rng: the case's generator.
        fov: ``"roi"`` (a box of :data:`ROI_FOV_MM` around the canals) or ``"head"`` (real matrices).
        pose_centre: the scanner position (mm) on which the grid is centred.
    """
    inplane = float(rng.choice(spec.inplane_mm))
    dz = float(rng.choice(spec.slice_mm))
    spacing = (inplane, inplane, dz)
    if fov == "roi":
        size = tuple(int(round(f / s)) for f, s in zip(ROI_FOV_MM, spacing))
    elif fov == "head":
        n = int(rng.choice(spec.matrix))
        size = (n, n, int(round(HEAD_Z_MM / dz)))
    else:
        raise ValueError(f"fov must be 'roi' or 'head', not {fov!r}")
    direction = tuple(float(v) for v in spec.direction)
    m = np.array(direction).reshape(3, 3) * np.array(spacing)[None, :]
    centre_index = (np.array(size) - 1) / 2.0
    origin = tuple(float(v) for v in np.round(pose_centre - m @ centre_index, 4))
    return Grid(size, spacing, origin, direction)


def _head_coordinates(grid: Grid, subject: Subject, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, ...]:
    """Head-frame coordinates (mm, float32) of the voxel centres in a box (array order z, y, x)."""
    kz, jy, ix = (np.arange(sl.start, sl.stop, dtype=np.float64) for sl in box)
    m = grid.matrix
    o = np.asarray(grid.origin) - subject.pose_shift
    p = [o[a] + m[a, 0] * ix[None, None, :] + m[a, 1] * jy[None, :, None] + m[a, 2] * kz[:, None, None] for a in range(3)]
    r = subject.pose_rot  # head -> scanner; q = R^T (p - t)
    return tuple((r[0, a] * p[0] + r[1, a] * p[1] + r[2, a] * p[2]).astype(np.float32) for a in range(3))


def _index_box(grid: Grid, subject: Subject, shape: object, margin: int = 2) -> tuple[slice, slice, slice] | None:
    lo, hi = shape.bounds()
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    scanner = corners @ subject.pose_rot.T + subject.pose_shift
    idx = grid.index(scanner)
    start = np.maximum(np.floor(idx.min(axis=0)).astype(int) - margin, 0)
    stop = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + margin + 1, np.array(grid.size))
    if np.any(stop - start < 1):
        return None
    # Array order is (z, y, x); np.gradient needs at least two samples per axis.
    stop = np.maximum(stop, np.minimum(start + 2, np.array(grid.size)))
    return tuple(slice(int(start[a]), int(stop[a])) for a in (2, 1, 0))


def partial_volume(f: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Partial-volume fraction of voxels from a signed-distance-like field (negative inside).

    The field is renormalised by its numerical gradient (so any implicit function works), and the
    fraction is ``clip(0.5 - d / w, 0, 1)`` with ``w = sum_i |n_i| h_i`` the voxel extent along the
    surface normal ``n`` (h: voxel spacing). On axes of a single sample the derivative is taken as 0.
    """
    grads = []
    for axis, h in enumerate(spacing_zyx):
        grads.append(np.gradient(f, h, axis=axis) if f.shape[axis] > 1 else np.zeros_like(f))
    norm = np.sqrt(sum(g * g for g in grads)) + np.float32(1e-6)
    width = sum(np.abs(g) * np.float32(h) for g, h in zip(grads, spacing_zyx)) / norm
    d = f / np.maximum(norm, np.float32(0.2))
    return np.clip(0.5 - d / np.maximum(width, np.float32(1e-3)), 0.0, 1.0).astype(np.float32)


def render(subject: Subject, grid: Grid, modality: str, spec: CentreSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample a subject on a grid.

    Args:
        subject: the anatomy.
        grid: the voxel grid.
        modality: ``"hrT2"`` or ``"ceT1"``.
        spec: centre settings (scale, noise, heterogeneity).
        rng: the case's generator (noise).

    Returns:
        ``(intensity, label)``: float32 intensities in the centre's scale and uint8 labels, both in
        array order (z, y, x).
    """
    mod = 0 if modality == "hrT2" else 1
    shape_zyx = grid.size[::-1]
    spacing_zyx = grid.spacing[::-1]
    image = np.zeros(shape_zyx, dtype=np.float32)
    label = np.zeros(shape_zyx, dtype=np.uint8)
    for layer in subject.layers:
        box = _index_box(grid, subject, layer.shape)
        if box is None:
            continue
        q = _head_coordinates(grid, subject, box)
        f = layer.shape.field(q)
        pv = partial_volume(f, spacing_zyx)
        value = np.float32(TISSUES[layer.tissue][mod] * subject.contrast_jitter[layer.tissue])
        if layer.textured:
            texture = sum(
                np.cos(k[0] * q[0] + k[1] * q[1] + k[2] * q[2] + ph) for k, ph in zip(subject.texture_k.astype(np.float32), subject.texture_phase)
            ) / np.float32(np.sqrt(len(subject.texture_phase) / 2))
            amp = spec.heterogeneity * (1.0 + 0.5 * (subject.koos >= 3)) if mod == 0 else 0.05
            value = value + np.float32(amp) * texture
        region = image[box]
        image[box] = region + pv * (value - region)
        if layer.label:
            label[box][f <= 0] = layer.label
    # Multiplicative bias field: exp of a quadratic polynomial in scanner coordinates (per 100 mm).
    full = tuple(slice(0, n) for n in shape_zyx)
    kz, jy, ix = (np.arange(sl.stop, dtype=np.float32) for sl in full)
    m = grid.matrix
    centre = np.asarray(grid.origin) + m @ ((np.array(grid.size) - 1) / 2.0)
    p = [
        np.float32((grid.origin[a] - centre[a]) / 100.0) + np.float32(m[a, 0] / 100) * ix[None, None, :] + np.float32(m[a, 1] / 100) * jy[None, :, None]
        + np.float32(m[a, 2] / 100) * kz[:, None, None]
        for a in range(3)
    ]
    c = subject.bias_coef.astype(np.float32)
    log_bias = c[0] * p[0] + c[1] * p[1] + c[2] * p[2] + c[3] * p[0] * p[0] + c[4] * p[1] * p[1] + c[5] * p[2] * p[2] + c[6] * p[0] * p[1] + c[7] * p[1] * p[2] + c[8] * p[0] * p[2]
    image *= np.exp(log_bias)
    # Rician noise: magnitude of a complex signal with Gaussian noise on both channels.
    sigma = np.float32(spec.noise)
    real = image + sigma * rng.standard_normal(shape_zyx, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape_zyx, dtype=np.float32)
    image = np.sqrt(real * real + imag * imag) * np.float32(spec.scale)
    return image.astype(np.float32), label


# --------------------------------------------------------------------------------------------------
# Cohort
# --------------------------------------------------------------------------------------------------


def split_sizes(cases_per_centre: int) -> dict[str, int]:
    """Cases per split for one centre: a quarter (at least 1) for validation, the rest halved.

    ``8 -> source 3, target 3, validation 2`` (the default 16-case cohort).
    """
    if cases_per_centre < 3:
        raise ValueError(f"cases_per_centre must be at least 3 (one case per split), not {cases_per_centre}")
    n_val = max(1, cases_per_centre // 4)
    n_src = math.ceil((cases_per_centre - n_val) / 2)
    return {"training_source": n_src, "training_target": cases_per_centre - n_val - n_src, "validation": n_val}


def koos_schedule(n: int, rng: np.random.Generator) -> list[int]:
    """Koos grades for the n cases of one split: cycles 4, 1, 2, 3 (so that any split of two or more
    cases holds a large and a small tumour), then shuffled."""
    grades = [(4, 1, 2, 3)[i % 4] for i in range(n)]
    return [int(g) for g in rng.permutation(grades)]


def case_name(centre: str, split: str, k: int) -> str:
    return f"crossmoda{YEAR[centre]}_{centre}_{FIRST_CASE[(centre, split)] + k}"


def generate_case(seed: int, centre: str, split: str, k: int, koos: int, fov: str = "roi") -> tuple[sitk.Image, sitk.Image, dict]:
    """Generate one case: the image (as read back, after storage scaling), its label and facts.

    Args:
        seed: cohort seed.
        centre: ``"ldn"`` or ``"etz"``.
        split: a key of :data:`crossmoda_lib.io.SPLITS`.
        k: index of the case within its split and centre.
        koos: Koos grade 1..4.
        fov: ``"roi"`` or ``"head"``.

    Returns:
        ``(stored image, label, facts)``; the stored image is integer with ``facts["scl_slope"]``.
    """
    modality = cio.SPLITS[split]
    spec = CENTRE_SPECS[(centre, modality)]
    rng = np.random.default_rng([seed, CENTRE_INDEX[centre], SPLIT_INDEX[split], k])
    subject = make_subject(rng, koos)
    pose_centre = subject.pose_rot @ np.array(ROI_CENTRE if fov == "roi" else HEAD_CENTRE) + subject.pose_shift
    grid = make_grid(spec, rng, fov, pose_centre)
    intensity, label = render(subject, grid, modality, spec, rng)
    slope = float(np.round(rng.uniform(*spec.slope_range), 6)) if spec.slope_range else 1.0
    stored = np.round(intensity / slope).clip(0, 32767).astype(np.int16)

    def to_image(arr: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(grid.spacing)
        img.SetOrigin(grid.origin)
        img.SetDirection(grid.direction)
        return img

    voxel_mm3 = float(np.prod(grid.spacing))
    comps = _cochlea_volumes(label, voxel_mm3)
    facts = {
        "case": case_name(centre, split, k),
        "centre": cio.CENTRES[centre],
        "split": split,
        "modality": modality,
        "koos": koos,
        "vs_side": subject.vs_side,
        "vs_volume_mm3": round(float((label == 1).sum()) * voxel_mm3, 3),
        "cochlea_volumes_mm3": comps,
        "n_cysts": subject.n_cysts,
        "spacing": list(grid.spacing),
        "size": list(grid.size),
        "scl_slope": slope,
    }
    return to_image(stored), to_image(label), facts


def _cochlea_volumes(label: np.ndarray, voxel_mm3: float) -> list[float]:
    """Volumes (mm3) of the cochlea's connected components, largest first."""
    from scipy import ndimage

    comps, n = ndimage.label(label == 2, structure=np.ones((3, 3, 3)))
    counts = np.bincount(comps.ravel())[1:] if n else np.array([])
    return [round(float(c) * voxel_mm3, 3) for c in sorted(counts, reverse=True)]


def _write_case(task: tuple) -> dict:
    """Generate one case and write its files into the cohort folder (a worker process's job)."""
    seed, centre, split, k, koos, fov, root = task
    root = Path(root)
    image, label, facts = generate_case(seed, centre, split, k, koos, fov)
    name, modality = facts["case"], facts["modality"]
    image_path = root / split / f"{name}_{modality}.nii.gz"
    if facts["scl_slope"] != 1.0:
        cio.write_scaled_nifti(image, image_path, facts["scl_slope"])
    else:
        cio.write_image(image, image_path)
    if split == "training_source":
        label_path = root / split / f"{name}_Label.nii.gz"
    else:
        label_path = cio.truth_label_path(root, name)
    cio.write_image(label, label_path)
    facts["image"] = image_path.relative_to(root).as_posix()
    facts["label"] = label_path.relative_to(root).as_posix()
    return facts


def generate_cohort(
    out: Path | str,
    seed: int = 0,
    cases_per_centre: int = 8,
    fov: str = "roi",
    *,
    test_cases_per_centre: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Write a synthetic cohort in the crossMoDA 2022 layout.

    The cohort is written into a temporary sibling folder and renamed into place when complete, so an
    interrupted run leaves nothing that looks like a cohort.

    Args:
        out: destination folder; must not exist or be empty (unless ``overwrite``).
        seed: cohort seed.
        cases_per_centre: cases per centre over the three splits (see :func:`split_sizes`).
        test_cases_per_centre: hrT2 cases per centre of a held-out ``test/`` split, with truth (0:
            no such split, as in the challenge's release). The other splits' cases do not depend on
            it: every case draws from its own ``(seed, centre, split, index)`` generator.
        fov: ``"roi"`` (about 100x90x44 mm around the canals; seconds) or ``"head"`` (real matrices).
        overwrite: replace an existing non-empty folder.
        progress: show a progress bar.
        workers: processes (default: one per CPU); the result does not depend on it.

    Returns:
        The manifest (also written to ``manifest.json``).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder exists and is not empty (use overwrite=True / --overwrite)")
    sizes = split_sizes(cases_per_centre)
    if test_cases_per_centre < 0:
        raise ValueError(f"test_cases_per_centre must be >= 0, not {test_cases_per_centre}")
    if test_cases_per_centre:
        sizes["test"] = test_cases_per_centre
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed generation of this folder
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    cio.apply_umask(tmp, folder=True)
    jobs = []
    for centre in ("ldn", "etz"):
        for split, n in sizes.items():
            grades = koos_schedule(n, np.random.default_rng([seed, CENTRE_INDEX[centre], SPLIT_INDEX[split], 10**6]))
            jobs += [(centre, split, k, grades[k]) for k in range(n)]
    try:
        for split in sizes:
            (tmp / split).mkdir()
        (tmp / "synthetic_truth").mkdir()
        tasks = [(seed, centre, split, k, koos, fov, str(tmp)) for centre, split, k, koos in jobs]
        n_workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
        if n_workers == 1:
            results = map(_write_case, tasks)
            cases = list(tqdm(results, total=len(tasks), desc="synthetic cohort", disable=not progress))
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(n_workers) as pool:
                results = pool.map(_write_case, tasks)
                cases = list(tqdm(results, total=len(tasks), desc="synthetic cohort", disable=not progress))
        infos = ["crossmoda_name,koos"] + [f"{c['case']},{c['koos']}" for c in cases if c["split"] == "training_source"]
        cio.write_text_atomic(tmp / "infos_source_training.csv", "\n".join(infos) + "\n")
        manifest = {
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "cases_per_centre": cases_per_centre,
            "test_cases_per_centre": test_cases_per_centre,
            "fov": fov,
            "thresholds_mm3": {"small_vs": SMALL_VS_MM3, "large_vs": LARGE_VS_MM3},
            "cases": cases,
        }
        cio.write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def ensure_cohort(data_dir: Path | str, seed: int, cases_per_centre: int, fov: str, test_cases_per_centre: int = 0) -> tuple[Path, bool]:
    """Generate the synthetic cohort into ``data_dir`` when it is missing or empty.

    Returns:
        ``(data_dir, generated)``.

    Raises:
        DataError: the folder holds a cohort of another generator version (its images would differ
            from what this code makes from the same seed), or one made with another seed, number of
            cases or field of view than asked for (a changed profile would otherwise run on the old
            cohort).
    """
    data_dir = Path(data_dir)
    if data_dir.exists() and any(data_dir.iterdir()):
        manifest = data_dir / "manifest.json"
        if manifest.exists():
            made = json.loads(manifest.read_text())
            if made.get("generator") == GENERATOR and made.get("generator_version") != GENERATOR_VERSION:
                raise cio.DataError(
                    f"{data_dir}: synthetic cohort of generator version {made.get('generator_version')}, this code makes "
                    f"{GENERATOR_VERSION}; delete the folder and the run's stage folders made from it to regenerate"
                )
            if made.get("generator") == GENERATOR:
                asked = {"seed": seed, "cases_per_centre": cases_per_centre, "fov": fov, "test_cases_per_centre": test_cases_per_centre}
                made.setdefault("test_cases_per_centre", 0)  # cohorts made before the test split had none
                differ = {k: (made[k], v) for k, v in asked.items() if k in made and made[k] != v}
                if differ:
                    said = ", ".join(f"{k} {old!r} (asked: {new!r})" for k, (old, new) in differ.items())
                    raise cio.DataError(
                        f"{data_dir}: holds a synthetic cohort made with {said}; delete the folder and the run's stage folders made from it to regenerate, or set data_dir to another folder"
                    )
        return data_dir, False
    generate_cohort(data_dir, seed=seed, cases_per_centre=cases_per_centre, fov=fov, test_cases_per_centre=test_cases_per_centre, overwrite=True)
    return data_dir, True
