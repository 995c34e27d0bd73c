"""Does the conditional DDPM use its condition? Healthy slices are reconstructed as in evaluation (one-step x0
prediction from simplex noise at each t), once with their own condition and once with another subject's
(the same slice index of the next volume), with the same noise. If swapping the subject barely changes the
reconstruction compared with its error, the U-Net reconstructs from the noised image alone and the encoder
adds nothing; if the error grows with the wrong subject, the condition carries that subject's anatomy.

Reads the images and brain masks that cond_ddpm's ``evaluate.yaml`` saved (``<maps_dir>/<split>/``), so it
sees exactly what the evaluation saw. Printed per t and for the ensemble (mean of the t's), in [0, 1]
intensity units, mean over brain voxels:

* ``error own``: |reconstruction - image| with the slice's own condition;
* ``error swapped``: the same with another subject's condition;
* ``change``: |own - swapped| reconstruction, and ``change / error own``.

    python benchmarks/condition_use.py --maps_dir W/eval/maps --ckpt W/cond_ddpm/model.pt [--split IXI_test]
        [--configs common.yaml,demo.yaml] [--slices_per_volume 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_components.demo import bundle_config  # noqa: E402
from custom_components.inferers import ReconstructionInferer, ddpm_scheduler  # noqa: E402
from custom_components.networks.diffusion_unet import ConditionalDDPM  # noqa: E402
from custom_components.utils import from_diffusion_range, to_diffusion_range  # noqa: E402

NETWORK_IDS = ("channels", "num_res_blocks", "cond_dim", "encoder_depth", "pixel_unshuffle")


def config_values(configs: list[str], keys: tuple[str, ...]) -> dict:
    """cond_ddpm's ``keys`` as ``monai.bundle run`` resolves them from ``configs`` (later files override)."""
    config = bundle_config("cond_ddpm", configs)
    return {k: config.get_parsed_content(k) for k in keys}


def network_ids(configs: list[str]) -> dict:
    """cond_ddpm's network ids from its configs."""
    return config_values(configs, NETWORK_IDS)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments naming a trained cond_ddpm and the healthy slices it reconstructs."""
    parser.add_argument("--maps_dir", required=True, type=Path, help="cond_ddpm evaluate.yaml's output folder")
    parser.add_argument("--ckpt", required=True, type=Path, help="cond_ddpm's models/model.pt")
    parser.add_argument("--split", default="IXI_test", help="a healthy split saved in the maps")
    parser.add_argument("--configs", default="common.yaml,demo.yaml", help="cond_ddpm configs naming the network")


def load_network(ckpt: Path, ids: dict) -> ConditionalDDPM:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) and "model" in state else state
    network = ConditionalDDPM(**ids, conditioning=any(k.startswith("encoder.") for k in state))
    network.load_state_dict(state)
    return network.eval()


def brain_slices(maps_dir: Path, split: str, per_volume: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, S, 1, H, W) images in [0, 1] and brain masks: the ``per_volume`` slices of most brain that every
    volume of ``split`` shares (so slice s of volume v and of volume v + 1 lie at the same height)."""
    names = sorted(p.name[: -len("_image.nii.gz")] for p in (maps_dir / split).glob("*_image.nii.gz"))
    if len(names) < 2:
        raise SystemExit(f"{maps_dir / split} holds {len(names)} saved image(s); two volumes are needed.")
    images = np.stack([np.asarray(nib.load(maps_dir / split / f"{n}_image.nii.gz").dataobj) for n in names])
    masks = np.stack([np.asarray(nib.load(maps_dir / split / f"{n}_mask.nii.gz").dataobj) for n in names]) > 0
    common = masks.sum(axis=(1, 2)).min(axis=0)  # brain voxels per axial slice in the volume that has least
    chosen = np.sort(np.argsort(common)[::-1][:per_volume])
    to_slices = lambda a: torch.from_numpy(np.moveaxis(a[..., chosen], -1, 1)[:, :, None].astype(np.float32))
    return to_slices(images), to_slices(masks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--slices_per_volume", type=int, default=16)
    parser.add_argument("--timesteps", default=None, help="comma-separated t's (default: the configs' recon_timesteps)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (the same noise for both conditions)")
    args = parser.parse_args(argv)

    configs = args.configs.split(",")
    network = load_network(args.ckpt, network_ids(configs))
    if network.encoder is None:
        raise SystemExit(f"{args.ckpt} is an unconditioned DDPM: it has no condition to swap.")
    images, masks = brain_slices(args.maps_dir, args.split, args.slices_per_volume)
    timesteps = ([int(t) for t in args.timesteps.split(",")] if args.timesteps
                 else list(config_values(configs, ("recon_timesteps",))["recon_timesteps"]))
    scheduler = ddpm_scheduler()
    sums = {key: np.zeros(len(timesteps) + 1) for key in ("own", "swapped", "change")}
    brain_voxels = 0.0
    with torch.no_grad():
        for v in range(len(images)):
            x, other, mask = to_diffusion_range(images[v]), to_diffusion_range(images[(v + 1) % len(images)]), masks[v]
            recon = {}
            for name, context in (("own", x), ("swapped", other)):
                inferer = ReconstructionInferer(scheduler, timesteps, return_members=True,
                                                generator=torch.Generator().manual_seed(args.seed + v))
                mean, members = inferer(x, network, cond=network.encode(context))
                recon[name] = [from_diffusion_range(m) for m in (*members, mean)]
            for i in range(len(timesteps) + 1):
                for name in ("own", "swapped"):
                    sums[name][i] += float(((recon[name][i] - images[v]).abs() * mask).sum())
                sums["change"][i] += float(((recon["own"][i] - recon["swapped"][i]).abs() * mask).sum())
            brain_voxels += float(mask.sum())
    print(f"{args.ckpt}: {len(images)} volumes of {args.split}, {images.shape[1]} slices each; "
          "mean over brain voxels, [0, 1] units")
    print(f"{'t':>10} {'error own':>10} {'error swapped':>14} {'change':>8} {'change/error':>13}")
    for i, label in enumerate([*map(str, timesteps), "ensemble"]):
        own, swapped, change = (sums[k][i] / brain_voxels for k in ("own", "swapped", "change"))
        print(f"{label:>10} {own:>10.4f} {swapped:>14.4f} {change:>8.4f} {change / own:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
