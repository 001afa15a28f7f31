"""Train a class-conditional Diffusion Transformer (DiT, grouped-query attention) on CIFAR-10 with
classifier-free guidance, on one device or many with torchrun, then sample and evaluate it.

    python cifar_dit_ddp.py                                   # train; CIFAR-10 is downloaded into ./data
    torchrun --nproc_per_node=4 cifar_dit_ddp.py              # 4 GPUs: global batch = 4 x --batch-size
    torchrun --nnodes=2 --nproc_per_node=4 --node-rank=0 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 cifar_dit_ddp.py           # two machines (node-rank 1 on the other)
    python cifar_dit_ddp.py --sample --labels 3,5 --cfg 2     # sample from out/cifar_dit_ddp/ckpt.pt
    torchrun --nproc_per_node=4 cifar_dit_ddp.py --eval --ckpt out/cifar_dit_ddp/best.pt --fid 5000 --is

Follows seed 002, "Class-Conditioned Diffusion Model on CIFAR-10" (DiT, GQA, fused time+class token, DDP,
best/periodic checkpoints, timed loss curve, FID/IS evaluation), with the shared command line (SPEC.md).
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from PIL import Image
from tqdm import tqdm

IMAGE_SIZE, CHANNELS, EMB = 32, 3, 128  # EMB: sinusoidal/class embedding size before the seed's MLPs

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="./data", help="where CIFAR-10 lives or is downloaded to")
    g.add_argument("--image-folder", default=None, help="your own images, one sub-folder per class (32x32)")
    g.add_argument("--limit", type=int, default=0, help="use only the first N training images (0: all)")
    g.add_argument("--val-size", type=int, default=1000, help="last N train images (max a tenth) held out for best.pt")
    g.add_argument("--data-on-device", action="store_true", help="keep the uint8 data set on the GPU")
    g = p.add_argument_group("model")
    g.add_argument("--width", "--hidden-dim", type=int, default=384, help="transformer hidden size")
    g.add_argument("--depth", type=int, default=12, help="transformer blocks")
    g.add_argument("--heads", "--num-heads", type=int, default=8, help="query heads")
    g.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA; = --heads is plain MHA)")
    g.add_argument("--patch", type=int, default=4, help="patch size in pixels (4: 64 tokens)")
    g.add_argument("--cond", choices=["token", "adaln"], default="adaln", help="seed's time+class token or adaLN-Zero")
    g = p.add_argument_group("diffusion")
    g.add_argument("--steps", "--num-steps", type=int, default=1000, help="diffusion timesteps T")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="noise schedule")
    g.add_argument("--p-uncond", type=float, default=0.1, help="probability of dropping the class")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", "--num-epochs", type=int, default=40, help="passes over the training set")
    g.add_argument("--iters", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--batch-size", type=int, default=32, help="images per micro-batch per device")
    g.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", "--learning-rate", type=float, default=2e-4, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up, steps")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay (warmed up as (1+n)/(10+n))")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="random seed; runs are repeatable")
    g.add_argument("--log-every", type=int, default=50, help="steps between log.jsonl lines")
    g.add_argument("--sample-every", type=int, default=5000, help="steps between samples_<step>.png grids")
    g.add_argument("--ckpt-every", type=int, default=1000, help="steps between ckpt.pt saves (and each epoch)")
    g.add_argument("--save-every", type=int, default=0, help="also keep ckpt_<step>.pt every N epochs (seed: 40)")
    g.add_argument("--keep", type=int, default=0, help="keep at most K periodic checkpoints (0: all)")
    g.add_argument("--recon-t", type=float, default=0.3, help="reconstruction.png's noise level t0 / T")
    g.add_argument("--resume", action="store_true", help="continue from the run's ckpt.pt")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--sample", action="store_true", help="no training: sample from --ckpt")
    g.add_argument("--eval", action="store_true", help="no training: FID (and --is) of --ckpt")
    g.add_argument("--ckpt", "--checkpoint", default=None, help="checkpoint (default: the run's ckpt.pt)")
    g.add_argument("--labels", default="all", help="comma-separated class indices or names, 'uncond', or 'all'")
    g.add_argument("--n", type=int, default=10, help="samples per label with --sample")
    g.add_argument("--cfg", "--guidance-scale", type=float, default=2.0,
                   help="guidance W: eps_u + W*(eps_c - eps_u); 0 uncond, 1 cond")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddim", help="reverse process")
    g.add_argument("--sample-steps", type=int, default=50, help="steps K of ddim/dpmpp (ddpm uses T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 ancestral")
    g.add_argument("--gif", action="store_true", help="with --sample, also write denoise.gif")
    g.add_argument("--fid", "--num-samples", type=int, default=0, help="FID from N samples against the train set")
    g.add_argument("--is", "--calculate-is", dest="inception", action="store_true", help="also Inception Score")
    g.add_argument("--fid-weights", default="download", help="FID Inception weights: download or a path")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", default="out/cifar_dit_ddp", help="where everything is written")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, else fp32")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument("--tensorboard", action="store_true", help="also log to <out-dir>/tb")
    g.add_argument("--config", default=None, help="a run's config.json to use as defaults")
    args = p.parse_args(argv)
    if args.config:  # a saved config becomes the defaults; flags given on the command line still win
        if not os.path.isfile(args.config):
            die(f"--config: no such file {args.config}")
        modes = ("config", "resume", "sample", "eval")  # a rerun is a new run unless asked
        p.set_defaults(**{k: v for k, v in json.load(open(args.config)).items() if k not in modes})
        args = p.parse_args(argv)
    for flag, ok in [("--steps", args.steps > 0), ("--cfg", args.cfg >= 0), ("--epochs", args.epochs > 0),
                     ("--iters", args.iters >= 0), ("--sample-steps", args.sample_steps > 0), ("--n", args.n > 0),
                     ("--batch-size", args.batch_size > 0), ("--accum", args.accum > 0),
                     ("--p-uncond", 0 <= args.p_uncond < 1), ("--heads", args.width % args.heads == 0),
                     ("--kv-heads", 0 < args.kv_heads <= args.heads and args.heads % args.kv_heads == 0),
                     ("--patch", IMAGE_SIZE % args.patch == 0), ("--recon-t", 0 < args.recon_t < 1),
                     ("--fid", not args.eval or args.fid > 1)]:
        if not ok:
            die(f"{flag} is out of range (see --help)")
    return args

def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)

# ----------------------------------------------------------------------------- data
def get_data(args):
    """The whole training set as uint8 [N, 3, 32, 32] plus labels [N] and the class names."""
    if args.image_folder:
        if not os.path.isdir(args.image_folder):
            die(f"--image-folder: no such folder {args.image_folder}")
        T = torchvision.transforms
        tf = T.Compose([T.Resize(IMAGE_SIZE), T.CenterCrop(IMAGE_SIZE), T.PILToTensor()])
        try:
            ds = torchvision.datasets.ImageFolder(args.image_folder, transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            die(f"--image-folder {args.image_folder}: {e}".splitlines()[0])
        # a folder is sorted by class: mix it once (fixed seed) so --limit and the hold-out see every class
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
        images = torch.stack([ds[i][0] for i in order])
        labels, classes = torch.tensor(ds.targets)[order], ds.classes
    else:
        wait = dist.is_initialized() and int(os.environ.get("LOCAL_RANK", 0)) > 0  # one download per machine:
        if wait:  # the other ranks wait for local rank 0 (which reaches the barrier after its download)
            dist.barrier()
        try:
            ds = torchvision.datasets.CIFAR10(args.data_dir, train=True, download=True)
        except Exception as e:  # no network: say where the files go
            die(f"could not get CIFAR-10 ({type(e).__name__}); put the extracted cifar-10-batches-py folder "
                f"(data_batch_1..5, test_batch, batches.meta) in {args.data_dir}/")
        if dist.is_initialized() and not wait:
            dist.barrier()
        images, labels, classes = torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets), ds.classes
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    return images.contiguous(), labels, classes

def batches(n, batch_size, seed, rank, world, start):
    """Index micro-batches forever, epoch after epoch; the same seed and position give the same batch."""
    sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler))
        for b in range(skip, per_epoch):
            yield idx[b * batch_size:(b + 1) * batch_size]
        epoch, skip = epoch + 1, 0

# ----------------------------------------------------------------------------- model
def timestep_embedding(t, dim):
    """Sinusoidal embedding: [sin(t * f_k), cos(t * f_k)], f_k = 10000^(-k / (dim/2 - 1))."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)

class GQAttention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): `heads` query heads share `kv_heads` key/value
    heads, heads // kv_heads queries per group; kv_heads == heads is ordinary multi-head attention."""

    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * kv_heads * self.hd)  # kv rows: [W_k; W_v]
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv_heads != self.heads)
        return self.proj(h.transpose(1, 2).reshape(B, N, C))

def ada_linear(dim, n):
    """adaLN-Zero's modulation: SiLU, then a linear map to n vectors of size dim, zero at init."""
    lin = nn.Linear(dim, n * dim)
    nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
    return nn.Sequential(nn.SiLU(), lin)

class Block(nn.Module):
    """Pre-norm transformer block. adaLN-Zero (DiT): the condition c gives shift, scale and a gate for
    each branch, x = x + gate * f(norm(x) * (1 + scale) + shift), gates zero at init (identity block)."""

    def __init__(self, dim, heads, kv_heads, adaln):
        super().__init__()
        self.norm1, self.norm2 = (nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6) for _ in range(2))
        self.attn = GQAttention(dim, heads, kv_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = ada_linear(dim, 6) if adaln else None

    def forward(self, x, c):  # without adaLN: shift 0, scale 0, gate 1 (a plain pre-norm block)
        mod = self.ada(c)[:, None].chunk(6, dim=-1) if self.ada is not None else (0, 0, 1) * 2
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)

class DiT(nn.Module):
    """Patchify (p x p patches -> tokens), learned positional embeddings, `depth` blocks, a linear head
    back to p*p*3 noise values per patch. The condition c = MLP(sin(t)) + MLP(class embedding) (the
    seed's 128 -> 400 -> width MLPs; class index n_classes is CFG's null class) enters either as one
    extra token in front of the patches (--cond token, the seed's 65 positions) or by adaLN-Zero."""

    def __init__(self, width=384, depth=12, heads=8, kv_heads=2, patch=4, cond="adaln", n_classes=10):
        super().__init__()
        self.patch, self.grid, self.token = patch, IMAGE_SIZE // patch, cond == "token"
        self.patch_embed = nn.Conv2d(CHANNELS, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid ** 2 + self.token, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(EMB, 400), nn.SiLU(), nn.Linear(400, width))
        self.class_mlp = nn.Sequential(nn.Embedding(n_classes + 1, EMB), nn.Linear(EMB, 400), nn.SiLU(),
                                       nn.Linear(400, width))
        self.blocks = nn.ModuleList([Block(width, heads, kv_heads, not self.token) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, elementwise_affine=self.token, eps=1e-6)
        self.ada = None if self.token else ada_linear(width, 2)
        self.head = nn.Linear(width, patch * patch * CHANNELS)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)  # zero output at init (DiT)

    def forward(self, x, t, y):
        c = self.time_mlp(timestep_embedding(t, EMB)) + self.class_mlp(y)
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, grid^2, width]
        h = torch.cat([c[:, None], h], 1) if self.token else h
        h = h + self.pos
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1) if self.ada is not None else (0, 0)
        h = self.norm(h) * (1 + scale) + shift
        h = self.head(h[:, self.token:])  # drop the condition token; [B, grid^2, p*p*3]
        B, g, p = len(x), self.grid, self.patch
        return h.view(B, g, g, p, p, CHANNELS).permute(0, 5, 1, 3, 2, 4).reshape(B, CHANNELS, g * p, g * p)

# ----------------------------------------------------------------------------- diffusion
def make_betas(schedule, T):
    """Clamped at 0.999 so abar_T > 0 (a short linear schedule would reach beta = 1)."""
    if schedule == "linear":  # Ho et al. (the seed): 1e-4 .. 0.02 at T=1000, scaled so any T ends equally noisy
        betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    else:  # cosine (Nichol & Dhariwal): abar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=0.999)

def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps"""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

def p_losses(model, x0, y, alphas_cumprod, p_uncond, null, t=None, noise=None):
    """E ||eps - eps_theta(x_t, t, y)||^2, y replaced by the null class with probability p_uncond. t, noise
    and the drop are drawn from the CPU generator (saved in the checkpoint) unless given."""
    B, dev = x0.shape[0], x0.device
    t = torch.randint(0, len(alphas_cumprod), (B,)).to(dev) if t is None else t
    noise = torch.randn(x0.shape).to(dev) if noise is None else noise
    y = torch.where(torch.rand(B).to(dev) < p_uncond, torch.full_like(y, null), y)
    return F.mse_loss(model(q_sample(x0, t, noise, alphas_cumprod), t, y).float(), noise)

# ----------------------------------------------------------------------------- sampling
def cfg_denoiser(model, y, w, null):
    """eps(x, t) with classifier-free guidance: eps = eps_u + w * (eps_c - eps_u) (SPEC's convention:
    w=0 unconditional, w=1 conditional), both halves in one doubled batch."""
    if w in (0, 1):  # one half of the batch is enough
        label = y if w == 1 else torch.full_like(y, null)
        return lambda x, t: model(x, t, label).float()

    def eps_fn(x, t):
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]),
                             torch.cat([y, torch.full_like(y, null)])).float().chunk(2)
        return eps_u + w * (eps_c - eps_u)
    return eps_fn

def sample_timesteps(T, steps):
    return torch.linspace(T - 1, 0, steps).round().long().tolist()

def ddim_sample(eps_fn, x, alphas_cumprod, steps, eta, generator=None, path=None, clip=False):
    """DDIM (Song et al.) from x_T on `steps` timesteps. With eta=1 on all T steps this is exactly DDPM's
    ancestral sampler with the posterior variance beta_tilde. Starts at t = len(alphas_cumprod) - 1, so
    alphas_cumprod[:t0 + 1] denoises an x_t0 (reconstruction). clip (images): x0 clamped to [-1, 1] and eps
    recomputed from it; x0 = (x - sqrt(1-abar) eps) / sqrt(abar) multiplies eps errors by up to 1/sqrt(abar)."""
    ts = sample_timesteps(len(alphas_cumprod), steps)
    for i, t in enumerate(tqdm(ts, desc="sampling", leave=False, disable=len(ts) < 50)):
        abar = alphas_cumprod[t]
        abar_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(abar)
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device))
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        # sigma^2 = eta^2 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        if path is not None:
            path.append(x.cpu())
    return x

def dpmpp_sample(eps_fn, x, alphas_cumprod, steps, path=None, clip=False):
    """DPM-Solver++(2M) (Lu et al. 2022) in data prediction, lambda = log(alpha / sigma); the last step,
    to the clean image, is first order. Timesteps are uniform in lambda, from lambda = -5 (below it
    x_t is pure noise) to lambda at t=0."""
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    lam = torch.log(alpha / sigma)
    grid = torch.linspace(max(lam[-1].item(), -5.0), lam[0].item(), steps, device=lam.device)
    ts = sorted({int((lam - g).abs().argmin()) for g in grid}, reverse=True)
    x0_prev, h_prev = None, None
    for i, t in enumerate(tqdm(ts, desc="sampling", leave=False, disable=len(ts) < 50)):
        x0 = (x - sigma[t] * eps_fn(x, torch.full((x.shape[0],), t, device=x.device))) / alpha[t]
        x0 = x0.clamp(-1, 1) if clip else x0  # as in ddim_sample
        if i + 1 == len(ts):
            x = x0
        else:
            s = ts[i + 1]
            h = lam[s] - lam[t]
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)  # (1 + 1/2r) x0 - x0_prev/2r
            x = sigma[s] / sigma[t] * x - alpha[s] * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if path is not None:
            path.append(x.cpu())
    return x

@torch.no_grad()
def generate(model, alphas_cumprod, labels, args, n_classes, seed=0, path=None):
    """Images in [-1, 1] for `labels` (n_classes = unconditional) from fixed seeds, by --sampler."""
    device = alphas_cumprod.device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=g).to(device)
    eps_fn = cfg_denoiser(model, torch.tensor(labels, device=device), args.cfg, n_classes)
    T, K = len(alphas_cumprod), min(args.sample_steps, len(alphas_cumprod))
    if args.sampler == "dpmpp":
        x = dpmpp_sample(eps_fn, x, alphas_cumprod, K, path, clip=True)
    elif args.sampler == "ddim":
        x = ddim_sample(eps_fn, x, alphas_cumprod, K, args.eta, g, path, clip=True)
    else:  # ddpm: DDIM with eta=1 on all T steps
        x = ddim_sample(eps_fn, x, alphas_cumprod, T, 1.0, g, path, clip=True)
    return x.clamp(-1, 1)

def save_grid(x, path, nrow):
    torchvision.utils.save_image(x * 0.5 + 0.5, path, nrow=nrow, padding=1, pad_value=1.0)

def path_figure(path, rows, out):
    """The seed's timestep grid: a row per chosen sample, 10 columns from noise to image."""
    cols = torch.linspace(0, len(path) - 1, min(len(path), 10)).round().long().tolist()
    save_grid(torch.stack([path[c][rows] for c in cols], 1).flatten(0, 1).clamp(-1, 1), out, len(cols))

def save_gif(path, out, nrow):
    frames = torch.linspace(0, len(path) - 1, min(len(path), 50)).round().long().tolist()
    grids = [torchvision.utils.make_grid(path[f].clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=1) for f in frames]
    imgs = [Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()) for grid in grids]
    imgs[0].save(out, save_all=True, append_images=imgs[1:], duration=80, loop=0)

@torch.no_grad()
def reconstruct(model, x0, y, alphas_cumprod, t0, out):
    """Rows: training images, x_t0 = q_sample(x0, t0), and x_t0 denoised back by 50-step DDIM."""
    g = torch.Generator().manual_seed(0)
    xt = q_sample(x0, torch.full((len(x0),), t0, device=x0.device),
                  torch.randn(x0.shape, generator=g).to(x0.device), alphas_cumprod)
    eps_fn = cfg_denoiser(model, y, 1, null=None)  # w=1: conditional, no null class needed
    rec = ddim_sample(eps_fn, xt, alphas_cumprod[:t0 + 1], min(50, t0 + 1), 0.0, clip=True).clamp(-1, 1)
    save_grid(torch.cat([x0, xt.clamp(-1, 1), rec]), out, len(x0))
    return F.mse_loss(rec, x0).item()

# ----------------------------------------------------------------------------- EMA, checkpoints, FID
@torch.no_grad()
def update_ema(ema, model, decay):
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)

def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a broken file."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)

def load_checkpoint(path, device):
    if not os.path.isfile(path):
        die(f"no checkpoint at {path} (train first, or pass --ckpt)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__})")

def build_model(cfg, n_classes=10):
    return DiT(cfg["width"], cfg["depth"], cfg["heads"], cfg["kv_heads"], cfg["patch"], cfg["cond"], n_classes)

def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError:
        die(f"checkpoint {path} does not match this model (--width, --depth, --heads, --kv-heads, --patch, --cond)")

def make_alphas_cumprod(cfg, device):
    return torch.cumprod(1 - make_betas(cfg["schedule"], cfg["steps"]), 0).float().to(device)

def run_fid(args, model, alphas_cumprod, n_classes, ckpt, rank, world):
    """FID (and IS) of args.fid class-balanced samples against the training images; each rank makes and
    measures its share (i = rank, rank + world, ...) and fid.evaluate sums the statistics over ranks."""
    import fid  # only here, so this file runs without fid.py
    images, _, _ = get_data(args)
    if args.fid > len(images):
        die(f"--fid {args.fid} is more than the {len(images)} real images")
    chunks = [c.tolist() for c in torch.arange(rank, args.fid, world).split(250)]  # this rank's sample indices
    real = (images[c].float() / 255 for c in chunks)
    fake = ((generate(model, alphas_cumprod, [j % n_classes for j in c], args, n_classes, seed=args.seed + 1 + c[0])
             + 1) / 2 for c in chunks)
    cache = None if args.image_folder or args.limit else f"{args.data_dir}/fid_stats_cifar10_{args.fid}.npz"
    res = fid.evaluate(fake, real, sum(map(len, chunks)), cache=cache,
                       inception_score=args.inception, weights=args.fid_weights, device=alphas_cumprod.device)
    if rank == 0:  # the seed's keys (the choice over SPEC's fid.json)
        res = dict(num_samples=res["n"], checkpoint=ckpt, fid_score=res["fid"], **{
            k: res[k] for k in ("inception_score_mean", "inception_score_std")})
        json.dump(res, open(os.path.join(args.out_dir, "evaluation_results.json"), "w"), indent=2)
        fake = generate(model, alphas_cumprod, [j % n_classes for j in range(50)], args, n_classes)
        save_grid(torch.cat([images[:50].float().to(fake.device) / 127.5 - 1, fake]),
                  os.path.join(args.out_dir, "real_vs_fake.png"), 10)
        print(f"FID {res['fid_score']:.2f} from {res['num_samples']} samples -> {args.out_dir}/evaluation_results.json")

# ----------------------------------------------------------------------------- training
def setup(args):
    """Device and DistributedDataParallel: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (on any node)."""
    ddp = "RANK" in os.environ
    name = args.device or ("cuda" if torch.cuda.is_available() else
                           "mps" if torch.backends.mps.is_available() else "cpu")
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if name == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if name == "cuda":
            name = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(name)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(name), ddp, rank, world

def autocast(args, device):
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext()

@torch.no_grad()
def val_loss(model, val, alphas_cumprod, args, null, device):
    """Loss of the held-out images on timesteps and noise fixed by seed 0, so calls are comparable (each
    rank computes the same number on the whole, small, held-out set: no communication)."""
    x0, y = val[0].to(device).float() / 127.5 - 1, val[1].to(device)
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=g), torch.randn(x0.shape, generator=g)
    chunks = zip(*(a.split(250) for a in (x0, y, t.to(device), noise.to(device))))
    with autocast(args, device):
        return sum(p_losses(model, xb, yb, alphas_cumprod, 0.0, null, tb, nb).item() * len(xb)
                   for xb, yb, tb, nb in chunks) / len(x0)

def save_run(args, state, ddp, world, master, improved, periodic):
    """ckpt.pt, best.pt when the validation loss improved, ckpt_<step>.pt every --save-every epochs."""
    rng = [torch.get_rng_state()] * world
    if ddp:  # every rank's RNG state (a collective), so each rank's random stream resumes where it was
        dist.all_gather_object(rng, torch.get_rng_state())
    if not master:
        return
    state["rng"] = rng
    names = ["ckpt.pt"] + ["best.pt"] * improved + [f"ckpt_{state['step']}.pt"] * periodic
    for name in names:
        save_checkpoint(os.path.join(args.out_dir, name), state)
    kept = sorted(int(f[5:-3]) for f in os.listdir(args.out_dir) if f.startswith("ckpt_") and f.endswith(".pt"))
    for s in kept[:-args.keep] if args.keep else []:
        os.remove(os.path.join(args.out_dir, f"ckpt_{s}.pt"))

def start_run(args, raw, n_train, n_val, world, per_epoch, device):
    """Rank 0: the output folder, config.json, the TensorBoard writer and the run's first line."""
    os.makedirs(args.out_dir, exist_ok=True)
    json.dump(vars(args), open(os.path.join(args.out_dir, "config.json"), "w"), indent=2)
    print(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, {n_train} train + {n_val} validation "
          f"images, global batch {args.batch_size * world * args.accum} ({args.batch_size} x {world} devices x "
          f"{args.accum} accumulated), {per_epoch} steps/epoch, device {device}")
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        die("--tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(os.path.join(args.out_dir, "tb"))

def write_log(rec, out_dir, writer):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    for k in ("loss", "lr", "img_per_s", "val_loss") if writer else ():
        if rec.get(k) is not None:
            writer.add_scalar(k, rec[k], rec["step"])

def train_step(model, wrapped, opt, idx, images, labels, alphas_cumprod, args, n_classes, ddp, device):
    """One optimizer step over --accum micro-batches; gradients are all-reduced only on the last."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for micro, i in enumerate(idx):
        x0 = images[i].to(device, non_blocking=True).float() / 127.5 - 1
        flip = (torch.rand(len(i)) < 0.5).to(device)  # horizontal flips from the saved CPU generator
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        with wrapped.no_sync() if ddp and micro + 1 < len(idx) else nullcontext():
            with autocast(args, device):
                loss = p_losses(model, x0, labels[i].to(device), alphas_cumprod, args.p_uncond, n_classes)
            (loss / len(idx)).backward()
        total = total + loss.detach() / len(idx)
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), args.grad_clip)
    opt.step()
    return total

def train(args, device, ddp, rank, world):
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    images, labels, classes = get_data(args)
    n_classes, n_val = len(classes), min(args.val_size, len(images) // 10)
    val = images[len(images) - n_val:], labels[len(images) - n_val:]  # held out: the last n_val images
    images, labels = images[:len(images) - n_val], labels[:len(images) - n_val]
    per_epoch = len(images) // world // args.batch_size // args.accum  # optimizer steps per epoch
    if per_epoch == 0:
        die(f"--batch-size {args.batch_size} x --accum {args.accum} is more than the {len(images) // world} "
            f"training images per device")
    images = images.to(device) if args.data_on_device else images
    alphas_cumprod = make_alphas_cumprod(vars(args), device)
    raw = build_model(vars(args), n_classes).to(device)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    step, best = 0, float("inf")
    if args.resume:  # weights, EMA, optimizer, step, best validation loss and this rank's RNG state
        path = os.path.join(args.out_dir, "ckpt.pt")
        ck = load_checkpoint(path, device)
        load_weights(raw, ck["model"], path)
        load_weights(ema, ck["ema"], path)
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"][rank if len(ck["rng"]) == world else 0].cpu())
        step, best = ck["step"], ck["best_val"]
    wrapped = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    model = torch.compile(wrapped) if args.compile else wrapped
    writer = start_run(args, raw, len(images), n_val, world, per_epoch, device) if master else None
    stream = batches(len(images), args.batch_size, args.seed, rank, world, step * args.accum)
    total, losses, t0, t_log, t_epoch = args.iters or args.epochs * per_epoch, [], time.time(), time.time(), time.time()
    pbar = tqdm(range(step, total), initial=step, total=total, disable=not master)
    for step in pbar:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = [next(stream) for _ in range(args.accum)]
        losses.append(train_step(model, wrapped, opt, idx, images, labels, alphas_cumprod, args, n_classes, ddp,
                                 device))
        update_ema(ema, raw, min(args.ema, (1 + step) / (10 + step)))
        done = step + 1
        epoch_end, last = done % per_epoch == 0, done == total
        if done % args.log_every == 0 or epoch_end or last:
            mean_loss = torch.stack(losses).mean()
            if ddp:
                dist.all_reduce(mean_loss)
            rec = dict(step=done, loss=mean_loss.item() / world, lr=lr, elapsed=time.time() - t0,
                       img_per_s=len(losses) * args.batch_size * world * args.accum / (time.time() - t_log))
            if not math.isfinite(rec["loss"]):  # stop before anything is saved: ckpt.pt stays the last good one
                sys.exit(f"loss is {rec['loss']} at step {done}; stopped, the last good ckpt.pt is kept")
            losses, t_log = [], time.time()
            if master:
                pbar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                write_log(rec, args.out_dir, writer)
        improved = False
        if epoch_end or last:  # validation loss of the EMA model, the epoch's time
            vl = val_loss(ema, val, alphas_cumprod, args, n_classes, device) if n_val else None
            improved, best = vl is not None and vl < best, min(best, vl if vl is not None else best)
            if master:
                write_log(dict(step=done, epoch=math.ceil(done / per_epoch), val_loss=vl,
                               epoch_time=time.time() - t_epoch, elapsed=time.time() - t0), args.out_dir, writer)
            t_epoch = time.time()
        if done % args.ckpt_every == 0 or epoch_end or last:
            state = dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=done,
                         config=vars(args), classes=classes, best_val=best)
            periodic = args.save_every and epoch_end and done % (args.save_every * per_epoch) == 0
            save_run(args, state, ddp, world, master, improved, periodic)
        if master and done % args.sample_every == 0 and not last:
            sample_figure(ema, alphas_cumprod, args, n_classes, done, writer)
    if master:
        finish(args, ema, alphas_cumprod, images, labels, n_classes, total, best, writer, device)
    return ema, alphas_cumprod, classes

def sample_figure(ema, alphas_cumprod, args, n_classes, step, writer, trace=None):
    """samples_<step>.png: a row per class and an unconditional row, 10 fixed seeds each."""
    grid = generate(ema, alphas_cumprod, [c for c in range(n_classes + 1) for _ in range(10)], args, n_classes,
                    args.seed, trace)
    save_grid(grid, os.path.join(args.out_dir, f"samples_{step}.png"), 10)
    if writer:
        writer.add_image("samples", torchvision.utils.make_grid(grid * 0.5 + 0.5, nrow=10), step)
    return grid

def finish(args, ema, alphas_cumprod, images, labels, n_classes, step, best, writer, device):
    """The last samples_<step>.png and from it the seed's figures (sample_grid.png: its class rows;
    timestep_grid.png: one sample per class denoising), reconstruction.png, the loss curve, and the
    summary line with the training time."""
    trace = []
    grid = sample_figure(ema, alphas_cumprod, args, n_classes, step, writer, trace)
    n = len(grid) - 10
    save_grid(grid[:n], os.path.join(args.out_dir, "sample_grid.png"), 10)
    path_figure(trace, list(range(0, n, 10)), os.path.join(args.out_dir, "timestep_grid.png"))
    first = [int((labels == c).nonzero()[0]) for c in range(n_classes) if (labels == c).any()]
    x0 = images[first].to(device).float() / 127.5 - 1
    t0 = round(args.recon_t * (args.steps - 1))
    rec = reconstruct(ema, x0, labels[first].to(device), alphas_cumprod, t0,
                      os.path.join(args.out_dir, "reconstruction.png"))
    recs = [json.loads(line) for line in open(os.path.join(args.out_dir, "log.jsonl"))]
    times = [r["epoch_time"] for r in recs if "epoch_time" in r]  # over all resumed parts of the run
    total, n_ep = sum(times), max(len(times), 1)
    plot_loss(args.out_dir, recs, f"training {total / 60:.1f} min, {total / n_ep:.1f} s/epoch ({len(times)} epochs)")
    loss = [r["loss"] for r in recs if "loss" in r][-1]
    print(f"done: {step} steps in {total:.0f}s ({total / n_ep:.1f}s per epoch), loss {loss:.4f}, "
          f"best validation loss {best:.4f}, reconstruction MSE at t={t0} {rec:.4f} -> {args.out_dir}")

def plot_loss(out_dir, recs, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: training_loss.png skipped; the numbers are in {out_dir}/log.jsonl")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation (EMA)")):
        ax.plot(*zip(*[(r["step"], r[key]) for r in recs if r.get(key) is not None]), label=label)
    ax.set(xlabel="step", ylabel="MSE loss", yscale="log", title=title)
    ax.legend()
    fig.savefig(os.path.join(out_dir, "training_loss.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)

# ----------------------------------------------------------------------------- sampling entry point
def parse_labels(text, classes):
    """'all', or comma-separated class indices or names and 'uncond' (the null class, index len(classes))."""
    names = [str(i) for i in range(len(classes))] + ["uncond"]
    if text == "all":
        return list(range(len(names)))
    out = [names.index(s) if s in names else classes.index(s) if s in classes else -1 for s in text.split(",")]
    if -1 in out:
        die(f"--labels: unknown class in {text!r} (use 0-{len(classes) - 1}, a class name, 'uncond' or 'all')")
    return out

def main(argv=None):
    args = get_args(argv)
    device, ddp, rank, world = setup(args)
    path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    if args.sample or args.eval:  # the EMA model of --ckpt, built from the checkpoint's own config
        ck = load_checkpoint(path, device)
        classes = ck["classes"]
        model = build_model(ck["config"], len(classes)).to(device).eval()
        load_weights(model, ck["ema"], path)
        alphas_cumprod = make_alphas_cumprod(ck["config"], device)
        os.makedirs(args.out_dir, exist_ok=True)
    else:
        model, alphas_cumprod, classes = train(args, device, ddp, rank, world)
        path = os.path.join(args.out_dir, "ckpt.pt")
    if args.sample and rank == 0:
        labels = [lab for lab in parse_labels(args.labels, classes) for _ in range(args.n)]
        trace = []
        with autocast(args, device):
            x = generate(model, alphas_cumprod, labels, args, len(classes), args.seed, trace)
        save_grid(x, os.path.join(args.out_dir, "samples.png"), args.n)
        path_figure(trace, list(range(0, len(x), args.n)), os.path.join(args.out_dir, "timestep_grid.png"))
        if args.gif:
            save_gif(trace, os.path.join(args.out_dir, "denoise.gif"), args.n)
        print(f"wrote {len(x)} samples to {args.out_dir}/samples.png")
    if args.fid:
        with autocast(args, device):
            run_fid(args, model, alphas_cumprod, len(classes), path, rank, world)
    if ddp:
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
