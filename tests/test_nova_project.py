"""nova_eval's project protocol: head mask, training orientation and scale, healthy-calibrated threshold."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from custom_components.metrics import erode_brain_mask
from custom_components.nova_inference import (
    TRAINING_BRAIN_AREA,
    NovaBoxWriter,
    NovaTrainingFramed,
    head_mask,
    healthy_threshold,
    residual_to_native,
)
from tests.conftest import REPO

CONFIGS = REPO / "bundles" / "nova_eval" / "configs"
DEMO = ["common.yaml", "inference.yaml", "demo.yaml"]


def ellipse(shape, centre, radii):
    rows, cols = np.indices(shape)
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1.0


def display_slice(with_skull: bool = True):
    """A radiological-display slice (anterior up): a smoothly textured brain, a bright anterior marker, maybe a
    skull."""
    shape, centre = (400, 330), (210, 150)
    brain = ellipse(shape, centre, (130, 105))
    rows, cols = np.indices(shape)
    image = np.where(brain, 0.35 + 0.25 * cols / shape[1] + 0.1 * np.sin(rows / 15.0), 0.0)  # smooth texture
    image[ellipse(shape, (centre[0] - 110, centre[1]), (8, 8))] = 0.95  # anterior
    if with_skull:
        image[ellipse(shape, centre, (142, 117)) & ~ellipse(shape, centre, (132, 107))] = 0.02  # bone
        image[ellipse(shape, centre, (152, 127)) & ~ellipse(shape, centre, (142, 117))] = 0.8  # scalp
    return image.astype(np.float32), brain


@pytest.mark.parametrize("with_skull", [True, False])
def test_head_mask_is_the_brain_inside_the_skull(with_skull):
    image, brain = display_slice(with_skull)
    mask = head_mask(image, erosion=0.0)
    assert (mask & brain).sum() / (mask | brain).sum() > 0.97
    eroded = head_mask(image)  # eroded by 3/86 of the extent: about 8 of 262 pixels
    assert eroded.sum() < mask.sum() and not (eroded & ~mask).any()
    assert eroded.sum() > ellipse(image.shape, (210, 150), (120, 95)).sum()


def test_training_frame_scale_orientation_and_way_back():
    image, brain = display_slice()
    d = NovaTrainingFramed()({"image": image[None], "filename": "x.png"})
    canvas, frame = d["image"][0], d["frame"]
    assert canvas.shape == (96, 96) and d["native_image"].shape == (1, *image.shape)
    assert d["head_mask"].shape == image.shape
    # the brain's bounding box gets the area of an average training brain; intensities 1-99 % in the head
    rows, cols = np.nonzero(canvas > 0.05)
    assert abs((np.ptp(rows) + 1) * (np.ptp(cols) + 1) / TRAINING_BRAIN_AREA - 1.0) < 0.1
    assert canvas.max() <= 1.0 and np.percentile(canvas[canvas > 0.05], 50) > 0.2
    # training voxel order (rows left-right, columns posterior-anterior): the anterior marker at the top of
    # the display lands at the high column end
    oriented = NovaTrainingFramed(training_scale=False)({"image": image[None]})["image"][0]
    assert oriented.shape == image.shape[::-1]
    r, c = np.argwhere(oriented == oriented.max()).mean(0)  # the marker's centre
    assert (r, c) == (image.shape[1] - 1 - 150, image.shape[0] - 1 - 100)
    # a map on the canvas goes back onto the native pixels it came from
    back = residual_to_native(canvas, frame)
    assert back.shape == image.shape
    inside = ellipse(image.shape, (210, 150), (115, 90))
    assert np.corrcoef(back[inside], image[inside])[0, 1] > 0.8
    assert back[ellipse(image.shape, (100, 150), (5, 5))].mean() > 0.9  # the marker, back in place


def test_reference_frame_is_the_identity():
    image, _ = display_slice()
    frame = NovaTrainingFramed(use_head_mask=False, training_scale="false", training_orientation=False)
    d = frame({"image": image[None]})
    assert np.array_equal(d["image"][0], image) and d["head_mask"].all()
    assert np.array_equal(residual_to_native(image, d["frame"]), image)


def fake_engine(image, recon, frame, mask, native, name="x.png"):
    as_batch = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))[None]  # noqa: E731
    state = SimpleNamespace(output={"image": as_batch(image)[None], "pred": as_batch(recon)[None]},
                            batch={"filename": [name], "gt_boxes": torch.zeros(1, 0, 4), "frame": as_batch(frame),
                                   "head_mask": as_batch(mask), "native_image": as_batch(native)[None]})
    return SimpleNamespace(state=state)


def test_writer_maps_boxes_back_and_keeps_them_in_the_head(tmp_path):
    # canvas 96 x 96 = the native 200 x 160 image around (100, 80) at zoom 0.5, same orientation
    frame = np.array([0.5, 100.0, 80.0, 200.0, 160.0, 0.0])
    image = -np.ones((96, 96))
    image[40:56, 30:46] = 1.0  # white block on black; the reconstruction is black everywhere
    recon = -np.ones((96, 96))
    native = np.zeros((200, 160))
    writer = NovaBoxWriter(tmp_path / "p.json", threshold=0.5, median_size=5)
    writer(fake_engine(image, recon, frame, np.ones((200, 160)), native, "in.png"))
    (box,) = writer.predictions["in.png"]
    # canvas rows 40..55 -> native (u - 47.5) / 0.5 + 100: 85..117; columns 30..45 -> 45..77
    assert abs(box["y_min"] - 85) <= 3 and abs(box["y_max"] - 117) <= 3
    assert abs(box["x_min"] - 45) <= 3 and abs(box["x_max"] - 77) <= 3
    outside = np.ones((200, 160))
    outside[80:125, 40:85] = 0  # the block lies outside the head
    writer(fake_engine(image, recon, frame, outside, native, "out.png"))
    assert writer.predictions["out.png"] == []


def test_healthy_threshold_is_the_quantile_of_healthy_residuals():
    rng = np.random.default_rng(1)
    mask = np.zeros((1, 24, 24, 6), np.float32)
    mask[:, 4:20, 4:20, 1:5] = 1
    volumes = [{"image": rng.random((1, 24, 24, 6)).astype(np.float32) * mask, "mask": mask} for _ in range(2)]

    def black(x, network):  # reconstruction 0 on [0, 1]: the residual is the image itself, halved from [-1, 1]
        return -torch.ones_like(x)

    expected = []
    for v in volumes:
        eroded = erode_brain_mask(v["mask"][0] > 0)
        expected += [v["image"][0][..., z][eroded[..., z]] for z in (1, 3)]  # every second slice with brain
    expected = np.concatenate(expected)
    for fpr in (0.5, 0.05):
        threshold = healthy_threshold(torch.nn.Identity(), black, volumes, fpr=fpr)
        assert threshold == pytest.approx(np.quantile(expected, 1 - fpr), abs=1e-6)
    with pytest.raises(ValueError, match="healthy_fpr"):
        healthy_threshold(torch.nn.Identity(), black, volumes, fpr=1.5)


@pytest.mark.parametrize("protocol", ["reference", "project"])
def test_protocol_sets_the_defaults_of_each_choice(protocol, tmp_path):
    wf = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in DEMO],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, workflow_type="infer",
                        bundle_root=str(REPO / "bundles" / "nova_eval"), dataset_dir=str(tmp_path), protocol=protocol,
                        ckpt_path="model.pt")
    wf.initialize()
    project = protocol == "project"
    for key in ("head_mask", "training_orientation", "training_scale", "calibrate_threshold"):
        assert wf.parser.get_parsed_content(key) is project, key
    frame = wf.parser.get_parsed_content("preprocessing").transforms[1]
    assert (frame.use_head_mask, frame.training_scale, frame.reorient) == (project,) * 3
    assert wf.parser.get_parsed_content("box_writer").threshold == 0.5  # until calibrated at the start of a run
    calibration = wf.parser.get_parsed_content("handlers")[1]
    assert calibration.enabled is project and calibration.fpr == 0.05


def test_unknown_protocol_is_refused(tmp_path):
    wf = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in DEMO],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, workflow_type="infer",
                        bundle_root=str(REPO / "bundles" / "nova_eval"), dataset_dir=str(tmp_path), protocol="mine")
    with pytest.raises(RuntimeError) as error:  # monai.bundle wraps the ValueError of the expression
        wf.initialize()
    assert "protocol must be one of ('reference', 'project'), got 'mine'" in str(error.value.__cause__)
