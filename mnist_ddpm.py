"""Train a class-conditional DDPM with classifier-free guidance on MNIST (or a plain DDPM with
--uncond), then sample from it by class or, with CLIP, from a text prompt.

    python mnist_ddpm.py                                  # train; MNIST is downloaded into ./data
    python mnist_ddpm.py --uncond                         # plain unconditional DDPM (the seed's Task 1)
    python mnist_ddpm.py --sample --labels 3,7 --cfg 3    # sample from out/mnist_ddpm/ckpt.pt
    python mnist_ddpm.py --sample --clip-prompt "two"     # CLIP-guided (pip install open_clip_torch)
    python mnist_ddpm.py --sample --fid 10000             # FID against the MNIST test set (fid.py)
    torchrun --nproc_per_node=4 mnist_ddpm.py             # several GPUs, DistributedDataParallel

Follows seed 004, "Diffusion Models: From Theory to Text-Guided Generation" (DDPM, class-conditional
DDPM, CLIP-guided sampling), with the collection's shared command line (SPEC.md).
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

IMAGE_SIZE, CHANNELS = 28, 1


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="./data", help="where MNIST lives or is downloaded to")
    g.add_argument("--image-folder", default=None, help="your own images, one sub-folder per class")
    g.add_argument("--limit", type=int, default=0, help="use only the first N training images (0: all)")
    g.add_argument("--data-on-device", action="store_true", help="keep the uint8 data set on the GPU")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, default=32, help="base channels of the U-Net")
    g.add_argument("--depth", type=int, default=2, help="residual blocks per resolution")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in residual blocks")
    g.add_argument("--uncond", action="store_true", help="plain DDPM without labels (seed Task 1)")
    g = p.add_argument_group("diffusion")
    g.add_argument("--steps", "--timesteps", type=int, default=1000, help="diffusion timesteps T")
    g.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="noise schedule")
    g.add_argument("--p-uncond", type=float, default=0.1, help="probability of dropping the label")
    g = p.add_argument_group("training")
    g.add_argument("--iters", type=int, default=1500, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=64, help="images per step per device")
    g.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up, steps")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay (warmed up as (1+n)/(10+n))")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="random seed; runs are repeatable")
    g.add_argument("--log-every", type=int, default=50, help="steps between log.jsonl lines")
    g.add_argument("--sample-every", type=int, default=1000, help="steps between sample grids")
    g.add_argument("--ckpt-every", type=int, default=500, help="steps between ckpt.pt saves")
    g.add_argument("--save-every", type=int, default=0, help="also keep ckpt_<step>.pt every N steps")
    g.add_argument("--keep", type=int, default=0, help="keep at most K periodic checkpoints (0: all)")
    g.add_argument("--resume", action="store_true", help="continue from the run's ckpt.pt")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample", action="store_true", help="no training: sample from --ckpt")
    g.add_argument("--ckpt", default=None, help="checkpoint to sample from (default: run's ckpt.pt)")
    g.add_argument("--labels", default="all", help="comma-separated digits, 'uncond', or 'all'")
    g.add_argument("--n", type=int, default=10, help="samples per label with --sample")
    g.add_argument("--cfg", "--guidance_scale", type=float, default=2.0,
                   help="guidance W: eps_u + W*(eps_c - eps_u); 0 uncond, 1 cond")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddim", help="reverse process")
    g.add_argument("--sample-steps", type=int, default=50, help="steps K of ddim/dpmpp (ddpm uses T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 ancestral")
    g.add_argument("--gif", action="store_true", help="with --sample, also write denoise.gif")
    g.add_argument("--fid", type=int, default=0, help="FID from N samples against the test set")
    g.add_argument("--fid-weights", default="download", help="FID Inception weights: download or a path")
    g.add_argument("--clip-prompt", default=None, help="CLIP-guided sampling toward this text")
    g.add_argument("--clip-scale", type=float, default=2.0, help="CLIP guidance scale (seed: 2.0)")
    g.add_argument("--clip-steps", type=int, default=5, help="CLIP gradient steps per timestep")
    g.add_argument("--clip-lr", type=float, default=0.15, help="CLIP gradient step size")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", default="out/mnist_ddpm", help="where everything is written")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast dtype; auto is bf16 on CUDA, fp32 elsewhere")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument("--tensorboard", action="store_true", help="also log to <out-dir>/tb")
    g.add_argument("--config", default=None, help="a run's config.json to use as defaults")
    args = p.parse_args(argv)
    if args.config:  # a saved config becomes the defaults; flags given on the command line still win
        if not os.path.isfile(args.config):
            die(f"--config: no such file {args.config}")
        p.set_defaults(**{k: v for k, v in json.load(open(args.config)).items() if k != "config"})
        args = p.parse_args(argv)
    for flag, ok in [("--steps", args.steps > 0), ("--cfg", args.cfg >= 0), ("--iters", args.iters > 0),
                     ("--sample-steps", args.sample_steps > 0), ("--n", args.n > 0),
                     ("--batch-size", args.batch_size > 0), ("--p-uncond", 0 <= args.p_uncond < 1)]:
        if not ok:
            die(f"{flag} is out of range (see --help)")
    return args


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- data

def get_data(args, train=True):
    """The whole data set as uint8 [N, 1, 28, 28] plus labels [N] and the class names."""
    if args.image_folder:
        if not os.path.isdir(args.image_folder):
            die(f"--image-folder: no such folder {args.image_folder}")
        tf = torchvision.transforms.Compose([torchvision.transforms.Grayscale(1),
                                             torchvision.transforms.Resize(IMAGE_SIZE),
                                             torchvision.transforms.CenterCrop(IMAGE_SIZE),
                                             torchvision.transforms.PILToTensor()])
        try:
            ds = torchvision.datasets.ImageFolder(args.image_folder, transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            die(f"--image-folder {args.image_folder}: {e}".splitlines()[0])
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))  # folders list class by class
        images = torch.stack([ds[i][0] for i in order])
        labels, classes = torch.tensor(ds.targets)[order], ds.classes
    else:
        try:
            ds = torchvision.datasets.MNIST(args.data_dir, train=train, download=True)
        except Exception as e:  # no network: say where the files go
            die(f"could not get MNIST ({e}); put train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte in {args.data_dir}/MNIST/raw/")
        images, labels, classes = ds.data[:, None], ds.targets, [str(i) for i in range(10)]
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    return images, labels, classes


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


# ----------------------------------------------------------------------------- model

def timestep_embedding(t, dim):
    """Sinusoidal embedding: [sin(t * f_k), cos(t * f_k)], f_k = 10000^(-k / (dim/2 - 1))."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding enters by FiLM: h = norm(h) * (1 + scale) + shift."""

    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, added residually."""

    def __init__(self, ch, heads=4):
        super().__init__()
        self.heads, self.norm = heads, nn.GroupNorm(8, ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """28 -> 14 -> 7 U-Net: residual blocks, attention at the 7x7 bottleneck, skips concatenated.
    The label embedding (index n_classes is the null label of CFG) is added to the time embedding."""

    def __init__(self, width=32, depth=2, mults=(1, 2, 2), n_classes=10, dropout=0.0):
        super().__init__()
        emb_dim, chs = 4 * width, [width * m for m in mults]
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(n_classes + 1, emb_dim) if n_classes else None
        self.stem = nn.Conv2d(CHANNELS, width, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [width], width
        for i, co in enumerate(chs):
            for _ in range(depth):
                self.down.append(ResBlock(c, co, emb_dim, dropout))
                c = co
                skips.append(c)
            if i < len(chs) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), Attention(c),
                                  ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, co in reversed(list(enumerate(chs))):
            for _ in range(depth + 1):
                self.up.append(ResBlock(c + skips.pop(), co, emb_dim, dropout))
                c = co
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)))
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, CHANNELS, 3, padding=1))

    def forward(self, x, t, y=None):
        emb = self.time_mlp(timestep_embedding(t, self.width))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        h = self.stem(x)
        hs = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        for m in self.mid:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(m, ResBlock) else m(h)
        return self.out(h)


# ----------------------------------------------------------------------------- diffusion

def make_betas(schedule, T):
    if schedule == "linear":  # Ho et al.: 1e-4 .. 0.02 at T=1000, scaled so any T ends equally noisy
        return torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64).clamp(max=0.999)
    # cosine (Nichol & Dhariwal): abar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps"""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def p_losses(model, x0, y, alphas_cumprod, p_uncond, null):
    """Simple DDPM loss ||eps - eps_theta(x_t, t, y)||^2; labels dropped to `null` with p_uncond."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    if y is not None and p_uncond > 0:
        y = torch.where(torch.rand(y.shape, device=y.device) < p_uncond, null, y)
    return F.mse_loss(model(q_sample(x0, t, noise, alphas_cumprod), t, y).float(), noise)


# ----------------------------------------------------------------------------- sampling

def cfg_denoiser(model, y, w, null):
    """eps(x, t) with classifier-free guidance: eps = eps_u + w * (eps_c - eps_u) (SPEC's convention:
    w=0 unconditional, w=1 conditional), both halves in one doubled batch."""
    if y is None or w in (0, 1):  # one half is enough: w=1 is eps_c, w=0 is eps_u
        y = y if y is None or w == 1 else torch.full_like(y, null)
        return lambda x, t: model(x, t, y).float()

    def eps_fn(x, t):
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]),
                             torch.cat([y, torch.full_like(y, null)])).float().chunk(2)
        return eps_u + w * (eps_c - eps_u)
    return eps_fn


def sample_timesteps(T, steps):
    return torch.linspace(T - 1, 0, steps).round().long().tolist()


def ddim_sample(eps_fn, x, alphas_cumprod, steps, eta, generator=None, path=None, guide=None, clip=False):
    """DDIM (Song et al.) from x_T on `steps` timesteps. With eta=1 on all T steps this is exactly DDPM's
    ancestral sampler with the posterior variance beta_tilde. `guide(mean, t)` may steer each mean.
    clip (images): x0 clamped to [-1, 1] and eps recomputed from it; near t=T, x0 = (x - sqrt(1-abar) eps)
    / sqrt(abar) multiplies any error of eps by up to 2e4 (cosine: abar(T-1) ~ 2e-9)."""
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
        if guide is not None:
            x = guide(x, t)
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        if path is not None:
            path.append(x.cpu())
    return x


def dpmpp_sample(eps_fn, x, alphas_cumprod, steps, path=None, clip=False):
    """DPM-Solver++(2M) (Lu et al. 2022) in data prediction, lambda = log(alpha / sigma); the last step,
    to the clean image, is first order. Timesteps are uniform in lambda, from lambda = -5 (below it
    x_t is pure noise; the cosine schedule reaches -10, which would waste steps) to lambda at t=0."""
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


def clip_guide(encode_image, encode_text, prompt, scale, steps, lr):
    """The seed's CLIP guidance: at each timestep take `steps` gradient steps of size lr * scale on
    1 - cos(encode_image(mean), encode_text(prompt)) before the noise is added."""
    with torch.enable_grad():
        text = F.normalize(encode_text([prompt]).float(), dim=-1).detach()

    def guide(x, t):
        for _ in range(steps):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                loss = (1 - (F.normalize(encode_image(x).float(), dim=-1) * text).sum(-1)).sum()
                x = x - lr * scale * torch.autograd.grad(loss, x)[0]
        return x.detach()
    return guide


def load_clip(device):
    """The seed's CLIP ViT-B/32 (open_clip) encoders; images in [-1, 1] are upsampled to 224, grey to
    RGB and CLIP-normalised."""
    try:
        import open_clip
    except ImportError:
        die("--clip-prompt needs open_clip: pip install open_clip_torch")
    model = open_clip.create_model_and_transforms("ViT-B-32", pretrained="openai")[0]
    model = model.to(device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    mean = torch.tensor([0.4815, 0.4578, 0.4082], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.2686, 0.2613, 0.2758], device=device).view(1, 3, 1, 1)

    def encode_image(x):
        x = F.interpolate((x + 1) / 2, size=224, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        return model.encode_image((x - mean) / std)
    return encode_image, lambda prompts: model.encode_text(tokenizer(prompts).to(device))


@torch.no_grad()  # not inference_mode: CLIP guidance needs gradients inside
def generate(model, alphas_cumprod, labels, args, n_classes, seed=0, path=None, guide=None):
    """Images in [-1, 1] for `labels` (n_classes = unconditional) from fixed seeds, by args.sampler:
    ddpm is DDIM with eta=1 on all T steps, ddim and dpmpp take args.sample_steps."""
    device, T = alphas_cumprod.device, len(alphas_cumprod)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=g).to(device)
    y = torch.tensor(labels, device=device) if n_classes else None
    eps_fn = cfg_denoiser(model, y, args.cfg, n_classes)
    if args.sampler == "dpmpp":
        x = dpmpp_sample(eps_fn, x, alphas_cumprod, min(args.sample_steps, T), path, clip=True)
    else:
        steps, eta = (T, 1.0) if args.sampler == "ddpm" else (min(args.sample_steps, T), args.eta)
        x = ddim_sample(eps_fn, x, alphas_cumprod, steps, eta, g, path, guide, clip=True)
    return x.clamp(-1, 1)


def save_grid(x, path, nrow):
    torchvision.utils.save_image(x * 0.5 + 0.5, path, nrow=nrow, padding=1, pad_value=1.0)


def path_figure(path, out):
    """A path of batches as a figure: a row per sample (at most 10), up to 10 columns along the path."""
    cols = torch.linspace(0, len(path) - 1, min(len(path), 10)).round().long().tolist()
    save_grid(torch.stack([path[c][:10] for c in cols], 1).flatten(0, 1).clamp(-1, 1), out, len(cols))


def save_gif(path, out, nrow):
    frames = torch.linspace(0, len(path) - 1, min(len(path), 50)).round().long().tolist()
    imgs = []
    for f in frames:
        grid = torchvision.utils.make_grid(path[f].clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=1)
        imgs.append(Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()))
    imgs[0].save(out, save_all=True, append_images=imgs[1:], duration=80, loop=0)


def forward_figure(images, alphas_cumprod, out):
    """The forward process q(x_t | x_0) on a few real digits, t from 0 to T-1."""
    x0 = images[:6].float().cpu() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    ts = torch.linspace(0, len(alphas_cumprod) - 1, 10).round().long()
    path_figure([q_sample(x0, t.repeat(len(x0)), noise, alphas_cumprod.cpu().float()) for t in ts], out)


# ----------------------------------------------------------------------------- EMA, checkpoints, FID

@torch.no_grad()
def update_ema(ema, model, decay):
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
    return UNet(cfg["width"], cfg["depth"], n_classes=0 if cfg["uncond"] else len(cfg["classes"]),
                dropout=cfg["dropout"])


def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError:
        die(f"checkpoint {path} does not match this model (check --width, --depth, --uncond)")


def make_alphas_cumprod(cfg, device):
    return torch.cumprod(1 - make_betas(cfg["schedule"], cfg["steps"]), 0).float().to(device)


def run_fid(args, model, alphas_cumprod, n_classes, rank, world):
    """FID of args.fid class-balanced samples against the MNIST test set; each rank makes its share."""
    import fid  # only here, so this file runs without fid.py
    images, _, _ = get_data(args, train=False)
    mine = list(range(rank, args.fid, world))
    chunks = [mine[i:i + 250] for i in range(0, len(mine), 250)]
    real = (images[c].float() / 255 for c in chunks)
    fake = ((generate(model, alphas_cumprod, [j % max(n_classes, 1) for j in c], args, n_classes,
                      seed=args.seed + 1 + c[0]) + 1) / 2 for c in chunks)
    src = "folder" if args.image_folder else "mnist-test"
    cache = None if args.image_folder else os.path.join(args.data_dir, f"fid_stats_{src}_{IMAGE_SIZE}_{args.fid}.npz")
    res = fid.evaluate(fake, real, len(mine), cache=cache, weights=args.fid_weights, device=alphas_cumprod.device)
    if rank == 0:
        res.update(sampler=args.sampler, sample_steps=args.sample_steps, cfg=args.cfg, real=src)
        json.dump(res, open(os.path.join(args.out_dir, "fid.json"), "w"), indent=2)
        fake = generate(model, alphas_cumprod, [j % max(n_classes, 1) for j in range(50)], args, n_classes)
        save_grid(torch.cat([images[:50].float().to(fake.device) / 127.5 - 1, fake]),
                  os.path.join(args.out_dir, "real_vs_fake.png"), 10)
        print(f"FID {res['fid']:.2f} from {args.fid} samples -> {args.out_dir}/fid.json")


# ----------------------------------------------------------------------------- training

def setup(args):
    """Device and DistributedDataParallel: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
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


def resume(path, raw, ema, opt, device, rank, world):
    """Weights, EMA, optimizer, step and this rank's RNG state: the run continues as if never stopped."""
    ck = load_checkpoint(path, device)
    load_weights(raw, ck["model"], path)
    load_weights(ema, ck["ema"], path)
    opt.load_state_dict(ck["opt"])
    torch.set_rng_state(ck["rng"][rank if len(ck["rng"]) == world else 0].cpu())
    return ck["step"]


def save_run(args, raw, ema, opt, done, ddp, world, master):
    rng = [torch.get_rng_state()] * world
    if ddp:  # every rank's RNG state, so each rank's random stream resumes where it was
        dist.all_gather_object(rng, torch.get_rng_state())
    if not master:
        return
    state = dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=done,
                 config=vars(args), rng=rng)
    save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), state)
    if args.save_every and done % args.save_every == 0:
        save_checkpoint(os.path.join(args.out_dir, f"ckpt_{done}.pt"), state)
        kept = sorted(int(f[5:-3]) for f in os.listdir(args.out_dir) if f.startswith("ckpt_") and f.endswith(".pt"))
        for s in kept[:-args.keep] if args.keep else []:
            os.remove(os.path.join(args.out_dir, f"ckpt_{s}.pt"))


def start_run(args, images, alphas_cumprod, raw, world, device):
    """Rank 0: the output folder, config.json, the forward-process figure and the TensorBoard writer."""
    os.makedirs(args.out_dir, exist_ok=True)
    json.dump(vars(args), open(os.path.join(args.out_dir, "config.json"), "w"), indent=2)
    forward_figure(images, alphas_cumprod, os.path.join(args.out_dir, "forward.png"))
    print(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, {len(images)} images, "
          f"global batch {args.batch_size * world}, device {device}")
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        die("--tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(os.path.join(args.out_dir, "tb"))


def train(args, device, ddp, rank, world):
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    images, labels, args.classes = get_data(args)  # class names go into config.json and the checkpoint
    if args.batch_size > len(images) // world:
        die(f"--batch-size {args.batch_size} is larger than the data set ({len(images) // world} images per device)")
    images = images.to(device) if args.data_on_device else images
    n_classes, alphas_cumprod = 0 if args.uncond else len(args.classes), make_alphas_cumprod(vars(args), device)
    raw = build_model(vars(args)).to(device).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    step = resume(os.path.join(args.out_dir, "ckpt.pt"), raw, ema, opt, device, rank, world) if args.resume else 0
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    model = torch.compile(model) if args.compile else model
    writer = start_run(args, images, alphas_cumprod, raw, world, device) if master else None
    stream = batches(len(images), args.batch_size, args.seed, rank, world, step)
    losses, t0, t_log = [], time.time(), time.time()
    pbar = tqdm(range(step, args.iters), initial=step, total=args.iters, disable=not master)
    for step in pbar:
        idx = next(stream)
        x0 = (images[idx].to(device, non_blocking=True).float() / 127.5 - 1).contiguous(
            memory_format=torch.channels_last)
        y = None if args.uncond else labels[idx].to(device, non_blocking=True)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(args, device):
            loss = p_losses(model, x0, y, alphas_cumprod, args.p_uncond, n_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        opt.step()
        update_ema(ema, raw, min(args.ema, (1 + step) / (10 + step)))
        losses.append(loss.detach())
        done, last = step + 1, step + 1 == args.iters
        save = done % args.ckpt_every == 0 or last or (args.save_every and done % args.save_every == 0)
        if done % args.log_every == 0 or save:
            mean_loss = torch.stack(losses).mean()
            if ddp:
                dist.all_reduce(mean_loss)
            rec = dict(step=done, loss=mean_loss.item() / world, lr=lr, elapsed=time.time() - t0,
                       img_per_s=len(losses) * args.batch_size * world / (time.time() - t_log))
            if not math.isfinite(rec["loss"]):  # stop before anything is saved: ckpt.pt stays the last good one
                sys.exit(f"loss is {rec['loss']} at step {done}; stopped, the last good ckpt.pt is kept")
            losses, t_log = [], time.time()
            if master:
                with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
                pbar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                for k in ("loss", "lr", "img_per_s") if writer else ():
                    writer.add_scalar(k, rec[k], done)
        if save:
            save_run(args, raw, ema, opt, done, ddp, world, master)
        if master and (done % args.sample_every == 0 or last):
            path = [] if last else None  # one row per class, plus the unconditional row (label n_classes)
            grid = generate(ema, alphas_cumprod, [r for r in range(n_classes + 1) for _ in range(10)], args,
                            n_classes, args.seed, path)
            save_grid(grid, os.path.join(args.out_dir, f"samples_{done}.png"), 10)
            if writer:
                writer.add_image("samples", torchvision.utils.make_grid(grid * 0.5 + 0.5, nrow=10), done)
            if last:
                path_figure(path, os.path.join(args.out_dir, "reverse.png"))
    if master:
        print(f"done: step {args.iters}, {time.time() - t0:.0f}s, loss {rec['loss']:.4f} -> {args.out_dir}")
    return ema, alphas_cumprod, n_classes


# ----------------------------------------------------------------------------- sampling entry point

def parse_labels(text, classes):
    """'all', or comma-separated class names (the digits, for MNIST) and 'uncond' (the null label)."""
    names = list(classes) + ["uncond"]
    words = names if text == "all" or not classes else [w.strip() for w in text.split(",")]
    for w in words:
        if w not in names:
            die(f"--labels: unknown class {w!r} (use {', '.join(names)} or all)")
    return [names.index(w) for w in words]


def sample_main(args, device):
    path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    ck = load_checkpoint(path, device)
    model = build_model(ck["config"]).to(device).eval()
    load_weights(model, ck["ema"], path)
    classes = [] if ck["config"]["uncond"] else ck["config"]["classes"]
    n_classes, alphas_cumprod = len(classes), make_alphas_cumprod(ck["config"], device)
    labels = [lab for lab in parse_labels(args.labels, classes) for _ in range(args.n)]
    os.makedirs(args.out_dir, exist_ok=True)
    with autocast(args, device):
        if args.clip_prompt:
            clip_main(args, model, alphas_cumprod, n_classes, device)
            return model, alphas_cumprod, n_classes
        trace = []
        x = generate(model, alphas_cumprod, labels, args, n_classes, args.seed, trace)
        save_grid(x, os.path.join(args.out_dir, "samples.png"), args.n)
        path_figure(trace, os.path.join(args.out_dir, "reverse.png"))
        if args.gif:
            save_gif(trace, os.path.join(args.out_dir, "denoise.gif"), args.n)
        print(f"wrote {len(x)} samples (step {ck['step']}) to {args.out_dir}/samples.png")
    return model, alphas_cumprod, n_classes


def clip_main(args, model, alphas_cumprod, n_classes, device):
    """Unconditional samples, then the same seeds steered toward the prompt by CLIP."""
    if args.sampler == "dpmpp":
        die("--clip-prompt works with --sampler ddpm or ddim (it steers each step's mean)")
    guide = clip_guide(*load_clip(device), args.clip_prompt, args.clip_scale, args.clip_steps, args.clip_lr)
    labels = [n_classes] * args.n
    plain = generate(model, alphas_cumprod, labels, args, n_classes, args.seed)
    guided = generate(model, alphas_cumprod, labels, args, n_classes, args.seed, guide=guide)
    out = os.path.join(args.out_dir, "clip_" + "".join(c if c.isalnum() else "_" for c in args.clip_prompt) + ".png")
    save_grid(torch.cat([plain, guided]), out, args.n)
    print(f"wrote unguided (top row) and CLIP-guided (bottom row) samples to {out}")


def main(argv=None):
    args = get_args(argv)
    device, ddp, rank, world = setup(args)
    if args.sample:
        model, alphas_cumprod, n_classes = sample_main(args, device)
    else:
        model, alphas_cumprod, n_classes = train(args, device, ddp, rank, world)
    if args.fid:
        run_fid(args, model, alphas_cumprod, n_classes, rank, world)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
