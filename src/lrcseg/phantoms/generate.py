"""Synthetic abdominal CT phantoms: the offline benchmark, the demo data and most tests' data.

A phantom is drawn in patient millimetres (RAS+: +x patient Right, +y Anterior, +z Superior;
the diaphragm dome at z = 0) and only then sampled on the voxel grid, so the spacing changes
the sampling, never the anatomy. Facts (HU, sizes, positions) follow ``shared/PHANTOMS.md``.

Pipeline for one case (:func:`generate_phantom`):
1. Body: a super-ellipse cross-section with per-case size and angular deformation; skin,
   subcutaneous fat, muscle wall, the abdominal cavity (visceral fat); lungs and heart above
   a two-domed diaphragm; spine (vertebral body with cortex, discs, canal, posterior
   elements), paraspinal and psoas muscles; ribs as slanted bands in the wall.
2. Bowel loops (unlabelled) from thresholded smooth random fields in the lower cavity: wall,
   fluid, mixed content and gas, so that soft tissue of organ-like HU surrounds the organs.
3. Organs as rotated, tapered ellipsoids whose radius is perturbed by low-frequency Fourier
   terms (``r_eff = |q| + amp * sum_k a_k cos(2 pi f_k . q + phi_k)``, q = local coordinates
   divided by the semi-axes), painted in a fixed order so later organs cut into earlier ones
   (touching organs without fat planes: liver-kidney, spleen-stomach). Liver with vessels
   (intersection of two random-field zero sets: tubes), kidneys with cortex, medulla and a
   medial hilum of sinus fat, spleen with a hilar notch, stomach with wall, fluid/food and an
   anterior air-fluid level, pancreas as a lobulated tube arching over the aorta.
4. Intensities: per-tissue mean for the case's contrast phase (portal-venous or
   unenhanced) + per-case offsets + a smooth texture field; partial-volume blur (Gaussian
   PSF); correlated noise (Gaussian-smoothed white noise scaled to 10-20 HU std).

Anatomy versions (``generate_phantom(..., anatomy=N)``, recorded in dataset.json):
1. The phantoms of the first releases, kept bit for bit for the recorded experiments. The
   vertebral body sits near the body's centre, organs are painted liver, stomach, spleen,
   pancreas, kidneys, gallbladder, vessels with later ones cutting into earlier ones, so the
   right kidney lies inside the liver's outline and the left one against the stomach.
2. Checked against a real labelled CT (``realism.anatomy_report``, ``bench/phantom_anatomy.py``):
   - spine posterior: the back's subcutaneous fat 30 % thinner than the flanks' (supine), the
     vertebral body's back 44-52 mm in front of it, a 32 mm spinous process and paraspinal
     muscles behind; the vertebral body's centroid at about 0.30-0.40 of the body's AP depth
     (real case 0.38);
   - kidneys posterolateral to the vertebral body in the retroperitoneum: centroid 64-83 mm
     lateral, -5..+8 mm AP of it (real +-73..75 mm, -3..0 mm); the right one 10-18 mm lower,
     upper poles about 60-95 mm below the dome; they keep their outline (only the renal sinus
     fat is cut out);
   - organs never overwrite organs: painted aorta, IVC, kidneys, spleen, pancreas,
     gallbladder, stomach, liver, each only where no organ is yet, so the liver fills the
     right upper quadrant around the others; its right lobe stays in front of the right
     kidney's posterior half below the upper pole and off the IVC's back, so it touches the
     kidney's anterior-superior surface without wrapping it;
   - stomach left anterior (65-85 mm in front of the vertebral body), spleen left
     posterolateral (98-118 mm left, 0-20 mm anterior), pancreas 44-56 mm + its radius in
     front of the vertebral body, in front of the aorta; aorta left-anterior and IVC
     right-anterior of the vertebral body as in version 1; gallbladder anterior, under the
     liver.
   Intensities, textures, noise and the body wall are drawn as in version 1.

:func:`write_phantom_dataset` writes an nnU-Net v2 raw dataset with standard splits and a
montage. Every case draws from its own child of ``np.random.SeedSequence(seed)``, so case i
is the same whatever the number of cases.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from lrcseg.data.readers import write_nifti
from lrcseg.data.splits import make_splits
from lrcseg.io_utils import atomic_dir, atomic_write_json

# Label ids (fixed; written to dataset.json "labels").
LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "kidney_right": 3,
    "kidney_left": 4,
    "stomach": 5,
    "aorta": 6,
    "ivc": 7,
    "gallbladder": 8,
    "pancreas": 9,
}

PHASES = ("portal_venous", "unenhanced")
# Anatomy versions (module doc); 1 is kept bit for bit for the recorded experiments.
ANATOMY_VERSIONS = (1, 2)

# tissue name -> (unenhanced HU, portal-venous HU, texture std HU). Ids = list order.
_TISSUE_TABLE: list[tuple[str, float, float, float]] = [
    ("air", -1000.0, -1000.0, 0.0),
    ("fat", -100.0, -100.0, 10.0),
    ("muscle", 50.0, 60.0, 10.0),
    ("bone_cortical", 900.0, 900.0, 120.0),
    ("bone_cancellous", 220.0, 220.0, 40.0),
    ("disc", 80.0, 85.0, 8.0),
    ("csf", 10.0, 10.0, 4.0),
    ("lung", -850.0, -850.0, 40.0),
    ("heart", 45.0, 125.0, 12.0),
    ("bowel_wall", 45.0, 110.0, 14.0),
    ("bowel_fluid", 15.0, 20.0, 10.0),
    ("bowel_mixed", 10.0, 10.0, 55.0),
    ("liver", 58.0, 110.0, 22.0),
    ("liver_vessel", 45.0, 165.0, 12.0),
    ("spleen", 50.0, 115.0, 10.0),
    ("kidney_cortex", 35.0, 175.0, 12.0),
    ("kidney_medulla", 30.0, 115.0, 10.0),
    ("pancreas", 45.0, 100.0, 14.0),
    ("stomach_wall", 40.0, 85.0, 10.0),
    ("stomach_fluid", 10.0, 15.0, 8.0),
    ("stomach_food", 40.0, 45.0, 40.0),
    ("aorta", 40.0, 180.0, 8.0),
    ("ivc", 40.0, 125.0, 10.0),
    ("gallbladder", 10.0, 12.0, 5.0),
]
TISSUES: dict[str, int] = {name: i for i, (name, *_rest) in enumerate(_TISSUE_TABLE)}

# Realistic default sampling (PHANTOMS.md) and the coarse preset for demos and tests.
DEFAULT_SPACING_MM = (0.8, 0.8, 2.5)
DEFAULT_FOV_MM = (400.0, 300.0, 200.0)
PRESETS: dict[str, dict[str, tuple]] = {
    "default": {"spacing_mm": DEFAULT_SPACING_MM, "shape": (500, 375, 80)},
    "small": {"spacing_mm": (2.0, 2.0, 5.0), "shape": (200, 150, 40)},
}


def default_shape(spacing_mm: tuple[float, float, float]) -> tuple[int, int, int]:
    """Grid covering the default field of view (400 x 300 x 200 mm) at ``spacing_mm``."""
    return tuple(max(1, int(round(f / s))) for f, s in zip(DEFAULT_FOV_MM, spacing_mm, strict=True))


def phantom_affine(shape_xyz: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """The (4, 4) voxel -> RAS mm affine of a phantom grid.

    Diagonal ``(sx, sy, sz)``; x and y centred on the body axis; z such that the top slice
    lies at ``z = (Z - 1) * sz / 2`` (the anatomy itself is placed relative to the grid, so
    the absolute z origin only names positions).
    """
    shape_xyz, spacing_mm = _check_grid(shape_xyz, spacing_mm)
    affine = np.diag([*spacing_mm, 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape_xyz, spacing_mm, strict=True)]
    return affine


# --------------------------------------------------------------------------- geometry helpers


@dataclass
class _Grid:
    """Voxel-centre coordinates in anatomy mm, as broadcastable axes (X,1,1), (1,Y,1), (1,1,Z)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.shape[0], self.y.shape[1], self.z.shape[2])

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]
            ) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in [lo, hi] mm; None if empty."""
        out = []
        for axis, (a, b) in enumerate(zip(lo, hi, strict=True)):
            coords = (self.x, self.y, self.z)[axis].ravel()
            i0 = int(np.searchsorted(coords, a, side="left"))
            i1 = int(np.searchsorted(coords, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x[sl[0]], self.y[:, sl[1]], self.z[:, :, sl[2]]


def _rotation(rng: np.random.Generator, yaw_deg: float, tilt_deg: float) -> np.ndarray:
    """Rz(yaw) @ Rx(a) @ Ry(b) with a, b ~ U(-tilt, tilt) degrees: (3, 3)."""
    g = math.radians(yaw_deg)
    a, b = np.radians(rng.uniform(-tilt_deg, tilt_deg, size=2))
    rz = np.array([[math.cos(g), -math.sin(g), 0], [math.sin(g), math.cos(g), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    return rz @ rx @ ry


@dataclass
class _Blob:
    """A deformed, tapered, rotated ellipsoid in mm.

    centre (3,), semi (3,) semi-axes, rot (3, 3) local -> world, taper: semi-axes x/y scale
    by ``1 + taper * w/c`` along the local z axis, deform: (K, 5) rows (fx, fy, fz, phase,
    amplitude) of the Fourier perturbation of the normalised radius.
    """

    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray
    taper: float
    deform: np.ndarray

    @classmethod
    def sample(cls, rng: np.random.Generator, centre, semi, yaw_deg: float, tilt_deg: float = 8.0,
               taper: float = 0.0, amp: float = 0.12, n_terms: int = 4) -> _Blob:
        directions = rng.normal(size=(n_terms, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        freqs = directions * rng.uniform(0.3, 0.9, size=(n_terms, 1))
        phases = rng.uniform(0, 2 * np.pi, size=(n_terms, 1))
        amps = rng.uniform(0.5, 1.0, size=(n_terms, 1))
        amps *= amp / amps.sum()
        return cls(np.asarray(centre, float), np.asarray(semi, float),
                   _rotation(rng, yaw_deg, tilt_deg), float(taper),
                   np.hstack([freqs, phases, amps]))

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        reach = self.semi.max() * (1.0 + abs(self.taper)) * 1.3
        return self.centre - reach, self.centre + reach

    def evaluate(self, grid: _Grid) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None,
                                             tuple[np.ndarray, ...] | None]:
        """Normalised radius r (<1 inside) on the blob's bounding box, and local coordinates
        q = (u/a, v/b, w/c) (each broadcast to the box shape)."""
        sl = grid.box(*self.bbox())
        if sl is None:
            return None, None, None
        x, y, z = grid.coords(sl)
        dx, dy, dz = (x - self.centre[0]).astype(np.float32), (y - self.centre[1]).astype(np.float32), \
            (z - self.centre[2]).astype(np.float32)
        r = self.rot
        u = r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz
        v = r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz
        w = r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz
        qw = w / self.semi[2]
        scale = 1.0 + self.taper * np.clip(qw, -1.0, 1.0)
        qu = u / (self.semi[0] * scale)
        qv = v / (self.semi[1] * scale)
        radius = np.sqrt(qu * qu + qv * qv + qw * qw)
        for fx, fy, fz, ph, a in self.deform:
            radius += np.float32(a) * np.cos(np.float32(2 * np.pi) * (fx * qu + fy * qv + fz * qw)
                                             + np.float32(ph))
        return sl, radius, (qu, qv, qw)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...],
                  corr_mm: float) -> np.ndarray:
    """A smooth Gaussian random field, unit std, correlation length ~``corr_mm``: float32 ``shape``.

    White noise on a coarse grid (step corr_mm / 2), smoothed with a 1-cell Gaussian,
    normalised, then linearly interpolated onto the voxel grid (cost linear in the output).
    """
    step = corr_mm / 2.0
    coarse = [int(math.ceil(n * s / step)) + 4 for n, s in zip(shape, spacing, strict=True)]
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 1.0, mode="wrap")
    noise /= noise.std() + 1e-12
    matrix = [s / step for s in spacing]
    return ndimage.affine_transform(noise, matrix, offset=1.5, output_shape=tuple(shape), order=1,
                                    mode="nearest", output=np.float32)


# --------------------------------------------------------------------------- the generator


class _Canvas:
    """Tissue and label volumes being painted; later paint wins.

    blob_voxels: per organ, the voxels of its outline as drawn (:meth:`organ_outline`), before
    anything else cut into it: its final label count over this says how much it kept.
    """

    def __init__(self, shape: tuple[int, int, int], anatomy: int):
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.label = np.zeros(shape, dtype=np.uint8)
        self.anatomy = anatomy
        self.blob_voxels: dict[str, int] = {}

    def paint(self, sl, mask: np.ndarray, tissue: str, label: str = "background") -> None:
        t = self.tissue[sl]
        t[mask] = TISSUES[tissue]
        lab = self.label[sl]
        lab[mask] = LABELS[label]

    def organ_outline(self, sl, blob: np.ndarray, label: str) -> np.ndarray:
        """Where organ ``label`` is painted, from its drawn outline ``blob`` (bool on the index
        box ``sl``): anatomy 1 paints all of it (later organs cut into earlier ones); anatomy 2
        only where no other organ is yet (organs never overwrite organs, so the paint order
        is a precedence order)."""
        self.blob_voxels[label] = self.blob_voxels.get(label, 0) + int(blob.sum())
        if self.anatomy == 1:
            return blob
        return blob & np.isin(self.label[sl], (LABELS["background"], LABELS[label]))


def generate_phantom(rng: np.random.Generator, shape_xyz: tuple[int, int, int] | None = None,
                     spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
                     phase: str | None = None, noise_std_hu: float | None = None,
                     return_tissues: bool = False, enhancement: float | None = None,
                     anatomy: int = 1):
    """One synthetic abdominal CT volume with organ labels (see the module doc for the model).

    rng: all randomness (anatomy, phase, noise) comes from it.
    shape_xyz: grid ``(X, Y, Z)``; None = the default field of view (400 x 300 x 200 mm).
    spacing_mm: ``(sx, sy, sz)`` voxel size.
    phase: "portal_venous", "unenhanced" or None (drawn: portal-venous with p = 0.7).
    noise_std_hu: soft-tissue noise std; None = drawn from U(10, 20).
    enhancement: contrast enhancement level ``e`` (0 = unenhanced column of the tissue table,
    1 = its portal-venous column; tissue HU = ``u + e * g_t * (p - u)`` with a per-case,
    per-tissue uptake ``g_t ~ U(0.8, 1.2)``); None = drawn: U(0.6, 1.15) for portal-venous
    (early to late, weak to strong bolus), U(0, 0.08) for unenhanced.
    Returns ``hu`` float32 ``(X, Y, Z)`` and ``labels`` uint8 ``(X, Y, Z)`` (ids of
    :data:`LABELS`), RAS+ (high x = patient right, low y = posterior, high z = superior);
    with ``return_tissues`` also the uint8 tissue map (ids of :data:`TISSUES`, before blur).
    anatomy: the anatomy version (:data:`ANATOMY_VERSIONS`, see the module doc); 1 reproduces
    the phantoms of earlier releases bit for bit.
    """
    hu, canvas = _generate(rng, shape_xyz, spacing_mm, phase, noise_std_hu, enhancement, anatomy)
    if return_tissues:
        return hu, canvas.label, canvas.tissue
    return hu, canvas.label


def _generate(rng: np.random.Generator, shape_xyz: tuple[int, int, int] | None,
              spacing_mm: tuple[float, float, float], phase: str | None, noise_std_hu: float | None,
              enhancement: float | None, anatomy: int) -> tuple[np.ndarray, _Canvas]:
    """:func:`generate_phantom`'s work: returns the HU volume and the painted canvas (labels,
    tissues and each organ's drawn blob size)."""
    if anatomy not in ANATOMY_VERSIONS:
        raise ValueError(f"Illegal anatomy {anatomy!r}: one of {ANATOMY_VERSIONS}")
    if shape_xyz is None:
        shape_xyz = default_shape(spacing_mm)
    shape_xyz, spacing_mm = _check_grid(shape_xyz, spacing_mm)
    if phase is None:
        phase = PHASES[0] if rng.random() < 0.7 else PHASES[1]
    if phase not in PHASES:
        raise ValueError(f"Illegal phase {phase!r}: one of {PHASES}")
    if noise_std_hu is None:
        noise_std_hu = float(rng.uniform(10.0, 20.0))
    if noise_std_hu < 0:
        raise ValueError(f"Illegal noise_std_hu {noise_std_hu}: must be >= 0")
    if enhancement is None:
        enhancement = float(rng.uniform(0.6, 1.15) if phase == PHASES[0] else rng.uniform(0.0, 0.08))
    if not 0.0 <= enhancement <= 2.0:
        raise ValueError(f"Illegal enhancement {enhancement}: must be in [0, 2]")

    X, Y, Z = shape_xyz
    sx, sy, sz = spacing_mm
    top = float(rng.uniform(0.0, 20.0))  # top slice this far above the dome
    grid = _Grid(
        x=((np.arange(X) - (X - 1) / 2.0) * sx)[:, None, None],
        y=((np.arange(Y) - (Y - 1) / 2.0) * sy)[None, :, None],
        z=(top - (Z - 1 - np.arange(Z)) * sz)[None, None, :],
        spacing=spacing_mm,
    )
    canvas = _Canvas(shape_xyz, anatomy)
    landmarks = _paint_body(rng, grid, canvas)
    _paint_bowel(rng, grid, canvas, landmarks)
    _paint_organs(rng, grid, canvas, landmarks)
    _paint_fat_planes(rng, grid, canvas)
    return _render(rng, grid, canvas.tissue, enhancement, noise_std_hu), canvas


def _paint_body(rng: np.random.Generator, grid: _Grid, canvas: _Canvas) -> dict:
    """Skin, fat, muscle wall, cavity, diaphragm, lungs, heart, spine, muscles, ribs.

    Returns the anatomy landmarks the organs are placed against (mm) and the cavity mask.
    """
    x2, y2 = grid.x[:, :, 0], grid.y[:, :, 0]  # (X, 1), (1, Y)
    a = rng.uniform(140.0, 172.0)
    b = rng.uniform(105.0, 128.0)
    yc = rng.uniform(-8.0, 8.0)
    p_ant, p_post = rng.uniform(2.0, 2.5), rng.uniform(2.8, 3.6)
    theta = np.arctan2(y2 - yc, x2)  # (X, Y)
    wobble = 1.0 + sum(rng.uniform(0.0, 0.03) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                       for k in (2, 3, 4))
    p = np.where(y2 < yc, p_post, p_ant)
    rho2 = ((np.abs(x2) / a) ** p + (np.abs(y2 - yc) / b) ** p) ** (1.0 / p) / wobble
    ray = wobble / ((np.abs(np.cos(theta)) / a) ** p + (np.abs(np.sin(theta)) / b) ** p) ** (1.0 / p)
    zscale = 1.0 + rng.uniform(-0.06, 0.06) * (grid.z[0, 0] + 100.0) / 100.0  # (Z,)
    depth = (1.0 - rho2[:, :, None] / zscale) * (ray[:, :, None] * zscale)  # mm from skin, (X, Y, Z)
    depth = depth.astype(np.float32)

    fat0 = rng.uniform(12.0, 38.0)
    # anatomy 1: the back's fat 35 % thicker; 2: 30 % thinner (compressed, supine)
    post_fat = 0.35 if canvas.anatomy == 1 else -0.3
    fat = fat0 * (1.0 + 0.3 * np.cos(theta - rng.uniform(0, 2 * np.pi)) + post_fat * (y2 < yc))
    muscle = rng.uniform(9.0, 16.0) * (1.0 + 0.3 * np.abs(np.cos(theta)))
    fat3, wall3 = fat[:, :, None], (fat + muscle)[:, :, None]
    everything = (slice(None),) * 3
    canvas.paint(everything, depth >= 0, "muscle")  # skin
    canvas.paint(everything, depth >= 2.0, "fat")
    canvas.paint(everything, depth >= fat3, "muscle")
    cavity = depth >= wall3

    # Two-domed diaphragm: right dome higher; lungs and heart above it inside the cavity.
    dome = rng.uniform(-4.0, 4.0)
    zdiaph = (dome + 8.0 / (1.0 + np.exp(-x2 / 15.0)) - 0.0028 * (np.abs(x2) - 55.0) ** 2
              - 0.005 * np.minimum(y2 - 10.0, 0.0) ** 2)[:, :, None]
    thorax = cavity & (grid.z > zdiaph)
    canvas.paint(everything, thorax, "lung")
    heart = _Blob.sample(rng, (rng.uniform(-25, -5), rng.uniform(15, 35), dome + 50),
                         (rng.uniform(60, 72), rng.uniform(50, 60), 60.0), rng.uniform(-20, 20))
    sl, r, _ = heart.evaluate(grid)
    if sl is not None:
        canvas.paint(sl, (r < 1) & thorax[sl], "heart")
    cavity &= ~thorax

    # Spine: vertebral body with cortex and discs, canal, posterior elements, muscles.
    # anatomy 1: the vertebral body's back 62-72 mm in front of the back's fat (spine near the
    # body's centre); 2: 44-52 mm, the canal, arch and paraspinal muscles filling the space
    fat_post = fat0 * (1.0 + post_fat)
    rv = rng.uniform(16.0, 21.0)
    y_v = yc - b + fat_post + rng.uniform(*((62.0, 72.0) if canvas.anatomy == 1 else (44.0, 52.0))) + rv
    y_canal = y_v - rv - 10.0
    spinous_mm, para_y, para_b = (42.0, 18.0, 26.0) if canvas.anatomy == 1 else (32.0, 14.0, 22.0)
    psoas_top = rng.uniform(-130.0, -100.0)
    zz = grid.z[0, 0]
    r_psoas = np.clip((psoas_top - zz) / 70.0, 0.0, 1.0) * rng.uniform(18.0, 26.0) + 4.0  # (Z,)
    for side in (1.0, -1.0):
        para = ((x2 - side * 33.0) / 30.0) ** 2 + ((y2 - y_canal + para_y) / para_b) ** 2 < 1.0
        canvas.paint(everything, (para[:, :, None] & (depth > 5.0)), "muscle")
        d_psoas = np.sqrt((x2 - side * (rv + 16.0)) ** 2 + ((y2 - y_v - 2.0) * 1.2) ** 2)
        canvas.paint(everything, d_psoas[:, :, None] < r_psoas, "muscle")
    ell = np.sqrt((x2 / (1.15 * rv)) ** 2 + ((y2 - y_v) / rv) ** 2)
    disc_phase = rng.uniform(0, 32.0)
    is_disc = ((zz - disc_phase) % 32.0) < 7.0  # (Z,)
    canvas.paint(everything, (ell < 1.0)[:, :, None] & np.ones_like(is_disc), "bone_cortical")
    canvas.paint(everything, (ell < 1.0 - 2.5 / rv)[:, :, None] & ~is_disc, "bone_cancellous")
    canvas.paint(everything, (ell < 1.0)[:, :, None] & is_disc, "disc")
    d_canal = np.sqrt(x2**2 + (y2 - y_canal) ** 2)
    lamina = (d_canal < 15.0) & (y2 < y_canal + 4.0)
    spinous = (np.abs(x2) < 4.0) & (y2 < y_canal) & (y2 > y_canal - spinous_mm)
    transverse = (np.abs(y2 - y_canal - 2.0) < 4.0) & (np.abs(x2) < rv + 20.0)
    is_transverse = ((zz - disc_phase - 16.0) % 32.0) < 7.0
    posterior = (lamina | spinous)[:, :, None] | (transverse[:, :, None] & is_transverse)
    canvas.paint(everything, posterior, "bone_cortical")
    canvas.paint(everything, (d_canal < 8.0)[:, :, None] & np.ones_like(is_disc), "csf")
    spine = (ell < 1.4)[:, :, None] | posterior | (d_canal < 16.0)[:, :, None]
    cavity &= ~spine

    # Ribs: slanted bands in the inner part of the wall, lateral and posterior-lateral.
    period = rng.uniform(24.0, 32.0)
    slant = rng.uniform(0.25, 0.45)
    rib_low = rng.uniform(-120.0, -95.0)
    arc = np.abs(theta) * ray  # arc-length-like position along the wall (mm)
    inner = (depth >= wall3 - 0.5 * (wall3 - fat3)) & (depth <= wall3 + 4.0)
    band = np.sin(2 * np.pi * (grid.z - slant * arc[:, :, None]) / period) > 0.55
    lateral = ~((np.abs(x2) < 45.0) & (y2 > yc))[:, :, None] & ~((np.abs(x2) < 40.0) & (y2 < y_v))[:, :, None]
    low_edge = rib_low + 25.0 * np.abs(np.sin(theta))[:, :, None]
    canvas.paint(everything, inner & band & lateral & (grid.z > low_edge) & (depth > 0), "bone_cortical")
    cavity &= canvas.tissue != TISSUES["bone_cortical"]
    canvas.paint(everything, cavity, "fat")
    return {"cavity": cavity, "zdiaph": zdiaph, "y_v": y_v, "rv": rv, "a": a, "b": b, "yc": yc}


def _paint_bowel(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, anatomy: dict) -> None:
    """Unlabelled bowel loops in the lower and anterior cavity: wall, fluid, mixed, gas."""
    top = rng.uniform(-85.0, -60.0)
    sl = grid.box((-anatomy["a"], -anatomy["b"] - 20, -1e4), (anatomy["a"], anatomy["b"] + 20, top + 60.0))
    if sl is None:
        return
    shape = tuple(s.stop - s.start for s in sl)
    loops = _smooth_field(rng, shape, grid.spacing, rng.uniform(26.0, 36.0))
    _, y, z = grid.coords(sl)
    # Bowel fills the cavity below `top`, thinning upwards; more anteriorly.
    thr = -0.25 + np.clip((z - top) / 40.0, 0.0, 2.0) - 0.4 * np.clip(y / 80.0, 0.0, 1.0)
    inside = anatomy["cavity"][sl]
    bowel = inside & (loops > thr)
    lumen = bowel & (loops > thr + rng.uniform(0.3, 0.6))  # the margin sets the wall thickness
    content = _smooth_field(rng, shape, grid.spacing, 18.0)
    canvas.paint(sl, bowel, "bowel_wall")
    canvas.paint(sl, lumen, "bowel_fluid")
    canvas.paint(sl, lumen & (content > rng.uniform(0.0, 0.6)), "bowel_mixed")
    canvas.paint(sl, lumen & (content > rng.uniform(1.0, 1.6)), "air")


def _paint_organs(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, anatomy: dict) -> None:
    """Labelled organs, in paint order; each draws from ``rng`` in turn.

    Anatomy 1: later organs cut into earlier ones. Anatomy 2: organs never overwrite organs
    (:meth:`_Canvas.organ_outline`), so the order is a precedence: the great vessels and the
    retroperitoneal organs first, the liver last, filling the space the others leave it.
    """
    if canvas.anatomy == 1:
        z_liver = _paint_liver(rng, grid, canvas, anatomy)
        _paint_stomach(rng, grid, canvas, anatomy)
        _paint_spleen(rng, grid, canvas, anatomy)
        _paint_pancreas(rng, grid, canvas, anatomy)
        _paint_kidneys(rng, grid, canvas, anatomy)
        _paint_gallbladder(rng, grid, canvas, anatomy, z_liver)
        _paint_great_vessels(rng, grid, canvas, anatomy)
        return
    _paint_great_vessels(rng, grid, canvas, anatomy)
    kidney_right, _ = _paint_kidneys(rng, grid, canvas, anatomy)
    _paint_spleen(rng, grid, canvas, anatomy)
    _paint_pancreas(rng, grid, canvas, anatomy)
    z_liver = float(rng.uniform(-72.0, -50.0))
    _paint_gallbladder(rng, grid, canvas, anatomy, z_liver)
    _paint_stomach(rng, grid, canvas, anatomy)
    _paint_liver(rng, grid, canvas, anatomy, z_liver, kidney_right)


def _organ_space(grid: _Grid, anatomy: dict, sl: tuple[slice, slice, slice]) -> np.ndarray:
    """Where an organ may lie on the index box ``sl``: the abdominal cavity below the
    diaphragm, bool of the box's shape."""
    return anatomy["cavity"][sl] & (grid.z[:, :, sl[2]] < anatomy["zdiaph"][sl[0], sl[1]])


def _paint_liver(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, anatomy: dict,
                 z_liver: float | None = None, kidney_right: _Blob | None = None) -> float:
    """Liver: right lobe + left lobe, vessels inside. Returns the right lobe's centre z (mm),
    which the gallbladder hangs below (``z_liver``: given, or None = drawn here).

    kidney_right (anatomy 2): the right lobe stays in front of the kidney's posterior half
    below its upper pole (the renal impression: the liver touches the kidney's
    anterior-superior surface and never wraps round it) and off the IVC's back.
    """
    if z_liver is None:
        z_liver = rng.uniform(-72.0, -50.0)
    right = _Blob.sample(rng, (rng.uniform(50, 70), rng.uniform(-5, 15), z_liver),
                         (rng.uniform(62, 78), rng.uniform(75, 92), rng.uniform(68, 88)),
                         rng.uniform(-15, 15), taper=rng.uniform(0.05, 0.3), amp=0.14)
    left = _Blob.sample(rng, (rng.uniform(-35, -10), rng.uniform(35, 55), z_liver + rng.uniform(10, 30)),
                        (rng.uniform(45, 65), rng.uniform(24, 34), rng.uniform(35, 50)),
                        rng.uniform(-20, 20), amp=0.14)
    lo = np.minimum(right.bbox()[0], left.bbox()[0])
    hi = np.maximum(right.bbox()[1], left.bbox()[1])
    sl = grid.box(lo, hi)
    if sl is None:
        return z_liver
    liver = np.zeros(tuple(s.stop - s.start for s in sl), dtype=bool)
    for lobe in (right, left):
        lobe_sl, r, _ = lobe.evaluate(grid)
        if lobe_sl is not None:
            sub = tuple(slice(a.start - s.start, a.stop - s.start) for a, s in zip(lobe_sl, sl, strict=True))
            liver[sub] |= r < 1.0
    liver &= _organ_space(grid, anatomy, sl)
    if kidney_right is not None:
        x, y, z = grid.coords(sl)
        k = kidney_right
        liver &= ~((y < k.centre[1] + 0.5 * k.semi[1]) & (z < k.centre[2] + 0.9 * k.semi[2]))
        xi, yi, ri = anatomy["ivc"]
        liver &= ~((x < xi + 1.2 * ri) & (y < yi[sl[2]]))
    liver = canvas.organ_outline(sl, liver, "liver")
    canvas.paint(sl, liver, "liver", "liver")
    _paint_liver_vessels(rng, grid, canvas, sl, liver)
    return z_liver


def _paint_liver_vessels(rng: np.random.Generator, grid: _Grid, canvas: _Canvas,
                         sl: tuple[slice, slice, slice], liver: np.ndarray) -> None:
    """Vessels as tubes: where two smooth random fields are both near zero, inside ``liver``
    (bool mask on the index box ``sl``)."""
    v_corr = rng.uniform(22.0, 32.0)
    f1 = _smooth_field(rng, liver.shape, grid.spacing, v_corr)
    f2 = _smooth_field(rng, liver.shape, grid.spacing, v_corr)
    width = rng.uniform(0.2, 0.3)
    canvas.paint(sl, liver & (np.abs(f1) < width) & (np.abs(f2) < width * 2.0), "liver_vessel", "liver")


def _paint_stomach(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, anatomy: dict) -> None:
    """Stomach: left upper quadrant; wall, fluid or food, anterior air-fluid level."""
    if canvas.anatomy == 1:
        centre = (rng.uniform(-68, -40), rng.uniform(12, 38), rng.uniform(-70, -40))
        semi = (rng.uniform(35, 52), rng.uniform(28, 42), rng.uniform(45, 65))
    else:  # left anterior, in front of the pancreas and the left kidney
        centre = (rng.uniform(-60, -30), anatomy["y_v"] + rng.uniform(65, 85), rng.uniform(-70, -40))
        semi = (rng.uniform(30, 45), rng.uniform(25, 36), rng.uniform(40, 58))
    stomach = _Blob.sample(rng, centre, semi, rng.uniform(-30, 30), amp=0.12)
    sl, r, _ = stomach.evaluate(grid)
    if sl is None:
        return
    inside = canvas.organ_outline(sl, (r < 1.0) & _organ_space(grid, anatomy, sl), "stomach")
    wall_frac = rng.uniform(4.0, 7.0) / float(stomach.semi.mean())
    canvas.paint(sl, inside, "stomach_wall", "stomach")
    lumen = inside & (r < 1.0 - wall_frac)
    food = rng.random() < 0.4
    canvas.paint(sl, lumen, "stomach_food" if food else "stomach_fluid", "stomach")
    if rng.random() < 0.8:
        level = stomach.centre[1] + stomach.semi[1] * rng.uniform(0.0, 0.8)
        canvas.paint(sl, lumen & (grid.coords(sl)[1] > level), "air", "stomach")


def _paint_spleen(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, anatomy: dict) -> None:
    """Spleen: posterior-lateral left, crescent from a hilar notch."""
    if canvas.anatomy == 1:
        centre = (rng.uniform(-112, -88), rng.uniform(-50, -25), rng.uniform(-78, -45))
    else:  # lateral to the left kidney, at about the vertebral body's AP level
        centre = (rng.uniform(-118, -98), anatomy["y_v"] + rng.uniform(0, 20), rng.uniform(-78, -45))
    spleen = _Blob.sample(rng, centre, (rng.uniform(18, 28), rng.uniform(42, 58), rng.uniform(42, 58)),
                          rng.uniform(-55, -30), amp=0.12)
    sl, r, q = spleen.evaluate(grid)
    if sl is None:
        return
    notch = (q[0] - 1.1) ** 2 / 0.5 + q[1] ** 2 / 0.25 + q[2] ** 2 / 0.5 < 1.0
    blob = (r < 1.0) & ~notch & _organ_space(grid, anatomy, sl)
    canvas.paint(sl, canvas.organ_outline(sl, blob, "spleen"), "spleen", "spleen")


def _paint_pancreas(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, anatomy: dict) -> None:
    """Pancreas: a lobulated tube from the head (right of midline) to the tail at the spleen,
    arching over the aorta."""
    y_v, rv = anatomy["y_v"], anatomy["rv"]
    x_head, x_tail = rng.uniform(15, 35), rng.uniform(-100, -80)
    z_p = rng.uniform(-118.0, -95.0)
    # anatomy 2: further forward, in front of the aorta and the splenic vein's course
    y_front = y_v + rv + rng.uniform(*((32.0, 42.0) if canvas.anatomy == 1 else (44.0, 56.0)))
    sl = grid.box((x_tail - 15, y_v - 40, z_p - 40), (x_head + 15, y_front + 50, z_p + 40))
    if sl is None:
        return
    x, y, z = grid.coords(sl)
    t = (x_head - x) / (x_head - x_tail)  # 0 head .. 1 tail, (X,1,1)
    yc_p = y_front + rng.uniform(5, 15) * np.sin(np.pi * np.clip(t, 0, 1)) - rng.uniform(25, 45) * t**2
    zc_p = z_p + rng.uniform(5, 20) * t
    half_y = 14.0 - 6.0 * t
    half_z = 12.0 - 3.0 * t + 12.0 * np.clip(1.0 - t / 0.2, 0.0, 1.0)
    lobes = 0.18 * np.sin(2 * np.pi * x / rng.uniform(12, 18) + rng.uniform(0, 6.3)) \
        * np.cos(2 * np.pi * z / rng.uniform(10, 16))
    pancreas = (((y - yc_p) / half_y) ** 2 + ((z - zc_p) / half_z) ** 2 < 1.0 + lobes) \
        & (t >= -0.1) & (t <= 1.0)
    blob = pancreas & _organ_space(grid, anatomy, sl)
    canvas.paint(sl, canvas.organ_outline(sl, blob, "pancreas"), "pancreas", "pancreas")


def _paint_kidneys(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, anatomy: dict
                   ) -> tuple[_Blob, _Blob]:
    """Kidneys either side of the spine, the left one higher (both heights drawn first).
    Anatomy 2: 10 mm lower, the left 10-18 mm higher (upper poles about 60-95 mm below the
    dome), 46-56 mm semi-long axis. Returns the (right, left) blobs."""
    if canvas.anatomy == 1:
        z_right = rng.uniform(-130.0, -105.0)
        z_left = z_right + rng.uniform(5, 20)
        half_length = (48.0, 60.0)
    else:
        z_right = rng.uniform(-140.0, -115.0)
        z_left = z_right + rng.uniform(10, 18)
        half_length = (46.0, 56.0)
    right = _paint_kidney(rng, grid, canvas, anatomy, 1.0, "kidney_right", z_right, half_length)
    left = _paint_kidney(rng, grid, canvas, anatomy, -1.0, "kidney_left", z_left, half_length)
    return right, left


def _paint_kidney(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, anatomy: dict,
                  side: float, name: str, z_mm: float, half_length: tuple[float, float]) -> _Blob:
    """One kidney centred at height ``z_mm``, on the patient's right (side +1) or left (-1),
    ``half_length`` the range of its semi-long axis (mm): cortex, medulla, and a medial hilum
    of sinus fat. Returns its blob."""
    y_v, rv = anatomy["y_v"], anatomy["rv"]
    kidney = _Blob.sample(rng, (side * rng.uniform(rv + 48, rv + 62), y_v + rng.uniform(-5, 8), z_mm),
                          (rng.uniform(24, 30), rng.uniform(21, 27), rng.uniform(*half_length)),
                          -side * rng.uniform(15, 35), tilt_deg=10.0, amp=0.06)
    sl, r, q = kidney.evaluate(grid)
    if sl is None:
        return kidney
    inside = canvas.organ_outline(sl, (r < 1.0) & _organ_space(grid, anatomy, sl), name)
    # the hilum faces antero-medially: local -side*u after the yaw of -side*(15..35) deg
    medial = -side * q[0]
    sinus = (medial > 0.3) & (np.abs(q[2]) < 0.45) & (np.abs(q[1]) < 0.45)
    canvas.paint(sl, inside, "kidney_cortex", name)
    canvas.paint(sl, inside & (r < rng.uniform(0.62, 0.72)), "kidney_medulla", name)
    canvas.paint(sl, inside & sinus, "fat")
    return kidney


def _paint_gallbladder(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, anatomy: dict,
                       z_liver: float) -> None:
    """Gallbladder under the liver (``z_liver``: the right lobe's centre z); absent in some cases."""
    if rng.random() >= 0.88:
        return
    if canvas.anatomy == 1:
        centre = (rng.uniform(30, 55), rng.uniform(25, 50), z_liver - rng.uniform(35, 60))
    else:  # anterior, at the liver's inferior surface
        centre = (rng.uniform(40, 62), anatomy["y_v"] + rng.uniform(75, 95), z_liver - rng.uniform(55, 75))
    gb = _Blob.sample(rng, centre, (rng.uniform(12, 20), rng.uniform(14, 22), rng.uniform(24, 38)),
                      rng.uniform(-30, 30), amp=0.06)
    sl, r, _ = gb.evaluate(grid)
    if sl is not None:
        blob = (r < 1.0) & _organ_space(grid, anatomy, sl)
        canvas.paint(sl, canvas.organ_outline(sl, blob, "gallbladder"), "gallbladder", "gallbladder")


def _paint_great_vessels(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, anatomy: dict) -> None:
    """Aorta (left-anterior of the spine) and IVC (right-anterior, entering the liver above)."""
    cavity, y_v, rv = anatomy["cavity"], anatomy["y_v"], anatomy["rv"]
    everything = (slice(None),) * 3
    zz = grid.z[0, 0]
    r_a = rng.uniform(10.0, 13.0)
    xa = -rng.uniform(0.3, 0.8) * rv + rng.uniform(-0.05, 0.05) * (zz + 100.0)
    ya = y_v + rv + r_a + 2.0 + 0.03 * (zz + 100.0)
    d_a = np.sqrt((grid.x - xa) ** 2 + (grid.y - ya) ** 2) < r_a
    canvas.paint(everything, canvas.organ_outline(everything, d_a & cavity, "aorta"), "aorta", "aorta")
    xi = rng.uniform(0.6, 1.0) * rv + 8.0
    yi = y_v + rv + 12.0 + 25.0 * np.clip((zz + 70.0) / 60.0, 0.0, 1.0)
    ri = rng.uniform(11.0, 15.0), rng.uniform(7.0, 10.0)
    d_i = ((grid.x - xi) / ri[0]) ** 2 + ((grid.y - yi) / ri[1]) ** 2 < 1.0
    anatomy["ivc"] = (xi, yi, ri[0])  # (mm, (Z,) mm, mm): the liver keeps off its back (anatomy 2)
    ivc = canvas.organ_outline(everything, d_i & cavity & (grid.z < anatomy["zdiaph"]), "ivc")
    canvas.paint(everything, ivc, "ivc", "ivc")


def _paint_fat_planes(rng: np.random.Generator, grid: _Grid, canvas: _Canvas) -> None:
    """Thin fat planes between organs and the unlabelled soft tissue they touch.

    Where an organ borders muscle or bowel, the background side gets fat within a per-case
    plane thickness t ~ U(1, 3) mm (at least one voxel), on the part of the boundary where a
    smooth random field exceeds a per-case threshold (about 35-75 % covered); elsewhere the
    organ touches the soft tissue directly. Organs touching each other keep no plane.
    """
    organ = canvas.label > 0
    sl = grid.box(*_mask_extent(organ, grid))
    if sl is None:
        return
    t_mm = rng.uniform(1.0, 3.0)
    steps = max(1, int(round(t_mm / min(grid.spacing[:2]))))
    ring = ndimage.binary_dilation(organ[sl], np.ones((3, 3, 1), bool), iterations=steps) & ~organ[sl]
    soft = np.isin(canvas.tissue[sl], [TISSUES[n] for n in ("muscle", "bowel_wall", "bowel_fluid",
                                                               "bowel_mixed")])
    shape = tuple(s_.stop - s_.start for s_ in sl)
    covered = _smooth_field(rng, shape, grid.spacing, 40.0) > rng.uniform(-0.4, 0.4)
    canvas.paint(sl, ring & soft & covered, "fat")


def _mask_extent(mask: np.ndarray, grid: _Grid) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mm bounding box (lo, hi) of a mask's voxels, padded by 5 mm; an empty box if none."""
    if not mask.any():
        return (0.0, 0.0, 0.0), (-1.0, -1.0, -1.0)
    axes = (grid.x.ravel(), grid.y.ravel(), grid.z.ravel())
    lo, hi = [], []
    for k, coords in enumerate(axes):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k)))
        lo.append(float(coords[hit[0]]) - 5.0)
        hi.append(float(coords[hit[-1]]) + 5.0)
    return tuple(lo), tuple(hi)


def _render(rng: np.random.Generator, grid: _Grid, tissue: np.ndarray, enhancement: float,
            noise_std_hu: float) -> np.ndarray:
    """HU = mean[tissue] + texture_std[tissue] * T, Gaussian PSF, + correlated noise.

    mean[t] = u_t + e * g_t * (p_t - u_t) + o_t: unenhanced / portal-venous table values u, p,
    enhancement level e, per-tissue uptake g_t ~ U(0.8, 1.2), per-tissue offset o_t ~ N(0, 6)
    HU, and a liver offset ~ U(-20, 6) HU (steatosis darkens the liver, whatever the phase).
    """
    unenhanced = np.array([row[1] for row in _TISSUE_TABLE], dtype=np.float32)
    enhanced = np.array([row[2] for row in _TISSUE_TABLE], dtype=np.float32)
    uptake = rng.uniform(0.8, 1.2, size=len(_TISSUE_TABLE)).astype(np.float32)
    table = unenhanced + np.float32(enhancement) * uptake * (enhanced - unenhanced)
    soft = np.abs(table) < 300
    table[soft] += rng.normal(0.0, 6.0, size=int(soft.sum())).astype(np.float32)
    table[[TISSUES["liver"], TISSUES["liver_vessel"]]] += np.float32(rng.uniform(-20.0, 6.0))
    texture_std = np.array([row[3] for row in _TISSUE_TABLE], dtype=np.float32)
    texture = _smooth_field(rng, tissue.shape, grid.spacing, rng.uniform(10.0, 18.0))
    hu = table[tissue] + texture_std[tissue] * texture
    sx, sy, sz = grid.spacing
    psf_mm = rng.uniform(0.5, 0.8)
    hu = ndimage.gaussian_filter(hu, (psf_mm / sx, psf_mm / sy, 0.42), mode="nearest")
    corr_mm = rng.uniform(0.7, 1.1)
    noise = rng.standard_normal(tissue.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (corr_mm / sx, corr_mm / sy, 0.0), mode="wrap")
    noise *= np.float32(noise_std_hu / (noise.std() + 1e-12))
    air = tissue == TISSUES["air"]
    hu += noise
    hu[air & (hu < -1000)] = -1000.0 + np.abs(hu[air & (hu < -1000)] + 1000.0)
    return np.clip(hu, -1024.0, 3071.0).astype(np.float32)


def _check_grid(shape_xyz, spacing_mm) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(int(n) for n in shape_xyz)
    spacing = tuple(float(s) for s in spacing_mm)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"Illegal shape {shape_xyz}: need three sizes >= 1 (X, Y, Z)")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"Illegal spacing {spacing_mm}: need three values > 0 mm (sx, sy, sz)")
    return shape, spacing


# --------------------------------------------------------------------------- dataset writer


def write_phantom_dataset(out_dir: str | os.PathLike, cases: int, seed: int = 0,
                          spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
                          shape: tuple[int, int, int] | None = None,
                          pretrain_fraction: float = 0.5, train_fraction: float = 0.2,
                          montage: bool = True, progress: bool = False, anatomy: int = 1) -> Path:
    """Write ``cases`` phantoms as an nnU-Net v2 raw dataset at ``out_dir`` (atomically).

    Layout: ``dataset.json`` (name, channel_names {"0": "CT"}, labels, numTraining,
    file_ending ".nii.gz", plus a "phantoms" record of seed, spacing, shape, the anatomy version
    and each case's contrast phase), ``imagesTr/<id>_0000.nii.gz`` (float32 HU), ``labelsTr/<id>.nii.gz``
    (uint8), ``splits.json`` (:func:`lrcseg.data.splits.make_splits`) and ``montage.png``.
    Case i is drawn from child i of ``np.random.SeedSequence(seed)``: the same whatever ``cases``.
    anatomy: the anatomy version of :func:`generate_phantom` (1 = the phantoms of earlier releases).
    Raises FileExistsError if ``out_dir`` exists; nothing is left behind on failure.
    """
    if cases < 1:
        raise ValueError(f"Illegal number of cases {cases}: need >= 1")
    if anatomy not in ANATOMY_VERSIONS:
        raise ValueError(f"Illegal anatomy {anatomy!r}: one of {ANATOMY_VERSIONS}")
    shape = default_shape(spacing_mm) if shape is None else shape
    shape, spacing_mm = _check_grid(shape, spacing_mm)
    affine = phantom_affine(shape, spacing_mm)
    ids = [f"phantom_{i:03d}" for i in range(cases)]
    splits = make_splits(ids, pretrain_fraction, train_fraction)
    children = np.random.SeedSequence(seed).spawn(cases)
    out_dir = Path(out_dir)
    phases: dict[str, str] = {}
    previews = []
    with atomic_dir(out_dir) as tmp:
        for i, (case_id, child) in enumerate(zip(ids, children, strict=True)):
            rng = np.random.default_rng(child)
            phase = PHASES[0] if rng.random() < 0.7 else PHASES[1]
            hu, labels = generate_phantom(rng, shape, spacing_mm, phase=phase, anatomy=anatomy)
            write_nifti(tmp / "imagesTr" / f"{case_id}_0000.nii.gz", hu, affine, np.float32)
            write_nifti(tmp / "labelsTr" / f"{case_id}.nii.gz", labels, affine, np.uint8)
            phases[case_id] = phase
            if montage and i < 2:
                previews.append((case_id, hu, labels))
            if progress:
                print(f"  {case_id}: {phase}", flush=True)
        atomic_write_json(tmp / "dataset.json", {
            "name": out_dir.name,
            "description": "lrcseg synthetic abdominal CT phantoms",
            "channel_names": {"0": "CT"},
            "labels": dict(LABELS),
            "numTraining": cases,
            "file_ending": ".nii.gz",
            "phantoms": {"seed": int(seed), "spacing_mm": list(spacing_mm), "shape": list(shape),
                         "anatomy": int(anatomy), "phases": phases},
        })
        atomic_write_json(tmp / "splits.json", splits)
        if previews:
            _write_montage(tmp / "montage.png", previews, affine)
    return out_dir


def _write_montage(path: Path, previews: list[tuple[str, np.ndarray, np.ndarray]],
                   affine: np.ndarray) -> None:
    """Four slices per case (where the most organs are), window -175..250 HU, label overlay,
    an organ colour legend, scale bars and slice positions (mm, from ``affine``)."""
    # viz loads matplotlib: imported here so that `lrcseg phantoms --help` stays light
    from lrcseg import viz

    images, labels, titles, z_mm = [], [], [], []
    for case_id, hu, lab in previews:
        organ_slices = np.flatnonzero((lab > 0).any(axis=(0, 1)))
        if organ_slices.size == 0:
            organ_slices = np.arange(hu.shape[2])
        for z in np.linspace(organ_slices[0], organ_slices[-1], 4).round().astype(int):
            images.append(viz.hu_to_grey(hu[:, :, z], (-175.0, 250.0)))
            labels.append(lab[:, :, z])
            titles.append(f"{case_id} z={z}")
            z_mm.append(float((affine @ [0.0, 0.0, float(z), 1.0])[2]))
    spacing_xy = tuple(float(v) for v in np.linalg.norm(affine[:3, :2], axis=0))
    viz.montage(images, labels, titles, path, ncols=4, label_names=LABELS,
                spacing_xy=spacing_xy, z_mm=z_mm)
