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
         tracking_uri: str | None = None, seeds=None) -> None:
    """Run the whole pipeline on demo data in ``workdir`` (skips finished stages); writes summary.json, report.md.
    ``--seeds 0,1,2``: one demo per seed in ``workdir/seed<N>`` and a report of mean ± std over them."""
    from custom_components.demo import DemoError, run_demo, run_seeds

    try:
        if seeds is not None:
            items = seeds if isinstance(seeds, (list, tuple)) else str(seeds).strip("()[]").split(",")
            seeds = [int(s) for s in items if str(s).strip()]
            run_seeds(workdir, seeds, force=force, size=size, verbose=verbose)
        else:
            run_demo(workdir, force=force, seed=seed, size=size, verbose=verbose, tracking_uri=tracking_uri)
    except DemoError as err:
        print(f"demo: {err}", file=sys.stderr)
        sys.exit(1)


def summarize_folds(runs, out: str) -> str:
    """Write ``out/table.json`` and ``out/table.md``: the paper's table from each fold's score output (mean, std of
    the fold means, each fold's value, the published values beside)."""
    from custom_components.folds import summarize_folds as run_summary

    if isinstance(runs, str):  # "[R0,R1]" of unquoted paths arrives as one string
        runs = [r.strip().strip("'\"") for r in runs.strip().strip("[]").split(",") if r.strip()]
    out_dir = run_summary(list(runs), out)
    print((out_dir / "table.md").read_text())
    return str(out_dir)


def reproduce(data_root: str, workdir: str, folds=None, nova_fold: int | None = None, protocol: str = "reference",
              size: str = "paper", seed: int = 0, force: bool = False, verbose: bool = False,
              tracking_uri: str | None = None) -> None:
    """Per fold encoder -> cond_ddpm -> maps -> scores, then NOVA with one fold's model, then the fold table."""
    from custom_components.demo import DemoError
    from custom_components.reproduce import reproduce as run_reproduce

    try:
        run_reproduce(data_root, workdir, folds=folds, nova_fold=nova_fold, protocol=protocol, size=size, seed=seed,
                      force=force, verbose=verbose, tracking_uri=tracking_uri)
    except DemoError as err:
        print(f"reproduce: {err}", file=sys.stderr)
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
            "reproduce": reproduce, "summarize_folds": summarize_folds, "export_bundle": export_bundle}


def main() -> None:
    fire.Fire(COMMANDS)


if __name__ == "__main__":
    main()
