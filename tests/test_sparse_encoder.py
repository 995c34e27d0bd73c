"""Tests of the sparse masked encoder (SparK-style) and of the target-invariant encoder built on it."""

import copy

import pytest
import torch

from custom_components.networks.backbone import backbone_pyramid, resnet_backbone
from custom_components.networks.sparse_encoder import (
    SparseEncoder,
    TargetInvariantEncoder,
    masked_batch_norm,
    random_patch_mask,
    upsample_mask,
)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SparseEncoder(depth=18)


def _image(batch=2, size=(96, 96), seed=0):
    return torch.rand(batch, 1, *size, generator=torch.Generator().manual_seed(seed)) + 0.1


def test_patch_mask_keeps_three_of_nine_and_is_seedable():
    mask = random_patch_mask(64, (3, 3), 0.65, generator=torch.Generator().manual_seed(5))
    assert mask.shape == (64, 1, 3, 3) and mask.dtype == torch.bool
    assert (mask.sum(dim=(1, 2, 3)) == 3).all()
    again = random_patch_mask(64, (3, 3), 0.65, generator=torch.Generator().manual_seed(5))
    other = random_patch_mask(64, (3, 3), 0.65, generator=torch.Generator().manual_seed(6))
    assert torch.equal(mask, again) and not torch.equal(mask, other)
    assert mask.float().mean(0).min() > 0  # every patch is visible in some sample
    # a 64x128 slice has a 2x4 grid: round(8 * 0.35) = 3 visible
    assert (random_patch_mask(4, (2, 4), 0.65).sum(dim=(1, 2, 3)) == 3).all()


@pytest.mark.parametrize("mask_input", [True, False])
def test_hidden_positions_exactly_zero_at_every_level(encoder, mask_input):
    encoder.train()
    x = _image()
    active = random_patch_mask(2, (3, 3), generator=torch.Generator().manual_seed(1))
    features = encoder(x, active, mask_input=mask_input)
    assert [f.shape[-1] for f in features] == [24, 12, 6, 3]
    for feat in features:
        visible = upsample_mask(active, tuple(feat.shape[-2:])).expand_as(feat)
        assert torch.count_nonzero(feat[~visible]) == 0
        assert torch.count_nonzero(feat[visible]) > 0


@pytest.mark.parametrize("gather", [False, True])
def test_masked_batch_norm_equals_batch_norm_of_visible_positions(gather):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 6, 6, generator=gen) * 3 + 1
    # 10 visible positions per sample, so the gather path (flat indices per sample) applies as well
    order = torch.rand(3, 36, generator=gen).argsort(dim=1)
    indices = order[:, :10]
    mask = torch.zeros(3, 36, dtype=torch.bool).scatter(1, indices, True).view(3, 1, 6, 6)
    bn = torch.nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -2.0, 3.0]))
    reference = torch.nn.BatchNorm1d(4, momentum=0.3)
    reference.load_state_dict(bn.state_dict())

    out = masked_batch_norm(bn, x, mask.float(), indices if gather else None)
    visible_values = x.permute(0, 2, 3, 1)[mask[:, 0]]  # (n_visible, C)
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[mask[:, 0]], reference(visible_values))
    assert torch.count_nonzero(out.permute(0, 2, 3, 1)[~mask[:, 0]]) == 0
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    torch.testing.assert_close(bn.running_var, reference.running_var)
    assert bn.num_batches_tracked.item() == 1
    # eval mode: the running statistics are used, hidden positions stay zero
    bn.eval()
    reference.eval()
    out = masked_batch_norm(bn, x, mask.float(), indices if gather else None)
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[mask[:, 0]], reference(visible_values))
    assert torch.count_nonzero(out.permute(0, 2, 3, 1)[~mask[:, 0]]) == 0


def test_encoder_batch_norm_statistics_over_visible_positions_only():
    torch.manual_seed(3)
    enc = SparseEncoder(depth=18).train()
    net = enc.backbone
    watched = {  # conv whose (masked) output is the batch norm's input
        "stem": (net.conv1, net.bn1),
        "layer2": (net.layer2[0].conv1, net.layer2[0].bn1),
        "shortcut": (net.layer3[0].downsample[0], net.layer3[0].downsample[1]),
    }
    captured = {}
    for name, (conv, bn) in watched.items():
        bn.momentum = 1.0  # running statistics become this batch's statistics
        conv.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(name, out.detach()))
    x = _image(batch=3)
    active = random_patch_mask(3, (3, 3), generator=torch.Generator().manual_seed(4))
    enc(x, active)
    for name, (_, bn) in watched.items():
        conv_out = captured[name]
        visible = upsample_mask(active, tuple(conv_out.shape[-2:]))[:, 0]
        values = conv_out.permute(0, 2, 3, 1)[visible].double()  # (n_visible, C)
        torch.testing.assert_close(bn.running_mean.double(), values.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), values.var(0, unbiased=True), rtol=1e-4, atol=1e-5)
        dense_mean = conv_out.mean(dim=(0, 2, 3)).double()
        assert not torch.allclose(bn.running_mean.double(), dense_mean, rtol=1e-3, atol=1e-5)


def test_hidden_pixels_change_no_feature_of_masked_view(encoder):
    encoder.train()  # batch statistics: hidden content would show up through them too
    x = _image()
    active = random_patch_mask(2, (3, 3), generator=torch.Generator().manual_seed(5))
    hidden = ~upsample_mask(active, (96, 96))
    x_other = torch.where(hidden, torch.rand_like(x) * 10, x)
    with torch.no_grad():
        first = encoder(x, active)
        second = encoder(x_other, active)
        intact = encoder(x_other, active, mask_input=False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[-1], intact[-1])  # the intact view does see the hidden content


def test_intact_view_differs_only_near_hidden_patches(encoder):
    encoder.eval()
    x = _image(batch=1, size=(192, 192))
    active = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    active[:, :, 2, 2] = False  # one hidden patch: pixels 64..95 in both directions
    with torch.no_grad():
        masked = encoder(x, active, mask_input=True)[0]  # level 1: stride 4, 48x48
        intact = encoder(x, active, mask_input=False)[0]
    # Chebyshev distance (in level-1 positions) of each position from the hidden block [16, 24)
    pos = torch.arange(48)
    dist_1d = torch.clamp(16 - pos, min=0) + torch.clamp(pos - 23, min=0)
    dist = torch.maximum(dist_1d[:, None], dist_1d[None, :])
    far = dist > 8  # more than 32 pixels away from the hidden patch
    torch.testing.assert_close(masked[..., far], intact[..., far], rtol=0, atol=1e-6)
    near = (dist >= 1) & (dist <= 2)
    assert (masked[..., near] - intact[..., near]).abs().max() > 1e-3


@pytest.mark.parametrize("training", [True, False])
def test_all_visible_equals_dense_backbone(training):
    torch.manual_seed(6)
    enc = SparseEncoder(depth=18).train(training)
    dense = copy.deepcopy(enc.backbone)
    x = _image()
    active = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    sparse = enc(x, active)
    reference = backbone_pyramid(dense, x)
    for a, b in zip(sparse, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(enc.backbone.state_dict().items(), dense.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_backbone_state_dict_round_trip(tmp_path):
    model = TargetInvariantEncoder(depth=18, decoder_width=64)
    backbone = model.encoder.backbone  # what train.yaml saves as models/model.pt
    plain = resnet_backbone(18)
    assert list(backbone.state_dict()) == list(plain.state_dict())
    assert all(f"encoder.backbone.{k}" in model.state_dict() for k in plain.state_dict())
    path = tmp_path / "model.pt"
    torch.save(backbone.state_dict(), path)
    plain.load_state_dict(torch.load(path, weights_only=True), strict=True)
    torch.testing.assert_close(plain.conv1.weight, backbone.conv1.weight)
    # and the other way: a plain backbone's weights drive the embedding of whole (all visible) slices
    fresh = resnet_backbone(18).eval()
    backbone.load_state_dict(fresh.state_dict())
    model.eval()
    x, active = _image(batch=2), torch.ones(2, 1, 3, 3, dtype=torch.bool)
    with torch.no_grad():
        embedding = SparseEncoder.pool(model.encoder(x, active)[-1], active)
        torch.testing.assert_close(embedding, fresh(x), rtol=1e-4, atol=1e-5)


def test_model_forward_backward_and_seeding():
    torch.manual_seed(7)
    model = TargetInvariantEncoder(depth=18, decoder_width=64).train()
    x = _image(batch=3)
    out = model(x, generator=torch.Generator().manual_seed(11))
    assert out["patch_mask"].shape == (3, 1, 3, 3)
    assert (out["patch_mask"].sum(dim=(1, 2, 3)) == 3).all()  # 3 of 9 patches visible at 96x96
    assert out["reconstruction"].shape == x.shape
    assert out["z_masked"].shape == out["z_intact"].shape == (3, 512)
    assert not torch.equal(out["z_masked"], out["z_intact"])
    again = model(x, generator=torch.Generator().manual_seed(11))
    assert torch.equal(out["patch_mask"], again["patch_mask"])
    (out["reconstruction"].square().mean() + out["z_masked"].sum() + out["z_intact"].sum()).backward()
    assert model.encoder.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in model.decoder.mask_tokens)


def test_pooling_averages_visible_positions_only():
    deepest = torch.zeros(1, 2, 3, 3)
    deepest[0, :, 0, 0] = torch.tensor([3.0, 6.0])
    deepest[0, :, 2, 1] = torch.tensor([1.0, 0.0])
    active = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    active[0, 0, 0, 0] = active[0, 0, 2, 1] = active[0, 0, 1, 1] = True
    torch.testing.assert_close(SparseEncoder.pool(deepest, active), torch.tensor([[4.0 / 3, 2.0]]))


def test_bad_inputs_give_clear_errors(encoder):
    with pytest.raises(ValueError, match="multiples of 32"):
        encoder(torch.rand(1, 1, 100, 96), torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="Patch mask must have shape"):
        encoder(torch.rand(2, 1, 96, 96), torch.ones(2, 1, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_ratio"):
        TargetInvariantEncoder(depth=18, mask_ratio=1.0)


def test_resnet50_forward_at_96():
    model = TargetInvariantEncoder(depth=50)
    out = model(_image(batch=1), generator=torch.Generator().manual_seed(0))
    assert out["reconstruction"].shape == (1, 1, 96, 96)
    assert out["z_masked"].shape == out["z_intact"].shape == (1, 2048)
    assert torch.isfinite(out["reconstruction"]).all()
