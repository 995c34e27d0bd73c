"""Serve the exported cond_ddpm bundle with MONAI Label's `monaibundle` sample app and check one /infer answer.

    python scripts/monailabel_check.py [--workdir DIR] [--venv DIR] [--port 8765]

1. MONAI Label goes into its own virtual environment (``--venv``, reused once complete), beside the
   system's packages, which stay as they are (the CPU torch included).
2. Demo T2 volumes (``python -m custom_components demo_data``) form the studies folder.
3. ``export_bundle("cond_ddpm")`` with the demo-size network (random weights) and a numeric threshold goes into
   the app's ``model/cond_ddpm``; nothing is downloaded at run time.
4. ``monailabel start_server`` runs on 127.0.0.1; ``POST /infer/cond_ddpm`` on one volume must return a 0/1 label
   on the volume's grid that matches the bundle's own segmentation, with the anomaly map written beside it.

Prints a JSON report (also written to WORKDIR/report.json) with the times of each step; exits 1 on failure.
"""

from __future__ import annotations

import argparse
import email
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MONAILABEL = "monailabel==0.8.5"
# MONAI Label 0.8.5 beside MONAI 1.6: pydicom-seg breaks on pydicom 3, and these follow pydicom 2
PINS = ["pydicom<3", "dicomweb-client<0.60", "pynetdicom<3"]
# MONAI Label imports torchvision; PyPI's torchvision builds need the CUDA torch of their release, not a CPU build
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# sam2 (a MONAI Label requirement) builds from source against a second torch; the app runs with `--conf sam2 false`
SKIPPED = ("sam2",)
DEMO_IDS = ("channels", "num_res_blocks", "encoder_depth", "pixel_unshuffle")
THRESHOLD = 0.1


def run(command: list, **kwargs) -> None:
    subprocess.run([str(c) for c in command], check=True, **kwargs)


def install(venv: Path) -> None:
    """MONAI Label, its requirements (less sam2) and the torch/torchvision pair it needs, in ``venv`` only."""
    python, done = venv / "bin" / "python", venv / "monailabel-check-installed"
    if done.exists():
        return
    run([sys.executable, "-m", "venv", "--system-site-packages", venv])
    run([python, "-m", "pip", "install", "-q", "--no-deps", MONAILABEL])
    requires = subprocess.run(
        [python, "-c", "from importlib.metadata import requires; print('\\n'.join(requires('monailabel')))"],
        check=True, capture_output=True, text=True).stdout.split("\n")
    requires = [r for r in requires if r and not r.startswith(SKIPPED)]
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join([f"monai=={version('monai')}", *PINS, *TORCH]) + "\n")
    run([python, "-m", "pip", "install", "-q", *requires, *TORCH, "-c", constraints])
    done.touch()


def prepare(workdir: Path, venv: Path) -> tuple[Path, Path, Path]:
    """Demo studies and the app with the exported bundle; returns (app, studies, the volume to infer)."""
    import torch
    import yaml

    sys.path.insert(0, str(REPO))
    from custom_components.export import export_bundle
    from custom_components.networks.diffusion_unet import ConditionalDDPM

    data = workdir / "data"
    if not data.is_dir():
        run([sys.executable, "-m", "custom_components", "demo_data", "--out", data, "--n_ixi", 6, "--n_brats", 2,
             "--n_mslub", 2, "--n_nova", 1], cwd=REPO)
    studies = workdir / "studies"
    shutil.rmtree(studies, ignore_errors=True)
    studies.mkdir()
    for volume in sorted((data / "Test" / "Brats21" / "t2").glob("*.nii.gz")):
        shutil.copy(volume, studies / volume.name)

    app = workdir / "app"
    shutil.rmtree(app, ignore_errors=True)
    shutil.copytree(venv / "monailabel" / "sample-apps" / "monaibundle", app)
    demo = yaml.safe_load((REPO / "bundles" / "cond_ddpm" / "configs" / "demo.yaml").read_text())
    ids = {k: demo[k] for k in DEMO_IDS}
    torch.manual_seed(0)
    checkpoint = workdir / "model.pt"
    torch.save(ConditionalDDPM(**ids).state_dict(), checkpoint)
    export_bundle("cond_ddpm", app / "model" / "cond_ddpm", models=checkpoint,
                  set_values={**ids, "threshold": THRESHOLD})
    return app, studies, sorted(studies.glob("*.nii.gz"))[0]


def get(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 600):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def serve(app: Path, studies: Path, venv: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    command = [venv / "bin" / "monailabel", "start_server", "--app", app, "--studies", studies, "--host", "127.0.0.1",
               "--port", port, "--conf", "models", "cond_ddpm", "--conf", "zoo_source", "ngc", "--conf", "sam2", "false"]
    server = subprocess.Popen([str(c) for c in command], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    for _ in range(300):
        if server.poll() is not None:
            raise RuntimeError(f"monailabel start_server exited ({server.returncode}); see {log}")
        try:
            get(f"http://127.0.0.1:{port}/info/", timeout=5)
            return server
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"monailabel start_server did not answer within 300 s; see {log}")


def infer(port: int, image_id: str) -> tuple[int, dict, bytes, str]:
    """POST /infer/cond_ddpm?output=all: (status, result JSON, label file bytes, label file name)."""
    boundary = "monailabelcheck"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n"
            f"{json.dumps({'device': 'cpu'})}\r\n--{boundary}--\r\n").encode()
    status, content_type, payload = get(f"http://127.0.0.1:{port}/infer/cond_ddpm?image={image_id}&output=all",
                                        data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + payload)
    parts = {part.get_param("name", header="content-disposition"): part for part in message.get_payload()}
    image = parts["image"]
    return status, json.loads(parts["params"].get_payload(decode=True)), image.get_payload(decode=True), \
        image.get_filename()


def check_label(label_file: Path, volume: Path, params: dict) -> dict:
    """The label is 0/1 on the volume's grid and is the bundle's segmentation at its threshold."""
    import nibabel as nib
    import numpy as np

    label, source = nib.load(str(label_file)), nib.load(str(volume))
    values = np.asanyarray(label.dataobj)
    result = params  # the bundle's `result` (threshold, where the maps are) beside MONAI Label's own keys
    seg = np.asanyarray(nib.load(result["segmentation"]).dataobj) > 0
    anomaly = np.asanyarray(nib.load(result["anomaly_map"]).dataobj)
    brain = np.asanyarray(source.dataobj) > 0
    above = anomaly > result["threshold"]
    facts = {
        "label_file": label_file.name, "label_shape": list(label.shape), "input_shape": list(source.shape),
        "label_spacing": [float(z) for z in label.header.get_zooms()[:3]],
        "input_spacing": [float(z) for z in source.header.get_zooms()[:3]],
        "same_affine": bool(np.allclose(label.affine, source.affine, atol=1e-4)),
        "label_values": sorted(float(v) for v in np.unique(values)), "label_voxels": int((values > 0).sum()),
        "labels": params.get("label_names"), "threshold": result["threshold"],
        "anomaly_map": result["anomaly_map"],
        "matches_bundle_segmentation_in_brain": bool(np.array_equal((values > 0) & brain, seg)),
        "label_voxels_with_map_above_threshold": float(above[values > 0].mean()) if (values > 0).any() else None,
    }
    problems = [name for name, ok in [
        ("shape", facts["label_shape"] == facts["input_shape"]), ("affine", facts["same_affine"]),
        ("spacing", facts["label_spacing"] == facts["input_spacing"]),
        ("values", set(facts["label_values"]) <= {0.0, 1.0}), ("some anomaly", facts["label_voxels"] > 0),
        ("labels", params.get("label_names") == {"anomaly": 1}), ("threshold", result["threshold"] == THRESHOLD),
        ("bundle segmentation", facts["matches_bundle_segmentation_in_brain"]),
        ("map above threshold", (facts["label_voxels_with_map_above_threshold"] or 0) > 0.9),
    ] if not ok]
    facts["problems"] = problems
    return facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/monailabel_check"))
    parser.add_argument("--venv", type=Path, default=None, help="MONAI Label's virtual environment (default WORKDIR/venv)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    venv = (args.venv or workdir / "venv").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    report, times = {"system_torch": version("torch")}, {}

    start = time.time()
    install(venv)
    times["install"] = time.time() - start
    report["venv"] = subprocess.run([venv / "bin" / "python", "-c", "import monai, monailabel, torch, torchvision; "
                                     "print(monailabel.__version__, monai.__version__, torch.__version__, "
                                     "torchvision.__version__)"], check=True, capture_output=True, text=True).stdout.split()
    assert version("torch") == report["system_torch"], "the system torch changed"

    start = time.time()
    app, studies, volume = prepare(workdir, venv)
    times["data_and_export"] = time.time() - start

    start = time.time()
    server = serve(app, studies, venv, args.port, workdir / "server.log")
    times["server_start"] = time.time() - start
    try:
        info = json.loads(get(f"http://127.0.0.1:{args.port}/info/")[2])["models"]["cond_ddpm"]
        report["info"] = {k: info.get(k) for k in ("type", "labels", "dimension", "version")}
        start = time.time()
        status, params, label, name = infer(args.port, volume.name[: -len(".nii.gz")])
        times["infer"] = time.time() - start
        label_file = workdir / (name or "label.nii.gz")
        label_file.write_bytes(label)
        report.update(status=status, latencies=params.get("latencies"), check=check_label(label_file, volume, params))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    report["times_s"] = {k: round(v, 1) for k, v in times.items()}
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if status == 200 and not report["check"]["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
