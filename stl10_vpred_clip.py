"""Train a text-conditioned v-prediction diffusion U-Net on STL-10 at 96x96: frozen CLIP ViT-B/32 text embeddings
of "a photo of a {class}" enter every U-Net level by cross-attention; classifier-free guidance on v.

    python stl10_vpred_clip.py --steps 500 --cfg 6          # train (STL-10 is downloaded into ./data)
    python stl10_vpred_clip.py --cond learned               # learned label embeddings instead of CLIP
    python stl10_vpred_clip.py --sample --label 3 --cfg 6   # sample from out/stl10_vpred_clip/ckpt.pt
    python stl10_vpred_clip.py --diagnostics --ckpt out/stl10_vpred_clip/ckpt.pt   # the five figures
    python stl10_vpred_clip.py --sweep --schedules cosine linear --cfg 0 1.5 3 6 9 --eta 0 1 --seed 42
    python stl10_vpred_clip.py --sample --fid 5000          # FID and IS against the STL-10 test split
    torchrun --nproc_per_node=4 stl10_vpred_clip.py         # several GPUs, DistributedDataParallel

Follows seed 000 (STL10 class-conditional diffusion at 96x96) with the collection's command line (SPEC.md).
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from PIL import Image, ImageColor, ImageDraw
from tqdm import tqdm

IMAGE_SIZE, CHANNELS = 96, 3
CLIP_CACHE = "clip_text_emb_stl10_vitb32.pt"

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="./data", help="where STL-10 (and the CLIP cache) lives")
    g.add_argument("--image-folder", default=None, help="your own images, one sub-folder per class")
    g.add_argument("--limit", type=int, default=0, help="use only the first N training images (0: all)")
    g.add_argument("--overfit", type=int, default=0, help="train on a fixed random subset of N images")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, default=64, help="base channels of the U-Net")
    g.add_argument("--depth", type=int, default=2, help="residual blocks per resolution")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in residual blocks")
    g.add_argument("--cond", choices=["clip", "learned"], default="clip", help="CLIP text or learned label emb.")
    g.add_argument("--text-emb", default=None, help="precomputed [classes+1, D] text embeddings (.pt)")
    g = p.add_argument_group("diffusion")
    g.add_argument("--steps", "--timesteps", type=int, default=500, help="diffusion timesteps T")
    g.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="noise schedule")
    g.add_argument("--p-uncond", type=float, default=0.2, help="probability of dropping the condition")
    g = p.add_argument_group("training")
    g.add_argument("--iters", type=int, default=50000, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=64, help="images per micro-batch per device")
    g.add_argument("--accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    g.add_argument("--lr", type=float, default=2e-5, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps, then cosine decay to 0")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay (warmed up as (1+n)/(10+n))")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="random seed; runs are repeatable")
    g.add_argument("--log-every", type=int, default=50, help="steps between log.jsonl lines")
    g.add_argument("--sample-every", type=int, default=5000, help="steps between sample grids")
    g.add_argument("--diag-every", type=int, default=5000, help="steps between diagnostics (0: off)")
    g.add_argument("--ckpt-every", type=int, default=1000, help="steps between ckpt.pt saves")
    g.add_argument("--save-every", type=int, default=0, help="also keep ckpt_<step>.pt every N steps")
    g.add_argument("--keep", type=int, default=0, help="keep at most K periodic checkpoints (0: all)")
    g.add_argument("--resume", action="store_true", help="continue from the run's ckpt.pt")
    g = p.add_argument_group("sampling (--sample, --diagnostics and --sweep use --ckpt and its run's data)")
    g.add_argument("--sample", action="store_true", help="no training: sample from --ckpt")
    g.add_argument("--diagnostics", action="store_true", help="no training: the five figures for --ckpt")
    g.add_argument("--sweep", action="store_true", help="no training: grids over --schedules, --cfg, --eta")
    g.add_argument("--ckpt", default=None, help="checkpoint to use (default: the run's ckpt.pt)")
    g.add_argument("--labels", "--label", nargs="+", default=["all"], help="classes; 10 or 'uncond'; 'all'")
    g.add_argument("--n", "--num-samples", type=int, default=8, help="samples per label (torchrun: --num-samples)")
    g.add_argument("--cfg", "--guidance_scale", type=float, nargs="+", default=[6.0],
                   help="guidance W: v_u + W*(v_c - v_u); 0 uncond, 1 cond (several with --sweep)")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddim", help="reverse process")
    g.add_argument("--sample-steps", type=int, default=100, help="steps K of ddim/dpmpp (ddpm uses T)")
    g.add_argument("--eta", type=float, nargs="+", default=[1.0], help="DDIM noise: 1 stochastic (best), 0 none")
    g.add_argument("--schedules", nargs="+", choices=["cosine", "linear"], default=["cosine"], help="--sweep's")
    g.add_argument("--gif", action="store_true", help="with --sample, also write denoise.gif")
    g.add_argument("--fid", type=int, default=0, help="FID/IS from N samples against the test split")
    g.add_argument("--fid-weights", default="download", help="FID Inception weights: download or a path")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", default="out/stl10_vpred_clip", help="where everything is written")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA only")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument("--tensorboard", action="store_true", help="also log to <out-dir>/tb (with projector)")
    g.add_argument("--config", default=None, help="a run's config.json to use as defaults")
    args = p.parse_args(argv)
    if args.config:  # a saved config becomes the defaults; flags given on the command line still win
        if not os.path.isfile(args.config):
            die(f"--config: no such file {args.config}")
        p.set_defaults(**{k: v for k, v in json.load(open(args.config)).items() if k != "config"})
        args = p.parse_args(argv)
    for flag, ok in [("--steps", args.steps > 0), ("--cfg", min(args.cfg) >= 0), ("--iters", args.iters > 0),
                     ("--sample-steps", args.sample_steps > 0), ("--n", args.n > 0), ("--accum", args.accum > 0),
                     ("--batch-size", args.batch_size > 0), ("--p-uncond", 0 <= args.p_uncond < 1),
                     ("--eta", min(args.eta) >= 0), ("--overfit", args.overfit >= 0)]:
        if not ok:
            die(f"{flag} is out of range (see --help)")
    if not args.sweep and (len(args.cfg) > 1 or len(args.eta) > 1):
        die("--cfg and --eta take several values only with --sweep")
    return args

def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- data
def get_data(args, train=True):
    """The whole data set as uint8 [N, 3, 96, 96] plus labels [N] and the class names."""
    if args.image_folder:
        tf = torchvision.transforms
        try:
            ds = torchvision.datasets.ImageFolder(args.image_folder, transform=tf.Compose(
                [tf.Resize(IMAGE_SIZE), tf.CenterCrop(IMAGE_SIZE), tf.PILToTensor()]))
        except (FileNotFoundError, RuntimeError) as e:
            die(f"--image-folder {args.image_folder}: {e}".splitlines()[0])
        images = torch.stack([x for x, _ in ds])
        labels, classes = torch.tensor(ds.targets), ds.classes
    else:
        try:
            ds = torchvision.datasets.STL10(args.data_dir, split="train" if train else "test", download=True)
        except Exception as e:  # no network: say where the files go
            die(f"could not get STL-10 ({e}); put train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, "
                f"class_names.txt (stl10_binary.tar.gz) in {args.data_dir}/stl10_binary/")
        images, labels = torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))
        classes = ds.classes  # from class_names.txt
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    if args.overfit and train:  # the seed's OVERFIT_TINY: a fixed subset, the same in every run
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.overfit]
        images, labels = images[keep], labels[keep]
    return images, labels, list(classes)

def batches(n, batch_size, seed, rank, world, start_step):
    """Index batches forever, epoch after epoch; the same seed and step give the same batch. The batch size
    is checked here, before training starts, not at the first batch."""
    sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        die(f"--batch-size {batch_size} is larger than the data set ({len(sampler)} images per device)")
    def stream(epoch, skip):
        while True:
            sampler.set_epoch(epoch)
            idx = torch.tensor(list(sampler))
            for b in range(skip, per_epoch):
                yield idx[b * batch_size:(b + 1) * batch_size]
            epoch, skip = epoch + 1, 0
    return stream(*divmod(start_step, per_epoch))

def text_embeddings(args, classes):
    """[n+1, D] embeddings of "a photo of a {class}" and "" (index n): --text-emb, the cache, or open_clip."""
    prompts = [f"a photo of a {c}" for c in classes] + [""]
    path = args.text_emb or os.path.join(args.out_dir if args.image_folder else args.data_dir, CLIP_CACHE)
    if args.text_emb or os.path.isfile(path):
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            emb, cached = d["emb"].float(), d["prompts"]
        except Exception as e:
            die(f"--text-emb {path}: not a readable embedding file ({type(e).__name__})")
        if args.text_emb and len(emb) != len(prompts):
            die(f"--text-emb {path} has {len(emb)} rows; need {len(prompts)} ({len(classes)} classes + unconditional)")
        if args.text_emb or cached == prompts:
            return emb
    try:
        import open_clip
    except ImportError:
        die("--cond clip needs CLIP: pip install open_clip_torch, or pass --text-emb FILE, or use --cond learned")
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained="openai")  # the seed's ViT-B/32
    with torch.no_grad():  # the CLIP encoder stays frozen; unit norm, as CLIP compares them
        emb = F.normalize(model.eval().encode_text(open_clip.get_tokenizer("ViT-B-32")(prompts)).float(), dim=-1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_checkpoint(path, dict(emb=emb, context_dim=emb.shape[1], prompts=prompts))
    return emb

# ----------------------------------------------------------------------------- model
def timestep_embedding(t, dim):
    """Sinusoidal embedding: [sin(t * f_k), cos(t * f_k)], f_k = 10000^(-k / (dim/2 - 1))."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the time embedding is added between them (no FiLM, as the seed)."""
    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time, self.dropout = nn.Linear(emb_dim, cout), nn.Dropout(dropout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.conv2(self.dropout(F.silu(self.norm2(h))))

class Attention(nn.Module):
    """Multi-head attention of the pixels over themselves, or over context tokens [B, L, ctx_dim]."""
    def __init__(self, ch, ctx_dim=None, heads=4):
        super().__init__()
        self.heads, self.norm = heads, nn.GroupNorm(8, ch)
        self.q, self.proj = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.kv = nn.Conv2d(ch, 2 * ch, 1) if ctx_dim is None else nn.Linear(ctx_dim, 2 * ch)
    def forward(self, x, ctx=None):
        B, C, H, W = x.shape
        h = self.norm(x)
        kv = self.kv(h).flatten(2).transpose(1, 2) if ctx is None else self.kv(ctx)  # [B, L, 2C]
        k, v = kv.reshape(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q = self.q(h).reshape(B, self.heads, C // self.heads, H * W).transpose(-1, -2)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        return self.proj(h.transpose(-1, -2).reshape(B, C, H, W))

class Block(nn.Module):
    """The seed's U-Net layer: residual block (structure + time), image-only self-attention, then cross-attention
    to the text added on top: out = res_out + cross_attn_out. Keys: the text and a learned null token (one key
    alone would get softmax weight 1 everywhere), so each pixel chooses how much text it takes."""
    def __init__(self, cin, cout, emb_dim, ctx_dim, dropout, self_attn):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, dropout)
        self.attn = Attention(cout) if self_attn else None
        self.cross, self.null = Attention(cout, ctx_dim), nn.Parameter(torch.randn(ctx_dim) * ctx_dim ** -0.5)
    def forward(self, x, emb, ctx):
        h = self.res(x, emb)
        h = h + self.attn(h) if self.attn else h
        return h + self.cross(h, torch.stack([self.null.expand_as(ctx).to(ctx.dtype), ctx], 1))

class UNet(nn.Module):
    """96 -> 48 -> 24 -> 12 U-Net (one stage deeper than the 32x32 scripts); condition y picks a table row."""
    def __init__(self, width, depth, n_classes, ctx_dim, cond, dropout=0.0, mults=(1, 2, 2, 4)):
        super().__init__()
        self.width, emb_dim, chs = width, 4 * width, [width * m for m in mults]
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cond == "clip":
            self.register_buffer("text_emb", torch.zeros(n_classes + 1, ctx_dim))
        else:
            self.label_emb = nn.Embedding(n_classes + 1, ctx_dim)
        block = lambda ci, co, res: Block(ci, co, emb_dim, ctx_dim, dropout, res <= 24)  # self-attn at 24, 12
        self.stem, self.down, skips, c = nn.Conv2d(CHANNELS, width, 3, padding=1), nn.ModuleList(), [width], width
        for i, co in enumerate(chs):
            for _ in range(depth):
                self.down.append(block(c, co, IMAGE_SIZE >> i))
                c = co
                skips.append(c)
            if i < len(chs) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid, self.up = block(c, c, 0), nn.ModuleList()
        for i, co in reversed(list(enumerate(chs))):
            for _ in range(depth + 1):
                self.up.append(block(c + skips.pop(), co, IMAGE_SIZE >> i))
                c = co
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)))
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, CHANNELS, 3, padding=1))
    def cond_table(self):  # the conditioning vectors: one row per class, then the unconditional row
        return self.text_emb if hasattr(self, "text_emb") else self.label_emb.weight
    def forward(self, x, t, y):
        emb, ctx = self.time_mlp(timestep_embedding(t, self.width)), self.cond_table()[y]
        h = self.stem(x)
        hs = [h]
        for m in self.down:
            h = m(h, emb, ctx) if isinstance(m, Block) else m(h)
            hs.append(h)
        h = self.mid(h, emb, ctx)
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], dim=1), emb, ctx) if isinstance(m, Block) else m(h)
        return self.out(h)


# ----------------------------------------------------------------------------- diffusion
def make_betas(schedule, T):
    if schedule == "linear":  # Ho et al.: 1e-4 .. 0.02 at T=1000, scaled so any T ends equally noisy
        return torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    # cosine (Nichol & Dhariwal): abar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)

def make_alphas_cumprod(schedule, T, device):
    return torch.cumprod(1 - make_betas(schedule, T), 0).float().to(device)

def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps"""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

def v_target(x0, eps, abar):  # v = sqrt(abar) * eps - sqrt(1 - abar) * x0 (Salimans & Ho)
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0

def v_to_eps(v, x, abar):  # eps = sqrt(abar) * v + sqrt(1 - abar) * x_t
    return abar.sqrt() * v + (1 - abar).sqrt() * x

def v_to_x0(v, x, abar):  # x0 = sqrt(abar) * x_t - sqrt(1 - abar) * v
    return abar.sqrt() * x - (1 - abar).sqrt() * v

def eps_from_v(v_fn, alphas_cumprod):
    """A v-denoiser v_fn(x, t) as the eps-denoiser the samplers take."""
    return lambda x, t: v_to_eps(v_fn(x, t), x, alphas_cumprod[t].view(-1, *[1] * (x.dim() - 1)))

def p_losses(model, x0, y, alphas_cumprod, p_uncond, null):
    """v-prediction loss ||v - v_theta(x_t, t, y)||^2; the condition dropped to `null` with p_uncond."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    y = torch.where(torch.rand(y.shape, device=y.device) < p_uncond, null, y)
    v = v_target(x0, noise, alphas_cumprod[t].view(-1, 1, 1, 1))
    return F.mse_loss(model(q_sample(x0, t, noise, alphas_cumprod), t, y).float(), v)


# ----------------------------------------------------------------------------- sampling
def cfg_denoiser(model, y, w, null):
    """v(x, t) with classifier-free guidance: v = v_u + w * (v_c - v_u) (SPEC's convention on v: w=0
    unconditional, w=1 conditional), the whole prediction guided, both halves in one doubled batch."""
    if w == 1:
        return lambda x, t: model(x, t, y).float()
    y2 = torch.cat([y, torch.full_like(y, null)])
    def v_fn(x, t):
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), y2).float().chunk(2)
        return v_u + w * (v_c - v_u)
    return v_fn

def sample_timesteps(t_start, steps):
    return torch.linspace(t_start, 0, steps).round().long().tolist()

def ddim_sample(eps_fn, x, alphas_cumprod, steps, eta, generator=None, path=None, t_start=-1):
    """DDIM (Song et al.) from x at t_start (-1: T-1) on `steps` timesteps; eta=1 on all T steps is DDPM."""
    ts = sample_timesteps(t_start % len(alphas_cumprod), steps)
    for i, t in enumerate(tqdm(ts, desc="sampling", leave=False, disable=len(ts) < 50)):
        abar = alphas_cumprod[t]
        abar_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(abar)
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device))
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        # sigma^2 = eta^2 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        if path is not None:
            path.append(x.cpu())
    return x

def dpmpp_sample(eps_fn, x, alphas_cumprod, steps, path=None, t_start=-1):
    """DPM-Solver++(2M) (Lu et al. 2022) in data prediction, lambda = log(alpha / sigma), last step first order.
    Timesteps uniform in lambda from -5 (the cosine schedule's -9.2 at T=500 is pure noise) to lambda(0)."""
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    lam = torch.log(alpha / sigma)
    grid = torch.linspace(max(lam[t_start].item(), -5.0), lam[0].item(), steps, device=lam.device)
    ts = sorted({int((lam - g).abs().argmin()) for g in grid}, reverse=True)
    x0_prev, h_prev = None, None
    for i, t in enumerate(tqdm(ts, desc="sampling", leave=False, disable=len(ts) < 50)):
        x0 = (x - sigma[t] * eps_fn(x, torch.full((x.shape[0],), t, device=x.device))) / alpha[t]
        if i + 1 == len(ts):
            x = x0
        else:
            s = ts[i + 1]
            h = torch.log(alpha[s] / sigma[s]) - torch.log(alpha[t] / sigma[t])
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)  # (1 + 1/2r) x0 - x0_prev/2r
            x = sigma[s] / sigma[t] * x - alpha[s] * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if path is not None:
            path.append(x.cpu())
    return x

def sample(eps_fn, x, alphas_cumprod, sampler, steps, eta, generator=None, path=None, t_start=-1):
    """From x at t_start (-1: T-1, pure noise); a partial start takes its share of the K steps."""
    T = len(alphas_cumprod)
    if sampler == "ddpm":  # ancestral: DDIM with eta=1 on every timestep
        sampler, steps, eta = "ddim", T, 1.0
    K = max(1, round(min(steps, T) * (t_start % T + 1) / T))
    if sampler == "ddim":
        return ddim_sample(eps_fn, x, alphas_cumprod, K, eta, generator, path, t_start)
    return dpmpp_sample(eps_fn, x, alphas_cumprod, K, path, t_start)

@torch.no_grad()
def generate(model, alphas_cumprod, labels, args, seed=0, path=None, w=None, eta=None, sampler=None):
    """Images in [-1, 1] for `labels` from fixed seeds; w, eta, sampler default to --cfg, --eta, --sampler."""
    device, null = alphas_cumprod.device, len(model.cond_table()) - 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=g).to(device)
    y = torch.tensor(labels, device=device)
    eps_fn = eps_from_v(cfg_denoiser(model, y, args.cfg[0] if w is None else w, null), alphas_cumprod)
    return sample(eps_fn, x, alphas_cumprod, sampler or args.sampler, args.sample_steps,
                  args.eta[0] if eta is None else eta, g, path).clamp(-1, 1)

def class_grid(model, alphas_cumprod, args, path=None):
    """Fixed seeds, one row per class plus the unconditional row, --n samples each."""
    rows = range(len(model.cond_table()))
    return generate(model, alphas_cumprod, [r for r in rows for _ in range(args.n)], args, args.seed, path)

def save_grid(x, path, nrow):
    torchvision.utils.save_image(x * 0.5 + 0.5, path, nrow=nrow, padding=1, pad_value=1.0)

def path_figure(path, n_rows, out):
    """The reverse (denoising) path: a row per sample, columns from noise to image."""
    cols = torch.linspace(0, len(path) - 1, min(len(path), 10)).round().long().tolist()
    save_grid(torch.stack([path[c][:n_rows] for c in cols], 1).flatten(0, 1).clamp(-1, 1), out, len(cols))

def save_gif(path, out, nrow):
    frames = torch.linspace(0, len(path) - 1, min(len(path), 50)).round().long().tolist()
    grids = [torchvision.utils.make_grid(path[f].clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=1) for f in frames]
    imgs = [Image.fromarray(g.mul(255).round().byte().permute(1, 2, 0).numpy()) for g in grids]
    imgs[0].save(out, save_all=True, append_images=imgs[1:], duration=80, loop=0)


# ----------------------------------------------------------------------------- the seed's diagnostics
def embedding_map(x, names, out):
    """2-D map of the conditioning vectors x, labelled: t-SNE with scikit-learn installed, else PCA."""
    try:
        from sklearn.manifold import TSNE
        xy = torch.from_numpy(TSNE(2, perplexity=min(5, len(x) - 1), init="pca", random_state=0)
                              .fit_transform(x.numpy())).float()
        method = "t-SNE"
    except ImportError:
        x = x - x.mean(0)
        xy, method = x @ torch.linalg.svd(x, full_matrices=False)[2][:2].T, "PCA"  # two principal axes
    xy = (xy - xy.min(0).values) / (xy.max(0).values - xy.min(0).values).clamp(min=1e-8) * 330 + 35
    img = Image.new("RGB", (480, 400), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), f"conditioning embeddings, {method}", fill="black")
    for i, ((px, py), name) in enumerate(zip(xy.tolist(), names)):
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=ImageColor.getrgb(f"hsl({i * 360 // len(names)},70%,45%)"))
        draw.text((px + 8, py - 6), name, fill="black")
    img.save(out)

@torch.no_grad()
def diagnostics(model, alphas_cumprod, images, labels, classes, args, out, writer=None, step=0):
    """The seed's five checks: embedding map, denoising collage, class grid, reconstructions, their sweep."""
    os.makedirs(out, exist_ok=True)
    names, n, table = classes + ["uncond"], len(classes), model.cond_table().detach().float().cpu()
    embedding_map(table, names, os.path.join(out, "embeddings.png"))
    if writer:  # the seed's label-embedding projector
        writer.add_embedding(table, metadata=names, global_step=step, tag="conditioning")
    path = []
    generate(model, alphas_cumprod, [0, n // 2, n - 1, n], args, args.seed, path)
    path_figure(path, 4, os.path.join(out, "collage.png"))
    save_grid(class_grid(model, alphas_cumprod, args), os.path.join(out, f"grid_cfg{args.cfg[0]}.png"), args.n)
    ts = [max(0, round(f * len(alphas_cumprod)) - 1) for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
    x0 = images[:4].to(alphas_cumprod.device).float() / 127.5 - 1
    # forward-diffuse to each t (fixed noise), then reverse from t with the true class, unguided (w=1)
    g, y = torch.Generator().manual_seed(args.seed), labels[:4].to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    noisy = [q_sample(x0, torch.full_like(y, t), noise, alphas_cumprod) for t in ts]
    eps_fn = eps_from_v(cfg_denoiser(model, y, 1.0, None), alphas_cumprod)
    recon = [sample(eps_fn, x, alphas_cumprod, args.sampler, args.sample_steps, args.eta[0], g, None, t).clamp(-1, 1)
             for x, t in zip(noisy, ts)]
    single = [x0[0]] + [x[0] for x in noisy] + [x0[0]] + [x[0] for x in recon]
    save_grid(torch.stack(single), os.path.join(out, "reconstruction.png"), len(ts) + 1)
    panel = torch.stack([x0] + recon, 1).flatten(0, 1)  # rows: original, then reconstructions from each t
    save_grid(panel, os.path.join(out, "reconstruction_sweep.png"), len(ts) + 1)


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

def build_model(cfg, n_classes, ctx_dim):
    return UNet(cfg["width"], cfg["depth"], n_classes, ctx_dim, cfg["cond"], cfg["dropout"])

def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError:
        die(f"checkpoint {path} does not match this model (check --width, --depth, --cond, --text-emb)")

def run_fid(args, model, alphas_cumprod, classes, rank, world):
    """FID and IS of args.fid class-balanced samples against the test split; each rank makes its share."""
    import fid  # only here, so this file runs without fid.py
    images, _, _ = get_data(args, train=False)
    mine, n = list(range(rank, args.fid, world)), len(classes)
    real = (images[mine[i:i + 100]].float() / 255 for i in range(0, len(mine), 100))
    fake = ((generate(model, alphas_cumprod, [j % n for j in mine[i:i + 100]], args, seed=args.seed + i + 1) + 1) / 2
            for i in range(0, len(mine), 100))
    src = "folder" if args.image_folder else "stl10-test"
    cache = None if args.image_folder else os.path.join(args.data_dir, f"fid_stats_{src}_{IMAGE_SIZE}_{args.fid}.npz")
    res = fid.evaluate(fake, real, len(mine), cache=cache, inception_score=True, weights=args.fid_weights,
                       device=alphas_cumprod.device)
    if rank == 0:
        res.update(sampler=args.sampler, sample_steps=args.sample_steps, cfg=args.cfg[0], eta=args.eta[0], real=src)
        json.dump(res, open(os.path.join(args.out_dir, "fid.json"), "w"), indent=2)
        print(f"FID {res['fid']:.2f}, IS {res['inception_score_mean']:.2f} from {args.fid} samples -> fid.json")


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

def train(args, device, ddp, rank, world):
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    images, labels, classes = get_data(args)
    alphas_cumprod = make_alphas_cumprod(args.schedule, args.steps, device)
    emb = text_embeddings(args, classes) if args.cond == "clip" else None
    ctx_dim = emb.shape[1] if emb is not None else 4 * args.width
    raw = build_model(vars(args), len(classes), ctx_dim)
    if emb is not None:
        raw.text_emb.copy_(emb)  # the frozen CLIP table, a buffer saved with the weights
    raw = raw.to(device).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    ckpt_path, step = os.path.join(args.out_dir, "ckpt.pt"), 0
    if args.resume:
        ck = load_checkpoint(ckpt_path, device)
        load_weights(raw, ck["model"], ckpt_path)
        load_weights(ema, ck["ema"], ckpt_path)
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        torch.set_rng_state(ck["rng"][rank].cpu() if len(ck["rng"]) == world else ck["rng"][0].cpu())
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    model = torch.compile(model) if args.compile else model
    writer = tensorboard_writer(args) if master else None
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        json.dump(vars(args), open(os.path.join(args.out_dir, "config.json"), "w"), indent=2)
        print(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, {len(images)} images, "
              f"{len(classes)} classes, cond {args.cond} (dim {ctx_dim}), global batch "
              f"{args.batch_size * args.accum * world}, {device}")
    log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if master else None
    stream = batches(len(images), args.batch_size, args.seed, rank, world, step * args.accum)
    loss_sum, n_loss, t0, t_log = torch.zeros((), device=device), 0, time.time(), time.time()
    pbar = tqdm(range(step, args.iters), initial=step, total=args.iters, disable=not master)
    for step in pbar:
        # the seed's learning rate: linear warm-up, then cosine decay to 0 at --iters
        decay = 0.5 * (1 + math.cos(math.pi * max(0, step - args.warmup) / max(1, args.iters - args.warmup)))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * decay
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for micro in range(args.accum):  # gradient accumulation: DDP syncs only on the last micro-batch
            idx = next(stream)
            x0 = images[idx].to(device, non_blocking=True).float() / 127.5 - 1
            x0 = torch.where(torch.rand(len(x0), 1, 1, 1, device=device) < 0.5, x0.flip(3), x0)  # random flips
            x0, y = x0.contiguous(memory_format=torch.channels_last), labels[idx].to(device, non_blocking=True)
            with model.no_sync() if ddp and micro + 1 < args.accum else nullcontext():
                with autocast(args, device):
                    loss = p_losses(model, x0, y, alphas_cumprod, args.p_uncond, len(classes)) / args.accum
                loss.backward()
            loss_sum += loss.detach()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        opt.step()
        update_ema(ema, raw, min(args.ema, (1 + step) / (10 + step)))
        n_loss, done = n_loss + 1, step + 1
        if done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.iters:
            if ddp:
                dist.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / n_loss / world
            if not math.isfinite(mean_loss):  # stop before anything is saved; ckpt.pt stays the last good one
                sys.exit(f"loss is {mean_loss} at step {done}; stopped, {ckpt_path} left as it was")
            ips = n_loss * args.batch_size * args.accum * world / (time.time() - t_log)
            rec = dict(step=done, loss=mean_loss, lr=lr, img_per_s=ips, elapsed=time.time() - t0)
            loss_sum, n_loss, t_log = torch.zeros((), device=device), 0, time.time()
            if master:
                pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.1f}")
                print(json.dumps(rec), file=log, flush=True)
                for k in ("loss", "lr", "img_per_s") if writer else ():
                    writer.add_scalar(k, rec[k], done)
        periodic = args.save_every and done % args.save_every == 0
        if done % args.ckpt_every == 0 or done == args.iters or periodic:
            rng = gather_rng(ddp, world)
            state = dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=done,
                         config=vars(args), rng=rng, classes=classes, context_dim=ctx_dim)
            if master:
                save_checkpoint(ckpt_path, state)
                if periodic:
                    save_checkpoint(os.path.join(args.out_dir, f"ckpt_{done}.pt"), state)
                    prune_checkpoints(args.out_dir, args.keep)
        if master and (done % args.sample_every == 0 or done == args.iters):
            grid = class_grid(ema, alphas_cumprod, args)
            save_grid(grid, os.path.join(args.out_dir, f"samples_{done}.png"), args.n)
            if writer:
                writer.add_image("samples", torchvision.utils.make_grid(grid * 0.5 + 0.5, nrow=args.n), done)
        if master and args.diag_every and (done % args.diag_every == 0 or done == args.iters):
            diagnostics(ema, alphas_cumprod, images, labels, classes, args,
                        os.path.join(args.out_dir, "diagnostics", f"step_{done}"), writer, done)
    if master:
        print(f"done: {args.iters} steps in {time.time() - t0:.0f}s, loss {mean_loss:.4f} -> {args.out_dir}")
    return ema, alphas_cumprod, classes

def gather_rng(ddp, world):
    """Every rank's torch RNG state, so a resumed run continues each rank's random stream."""
    states = [torch.get_rng_state()] * world
    if ddp:
        dist.all_gather_object(states, states[0])
    return states

def prune_checkpoints(out_dir, keep):
    steps = sorted(int(f[5:-3]) for f in os.listdir(out_dir) if f.startswith("ckpt_") and f.endswith(".pt"))
    for s in steps[:-keep] if keep else []:
        os.remove(os.path.join(out_dir, f"ckpt_{s}.pt"))

def tensorboard_writer(args):
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        die("--tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(os.path.join(args.out_dir, "tb"))


# ----------------------------------------------------------------------------- sampling entry points
def parse_labels(tokens, n_classes):
    """Indices 0..n_classes-1, n_classes (or 'uncond') for the unconditional row, 'all' for every row."""
    out = []
    for s in (s.strip() for tok in tokens for s in tok.split(",")):
        if s == "all":
            out += range(n_classes + 1)
        elif s == "uncond":
            out.append(n_classes)
        elif s.isdigit() and int(s) <= n_classes:
            out.append(int(s))
        else:
            die(f"--labels: unknown class {s!r} (use 0-{n_classes}, {n_classes} or 'uncond' is unconditional, 'all')")
    return out

def sample_main(args, device):
    """--sample, --diagnostics, --sweep: the EMA model of --ckpt, built from the checkpoint's config."""
    path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    ck = load_checkpoint(path, device)
    classes, cfg = ck["classes"], ck["config"]
    model = build_model(cfg, len(classes), ck["context_dim"]).to(device).eval()
    load_weights(model, ck["ema"], path)
    alphas_cumprod = make_alphas_cumprod(cfg["schedule"], cfg["steps"], device)
    labels = [lab for lab in parse_labels(args.labels, len(classes)) for _ in range(args.n)]
    os.makedirs(args.out_dir, exist_ok=True)
    with autocast(args, device):
        if args.diagnostics:
            images, image_labels, _ = get_data(argparse.Namespace(**cfg))  # the run's own training images
            diagnostics(model, alphas_cumprod, images, image_labels, classes, args,
                        os.path.join(args.out_dir, "diagnostics", f"step_{ck['step']}"))
            print(f"wrote diagnostics (step {ck['step']}) to {args.out_dir}/diagnostics/step_{ck['step']}")
        for schedule in args.schedules if args.sweep else []:  # the seed's inference_sweeps, DDIM on K steps
            folder = os.path.join(args.out_dir, "sweeps", schedule)
            os.makedirs(folder, exist_ok=True)
            ab = make_alphas_cumprod(schedule, cfg["steps"], device)
            for w, eta in [(w, eta) for w in args.cfg for eta in args.eta]:
                x = generate(model, ab, labels, args, args.seed, w=w, eta=eta, sampler="ddim")
                save_grid(x, os.path.join(folder, f"grid_{schedule}_cfg{w}_eta{eta}.png"), args.n)
        if args.sample:
            trace = []
            x = generate(model, alphas_cumprod, labels, args, args.seed, trace)
            save_grid(x, os.path.join(args.out_dir, "samples.png"), args.n)
            if args.gif:
                save_gif(trace, os.path.join(args.out_dir, "denoise.gif"), args.n)
            print(f"wrote {len(x)} samples (step {ck['step']}) to {args.out_dir}/samples.png")
    return model, alphas_cumprod, classes

def main(argv=None):
    args = get_args(argv)
    device, ddp, rank, world = setup(args)
    if args.sample or args.diagnostics or args.sweep:
        model, alphas_cumprod, classes = sample_main(args, device)
    else:
        model, alphas_cumprod, classes = train(args, device, ddp, rank, world)
    if args.fid:
        run_fid(args, model, alphas_cumprod, classes, rank, world)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
