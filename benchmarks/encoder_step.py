"""Seconds and peak memory per training step of the target-invariant encoder.

One step = forward of the masked and the intact view, decoder, SparK + epsilon-InfoNCE loss, backward and
an AdamW step (the paper's optimiser settings). The network, loss and batch come from the contrastive_encoder
configs: ``paper`` (common.yaml + train.yaml: ResNet-50, SparK decoder, batch 32) and ``demo`` (+ demo.yaml);
``DEPTH:BATCH`` is the paper setting with another depth and batch. Each setting runs in a fresh process so
that the CPU peak (resident set size) belongs to that setting alone; on CUDA the peak is
``torch.cuda.max_memory_allocated``.

    python benchmarks/encoder_step.py                      # CPU: the paper and demo settings
    python benchmarks/encoder_step.py --device cuda --amp  # GPU, optionally with mixed precision
    python benchmarks/encoder_step.py --settings paper,18:16 --steps 5 --size 96
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_components.demo import TRAIN_CONFIGS  # noqa: E402


def parse_setting(item: str) -> tuple[str, tuple[str, ...], dict]:
    """``paper``, ``demo`` or ``DEPTH:BATCH`` -> (label, configs, id overrides)."""
    if item in TRAIN_CONFIGS:
        return item, TRAIN_CONFIGS[item], {}
    try:
        depth, batch = (int(v) for v in item.split(":"))
    except ValueError:
        raise SystemExit(f"--settings: {item!r} is neither {' nor '.join(TRAIN_CONFIGS)} nor DEPTH:BATCH") from None
    return "custom", TRAIN_CONFIGS["paper"], {"depth": depth, "batch_size": batch}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _run_setting(configs: tuple[str, ...], overrides: dict, size: int, device: str, steps: int, warmup: int, amp: bool,
                 threads: int):
    import torch

    from custom_components.demo import bundle_config

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    config = bundle_config("contrastive_encoder", configs, **overrides)
    depth, batch, decoder = (config.get_parsed_content(k) for k in ("depth", "batch_size", "decoder"))
    model = config.get_parsed_content("network_def").to(dev).train()
    loss_fn = config.get_parsed_content("loss")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")
    x = torch.rand(batch, 1, size, size, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    n_params = sum(p.numel() for p in model.parameters())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rss_before = _rss_mib()
    times = []
    for i in range(warmup + steps):
        if i == warmup and dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, enabled=amp and dev.type == "cuda"):
            loss = loss_fn(model(x, generator=gen), x)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
        peak_note = "peak = torch.cuda.max_memory_allocated during the timed steps"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_note = "peak = peak resident set size of the process; base = resident size before the first step"
    return {
        "depth": depth,
        "batch": batch,
        "decoder": decoder,
        "size": size,
        "params_m": n_params / 1e6,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_mib": peak,
        "peak_note": peak_note,
        "rss_before_mib": rss_before,
        "loss": loss.item(),
    }


def _child(queue, kwargs):
    try:
        queue.put(_run_setting(**kwargs))
    except Exception as exc:  # report the failure in the table instead of hanging
        queue.put({"error": f"{type(exc).__name__}: {exc}", "depth": "?", "batch": "?", "decoder": "?", **kwargs})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--settings", default="paper,demo",
                        help="comma-separated settings: paper, demo (the configs') or DEPTH:BATCH")
    parser.add_argument("--size", type=int, default=96, help="slice side in pixels (multiple of 32)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args(argv)

    settings = [parse_setting(item.strip()) for item in args.settings.split(",")]
    ctx = mp.get_context("spawn")
    rows = []
    for name, configs, overrides in settings:
        kwargs = dict(configs=configs, overrides=overrides, size=args.size, device=args.device, steps=args.steps,
                      warmup=args.warmup, amp=args.amp, threads=args.threads)
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(queue, kwargs))
        proc.start()
        result = queue.get()
        proc.join()
        rows.append({"name": name, **result})
        print(f"done: {name}: {result.get('median_s', result.get('error'))}", file=sys.stderr)

    import torch

    threads = args.threads or torch.get_num_threads()
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {threads} threads"
    print(f"\nTraining step (2 sparse encoder passes + decoder + loss + backward + AdamW), {where}"
          f"{', AMP' if args.amp else ''}, median of {args.steps} timed steps after {args.warmup} warm-up")
    header = (f"{'setting':<8}{'backbone':<11}{'decoder':<8}{'batch':>6}{'size':>6}{'params M':>10}{'s/step':>9}"
              f"{'min s':>8}{'base MiB':>10}{'peak MiB':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        first = f"{r['name']:<8}ResNet-{r['depth']:<4}{r['decoder']:<8}{r['batch']:>6}{r['size']:>6}"
        if "error" in r:
            print(f"{first}  failed: {r['error']}")
            continue
        print(f"{first}{r['params_m']:>10.1f}{r['median_s']:>9.3f}{r['min_s']:>8.3f}{r['rss_before_mib']:>10.0f}"
              f"{r['peak_mib']:>10.0f}")
    for note in sorted({r["peak_note"] for r in rows if "peak_note" in r}):
        print(note)
    if not args.device.startswith("cuda"):
        print("CPU load average at the end (1, 5, 15 min): " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
