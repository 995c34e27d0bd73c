"""The training-side choices of the `reference` and `project` protocols (SPEC section 8), one by one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.networks.layers import DropPath
from monai.transforms import RandBiasFieldd, RandGaussianSmoothd, ScaleIntensityRanged
from torch import nn

from custom_components import transforms as T
from custom_components.engines import ResumableCheckpoint, lr_factor
from custom_components.inferers import ReconstructionInferer, ReconstructionPrepareBatch, ddpm_scheduler
from custom_components.networks.backbone import resnet_backbone
from custom_components.networks.diffusion_unet import ConditionalDDPM
from custom_components.networks.sparse_encoder import (
    LightDecoder,
    SparKDecoder,
    SparseEncoder,
    TargetInvariantEncoder,
    random_patch_mask,
)
from custom_components.noise import make_noise
from tests.conftest import REPO

CONFIGS = REPO / "bundles"


def _parser(bundle: str, configs: list[str], **ids) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / bundle / "configs" / c) for c in configs])
    parser.update({"dataset_dir": "/nonexistent", **ids})
    return parser


def _volume(depth: int = 12, brain: range = range(4, 8)) -> dict:
    """(1, 8, 8, depth) image and mask with brain on the ``brain`` slices only."""
    mask = torch.zeros(1, 8, 8, depth)
    mask[:, 2:6, 2:6, list(brain)] = 1
    return {"image": torch.rand(1, 8, 8, depth) * mask, "mask": mask}


# ---- training slices


def test_all_slices_include_empty_ones_brain_slices_never():
    volume = _volume()
    seen = {}
    for slices in ("all", "brain"):
        slicer = T.RandAxialSliced(["image", "mask"], slices=slices, num_samples=200)
        slicer.set_random_state(0)
        samples = slicer(volume)
        seen[slices] = {s["slice"] for s in samples}
        for s in samples:
            assert s["image"].shape == (1, 8, 8)
            assert bool(s["mask"].any()) == (s["slice"] in range(4, 8))
    assert seen["all"] == set(range(12))  # uniform over every slice, empty ones included
    assert seen["brain"] == set(range(4, 8))


def test_slice_choice_is_checked():
    with pytest.raises(ValueError, match="slices"):
        T.RandAxialSliced(["image", "mask"], slices="some")


# ---- simplex noise


@pytest.mark.parametrize("noise_type", ["simplex", "gaussian"])
def test_make_noise_shared_repeats_one_field(noise_type):
    images = torch.zeros(4, 1, 24, 24)
    shared = make_noise(images, noise_type, shared=True)
    own = make_noise(images, noise_type)
    assert shared.shape == own.shape == images.shape
    assert all(torch.equal(shared[i], shared[0]) for i in range(4)) and shared.std() > 0
    assert not any(torch.allclose(own[i], own[0]) for i in range(1, 4))


@pytest.mark.parametrize("shared", [True, False])
def test_training_batch_noise_one_field_per_batch_when_shared(shared):
    prep = ReconstructionPrepareBatch(shared_noise=shared)
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    first = prep({"image": images}, device="cpu")[3]["noise"]
    second = prep({"image": images}, device="cpu")[3]["noise"]
    same = [torch.equal(first[i], first[0]) for i in range(1, 5)]
    assert all(same) if shared else not any(same)
    assert not torch.allclose(first, second)  # a fresh field for every batch


class RecordingNet:
    """Stub denoiser that records the noised inputs it is called with."""

    def __init__(self):
        self.noisy = []

    def __call__(self, x, timesteps, context=None):
        self.noisy.append(x.clone())
        return x


@pytest.mark.parametrize("shared", [True, False])
def test_test_time_noise_one_field_per_t_when_shared(shared):
    net = RecordingNet()
    slices = torch.zeros(6, 1, 32, 32)  # the slices of one volume; noised zeros are the scaled noise itself
    ReconstructionInferer(ddpm_scheduler(), timesteps=(250, 500, 750), shared_noise=shared)(slices, net)
    assert len(net.noisy) == 3
    for noisy in net.noisy:
        same = [torch.equal(noisy[i], noisy[0]) for i in range(1, 6)]
        assert all(same) if shared else not any(same)
        assert noisy.std() > 0
    unit = [n[0] / n[0].std() for n in net.noisy]
    assert not torch.allclose(unit[0], unit[1], atol=0.1) and not torch.allclose(unit[1], unit[2], atol=0.1)


# ---- augmentation


def _augment_chain(protocol: str) -> list:
    parser = _parser("cond_ddpm", ["common.yaml", "train.yaml"], protocol=protocol)
    return parser.get_parsed_content("train#preprocessing").transforms


def test_reference_augmentation_settings():
    chain = _augment_chain("reference")
    assert isinstance(chain[1], T.RandAxialSliced) and chain[1].slices == "all"  # augmented before slicing
    gamma, bias, blur, ghost = chain[0].transforms
    assert isinstance(gamma, T.RandGammad) and gamma.prob == 0.5 and tuple(gamma.log_gamma) == (-0.3, 0.3)
    assert isinstance(bias, RandBiasFieldd) and bias.prob == 0.25
    assert tuple(bias.rand_bias_field.coeff_range) == (-0.5, 0.5) and bias.rand_bias_field.degree == 3
    assert isinstance(blur, RandGaussianSmoothd) and blur.prob == 0.25
    smooth = blur.rand_smooth
    assert [tuple(r) for r in (smooth.sigma_x, smooth.sigma_y, smooth.sigma_z)] == [(0.0, 1.0)] * 3  # 0-2 mm at 2 mm
    assert isinstance(ghost, T.RandGhostingd) and ghost.prob == 0.5 and ghost.spatial_dims == 3
    assert tuple(ghost.num_ghosts) == (4, 10) and tuple(ghost.intensity) == (0.5, 1.0) and ghost.restore is None
    assert not any(isinstance(t, ScaleIntensityRanged) for t in chain)  # no clipping


def test_project_augmentation_is_the_clipped_slice_augmentation():
    chain = _augment_chain("project")
    assert isinstance(chain[0], T.RandAxialSliced) and chain[0].slices == "brain"
    steps = chain[1].transforms
    clip = steps[-1].scaler
    assert (clip.a_min, clip.a_max, clip.b_min, clip.b_max, clip.clip) == (0, 1, 0, 1, True)  # clipped to [0, 1]
    assert isinstance(steps[-2], T.RandGhostingd)
    assert steps[-2].spatial_dims == 2


@pytest.mark.parametrize("protocol", ["reference", "project"])
def test_clipping_only_under_project(protocol):
    parser = _parser("cond_ddpm", ["common.yaml", "train.yaml"], protocol=protocol)
    preprocessing = parser.get_parsed_content("train#preprocessing")
    preprocessing.set_random_state(0)
    volume = _volume(depth=10, brain=range(10))
    volume["image"] = 0.2 + 0.8 * volume["mask"]  # 1.0 in the brain: any brightening leaves [0, 1]
    outside = 0
    for _ in range(60):
        image = preprocessing(volume)["image"]
        assert image.shape == (1, 8, 8)
        outside += int(image.max() > 1 + 1e-4 or image.min() < -1 - 1e-4)  # diffusion range [-1, 1]
    assert (outside > 0) == (protocol == "reference")


def test_signed_gamma_is_log_uniform_and_keeps_the_sign():
    gamma = T.RandGammad("image", prob=1.0, log_gamma=(-0.3, 0.3))
    gamma.set_random_state(0)
    image = torch.tensor([[0.5, -0.5, 0.0, 2.0]])
    exponents = []
    for _ in range(200):
        out = gamma({"image": image})["image"]
        g = math.log(float(out[0, 0])) / math.log(0.5)
        torch.testing.assert_close(out, image.sign() * image.abs() ** g)
        exponents.append(math.log(g))
    assert -0.3 <= min(exponents) < -0.25 and 0.25 < max(exponents) <= 0.3
    skipped = T.RandGammad("image", prob=0.0)({"image": image})["image"]
    assert torch.equal(skipped, image)


def test_ghosting_acts_along_any_of_the_three_axes():
    # an image that varies along one axis only is changed only by ghosts along that axis
    profile = torch.linspace(0, 1, 20) ** 2
    changed = {}
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = 20
        image = profile.view(1, *shape).expand(1, 20, 20, 20).clone()
        ghosting = T.RandGhostingd("image", prob=1.0, restore=None, spatial_dims=3)
        ghosting.set_random_state(0)
        changed[axis] = sum(not torch.allclose(ghosting({"image": image})["image"], image, atol=1e-4)
                            for _ in range(30))
    assert all(0 < n < 30 for n in changed.values()), changed


def test_ghosting_restores_only_the_central_plane_when_restore_is_none():
    image = torch.rand(1, 16, 16, 16)
    ghosting = T.RandGhostingd("image", prob=1.0, intensity=(1.0, 1.0), num_ghosts=(4, 4), restore=None,
                               spatial_dims=3)
    ghosting.set_random_state(0)
    out = ghosting({"image": image})["image"]
    dims = (-3, -2, -1)
    before = torch.fft.fftshift(torch.fft.fftn(image, dim=dims), dim=dims)
    after = torch.fft.fftshift(torch.fft.fftn(out, dim=dims), dim=dims)
    axis = next(a for a in range(1, 4) if after.select(a, 4).abs().max() < 1e-3)  # the plane of ghosts
    for index in range(16):
        zeroed = index % 4 == 0 and index != 8
        plane = after.select(axis, index)
        assert torch.allclose(plane, torch.zeros_like(plane), atol=1e-3) == zeroed
        assert torch.allclose(plane, before.select(axis, index), atol=1e-3) == (not zeroed)


# ---- drop path


def _drop_paths(module: nn.Module) -> list[float]:
    return [m.drop_prob for m in module.modules() if isinstance(m, DropPath)]


@pytest.mark.parametrize("depth", [18, 50])
def test_drop_path_rates_and_state_dict_keys(depth):
    plain, dropped = resnet_backbone(depth), resnet_backbone(depth, drop_path=0.05)
    assert _drop_paths(plain) == []
    rates = _drop_paths(dropped)
    blocks = len([b for layer in (plain.layer1, plain.layer2, plain.layer3, plain.layer4) for b in layer])
    assert len(rates) == blocks - 1  # the first block's rate is 0: no module
    assert rates[-1] == pytest.approx(0.05) and rates == sorted(rates)
    assert np.allclose(np.diff([0.0, *rates]), 0.05 / (blocks - 1))  # linear in the block index
    assert list(plain.state_dict()) == list(dropped.state_dict())


def test_contrastive_checkpoint_loads_strictly_into_the_conditioning_encoder(tmp_path):
    encoder = TargetInvariantEncoder(depth=18, decoder_width=64, decoder="spark", drop_path=0.05)
    torch.save(encoder.encoder.backbone.state_dict(), tmp_path / "model.pt")
    for drop_path in (0.05, 0.0):
        model = ConditionalDDPM(channels=(8, 16, 16), num_res_blocks=1, encoder_depth=18,
                                encoder_drop_path=drop_path, encoder_ckpt=tmp_path / "model.pt")
        assert bool(_drop_paths(model.encoder)) == (drop_path > 0)
        for key, value in encoder.encoder.backbone.state_dict().items():
            assert torch.equal(model.encoder.backbone.state_dict()[key], value)


@pytest.mark.parametrize("sparse", [False, True])
def test_drop_path_acts_in_training_only(sparse):
    torch.manual_seed(0)
    x = torch.rand(4, 1, 64, 64)
    active = random_patch_mask(4, (2, 2), 0.5)
    outputs = {}
    for rate in (0.0, 0.5):
        torch.manual_seed(1)
        net = SparseEncoder(18, drop_path=rate) if sparse else resnet_backbone(18, drop_path=rate)
        run = (lambda n: n(x, active)[-1]) if sparse else (lambda n: n(x))
        with torch.no_grad():
            outputs[rate] = run(net.eval())
            first, second = run(net.train()), run(net.train())
        assert torch.allclose(first, second) == (rate == 0.0)  # random per-sample drops in training
    torch.testing.assert_close(outputs[0.0], outputs[0.5])  # same weights, no drop in eval mode


# ---- SparK decoder


def test_spark_decoder_structure():
    model = TargetInvariantEncoder(depth=18, decoder_width=64, decoder="spark")
    decoder = model.decoder
    assert isinstance(decoder, SparKDecoder)
    assert [p.kernel_size for p in decoder.projections] == [(3, 3), (3, 3), (3, 3), (1, 1)]  # strides 4..32
    assert [n.num_features for n in decoder.norms] == model.encoder.out_channels
    for block in decoder.up_blocks:
        up, conv1, bn1, act, conv2, bn2 = block
        assert isinstance(up, nn.ConvTranspose2d) and up.kernel_size == (4, 4) and up.stride == (2, 2)
        assert up.padding == (1, 1) and up.out_channels == up.in_channels
        assert [c.kernel_size for c in (conv1, conv2)] == [(3, 3), (3, 3)]
        assert isinstance(bn1, nn.BatchNorm2d) and isinstance(bn2, nn.BatchNorm2d) and isinstance(act, nn.ReLU6)
    light = TargetInvariantEncoder(depth=18, decoder_width=64, decoder="light").decoder
    assert isinstance(light, LightDecoder)
    assert {p.kernel_size for p in light.projections} == {(1, 1)}
    assert {b[0].kernel_size for b in light.up_blocks} == {(2, 2)}
    assert not any(isinstance(m, nn.ReLU6) for m in light.modules())
    with pytest.raises(ValueError, match="decoder"):
        TargetInvariantEncoder(depth=18, decoder="heavy")


def test_spark_decoder_forward_backward_at_96():
    torch.manual_seed(0)
    model = TargetInvariantEncoder(depth=18, decoder_width=64, decoder="spark", drop_path=0.05).train()
    x = torch.rand(4, 1, 96, 96)
    out = model(x)
    assert out["reconstruction"].shape == (4, 1, 96, 96)
    out["reconstruction"].square().mean().backward()
    decoder = model.decoder
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in decoder.mask_tokens)
    assert all(n.weight.grad is not None and n.weight.grad.abs().sum() > 0 for n in decoder.norms)
    assert all(int(n.num_batches_tracked) == 1 for n in decoder.norms)


def test_spark_decoder_norm_uses_visible_positions_only():
    torch.manual_seed(0)
    decoder = SparKDecoder([8, 16, 32, 64], width=64).train()
    active = random_patch_mask(3, (2, 2), 0.5)
    sizes = [16, 8, 4, 2]
    visible = [active.repeat_interleave(s // 2, -2).repeat_interleave(s // 2, -1) for s in sizes]
    features = [torch.randn(3, c, s, s) * v for c, s, v in zip([8, 16, 32, 64], sizes, visible)]
    features[0] = features[0] + 5 * visible[0]  # visible mean 5 per channel; hidden positions are zero
    decoder(features, visible)
    momentum = decoder.norms[0].momentum
    expected = features[0].permute(1, 0, 2, 3)[:, visible[0].squeeze(1)].mean(1) * momentum
    torch.testing.assert_close(decoder.norms[0].running_mean, expected)


# ---- bundle configs


ENCODER_IDS = {
    "reference": {"decoder": "spark", "drop_path": 0.05, "train_slices": "all", "val_slices": "random",
                  "val_interval": 1},
    "project": {"decoder": "light", "drop_path": 0.0, "train_slices": "brain", "val_slices": "all", "val_interval": 10},
}
DDPM_IDS = {
    "reference": {"train_slices": "all", "shared_noise_train": True, "shared_noise_test": True, "val_interval": 1,
                  "val_slices": "random", "augmentation": "reference", "drop_path": 0.05},
    "project": {"train_slices": "brain", "shared_noise_train": False, "shared_noise_test": False, "val_interval": 10,
                "val_slices": "all", "augmentation": "project", "drop_path": 0.0},
}


@pytest.mark.parametrize("protocol", ["reference", "project"])
@pytest.mark.parametrize("extra", [[], ["multi_gpu_train.yaml"]])
def test_encoder_config_follows_protocol(protocol, extra):
    parser = _parser("contrastive_encoder", ["common.yaml", "train.yaml", *extra], protocol=protocol)
    assert {k: parser.get_parsed_content(k) for k in ENCODER_IDS[protocol]} == ENCODER_IDS[protocol]
    assert parser.get_parsed_content("network_def#decoder") == ENCODER_IDS[protocol]["decoder"]
    assert parser.get_parsed_content("network_def#drop_path") == ENCODER_IDS[protocol]["drop_path"]
    assert parser.get_parsed_content("protocol") == protocol
    assert parser.get_parsed_content("train#preprocessing").slices == ENCODER_IDS[protocol]["train_slices"]
    validation = parser.get_parsed_content("validate#preprocessing")
    batch_size = parser.get_parsed_content("validate#dataloader#batch_size")
    if protocol == "reference":
        assert isinstance(validation, T.RandAxialSliced) and validation.num_samples == 1 and validation.slices == "all"
        assert batch_size == parser.get_parsed_content("batch_size")
    else:
        assert isinstance(validation, T.AxialSlicesd) and validation.brain_only and batch_size == 1


def test_encoder_demo_network_follows_protocol_but_its_decoder():
    """The paper configs take the decoder from the protocol; the demo profile pins the light one (only the
    backbone carries over to cond_ddpm), while drop_path still follows the protocol."""
    for protocol, ids in ENCODER_IDS.items():
        paper = _parser("contrastive_encoder", ["common.yaml", "train.yaml"], protocol=protocol,
                        depth=10).get_parsed_content("network_def")
        assert isinstance(paper.decoder, SparKDecoder if ids["decoder"] == "spark" else LightDecoder)
        demo = _parser("contrastive_encoder", ["common.yaml", "train.yaml", "demo.yaml"],
                       protocol=protocol).get_parsed_content("network_def")
        assert isinstance(demo.decoder, LightDecoder)
        assert max(_drop_paths(demo), default=0.0) == pytest.approx(ids["drop_path"])


@pytest.mark.parametrize("protocol", ["reference", "project"])
@pytest.mark.parametrize("extra", [[], ["multi_gpu_train.yaml"], ["demo.yaml"]])
def test_cond_ddpm_config_follows_protocol(protocol, extra):
    parser = _parser("cond_ddpm", ["common.yaml", "train.yaml", *extra], protocol=protocol)
    expected = dict(DDPM_IDS[protocol])
    if extra == ["demo.yaml"]:
        expected["val_interval"] = parser.get_parsed_content("epochs")  # the demo profile validates at the last one
    assert {k: parser.get_parsed_content(k) for k in expected} == expected
    assert parser.get_parsed_content("prepare_batch").shared_noise == expected["shared_noise_train"]
    assert parser.get_parsed_content("network_def#encoder_drop_path") == expected["drop_path"]
    assert parser.get_parsed_content("train#slicer").slices == expected["train_slices"]
    validation = parser.get_parsed_content("validate#preprocessing").transforms
    if expected["val_slices"] == "random":
        slicer = next(t for t in validation if isinstance(t, T.RandAxialSliced))
        assert slicer.num_samples == 1 and len(validation) == 3  # one slice, augmented, scaled
        assert parser.get_parsed_content("validate#dataloader#batch_size") == parser.get_parsed_content("batch_size")
    else:
        assert isinstance(validation[0], T.AxialSlicesd) and validation[0].brain_only and len(validation) == 2
        assert parser.get_parsed_content("validate#dataloader#batch_size") == 1


def test_one_choice_flips_alone():
    parser = _parser("cond_ddpm", ["common.yaml", "train.yaml"], protocol="reference", train_slices="brain", augmentation="project")
    assert parser.get_parsed_content("train#slicer").slices == "brain"
    assert isinstance(parser.get_parsed_content("train#preprocessing").transforms[0], T.RandAxialSliced)
    assert parser.get_parsed_content("shared_noise_train") is True and parser.get_parsed_content("drop_path") == 0.05
    for key, value in (("augmentation", "both"), ("val_slices", "some")):
        with pytest.raises(RuntimeError) as error:
            _parser("cond_ddpm", ["common.yaml", "train.yaml"], **{key: value}).get_parsed_content("validate#preprocessing")
        assert f"{key} must be one of" in str(error.value.__cause__)


def test_learning_rate_constant_as_the_reference_or_a_cosine_on_request():
    assert _parser("cond_ddpm", ["common.yaml", "train.yaml"]).get_parsed_content("lr_schedule") == "constant"
    assert [lr_factor("constant", 10)(step) for step in (0, 5, 10, 20)] == [1.0] * 4
    cosine = lr_factor("cosine", 10)  # down to 0 at the last step, and held there by a run resumed past it
    assert [cosine(step) for step in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        lr_factor("linear", 10)


def test_resume_from_a_checkpoint_without_an_lr_scheduler_entry(tmp_path, caplog):
    # checkpoints written before 0.2.1 have no lr_scheduler: the rest resumes, the schedule starts afresh
    old_net = nn.Linear(2, 1)
    old = Engine(lambda engine, batch: None)
    old.run(range(4), max_epochs=2)
    torch.save({"network": old_net.state_dict(), "trainer": old.state_dict()}, tmp_path / "checkpoint_epoch=2.pt")

    net = nn.Linear(2, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(net.parameters(), lr=0.1), lambda step: 1.0)
    trainer = Engine(lambda engine, batch: None)
    ResumableCheckpoint(tmp_path, {"network": net, "lr_scheduler": scheduler}).attach(trainer)
    seen = {}
    trainer.add_event_handler(Events.STARTED, lambda engine: seen.update(weight=net.weight.detach().clone()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.update(n=seen.get("n", 0) + 1))
    trainer.run(range(4), max_epochs=3)
    assert torch.equal(seen["weight"], old_net.weight) and seen["n"] == 4 and trainer.state.epoch == 3
    assert "has no lr_scheduler" in caplog.text and scheduler.last_epoch == 0


@pytest.mark.parametrize("word, value", [("false", False), ("true", True)])
def test_yes_no_ids_typed_as_words_on_the_command_line(word, value, tmp_path):
    # `monai.bundle run --shared_noise_train false` hands the config the string "false", which bool() reads as True
    train = _parser("cond_ddpm", ["common.yaml", "train.yaml"], shared_noise_train=word)
    assert train.get_parsed_content("prepare_batch").shared_noise is value
    assert ResumableCheckpoint(tmp_path, {}, resume=word).resume is value  # --resume false starts from scratch
    evaluate = _parser("cond_ddpm", ["common.yaml", "evaluate.yaml"], shared_noise_test=word)
    assert evaluate.get_parsed_content("inferer#slice_inferer").shared_noise is value
    with pytest.raises(ValueError, match="shared_noise must be true or false"):
        ReconstructionPrepareBatch(shared_noise="maybe")
