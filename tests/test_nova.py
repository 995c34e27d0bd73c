"""NOVA reading, boxes from residual maps, the reference metrics and the nova_eval evaluate bundle."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from custom_components.nova_data import load_nova_image, parse_bbox, read_nova_metadata
from custom_components.nova_inference import boxes_from_residual
from custom_components.nova_metrics import evaluate_nova

REPO = Path(__file__).resolve().parents[1]
EPS = 1e-6  # the reference's precision denominator offset: a perfect image scores 1 / (1 + 1e-6)


def box(x0, y0, x1, y1, score=1.0):
    return {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "score": score}


def rec(name, *yxyx):
    """A metadata record whose gold boxes are given directly as (y, x, y + h, x + w)."""
    return {"filename": name, "caption": "T2", "case_id": name, "boxes": np.array(yxyx, dtype=float).reshape(-1, 4)}


# GT (y, x, y+h, x+w) = (0, 0, 9, 9): 10 x 10 = 100 pixels under the inclusive IoU
SQUARE = (0, 0, 9, 9)


# ------------------------------------------------------------------------------------------ metrics
def test_perfect_prediction_every_metric_one():
    records = [rec("a", (20, 10, 60, 40)), rec("b", (0, 0, 9, 9), (50, 50, 70, 80))]
    preds = {"a": [box(10, 20, 40, 60)], "b": [box(50, 50, 80, 70), box(0, 0, 9, 9)]}
    out = evaluate_nova(preds, records)
    ref = out["reference"]
    for key in ("mAP@30", "mAP@50", "mAP@50:95"):
        assert ref[key] == pytest.approx(1.0, abs=1e-5)
    assert ref["ACC@50"] == 1.0
    assert (ref["TP@30"], ref["FP@30"], ref["GT@30"]) == (3, 0, 3)
    assert out["score_ranked"] == pytest.approx({"AP@30": 1.0, "AP@50": 1.0, "AP@50:95": 1.0})
    assert out["n_images"] == 2


def test_precision_denominator_has_reference_offset():
    out = evaluate_nova({"a": [box(0, 0, 9, 9)]}, [rec("a", SQUARE)])
    assert out["reference"]["mAP@50"] == pytest.approx(1.0 / (1.0 + EPS), abs=1e-12)


def test_miss_and_image_without_prediction():
    records = [rec("hit", SQUARE), rec("miss", SQUARE), rec("none", SQUARE)]
    preds = {"hit": [box(0, 0, 9, 9)], "miss": [box(100, 100, 120, 120)]}
    ref = evaluate_nova(preds, records)["reference"]
    # APs per image: ~1, 0, 0 (no prediction still counts)
    assert ref["mAP@30"] == pytest.approx(1.0 / 3.0, abs=1e-6)
    assert ref["ACC@50"] == pytest.approx(1.0 / 3.0)
    assert (ref["TP@30"], ref["FP@30"], ref["GT@30"]) == (1, 1, 3)


def test_duplicate_box_on_one_gt_is_fp():
    out = evaluate_nova({"a": [box(0, 0, 9, 9), box(0, 0, 9, 9)]}, [rec("a", SQUARE)])
    ref = out["reference"]
    assert (ref["TP@30"], ref["FP@30"]) == (1, 1)
    # the FP comes after the only TP, so the per-image AP (precision at the TP) stays 1
    assert ref["mAP@30"] == pytest.approx(1.0, abs=1e-5)
    assert ref["ACC@50"] == 1.0


@pytest.mark.parametrize(
    "x_max, tp30, tp50",
    [
        # pred x in [0, x_max], y in [0, 9] -> inclusive area (x_max + 1) * 10, all inside the GT
        (4.0, 1, 1),  # 50 / 100 = 0.50: at the 0.5 boundary -> TP
        (4.1, 1, 1),  # 0.51
        (3.9, 1, 0),  # 0.49: below 0.5, above 0.3
        (2.0, 1, 0),  # 30 / 100 = 0.30: at the 0.3 boundary -> TP at 0.3
        (2.1, 1, 0),  # 0.31
        (1.9, 0, 0),  # 0.29
    ],
)
def test_inclusive_iou_boundaries(x_max, tp30, tp50):
    out = evaluate_nova({"a": [box(0, 0, x_max, 9)]}, [rec("a", SQUARE)])
    ref = out["reference"]
    assert ref["TP@30"] == tp30 and ref["FP@30"] == 1 - tp30
    assert ref["ACC@50"] == tp50
    assert ref["mAP@50"] == pytest.approx(tp50, abs=1e-5)


def test_inclusive_iou_differs_from_standard_iou():
    # x in [0, 4], y in [0, 9]: inclusive IoU 50/100 = 0.5 (TP@50); standard IoU (4*9)/(9*9) = 0.444 (FP@50)
    out = evaluate_nova({"a": [box(0, 0, 4, 9)]}, [rec("a", SQUARE)])
    assert out["reference"]["ACC@50"] == 1.0
    assert out["score_ranked"]["AP@50"] == 0.0
    assert out["score_ranked"]["AP@30"] == pytest.approx(1.0)
    # mAP@50:95: TP only at 0.50, FP at 0.55 ... 0.95 -> (1 + 9 * 0) / 10
    assert out["reference"]["mAP@50:95"] == pytest.approx(0.1, abs=1e-6)


def test_top5_truncation_by_area():
    # five large FPs (areas 400 .. 144, given in scrambled order) and the exact match, the smallest box
    fps = [box(100, 100, 100 + s, 100 + s) for s in (14, 20, 12, 18, 16)]
    preds = {"a": fps[:2] + [box(0, 0, 9, 9)] + fps[2:]}
    ref5 = evaluate_nova(preds, [rec("a", SQUARE)], top_k=5)["reference"]
    assert ref5["mAP@30"] == 0.0 and (ref5["TP@30"], ref5["FP@30"]) == (0, 5)
    # kept: the TP is ranked 6th by area whatever its place in the list -> AP = 1 / (6 + 1e-6)
    ref6 = evaluate_nova(preds, [rec("a", SQUARE)], top_k=6)["reference"]
    assert ref6["mAP@30"] == pytest.approx(1.0 / 6.0, abs=1e-6)
    assert (ref6["TP@30"], ref6["FP@30"]) == (1, 5)


def test_sort_by_area_not_by_given_order():
    # given [TP (small), FP (large)]; the reference reorders by area -> [FP, TP] -> AP = 1/2
    preds = {"a": [box(0, 0, 9, 9), box(50, 50, 80, 80)]}
    assert evaluate_nova(preds, [rec("a", SQUARE)])["reference"]["mAP@30"] == pytest.approx(0.5, abs=1e-6)


def test_equal_areas_keep_given_order():
    # both boxes have area 81: a stable sort keeps the given order
    fp, tp = box(50, 50, 59, 59), box(0, 0, 9, 9)
    assert evaluate_nova({"a": [fp, tp]}, [rec("a", SQUARE)])["reference"]["mAP@30"] == pytest.approx(0.5, abs=1e-6)
    assert evaluate_nova({"a": [tp, fp]}, [rec("a", SQUARE)])["reference"]["mAP@30"] == pytest.approx(1.0, abs=1e-5)


def test_multi_box_image_worked_by_hand():
    # GT A = (0,0,9,9), B = (20,20,29,29), C = (40,40,49,49): 10 x 10 inclusive each.
    # Predictions (x_min, y_min, x_max, y_max), sorting area (x_max-x_min)*(y_max-y_min):
    #   P1 (0,0,11,11)     area 121, inclusive 12x12=144 -> IoU with A 100/144 = 0.694 -> TP at 0.3, 0.5
    #   P2 (60,60,70,70)   area 100, touches no GT                                     -> FP
    #   P3 (20,20,29,29)   area  81, equals B (IoU 1)                                   -> TP
    #   P4 (40,40,48,48)   area  64, inclusive 9x9=81 inside C -> IoU 81/100 = 0.81     -> TP
    # Order by area: P1 P2 P3 P4 = TP FP TP TP; cumulative precision at the TPs: 1/1, 2/3, 3/4
    # AP@30 = AP@50 = (1 + 2/3 + 3/4) / 3 = 29/36 = 0.80556
    # At IoU 0.75: P1 (0.694) becomes an FP -> FP FP TP TP -> (1/3 + 2/4) / 2 = 5/12
    preds = {"a": [box(40, 40, 48, 48), box(20, 20, 29, 29), box(0, 0, 11, 11), box(60, 60, 70, 70)]}
    records = [rec("a", (0, 0, 9, 9), (20, 20, 29, 29), (40, 40, 49, 49))]
    out = evaluate_nova(preds, records)
    ref = out["reference"]
    assert ref["mAP@30"] == pytest.approx(29 / 36, abs=1e-5)
    assert ref["mAP@50"] == pytest.approx(29 / 36, abs=1e-5)
    # per threshold 0.50 .. 0.95: 29/36 for 0.50-0.65 (P1 0.694 passes), 5/12 for 0.70-0.80
    # (P4 0.81 passes), 1/3 for 0.85-0.95 (only P3, at rank 3) -> mean of the ten
    expected_5095 = (4 * 29 / 36 + 3 * 5 / 12 + 3 * 1 / 3) / 10
    assert ref["mAP@50:95"] == pytest.approx(expected_5095, abs=1e-5)
    assert ref["ACC@50"] == 1.0
    assert (ref["TP@30"], ref["FP@30"], ref["GT@30"]) == (3, 1, 3)
    assert out["per_image"]["a"]["AP@50"] == pytest.approx(29 / 36, abs=1e-5)


def test_greedy_match_first_index_on_ties_and_taken_gt_gives_fp():
    # GT A = (0,0,9,9) and B = (0,10,9,19). Big box x in [0,19], y in [0,9] (area 171) comes first and
    # has inclusive IoU 100/200 = 0.5 with both -> first index A -> TP. The exact A box (area 81) then
    # has best GT A, already matched -> FP (the reference never falls back to B).
    records = [rec("a", (0, 0, 9, 9), (0, 10, 9, 19))]
    preds = {"a": [box(0, 0, 9, 9), box(0, 0, 19, 9)]}
    ref = evaluate_nova(preds, records)["reference"]
    assert (ref["TP@30"], ref["FP@30"], ref["GT@30"]) == (1, 1, 2)
    assert ref["ACC@50"] == 0.5
    assert ref["mAP@50"] == pytest.approx(1.0, abs=1e-5)


def test_score_ranked_ap_by_hand():
    # img1: perfect box (score .9). img2: a miss (score .95, larger) then a perfect box (score .5).
    # Global score order: FP, TP, TP; n_gt = 2 -> precision 0, 1/2, 2/3 at recall 0, .5, 1.
    # Interpolated precision is 2/3 at every recall point -> AP = 2/3.
    # Reference: img1 AP 1, img2 [FP, TP] by area -> 1/2 -> mAP 0.75.
    records = [rec("i1", SQUARE), rec("i2", SQUARE)]
    preds = {"i1": [box(0, 0, 9, 9, 0.9)], "i2": [box(50, 50, 70, 70, 0.95), box(0, 0, 9, 9, 0.5)]}
    out = evaluate_nova(preds, records)
    assert out["score_ranked"]["AP@50"] == pytest.approx(2 / 3)
    assert out["score_ranked"]["AP@50:95"] == pytest.approx(2 / 3)
    assert out["reference"]["mAP@50"] == pytest.approx(0.75, abs=1e-5)


def test_score_ranked_partial_recall_101_points():
    # one TP (score 1) of two GT boxes: precision 1 up to recall 0.5 -> points 0.00 .. 0.50 = 51 of 101
    records = [rec("a", SQUARE, (50, 50, 59, 59))]
    out = evaluate_nova({"a": [box(0, 0, 9, 9)]}, records)
    assert out["score_ranked"]["AP@50"] == pytest.approx(51 / 101)


def test_prediction_validation_errors():
    records = [rec("a.png", SQUARE)]
    with pytest.raises(ValueError, match=r"not in the NOVA metadata.*ghost\.png"):
        evaluate_nova({"ghost.png": []}, records)
    with pytest.raises(ValueError, match=r"a\.png: box 1 .*x_max > x_min"):
        evaluate_nova({"a.png": [box(0, 0, 9, 9), box(5, 0, 5, 9)]}, records)
    with pytest.raises(ValueError, match=r"a\.png: box 0 .*y_max > y_min"):
        evaluate_nova({"a.png": [box(0, 9, 9, 2)]}, records)
    with pytest.raises(ValueError, match=r"a\.png: box 0 lacks key\(s\) \['score'\]"):
        evaluate_nova({"a.png": [{"x_min": 0, "y_min": 0, "x_max": 3, "y_max": 3}]}, records)
    with pytest.raises(ValueError, match="caption filter"):
        evaluate_nova({}, [])


def test_predictions_for_filtered_out_images_are_ignored():
    records = [rec("t2.png", SQUARE)]
    preds = {"t2.png": [box(0, 0, 9, 9)], "flair.png": [box(0, 0, 9, 9)]}
    out = evaluate_nova(preds, records, known_filenames=["t2.png", "flair.png"])
    assert out["n_images"] == 1 and out["reference"]["FP@30"] == 0


# ------------------------------------------------------------------------------------------ reading
def test_parse_bbox_real_format_several_float_boxes():
    text = "{'x': [120.5, 30.0, 7], 'y': [88.0, 12.25, 0.5], 'width': [40.2, 10.0, 3], 'height': [35.9, 5.5, 1.5]}"
    boxes = parse_bbox(text, "img.png")
    expected = [[88.0, 120.5, 123.9, 160.7], [12.25, 30.0, 17.75, 40.0], [0.5, 7.0, 2.0, 10.0]]
    np.testing.assert_allclose(boxes, expected)
    assert boxes.shape == (3, 4) and boxes.dtype == np.float64
    assert parse_bbox("", "img.png").shape == (0, 4)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{'x': [1], 'y': [2]", "not a Python literal"),
        ("__import__('os').system('echo hi')", "not a Python literal"),
        ("[1, 2, 3, 4]", "must be a dict"),
        ("{'x': [1], 'y': [2], 'width': [3]}", r"lacks key\(s\) \['height'\]"),
        ("{'x': [1, 2], 'y': [2], 'width': [3], 'height': [4]}", "differ in length"),
        ("{'x': ['a'], 'y': [2], 'width': [3], 'height': [4]}", "non-number"),
        ("{'x': [1], 'y': [2], 'width': [-3], 'height': [4]}", "negative"),
    ],
)
def test_parse_bbox_malformed_names_file_and_problem(text, problem):
    with pytest.raises(ValueError, match=rf"case_17\.png: .*{problem}"):
        parse_bbox(text, "case_17.png")


def _write_metadata(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "caption", "case_id", "bbox_gold", "bbox_raters"])
        w.writerows(rows)


def test_read_nova_metadata_caption_filter_and_malformed_row(tmp_path):
    csv_path = tmp_path / "metadata.csv"
    gold = "{'x': [10.5], 'y': [20], 'width': [30], 'height': [40]}"
    _write_metadata(csv_path, [
        ["a.png", "Axial T2-weighted image, shows a lesion", "c1", gold, "[]"],
        ["b.png", "Axial FLAIR image", "c1", gold, "[]"],
        ["c.png", "Coronal T2, two lesions", "c2",
         "{'x': [1, 50], 'y': [2, 60], 'width': [3, 4], 'height': [5, 6]}", "[]"],
    ])
    recs = read_nova_metadata(csv_path)
    assert [r["filename"] for r in recs] == ["a.png", "c.png"]
    assert recs[0]["case_id"] == "c1" and "T2" in recs[0]["caption"]
    np.testing.assert_allclose(recs[0]["boxes"], [[20, 10.5, 60, 40.5]])
    assert recs[1]["boxes"].shape == (2, 4)
    assert len(read_nova_metadata(csv_path, caption_filter=None)) == 3
    assert len(read_nova_metadata(csv_path, caption_filter="")) == 3
    assert [r["filename"] for r in read_nova_metadata(csv_path, caption_filter="FLAIR")] == ["b.png"]

    _write_metadata(csv_path, [["good.png", "T2", "c1", gold, ""], ["bad.png", "T2", "c2", "{'x': [1]", ""]])
    with pytest.raises(ValueError, match=r"metadata\.csv: bad\.png: bbox_gold"):
        read_nova_metadata(csv_path)


def test_load_nova_image_8bit_16bit_rgb(tmp_path):
    gray8 = np.array([[0, 51], [255, 102]], dtype=np.uint8)
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    img = load_nova_image(tmp_path / "g8.png")
    assert img.dtype == np.float32 and img.shape == (2, 2)
    np.testing.assert_allclose(img, [[0, 0.2], [1, 0.4]], atol=1e-6)

    gray16 = np.array([[0, 65535], [13107, 32768]], dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(load_nova_image(tmp_path / "g16.png"), [[0, 1], [0.2, 32768 / 65535]], atol=1e-6)

    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = 255  # white
    rgb[1, 2] = (255, 0, 0)  # pure red -> luma 0.299
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img = load_nova_image(tmp_path / "rgb.png")
    assert img.shape == (2, 3)
    np.testing.assert_allclose([img[0, 0], img[1, 2], img[0, 1]], [1.0, 0.299, 0.0], atol=1e-6)

    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_nova_image(tmp_path / "missing.png")


# ------------------------------------------------------------------------------ boxes from residual
def test_boxes_from_residual_hand_made():
    r = np.zeros((60, 60))
    r[5:11, 10:18] = 0.9  # rows 5..10, cols 10..17: 6 x 8; the 5x5 median only rounds its corners
    r[30:50, 30:42] = 0.8  # rows 30..49, cols 30..41: 20 x 12, the largest
    r[55, 5] = 1.0  # an isolated spike: removed by the median filter
    r[20:24, 50:54] = 0.5  # exactly the threshold: not > 0.5
    boxes = boxes_from_residual(r)
    assert len(boxes) == 2
    big, small = boxes
    assert (big["x_min"], big["y_min"], big["x_max"], big["y_max"]) == (30, 30, 42, 50)
    assert (small["x_min"], small["y_min"], small["x_max"], small["y_max"]) == (10, 5, 18, 11)
    assert big["score"] == pytest.approx(0.8) and small["score"] == pytest.approx(0.9)
    assert boxes_from_residual(r, top_k=1) == [big]
    assert boxes_from_residual(np.zeros((20, 20))) == []


def test_boxes_from_residual_four_connected():
    r = np.zeros((10, 10))
    r[2:4, 2:4] = 1.0
    r[4:6, 4:6] = 1.0  # touches the first square only at a corner: a separate 4-connected component
    boxes = boxes_from_residual(r, median_size=None)
    assert sorted((b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in boxes) == [(2, 2, 4, 4), (4, 4, 6, 6)]


# ------------------------------------------------------------------------------- bundle end-to-end
def test_evaluate_bundle_end_to_end(tmp_path):
    meta = tmp_path / "metadata.csv"
    _write_metadata(meta, [
        ["a.png", "Axial T2", "c1", "{'x': [10], 'y': [20], 'width': [30], 'height': [40]}", ""],
        ["b.png", "Axial T2 FLAIR", "c2", "{'x': [0, 50], 'y': [0, 50], 'width': [9, 9], 'height': [9, 9]}", ""],
        ["c.png", "Sagittal T1", "c3", "{'x': [0], 'y': [0], 'width': [5], 'height': [5]}", ""],
    ])
    preds = tmp_path / "predictions.json"
    # a.png: exact match; b.png: one of its two boxes found, plus a larger FP ranked first by area;
    # c.png (T1, filtered out): ignored. Reference: AP a = 1, AP b = 1/2 (FP then TP) -> mAP 0.75;
    # ACC@50 = 2 TP / 3 GT; TP 2, FP 1, GT 3.
    preds.write_text(json.dumps({
        "a.png": [box(10, 20, 40, 60, 0.9)],
        "b.png": [box(0, 0, 9, 9, 0.8), box(100, 100, 130, 130, 0.3)],
        "c.png": [box(0, 0, 5, 5, 0.5)],
    }))
    out_file = tmp_path / "out" / "metrics.json"
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", "bundles/nova_eval/configs/evaluate.yaml", "--bundle_root", "bundles/nova_eval",
           "--predictions_file", str(preds), "--metadata_file", str(meta), "--output_file", str(out_file)]
    tracking = ["--tracking", "mlflow", "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd + tracking, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(out_file.read_text())
    assert set(out) >= {"reference", "score_ranked", "n_images"}
    assert set(out["reference"]) == {"mAP@30", "mAP@50", "mAP@50:95", "ACC@50", "TP@30", "FP@30", "GT@30"}
    assert out["n_images"] == 2
    ref = out["reference"]
    assert ref["mAP@30"] == pytest.approx(0.75, abs=1e-5)
    assert ref["mAP@50:95"] == pytest.approx(0.75, abs=1e-5)
    assert ref["ACC@50"] == pytest.approx(2 / 3)
    assert (ref["TP@30"], ref["FP@30"], ref["GT@30"]) == (2, 1, 3)
    # score order: TP .9, TP .8, FP .3 -> precision 1 up to recall 2/3 -> 67 of 101 recall points
    assert out["score_ranked"]["AP@50"] == pytest.approx(67 / 101)
    assert not list(out_file.parent.glob("*.tmp"))

    # --tracking mlflow: the metrics (MLflow-safe names), the settings and the metrics file in one run
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.metrics["mAP_30"] == pytest.approx(0.75, abs=1e-5) and run.data.metrics["FP_30"] == 1
    assert run.data.metrics["score_ranked/AP_50"] == pytest.approx(67 / 101)
    assert run.data.params["caption_filter"] == "T2" and run.data.params["top_k"] == "5"
    assert "metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # an unknown filename is reported by name; no output is written
    preds.write_text(json.dumps({"zzz.png": []}))
    bad_out = tmp_path / "bad.json"
    proc = subprocess.run(cmd[:-1] + [str(bad_out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "zzz.png" in proc.stdout + proc.stderr
    assert not bad_out.exists()
