"""Command line: ``python -m custom_components <command> [--flags]`` (run with ``--help`` for the list)."""

from __future__ import annotations

import sys

import fire


def demo_data(out: str, seed: int = 0, **sizes) -> str:
    """Write a synthetic data root in the real IXI/BraTS21/MSLUB/NOVA layout to ``out``."""
    from custom_components.demo_data import make_demo_data

    return str(make_demo_data(out, seed=seed, **sizes))


def check_data(data_root: str, mode: str = "t2") -> None:
    """Validate a data root (splits, files, shapes, masks); exit code 1 when anything is wrong."""
    from custom_components.check_data import check_data as run_check

    sys.exit(run_check(data_root, mode=mode))


def preview(data_root: str, split: str = "Brats21_test", out: str = "preview.png", n: int = 12,
            mode: str = "t2") -> str:
    """Save a PNG grid of one slice per volume of ``split`` with the lesion outlined."""
    from custom_components.preview import preview as run_preview

    return run_preview(data_root, split=split, out=out, n=n, mode=mode)


def demo(workdir: str, force: bool = False, seed: int = 0, size: str = "default", verbose: bool = False,
         tracking_uri: str | None = None) -> None:
    """Run the whole pipeline on demo data in ``workdir`` (skips finished stages); writes summary.json, report.md."""
    from custom_components.demo import DemoError, run_demo

    try:
        run_demo(workdir, force=force, seed=seed, size=size, verbose=verbose, tracking_uri=tracking_uri)
    except DemoError as err:
        print(f"demo: {err}", file=sys.stderr)
        sys.exit(1)


def export_bundle(bundle: str, out: str, models: str | None = None, force: bool = False) -> None:
    """Write bundle ``bundle`` as a self-contained MONAI bundle folder ``out`` (configs, scripts, models, docs)."""
    from custom_components.export import ExportError
    from custom_components.export import export_bundle as run_export

    try:
        print(run_export(bundle, out, models=models, force=force).summary())
    except ExportError as err:
        print(f"export_bundle: {err}", file=sys.stderr)
        sys.exit(1)


COMMANDS = {"demo_data": demo_data, "check_data": check_data, "preview": preview, "demo": demo,
            "export_bundle": export_bundle}


def main() -> None:
    fire.Fire(COMMANDS)


if __name__ == "__main__":
    main()
