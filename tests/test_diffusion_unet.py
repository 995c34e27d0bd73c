"""The conditioned denoiser: parameter parity, FiLM blocks, conditioning paths, encoder checkpoint loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from custom_components.networks.backbone import resnet_backbone
from custom_components.networks.diffusion_unet import ConditionalDDPM, FiLMDiffusionUNet, ScaleShiftResnetBlock

TINY = dict(channels=(16, 32, 64), num_res_blocks=1, encoder_depth=18)


def _randomise_zero_init(model: nn.Module) -> nn.Module:
    """Diffusion U-Nets zero-initialise their last convolutions (output 0 at start): give them weights."""
    torch.manual_seed(0)
    for p in model.parameters():
        if p.ndim > 1 and not p.detach().any():
            nn.init.normal_(p, std=0.05)
    return model.eval()


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_matches_reference_denoiser():
    model = ConditionalDDPM()  # paper setting: (128, 256, 256), 3 blocks, cond 128, ResNet-50 encoder
    # reference OpenAI U-Net (scale-shift norm, condition MLP concatenated to the time embedding)
    assert _count(model.unet) == 43_871_873
    assert model.unet.cond_embed[0].in_features == 128 and model.unet.cond_embed[-1].out_features == 512
    blocks = [m for m in model.unet.modules() if isinstance(m, ScaleShiftResnetBlock)]
    assert len(blocks) == 27  # 3 levels x 3 blocks down + 2 resampling + 2 middle + 3 x 4 up
    for b in blocks:
        assert b.time_emb_proj.in_features == 1024 and b.time_emb_proj.out_features == 2 * b.out_channels


def test_plain_ddpm_parameter_count():
    # same U-Net without the condition: 512-d embedding, 2C FiLM outputs. MONAI's plain network has
    # 34,493,313 parameters; FiLM adds (512 + 1) per output channel of the 27 blocks (sum 5,888).
    model = ConditionalDDPM(conditioning="none")
    assert model.encoder is None and model.unet.cond_embed is None
    assert _count(model) == 34_493_313 + 513 * 5_888


def test_scale_shift_block_applies_film():
    torch.manual_seed(0)
    block = ScaleShiftResnetBlock(spatial_dims=2, in_channels=8, temb_channels=4, out_channels=8, norm_num_groups=4)
    nn.init.normal_(block.conv2.conv.weight)
    nn.init.zeros_(block.conv2.conv.bias)
    nn.init.zeros_(block.time_emb_proj.weight)
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 4)
    with torch.no_grad():
        # scale = -1, shift = 0: the normalised features are multiplied by 0, the residual branch is conv2(0) = 0
        block.time_emb_proj.bias.copy_(torch.cat([-torch.ones(8), torch.zeros(8)]))
        torch.testing.assert_close(block(x, emb), x)
        # scale = 0: the features pass, the output differs from the skip path
        block.time_emb_proj.bias.zero_()
        assert not torch.allclose(block(x, emb), x)


@pytest.mark.parametrize("unshuffle,size", [(1, (32, 40)), (2, (48, 48))])
def test_output_shape(unshuffle, size):
    model = ConditionalDDPM(**TINY, pixel_unshuffle=unshuffle)
    assert model.size_divisor == 4 * unshuffle
    x = torch.randn(3, 1, *size)
    out = model(x, torch.tensor([0, 10, 999]), context=x)
    assert out.shape == x.shape
    if unshuffle == 2:
        assert model.unet.conv_in.conv.in_channels == 4 and model.unet.out[-1].conv.out_channels == 4


def test_size_not_divisible_raises():
    model = ConditionalDDPM(**TINY)
    x = torch.randn(1, 1, 30, 32)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(x, torch.tensor([5]), context=x)


def test_output_depends_on_condition_only_through_it():
    model = _randomise_zero_init(ConditionalDDPM(**TINY))
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([100, 600])
    a, b = torch.randn(2, 128), torch.randn(2, 128)
    with torch.no_grad():
        out_a, out_a2, out_b = model(x, t, cond=a), model(x, t, cond=a), model(x, t, cond=b)
        torch.testing.assert_close(out_a, out_a2)
        assert (out_a - out_b).abs().max() > 1e-4
        # a different conditioning image changes the output too; `cond` overrides `context`
        c1, c2 = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
        assert (model(x, t, context=c1) - model(x, t, context=c2)).abs().max() > 1e-4
        torch.testing.assert_close(model(x, t, context=c1, cond=a), out_a)
        torch.testing.assert_close(model(x, t, context=c1), model(x, t, cond=model.encode(c1)))


def test_conditioning_needs_context():
    model = ConditionalDDPM(**TINY)
    with pytest.raises(ValueError, match="context"):
        model(torch.randn(1, 1, 32, 32), torch.tensor([3]))


def test_conditioning_words_are_checked():
    with pytest.raises(ValueError, match="conditioning must be true or false"):
        ConditionalDDPM(**TINY, conditioning="maybe")


@pytest.mark.parametrize("off", [False, "none", "None", "false"])
def test_conditioning_off_ignores_context(off):
    model = _randomise_zero_init(ConditionalDDPM(**TINY, conditioning=off))
    assert model.encoder is None
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([100, 600])
    with torch.no_grad():
        ref = model(x, t)
        torch.testing.assert_close(model(x, t, context=torch.randn_like(x)), ref)
        torch.testing.assert_close(model(x, t, context=torch.randn_like(x), cond=torch.randn(2, 128)), ref)
        assert (model(x, torch.tensor([0, 999])) - ref).abs().max() > 1e-4  # still time-dependent


def test_unet_alone_requires_condition_when_conditioned():
    unet = FiLMDiffusionUNet(channels=(16, 32), num_res_blocks=1, cond_dim=8)
    with pytest.raises(ValueError, match="condition"):
        unet(torch.randn(1, 1, 8, 8), torch.tensor([1]))


def _saved_backbone(tmp_path, depth=18, wrap=None):
    torch.manual_seed(1)
    backbone = resnet_backbone(depth)
    for p in backbone.parameters():
        nn.init.normal_(p)
    state = backbone.state_dict()
    path = tmp_path / "model.pt"
    torch.save({wrap: state} if wrap else state, path)
    return path, state


@pytest.mark.parametrize("wrap", [None, "model"])
def test_encoder_loads_backbone_checkpoint(tmp_path, wrap):
    path, state = _saved_backbone(tmp_path, wrap=wrap)
    model = ConditionalDDPM(**TINY, encoder_ckpt=str(path))
    loaded = model.encoder.backbone.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert model.encoder.head.out_features == 128


def test_encoder_checkpoint_with_wrong_keys_names_the_file(tmp_path):
    path = tmp_path / "not_a_backbone.pt"
    torch.save({"layer9.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not_a_backbone.pt"):
        ConditionalDDPM(**TINY, encoder_ckpt=path)


def test_encoder_checkpoint_of_other_depth_names_the_file(tmp_path):
    path, _ = _saved_backbone(tmp_path, depth=18)
    with pytest.raises(ValueError, match="model.pt"):
        ConditionalDDPM(channels=(16, 32, 64), num_res_blocks=1, encoder_depth=34, encoder_ckpt=path)


def test_missing_encoder_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        ConditionalDDPM(**TINY, encoder_ckpt=tmp_path / "nowhere.pt")


def test_loading_a_backbone_without_encoder_names_the_file(tmp_path):
    path, _ = _saved_backbone(tmp_path)
    with pytest.raises(ValueError, match="model.pt"):
        ConditionalDDPM(**TINY, conditioning="none").load_backbone(path)


def test_condition_encoder_sees_the_contrastive_encoders_range():
    """Slices reach the DDPM in [-1, 1]; its encoder, pretrained on [0, 1] slices, must see them in [0, 1]."""
    torch.manual_seed(0)
    model = ConditionalDDPM(channels=(8, 16, 16), num_res_blocks=1, encoder_depth=18, pixel_unshuffle=2).eval()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), model.encoder((x + 1) / 2))
        assert (model.encode(x) - model.encoder(x)).abs().max() > 1e-3
