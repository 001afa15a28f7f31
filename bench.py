"""Benchmark each script's default model on one device, all through the same calls: a training step
(forward, backward, optimizer, EMA) and one guided sampler step at batch 100, against the device's
own dense matmul peak. With --mnist-quality: what mnist_ddpm.py's command gives in how long, as
three classifiers see it; with --cifar-quality, the same for the CIFAR-10 scripts' --preset cpu.

    python bench.py                                  # every script: a table, and bench.json
    python bench.py --script cifar_dit_ddp --batch-size 64 --device cuda --compile
    python bench.py --channels-last off              # compare a speed option
    python bench.py --mnist-quality --data-dir DIR   # train, sample 1,000 digits, measure them
    python bench.py --mnist-quality --data-dir DIR --flags "--iters 3000"   # another setting
    python bench.py --mnist-quality --data-dir DIR --seeds 0,1   # two training seeds, a row each
    python bench.py --mnist-quality --data-dir DIR --resample --flags "--cfg 2"   # sample again
    python bench.py --cifar-quality --script cifar_cfg_unet --script cifar_dit_ddp   # both presets
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench.py ...   # as without AVX-512

Like nanoGPT's bench.py: every figure comes from a measurement in this run, and the table says on
which CPU (model, vector extensions) or GPU it was taken.
"""
import argparse
import copy
import functools
import importlib
import json
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

SCRIPTS = ["mnist_ddpm", "cifar_cfg_unet", "cifar_dit_ddp", "stl10_vpred_clip", "celeba_crossattn"]
DATA = dict(mnist_ddpm="mnist", cifar_cfg_unet="cifar", cifar_dit_ddp="cifar")  # --*-quality's


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--script", choices=SCRIPTS, action="append", help="script(s) (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=16, help="training batch")
    p.add_argument("--sample-batch", type=int, default=100, help="images in a sampler step")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast, as the scripts' --dtype")
    p.add_argument("--channels-last", choices=["on", "off"], default="on",
                   help="channels_last memory format, as the scripts use")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--steps", type=int, default=3, help="timed training steps after a warm-up")
    p.add_argument("--tiny", action="store_true", help="--width 32 --depth 1: a quick check")
    p.add_argument("--out", default="bench.json", help="where the results go")
    g = p.add_argument_group("--mnist-quality, --cifar-quality: what a script's command gives, in "
                             "how long (issues 16, 23, 24 and 26)")
    g.add_argument("--mnist-quality", action="store_true",
                   help="time `python mnist_ddpm.py` (+ --flags) and sampling 100 of each digit; "
                        "score the samples with three digit classifiers")
    g.add_argument("--cifar-quality", action="store_true",
                   help="the same for `--preset cpu` of cifar_cfg_unet.py (or of each --script: "
                        "cifar_dit_ddp) with a CIFAR-10 classifier")
    g.add_argument("--data-dir", default="./data", help="MNIST, CIFAR-10 (torchvision's layout)")
    g.add_argument("--cifar-images", help="CIFAR-10 as images, DIR/train/<class>, DIR/test/<class> "
                                          "(default: torchvision's CIFAR-10 in --data-dir)")
    g.add_argument("--flags", default="", help="more of the script's flags, e.g. '--iters 3000'")
    g.add_argument("--nproc", type=int, default=1,
                   help="train with torchrun --nproc_per_node=N (on a CPU: gloo, a thread each)")
    g.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1: a run and a row each")
    g.add_argument("--resample", action="store_true",
                   help="no training: sample the seeds' last runs again with --flags (e.g. "
                        "'--cfg 2 --sample-steps 20')")
    a = p.parse_args(argv)
    if a.cifar_quality and not set(a.script or []) <= set(DATA):
        p.error("--cifar-quality measures cifar_cfg_unet.py or cifar_dit_ddp.py")
    return a


def machine(device):
    """The processor the figures were measured on: CPU model and vector extensions, or the GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        info = open("/proc/cpuinfo").read()
        model = next(line.split(":")[1].strip() for line in info.splitlines()
                     if line.startswith("model name"))
        flags = set(next(line for line in info.splitlines() if line.startswith("flags")).split())
        model += " (" + ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                                  if f in flags) + ")"
    except (OSError, StopIteration):  # not Linux: the platform's name only
        pass
    if os.environ.get("ATEN_CPU_CAPABILITY"):  # kernels limited, e.g. to avx2 on an AVX-512 CPU
        model += f", torch kernels limited to {os.environ['ATEN_CPU_CAPABILITY']}"
    return f"{model}, {torch.get_num_threads()} threads"


def timed(fn, device, reps):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def matmul_peak(device, dtype):
    """Dense matmul FLOP/s, 2 n^3 per n x n product: the best of five, as a peak should be."""
    n = 4096 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(2))
    a @ b
    return max(2 * n ** 3 / timed(lambda: a @ b, device, 1) for _ in range(5))


def bench_script(name, bench, peak):
    """One script's default model (its get_args, its data set's META), trained and sampled through
    the spine's own functions. Runs in a fresh process, so that the peak memory is its alone."""
    m, device = importlib.import_module(name), torch.device(bench.device)
    config = vars(m.get_args(["--width", "32", "--depth", "1"] if bench.tiny else []))
    model = m.build_model(config, m.META).to(device)
    if bench.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    net = torch.compile(model) if bench.compile else model
    dtype, ab = m.amp_dtype(bench.dtype, device), m.make_alphas_cumprod(config["schedule"],
                                                                        config["steps"], device)
    cond, drop, _ = m.conditions(["all"], 1, m.META, config)

    def batch(n):  # n images of the data's shape, conditions of the sample grid's rows in turn
        x = torch.randn(n, m.META["channels"], m.META["size"], m.META["size"], device=device)
        i = torch.arange(n) % len(cond)
        x = x.contiguous(memory_format=torch.channels_last)
        return x, cond[i].to(device), drop[i].to(device)
    x, c, _ = batch(bench.batch_size)
    xs, cs, ds = batch(bench.sample_batch)
    ts = torch.full((bench.sample_batch,), len(ab) // 2, device=device)
    eps_fn = m.denoiser(net, cs, ds, config["cfg"], ab)  # guided: a doubled batch

    def train_step():
        with m.autocast(dtype, device):
            loss = m.p_losses(net, x, c, ab, config["p_uncond"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m.update_ema(ema, model, 0.999)

    def sample_step():
        with torch.no_grad(), m.autocast(dtype, device):
            eps_fn(xs, ts)

    with FlopCounterMode(display=False) as fc:
        with m.autocast(dtype, device):
            m.p_losses(model, x, c, ab, config["p_uncond"]).backward()
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


class DigitClassifier(nn.Module):
    """A small CNN (99.25 % on MNIST's test set after 4 epochs at width 32): conv-conv-pool-
    conv-pool, then a 256-d feature layer, whose statistics the Frechet distance compares, and the
    10 logits."""
    epochs, distort = 4, False  # fit_digits' recipe

    def __init__(self, w=32):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, w, 3), nn.ReLU(), nn.Conv2d(w, 2 * w, 3), nn.ReLU(),
                                   nn.MaxPool2d(2), nn.Conv2d(2 * w, 4 * w, 3), nn.ReLU(),
                                   nn.MaxPool2d(2), nn.Flatten())  # [B, 4w * 5 * 5]
        self.features = nn.Sequential(nn.Linear(100 * w, 256), nn.ReLU())
        self.logits = nn.Linear(256, 10)

    def forward(self, x):  # uint8 [B, 1, 28, 28] -> (logits, features)
        f = self.features(self.convs(x.float() / 127.5 - 1))
        return self.logits(f), f


class DigitMLP(DigitClassifier):
    """No convolutions: the 784 pixels through two hidden layers, the second the 256-d features. It
    sees strokes otherwise than a CNN does, so their distances disagree where samples are off. It
    learns no shift of a stroke it has not seen: 40 epochs of distorted digits take it from 97.2 %
    (4 plain epochs) to 99.0 %, as Simard et al. (2003) found."""
    epochs, distort = 40, True

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU())
        self.features = nn.Sequential(nn.Linear(512, 256), nn.ReLU())


def mnist(bench, train):
    import torchvision  # the data sets as uint8 tensors [N, 1, 28, 28], labels
    ds = torchvision.datasets.MNIST(bench.data_dir, train=train, download=True)
    return ds.data[:, None], ds.targets


@torch.no_grad()
def classify(net, images):
    """(predicted digits, features) of uint8 images, in batches."""
    out = [net(x) for x in images.split(1000)]
    return torch.cat([o[0] for o in out]).argmax(1), torch.cat([o[1] for o in out]).double()


def distorted(x, g):
    """uint8 digits [B, 1, 28, 28], each turned by up to 10 degrees, scaled by 0.9-1.1 and shifted
    by up to 2 pixels: an affine map of the sampling grid, bilinear."""
    turn, scale = (torch.rand(2, len(x), generator=g) * 2 - 1) * torch.tensor([[0.175], [0.1]])
    cos, sin = turn.cos() / (1 + scale), turn.sin() / (1 + scale)
    shift = (torch.rand(2, len(x), generator=g) * 2 - 1) / 7  # 2 of 14 pixels from the centre
    theta = torch.stack([cos, -sin, shift[0], sin, cos, shift[1]], 1).view(-1, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, align_corners=False).round().to(torch.uint8)


def fit_digits(net, x, y, seed):
    """net.epochs of Adam (distorted digits if net.distort), 1-4 CPU minutes (on the test set:
    99.25 % for the CNN, 99.0 % for the MLP)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters())
    for epoch in range(net.epochs):
        opt.param_groups[0]["lr"] = 1e-3 / 3 ** (4 * epoch // net.epochs)  # settles: 99 % or more
        for idx in torch.randperm(len(x), generator=g).split(128):
            xb = distorted(x[idx], g) if net.distort else x[idx]
            loss = F.cross_entropy(net(xb)[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def conv_bn(ci, co):
    return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x):
        return x + self.body(x)


class CifarClassifier(nn.Module):
    """ResNet-9's layout (as in fast CIFAR-10 training) at a quarter of its width: conv, then per
    level conv, max-pool, residual block; the pooled 256-d features, whose statistics the Frechet
    distance compares, and the 10 logits."""

    def __init__(self, w=32):
        super().__init__()
        self.convs = nn.Sequential(conv_bn(3, w), conv_bn(w, 2 * w), nn.MaxPool2d(2),
                                   Residual(2 * w), conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
                                   conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
                                   nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.logits = nn.Linear(8 * w, 10)

    def forward(self, x):  # uint8 [B, 3, 32, 32] -> (logits, features)
        f = self.convs(x.float() / 127.5 - 1)
        return self.logits(f) * 0.125, f


def cifar(bench, train):
    """CIFAR-10's training or test set as uint8 [N, 3, 32, 32] and labels: --cifar-images' folders
    (read once, kept in out/), else torchvision's (downloaded into --data-dir)."""
    import torchvision
    if not bench.cifar_images:
        ds = torchvision.datasets.CIFAR10(bench.data_dir, train=train, download=True)
        return torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    path = os.path.join("out", f"cifar_images_{'train' if train else 'test'}.pt")
    if not os.path.exists(path):
        ds = torchvision.datasets.ImageFolder(os.path.join(bench.cifar_images,
                                                           "train" if train else "test"))
        x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                         for f, _ in ds.samples])
        os.makedirs("out", exist_ok=True)
        torch.save((x, torch.tensor(ds.targets)), path)
    return torch.load(path, weights_only=True)


def fit_cifar(net, x, y, seed, epochs=6):
    """SGD with Nesterov momentum, a one-cycle learning rate, random crops and flips, label
    smoothing: 6 epochs, about 25 CPU minutes (85.7 % on the test set)."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(x) // 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=steps, pct_start=0.25)
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), generator=g)[:steps // epochs * 256].split(256):
            xb = F.pad(x[idx], (4, 4, 4, 4), mode="reflect")  # random 32x32 crops, flips
            i, j = torch.randint(0, 9, (2,), generator=g).tolist()
            xb = xb[:, :, i:i + 32, j:j + 32]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1, generator=g) < 0.5, xb.flip(3), xb)
            loss = F.cross_entropy(net(xb)[0], y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"classifier epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}", flush=True)


QUALITY = dict(  # a data set -> how to read it, how its classifiers learn, and the classifiers:
    # (name, class, seed, the test accuracy it reaches)
    mnist=(mnist, fit_digits, [("cnn", DigitClassifier, 0, 0.99), ("mlp", DigitMLP, 1, 0.985),
                               ("cnn16", functools.partial(DigitClassifier, 16), 2, 0.98)]),
    cifar=(cifar, fit_cifar, [("resnet", CifarClassifier, 0, 0.85)]))


def classifier(bench, dataset, label, make, seed):
    """One of the data set's classifiers, trained once and kept in out/<data set>_<name>_
    classifier.pt (out of git), with its accuracy on the test set."""
    data, fit, _ = QUALITY[dataset]
    path = os.path.join("out", f"{dataset}_{label}_classifier.pt")
    torch.manual_seed(seed)
    net = make()
    if os.path.exists(path):
        state = torch.load(path, weights_only=True)
        net.load_state_dict(state["model"])
        return net.eval(), state["accuracy"]
    fit(net, *data(bench, True), seed)
    xt, yt = data(bench, False)
    accuracy = (classify(net.eval(), xt)[0] == yt).float().mean().item()
    os.makedirs("out", exist_ok=True)
    torch.save(dict(model=net.state_dict(), accuracy=accuracy), path)
    return net, accuracy


def frechet(f1, f2):
    import fid  # the Frechet distance of two sets of features
    stats = [(f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False)) for f in (f1, f2)]
    return fid.frechet_distance(*stats[0], *stats[1])


def read_grid(path, rows, cols, size=28, channels=1):
    """The uint8 images [rows * cols, channels, size, size] of a save_grid PNG (1 px padding)."""
    with Image.open(path) as im:
        grid = torch.from_numpy(np.array(im.convert("L" if channels == 1 else "RGB")))
    grid, step = grid.view(*grid.shape[:2], -1).permute(2, 0, 1), size + 1  # [C, H, W]
    return torch.stack([grid[:, 1 + step * r:step * (r + 1), 1 + step * c:step * (c + 1)]
                        for r in range(rows) for c in range(cols)])


def run_script(bench, name, seed):
    """The script's command (mnist_ddpm.py's defaults, the CIFAR-10 scripts' --preset cpu; +
    --flags; under torchrun with --nproc) with --seed SEED, timed (unless --resample); then
    `--sample` of 100 of each class with its sampler and guidance, timed.
    -> (its run folder, the seconds of each part)"""
    out = os.path.join("out", f"{name}_quality_seed{seed}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={bench.nproc}"]
    source = ["--data-dir", bench.data_dir]
    if DATA[name] == "cifar":
        source = ["--preset", "cpu", *(["--image-folder", os.path.join(bench.cifar_images, "train")]
                                       if bench.cifar_images else source)]
    flags, seconds = [path, "--out-dir", out, *source, *shlex.split(bench.flags)], dict(train=None)
    parts = [("sample", [sys.executable, *flags, "--sample", "--labels", ",".join("0123456789"),
                         "--per-label", "100", "--seed", "1"])]  # every run from the same noise
    if not bench.resample:
        shutil.rmtree(out, ignore_errors=True)  # a fresh run
        parts.insert(0, ("train", [*(torchrun if bench.nproc > 1 else [sys.executable]), *flags,
                                   "--seed", str(seed)]))
    for part, command in parts:
        t = time.time()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds[part] = time.time() - t
    return out, seconds


def score(nets, samples):
    """Each classifier's agreement with the intended classes (100 of each in turn) and the Frechet
    distance of its features of the samples to those of the test images."""
    scores = {}
    for label, net, accuracy, f_test, floor in nets:
        labels, f_fake = classify(net, samples)
        scores[label] = dict(
            test_accuracy=accuracy, fd_samples=frechet(f_fake, f_test), fd_real_1000=floor,
            agreement=(labels == torch.arange(10).repeat_interleave(100)).float().mean().item())
    return scores


def quality(bench, name):
    """Issues 16, 23, 24 and 26's measure: per training seed, the script's run (run_script), its
    samples scored by every classifier of the data set. The headline: the lowest agreement and the
    highest distance / floor."""
    data, _, classifiers = QUALITY[DATA[name]]
    (xt, _), (xr, _) = data(bench, False), data(bench, True)
    real = xr[torch.randperm(len(xr), generator=torch.Generator().manual_seed(0))[:1000]]
    nets = []  # each with its features of the test images and its floor: 1,000 real images'
    for label, make, seed, goal in classifiers:
        net, accuracy = classifier(bench, DATA[name], label, make, seed)
        if accuracy < goal:
            print(f"warning: classifier {label} reaches {accuracy:.2%} on the test set, under "
                  f"{goal:.0%}; delete out/*_classifier.pt to train it again", file=sys.stderr)
        f_test = classify(net, xt)[1]
        nets.append((label, net, accuracy, f_test, frechet(classify(net, real)[1], f_test)))
    for seed in [int(s) for s in bench.seeds.split(",")]:
        out, seconds = run_script(bench, name, seed)
        samples = read_grid(os.path.join(out, "samples.png"), 10, 100, xt.shape[-1], xt.shape[1])
        scores = score(nets, samples)
        config, ckpt = (json.load(open(os.path.join(out, "config.json"))),
                        torch.load(os.path.join(out, "ckpt.pt"), weights_only=False))
        row = dict(script=name, flags=bench.flags, seed=seed, resampled=bench.resample,
                   iters=config["iters"], batch_size=config["batch_size"], width=config["width"],
                   params_M=sum(v.numel() for v in ckpt["model"].values()) / 1e6,
                   processes=len(ckpt["rng"]), images_seen=ckpt["step"] * config["batch_size"] *
                   config["accum"] * len(ckpt["rng"]), train_s=seconds["train"],
                   sample_s=seconds["sample"],
                   agreement=min(s["agreement"] for s in scores.values()),
                   worst_ratio=max(s["fd_samples"] / s["fd_real_1000"] for s in scores.values()),
                   classifiers=scores, machine=machine(torch.device("cpu")))
        print(json.dumps(row))
        with open(os.path.join(out, "quality.json"), "w") as f:
            json.dump(row, f, indent=2)


def main(argv=None):
    bench = get_args(argv)
    if bench.mnist_quality or bench.cifar_quality:
        for name in ["mnist_ddpm"] if bench.mnist_quality else bench.script or ["cifar_cfg_unet"]:
            quality(bench, name)
        return
    device = torch.device(bench.device)
    dtype = importlib.import_module("mnist_ddpm").amp_dtype(bench.dtype, device)
    peak = matmul_peak(device, dtype)
    print(f"{machine(device)}, {device}: matmul peak {peak / 1e9:.0f} GFLOP/s ({dtype or 'fp32'}), "
          f"batch {bench.batch_size}, torch {torch.__version__}")
    rows = []
    for name in bench.script or SCRIPTS:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(bench_script, name, bench, peak).result())
    print(" | ".join(rows[0]))
    for r in rows:
        print(" | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()))
    with open(bench.out, "w") as f:
        json.dump(dict(machine=machine(device), device=str(device), matmul_peak_gflop_s=peak / 1e9,
                       options=vars(bench), results=rows), f, indent=2)


if __name__ == "__main__":
    main()
