"""The number of spatial dimensions: decided once (``ModelConfig.spatial_dims``) and followed by
the U-Net, the heads, the global methods, the LRC loss and the paired 3D views; 2D unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.networks.nets import FlexibleUNet
from torch import nn

from lrcseg.augment import box_overlap, gaussian_blur, jitter_intensity
from lrcseg.augment3d import (
    PairedVolumeAugment,
    affine_theta_3d,
    patch_overlap,
    rotation_3d,
    warp_3d,
)
from lrcseg.config import (
    AugmentConfig,
    LRCConfig,
    ModelConfig,
    PretrainConfig,
    RunConfig,
    from_dict,
    load_config,
    to_dict,
)
from lrcseg.errors import ConfigError
from lrcseg.losses.lrc import LRCLoss, ViewMaps, downsample_regions, region_majority
from lrcseg.methods.base import MethodContext, Views
from lrcseg.methods.moco import MoCo
from lrcseg.methods.supervised import Supervised
from lrcseg.models.heads import GlobalProjectionHead, LocalProjectionHead
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.train.pretrain import _middle_slice
from lrcseg.train.resume import check_resume_compatible

NO_INTENSITY = {"brightness": 0.0, "contrast": 0.0, "gamma": (1.0, 1.0), "noise_std": 0.0,
                "blur_prob": 0.0}
SMALL = {"backbone": "resnet10", "decoder_channels": (32, 16, 16, 8, 8), "proj_dim": 16}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def net3d() -> PretrainNetwork:
    torch.manual_seed(0)
    return PretrainNetwork(ModelConfig(**SMALL, local_levels=(2, 3), spatial_dims=3), 1)


def _block_volume(batch: int, shape: tuple[int, int, int], cell: int) -> torch.Tensor:
    """(B, D, H, W) supervoxel map of cell^3 blocks, ids 1..n (the same in every sample)."""
    d, h, w = (s // cell for s in shape)
    ids = torch.arange(1, d * h * w + 1).view(d, h, w)
    for axis in range(3):
        ids = ids.repeat_interleave(cell, axis)
    return ids.expand(batch, *shape).contiguous()


# --------------------------------------------------------------------------- the config


def test_spatial_dims_is_validated_and_a_config_without_it_is_2d(tmp_path):
    assert ModelConfig().spatial_dims == 2 and ModelConfig(spatial_dims=3).spatial_dims == 3
    for bad in (1, 4, "3", True, None):
        with pytest.raises(ConfigError, match="spatial_dims"):
            ModelConfig(spatial_dims=bad)
    old = {"backbone": "resnet18", "local_levels": [3]}  # a run folder's model section of before
    assert from_dict(ModelConfig, old).spatial_dims == 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": old, "run": {"steps": 5}}))
    assert load_config(PretrainConfig, path).model.spatial_dims == 2
    three = load_config(PretrainConfig, path, overrides={"model": {"spatial_dims": 3},
                                                         "augment": {"patch_size": [32, 64, 64]}})
    assert to_dict(three)["model"]["spatial_dims"] == 3
    assert from_dict(PretrainConfig, to_dict(three)).model == three.model


def test_resume_accepts_an_older_config_and_refuses_another_dimension():
    new = to_dict(PretrainConfig())
    saved = to_dict(PretrainConfig())
    del saved["model"]["spatial_dims"]  # written before the field existed
    assert check_resume_compatible(saved, new, "pretrain") == []
    three = to_dict(PretrainConfig(model=ModelConfig(spatial_dims=3),
                                   augment=AugmentConfig(patch_size=(32, 64, 64))))
    with pytest.raises(ConfigError, match="model.spatial_dims 2 -> 3"):
        check_resume_compatible(new, three, "pretrain")


# --------------------------------------------------------------------------- networks and heads


def test_a_2d_config_builds_exactly_the_2d_network():
    """Names, shapes and initial values of the network as it was built before spatial_dims:
    MONAI's 2D FlexibleUNet, then the global MLP, then one Conv2d head per local level."""
    cfg = ModelConfig(**SMALL, local_levels=(2, 3))
    torch.manual_seed(3)
    net = PretrainNetwork(cfg, 2)
    torch.manual_seed(3)
    unet = FlexibleUNet(in_channels=2, out_channels=2, backbone="resnet10", pretrained=False,
                        decoder_channels=(32, 16, 16, 8, 8), spatial_dims=2)
    mlp = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 16))
    local = [nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, 16, 1)) for c in (16, 8)]
    reference = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    reference.update({f"global_head.mlp.{k}": v for k, v in mlp.state_dict().items()})
    for i, head in enumerate(local):
        reference.update({f"local_heads.{i}.net.{k}": v for k, v in head.state_dict().items()})
    state = net.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert not any(isinstance(m, nn.Conv3d) for m in net.modules())


def test_3d_pretrain_network_forward(net3d):
    net3d.eval()
    x = torch.rand(1, 1, 32, 32, 32, generator=_gen(0))
    with torch.no_grad():
        out = net3d(x, full_decoder=True)
        keys = net3d.encode_global(x)
    assert out["global"].shape == (1, 16)
    torch.testing.assert_close(out["global"].norm(dim=1), torch.ones(1))
    assert [tuple(f.shape) for f in out["local"]] == [(1, 16, 8, 8, 8), (1, 16, 16, 16, 16)]
    assert out["decoder"].shape == (1, 8, 32, 32, 32)
    torch.testing.assert_close(keys, out["global"])
    assert all(torch.isfinite(f).all() for f in out["local"])
    assert not any(isinstance(m, nn.Conv2d) for m in net3d.modules())
    with pytest.raises(ValueError, match=r"3D network takes \(B, C, D, H, W\)"):
        net3d(torch.rand(1, 1, 32, 32))


def test_heads_on_5d_features_are_the_2d_heads_slice_by_slice():
    torch.manual_seed(0)
    head3d = LocalProjectionHead(8, 4, spatial_dims=3)
    head2d = LocalProjectionHead(8, 4)
    head2d.load_state_dict({k: v[..., 0] if v.ndim == 5 else v  # 1x1x1 -> 1x1 kernels
                            for k, v in head3d.state_dict().items()})
    features = torch.randn(2, 8, 3, 5, 7)
    z = head3d(features)
    assert z.shape == (2, 4, 3, 5, 7)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 3, 5, 7))
    for s in range(3):
        torch.testing.assert_close(z[:, :, s], head2d(features[:, :, s]))
    pooled = GlobalProjectionHead(8, 8, 4, spatial_dims=3)
    torch.testing.assert_close(pooled(features), pooled(features.mean(dim=(2, 3, 4))))
    with pytest.raises(ValueError, match=r"\(B, C, d, h, w\)"):
        head3d(features[:, :, 0])
    with pytest.raises(ValueError, match=r"\(B, C, d, h, w\) or \(B, C\)"):
        pooled(features[:, :, 0])
    with pytest.raises(ValueError, match="spatial_dims"):
        LocalProjectionHead(8, 4, spatial_dims=4)


def test_methods_build_their_heads_for_the_models_dimension(net3d):
    cfg = PretrainConfig(method="supervised", run=RunConfig(batch_size=2),
                         model=ModelConfig(**SMALL, local_levels=(2, 3), spatial_dims=3),
                         augment=AugmentConfig(patch_size=(32, 32, 32)))
    context = MethodContext(num_slices=8, num_classes=3)
    supervised = Supervised.from_config(cfg, net3d, context)
    assert any(isinstance(m, nn.Conv3d) for m in supervised.modules())
    net3d.train()
    x1, x2 = torch.rand(2, 2, 1, 32, 32, 32, generator=_gen(1))
    y = torch.randint(0, 3, (2, 32, 32, 32), generator=_gen(2))
    out1, out2 = net3d(x1, full_decoder=True), net3d(x2, full_decoder=True)
    loss, _ = supervised(out1, out2, Views(x1, x2, _gen(3), _gen(4), y, y))
    moco = MoCo.from_config(dataclasses.replace(cfg, method="moco"), net3d, context)
    moco_loss, stats = moco(out1, out2, Views(x1, x2, _gen(3), _gen(4)))
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(moco_loss) and moco_loss > 0
    (loss + moco_loss).backward()
    assert net3d.unet.encoder.conv1.weight.grad.abs().sum() > 0
    net3d.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- the LRC loss


def test_downsample_regions_3d_takes_the_cell_centres():
    regions = torch.arange(2 * 8 * 4 * 4).view(2, 8, 4, 4)
    out = downsample_regions(regions, (2, 2, 2))
    assert torch.equal(out, regions[:, [2, 6]][:, :, [1, 3]][:, :, :, [1, 3]])
    with pytest.raises(ValueError, match="one output size per"):
        downsample_regions(regions, (2, 2))


def test_lrc_on_a_one_slice_volume_is_the_2d_loss():
    """Everything after the downsampling flattens: a (B, D, 1, h, w) level with (B, 1, H, W)
    maps gives exactly the loss (and the organ statistics) of the 2D level."""
    loss = LRCLoss(LRCConfig(num_regions=8, pixels_per_region=4, min_pixels=2, sampling="intensity"))
    feat1, feat2 = torch.randn(2, 2, 6, 16, 16, generator=_gen(0))
    cells = torch.arange(1, 65).view(8, 8).repeat_interleave(8, 0).repeat_interleave(8, 1)
    regions = cells.expand(2, 1, 64, 64).contiguous()  # (B, Z=1, H, W), 64 regions
    image = torch.rand(2, 1, 64, 64, generator=_gen(1))
    organs = (regions % 3).long()
    flat_maps = ViewMaps(image=image[:, 0], organs=organs[:, 0])
    loss2d, stats2d = loss(feat1, feat2, regions[:, 0], regions[:, 0], _gen(5), maps1=flat_maps)
    loss3d, stats3d = loss(feat1[:, :, None], feat2[:, :, None], regions, regions, _gen(5),
                           maps1=ViewMaps(image=image, organs=organs))
    assert loss2d.item() > 0 and torch.equal(loss2d, loss3d)
    assert stats2d.keys() == stats3d.keys()
    assert all(torch.equal(stats2d[k], stats3d[k]) for k in stats2d)


def test_region_majority_3d_counts_each_image_apart():
    regions = torch.tensor([[1, 1, 2, 2], [1, 2, 2, 2]]).view(2, 2, 2, 1).expand(2, 2, 2, 3)
    organs = torch.tensor([[4, 4, 0, 1], [0, 3, 3, 0]]).view(2, 2, 2, 1).expand(2, 2, 2, 3)
    assert region_majority(organs, regions, 3).tolist() == [[0, 4, 0], [0, 0, 3]]


def test_lrc_on_a_3d_decoder_level_with_supervoxels(net3d):
    net3d.train()
    aug = PairedVolumeAugment(AugmentConfig(min_overlap=0.5), (32, 32, 32))
    volume = torch.rand(2, 1, 40, 48, 48, generator=_gen(0))
    supervoxels = _block_volume(2, (40, 48, 48), 8)
    v1, r1, v2, r2 = aug(volume, supervoxels, _gen(1))
    out1, out2 = net3d(v1), net3d(v2)
    loss = LRCLoss(LRCConfig(num_regions=16, pixels_per_region=4))
    value, stats = loss(out1["local"][1], out2["local"][1], r1, r2, _gen(2),
                        maps1=ViewMaps(organs=supervoxels.new_zeros(r1.shape) + (r1 > 60)))
    assert torch.isfinite(value) and value.item() > 0
    assert stats["valid_regions"] >= 2 and 0 <= stats["sampled_background"] <= 1
    value.backward()
    head = net3d.local_heads[1].net[2].weight.grad
    assert head is not None and head.abs().sum() > 0
    assert net3d.unet.encoder.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, Z, H, W\)"):
        loss(out1["local"][1], out2["local"][1], r1[:, 0], r2[:, 0])
    net3d.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- 3D paired views


def test_3d_views_are_a_pure_function_of_the_generator():
    aug = PairedVolumeAugment(AugmentConfig(blur_prob=0.5, gamma=(0.8, 1.2), hflip=True), (8, 16, 16))
    volume = torch.rand(3, 2, 12, 24, 20, generator=_gen(0))
    regions = _block_volume(3, (12, 24, 20), 4)
    a, b, c = (aug(volume, regions, _gen(s)) for s in (5, 5, 6))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert a[0].shape == (3, 2, 8, 16, 16) and a[1].shape == (3, 8, 16, 16) and a[1].dtype == torch.long


def test_identity_transform_leaves_volume_and_map_unchanged():
    cfg = AugmentConfig(zoom=(1.0, 1.0), rotation_deg=0.0, min_overlap=0.5, **NO_INTENSITY)
    volume = torch.rand(2, 1, 8, 16, 12, generator=_gen(0))
    regions = _block_volume(2, (8, 16, 12), 2)
    v1, r1, v2, r2 = PairedVolumeAugment(cfg, (8, 16, 12), tilt_deg=0.0)(volume, regions, _gen(0))
    torch.testing.assert_close(v1, volume, atol=1e-5, rtol=0)
    torch.testing.assert_close(v2, volume, atol=1e-5, rtol=0)
    assert torch.equal(r1, regions) and torch.equal(r2, regions)


def test_the_map_is_warped_by_nearest_neighbour_and_ids_correspond():
    """Every voxel its own id: each output voxel of a map holds the id of the input voxel
    nearest to where its view's affine sends it, and both views share the ids they overlap on."""
    cfg = AugmentConfig(zoom=(0.8, 1.25), rotation_deg=15.0, min_overlap=0.5, hflip=True)
    aug = PairedVolumeAugment(cfg, (8, 12, 12), tilt_deg=8.0)
    shape = (10, 16, 14)
    ids = torch.arange(1, 10 * 16 * 14 + 1).view(1, *shape).expand(4, *shape).contiguous()
    volume = torch.rand(4, 1, *shape, generator=_gen(0))
    g = _gen(7)
    _, r1, _, r2 = aug(volume, ids, g)
    replay = _gen(7)
    box1, box2 = aug.sample_crop_pair_3d(4, shape, replay)
    theta1 = aug.affine(box1, shape, replay)
    grid = F.affine_grid(theta1, [4, 1, 8, 12, 12], align_corners=False).double()
    sizes = torch.tensor(shape[::-1], dtype=torch.float64)  # x, y, z = W, H, D
    position = ((grid + 1) * sizes - 1) / 2
    nearest = position.round().long()
    inside = ((nearest >= 0) & (nearest < sizes.long())).all(-1)
    clear = ((position - position.floor() - 0.5).abs() > 1e-3).all(-1)  # no rounding ties
    expected = (nearest[..., 2] * 16 + nearest[..., 1]) * 14 + nearest[..., 0] + 1
    assert torch.equal(r1[inside & clear], expected[inside & clear])
    assert (r1[~inside] == 0).all() and inside.float().mean() > 0.5
    for i in range(4):
        in1, in2 = set(r1[i].unique().tolist()) - {0}, set(r2[i].unique().tolist()) - {0}
        assert in1 <= set(ids[i].unique().tolist())
        assert len(in1 & in2) > 0.2 * min(len(in1), len(in2)), i  # boxes overlap >= 0.5
    assert (patch_overlap(box1, box2) >= 0.5).all()


def test_crop_pairs_3d_overlap_even_when_rejection_fails():
    aug = PairedVolumeAugment(AugmentConfig(min_overlap=0.9, zoom=(0.5, 2.0)), (16, 32, 32))
    box1, box2 = aug.sample_crop_pair_3d(2000, (48, 160, 160), _gen(1))
    assert patch_overlap(box1, box2).min().item() >= 0.9 - 1e-9
    assert (box2[:, :3] - box2[:, 3:] / 2).min() >= -1e-9
    assert (box2[:, :3] + box2[:, 3:] / 2).max() <= 1 + 1e-9
    assert (box1 != box2).any(dim=1).float().mean() > 0.5  # not simply copies of the first box
    # a patch deeper than the volume covers its whole depth (padding, no stretch)
    deep, _ = PairedVolumeAugment(AugmentConfig(zoom=(1.0, 1.0)), (16, 8, 8)).sample_crop_pair_3d(
        50, (8, 64, 64), _gen(2))
    assert torch.allclose(deep[:, 5], torch.full((50,), 2.0, dtype=torch.float64))
    assert ((deep[:, 2] - deep[:, 5] / 2) <= 1e-9).all() and ((deep[:, 2] + deep[:, 5] / 2) >= 1 - 1e-9).all()


def test_patch_overlap_known_values_and_2d_agreement():
    a = torch.tensor([0.5, 0.5, 0.5, 0.4, 0.4, 0.4], dtype=torch.float64)
    b = torch.tensor([0.7, 0.5, 0.5, 0.4, 0.2, 0.4], dtype=torch.float64)  # 0.2 x 0.2 x 0.4 / 0.032
    assert patch_overlap(a, b).item() == pytest.approx(0.016 / 0.032)
    boxes = torch.rand(50, 2, 4, generator=_gen(0), dtype=torch.float64) * 0.5 + 0.25
    assert torch.equal(patch_overlap(boxes[:, 0], boxes[:, 1]), box_overlap(boxes[:, 0], boxes[:, 1]))


def test_axial_rotation_is_2d_rotation_and_tilts_are_rotations_in_mm():
    phi = torch.tensor([0.3, -0.2], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    r = rotation_3d(phi, zero, zero)
    assert torch.allclose(r[:, :2, :2], torch.stack([torch.stack([phi.cos(), -phi.sin()], 1),
                                                     torch.stack([phi.sin(), phi.cos()], 1)], 1))
    assert torch.equal(r[:, 2], torch.tensor([[0.0, 0, 1]] * 2, dtype=torch.float64))
    tilted = rotation_3d(phi, zero + 0.1, zero - 0.05)
    torch.testing.assert_close(tilted @ tilted.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    # on a grid with 4 mm slices and 1 mm pixels, theta maps output mm to input mm by a rotation
    extent = torch.tensor([16.0, 16.0, 32.0], dtype=torch.float64)  # W, H, D in mm
    half = torch.tensor([[4.0, 4.0, 8.0]] * 2, dtype=torch.float64)
    theta = affine_theta_3d(tilted, half, torch.full((2, 3), 0.5, dtype=torch.float64), extent)
    in_mm = theta[:, :, :3] * (extent / 2)[None, :, None] / half[:, None, :]
    torch.testing.assert_close(in_mm, tilted)
    # an axial rotation does not depend on the slice spacing; a tilt does
    aug = PairedVolumeAugment(AugmentConfig(rotation_deg=20.0), (4, 8, 8), tilt_deg=0.0)
    boxes = aug.sample_crop_pair_3d(3, (8, 32, 32), _gen(0))[0]
    assert torch.allclose(aug.affine(boxes, (8, 32, 32), _gen(1)),
                          aug.affine(boxes, (8, 32, 32), _gen(1), torch.tensor([4.0, 1.0, 1.0])))
    tilting = PairedVolumeAugment(AugmentConfig(rotation_deg=20.0), (4, 8, 8), tilt_deg=10.0)
    assert not torch.allclose(tilting.affine(boxes, (8, 32, 32), _gen(1)),
                              tilting.affine(boxes, (8, 32, 32), _gen(1), torch.tensor([4.0, 1.0, 1.0])))


def test_labels_follow_the_views_geometry():
    aug = PairedVolumeAugment(AugmentConfig(rotation_deg=30.0), (8, 16, 16))
    volume = torch.rand(2, 1, 12, 24, 24, generator=_gen(0))
    regions = _block_volume(2, (12, 24, 24), 3)
    _, r1, _, r2 = aug(volume, regions, _gen(4))
    labels1, labels2 = aug.labels_in_views(regions, _gen(4))
    assert torch.equal(labels1, r1) and torch.equal(labels2, r2)


def test_3d_intensity_and_blur_are_the_2d_ones_on_slices():
    """One implementation serves both (``lrcseg.augment``): a volume that repeats a slice along
    D is jittered as the slice, and the 2D views use it (their values: tests/test_golden.py)."""
    cfg = AugmentConfig(blur_prob=0.7, gamma=(0.8, 1.25), noise_std=0.0)
    x = torch.rand(4, 2, 24, 20, generator=_gen(0))
    stack = x[:, :, None].expand(-1, -1, 9, -1, -1).contiguous()
    sigma = torch.rand(4, 2, generator=_gen(1), dtype=torch.float64) * 1.5
    apply = torch.tensor([True, False, True, True])
    sigma3 = torch.cat([sigma[:, :1], sigma], dim=1)
    assert torch.allclose(gaussian_blur(stack, sigma3, apply, 1.5)[:, :, 4],
                          gaussian_blur(x, sigma, apply, 1.5), atol=1e-6)
    assert torch.allclose(jitter_intensity(stack, cfg, _gen(3))[:, :, 4],
                          jitter_intensity(x, cfg, _gen(3)), atol=1e-6)
    # 3D: a separable blur keeps the mean of a periodic-free interior and smooths white noise
    v = torch.rand(2, 1, 16, 16, 16, generator=_gen(2))
    blurred = gaussian_blur(v, torch.full((2, 3), 1.5, dtype=torch.float64),
                            torch.tensor([True, False]), 1.5)
    assert torch.equal(blurred[1], v[1])
    assert abs(blurred[0].mean().item() - v[0].mean().item()) < 5e-3
    assert blurred[0].std().item() < 0.3 * v[0].std().item()
    # a sigma along one axis only blurs along that axis (sigma 0: the kernel is a delta)
    def blur_along(x, axis):
        sigma = torch.zeros(2, 3, dtype=torch.float64)
        sigma[:, axis] = 1.5
        return gaussian_blur(x, sigma, torch.tensor([True, True]), 1.5)

    rows = v[:, :, :1, :1, :].expand_as(v).contiguous()  # varies along W only
    torch.testing.assert_close(blur_along(rows, 0), rows, atol=1e-6, rtol=0)
    torch.testing.assert_close(blur_along(rows, 1), rows, atol=1e-6, rtol=0)
    assert blur_along(rows, 2).std().item() < 0.6 * rows.std().item()


def test_3d_views_reject_bad_input():
    aug = PairedVolumeAugment(AugmentConfig(), (8, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        aug(torch.zeros(2, 1, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long), _gen(0))
    with pytest.raises(ValueError, match="regions shape"):
        aug(torch.zeros(2, 1, 8, 16, 16), torch.zeros(2, 8, 16, 15, dtype=torch.long), _gen(0))
    with pytest.raises(ValueError, match="spacing_mm"):
        aug(torch.zeros(2, 1, 8, 16, 16), torch.zeros(2, 8, 16, 16, dtype=torch.long), _gen(0),
            spacing_mm=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="zoom"):
        PairedVolumeAugment(AugmentConfig(zoom=None), (8, 16, 16))
    with pytest.raises(ValueError, match="patch_size"):
        PairedVolumeAugment(AugmentConfig(), (16, 16))
    with pytest.raises(ValueError, match="tilt_deg"):
        PairedVolumeAugment(AugmentConfig(), (8, 16, 16), tilt_deg=-1.0)


def test_warp_3d_keeps_integer_ids_exact():
    ids = torch.randint(1, 2**24, (1, 4, 4, 4), generator=_gen(0))
    theta = torch.eye(3, 4)[None]
    _, out = warp_3d(torch.zeros(1, 1, 4, 4, 4), ids, theta, (4, 4, 4))
    assert torch.equal(out, ids)


def test_view_logging_shows_the_middle_axial_slice():
    view = torch.rand(2, 3, 5, 8, 8, generator=_gen(0))
    regions = torch.randint(0, 9, (2, 5, 8, 8), generator=_gen(1))
    image, reg = _middle_slice(view, regions)
    assert torch.equal(image, view[:, :, 2]) and torch.equal(reg, regions[:, 2])
    flat = view[:, :, 0]
    assert _middle_slice(flat, regions[:, 0])[0] is flat
