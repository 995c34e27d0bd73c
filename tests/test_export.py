"""Exported bundles: model-zoo layout, rewritten references, and runs without the repository on sys.path."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from custom_components.export import ExportError, config_strings, export_bundle
from custom_components.networks.diffusion_unet import ConditionalDDPM
from tests.conftest import REPO

TINY = {"channels": [8, 16, 16], "num_res_blocks": 1, "encoder_depth": 18, "pixel_unshuffle": 2}
PYTHON = sys.executable


def outside_env() -> dict:
    """The environment of a user who has MONAI but not this repository: no PYTHONPATH at all."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run_outside(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    assert not Path(cwd).resolve().is_relative_to(REPO)
    result = subprocess.run(command, cwd=cwd, env=outside_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A plain state_dict of the small ConditionalDDPM (what cond_ddpm's CheckpointSaver writes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "trained.pt"
    torch.save(ConditionalDDPM(**TINY).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def cond_bundle(tmp_path_factory, tiny_ckpt) -> Path:
    out = tmp_path_factory.mktemp("export") / "cond_ddpm"
    export_bundle("cond_ddpm", out, models=tiny_ckpt)
    return out


def test_cond_ddpm_export_layout_and_references(cond_bundle, tiny_ckpt):
    source = REPO / "bundles" / "cond_ddpm"
    assert sorted(p.name for p in cond_bundle.iterdir()) == ["LICENSE", "configs", "docs", "models", "scripts"]
    assert (cond_bundle / "LICENSE").read_bytes() == (source / "LICENSE").read_bytes()
    # every config of the source folder, metadata unchanged; the checkpoint under the name MONAI's tools expect
    assert {p.name for p in (cond_bundle / "configs").iterdir()} >= {p.name for p in (source / "configs").iterdir()}
    assert json.loads((cond_bundle / "configs/metadata.json").read_text()) == \
        json.loads((source / "configs/metadata.json").read_text())
    assert [p.name for p in (cond_bundle / "models").iterdir()] == ["model.pt"]
    assert (cond_bundle / "models/model.pt").read_bytes() == tiny_ckpt.read_bytes()
    assert (cond_bundle / "docs/README.md").is_file() and (cond_bundle / "docs/EXPORT.md").is_file()

    # the network's modules are there, the repository's tooling is not
    scripts = cond_bundle / "scripts"
    for needed in ["__init__.py", "networks/__init__.py", "networks/diffusion_unet.py", "networks/backbone.py",
                   "noise.py", "inferers.py", "data.py", "transforms.py"]:
        assert (scripts / needed).is_file(), needed
    for unneeded in ["__main__.py", "demo.py", "demo_data.py", "export.py", "check_data.py"]:
        assert not (scripts / unneeded).exists(), unneeded
    # every project import inside scripts/ names a module that was copied, none names the repository package
    for path in scripts.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert not name.startswith("custom_components"), f"{path}: {name}"
                if name.startswith("scripts"):
                    rel = Path(*name.split(".")[1:])
                    assert (scripts / rel).with_suffix(".py").is_file() or (scripts / rel / "__init__.py").is_file()

    # configs: same content with custom_components -> scripts, initialize steps moved to the front of run
    for name in ["train.yaml", "multi_gpu_train.yaml"]:
        original = yaml.safe_load((source / "configs" / name).read_text())
        exported = yaml.safe_load((cond_bundle / "configs" / name).read_text())
        assert not [s for s in config_strings(exported) if "custom_components" in s]
        renamed = yaml.safe_load((source / "configs" / name).read_text().replace("custom_components", "scripts"))
        assert exported["deferred_initialize"] == renamed.pop("initialize") == \
            [s.replace("custom_components", "scripts") for s in original["initialize"]]
        assert exported.pop("run") == ["$@deferred_initialize", *renamed.pop("run")]
        exported.pop("deferred_initialize")
        assert exported == renamed
    common = yaml.safe_load((cond_bundle / "configs/common.yaml").read_text())
    assert common["network_def"]["_target_"] == "scripts.networks.diffusion_unet.ConditionalDDPM"
    assert "$import scripts.networks.diffusion_unet" in common["imports"]


def test_export_without_models_and_clear_errors(tmp_path, tiny_ckpt):
    result = export_bundle("nova_eval", tmp_path / "nova")
    assert list((tmp_path / "nova/models").iterdir()) == []
    assert "models:  NONE" in result.summary() and "EMPTY" in (tmp_path / "nova/docs/EXPORT.md").read_text()
    # without a model the checkpoint stays a required id; inference.yaml holds common.yaml's ids (the network)
    inference = yaml.safe_load((tmp_path / "nova/configs/inference.yaml").read_text())
    assert inference["ckpt_path"] is None and inference["network_def"]["_target_"].startswith("scripts.")
    assert (tmp_path / "nova/configs/common.yaml").is_file() and not (tmp_path / "nova/configs/common.yaml").is_symlink()

    with pytest.raises(ExportError, match=r"no bundle 'nope'.*cond_ddpm"):
        export_bundle("nope", tmp_path / "x")
    with pytest.raises(ExportError, match="overlaps the source bundle"):
        export_bundle("nova_eval", REPO / "bundles" / "nova_eval", force=True)
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_bundle("nova_eval", tmp_path / "nova")
    with pytest.raises(ExportError, match="missing.pt: no such file"):
        export_bundle("nova_eval", tmp_path / "y", models=tmp_path / "missing.pt")
    with pytest.raises(ExportError, match="no model.*pt"):
        export_bundle("nova_eval", tmp_path / "y", models=tmp_path / "nova" / "docs")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nova"]  # no staging folder left behind

    # an earlier export is replaced on request, here by one that has the model (command line)
    cli = subprocess.run([PYTHON, "-m", "custom_components", "export_bundle", "--bundle", "nova_eval",
                          "--out", str(tmp_path / "nova"), "--models", str(tiny_ckpt), "--force"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "models:  model.pt" in cli.stdout
    assert (tmp_path / "nova/models/model.pt").read_bytes() == tiny_ckpt.read_bytes()


def test_exported_nova_eval_runs_from_any_directory(tmp_path, tiny_ckpt):
    bundle = tmp_path / "shared" / "nova_eval"
    export_bundle("nova_eval", bundle, models=tiny_ckpt)
    data, cwd = tmp_path / "data", tmp_path / "elsewhere"
    (data / "NOVA/images").mkdir(parents=True)
    cwd.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a.png": (40, 56), "b.png": (48, 48), "c.png": (32, 32)}  # (H, W); a.png needs padding
    for name, size in sizes.items():
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(data / "NOVA/images" / name)
    # c.png has no T2 caption: the default caption filter leaves it out (the gold boxes are not used here)
    (data / "NOVA/metadata.csv").write_text(
        "filename,caption,case_id,bbox_gold,bbox_raters\n"
        "a.png,Axial T2 image,1,\"{'x': [10], 'y': [20], 'width': [9], 'height': [9]}\",\n"
        "b.png,T2 weighted,2,\"{'x': [30], 'y': [30], 'width': [9], 'height': [9]}\",\n"
        "c.png,FLAIR,3,\"{'x': [0], 'y': [0], 'width': [9], 'height': [9]}\",\n")

    # inference.yaml has initialize steps and loads the copied checkpoint through the bundle's own models/.
    # Threshold -1: every residual is above it, so each image gives one box, the whole image.
    tiny = [arg for k, v in TINY.items() for arg in (f"--{k}", json.dumps(v))]
    run_outside([PYTHON, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/inference.yaml"),
                 "--bundle_root", str(bundle), "--dataset_dir", str(data), "--output_dir", str(data / "out"),
                 "--threshold=-1", *tiny], cwd)
    predictions = json.loads((data / "out/predictions.json").read_text())
    assert sorted(predictions) == ["a.png", "b.png"]
    for name in predictions:
        (h, w), [box] = sizes[name], predictions[name]
        assert (box["x_min"], box["y_min"], box["x_max"], box["y_max"]) == (0, 0, w, h)


def test_exported_cond_ddpm_network_checks_without_repository(cond_bundle, tiny_ckpt):
    # the forward needs timesteps and context, which only MONAI's Python API can pass to verify_net_in_out
    # (the command line gives the network one tensor); run from the bundle folder as model-zoo bundles are
    code = f"""
import importlib.util, torch
from monai.bundle import ConfigParser, verify_net_in_out
assert importlib.util.find_spec("custom_components") is None, "the repository is importable"
ids = {TINY!r}
verify_net_in_out(net_id="network_def", config_file="configs/inference.yaml", meta_file="configs/metadata.json",
                  device="cpu", extra_forward_args={{"timesteps": torch.tensor([500]),
                                                     "context": torch.rand(1, 1, 96, 96)}}, **ids)
parser = ConfigParser()
parser.read_config("configs/inference.yaml")
for k, v in ids.items():
    parser[k] = v
net = parser.get_parsed_content("network_def")
assert type(net).__module__ == "scripts.networks.diffusion_unet", type(net).__module__
net.load_state_dict(torch.load("models/model.pt", weights_only=True), strict=True)
print("CHECKSUM", sum(float(p.double().sum()) for p in net.state_dict().values()))
"""
    out = run_outside([PYTHON, "-c", code], cond_bundle)
    assert "data shape of network is verified with no error" in out.stdout + out.stderr
    # the exported config builds the network the checkpoint was saved from: strict load, same values
    expected = sum(float(v.double().sum()) for v in torch.load(tiny_ckpt, weights_only=True).values())
    checksum = float(out.stdout.split("CHECKSUM")[1].split()[0])
    assert checksum == pytest.approx(expected, rel=1e-12)


ZOO_SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"  # the schema every metadata.json names
ZOO_SHAPE_EXEMPT = {"cond_ddpm", "nova_eval"}  # forward(x, timesteps, context): exempt like the zoo's diffusion bundles


def test_exports_pass_model_zoo_checks(tmp_path, tiny_ckpt):
    """The checks of the model zoo's ci/verify_bundle.py (mode full), offline, on each export outside the repository:
    files, version in changelog, metadata against the published schema, and for the encoder the network's data
    shapes and TorchScript export (the inference properties are checked in each bundle's own tests)."""
    pytest.importorskip("jsonschema", reason="monai.bundle.verify_metadata needs jsonschema")
    from custom_components.networks.backbone import resnet_backbone

    encoder_ckpt = tmp_path / "encoder.pt"
    torch.save(resnet_backbone(50).state_dict(), encoder_ckpt)  # the size metadata.json declares (2048 features)
    zoo = tmp_path / "models"
    for bundle in ["contrastive_encoder", "cond_ddpm", "nova_eval"]:
        export_bundle(bundle, zoo / bundle, models=encoder_ckpt if bundle == "contrastive_encoder" else tiny_ckpt)
    code = f"""
import json, os, sys, torch
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
for bundle in {sorted(p.name for p in zoo.iterdir())!r}:
    root = os.path.abspath(bundle)
    sys.path.insert(0, root)
    sys.modules.pop("scripts", None)
    for f in ["configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.yaml"]:
        assert os.path.exists(os.path.join(root, f)), (bundle, f)
    meta, config = os.path.join(root, "configs/metadata.json"), os.path.join(root, "configs/inference.yaml")
    metadata = json.load(open(meta))
    assert metadata["version"] in metadata["changelog"], bundle
    verify_metadata(meta_file=meta, filepath={str(ZOO_SCHEMA)!r})
    if bundle not in {sorted(ZOO_SHAPE_EXEMPT)!r}:
        verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=root)
        ts = os.path.join(root, "models/verify_model.ts")
        ckpt_export(net_id="network_def", filepath=ts, ckpt_file=os.path.join(root, "models/model.pt"),
                    meta_file=meta, config_file=config, bundle_root=root)
        torch.jit.load(ts)
    sys.path.remove(root)
    print("ZOO OK", bundle)
"""
    out = run_outside([PYTHON, "-c", code], zoo, timeout=600)
    assert out.stdout.count("ZOO OK") == 3, out.stdout
    assert "data shape of network is verified with no error" in out.stdout + out.stderr


def test_metadata_is_valid_against_the_zoo_schema():
    """Each bundle's own metadata.json against the kept schema (the export copies it unchanged)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(ZOO_SCHEMA.read_text())
    for meta in sorted(REPO.glob("bundles/*/configs/metadata.json")):
        jsonschema.validate(json.loads(meta.read_text()), schema)


def test_export_sets_ids_for_apps_that_read_the_config_as_it_is(tmp_path):
    """MONAI Label reads inference.yaml as it is: ids (a numeric threshold, the demo network) are set at export."""
    demo = {"channels": [16, 32, 64], "num_res_blocks": 1}
    result = export_bundle("cond_ddpm", tmp_path / "b", set_values={**demo, "threshold": 0.25})
    inference = yaml.safe_load((tmp_path / "b/configs/inference.yaml").read_text())
    common = yaml.safe_load((tmp_path / "b/configs/common.yaml").read_text())
    assert {k: inference[k] for k in [*demo, "threshold"]} == {**demo, "threshold": 0.25}
    assert {k: common[k] for k in demo} == demo and "threshold" not in common  # only where the config defines the id
    assert "# MONAI Label adds" in (tmp_path / "b/configs/inference.yaml").read_text()  # comments kept
    assert any("ids set at export" in note for note in result.notes)
    with pytest.raises(ExportError, match="defines the id"):
        export_bundle("cond_ddpm", tmp_path / "c", set_values={"no_such_id": 1})
    with pytest.raises(ExportError, match="not a one-line top-level id"):
        export_bundle("cond_ddpm", tmp_path / "c", set_values={"network_def": 1})
    assert not (tmp_path / "c").exists()
