"""Scheduler setting, training-batch preparation and the noise-ensemble reconstruction inferer."""

from __future__ import annotations

import math

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer

from custom_components.inferers import ReconstructionInferer, ReconstructionPrepareBatch, ddpm_scheduler
from custom_components.networks.diffusion_unet import ConditionalDDPM


def _cosine_alpha_bar(steps: int, total: int = 1000, s: float = 0.008) -> float:
    """Nichol & Dhariwal's cosine schedule: alpha_bar after ``steps`` noising steps."""
    f = lambda t: math.cos((t / total + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(steps) / f(0)


def test_scheduler_is_cosine_x0():
    sched = ddpm_scheduler()
    assert sched.num_train_timesteps == 1000 and sched.prediction_type == "sample"
    for steps in (1, 250, 500, 750):
        assert float(sched.alphas_cumprod[steps - 1]) == pytest.approx(_cosine_alpha_bar(steps), rel=1e-4)


def test_noising_near_t0_keeps_the_image_and_t_max_destroys_it():
    sched = ddpm_scheduler()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    early = sched.add_noise(x, noise, torch.zeros(4, dtype=torch.long))
    assert (early - x).abs().max() < 0.05
    late = sched.add_noise(x, noise, torch.full((4,), 999, dtype=torch.long))
    assert abs(float(torch.corrcoef(torch.stack([late.flatten(), x.flatten()]))[0, 1])) < 0.1


class RecordingNet:
    """Stub denoiser: returns the 0-based timestep it was called with, records its inputs."""

    def __init__(self, size_divisor: int = 1):
        self.size_divisor = size_divisor
        self.calls = []

    def __call__(self, x, timesteps, context=None):
        assert x.shape[-2] % self.size_divisor == 0 and x.shape[-1] % self.size_divisor == 0
        self.calls.append((x.clone(), timesteps.clone(), context))
        return timesteps.float().view(-1, 1, 1, 1).expand_as(x).clone()


def test_inferer_averages_the_given_timesteps():
    net = RecordingNet()
    inferer = ReconstructionInferer(ddpm_scheduler(), timesteps=(250, 500, 750), return_members=True)
    x = torch.zeros(2, 1, 16, 16)
    recon, members = inferer(x, net)
    assert [int(c[1][0]) for c in net.calls] == [249, 499, 749]  # step t = scheduler index t - 1
    assert [float(m.mean()) for m in members] == [249.0, 499.0, 749.0]
    torch.testing.assert_close(recon, torch.full_like(x, 499.0))
    assert all(c[2] is x for c in net.calls)  # the clean input is the condition
    single = ReconstructionInferer(ddpm_scheduler(), timesteps=(100,))(x, RecordingNet())
    torch.testing.assert_close(single, torch.full_like(x, 99.0))


def test_inferer_uses_fresh_noise_at_the_right_level():
    net = RecordingNet()
    x = torch.zeros(2, 1, 32, 32)  # noised zeros = sqrt(1 - alpha_bar) * noise
    ReconstructionInferer(ddpm_scheduler(), timesteps=(250, 750), generator=torch.Generator().manual_seed(0))(x, net)
    (n250, _, _), (n750, _, _) = net.calls
    ratio = float(n750.std() / n250.std())
    expected = math.sqrt((1 - _cosine_alpha_bar(750)) / (1 - _cosine_alpha_bar(250)))
    assert ratio == pytest.approx(expected, rel=0.35)  # two independent simplex fields
    assert not torch.allclose(n250 / n250.std(), n750 / n750.std(), atol=0.1)  # fresh noise per member


def test_inferer_odd_sizes_round_trip():
    class Identity(RecordingNet):
        def __call__(self, x, timesteps, context=None):
            super().__call__(x, timesteps, context)
            return x  # the noised (padded) input

    net = Identity(size_divisor=8)
    x = torch.rand(2, 1, 37, 50) * 2 - 1
    recon = ReconstructionInferer(ddpm_scheduler(), timesteps=(1,))(x, net)
    assert recon.shape == x.shape
    assert net.calls[0][0].shape[-2:] == (40, 56)
    assert (recon - x).abs().max() < 0.05  # the crop puts every pixel back where it was


def test_inferer_with_tiny_network_on_odd_size():
    model = ConditionalDDPM(channels=(16, 32, 64), num_res_blocks=1, encoder_depth=18, pixel_unshuffle=2).eval()
    x = torch.rand(3, 1, 37, 50) * 2 - 1
    with torch.no_grad():
        recon = ReconstructionInferer(ddpm_scheduler(), noise_type="gaussian")(x, model)
    assert recon.shape == x.shape and torch.isfinite(recon).all()


def test_inferer_encodes_the_condition_once():
    model = ConditionalDDPM(channels=(16, 32, 64), num_res_blocks=1, encoder_depth=18).eval()
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        once = ReconstructionInferer(ddpm_scheduler(), generator=torch.Generator().manual_seed(0))(x, model)
        assert len(calls) == 1
        # same result as encoding the context at every call
        plain = lambda x_t, t, context=None: model(x_t, t, context=context)  # noqa: E731
        every = ReconstructionInferer(ddpm_scheduler(), generator=torch.Generator().manual_seed(0))(x, plain)
    assert len(calls) == 4
    torch.testing.assert_close(once, every)


def test_inferer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timesteps"):
        ReconstructionInferer(ddpm_scheduler(), timesteps=(0, 500))
    with pytest.raises(ValueError, match="noise_type"):
        ReconstructionInferer(ddpm_scheduler(), noise_type="pink")


@pytest.mark.parametrize("noise_type", ["simplex", "gaussian"])
def test_prepare_batch(noise_type):
    images = torch.rand(4, 1, 32, 32) * 2 - 1
    prep = ReconstructionPrepareBatch(num_train_timesteps=1000, noise_type=noise_type)
    inputs, target, args, kwargs = prep({"image": images}, device="cpu")
    assert torch.equal(inputs, images) and torch.equal(target, images)  # x0 prediction
    assert args == () and torch.equal(kwargs["condition"], images)
    t = kwargs["timesteps"]
    assert t.shape == (4,) and t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 1000
    noise = kwargs["noise"]
    corr = float(torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1])
    assert (corr > 0.9) if noise_type == "simplex" else (abs(corr) < 0.1)
    assert "condition" not in ReconstructionPrepareBatch(condition_name=None)({"image": images})[3]


def test_training_iterations_with_monai_engine():
    torch.manual_seed(0)
    model = ConditionalDDPM(channels=(16, 32, 64), num_res_blocks=1, encoder_depth=18)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # zero-initialised output convolutions: the gradient reaches the encoder from the third step on
    data = [{"image": torch.rand(4, 1, 32, 32) * 2 - 1} for _ in range(3)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_function=torch.nn.L1Loss(),
        inferer=DiffusionInferer(ddpm_scheduler()),
        prepare_batch=ReconstructionPrepareBatch(num_train_timesteps=1000),
    )
    trainer.run()
    assert trainer.state.iteration == 3 and math.isfinite(float(trainer.state.output[0]["loss"]))
    after = model.state_dict()
    assert not torch.equal(after["unet.out.2.conv.weight"], before["unet.out.2.conv.weight"])
    assert not torch.equal(after["encoder.head.weight"], before["encoder.head.weight"])
