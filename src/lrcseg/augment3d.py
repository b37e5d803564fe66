"""Pre-training's paired views in 3D: two overlapping patches of one volume and of its
supervoxel map, batched on CPU or GPU.

The 3D counterpart of ``lrcseg.augment.PairedViewAugment``, with the same transform family and
the same draws from a ``torch.Generator``: each view gets its own random affine (zoom about its
crop centre, rotation about the axial axis, small tilts out of the axial plane, optional
left-right flip, translation), composed into one (B, 3, 4) matrix per sample and applied with
``affine_grid`` / ``grid_sample``: trilinear for the image, nearest for the supervoxel map, so
supervoxel ids keep corresponding across the two views by construction. Intensity jitter
(gamma, contrast, brightness, blur, noise) touches the image only.

Conventions. A batch of patches is (B, C, D, H, W): D the axial (z, superior) axis, H and W
the in-plane axes of the 2D slices (``docs/DESIGN.md``); maps are (B, D, H, W). Boxes and
affine matrices use ``affine_grid``'s coordinate order x, y, z = W, H, D, as the 2D boxes
(cx, cy, w, h) do: a box is (cx, cy, cz, w, h, d) in fractions of the volume's extent.
Voxel spacing (``spacing_mm``, per axis D, H, W) makes the rotation a rotation in millimetres
on an anisotropic grid; the output keeps the input's anisotropy (its voxels are the input's
divided by the zoom).

``jitter_intensity`` and ``gaussian_blur`` take a batch of either dimension: on (B, C, H, W)
they give exactly what ``PairedViewAugment``'s intensity jitter and ``augment._gaussian_blur``
give (tested bit for bit), so the 2D code could call them instead of its own copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lrcseg.augment import _FALLBACK_STEPS, CROP_TRIES, jitter_intensity
from lrcseg.config import AugmentConfig

#: default maximum tilt out of the axial plane (degrees, about each in-plane axis); ours,
#: small so that the axial anatomy a fine-tuned 2D or 3D network sees stays axial
TILT_DEG = 5.0


def patch_overlap(box1: Tensor, box2: Tensor) -> Tensor:
    """Intersection volume over the smaller box's volume.

    box*: (..., 2k) float tensors (centre, then size, per axis, in fractions of the canvas):
    (cx, cy, cz, w, h, d) for patches (k = 3), (cx, cy, w, h) for slices (k = 2, the same as
    ``augment.box_overlap``). Returns (...) in [0, 1].
    """
    k = box1.shape[-1] // 2
    lo = torch.maximum(box1[..., :k] - box1[..., k:] / 2, box2[..., :k] - box2[..., k:] / 2)
    hi = torch.minimum(box1[..., :k] + box1[..., k:] / 2, box2[..., :k] + box2[..., k:] / 2)
    inter = (hi - lo).clamp(min=0).prod(-1)
    smaller = torch.minimum(box1[..., k:].prod(-1), box2[..., k:].prod(-1))
    return inter / smaller


def rotation_3d(phi: Tensor, tilt_x: Tensor, tilt_y: Tensor) -> Tensor:
    """(B, 3, 3) rotations in (x, y, z) = (W, H, D) coordinates: R = Rz(phi) Rx(tilt_x)
    Ry(tilt_y), a rotation by ``phi`` about the axial axis z (the 2D views' rotation) after
    tilts about the in-plane axes. Angles: (B,) tensors in radians, of one dtype."""
    one, zero = torch.ones_like(phi), torch.zeros_like(phi)

    def matrix(rows: list[list[Tensor]]) -> Tensor:
        return torch.stack([torch.stack(row, dim=1) for row in rows], dim=1)

    c, s = torch.cos(phi), torch.sin(phi)
    rz = matrix([[c, -s, zero], [s, c, zero], [zero, zero, one]])
    c, s = torch.cos(tilt_x), torch.sin(tilt_x)
    rx = matrix([[one, zero, zero], [zero, c, -s], [zero, s, c]])
    c, s = torch.cos(tilt_y), torch.sin(tilt_y)
    ry = matrix([[c, zero, s], [zero, one, zero], [-s, zero, c]])
    return rz @ rx @ ry


def affine_theta_3d(rotation: Tensor, half_sizes: Tensor, centres: Tensor, extent: Tensor) -> Tensor:
    """(B, 3, 4) ``affine_grid`` matrices (output [-1, 1]^3 -> input normalised coordinates) of
    an output box rotated about its centre.

    theta = [diag(2 / E) R diag(h) | 2 c - 1]: the output cube scaled by the half-sizes h, rotated
    by R, brought to normalised input coordinates by the input's extent E and moved to the box
    centre c. rotation: (B, 3, 3); half_sizes: (B, 3), negative to flip an axis; centres: (B, 3)
    in fractions of the canvas; extent: (B, 3) or (3,), the input's size in the units of the
    half-sizes (millimetres, so R is a true rotation on an anisotropic grid). All in (x, y, z)
    order; the 3D form of ``augment.affine_theta``.
    """
    extent = extent.expand_as(half_sizes)
    linear = (2 / extent)[:, :, None] * rotation * half_sizes[:, None, :]
    return torch.cat([linear, (2 * centres - 1)[:, :, None]], dim=2)


def warp_3d(images: Tensor, maps: Tensor, theta: Tensor,
            size: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """Resample images (B, C, D, H, W) trilinearly and integer maps (B, D, H, W) (supervoxels,
    labels) by nearest neighbour on a size = (D', H', W') output grid of ``theta`` (B, 3, 4)
    float32; outside the input: 0. Returns (B, C, D', H', W') in the images' dtype and
    (B, D', H', W') long."""
    b, c = images.shape[:2]
    grid = F.affine_grid(theta, [b, c, *size], align_corners=False)
    view = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False)
    # float32 holds integer ids exactly up to 2**24
    ids = F.grid_sample(maps[:, None].to(torch.float32), grid, mode="nearest",
                        padding_mode="zeros", align_corners=False)
    return view, ids[:, 0].round().long()


class PairedVolumeAugment:
    """Two augmented views of a batch of volume patches and of their supervoxel maps.

    Args:
        cfg: AugmentConfig, the 2D views' settings where they mean the same in 3D: ``zoom``
            (required here), ``min_overlap``, ``rotation_deg`` (about the axial axis),
            ``hflip`` (left-right, the W axis) and the intensity jitter (gamma, contrast,
            brightness, blur_prob / blur_sigma in voxels along every axis, noise_std).
            ``image_size``, ``crop_scale`` and ``crop_ratio`` are the 2D crop's and unused.
        patch_size: (S_d, S_h, S_w), the output patch in voxels.
        tilt_deg: maximum absolute tilt about each in-plane axis (W and H), >= 0.

    Geometry per sample and view: zoom z log-uniform in ``cfg.zoom`` (the same for every axis,
    a physical scale), so the view covers S / z input voxels along each axis; its centre
    uniform such that the box stays inside the volume along every axis it fits in (a box
    longer than the volume along an axis covers the whole axis, the rest is padding, not a
    stretch). The second box is drawn so the two overlap by >= ``cfg.min_overlap`` of the
    smaller one's volume (``sample_crop_pair_3d``: rejection, then a pull towards the first
    box's centre, then a copy of the first box, as in 2D). Rotation phi ~ U(+-rotation_deg)
    about the axial axis, tilts ~ U(+-tilt_deg) about the W and H axes, flip of W with
    probability 1/2 if hflip. Out-of-volume voxels get image 0 and supervoxel 0 (ignored).
    Intensity: ``jitter_intensity``.

    Call with images (B, C, D, H, W) float, regions (B, D, H, W) integer, a CPU
    torch.Generator and optionally ``spacing_mm`` ((3,) or (B, 3), the voxel size along D, H,
    W; None = isotropic); returns view1 (B, C, S_d, S_h, S_w), regions1 (B, S_d, S_h, S_w)
    long, view2, regions2, on the images' device. All randomness comes from the generator.
    """

    def __init__(self, cfg: AugmentConfig, patch_size: Sequence[int], tilt_deg: float = TILT_DEG):
        if not isinstance(cfg, AugmentConfig):
            raise ValueError(f"PairedVolumeAugment needs an AugmentConfig, got {type(cfg).__name__}")
        if cfg.zoom is None:
            raise ValueError("PairedVolumeAugment needs AugmentConfig.zoom (the canvas-relative "
                             "crop_scale is 2D only)")
        if len(patch_size) != 3 or any(int(s) != s or s < 1 for s in patch_size):
            raise ValueError(f"Illegal patch_size {tuple(patch_size)}: three positive integers "
                             "(S_d, S_h, S_w)")
        if not 0 <= tilt_deg <= 45:
            raise ValueError(f"Illegal tilt_deg {tilt_deg}: need 0 <= tilt_deg <= 45")
        self.cfg = cfg
        self.patch_size = tuple(int(s) for s in patch_size)
        self.tilt_deg = float(tilt_deg)

    def __call__(self, images: Tensor, regions: Tensor, generator: torch.Generator,
                 spacing_mm: Tensor | Sequence[float] | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if images.ndim != 5 or not images.is_floating_point():
            raise ValueError(f"images must be a float (B, C, D, H, W) tensor, got "
                             f"{tuple(images.shape)} {images.dtype}")
        b, _, d, h, w = images.shape
        if regions.shape != (b, d, h, w):
            raise ValueError(f"regions shape {tuple(regions.shape)} must be (B, D, H, W) = "
                             f"{(b, d, h, w)}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        spacing = self._spacing(spacing_mm, b)
        box1, box2 = self.sample_crop_pair_3d(b, (d, h, w), generator)
        outputs = []
        for box in (box1, box2):
            theta = self.affine(box, (d, h, w), generator, spacing).to(images.device)
            view, view_regions = warp_3d(images, regions, theta, self.patch_size)
            outputs += [jitter_intensity(view, self.cfg, generator), view_regions]
        return outputs[0], outputs[1], outputs[2], outputs[3]

    @staticmethod
    def _spacing(spacing_mm: Tensor | Sequence[float] | None, batch: int) -> Tensor:
        """(B, 3) float64 voxel sizes along D, H, W."""
        if spacing_mm is None:
            return torch.ones(batch, 3, dtype=torch.float64)
        spacing = torch.as_tensor(spacing_mm, dtype=torch.float64).cpu()
        if spacing.shape not in ((3,), (batch, 3)) or not bool((spacing > 0).all()):
            raise ValueError(f"spacing_mm must be (3,) or (B, 3) = (D, H, W) voxel sizes > 0, "
                             f"got {tuple(spacing.shape)} {spacing.tolist()}")
        return spacing.expand(batch, 3)

    # ------------------------------------------------------------------ geometry
    def sample_crops_3d(self, n: int, shape: tuple[int, int, int],
                        generator: torch.Generator) -> Tensor:
        """n random boxes (n, 6) = (cx, cy, cz, w, h, d) in fractions of a (D, H, W) volume:
        S / z voxels along each axis, z log-uniform in ``cfg.zoom``."""
        u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
        lo, hi = math.log(self.cfg.zoom[0]), math.log(self.cfg.zoom[1])
        zoom = torch.exp(lo + (hi - lo) * u[:, 0])
        # x, y, z = W, H, D: patch sides and canvas sides in that order
        sides = torch.tensor(self.patch_size[::-1], dtype=torch.float64)
        canvas = torch.tensor(shape[::-1], dtype=torch.float64)
        size = sides[None] / zoom[:, None] / canvas[None]
        centre = size / 2 + u[:, 1:] * (1 - size)
        return torch.cat([centre, size], dim=1)

    def sample_crop_pair_3d(self, batch: int, shape: tuple[int, int, int],
                            generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Boxes (B, 6) for both views of a (D, H, W) volume; patch_overlap(box1, box2) >=
        cfg.min_overlap (``PairedViewAugment.sample_crop_pair`` in 3D)."""
        box1 = self.sample_crops_3d(batch, shape, generator)
        cand = self.sample_crops_3d(CROP_TRIES * batch, shape, generator).view(CROP_TRIES, batch, 6)
        # Fallback candidates: the first try's centre pulled towards the first box's centre,
        # kept where that box may lie (inside the volume, or covering an axis it is longer than)
        first = cand[0]
        half = first[:, 3:] / 2
        low, high = torch.minimum(half, 1 - half), torch.maximum(half, 1 - half)
        pulled = []
        for t in _FALLBACK_STEPS:
            centre = box1[:, :3] + t * (first[:, :3] - box1[:, :3])
            pulled.append(torch.cat([torch.minimum(torch.maximum(centre, low), high), first[:, 3:]],
                                    dim=1))
        cand = torch.cat([cand, torch.stack(pulled), box1[None]], dim=0)  # last: a copy of box1
        ok = patch_overlap(box1[None], cand) >= self.cfg.min_overlap
        ok[-1] = True
        pick = torch.argmax(ok.to(torch.int8), dim=0)  # first candidate that satisfies
        return box1, cand[pick, torch.arange(batch)]

    def affine(self, boxes: Tensor, shape: tuple[int, int, int], generator: torch.Generator,
               spacing_mm: Tensor | None = None) -> Tensor:
        """(B, 3, 4) float32 ``affine_grid`` matrices of boxes (B, 6) in a (D, H, W) volume with
        voxel sizes ``spacing_mm`` (B, 3) along D, H, W (None = isotropic): rotation about
        the axial axis, tilts, flip drawn from ``generator`` (``affine_theta_3d`` in mm)."""
        n = boxes.shape[0]
        spacing = self._spacing(spacing_mm, n).flip(1)  # x, y, z order
        u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
        phi = math.radians(self.cfg.rotation_deg) * (2 * u[:, 0] - 1)
        tilt = math.radians(self.tilt_deg)
        rotation = rotation_3d(phi, tilt * (2 * u[:, 1] - 1), tilt * (2 * u[:, 2] - 1))
        flip = torch.where((u[:, 3] < 0.5) & self.cfg.hflip, -1.0, 1.0).to(torch.float64)
        extent = torch.tensor(shape[::-1], dtype=torch.float64) * spacing
        half = boxes[:, 3:] * extent / 2
        half = half * torch.stack([flip, torch.ones_like(flip), torch.ones_like(flip)], dim=1)
        return affine_theta_3d(rotation, half, boxes[:, :3], extent).to(torch.float32)

    def labels_in_views(self, organs: Tensor, replay: torch.Generator,
                        spacing_mm: Tensor | Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
        """Organ labels (B, D, H, W) carried through the same geometry as the views.

        ``replay`` must be a fresh copy of the generator the views were drawn from (and
        ``spacing_mm`` the same): the augmentation is replayed on a dummy image. Voxels outside
        the volume and unlabelled ones (-1) come back as 0. Returns labels1, labels2
        (B, S_d, S_h, S_w) long.
        """
        dummy = torch.zeros(organs.shape[0], 1, *organs.shape[1:], device=organs.device)
        _, labels1, _, labels2 = self(dummy, organs.clamp(min=0), replay, spacing_mm)
        return labels1, labels2
