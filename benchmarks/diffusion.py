"""Benchmark of the conditional DDPM building blocks: training step, simplex noise, reconstruction.

Prints (a) seconds and peak memory of one training step (conditioning encoder + denoiser forward,
L1 loss on x0, backward, Adam; one noise field per batch or per slice as the protocol says) for the
paper network (``--paper_batch`` slices) and the demo network (its training batch), 96x96 slices;
(b) milliseconds of simplex noise for 32 96x96 fields; (c) seconds to reconstruct one 96x96x50 volume
(50 slices, the evaluation's noise levels) with both networks; and the FLOPs of one forward+backward
of the paper-size denoiser per 96x96 slice. The networks, the demo's batch and the noise settings are
read from cond_ddpm's configs (paper: common.yaml + train.yaml; demo: + demo.yaml).

Every measurement runs in a fresh process so that the CPU peak memory (growth of ``ru_maxrss`` from
before the model was built: weights, gradients, optimiser state and activations) belongs to that
configuration alone; on CUDA the peak is ``torch.cuda.max_memory_allocated``. Mixed precision
(fp16 autocast) is used on CUDA unless --no-amp.

    python benchmarks/diffusion.py                 # CPU
    python benchmarks/diffusion.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.condition_use import NETWORK_IDS, config_values  # noqa: E402
from custom_components.demo import TRAIN_CONFIGS  # noqa: E402
from custom_components.inferers import ReconstructionInferer, ddpm_scheduler  # noqa: E402
from custom_components.networks.diffusion_unet import ConditionalDDPM  # noqa: E402
from custom_components.noise import make_noise, simplex_noise  # noqa: E402



def setting(name: str) -> dict:
    """cond_ddpm's ``name`` configs: network ids, training batch and noise sharing, evaluation noise levels."""
    values = config_values(TRAIN_CONFIGS[name], (*NETWORK_IDS, "batch_size", "shared_noise_train", "recon_timesteps"))
    return {"network": {k: values[k] for k in NETWORK_IDS}, "batch": int(values["batch_size"]),
            "shared": bool(values["shared_noise_train"]), "timesteps": list(values["recon_timesteps"])}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp and device.type == "cuda")


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak(device: torch.device, base: float) -> tuple[float, str]:
    """Peak memory since ``base`` (the process's max RSS before the model was built; ignored on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    return _maxrss_mib() - base, "max RSS growth"


def train_step_job(name: str, network: dict, batch: int, shared: bool, device: str, amp: bool, warmup: int,
                   repeats: int, threads: int) -> str:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    base = _maxrss_mib()
    torch.manual_seed(0)
    model = ConditionalDDPM(**network).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp and dev.type == "cuda")
    sched = ddpm_scheduler()
    images = torch.rand(batch, 1, 96, 96, device=dev) * 2 - 1

    def step():
        noise = make_noise(images, "simplex", shared=shared)
        t = torch.randint(0, 1000, (images.shape[0],), device=dev)
        with _autocast(dev, amp):
            pred = model(sched.add_noise(images, noise, t), t, context=images)
            loss = torch.nn.functional.l1_loss(pred.float(), images)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    sec = _timed(step, dev, warmup, repeats)
    peak, kind = _peak(dev, base)
    n_unet = sum(p.numel() for p in model.unet.parameters())
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    return (
        f"(a) train step  {name:5s} batch {images.shape[0]:2d} 96x96{', one noise field' if shared else ''}: "
        f"{sec:8.3f} s/step "
        f"({images.shape[0] / sec:7.1f} img/s), peak {peak:8.0f} MiB ({kind}); "
        f"denoiser+MLP {n_unet:,} params, encoder {n_enc:,}"
    )


def recon_job(name: str, network: dict, timesteps: list[int], device: str, amp: bool, warmup: int, repeats: int,
              threads: int) -> str:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    base = _maxrss_mib()
    torch.manual_seed(0)
    model = ConditionalDDPM(**network).to(dev).eval()
    inferer = ReconstructionInferer(ddpm_scheduler(), timesteps=timesteps, noise_type="simplex")
    volume = torch.rand(50, 1, 96, 96, device=dev) * 2 - 1  # 50 axial slices as one batch

    def run():
        with torch.no_grad(), _autocast(dev, amp):
            inferer(volume, model)

    sec = _timed(run, dev, warmup, repeats)
    peak, kind = _peak(dev, base)
    return (
        f"(c) reconstruction {name:5s} 96x96x50 volume, t = {', '.join(map(str, timesteps))}: "
        f"{sec:8.3f} s/volume, "
        f"peak {peak:8.0f} MiB ({kind})"
    )


def noise_job(device: str, warmup: int, repeats: int, threads: int) -> str:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    ms = 1000 * _timed(lambda: simplex_noise((32, 1, 96, 96), device=dev), dev, warmup, max(repeats, 5))
    return f"(b) simplex noise 32 x 96x96 (6 octaves): {ms:8.1f} ms"


def flops_job(network: dict, device: str, threads: int) -> str:
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = ConditionalDDPM(**network).to(dev)
    x = torch.randn(1, 1, 96, 96, device=dev)
    t = torch.tensor([500], device=dev)
    cond = torch.randn(1, 128, device=dev)
    with FlopCounterMode(display=False) as counter:
        model.unet(x, t, cond).sum().backward()
    return f"    paper denoiser forward+backward per 96x96 slice: {counter.get_total_flops() / 1e9:.0f} GFLOP"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", nargs="+", default=["paper", "demo"], choices=sorted(TRAIN_CONFIGS))
    ap.add_argument("--paper_batch", type=int, default=8, help="slices per training step of the paper network "
                    "(its config trains 32; 8 keeps a CPU measurement to minutes)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    ap.add_argument("--no-amp", action="store_true", help="full precision on CUDA")
    ap.add_argument("--parts", nargs="+", default=["train", "noise", "recon", "flops"],
                    choices=["train", "noise", "recon", "flops"], help="which measurements to run")
    args = ap.parse_args()
    amp = not args.no_amp
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"device: {args.device} ({name}); torch {torch.__version__}; amp: {amp and args.device != 'cpu'}")

    ctx = mp.get_context("spawn")
    timing = (args.warmup, args.repeats, args.threads)
    settings = {cfg: setting(cfg) for cfg in {*args.configs, "paper"}}
    settings["paper"]["batch"] = args.paper_batch
    jobs = []
    if "train" in args.parts:
        jobs += [(train_step_job, cfg, settings[cfg]["network"], settings[cfg]["batch"], settings[cfg]["shared"],
                  args.device, amp, *timing) for cfg in args.configs]
    if "noise" in args.parts:
        jobs.append((noise_job, args.device, *timing))
    if "recon" in args.parts:
        jobs += [(recon_job, cfg, settings[cfg]["network"], settings[cfg]["timesteps"], args.device, amp, *timing)
                 for cfg in args.configs]
    if "flops" in args.parts:
        jobs.append((flops_job, settings["paper"]["network"], args.device, args.threads))
    for fn, *fn_args in jobs:
        with ctx.Pool(1) as pool:  # a fresh process per measurement
            print(pool.apply(fn, fn_args), flush=True)


if __name__ == "__main__":
    main()
