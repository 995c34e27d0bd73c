"""nova_eval inference: boxes from the conditional DDPM's reconstruction residual, then the evaluate config."""

import ast
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigWorkflow
from monai.handlers import CheckpointLoader
from PIL import Image

from custom_components.networks.diffusion_unet import ConditionalDDPM
from custom_components.nova_data import nova_items
from custom_components.nova_inference import NovaBoxWriter
from custom_components.nova_metrics import evaluate_nova_files
from tests.conftest import REPO, run_bundle

BUNDLE = "nova_eval"
CONFIGS = REPO / "bundles" / BUNDLE / "configs"
PAPER = ["common.yaml", "inference.yaml"]
DEMO = [*PAPER, "demo.yaml"]
DEMO_IDS = yaml.safe_load((CONFIGS / "demo.yaml").read_text())  # the demo profile's network ids
TINY = {"channels": (8, 16, 16), **{k: DEMO_IDS[k] for k in ("num_res_blocks", "encoder_depth", "pixel_unshuffle")}}
PRED_KEYS = {"x_min", "y_min", "x_max", "y_max", "score"}


def tiny_network(constant: float | None = None) -> ConditionalDDPM:
    """The demo-profile network at test size. MONAI zero-initialises the output convolution (the untrained
    network predicts 0 everywhere); ``constant=None`` re-draws it so the reconstruction is random, a
    number keeps the weights at zero and sets the bias, so the network predicts that value everywhere."""
    torch.manual_seed(0)
    net = ConditionalDDPM(**TINY)
    conv = net.unet.out[-1].conv
    if constant is None:
        conv.reset_parameters()
    else:
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.fill_(constant)
    return net


def save_checkpoint(path, constant=None):
    torch.save(tiny_network(constant).state_dict(), path)
    return str(path)


def workflow(**overrides) -> ConfigWorkflow:
    return ConfigWorkflow(config_file=[str(CONFIGS / c) for c in DEMO], meta_file=str(CONFIGS / "metadata.json"),
                          logging_file=False, workflow_type="infer", bundle_root=str(REPO / "bundles" / BUNDLE),
                          **{"channels": list(TINY["channels"]), **overrides})


def write_metadata(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filename", "case_id", "caption", "bbox_gold", "bbox_raters"])
        writer.writeheader()
        writer.writerows({"case_id": r["filename"][:-4], "bbox_raters": "", **r} for r in rows)


# --------------------------------------------------------------------------- hand-made known answer
@pytest.fixture
def hand_made_root(tmp_path):
    """A 50 x 70 white slice (not square, not a multiple of the network's size divisor 8) with two black
    rectangles and a black 3 x 3 dot, a blank white slice, and a FLAIR row the T2 filter must drop."""
    root = tmp_path / "data"
    images = root / "NOVA" / "images"
    images.mkdir(parents=True)
    a = np.full((50, 70), 255, np.uint8)
    a[10:20, 30:50] = 0  # rows 10-19, columns 30-49: 10 x 20
    a[35:41, 5:13] = 0  # rows 35-40, columns 5-12: 6 x 8
    a[44:47, 60:63] = 0  # 3 x 3 dot: 9 of the 25 pixels of any 5 x 5 window, the median filter removes it
    Image.fromarray(a).save(images / "a.png")
    Image.fromarray(np.full((40, 30), 255, np.uint8)).save(images / "blank.png")
    write_metadata(root / "NOVA" / "metadata.csv", [
        {"filename": "a.png", "caption": "Axial T2 image with two lesions.",
         "bbox_gold": "{'x': [30.0, 5.0], 'y': [10.0, 35.0], 'width': [20.0, 8.0], 'height': [10.0, 6.0]}"},
        {"filename": "blank.png", "caption": "Axial T2 image, normal.", "bbox_gold": ""},
        {"filename": "flair.png", "caption": "Axial FLAIR image.", "bbox_gold": "{'x': [1], 'y': [1], 'width': [2], "
                                                                           "'height': [2]}"},  # no file: never read
    ])
    return root


def test_inference_known_boxes_overlays_then_perfect_metrics(hand_made_root, tmp_path):
    # a network that predicts +1 (white) everywhere: each ensemble member and their mean are white, so the
    # residual on [0, 1] is 1 on the black pixels and 0 elsewhere, and the boxes are the black rectangles
    out = tmp_path / "out"
    wf = workflow(dataset_dir=str(hand_made_root), ckpt_path=save_checkpoint(tmp_path / "white.pt", 1.0),
                  output_dir=str(out), save_overlays=True)
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()

    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions == {
        # largest first; regionprops convention: min inclusive, max exclusive; score = mean residual = 1
        "a.png": [{"x_min": 30, "y_min": 10, "x_max": 50, "y_max": 20, "score": 1.0},
                  {"x_min": 5, "y_min": 35, "x_max": 13, "y_max": 41, "score": 1.0}],
        "blank.png": [],
    }

    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png", "blank.png"]
    overlay = np.asarray(Image.open(out / "overlays" / "a.png"))
    assert overlay.shape == (50, 70, 3)
    red = np.all(overlay == (255, 0, 0), axis=-1)
    green = np.all(overlay == (0, 255, 0), axis=-1)
    # predicted box: pixels 30..49 x 10..19 (max exclusive), drawn over the gold box (x + width = 50,
    # y + height = 20), whose right column 50 and bottom row 20 stay green
    assert red[10, 30:50].all() and red[10:20, 49].all() and not red[:, 50].any()
    assert green[10:21, 50].all() and green[20, 30:51].all()
    assert red.sum() == 2 * (20 + 10) - 4 + 2 * (8 + 6) - 4  # the two rectangles' outlines, nothing else
    assert np.all(np.asarray(Image.open(out / "overlays" / "blank.png")) == 255)  # white, no box drawn

    metrics = evaluate_nova_files(out / "predictions.json", hand_made_root / "NOVA" / "metadata.csv")
    ref = metrics["reference"]
    # both gold boxes found (inclusive IoU 1); blank.png has no gold box and no prediction, so AP 0 there
    assert (ref["TP@30"], ref["FP@30"], ref["GT@30"]) == (2, 0, 2)
    assert ref["mAP@50:95"] == pytest.approx(0.5, abs=1e-5) and ref["ACC@50"] == 1.0


def fake_engine(image, recon, name="x.png"):
    """What NovaBoxWriter reads from a SupervisedEvaluator with decollate=False."""
    as_batch = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))[None, None]  # noqa: E731
    state = SimpleNamespace(output={"image": as_batch(image), "pred": as_batch(recon)},
                            batch={"filename": [name], "gt_boxes": torch.zeros(1, 0, 4)})
    return SimpleNamespace(state=state)


def test_residual_scale_and_strict_threshold(tmp_path):
    # image in [-1, 1]: left half black (-1), right half white (+1)
    image = np.ones((20, 20))
    image[:, :10] = -1.0
    writer = NovaBoxWriter(tmp_path / "p.json")
    writer(fake_engine(image, np.zeros((20, 20))))  # mid-gray: residual 0.5 everywhere, not above 0.5
    writer(fake_engine(image, np.ones((20, 20)), "white.png"))  # residual 1 on the black half, 0 elsewhere
    writer(fake_engine(image, np.full((20, 20), 3.0), "over.png"))  # clipped to +1 first: same residual
    writer.write()
    half = [{"x_min": 0, "y_min": 0, "x_max": 10, "y_max": 20, "score": 1.0}]
    assert json.loads((tmp_path / "p.json").read_text()) == {"x.png": [], "white.png": half, "over.png": half}
    low = NovaBoxWriter(tmp_path / "q.json", threshold=0.4)
    low(fake_engine(image, np.zeros((20, 20))))
    assert low.predictions["x.png"] == [{"x_min": 0, "y_min": 0, "x_max": 20, "y_max": 20, "score": 0.5}]


# ----------------------------------------------------------------------------- demo data end to end
def test_demo_inference_then_evaluate(demo_root, tmp_path):
    nova = demo_root / "NOVA"
    with open(nova / "metadata.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if "T2" in r["caption"]]
    assert rows, "the demo data should hold T2 images"
    sizes = {r["filename"]: Image.open(nova / "images" / r["filename"]).size for r in rows}  # (W, H)
    n_gold = sum(len(ast.literal_eval(r["bbox_gold"])["x"]) for r in rows)

    out = tmp_path / "out"
    ckpt = save_checkpoint(tmp_path / "random.pt")
    # one noise level instead of three keeps the test short on CPU; the ensemble runs in the tests above
    run_bundle(DEMO, BUNDLE, "--dataset_dir", str(demo_root), "--ckpt_path", ckpt, "--output_dir", str(out),
               "--channels", "[8,16,16]", "--recon_timesteps", "[500]", "--save_overlays", "true")

    predictions = json.loads((out / "predictions.json").read_text())
    assert set(predictions) == set(sizes)
    n_boxes = 0
    for name, boxes in predictions.items():
        width, height = sizes[name]
        assert len(boxes) <= 5
        areas = [(b["x_max"] - b["x_min"]) * (b["y_max"] - b["y_min"]) for b in boxes]
        assert areas == sorted(areas, reverse=True)
        for b in boxes:
            assert set(b) == PRED_KEYS
            assert all(isinstance(b[k], int) for k in PRED_KEYS - {"score"})
            assert 0 <= b["x_min"] < b["x_max"] <= width and 0 <= b["y_min"] < b["y_max"] <= height, (name, b)
            assert 0.0 <= b["score"] <= 1.0
        n_boxes += len(boxes)
        overlay = Image.open(out / "overlays" / name)
        assert overlay.size == (width, height) and overlay.mode == "RGB"
        pixels = np.asarray(overlay)
        assert np.all(pixels == (0, 255, 0), axis=-1).any()  # every T2 demo image has gold boxes
        assert np.all(pixels == (255, 0, 0), axis=-1).any() == bool(boxes)
    assert n_boxes > 0, "a random network's reconstruction should leave residuals above 0.5"

    # the evaluate config in-process (its command line has its own test in test_nova.py)
    metrics_file = tmp_path / "metrics.json"
    evaluate = ConfigWorkflow(config_file=str(CONFIGS / "evaluate.yaml"), meta_file=str(CONFIGS / "metadata.json"),
                              logging_file=False, workflow_type=None, bundle_root=str(REPO / "bundles" / BUNDLE),
                              predictions_file=str(out / "predictions.json"),
                              metadata_file=str(nova / "metadata.csv"), output_file=str(metrics_file))
    evaluate.initialize()
    evaluate.run()
    metrics = json.loads(metrics_file.read_text())
    ref = metrics["reference"]
    assert metrics["n_images"] == len(rows) and ref["GT@30"] == n_gold
    for key in ("mAP@30", "mAP@50", "mAP@50:95", "ACC@50"):
        assert 0.0 <= ref[key] <= 1.0
    assert ref["TP@30"] + ref["FP@30"] == n_boxes


# ------------------------------------------------------------------------------ config and errors
def test_paper_config_properties_and_network_ids(demo_root):
    wf = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in PAPER], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=False, workflow_type="infer", bundle_root=str(REPO / "bundles" / BUNDLE),
                        dataset_dir=str(demo_root), ckpt_path="model.pt")
    wf.initialize()
    assert wf.check_properties() == []
    p = wf.parser
    assert p["channels"] == [128, 256, 256] and p["num_res_blocks"] == 3 and p["cond_dim"] == 128
    assert p["encoder_depth"] == 50 and p["pixel_unshuffle"] == 1 and p["conditioning"] is True
    assert p["noise_type"] == "simplex" and p["num_train_timesteps"] == 1000
    assert p["recon_timesteps"] == [250, 500, 750]
    assert p.get_parsed_content("encoder_ckpt") is None  # the encoder's weights come with ckpt_path
    assert p["threshold"] == 0.5 and p["top_k"] == 5 and p["caption_filter"] == "T2"
    assert p["save_overlays"] is False
    with open(demo_root / "NOVA" / "metadata.csv", newline="") as f:
        assert len(wf.dataset) == sum("T2" in r["caption"] for r in csv.DictReader(f))


def test_checkpoint_loader_of_the_config(tmp_path):
    # cond_ddpm's model.pt (a plain state_dict) and its training checkpoints (the network under "model") load;
    # a missing file or another architecture fails when the run starts
    engine = SimpleNamespace(state=SimpleNamespace(max_epochs=None, epoch=0))

    def load(wf):
        wf.initialize()
        next(h for h in wf.parser.get_parsed_content("handlers") if isinstance(h, CheckpointLoader))(engine)

    ckpt = save_checkpoint(tmp_path / "tiny.pt", 0.25)  # output bias 0.25: untrained networks have 0
    training = tmp_path / "training.pt"
    torch.save({"model": torch.load(ckpt, weights_only=True), "epoch": 3}, training)
    for path in (ckpt, training):
        wf = workflow(ckpt_path=str(path))
        load(wf)
        assert torch.all(wf.parser.get_parsed_content("network").unet.out[-1].conv.bias == 0.25)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load(workflow(ckpt_path=str(tmp_path / "nowhere.pt")))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load(workflow(ckpt_path=ckpt, channels=[16, 32, 64]))


def test_missing_image_and_bad_threshold(hand_made_root):
    (hand_made_root / "NOVA" / "images" / "blank.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) .*missing.*blank\.png"):
        nova_items(hand_made_root / "NOVA" / "metadata.csv", hand_made_root / "NOVA" / "images")
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        NovaBoxWriter("p.json", threshold="calibrated")
    assert NovaBoxWriter("p.json", threshold="0.25").threshold == 0.25  # as a command line may pass it


@pytest.mark.parametrize("flag, written", [(True, True), ("true", True), ("False", False), ("false", False),
                                           (False, False)])
def test_save_overlays_flag_from_config_or_command_line(flag, written):
    writer = NovaBoxWriter("p.json", overlay_dir="out/overlays", save_overlays=flag)
    assert (writer.overlay_dir is not None) == written
