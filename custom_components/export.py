"""Export a bundle of this repository as a self-contained MONAI bundle folder (model-zoo layout).

``export_bundle("cond_ddpm", OUT, models=...)`` writes

    OUT/configs/   the bundle's configs, references to ``custom_components.x`` rewritten to ``scripts.x``
    OUT/scripts/   the modules of ``custom_components`` those configs need (their import closure)
    OUT/models/    model.pt / model.ts copied from ``models`` (empty when none is given)
    OUT/docs/      the bundle's docs + EXPORT.md (how it was exported, how to run it)
    OUT/LICENSE

so that ``python -m monai.bundle run --config_file OUT/configs/X.yaml --bundle_root OUT`` works from any
working directory without this repository. The package becomes ``scripts`` (the model-zoo name; MONAI Label
reloads a bundle's ``scripts`` module by that name). MONAI puts the bundle folder on ``sys.path`` only when
``run`` starts, after ``initialize`` has already evaluated every ``$import`` of the config, so the exported
configs keep their ``initialize`` steps under ``deferred_initialize`` and run them as the first ``run`` step.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PACKAGE = "custom_components"
SCRIPTS = "scripts"
PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLES_DIR = PACKAGE_DIR.parent / "bundles"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
DEFERRED_INIT = "deferred_initialize"
MODEL_FILE = re.compile(r"^model.*\.(pt|ts)$")

# `custom_components.x` (dotted use) and `import custom_components` / `from custom_components import`;
# a bare mention in prose (`python -m custom_components demo`) is left alone.
_REFERENCE = re.compile(rf"\b{PACKAGE}(?=\.[A-Za-z_])|(?<=import ){PACKAGE}\b|(?<=from ){PACKAGE}\b")
_DOTTED = re.compile(rf"\b{PACKAGE}(?:\.[A-Za-z_]\w*)*")
# the ids the other configs of a bundle merge; apps (MONAI Label) and the model zoo's checks read inference.yaml
# alone, so the export writes those ids into it
COMMON = "common.yaml"
STANDALONE = ("inference.yaml",)
_TOP_LEVEL_KEY = re.compile(r"([^\s#\-][^:]*):")

# How MONAI's export tools apply to each bundle's network (checked with MONAI 1.6.1 / torch 2.13), for docs/EXPORT.md.
_ENCODER_CHECKS = """`network_def` (the ResNet backbone) takes one image and can be scripted, so MONAI's command-line tools
work as they are. From this folder:

    python -m monai.bundle verify_net_in_out --net_id network_def --config_file configs/inference.yaml \\
        --meta_file configs/metadata.json
    python -m monai.bundle ckpt_export --net_id network_def --filepath models/model.ts \\
        --ckpt_file models/model.pt --meta_file configs/metadata.json --config_file configs/inference.yaml

`network_data_format` declares ResNet-50's 2048 output channels; for the demo network (ResNet-10) add
`--depth 10 --_meta_#network_data_format#outputs#pred#num_channels 512` to both.
"""
_DENOISER_CHECKS = """`network_def` (ConditionalDDPM) cannot be scripted (MONAI's DiffusionModelUNet attention block and the
FiLM residual block reshape with a starred size list), and its forward takes `(x, timesteps, context)`
while `verify_net_in_out` and `ckpt_export --use_trace` call the network with one tensor: on the command
line both stop at the missing `timesteps` (the model zoo's own diffusion bundles are left out of its shape
check for the same reason). From Python both checks work (a trace follows other batch and
image sizes exactly). From this folder (add `configs/demo.yaml` to the config lists for the demo network):

    python - <<'EOF'
    import torch
    from monai.bundle import ConfigParser, verify_net_in_out
    from monai.data import save_net_with_metadata
    configs = ["configs/inference.yaml"]
    t, x = torch.tensor([500]), torch.rand(1, 1, 96, 96)
    verify_net_in_out(net_id="network_def", config_file=configs, meta_file="configs/metadata.json",
                      any=96, extra_forward_args={"timesteps": t, "context": x})
    parser = ConfigParser()
    parser.read_config(configs)
    parser.read_meta("configs/metadata.json")
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load("models/model.pt", weights_only=True))
    with torch.no_grad():
        save_net_with_metadata(torch.jit.trace(net, (x, t, x)), "models/model", meta_values=parser.get("_meta_"))
    EOF

The traced `models/model.ts` takes `(x, timesteps, context)` like the network.
"""
CHECKS = {"contrastive_encoder": _ENCODER_CHECKS, "cond_ddpm": _DENOISER_CHECKS, "nova_eval": _DENOISER_CHECKS}
APPS = {"cond_ddpm": """
## MONAI Label
Put this folder in the `model/` folder of MONAI Label's `monaibundle` sample app and start it with
`--conf models <folder name> --conf sam2 false`. `POST /infer/<folder name>?image=ID` returns the anomaly
segmentation on the volume's grid (0 background, 1 anomaly); its JSON gives the threshold and the paths of the
anomaly map and segmentation written under `eval/inference/`. MONAI Label takes `configs/inference.yaml` as it
is: `threshold` must be a number or `eval/metrics.json` must be here (the evaluate config writes it).
"""}


class ExportError(Exception):
    """The bundle cannot be exported as asked (unknown bundle, missing files, output folder in the way)."""


@dataclass
class ExportResult:
    """What ``export_bundle`` wrote."""

    bundle: str
    out: Path
    configs: list[str]
    modules: list[str]
    models: list[str]
    models_source: str | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"Exported bundle {self.bundle} to {self.out}",
                 f"  configs: {', '.join(self.configs)}",
                 f"  scripts: {', '.join(self.modules)}"]
        if self.models:
            lines.append(f"  models:  {', '.join(self.models)} (from {self.models_source})")
        else:
            lines.append("  models:  NONE - no --models given, models/ is empty; copy a trained model.pt there "
                         "or pass --ckpt_path when running")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  run:   python -m monai.bundle run --config_file {self.out}/configs/<config>.yaml "
                     f"--bundle_root {self.out} [--id value ...]")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ module closure
def _module_file(name: str, package_dir: Path) -> Path | None:
    """File of the dotted module ``name`` (``custom_components.a.b``), or None when it is not a module."""
    parts = name.split(".")[1:]
    base = package_dir.joinpath(*parts)
    if parts and base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _longest_module(dotted: str, package_dir: Path) -> str | None:
    """The longest prefix of ``dotted`` that names a module of the package (``a.b.func`` -> ``a.b``)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if _module_file(name, package_dir) is not None:
            return name
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """Dotted names a module imports (absolute, relative resolved, function-level included)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise ExportError(f"{path}: cannot be parsed ({e})") from e
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def config_strings(obj) -> list[str]:
    """Every string (keys and values) of a parsed config."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in config_strings(k) + config_strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in config_strings(v)]
    return []


def needed_modules(configs: list, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Modules of the package that parsed ``configs`` reference, closed under imports, parents included."""
    pending = set()
    for config in configs:
        for text in config_strings(config):
            for dotted in _DOTTED.findall(text):
                module = _longest_module(dotted, package_dir)
                if module is None:
                    raise ExportError(f"configs reference {dotted}, which is not a module of {package_dir}")
                pending.add(module)
    found: set[str] = set()
    while pending:
        module = pending.pop()
        if module in found:
            continue
        found.add(module)
        parts = module.split(".")
        pending.update(".".join(parts[:n]) for n in range(1, len(parts)))  # parent packages
        for name in _imported_names(_module_file(module, package_dir), module):
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                resolved = _longest_module(name, package_dir)
                if resolved is not None:
                    pending.add(resolved)
    return sorted(found)


# ------------------------------------------------------------------------------------ config rewriting
def rewrite_references(text: str) -> str:
    """``custom_components.x`` -> ``scripts.x`` and ``import/from custom_components`` -> ``scripts``."""
    return _REFERENCE.sub(SCRIPTS, text)


def _load_config(text: str, path: Path):
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ExportError(f"{path}: not a valid config ({e})") from e


def _rewrite_paths(text: str, bundle: str) -> str:
    """Repository paths of this bundle (in docs and config comments) as seen from the exported folder."""
    text = re.sub(rf"\bbundles/{bundle}/", "", text)
    return re.sub(rf"\bbundles/{bundle}\b", ".", text)


def defer_initialize(text: str, path: Path) -> str:
    """Move the config's ``initialize`` steps to ``deferred_initialize``, run as the first ``run`` step.

    YAML is edited as text (comments kept) and the result is checked by parsing it again.
    """
    data = _load_config(text, path)
    if not isinstance(data, dict) or "initialize" not in data:
        return text
    if DEFERRED_INIT in data:
        raise ExportError(f"{path}: already has an id {DEFERRED_INIT!r}")
    run = data.get("run")
    if run is not None and not isinstance(run, list):
        raise ExportError(f"{path}: `run` must be a list to take the initialize steps, got {type(run).__name__}")
    expected = dict(data)
    expected[DEFERRED_INIT] = expected.pop("initialize")
    if run is not None:
        expected["run"] = [f"$@{DEFERRED_INIT}", *run]
    if path.suffix == ".json":
        return json.dumps(expected, indent=4) + "\n"

    lines = text.splitlines(keepends=True)
    init = [i for i, line in enumerate(lines) if re.match(r"initialize\s*:", line)]
    run_at = [i for i, line in enumerate(lines) if re.match(r"run\s*:", line)]
    if len(init) != 1 or len(run_at) > 1:
        raise ExportError(f"{path}: expected one top-level `initialize:` and at most one `run:` line")
    if run_at:
        r = run_at[0]
        rest = lines[r].split(":", 1)[1].strip()
        if rest.startswith("["):  # flow sequence
            lines[r] = lines[r].replace("[", f'["$@{DEFERRED_INIT}", ', 1)
        elif not rest or rest.startswith("#"):  # block sequence: copy the first item's indentation
            items = [line for line in lines[r + 1:] if line.strip() and not line.lstrip().startswith("#")]
            indent = re.match(r"(\s*)-", items[0]).group(1) if items and re.match(r"\s*-", items[0]) else "  "
            lines.insert(r + 1, f'{indent}- "$@{DEFERRED_INIT}"  # the initialize steps, see {DEFERRED_INIT}\n')
        else:
            raise ExportError(f"{path}: cannot add a step to `run: {rest}`")
    i = init[0]
    lines[i] = re.sub(r"^initialize", DEFERRED_INIT, lines[i])
    lines.insert(i, "# initialize steps, run as the first run step: MONAI puts the bundle folder (and so the\n"
                    "# `scripts` package) on sys.path when `run` starts, after `initialize` has evaluated the imports\n")
    new_text = "".join(lines)
    if _load_config(new_text, path) != expected:
        raise ExportError(f"{path}: moving `initialize` into `run` changed the config unexpectedly")
    return new_text


def inline_common(common: str, text: str, path: Path) -> str:
    """``text`` of a YAML config preceded by the ids of ``common.yaml`` it does not set itself: the file then holds
    what the two merged give (an id of ``text`` wins), for readers of that one file. Checked by parsing again."""
    own = _load_config(text, path)
    kept, skip = [], False
    for line in common.splitlines(keepends=True):
        key = _TOP_LEVEL_KEY.match(line)
        if key:
            skip = key.group(1) in own
        if not skip:
            kept.append(line)
    new = "".join(kept).rstrip("\n") + f"\n\n# ---- {path.name}: the ids of this config (over those of {COMMON} above)\n" + text
    if _load_config(new, path) != {**_load_config(common, path), **own}:
        raise ExportError(f"{path}: writing the ids of {COMMON} into it changed the config unexpectedly")
    return new


def export_config(text: str, path: Path, bundle: str) -> str:
    """The exported form of one config file's text."""
    new = _rewrite_paths(rewrite_references(text), bundle)
    if path.suffix in CONFIG_SUFFIXES:
        new = defer_initialize(new, path)
        left = [s for s in config_strings(_load_config(new, path)) if _REFERENCE.search(s)]
        if left:
            raise ExportError(f"{path}: references to {PACKAGE} left after rewriting: {left[:3]}")
    return new


def set_ids(text: str, path: Path, values: dict) -> str:
    """Set the top-level ids ``values`` that the config defines (one-line values; YAML comments kept elsewhere).

    Apps that read a bundle's config as it is (MONAI Label reads ``inference.yaml``) take no ``--id value``;
    this writes such values into the exported file. The result is checked by parsing it again.
    """
    data = _load_config(text, path)
    values = {k: v for k, v in values.items() if isinstance(data, dict) and k in data}
    if not values:
        return text
    expected = {**data, **values}
    if path.suffix == ".json":
        return json.dumps(expected, indent=4) + "\n"
    lines = text.splitlines(keepends=True)
    for key, value in values.items():
        at = [i for i, line in enumerate(lines) if re.match(rf"{re.escape(key)}\s*:", line)]
        following = lines[at[0] + 1] if at and at[0] + 1 < len(lines) else ""
        if len(at) != 1 or following.startswith((" ", "-")):
            raise ExportError(f"{path}: `{key}` is not a one-line top-level id; cannot set it at export")
        lines[at[0]] = f"{key}: {json.dumps(value)}  # set at export\n"
    new_text = "".join(lines)
    if _load_config(new_text, path) != expected:
        raise ExportError(f"{path}: setting {sorted(values)} changed the config unexpectedly")
    return new_text


# ------------------------------------------------------------------------------------ export
def _models(models: str | os.PathLike | None) -> list[Path]:
    """Model files to copy: a file itself, or the model*.pt / model*.ts files of a folder."""
    if models is None:
        return []
    path = Path(models)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and MODEL_FILE.match(p.name))
        if not files:
            raise ExportError(f"--models {path}: no model*.pt or model*.ts file in this folder "
                              "(training checkpoints checkpoint_*.pt are not exported)")
        return files
    raise ExportError(f"--models {path}: no such file or folder")


def _export_doc(bundle: str, result: ExportResult) -> str:
    model_line = (f"`models/`: {', '.join(result.models)}, copied from `{result.models_source}`."
                  if result.models else
                  "`models/` is EMPTY: no model was given at export. Put the trained network's `model.pt` there "
                  "(or pass `--ckpt_path` when running).")
    notes = "".join(f"- {n}\n" for n in result.notes)
    return f"""# Exported bundle

Self-contained copy of the `{bundle}` bundle: it needs MONAI and the packages of `configs/metadata.json`,
not the repository it came from.

- `scripts/`: the project modules the configs use, which refer to them as `scripts.<module>` (in the
  repository: `custom_components.<module>`):
{textwrap.fill(', '.join(result.modules), width=100, initial_indent='  ', subsequent_indent='  ')}
- Each config's `initialize` steps are kept under `{DEFERRED_INIT}` and run as the first `run` step:
  `python -m monai.bundle run` puts this folder on `sys.path` only when `run` starts.
- {model_line}
{notes}
## Running
From any directory:

    python -m monai.bundle run --config_file DIR/configs/<config>.yaml --bundle_root DIR [--id value ...]

Tools that do not put the bundle on `sys.path` (`verify_net_in_out`, `ckpt_export`, `ConfigWorkflow` or
`ConfigParser` in your own code) need `scripts` importable: run them from this folder, or set
`PYTHONPATH=DIR`.

## Checking the network, TorchScript
{CHECKS.get(bundle, "Not checked for this bundle.")}{APPS.get(bundle, "")}"""


def _place(staging: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()):
            if not force:
                raise ExportError(f"--out {out} exists and is not empty; choose another folder or pass --force")
            if not (out / "configs").is_dir():
                raise ExportError(f"--out {out} is not an exported bundle (no configs/); not replacing it")
            shutil.rmtree(out)
        else:
            out.rmdir()
    os.replace(staging, out)


def export_bundle(bundle: str, out: str | os.PathLike, models: str | os.PathLike | None = None,
                  force: bool = False, bundles_dir: str | os.PathLike | None = None,
                  set_values: dict | None = None) -> ExportResult:
    """Write bundle ``bundle`` of ``bundles_dir`` (default: the repository's) as a self-contained folder ``out``.

    ``models``: a checkpoint file (copied as models/model.pt, or model.ts for a .ts file) or a folder whose
    model*.pt / model*.ts files are copied; None leaves models/ empty. ``force``: replace an earlier export.
    ``set_values``: top-level ids written into every exported config that defines them (``set_ids``), e.g. a
    numeric ``threshold`` or the demo network's ids for MONAI Label.
    """
    source = Path(bundles_dir) / bundle if bundles_dir else BUNDLES_DIR / bundle
    if not (source / "configs" / "metadata.json").is_file():
        known = sorted(p.name for p in source.parent.iterdir() if (p / "configs").is_dir()) \
            if source.parent.is_dir() else []
        raise ExportError(f"no bundle {bundle!r} at {source} (no configs/metadata.json); bundles: {known}")
    if not (source / "LICENSE").is_file():
        raise ExportError(f"{source}: no LICENSE file")
    model_files = _models(models)
    set_values = dict(set_values or {})
    out = Path(out).resolve()
    if out.is_relative_to(source.resolve()) or source.resolve().is_relative_to(out):
        raise ExportError(f"--out {out} overlaps the source bundle {source}; choose a folder outside it")
    out.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        configs, parsed, notes = [], [], []
        (staging / "configs").mkdir()
        common = source / "configs" / COMMON
        for path in sorted(p for p in (source / "configs").iterdir() if p.is_file()):
            text = path.read_text(encoding="utf-8")
            if path.name in STANDALONE and common.is_file():
                text = inline_common(common.read_text(encoding="utf-8"), text, path)
                notes.append(f"{path.name}: holds the ids of {COMMON} as well, for apps that read it alone")
            if path.suffix in CONFIG_SUFFIXES:
                config = _load_config(text, path)
                parsed.append(config)
                text = export_config(text, path, bundle)
                if model_files and isinstance(config, dict) and "ckpt_path" in config and config["ckpt_path"] is None:
                    text = set_ids(text, path, {"ckpt_path": "$@bundle_root + '/models/model.pt'"})
                    notes.append(f"{path.name}: ckpt_path is this bundle's models/model.pt")
                text = set_ids(text, path, set_values)
            (staging / "configs" / path.name).write_text(text, encoding="utf-8")
            configs.append(path.name)

        unknown = sorted(set(set_values) - {k for c in parsed if isinstance(c, dict) for k in c})
        if unknown:
            raise ExportError(f"no config of {bundle} defines the id(s) {unknown} to set")
        if set_values:
            notes.append(f"ids set at export: {json.dumps(set_values)}")
        modules = needed_modules(parsed)
        for module in modules:
            src = _module_file(module, PACKAGE_DIR)
            dst = staging / SCRIPTS / src.relative_to(PACKAGE_DIR)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(rewrite_references(src.read_text(encoding="utf-8")), encoding="utf-8")

        (staging / "models").mkdir()
        copied = []
        single_file = models is not None and Path(models).is_file()
        for src in model_files:
            name = ("model.ts" if src.suffix == ".ts" else "model.pt") if single_file else src.name
            shutil.copy2(src, staging / "models" / name)
            copied.append(name)

        result = ExportResult(bundle=bundle, out=out, configs=configs,
                              modules=[m.replace(PACKAGE, SCRIPTS, 1) for m in modules], models=copied,
                              models_source=str(Path(models).resolve()) if models is not None else None,
                              notes=notes)
        if (source / "docs").is_dir():
            shutil.copytree(source / "docs", staging / "docs")
            for doc in (staging / "docs").rglob("*.md"):
                doc.write_text(_rewrite_paths(rewrite_references(doc.read_text(encoding="utf-8")), bundle),
                               encoding="utf-8")
        (staging / "docs").mkdir(exist_ok=True)
        (staging / "docs" / "EXPORT.md").write_text(_export_doc(bundle, result), encoding="utf-8")
        shutil.copy2(source / "LICENSE", staging / "LICENSE")
        os.chmod(staging, 0o755)  # mkdtemp made it private
        _place(staging, out, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result
