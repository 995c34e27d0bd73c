"""How little a synthetic lesion moves an encoder's embedding (target invariance, SPEC section 3).

For healthy IXI slices (the project's preprocessing, ``custom_components.data.volume_dataset``) a bright,
smooth blob of varied size is pasted inside the brain, like the demo data's lesions. The embedding is the
global-average-pooled deepest feature map of the ResNet backbone (what cond_ddpm's conditioning encoder pools).
Printed per encoder, mean (std) over slices:

* cosine similarity between the embedding of a slice and of the same slice with a lesion, overall and per
  lesion size (radius in pixels at 96x96, 2 mm per pixel);
* for reference, the cosine similarity between two different healthy slices (same position, other subject);
* the ratio of the two cosine distances, (1 - cos lesion) / (1 - cos other subject): 0 means the lesion
  changes nothing, 1 means it moves the embedding as far as swapping the subject. Lower is more invariant.
  Raw cosines of pooled ReLU features are close to 1 for any input, so this ratio is the figure to compare;
  the same table is printed again with centred embeddings (the mean healthy embedding subtracted).

Encoders: the trained backbone(s) given with ``--ckpt`` (the contrastive encoder's ``models/model.pt``) and a
randomly initialised backbone of the same depth (fixed seed).

    python benchmarks/encoder_invariance.py --ckpt bundles/contrastive_encoder/models/model.pt --depth 10 \\
        --data_root DEMO_DATA_DIR [--split IXI_test] [--cache_dir DIR] [--input_range unit|diffusion]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_components.data import load_split, volume_dataset  # noqa: E402
from custom_components.demo import bundle_config  # noqa: E402
from custom_components.networks.backbone import backbone_pyramid, resnet_backbone  # noqa: E402
from custom_components.networks.diffusion_unet import load_backbone_state  # noqa: E402

# lesion radius ranges in pixels of the 96x96 slice (2 mm pixels): MS-like to tumour-like
LESION_SIZES = {"small": (2.0, 4.0), "medium": (5.0, 8.0), "large": (9.0, 14.0)}


def healthy_slices(data_root, split: str, cache_dir, per_volume: int, min_brain: float = 0.5):
    """(N, 1, 96, 96) slices in [0, 1], their brain masks and volume indices: ``per_volume`` axial slices per
    volume, evenly spread over those whose brain area is at least ``min_brain`` of the volume's largest."""
    items = load_split(data_root, split)
    if not items:
        raise SystemExit(f"Split {split} of {data_root} lists no volumes.")
    images, masks, volume = [], [], []
    for v, d in enumerate(volume_dataset(items, cache_dir, bundle_config("cond_ddpm").get_parsed_content("volume_preprocessing"))):
        image, mask = d["image"][0].as_tensor(), d["mask"][0].as_tensor()  # (96, 96, 50)
        area = mask.sum((0, 1))
        eligible = torch.nonzero(area >= min_brain * area.max()).flatten()
        picks = eligible[torch.linspace(0, len(eligible) - 1, min(per_volume, len(eligible))).round().long()]
        images.append(image[..., picks].permute(2, 0, 1))
        masks.append(mask[..., picks].permute(2, 0, 1))
        volume += [v] * len(picks)
    return torch.cat(images)[:, None].float(), torch.cat(masks)[:, None].float(), torch.tensor(volume)


def smooth_field(rng: np.random.Generator, n: int, size: int, k: int = 6) -> np.ndarray:
    """(n, size, size) smooth random fields of unit-ish amplitude: random k x k values, bicubically upsampled."""
    coarse = torch.from_numpy(rng.standard_normal((n, 1, k, k))).float()
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[:, 0].numpy()


def paste_lesions(images: torch.Tensor, masks: torch.Tensor, radius_range: tuple[float, float], seed: int):
    """Each slice with one bright smooth irregular ellipse inside the brain (blended toward 0.75-0.95, the
    CSF-like brightness of the demo's oedema and MS lesions), and the lesion's soft alpha map."""
    rng = np.random.default_rng(seed)
    n, _, h, w = images.shape
    brain = masks[:, 0].numpy() > 0
    radius = rng.uniform(*radius_range, n)
    # the centre lies deep enough in the brain that most of the blob is inside it
    depth = np.stack([ndi.distance_transform_edt(b) for b in brain])
    centres = np.empty((n, 2))
    for i in range(n):
        inside = np.argwhere(depth[i] >= min(0.8 * radius[i], depth[i].max()))
        centres[i] = inside[rng.integers(len(inside))]
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    angle = rng.uniform(0, np.pi, n)[:, None, None]
    axes = radius[:, None] * np.stack([np.ones(n), rng.uniform(0.6, 1.0, n)], 1)
    dy, dx = yy[None] - centres[:, 0, None, None], xx[None] - centres[:, 1, None, None]
    u = np.cos(angle) * dy + np.sin(angle) * dx
    v = -np.sin(angle) * dy + np.cos(angle) * dx
    rho = np.sqrt((u / axes[:, 0, None, None]) ** 2 + (v / axes[:, 1, None, None]) ** 2)
    rho = rho + 0.2 * smooth_field(rng, n, h)  # lobulated outline
    alpha = 1.0 / (1.0 + np.exp(np.clip((rho - 1.0) / 0.08, -30, 30))) * brain
    value = rng.uniform(0.75, 0.95, n)[:, None, None] * (1.0 + 0.05 * smooth_field(rng, n, h, k=8))
    alpha_t = torch.from_numpy(alpha).float()[:, None]
    lesioned = images * (1 - alpha_t) + alpha_t * torch.from_numpy(value).float()[:, None]
    return lesioned.clamp(0, 1), alpha_t


@torch.no_grad()
def embed(backbone: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Global-average-pooled deepest backbone features (N, C) of slices (N, 1, H, W)."""
    return torch.cat([backbone_pyramid(backbone, x[i:i + batch])[-1].mean((-2, -1)) for i in range(0, len(x), batch)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def other_subject_pairs(volume: torch.Tensor) -> torch.Tensor:
    """For each slice, the index of the slice at the same rank in the next volume (another subject)."""
    n_volumes = int(volume.max()) + 1
    if n_volumes < 2:
        raise SystemExit("The reference pairs need at least two volumes in the split.")
    rank = torch.zeros_like(volume)
    for v in range(n_volumes):
        rank[volume == v] = torch.arange(int((volume == v).sum()))
    partner = torch.empty_like(volume)
    for i in range(len(volume)):
        nxt = (int(volume[i]) + 1) % n_volumes
        candidates = torch.nonzero(volume == nxt).flatten()
        partner[i] = candidates[min(int(rank[i]), len(candidates) - 1)]
    return partner


def measure(backbone: torch.nn.Module, healthy: torch.Tensor, lesioned: dict[str, torch.Tensor],
            partner: torch.Tensor, to_input, centred: bool = False) -> dict[str, torch.Tensor]:
    """Cosine similarities per slice: healthy vs lesioned (per size) and healthy vs another subject's slice.

    ``centred`` subtracts the mean healthy embedding first, so the component every slice shares (pooled ReLU
    features are all positive) does not make every pair look alike.
    """
    backbone.eval()
    z = embed(backbone, to_input(healthy))
    zl = {size: embed(backbone, to_input(x)) for size, x in lesioned.items()}
    mean = z.mean(0, keepdim=True) if centred else torch.zeros_like(z[:1])
    out = {size: cosine(z - mean, e - mean) for size, e in zl.items()}
    out["all sizes"] = torch.cat([out[size] for size in lesioned])
    out["other subject"] = cosine(z - mean, z[partner] - mean)
    return out


def save_preview(path: Path, healthy: torch.Tensor, lesioned: dict[str, torch.Tensor], n: int = 6) -> None:
    """A grid of ``n`` healthy slices (top row) and the same slices with each lesion size (rows below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = torch.linspace(0, len(healthy) - 1, min(n, len(healthy))).round().long()
    rows = [("healthy", healthy), *lesioned.items()]
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(1.6 * len(picks), 1.6 * len(rows)), squeeze=False)
    for r, (name, x) in enumerate(rows):
        for c, i in enumerate(picks):
            axes[r, c].imshow(x[i, 0].T, cmap="gray", vmin=0, vmax=1, origin="lower")
            axes[r, c].set_axis_off()
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", nargs="*", default=[], help="backbone state dict(s) (the encoder's models/model.pt)")
    parser.add_argument("--depth", type=int, default=50,
                        help="ResNet depth of the checkpoint(s): 10 (the demo), 18, 34 or 50")
    parser.add_argument("--data_root", required=True, help="data root (e.g. the demo data) with splits/ and Train/")
    parser.add_argument("--split", default="IXI_test", help="healthy split to draw slices from")
    parser.add_argument("--cache_dir", default=None, help="preprocessed-volume cache (default: DATA_ROOT/../cache)")
    parser.add_argument("--slices_per_volume", type=int, default=8)
    parser.add_argument("--input_range", choices=("unit", "diffusion"), default="unit",
                        help="unit: slices in [0, 1] as the contrastive encoder trains on them; diffusion: "
                             "[-1, 1] as cond_ddpm feeds its conditioning encoder")
    parser.add_argument("--seed", type=int, default=0, help="lesion placement and random-encoder seed")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--preview", default=None, help="optional PNG: healthy slices and their lesioned copies")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data_root = Path(args.data_root)
    cache_dir = Path(args.cache_dir) if args.cache_dir else data_root.absolute().parent / "cache"

    healthy, masks, volume = healthy_slices(data_root, args.split, cache_dir, args.slices_per_volume)
    lesioned = {size: paste_lesions(healthy, masks, radii, args.seed + k)[0]
                for k, (size, radii) in enumerate(LESION_SIZES.items())}
    partner = other_subject_pairs(volume)
    if args.preview:
        save_preview(Path(args.preview), healthy, lesioned)
    to_input = (lambda x: x) if args.input_range == "unit" else (lambda x: x * 2 - 1)

    encoders = []
    for path in args.ckpt:
        backbone = resnet_backbone(args.depth)
        try:
            backbone.load_state_dict(load_backbone_state(path))
        except RuntimeError as e:
            raise SystemExit(f"{path} is not a ResNet-{args.depth} backbone state dict (check --depth): {e}") from e
        encoders.append((f"trained: {path}", backbone))
    torch.manual_seed(args.seed)
    encoders.append((f"random init (ResNet-{args.depth}, seed {args.seed})", resnet_backbone(args.depth)))

    print(f"{len(healthy)} healthy slices of {int(volume.max()) + 1} volumes ({args.split} of {data_root}), "
          f"input range {'[0, 1]' if args.input_range == 'unit' else '[-1, 1]'}, one lesion per slice and size; "
          f"radii (px at 2 mm): " + ", ".join(f"{k} {a:g}-{b:g}" for k, (a, b) in LESION_SIZES.items()))
    columns = [*LESION_SIZES, "all sizes", "other subject"]
    header = f"{'encoder':<48}" + "".join(f"{c:>16}" for c in columns) + f"{'distance ratio':>16}"
    for centred in (False, True):
        title = ("centred cosine (mean healthy embedding subtracted first)" if centred
                 else "cosine similarity to the healthy slice")
        print(f"\n{title}, mean (std) over slices; distance ratio = (1 - cos lesion) / (1 - cos other subject), "
              f"lower = more invariant\n{header}")
        for name, backbone in encoders:
            sims = measure(backbone, healthy, lesioned, partner, to_input, centred=centred)
            ratio = (1 - sims["all sizes"].mean()) / (1 - sims["other subject"].mean()).clamp_min(1e-12)
            cells = "".join(f"{f'{s.mean():.4f} ({s.std():.4f})':>16}" for s in (sims[c] for c in columns))
            label = name if len(name) <= 46 else "..." + name[-43:]
            print(f"{label:<48}{cells}{float(ratio):>16.3f}")


if __name__ == "__main__":
    main()
