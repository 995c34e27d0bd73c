"""Simplex / Gaussian noise fields: shape, reproducibility, independence and spatial statistics."""

from __future__ import annotations

import pytest
import torch

from custom_components.noise import make_noise, simplex_noise


def _neighbour_corr(n: torch.Tensor) -> float:
    """Pearson correlation between horizontally adjacent pixels, pooled over the batch."""
    a, b = n[..., :, :-1].flatten(), n[..., :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_dtype_device():
    n = simplex_noise((3, 2, 17, 23), generator=_gen(0))
    assert n.shape == (3, 2, 17, 23) and n.dtype == torch.float32 and n.device.type == "cpu"
    assert simplex_noise((1, 1, 8, 8), dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="B, C, H, W"):
        simplex_noise((8, 8))


def test_make_noise_follows_images():
    images = torch.zeros(2, 1, 20, 12, dtype=torch.float64)
    for kind in ("simplex", "gaussian"):
        n = make_noise(images, kind, generator=_gen(0))
        assert n.shape == images.shape and n.dtype == images.dtype and n.device == images.device
    with pytest.raises(ValueError, match="noise_type"):
        make_noise(images, "perlin")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_gpu_with_cpu_generator():
    n = simplex_noise((2, 1, 32, 32), generator=_gen(1), device="cuda")
    m = simplex_noise((2, 1, 32, 32), generator=_gen(1), device="cpu")
    assert n.device.type == "cuda"
    torch.testing.assert_close(n.cpu(), m, atol=1e-4, rtol=0)


def test_seeded_determinism():
    a = simplex_noise((4, 1, 32, 32), generator=_gen(7))
    b = simplex_noise((4, 1, 32, 32), generator=_gen(7))
    c = simplex_noise((4, 1, 32, 32), generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    ga, gb = make_noise(a, "gaussian", _gen(3)), make_noise(a, "gaussian", _gen(3))
    assert torch.equal(ga, gb)


def test_every_sample_and_channel_has_its_own_field():
    n = simplex_noise((6, 2, 48, 48), generator=_gen(0)).flatten(0, 1)  # 12 fields
    flat = n.flatten(1)
    corr = torch.corrcoef(flat)
    off_diag = corr[~torch.eye(len(flat), dtype=torch.bool)]
    assert off_diag.abs().max() < 0.9  # identical fields would correlate at 1


def test_octave_amplitudes():
    # persistence 0 silences every octave after the first: equal to a single-octave field
    one = simplex_noise((3, 1, 40, 40), octaves=1, generator=_gen(5))
    six = simplex_noise((3, 1, 40, 40), octaves=6, persistence=0.0, generator=_gen(5))
    torch.testing.assert_close(one, six)
    # a single octave of 2D simplex noise stays within [-1, 1]; the fractal sum within sum(0.8**o)
    assert one.abs().max() <= 1.0
    big = simplex_noise((8, 1, 96, 96), generator=_gen(2))
    assert big.abs().max() <= sum(0.8**o for o in range(6))


def test_statistics_at_default_setting():
    n = simplex_noise((64, 1, 96, 96), generator=_gen(0))
    assert torch.isfinite(n).all()
    per_sample_std = n.flatten(1).std(dim=1).mean()
    assert 0.5 < per_sample_std < 0.65
    assert abs(float(n.mean())) < 0.05
    assert 0.92 < _neighbour_corr(n) < 0.98
    vertical = n.transpose(-1, -2)
    assert 0.92 < _neighbour_corr(vertical) < 0.98


def test_lower_frequency_is_smoother():
    coarse = simplex_noise((16, 1, 64, 64), octaves=1, frequency=32, generator=_gen(0))
    fine = simplex_noise((16, 1, 64, 64), octaves=1, frequency=2, generator=_gen(0))
    assert _neighbour_corr(coarse) > 0.98 > _neighbour_corr(fine)


def test_gaussian_fallback():
    n = make_noise(torch.zeros(16, 1, 64, 64), "gaussian", generator=_gen(0))
    assert abs(float(n.std()) - 1.0) < 0.02 and abs(float(n.mean())) < 0.02
    assert abs(_neighbour_corr(n)) < 0.05
