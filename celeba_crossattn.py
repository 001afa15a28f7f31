"""Train a diffusion U-Net on faces conditioned on CelebA's 40 attributes through cross-attention (or on
CIFAR-10 / MNIST classes as one-hot tokens), then sample faces with chosen attributes.

    python celeba_crossattn.py                                    # CelebA in ./data/celeba, 64x64
    python celeba_crossattn.py --size 256 --image-dir CelebAMask-HQ/CelebA-HQ-img \\
        --attr-file CelebAMask-HQ/CelebAMask-HQ-attribute-anno.txt  # CelebA-HQ (CelebAMask-HQ's layout)
    python celeba_crossattn.py --dataset cifar10                  # the same model on CIFAR-10 (or mnist)
    python celeba_crossattn.py --sample --attrs "Male,Smiling,-Eyeglasses"  # or --attrs-from 000123.jpg
    python celeba_crossattn.py --sample --fid 10000               # FID against the training images (fid.py)
    torchrun --nproc_per_node=4 celeba_crossattn.py               # several GPUs, DistributedDataParallel

Follows seed 003, "Class Conditional Diffusion" (U-Net with a shared FiLM time projection, multi-hot attribute
cross-attention at the bottleneck, cosine schedule, EMA, bf16) with SPEC.md's command line; it adds
classifier-free guidance (--p-uncond, --cfg); --p-uncond 0 is the seed's setting.
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
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from PIL import Image
from tqdm import tqdm

TOGGLE = "Male,Smiling,Eyeglasses,Blond_Hair,Young,Heavy_Makeup"

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["celeba", "cifar10", "mnist"], default="celeba", help="data set")
    g.add_argument("--data-dir", default="./data", help="holds celeba/img_align_celeba + list_attr_celeba.txt")
    g.add_argument("--image-dir", default=None, help="CelebA-HQ images (CelebAMask-HQ/CelebA-HQ-img)")
    g.add_argument("--attr-file", default=None, help="attribute file for --image-dir (CelebA format)")
    g.add_argument("--image-folder", default=None, help="your own images, one sub-folder per class")
    g.add_argument("--download", action="store_true", help="try torchvision's CelebA download")
    g.add_argument("--size", type=int, default=None, help="image side in px (default 64 celeba, 32 else)")
    g.add_argument("--limit", type=int, default=0, help="use only the first N training images (0: all)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, default=64, help="base channels of the U-Net (levels x1,x2,x2,x4)")
    g.add_argument("--depth", type=int, default=2, help="residual blocks per level (seed: 2)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in residual blocks")
    g = p.add_argument_group("diffusion")
    g.add_argument("--steps", "--timesteps", type=int, default=1000, help="diffusion timesteps T")
    g.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="noise schedule")
    g.add_argument("--p-uncond", type=float, default=0.1, help="probability of null tokens (0: the seed)")
    g = p.add_argument_group("training")
    g.add_argument("--iters", type=int, default=50000, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=32, help="images per step per device")
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up, steps")
    g.add_argument("--ema", type=float, default=0.9999, help="largest EMA decay (warm-up as ema-pytorch)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="random seed; runs are repeatable")
    g.add_argument("--log-every", type=int, default=50, help="steps between log.jsonl lines")
    g.add_argument("--sample-every", type=int, default=2000, help="steps between sample grids")
    g.add_argument("--ckpt-every", type=int, default=1000, help="steps between ckpt.pt saves")
    g.add_argument("--save-every", type=int, default=0, help="also keep ckpt_<step>.pt every N steps")
    g.add_argument("--keep", type=int, default=0, help="keep at most K periodic checkpoints (0: all)")
    g.add_argument("--resume", action="store_true", help="continue from the run's ckpt.pt")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample", action="store_true", help="no training: sample from --ckpt")
    g.add_argument("--ckpt", default=None, help="checkpoint to sample from (default: run's ckpt.pt)")
    g.add_argument("--attrs", default="", help="celeba: 'Male,Smiling,-Eyeglasses'; others follow their frequency")
    g.add_argument("--attrs-from", default=None, help="celeba: copy this image's attribute row (000123.jpg)")
    g.add_argument("--toggle", default=TOGGLE, help="celeba: attributes flipped one per row in toggles.png")
    g.add_argument("--labels", default="all", help="cifar10/mnist: class indices, 'uncond', or 'all'")
    g.add_argument("--n", type=int, default=8, help="samples per row with --sample")
    g.add_argument("--cfg", "--guidance_scale", type=float, default=2.0, help="W: eps_u + W*(eps_c - eps_u)")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddim", help="reverse process")
    g.add_argument("--sample-steps", type=int, default=50, help="steps K of ddim/dpmpp (ddpm uses T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 ancestral")
    g.add_argument("--gif", action="store_true", help="with --sample, also write denoise.gif")
    g.add_argument("--fid", type=int, default=0, help="FID from N samples against the training images")
    g.add_argument("--fid-weights", default="download", help="FID Inception weights: download or a path")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", default="out/celeba_crossattn", help="where everything is written")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, else fp32")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument("--tensorboard", action="store_true", help="also log to <out-dir>/tb")
    g.add_argument("--config", default=None, help="a run's config.json to use as defaults")
    args = p.parse_args(argv)
    if args.config:  # a saved config becomes the defaults; flags given on the command line still win
        if not os.path.isfile(args.config):
            die(f"--config: no such file {args.config}")
        p.set_defaults(**{k: v for k, v in json.load(open(args.config)).items() if k not in ("config", "resume")})
        args = p.parse_args(argv)
    args.size = args.size or (64 if args.dataset == "celeba" and not args.image_folder else 32)
    for flag, ok in [("--steps", args.steps > 0), ("--cfg", args.cfg >= 0), ("--iters", args.iters > 0),
                     ("--sample-steps", args.sample_steps > 0), ("--n", args.n > 0), ("--size", args.size >= 16),
                     ("--batch-size", args.batch_size > 0), ("--p-uncond", 0 <= args.p_uncond < 1)]:
        if not ok:
            die(f"{flag} is out of range (see --help)")
    return args

def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- data

class Images(Dataset):
    """(uint8 [C, size, size] image, condition vector) pairs from files (resized, center-cropped) or memory."""
    def __init__(self, conds, size, files=None, images=None):
        self.conds, self.files, self.images = conds, files, images
        self.tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    def __len__(self):
        return len(self.conds)
    def __getitem__(self, i):
        if self.images is not None:
            return self.images[i], self.conds[i]
        with Image.open(self.files[int(i)]) as im:
            return self.tf(im.convert("RGB")), self.conds[i]

def read_attr_file(path):
    """CelebA's attribute list (a count, the names, '<file> 1 -1 ...' per image) -> names, files, 0/1 [N, n]."""
    try:
        lines = [line.split() for line in open(path) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read attribute file {path} ({type(e).__name__})")
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit() or int(lines[0][0]) != len(lines) - 2:
        die(f"{path}: malformed attribute file (line 1 must be the number of image rows that follow line 2)")
    for i, row in enumerate(lines[2:]):
        if len(row) != len(lines[1]) + 1 or not set(row[1:]) <= {"1", "-1"}:
            die(f"{path}: malformed attribute file at row {i + 3} (want a file name and {len(lines[1])} values 1/-1)")
    return lines[1], [r[0] for r in lines[2:]], torch.tensor([[v == "1" for v in r[1:]] for r in lines[2:]]).float()

def attr_path(args):
    return args.attr_file or os.path.join(args.data_dir, "celeba", "list_attr_celeba.txt")

def celeba_files(args):
    """CelebA's layout under --data-dir (its training partition if list_eval_partition.txt is there), or
    CelebA-HQ through --image-dir and --attr-file -> attribute names, image paths, attributes."""
    root = os.path.join(args.data_dir, "celeba")
    image_dir, attr_file = args.image_dir or os.path.join(root, "img_align_celeba"), attr_path(args)
    where = f"put img_align_celeba/ and list_attr_celeba.txt in {root}"
    if args.download and not args.image_dir:
        try:
            torchvision.datasets.CelebA(args.data_dir, split="all", target_type="attr", download=True)
        except Exception as e:  # its host often refuses the download
            die(f"CelebA download failed ({type(e).__name__}); {where}")
    if not (os.path.isfile(attr_file) and os.path.isdir(image_dir)):
        die(f"no CelebA at {image_dir} + {attr_file}: {where}, or pass --image-dir and --attr-file, or --download")
    names, files, attrs = read_attr_file(attr_file)
    split = os.path.join(root, "list_eval_partition.txt")
    if not args.image_dir and os.path.isfile(split):
        train = {r[0] for r in map(str.split, open(split)) if r[1:] == ["0"]}
        keep = [i for i, f in enumerate(files) if f in train]
        files, attrs = [files[i] for i in keep], attrs[keep]
    missing = sorted(set(files) - set(os.listdir(image_dir)))
    if missing:
        die(f"{len(missing)} images listed in {attr_file} are missing from {image_dir}, e.g. {missing[0]}")
    return names, [os.path.join(image_dir, f) for f in files], attrs

def get_data(args):
    """The training set (Images), the condition names, and 'attrs' (multi-hot) or 'classes' (one-hot)."""
    n = args.limit or None
    if args.image_folder:
        try:
            ds = torchvision.datasets.ImageFolder(args.image_folder)
        except (FileNotFoundError, RuntimeError) as e:
            die(f"--image-folder {args.image_folder}: {e}".splitlines()[0])
        onehot = F.one_hot(torch.tensor(ds.targets[:n]), len(ds.classes)).float()
        return Images(onehot, args.size, files=[f for f, _ in ds.samples[:n]]), ds.classes, "classes"
    if args.dataset == "celeba":
        names, files, attrs = celeba_files(args)
        return Images(attrs[:n], args.size, files=files[:n]), names, "attrs"
    cls = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.MNIST
    try:
        ds = cls(args.data_dir, train=True, download=True)
    except Exception as e:  # no network: say where the files go
        where = "cifar-10-batches-py/" if args.dataset == "cifar10" else "MNIST/raw/ (the four IDX files)"
        die(f"could not get {args.dataset} ({type(e).__name__}); put {where} in {args.data_dir}")
    x = torch.as_tensor(ds.data[:n])
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # MNIST [N, H, W], CIFAR [N, H, W, C]
    x = x if x.shape[-1] == args.size else T.functional.resize(x, [args.size] * 2, antialias=True)
    onehot = F.one_hot(torch.as_tensor(ds.targets[:n]), 10).float()
    return Images(onehot, args.size, images=x), [str(c) for c in ds.classes], "classes"

def batches(n, batch_size, seed, rank, world, start_step):
    """Index batches forever, epoch after epoch; the same seed and step give the same batch."""
    sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler))
        for b in range(skip, per_epoch):
            yield idx[b * batch_size:(b + 1) * batch_size]
        epoch, skip = epoch + 1, 0

def loader(data, args, device, rank, world, step):
    """(uint8 images, conditions) batches from `step` on, decoded by DataLoader workers; the loader's own
    generator leaves the global RNG stream alone, so a resumed run continues exactly."""
    if len(data) // world < args.batch_size:
        die(f"--batch-size {args.batch_size} is larger than the data set ({len(data) // world} images per device)")
    stream = batches(len(data), args.batch_size, args.seed, rank, world, step)
    return iter(DataLoader(data, batch_sampler=stream, num_workers=args.workers, pin_memory=device.type == "cuda",
                           persistent_workers=args.workers > 0, generator=torch.Generator()))


# ----------------------------------------------------------------------------- model

def timestep_embedding(t, dim):
    """Sinusoidal embedding: [sin(t * f_k), cos(t * f_k)], f_k = 10000^(-k / (dim/2 - 1))."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with FiLM, h = norm(h) * (1 + scale) + shift, where (scale, shift) are the first
    `cout` channels of one time projection shared across the U-Net (the seed's sharing); then self-attention."""
    def __init__(self, cin, cout, dropout, attn=False):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout, self.cout = nn.Dropout(dropout), cout
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = Attention(cout) if attn else nn.Identity()
    def forward(self, x, film):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h) * (1 + film[0][:, :self.cout]) + film[1][:, :self.cout]
        return self.attn(self.skip(x) + self.conv2(self.dropout(F.silu(h))))

class Attention(nn.Module):
    """Multi-head attention of a feature map's pixels to themselves or (ctx_dim) to context tokens, residual:
    x + proj(softmax(q k^T / sqrt(d)) v)."""
    def __init__(self, ch, ctx_dim=None, heads=4):
        super().__init__()
        self.heads, self.norm = heads, nn.GroupNorm(8, ch)
        self.q, self.kv, self.proj = nn.Conv2d(ch, ch, 1), nn.Linear(ctx_dim or ch, 2 * ch), nn.Conv2d(ch, ch, 1)
    def forward(self, x, ctx=None):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, self.heads, C // self.heads, H * W).transpose(-1, -2)
        src = h.flatten(2).transpose(1, 2) if ctx is None else ctx  # [B, L, D]
        k, v = self.kv(src).reshape(B, src.shape[1], 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, H*W, C/heads]
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))

class CondTokens(nn.Module):
    """One token per attribute (or class): token_i = off_i + c_i * (on_i - off_i), c in [0, 1]^n, so multi-hot
    attributes and one-hot classes give the same kind of sequence; dropped rows get learned null tokens."""
    def __init__(self, n, dim):
        super().__init__()
        self.on, self.off, self.null = (nn.Parameter(torch.randn(n, dim) * 0.02) for _ in range(3))
    def forward(self, c, drop):
        tokens = self.off + c[:, :, None] * (self.on - self.off)
        return torch.where(drop[:, None, None], self.null.to(tokens.dtype), tokens)

class Upsample(nn.Module):
    """Nearest-neighbour to the skip's size (odd sizes such as MNIST's 7 included), then a 3x3 convolution."""
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))

class UNet(nn.Module):
    """4 levels of `depth` residual blocks (self-attention at the two lower, mid resolutions), strided-conv
    downsampling to size/16; bottleneck: ResBlock, self-attention, cross-attention to the condition tokens,
    ResBlock; the mirrored path up with concatenated skips."""
    def __init__(self, width=64, depth=2, n_cond=40, channels=3, size=64, dropout=0.0, mults=(1, 2, 2, 4)):
        super().__init__()
        chs, ctx_dim = [width * m for m in mults], 4 * width
        self.width, self.shape = width, (channels, size, size)
        self.film = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, 2 * max(chs)))
        self.cond = CondTokens(n_cond, ctx_dim)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [], width
        for i, co in enumerate(chs):
            for _ in range(depth):
                self.down.append(ResBlock(c, co, dropout, attn=i in (2, 3)))
                c = co
                skips.append(c)
            self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid1, self.mid2 = ResBlock(c, c, dropout), ResBlock(c, c, dropout)
        self.self_attn, self.cross_attn = Attention(c), Attention(c, ctx_dim)
        self.up = nn.ModuleList()
        for i, co in reversed(list(enumerate(chs))):
            self.up.append(Upsample(c))
            for _ in range(depth):
                self.up.append(ResBlock(c + skips.pop(), co, dropout, attn=i in (2, 3)))
                c = co
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
    def forward(self, x, t, c, drop):
        film = self.film(timestep_embedding(t, self.width))[:, :, None, None].chunk(2, dim=1)
        h, hs = self.stem(x), []
        for m in self.down:
            h = m(h, film) if isinstance(m, ResBlock) else m(h)
            hs += [h] if isinstance(m, ResBlock) else []
        h = self.mid2(self.cross_attn(self.self_attn(self.mid1(h, film)), self.cond(c, drop)), film)
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], dim=1), film) if isinstance(m, ResBlock) else m(h, hs[-1].shape[-2:])
        return self.out(h)


# ----------------------------------------------------------------------------- diffusion

def make_betas(schedule, T):
    if schedule == "linear":  # Ho et al.: 1e-4 .. 0.02 at T=1000, scaled so any T ends equally noisy
        return torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64).clamp(max=0.999)
    # cosine (Nichol & Dhariwal): abar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)

def alphas_cumprod_of(cfg, device):
    return torch.cumprod(1 - make_betas(cfg["schedule"], cfg["steps"]), 0).float().to(device)

def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps"""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

def p_losses(model, x0, c, alphas_cumprod, p_uncond):
    """Simple DDPM loss ||eps - eps_theta(x_t, t, c)||^2; the condition becomes null tokens with p_uncond."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), device=x0.device)
    noise, drop = torch.randn_like(x0), torch.rand(x0.shape[0], device=x0.device) < p_uncond
    return F.mse_loss(model(q_sample(x0, t, noise, alphas_cumprod), t, c, drop).float(), noise)


# ----------------------------------------------------------------------------- sampling

def cfg_denoiser(model, c, w, drop=None):
    """eps(x, t) with classifier-free guidance, eps = eps_u + w * (eps_c - eps_u) (SPEC: w=0 unconditional, w=1
    conditional), both halves in one doubled batch; rows with drop (null tokens) stay unconditional."""
    drop = torch.zeros(len(c), dtype=torch.bool, device=c.device) if drop is None else drop
    ones = torch.ones_like(drop)
    if w in (0, 1):
        return lambda x, t: model(x, t, c, ones if w == 0 else drop).float()

    def eps_fn(x, t):
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, c]),
                             torch.cat([drop, ones])).float().chunk(2)
        return eps_u + w * (eps_c - eps_u)
    return eps_fn

def sample_timesteps(T, steps):
    return torch.linspace(T - 1, 0, steps).round().long().tolist()

def ddim_sample(eps_fn, x, alphas_cumprod, steps, eta, generator=None, path=None, clip=False):
    """DDIM (Song et al.) from x_T on `steps` timesteps; with eta=1 on all T steps exactly DDPM's ancestral
    sampler (posterior variance beta_tilde). Given alphas_cumprod[:t+1] it starts at t. clip: x0 in [-1, 1]
    (images), eps recomputed from it; near t = T, x0 = (x - sqrt(1-abar) eps) / sqrt(abar) multiplies any error
    of eps by up to 2e4 (cosine: abar(T-1) ~ 2e-9), which would otherwise reach the image."""
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
    """DPM-Solver++(2M) (Lu et al. 2022) in data prediction, lambda = log(alpha / sigma), last step first order;
    timesteps uniform in lambda from -5 (below it x_t is pure noise; cosine reaches -10) to lambda at t=0."""
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    lam = torch.log(alpha / sigma)
    grid = torch.linspace(max(lam[-1].item(), -5.0), lam[0].item(), steps, device=lam.device)
    ts = sorted({int((lam - g).abs().argmin()) for g in grid}, reverse=True)
    x0_prev, h_prev = None, None
    for i, t in enumerate(tqdm(ts, desc="sampling", leave=False, disable=len(ts) < 50)):
        x0 = (x - sigma[t] * eps_fn(x, torch.full((x.shape[0],), t, device=x.device))) / alpha[t]
        x0 = x0.clamp(-1, 1) if clip else x0
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
def generate(model, alphas_cumprod, conds, args, seed=0, path=None, drop=None):
    """Images in [-1, 1] for condition vectors `conds` [N, n] from fixed seeds, x0 clipped: ddpm is DDIM with
    eta=1 on all T steps; ddim K steps with --eta; dpmpp K steps."""
    device, g = alphas_cumprod.device, torch.Generator().manual_seed(seed)
    x = torch.randn((len(conds), *model.shape), generator=g).to(device)
    eps_fn = cfg_denoiser(model, conds.to(device), args.cfg, None if drop is None else drop.to(device))
    T, K = len(alphas_cumprod), min(args.sample_steps, len(alphas_cumprod))
    if args.sampler == "dpmpp":
        x = dpmpp_sample(eps_fn, x, alphas_cumprod, K, path, clip=True)
    elif args.sampler == "ddpm":
        x = ddim_sample(eps_fn, x, alphas_cumprod, T, 1.0, g, path, clip=True)
    else:
        x = ddim_sample(eps_fn, x, alphas_cumprod, K, args.eta, g, path, clip=True)
    return x.clamp(-1, 1)

def preview(model, alphas_cumprod, cfg, conds, args):
    """(grid, row length). Attributes: row 0 from `conds` (the first 8), row k the same seeds with the k-th --toggle
    attribute flipped (c -> 1 - c). Classes: one row per class, plus an unconditional one if trained with nulls."""
    names = cfg["classes"]
    if cfg["kind"] == "classes":
        text = ",".join(map(str, range(len(names)))) + (",uncond" if cfg["p_uncond"] > 0 else "")
        conds, drop = label_conds(text, len(names), 10)
        return generate(model, alphas_cumprod, conds, args, args.seed, drop=drop), 10
    conds = conds[:8]
    rows = [conds] + [torch.where(torch.arange(len(names)) == attr_index(s, names, "--toggle"), 1 - conds, conds)
                      for s in args.toggle.split(",") if s]
    return torch.cat([generate(model, alphas_cumprod, r, args, args.seed) for r in rows]), len(conds)

@torch.no_grad()
def reconstruct_grid(model, alphas_cumprod, x0, conds, args, fracs=(0.5, 0.75, 1.0)):
    """Row 0: real images; then DDIM from x_t = q_sample(x0, t), t = frac * (T-1), conditioned on their own
    attributes: how much of each image the model knows (t = T-1 starts from pure noise)."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed)).to(x0.device)
    rows, eps_fn = [x0], cfg_denoiser(model, conds, args.cfg)
    for t in [round(f * (len(alphas_cumprod) - 1)) for f in fracs]:
        xt = q_sample(x0, torch.full((len(x0),), t, device=x0.device), noise, alphas_cumprod)
        rows.append(ddim_sample(eps_fn, xt, alphas_cumprod[:t + 1], args.sample_steps, 0.0, clip=True).clamp(-1, 1))
    return torch.cat(rows)

def save_grid(x, path, nrow):
    torchvision.utils.save_image(x * 0.5 + 0.5, path, nrow=nrow, padding=1, pad_value=1.0)

def save_gif(path, out, nrow):
    """One frame per sampler step (at most 50), the whole grid in each."""
    frames = torch.linspace(0, len(path) - 1, min(len(path), 50)).round().long().tolist()
    grids = [torchvision.utils.make_grid(path[f].clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=1) for f in frames]
    imgs = [Image.fromarray(g.mul(255).round().byte().permute(1, 2, 0).numpy()) for g in grids]
    imgs[0].save(out, save_all=True, append_images=imgs[1:], duration=80, loop=0)


# ----------------------------------------------------------------------------- EMA, checkpoints, FID

@torch.no_grad()
def update_ema(ema, model, step, args):
    """ema-pytorch's warm-up, decay = 1 - (1 + step / inv_gamma) ** -power clamped to [0, --ema], with its
    defaults inv_gamma = 1, power = 2/3 (0.99 at step 1000, 0.999 at 31k)."""
    decay = min(max(1 - (1 + step) ** (-2 / 3), 0.0), args.ema)
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)

def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a broken file."""
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)

def load_checkpoint(path, device):
    if not os.path.isfile(path):
        die(f"no checkpoint at {path} (train first, or pass --ckpt)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__})")

def build_model(cfg):
    return UNet(cfg["width"], cfg["depth"], len(cfg["classes"]), cfg["channels"], cfg["size"], cfg["dropout"])

def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError:
        die(f"checkpoint {path} does not match this model (check --width, --depth, --size, --dataset)")

def run_fid(args, model, alphas_cumprod, cfg, rank, world):
    """FID of --fid samples conditioned on the attributes (classes) of as many training images, against those
    images (cycled when fewer); each rank makes its share."""
    try:
        import fid  # only here, so this file runs without fid.py
    except ImportError:
        die("--fid needs fid.py from this collection next to the script")
    data, _, _ = get_data(argparse.Namespace(**cfg))
    idx = [j % len(data) for j in range(rank, args.fid, world)]
    parts = [idx[i:i + 250] for i in range(0, len(idx), 250)]
    real = (torch.stack([data[i][0] for i in part]).float() / 255 for part in parts)
    fake = ((generate(model, alphas_cumprod, data.conds[part], args, args.seed + k + 1) + 1) / 2
            for k, part in enumerate(parts))
    res = fid.evaluate(fake, real, len(idx), weights=args.fid_weights, device=alphas_cumprod.device)
    if rank == 0:
        res.update(sampler=args.sampler, sample_steps=args.sample_steps, cfg=args.cfg, real="training images")
        json.dump(res, open(os.path.join(args.out_dir, "fid.json"), "w"), indent=2)
        print(f"FID {res['fid']:.2f} from {args.fid} samples -> {args.out_dir}/fid.json")


# ----------------------------------------------------------------------------- training

def setup(args):
    """Device and DistributedDataParallel: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
    ddp, rank, world = "RANK" in os.environ, 0, 1
    name = args.device or ("cuda" if torch.cuda.is_available() else
                           "mps" if torch.backends.mps.is_available() else "cpu")
    if ddp:
        dist.init_process_group("nccl" if name == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        name = f"cuda:{os.environ['LOCAL_RANK']}" if name == "cuda" else name
        if name.startswith("cuda"):
            torch.cuda.set_device(name)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(name), ddp, rank, world

def autocast(args, device):
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext()

def train(args, device, ddp, rank, world):
    master, cfg, out = rank == 0, vars(args), lambda name: os.path.join(args.out_dir, name)
    torch.manual_seed(args.seed + rank)
    data, args.classes, args.kind = get_data(args)
    args.channels, args.freq = data[0][0].shape[0], data.conds.mean(0).tolist()
    alphas_cumprod = alphas_cumprod_of(cfg, device)
    raw = build_model(cfg).to(device).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    step = 0
    if args.resume:  # weights, EMA, optimizer, step and this rank's RNG state
        ck = load_checkpoint(out("ckpt.pt"), device)
        load_weights(raw, ck["model"], out("ckpt.pt"))
        load_weights(ema, ck["ema"], out("ckpt.pt"))
        opt.load_state_dict(ck["opt"])
        step, rng = ck["step"], ck["rng"]
        torch.set_rng_state(rng[rank].cpu() if len(rng) == world else rng[0].cpu())
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    model = torch.compile(model) if args.compile else model
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        json.dump(cfg, open(out("config.json"), "w"), indent=2)
        print(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, {len(data)} images, "
              f"global batch {args.batch_size * world}, device {device}")
    writer, log = (tensorboard_writer(args), open(out("log.jsonl"), "a")) if master else (None, None)
    stream = loader(data, args, device, rank, world, step)
    loss_sum, n_loss, t0, t_log = torch.zeros((), device=device), 0, time.time(), time.time()
    pbar = tqdm(range(step, args.iters), initial=step, total=args.iters, disable=not master)
    for step in pbar:
        x0, c = next(stream)
        x0 = (x0.to(device, non_blocking=True).float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(args, device):
            loss = p_losses(model, x0, c.to(device, non_blocking=True), alphas_cumprod, args.p_uncond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        opt.step()
        update_ema(ema, raw, step, args)
        loss_sum, n_loss, done = loss_sum + loss.detach(), n_loss + 1, step + 1
        save = done % args.ckpt_every == 0 or done == args.iters
        if done % args.log_every == 0 or save:
            if ddp:
                dist.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / n_loss / world
            if not math.isfinite(mean_loss):  # stop before anything is saved; ckpt.pt stays the last good one
                sys.exit(f"loss is {mean_loss} at step {done}; stopped, {out('ckpt.pt')} left as it was")
            ips = n_loss * args.batch_size * world / (time.time() - t_log)
            rec = dict(step=done, loss=mean_loss, lr=lr, img_per_s=ips, elapsed=time.time() - t0)
            loss_sum, n_loss, t_log = torch.zeros((), device=device), 0, time.time()
            if master:
                pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
                log.write(json.dumps(rec) + "\n")
                log.flush()
                for k in ("loss", "lr", "img_per_s") if writer else ():
                    writer.add_scalar(k, rec[k], done)
        if save:
            rng = [torch.get_rng_state()] * world  # every rank's, so a resumed run continues each rank's stream
            if ddp:
                dist.all_gather_object(rng, rng[0])
            state = dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=done,
                         config=cfg, rng=rng)
            if master:
                save_checkpoint(out("ckpt.pt"), state)
            if master and args.save_every and done % args.save_every == 0:
                save_checkpoint(out(f"ckpt_{done}.pt"), state)
                periodic = [f for f in os.listdir(args.out_dir) if f.startswith("ckpt_") and f.endswith(".pt")]
                if args.keep:  # only the newest --keep periodic checkpoints stay
                    for f in sorted(periodic, key=lambda f: int(f[5:-3]))[:-args.keep]:
                        os.remove(out(f))
        if master and (done % args.sample_every == 0 or done == args.iters):
            with autocast(args, device):
                grid, nrow = preview(ema, alphas_cumprod, cfg, data.conds, args)
            save_grid(grid, out(f"samples_{done}.png"), nrow)
            if writer:
                writer.add_image("samples", torchvision.utils.make_grid(grid * 0.5 + 0.5, nrow=nrow), done)
    if master:
        x0 = torch.stack([data[i][0] for i in range(min(8, len(data)))]).float().to(device) / 127.5 - 1
        with autocast(args, device):
            save_grid(reconstruct_grid(ema, alphas_cumprod, x0, data.conds[:len(x0)].to(device), args),
                      out("reconstruct.png"), len(x0))
        print(f"done: {args.iters} steps in {time.time() - t0:.0f}s -> {args.out_dir}")
    return ema, alphas_cumprod, cfg

def tensorboard_writer(args):
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        die("--tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(os.path.join(args.out_dir, "tb"))


# ----------------------------------------------------------------------------- sampling entry point

def attr_index(name, names, flag):
    if name not in names:
        die(f"{flag}: unknown attribute {name!r} (known: {', '.join(names)})")
    return names.index(name)

def attr_conds(args, cfg):
    """--n condition rows: unnamed attributes drawn with their data-set frequency (or copied from the
    --attrs-from image's row), then those in --attrs set: 'Smiling' on, '-Eyeglasses' off."""
    g = torch.Generator().manual_seed(args.seed)
    conds = torch.bernoulli(torch.tensor(cfg["freq"]).expand(args.n, -1), generator=g)
    if args.attrs_from:
        path = attr_path(args if args.attr_file else argparse.Namespace(**cfg))
        _, files, attrs = read_attr_file(path)
        if args.attrs_from not in files:
            die(f"--attrs-from: {args.attrs_from} is not listed in {path}")
        conds = attrs[files.index(args.attrs_from)].expand(args.n, -1).clone()
    for s in filter(None, (s.strip() for s in args.attrs.split(","))):
        conds[:, attr_index(s.lstrip("+-"), cfg["classes"], "--attrs")] = float(not s.startswith("-"))
    return conds

def label_conds(text, n_cond, n):
    """One-hot rows for --labels ('3,uncond', 'all'), n each; 'uncond' rows are dropped to the null tokens."""
    parts = list(map(str, range(n_cond))) + ["uncond"] if text == "all" else [s.strip() for s in text.split(",")]
    bad = [s for s in parts if s != "uncond" and not (s.isdigit() and int(s) < n_cond)]
    if bad:
        die(f"--labels: unknown class {bad[0]!r} (use 0-{n_cond - 1}, 'uncond' or 'all')")
    labels = torch.tensor([n_cond if s == "uncond" else int(s) for s in parts]).repeat_interleave(n)
    return F.one_hot(labels.clamp(max=n_cond - 1), n_cond).float(), labels == n_cond

def sample_main(args, device):
    """samples.png (and denoise.gif) for --attrs or --labels, and for attributes toggles.png, with the EMA model."""
    path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    ck = load_checkpoint(path, device)
    cfg, model = ck["config"], build_model(ck["config"]).to(device).eval()
    load_weights(model, ck["ema"], path)
    alphas_cumprod, attrs, trace = alphas_cumprod_of(cfg, device), cfg["kind"] == "attrs", []
    conds, drop = (attr_conds(args, cfg), None) if attrs else label_conds(args.labels, len(cfg["classes"]), args.n)
    os.makedirs(args.out_dir, exist_ok=True)
    with autocast(args, device):
        x = generate(model, alphas_cumprod, conds, args, args.seed, trace, drop)
        save_grid(x, os.path.join(args.out_dir, "samples.png"), args.n)
        if args.gif:
            save_gif(trace, os.path.join(args.out_dir, "denoise.gif"), args.n)
        if attrs:
            grid, nrow = preview(model, alphas_cumprod, cfg, conds, args)
            save_grid(grid, os.path.join(args.out_dir, "toggles.png"), nrow)
    print(f"wrote {len(x)} samples (step {ck['step']}) to {args.out_dir}/samples.png")
    return model, alphas_cumprod, cfg

def main(argv=None):
    args = get_args(argv)
    device, ddp, rank, world = setup(args)
    if args.sample:
        model, alphas_cumprod, cfg = sample_main(args, device)
    else:
        model, alphas_cumprod, cfg = train(args, device, ddp, rank, world)
    if args.fid:
        run_fid(args, model, alphas_cumprod, cfg, rank, world)
    if ddp:
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
