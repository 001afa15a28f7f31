"""Benchmark each script's default model on one device: a training step (forward, backward, optimizer,
EMA) and one sampler step at batch 100, against the device's own dense matmul peak.

    python bench.py                                  # every script, prints a table, writes bench.json
    python bench.py --script cifar_dit_ddp --batch-size 64 --device cuda --compile
    python bench.py --channels-last off              # compare a speed option

Like nanoGPT's bench.py: every figure comes from a measurement in this run.
"""
import argparse
import copy
import importlib
import json
import multiprocessing
import platform
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch.utils.flop_counter import FlopCounterMode

SCRIPTS = ["mnist_ddpm", "cifar_cfg_unet", "cifar_dit_ddp", "stl10_vpred_clip", "celeba_crossattn"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--script", choices=SCRIPTS, action="append", help="script(s) to run (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, mps or cpu")
    p.add_argument("--batch-size", type=int, default=16, help="training batch")
    p.add_argument("--sample-batch", type=int, default=100, help="images in one sampler step (CFG doubles it)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="autocast dtype (default: bf16 on CUDA)")
    p.add_argument("--channels-last", choices=["on", "off"], default="on", help="channels_last for the U-Nets")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--steps", type=int, default=3, help="timed training steps after 1 warm-up step")
    p.add_argument("--tiny", action="store_true", help="smallest models (--width 32 --depth 1): a quick check")
    p.add_argument("--out", default="bench.json", help="where to write the results")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def matmul_peak(device, dtype):
    """Dense matmul FLOP/s, 2 n^3 per n x n product: the best of five, as a peak should be."""
    n = 4096 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return max(2 * n ** 3 / timed(lambda: a @ b, device, 1) for _ in range(5))


def setup(name, bench, device):
    """The script's default model (per its own get_args), a training loss and one guided denoiser call."""
    mod = importlib.import_module(name)
    args = mod.get_args(["--width", "32", "--depth", "1"] if bench.tiny else [])
    cfg, w = vars(args), args.cfg[0] if isinstance(args.cfg, list) else args.cfg  # stl10 takes a list of scales
    ab = torch.cumprod(1 - mod.make_betas(args.schedule, args.steps), 0).float().to(device)
    if name == "mnist_ddpm":
        model, shape = mod.build_model({**cfg, "classes": list("0123456789")}), (1, 28, 28)
    elif name in ("cifar_cfg_unet", "cifar_dit_ddp"):
        model, shape = mod.build_model(cfg, 10), (3, 32, 32)
    elif name == "stl10_vpred_clip":
        model, shape = mod.build_model(cfg, 10, 512), (3, 96, 96)  # CLIP ViT-B/32 text embeddings: 512-d
    else:
        attrs = [f"attr{i}" for i in range(40)]
        model, shape = mod.build_model({**cfg, "classes": attrs, "channels": 3, "size": 64}), (3, 64, 64)
    if name == "celeba_crossattn":  # multi-hot attributes instead of a label
        cond = lambda n: (torch.rand(n, 40, device=device) < 0.5).float()
        loss = lambda m, x, c: mod.p_losses(m, x, c, ab, args.p_uncond)
        denoise = lambda m, x, t, c: mod.cfg_denoiser(m, c, w)(x, t)
    else:
        cond = lambda n: torch.randint(0, 10, (n,), device=device)
        loss = lambda m, x, y: mod.p_losses(m, x, y, ab, args.p_uncond, 10)
        denoise = lambda m, x, t, y: mod.cfg_denoiser(m, y, w, 10)(x, t)
    B, S = bench.batch_size, bench.sample_batch
    x, c, xs, cs = torch.randn(B, *shape, device=device), cond(B), torch.randn(S, *shape, device=device), cond(S)
    ts = torch.full((S,), len(ab) // 2, device=device)
    return model.to(device), lambda m: loss(m, x, c), lambda m: denoise(m, xs, ts, cs)


def bench_script(name, bench, peak):
    """Runs in a fresh process, so that the peak memory is this script's alone."""
    device = torch.device(bench.device)
    model, loss_fn, sample_fn = setup(name, bench, device)
    unet = name != "cifar_dit_ddp"
    if unet and bench.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    run = torch.compile(model) if bench.compile else model
    bf16 = bench.dtype == "bf16" or (bench.dtype is None and device.type == "cuda")
    ctx = lambda: torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    def train_step():
        with ctx():
            loss = loss_fn(run)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1e-3)

    def sample_step():
        with torch.inference_mode(), ctx():
            sample_fn(run.eval())
        run.train()

    with FlopCounterMode(display=False) as fc:
        with ctx():
            loss_fn(model).backward()
    flops = fc.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_step()  # warm-up (and compilation)
    s_step = timed(train_step, device, bench.steps)
    sample_step()
    s_sample = timed(sample_step, device, 1)
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return dict(script=name, params_M=sum(p.numel() for p in model.parameters()) / 1e6,
                img_per_s=bench.batch_size / s_step, s_per_step=s_step, peak_mem_MB=mem / 2 ** 20,
                gflop_per_img=flops / bench.batch_size / 1e9, achieved_gflop_s=flops / s_step / 1e9,
                frac_of_peak=flops / s_step / peak, sample_step_s=s_sample)


def main(argv=None):
    bench = get_args(argv)
    device = torch.device(bench.device)
    dtype = torch.bfloat16 if bench.dtype == "bf16" or (bench.dtype is None and device.type == "cuda") else torch.float32
    peak = matmul_peak(device, dtype)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}: "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s ({dtype}), batch {bench.batch_size}")
    rows = []
    for name in bench.script or SCRIPTS:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(bench_script, name, bench, peak).result())
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()))
    json.dump(dict(device=str(device), threads=torch.get_num_threads(), matmul_peak_gflop_s=peak / 1e9,
                   options=vars(bench), results=rows), open(bench.out, "w"), indent=2)


if __name__ == "__main__":
    main()
