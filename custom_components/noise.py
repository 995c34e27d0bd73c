"""Noise fields for the diffusion forward process: fractal 2D simplex noise (default) or Gaussian noise.

Simplex noise is spatially smooth, so the DDPM learns to "heal" whole lesions rather than pixel noise (AnoDDPM,
cDDPM). As in those works: ``sum_o persistence**o * opensimplex2d(coords / (frequency / 2**o))``, not renormalised,
``frequency`` being the feature size in pixels of the coarsest octave. Every sample and channel gets its own field
(random gradients on a 256 x 256 periodic lattice, a random lattice offset per octave), vectorised in torch;
``make_noise(..., shared=True)`` repeats one field over the batch, as the reference generator does. At the default
(6 octaves, persistence 0.8, frequency 64) a 96x96 field has a std of about 0.55-0.6 and a neighbour-pixel
correlation of about 0.95.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NOISE_TYPES = ("simplex", "gaussian")

# 2D OpenSimplex constants: skew from the square grid to the triangular lattice and back.
_STRETCH = (1.0 / math.sqrt(3.0) - 1.0) / 2.0
_SQUISH = (math.sqrt(3.0) - 1.0) / 2.0
_NORM = 47.0  # brings a single octave to roughly [-1, 1]
# eight gradient directions approximating the vertices of an octagon
_GRADIENTS = ((5, 2), (2, 5), (-5, 2), (-2, 5), (5, -2), (2, -5), (-5, -2), (-2, -5))
# lattice vertices (in skewed coordinates, relative to the floor of the point) that can lie within
# the kernel radius sqrt(2) of a point; vertices further away contribute exactly zero
_VERTEX_OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1), (1, -1), (-1, 1), (2, 0), (0, 2))
_TABLE = 256  # the gradient lattice repeats every 256 cells (the coarsest octave spans 1.5 cells at 96 px)


def _opensimplex2d(x: torch.Tensor, y: torch.Tensor, grad_x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """2D OpenSimplex noise at points ``(x, y)`` (N, P); row ``n`` uses the lattice gradients
    ``grad_x[n], grad_y[n]`` (N, 256 * 256), indexed by the vertex's skewed coordinates modulo 256."""
    stretch = (x + y) * _STRETCH
    xsb, ysb = torch.floor(x + stretch), torch.floor(y + stretch)
    squish = (xsb + ysb) * _SQUISH
    dx0, dy0 = x - xsb - squish, y - ysb - squish  # position relative to the base vertex
    ix, iy = xsb.long(), ysb.long()
    value = torch.zeros_like(x)
    for i, j in _VERTEX_OFFSETS:
        shift = (i + j) * _SQUISH
        dx, dy = dx0 - (i + shift), dy0 - (j + shift)
        attn = (2.0 - dx * dx - dy * dy).clamp_min_(0.0)
        attn = attn * attn
        vertex = ((ix + i) & (_TABLE - 1)) * _TABLE + ((iy + j) & (_TABLE - 1))
        value += attn * attn * (torch.gather(grad_x, 1, vertex) * dx + torch.gather(grad_y, 1, vertex) * dy)
    return value / _NORM


def simplex_noise(shape: Sequence[int], octaves: int = 6, persistence: float = 0.8, frequency: float = 64,
                  generator: torch.Generator | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fractal 2D simplex noise of ``shape`` (B, C, H, W), an independent field per sample and channel, on
    ``device`` (default CPU). Octave ``o`` has feature size ``frequency / 2**o`` pixels and amplitude
    ``persistence**o``; ``generator`` (on any device) makes the fields reproducible."""
    if len(shape) != 4:
        raise ValueError(f"simplex_noise expects a shape (B, C, H, W), got {tuple(shape)}.")
    if octaves < 1 or frequency <= 0:
        raise ValueError(f"simplex_noise needs octaves >= 1 and frequency > 0, got {octaves} and {frequency}.")
    b, c, h, w = (int(s) for s in shape)
    device, n = torch.device(device or "cpu"), b * c
    rdev = generator.device if generator is not None else device  # draw where the generator lives, then move
    which = torch.randint(len(_GRADIENTS), (n, _TABLE * _TABLE), generator=generator, device=rdev, dtype=torch.uint8)
    offsets = (torch.rand(octaves, n, 2, generator=generator, device=rdev) * _TABLE).to(device)
    gradients = torch.tensor(_GRADIENTS, dtype=torch.float32, device=device)
    which = which.to(device).long()
    grad_x, grad_y = gradients[which, 0], gradients[which, 1]  # (n, 256 * 256) lattice gradients
    del which
    rows = torch.arange(h, dtype=torch.float32, device=device).repeat_interleave(w)  # (P,)
    cols = torch.arange(w, dtype=torch.float32, device=device).repeat(h)
    noise = torch.zeros(n, h * w, dtype=torch.float32, device=device)
    amplitude, scale = 1.0, float(frequency)
    for o in range(octaves):
        x = cols[None] / scale + offsets[o, :, 0:1]
        y = rows[None] / scale + offsets[o, :, 1:2]
        noise += amplitude * _opensimplex2d(x, y, grad_x, grad_y)
        scale /= 2.0
        amplitude *= persistence
    return noise.reshape(b, c, h, w).to(dtype)


def make_noise(
    images: torch.Tensor, noise_type: str = "simplex", generator: torch.Generator | None = None, shared: bool = False
) -> torch.Tensor:
    """Noise shaped like ``images`` (B, C, H, W), on its device and dtype: ``"simplex"`` or ``"gaussian"``.
    ``shared=True`` draws one (1, C, H, W) field and repeats it over the batch (the reference's choice)."""
    noise_type = str(noise_type).lower()
    shape = (1, *images.shape[1:]) if shared else tuple(images.shape)
    if noise_type == "simplex":
        noise = simplex_noise(shape, generator=generator, device=images.device, dtype=images.dtype)
    elif noise_type == "gaussian":
        rdev = generator.device if generator is not None else images.device
        noise = torch.randn(shape, generator=generator, device=rdev, dtype=images.dtype).to(images.device)
    else:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}.")
    return noise.expand(images.shape[0], *shape[1:]).contiguous() if shared else noise
