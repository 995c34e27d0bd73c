"""Does the DDPM give a healthy slice back? Healthy slices are reconstructed as in evaluation (one-step x0
prediction from simplex noise) at each t, from t = 1 (almost no noise) up, and compared with the input inside the
brain. A trained model returns the input at small t; an undertrained one returns it with its contrast shrunk
towards the mean, so bright CSF comes out dark and the residual lights up the ventricles.

Printed per t and for the ensemble of the evaluation's t's, in [0, 1] intensity units, over brain voxels:

* ``L1``: mean |reconstruction - image|;
* ``contrast``: slope of the least-squares line from image to reconstruction (1: contrast kept, 0: a flat image);
* ``CSF in / out``: mean of the voxels brighter than 0.8 in the image (CSF on T2), and of the reconstruction there.

    python benchmarks/reconstruction_contrast.py --maps_dir W/eval/maps --ckpt W/cond_ddpm/model.pt
        [--split IXI_test] [--configs common.yaml,demo.yaml] [--timesteps 1,100,250,500,750] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.condition_use import (  # noqa: E402
    add_model_arguments, brain_slices, config_values, load_network, network_ids)
from custom_components.inferers import ReconstructionInferer, ddpm_scheduler  # noqa: E402
from custom_components.utils import from_diffusion_range, to_diffusion_range  # noqa: E402

CSF_LEVEL = 0.8


def fidelity(image: np.ndarray, recon: np.ndarray) -> tuple[float, float, float, float]:
    """L1 error, contrast slope, and the CSF mean of image and reconstruction, from brain voxels."""
    slope = float(np.polyfit(image, recon, 1)[0])
    csf = image > CSF_LEVEL
    return float(np.abs(recon - image).mean()), slope, float(image[csf].mean()), float(recon[csf].mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--slices_per_volume", type=int, default=8)
    parser.add_argument("--timesteps", default="1,100,250,500,750")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    args = parser.parse_args(argv)

    configs = args.configs.split(",")
    network = load_network(args.ckpt, network_ids(configs))
    evaluation_timesteps = config_values(configs, ("recon_timesteps",))["recon_timesteps"]
    images, masks = brain_slices(args.maps_dir, args.split, args.slices_per_volume)
    x, brain = images.flatten(0, 1), masks.flatten(0, 1) > 0
    timesteps = sorted({int(t) for t in args.timesteps.split(",")} | set(evaluation_timesteps))
    inferer = ReconstructionInferer(ddpm_scheduler(), timesteps, return_members=True,
                                    generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        _, members = inferer(to_diffusion_range(x), network)
    recons = {t: from_diffusion_range(m) for t, m in zip(timesteps, members)}
    recons["ensemble"] = torch.stack([recons[t] for t in evaluation_timesteps]).mean(0)

    image = x[brain].numpy()
    print(f"{args.ckpt}: {len(images)} volumes of {args.split}, {images.shape[1]} slices each; brain voxels, "
          "[0, 1] units")
    print(f"{'t':>10} {'L1':>7} {'contrast':>9} {'CSF in':>7} {'CSF out':>8}")
    for label, recon in recons.items():
        l1, slope, csf_in, csf_out = fidelity(image, recon[brain].numpy())
        print(f"{label!s:>10} {l1:>7.3f} {slope:>9.2f} {csf_in:>7.2f} {csf_out:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
