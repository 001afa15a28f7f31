"""Train a CIFAR-10 DDPM U-Net with FiLM class conditioning and classifier-free guidance (or a plain
DDPM with --uncond), tracking train/validation/test losses every epoch, then sample by class.

    python cifar_cfg_unet.py                                   # train; CIFAR-10 is downloaded into ./data
    python cifar_cfg_unet.py --uncond                          # unconditional DDPM
    python cifar_cfg_unet.py --sample --labels 3,5 --cfg 3     # sample from out/cifar_cfg_unet/ckpt.pt
    python cifar_cfg_unet.py --sample --cfg-sweep 0,3,7        # one figure: the same seeds at several W
    python cifar_cfg_unet.py --sample --fid 10000              # FID against the CIFAR-10 test set (fid.py)
    torchrun --nproc_per_node=4 cifar_cfg_unet.py              # several GPUs, DistributedDataParallel

Follows seed 001, "CIFAR-10 Diffusion Model (DDPM)" (its flags work too: --conditional --epochs 30 --p_uncond 0.1
--run_name NAME, --inference --model_path ...), with the collection's shared command line (SPEC.md).
"""
import argparse, copy, json, math, os, sys, time
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

IMAGE_SIZE, CHANNELS, SPLIT_SEED = 32, 3, 42  # SPLIT_SEED fixes the 45,000 / 5,000 train/val split
HISTORY_KEYS = ("train_loss", "val_loss", "test_loss", "epochs")  # loss_history.json, the seed's shape

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="./data", help="where CIFAR-10 lives or is downloaded to")
    g.add_argument("--image-folder", default=None, help="your own images, one sub-folder per class")
    g.add_argument("--limit", type=int, default=0, help="use only the first N training images (0: all)")
    g.add_argument("--data-on-device", action="store_true", help="keep the uint8 data set on the GPU")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, default=128, help="base channels of the U-Net (seed: 32)")
    g.add_argument("--depth", type=int, default=2, help="residual blocks per resolution")
    g.add_argument("--mults", default="1,2,2,2", help="channel multipliers per resolution (seed: 1,2,4)")
    g.add_argument("--attn-res", type=int, default=16, help="self-attention at resolutions <= this, pixels")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in residual blocks")
    g.add_argument("--uncond", action="store_true", help="plain DDPM without labels")
    g.add_argument("--conditional", action="store_true", help="seed flag: conditional is the default here")
    g = p.add_argument_group("diffusion")
    g.add_argument("--steps", "--timesteps", type=int, default=1000, help="diffusion timesteps T")
    g.add_argument("--schedule", choices=["linear", "cosine", "sigmoid"], default="cosine", help="noise schedule")
    g.add_argument("--loss", choices=["mse", "l1"], default="mse", help="loss on the predicted noise")
    g.add_argument("--p-uncond", "--p_uncond", type=float, default=0.1, help="probability of dropping the label")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=200, help="passes over the training split")
    g.add_argument("--iters", type=int, default=0, help="optimizer steps instead of --epochs (0: use epochs)")
    g.add_argument("--batch-size", "--batch_size", type=int, default=128, help="images per step per device")
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up, steps")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay (warmed up as (1+n)/(10+n))")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="random seed; runs are repeatable")
    g.add_argument("--log-every", "--log_interval", type=int, default=100, help="steps between log.jsonl lines")
    g.add_argument("--sample-every", type=int, default=5000, help="steps between sample grids")
    g.add_argument("--ckpt-every", type=int, default=1000, help="steps between ckpt.pt saves")
    g.add_argument("--save-every", type=int, default=0, help="also keep ckpt_<step>.pt every N steps")
    g.add_argument("--keep", type=int, default=0, help="keep at most K periodic checkpoints (0: all)")
    g.add_argument("--save_model", action="store_true", help="seed flag: ckpt.pt is always written here")
    g.add_argument("--run_name", default=None, help="seed layout: checkpoint in models/<run_name>/ckpt.pt")
    g.add_argument("--resume", action="store_true", help="continue from the run's ckpt.pt")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample", "--inference", action="store_true", help="no training: sample from --ckpt")
    g.add_argument("--ckpt", "--model_path", default=None, help="checkpoint to sample from (default: the run's)")
    g.add_argument("--labels", "--sample_classes", default="all", help="comma-separated classes, 'uncond', 'all'")
    g.add_argument("--n", type=int, default=10, help="samples per label with --sample")
    g.add_argument("--num_samples", type=int, default=0, help="seed's count: N samples, cycling --labels")
    g.add_argument("--cfg", "--guidance_scale", type=float, default=3.0, help="guidance W (see README)")
    g.add_argument("--cfg-sweep", default="", help="with --sample: comma-separated W, one row each")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddim", help="reverse process")
    g.add_argument("--sample-steps", type=int, default=50, help="steps K of ddim/dpmpp (ddpm uses T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 ancestral")
    g.add_argument("--gif", action="store_true", help="with --sample, also write denoise.gif")
    g.add_argument("--fid", type=int, default=0, help="FID from N samples against the test set")
    g.add_argument("--fid-weights", default="download", help="FID Inception weights: download or a path")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", "--save_dir", default="out/cifar_cfg_unet", help="where everything is written")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    g.add_argument("--no_cuda", action="store_true", help="seed flag: same as --device cpu")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, else fp32")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument("--tensorboard", action="store_true", help="also log to <out-dir>/tb")
    g.add_argument("--config", default=None, help="a run's config.json to use as defaults")
    args = p.parse_args(argv)
    if args.config:  # a saved config becomes the defaults; flags given on the command line still win
        if not os.path.isfile(args.config):
            die(f"--config: no such file {args.config}")
        p.set_defaults(**{k: v for k, v in json.load(open(args.config)).items() if k != "config"})
        args = p.parse_args(argv)
    for flag, ok in [("--steps", args.steps > 0), ("--cfg", args.cfg >= 0), ("--epochs", args.epochs > 0),
                     ("--iters", args.iters >= 0), ("--sample-steps", args.sample_steps > 0), ("--n", args.n > 0),
                     ("--batch-size", args.batch_size > 0), ("--p-uncond", 0 <= args.p_uncond < 1),
                     ("--mults", all(s.strip().isdigit() for s in args.mults.split(","))),
                     ("--conditional", not (args.conditional and args.uncond))]:
        if not ok:
            die(f"{flag} is out of range (see --help)")
    return args

def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- data

def get_data(args):
    """uint8 [N, 3, 32, 32] images and labels for train / val / test, and the class names. CIFAR-10: the
    seed's 45,000 / 5,000 split of the train set (fixed permutation), the 10,000 test images as test.
    An image folder: 10 % validation, 10 % test, the rest train."""
    if args.image_folder:
        if not os.path.isdir(args.image_folder):
            die(f"--image-folder: no such folder {args.image_folder}")
        T = torchvision.transforms
        tf = T.Compose([T.Resize(IMAGE_SIZE), T.CenterCrop(IMAGE_SIZE), T.PILToTensor()])
        try:
            ds = torchvision.datasets.ImageFolder(args.image_folder, transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            die(f"--image-folder {args.image_folder}: {e}".splitlines()[0])
        images, labels, classes = torch.stack([x for x, _ in ds]), torch.tensor(ds.targets), ds.classes
        test_images = None
    else:
        try:
            sets = [torchvision.datasets.CIFAR10(args.data_dir, train=tr, download=True) for tr in (True, False)]
        except Exception as e:  # no network: say where the files go
            die(f"could not get CIFAR-10 ({type(e).__name__}); put the folder cifar-10-batches-py (data_batch_1..5, "
                f"test_batch, batches.meta) in {args.data_dir}/")
        (images, labels), (test_images, test_labels) = [
            (torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in sets]
        classes = sets[0].classes
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, len(images) // 10)
    val, test, train = perm[:n_val], perm[n_val:2 * n_val], perm[(1 if test_images is not None else 2) * n_val:]
    if test_images is None:  # an image folder holds out its own test images
        test_images, test_labels = images[test], labels[test]
    train = train[:args.limit or None]
    return dict(train=(images[train], labels[train]), val=(images[val], labels[val]),
                test=(test_images, test_labels)), classes

def batches(n, batch_size, per_epoch, seed, rank, world, start_step):
    """Index batches forever, epoch after epoch; the same seed and step give the same batch."""
    sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=True)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler))
        for b in range(skip, per_epoch):
            yield idx[b * batch_size:(b + 1) * batch_size]
        epoch, skip = epoch + 1, 0

def to_model_input(images, device):
    """uint8 [0, 255] -> float [-1, 1] on the device, channels_last."""
    return (images.to(device, non_blocking=True).float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- model

def timestep_embedding(t, dim):
    """Sinusoidal embedding: [sin(t * f_k), cos(t * f_k)], f_k = 10000^(-k / (dim/2 - 1))."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)

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

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; time + class embedding enter by FiLM: h = norm(h) * (1 + scale) + shift.
    Followed by self-attention where `attn` (the lower-resolution stages)."""

    def __init__(self, cin, cout, emb_dim, dropout, attn=False):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout, self.attn = nn.Dropout(dropout), Attention(cout) if attn else nn.Identity()
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.attn(self.skip(x) + self.conv2(self.dropout(F.silu(h))))

class UNet(nn.Module):
    """32 -> 16 -> 8 (-> 4) U-Net, skips concatenated. The class (index n_classes is the learned null class
    of CFG) goes through a 128-d embedding and an MLP, is added to the time embedding, and reaches every
    residual block through its FiLM scale and shift."""

    def __init__(self, width=128, depth=2, mults=(1, 2, 2, 2), attn_res=16, n_classes=10, dropout=0.1):
        super().__init__()
        emb_dim, chs = 4 * width, [width * m for m in mults]
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(nn.Embedding(n_classes + 1, 128), nn.Linear(128, emb_dim), nn.SiLU(),
                                       nn.Linear(emb_dim, emb_dim)) if n_classes else None
        self.stem = nn.Conv2d(CHANNELS, width, 3, padding=1)
        self.down, skips, c, res = nn.ModuleList(), [width], width, IMAGE_SIZE
        for i, co in enumerate(chs):  # every module's output is a skip, consumed in reverse by self.up
            for _ in range(depth):
                self.down.append(ResBlock(c, co, emb_dim, dropout, res <= attn_res))
                c = co
                skips.append(c)
            if i < len(chs) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips, res = skips + [c], res // 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout, True), ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, co in reversed(list(enumerate(chs))):
            for _ in range(depth + 1):
                self.up.append(ResBlock(c + skips.pop(), co, emb_dim, dropout, res <= attn_res))
                c = co
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, CHANNELS, 3, padding=1))

    def forward(self, x, t, y=None):
        emb = self.time_mlp(timestep_embedding(t, self.width))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        hs = [h := self.stem(x)]
        for m in self.down:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        for m in self.mid:
            h = m(h, emb)
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(m, ResBlock) else m(h)
        return self.out(h)


# ----------------------------------------------------------------------------- diffusion

def make_betas(schedule, T):
    """Linear and sigmoid run from 1e-4 to 0.02 at T=1000, scaled by 1000/T so any T ends equally noisy
    (clipped at 0.999 for very small T)."""
    if schedule == "linear":  # Ho et al.
        return torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64).clamp(max=0.999)
    if schedule == "sigmoid":  # the seed's: beta = sigmoid(linspace(-6, 6)) * (end - start) + start
        s = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
        return ((s * (0.02 - 1e-4) + 1e-4) * 1000 / T).clamp(max=0.999)
    # cosine (Nichol & Dhariwal): abar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)

def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps"""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

def p_losses(model, x0, y, alphas_cumprod, p_uncond, null, loss="mse", t=None, noise=None):
    """DDPM loss ||eps - eps_theta(x_t, t, y)|| (squared, or L1); labels dropped to `null` with p_uncond.
    t and noise are drawn here unless given (validation uses fixed ones)."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), device=x0.device) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    if y is not None and p_uncond > 0:
        y = torch.where(torch.rand(y.shape, device=y.device) < p_uncond, null, y)
    pred = model(q_sample(x0, t, noise, alphas_cumprod), t, y).float()
    return F.mse_loss(pred, noise) if loss == "mse" else F.l1_loss(pred, noise)

@torch.no_grad()
def eval_loss(model, images, labels, alphas_cumprod, args, n_classes, batch_size=250):
    """Mean loss over a split on fixed noise and timesteps, so the numbers of different epochs are comparable."""
    g, total, device = torch.Generator().manual_seed(SPLIT_SEED), 0.0, alphas_cumprod.device
    for i in range(0, len(images), batch_size):
        x0 = to_model_input(images[i:i + batch_size], device)
        t = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        y = labels[i:i + batch_size].to(device) if n_classes else None
        with autocast(args, device):
            total += p_losses(model, x0, y, alphas_cumprod, 0.0, n_classes, args.loss, t, noise).item() * len(x0)
    return total / len(images)


# ----------------------------------------------------------------------------- sampling

def cfg_denoiser(model, y, w, null):
    """eps(x, t) with classifier-free guidance: eps = eps_u + w * (eps_c - eps_u) (SPEC's convention:
    w=0 unconditional, w=1 conditional), both halves in one doubled batch."""
    if y is None or w == 1:
        return lambda x, t: model(x, t, y).float()
    if w == 0:
        return lambda x, t: model(x, t, torch.full_like(y, null)).float()

    def eps_fn(x, t):
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]),
                             torch.cat([y, torch.full_like(y, null)])).float().chunk(2)
        return eps_u + w * (eps_c - eps_u)
    return eps_fn

def sample_timesteps(T, steps):
    return torch.linspace(T - 1, 0, steps).round().long().tolist()

def ddim_sample(eps_fn, x, alphas_cumprod, steps, eta, generator=None, path=None, t_start=None, clip=False):
    """DDIM (Song et al.) from x_t, t = t_start (default T-1), on `steps` timesteps. With eta=1 on all T
    steps this is exactly DDPM's ancestral sampler with the posterior variance beta_tilde. With clip, the
    predicted x0 is clipped to the data range [-1, 1] and eps re-derived from it (Ho et al.'s clip_denoised:
    near t=T, where abar ~ 0, x0 = (x - sqrt(1-abar) eps) / sqrt(abar) magnifies every error of eps)."""
    ts = sample_timesteps(len(alphas_cumprod) if t_start is None else t_start + 1, steps)
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
    x_t is pure noise; the cosine schedule reaches -10, which would waste steps) to lambda at t=0. With clip,
    each x0 is clipped to [-1, 1] as in ddim_sample."""
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

@torch.inference_mode()
def generate(model, alphas_cumprod, labels, args, n_classes, seed=0, path=None, cfg=None):
    """Images in [-1, 1] for `labels` (n_classes = unconditional) from fixed seeds, at guidance cfg or args.cfg,
    with the chosen sampler; x0 predictions are clipped to [-1, 1]."""
    device, T = alphas_cumprod.device, len(alphas_cumprod)
    K = min(args.sample_steps, T)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=g).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.tensor(labels, device=device) if n_classes else None
    eps_fn = cfg_denoiser(model, y, args.cfg if cfg is None else cfg, n_classes)
    if args.sampler == "dpmpp":
        x = dpmpp_sample(eps_fn, x, alphas_cumprod, K, path, clip=True)
    else:
        steps, eta = (T, 1.0) if args.sampler == "ddpm" else (K, args.eta)  # ddpm: eta=1 on all T steps
        x = ddim_sample(eps_fn, x, alphas_cumprod, steps, eta, g, path, clip=True)
    return x.clamp(-1, 1)

def save_grid(x, path, nrow):
    torchvision.utils.save_image(x * 0.5 + 0.5, path, nrow=nrow, padding=1, pad_value=1.0)

def save_gif(trace, out, nrow):
    frames = torch.linspace(0, len(trace) - 1, min(len(trace), 50)).round().long().tolist()
    imgs = []
    for f in frames:
        grid = torchvision.utils.make_grid(trace[f].clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=1)
        imgs.append(Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()))
    imgs[0].save(out, save_all=True, append_images=imgs[1:], duration=80, loop=0)

@torch.inference_mode()
def reconstruction_figure(model, images, labels, alphas_cumprod, args, n_classes, out):
    """Training images forward-noised to t = T/4, T/2, 3T/4 and denoised back by DDIM with their label:
    columns x0 | x_t, x0_hat for each t. Returns the mean squared error of x0_hat per t."""
    device, T = alphas_cumprod.device, len(alphas_cumprod)
    x0 = to_model_input(images[:8], device)
    eps_fn = cfg_denoiser(model, labels[:8].to(device) if n_classes else None, args.cfg, n_classes)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    cols, errors = [x0], {}
    for t in (T // 4, T // 2, 3 * T // 4):
        xt = q_sample(x0, torch.full((len(x0),), t, device=device), noise, alphas_cumprod)
        rec = ddim_sample(eps_fn, xt, alphas_cumprod, max(1, args.sample_steps * t // T), 0.0, t_start=t,
                          clip=True).clamp(-1, 1)
        cols += [xt, rec]
        errors[t] = F.mse_loss(rec, x0).item()
    save_grid(torch.stack(cols, 1).flatten(0, 1).clamp(-1, 1), out, len(cols))
    return errors


# ----------------------------------------------------------------------------- EMA, checkpoints, FID

@torch.no_grad()
def update_ema(ema, model, decay):
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)

def ckpt_file(args):
    """The run's checkpoint: <out-dir>/ckpt.pt, or models/<run_name>/ckpt.pt in the seed's layout."""
    return os.path.join("models", args.run_name, "ckpt.pt") if args.run_name else os.path.join(args.out_dir, "ckpt.pt")

def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a broken file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)

def load_checkpoint(path, device):
    if not os.path.isfile(path):
        die(f"no checkpoint at {path} (train first, or pass --ckpt)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__})")

def build_model(cfg, n_classes):
    return UNet(cfg["width"], cfg["depth"], tuple(int(m) for m in cfg["mults"].split(",")), cfg["attn_res"],
                n_classes, cfg["dropout"])

def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError:
        die(f"checkpoint {path} does not match this model (check --width, --depth, --mults, --uncond)")

def run_fid(args, model, alphas_cumprod, n_classes, rank, world):
    """FID of args.fid class-balanced samples against the test split; each rank makes its share."""
    import fid  # only here, so this file runs without fid.py
    images, mine, bs = get_data(args)[0]["test"][0], list(range(rank, args.fid, world)), 250
    real = (images[mine[i:i + bs]].float() / 255 for i in range(0, len(mine), bs))
    fake = ((generate(model, alphas_cumprod, [j % max(n_classes, 1) for j in mine[i:i + bs]], args, n_classes,
                      seed=args.seed + i + 1) + 1) / 2 for i in range(0, len(mine), bs))
    cache = None if args.image_folder else os.path.join(args.data_dir, f"fid_stats_cifar10-test_{args.fid}.npz")
    res = fid.evaluate(fake, real, len(mine), cache=cache, weights=args.fid_weights, device=alphas_cumprod.device)
    if rank == 0:
        res.update(sampler=args.sampler, sample_steps=args.sample_steps, cfg=args.cfg)
        json.dump(res, open(os.path.join(args.out_dir, "fid.json"), "w"), indent=2)
        print(f"FID {res['fid']:.2f} from {args.fid} samples -> {args.out_dir}/fid.json")


# ----------------------------------------------------------------------------- training

def setup(args):
    """Device and DistributedDataParallel: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
    ddp = "RANK" in os.environ
    name = "cpu" if args.no_cuda else args.device or (
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
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
    splits, classes = get_data(args)
    images, labels = splits["train"]
    n_classes = 0 if args.uncond else len(classes)
    per_epoch = len(images) // world // args.batch_size  # DistributedSampler(drop_last) gives n // world per rank
    if per_epoch == 0:
        die(f"--batch-size {args.batch_size} is larger than the data set ({len(images) // world} images per device)")
    total = args.iters or args.epochs * per_epoch
    alphas_cumprod = torch.cumprod(1 - make_betas(args.schedule, args.steps), 0).float().to(device)
    images = images.to(device) if args.data_on_device else images
    raw = build_model(vars(args), n_classes).to(device).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    ckpt_path, step, epoch_sum, history = ckpt_file(args), 0, 0.0, {k: [] for k in HISTORY_KEYS}
    if args.resume:
        ck = load_checkpoint(ckpt_path, device)
        load_weights(raw, ck["model"], ckpt_path)
        load_weights(ema, ck["ema"], ckpt_path)
        opt.load_state_dict(ck["opt"])
        step, history, epoch_sum = ck["step"], ck["history"], ck["epoch_sum"]
        torch.set_rng_state(ck["rng"][rank if len(ck["rng"]) == world else 0].cpu())
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    model = torch.compile(model) if args.compile else model
    writer = None
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        json.dump(vars(args), open(os.path.join(args.out_dir, "config.json"), "w"), indent=2)
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                die("--tensorboard needs the tensorboard package: pip install tensorboard")
            writer = SummaryWriter(os.path.join(args.out_dir, "tb"))
        print(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, {len(images)} images, "
              f"{per_epoch} steps per epoch, global batch {args.batch_size * world}, device {device}")
    log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if master else None
    stream = batches(len(images), args.batch_size, per_epoch, args.seed, rank, world, step)
    loss_sum, n_loss, t0, t_log = torch.zeros((), device=device), 0, time.time(), time.time()
    pbar = tqdm(range(step, total), initial=step, total=total, disable=not master)
    for step in pbar:
        idx = next(stream)
        x0 = to_model_input(images[idx.to(images.device)], device)
        flip = (torch.rand(len(idx)) < 0.5).to(device)  # from the CPU RNG, which the checkpoint saves
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        y = None if args.uncond else labels[idx].to(device, non_blocking=True)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(args, device):
            loss = p_losses(model, x0, y, alphas_cumprod, args.p_uncond, n_classes, args.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        opt.step()
        update_ema(ema, raw, min(args.ema, (1 + step) / (10 + step)))
        loss_sum, n_loss, done = loss_sum + loss.detach(), n_loss + 1, step + 1
        epoch_end, save = done % per_epoch == 0, done % args.ckpt_every == 0 or done == total
        if done % args.log_every == 0 or save or epoch_end:
            if ddp:
                dist.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / n_loss / world
            if not math.isfinite(mean_loss):  # stop before anything is saved; ckpt.pt stays the last good one
                sys.exit(f"loss is {mean_loss} at step {done}; stopped, {ckpt_path} left as it was")
            ips = n_loss * args.batch_size * world / (time.time() - t_log)
            rec = dict(step=done, loss=mean_loss, lr=lr, img_per_s=ips, elapsed=time.time() - t0)
            epoch_sum += mean_loss * n_loss
            loss_sum, n_loss, t_log = torch.zeros((), device=device), 0, time.time()
            if master:
                pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
                log.write(json.dumps(rec) + "\n")
                log.flush()
                for k in ("loss", "lr", "img_per_s") if writer else ():
                    writer.add_scalar(k, rec[k], done)
        if epoch_end:
            if master:
                end_of_epoch(raw, splits, alphas_cumprod, args, n_classes, history, epoch_sum / per_epoch,
                             done // per_epoch - 1, writer)
            epoch_sum = 0.0
        if save:
            rng = [torch.get_rng_state()] * world  # every rank's, so a resumed run continues each rank's stream
            if ddp:
                dist.all_gather_object(rng, rng[0])
            if master:
                state = dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=done,
                             config=vars(args), classes=classes, rng=rng, history=history, epoch_sum=epoch_sum)
                save_checkpoint(ckpt_path, state)
                if args.save_every and done % args.save_every == 0:
                    save_checkpoint(os.path.join(args.out_dir, f"ckpt_{done}.pt"), state)
                    prune_checkpoints(args.out_dir, args.keep)
        if master and (done % args.sample_every == 0 or done == total):
            rows = range(n_classes + 1) if n_classes else [0]  # one row per class, plus the unconditional one
            grid = generate(ema, alphas_cumprod, [r for r in rows for _ in range(10)], args, n_classes, args.seed)
            save_grid(grid, os.path.join(args.out_dir, f"samples_{done}.png"), 10)
            if writer:
                writer.add_image("samples", torchvision.utils.make_grid(grid * 0.5 + 0.5, nrow=10), done)
    if master:
        errors = reconstruction_figure(ema, images, labels, alphas_cumprod, args, n_classes,
                                       os.path.join(args.out_dir, "reconstruction.png"))
        print(f"done: {total} steps in {time.time() - t0:.0f}s, loss {mean_loss:.4f}, reconstruction MSE by t "
              f"{ {t: round(e, 4) for t, e in errors.items()} } -> {args.out_dir}")
    return ema, alphas_cumprod, n_classes

def end_of_epoch(model, splits, alphas_cumprod, args, n_classes, history, train_loss, epoch, writer):
    """Validation and test losses, appended with the epoch's mean training loss to loss_history.json (seed's shape)."""
    val, test = (eval_loss(model.eval(), *splits[s], alphas_cumprod, args, n_classes) for s in ("val", "test"))
    model.train()
    for k, v in zip(HISTORY_KEYS, (train_loss, val, test, epoch)):
        history[k].append(v)
        if writer and k != "epochs":
            writer.add_scalar(k, v, epoch)
    json.dump(history, open(os.path.join(args.out_dir, "loss_history.json"), "w"), indent=2)

def prune_checkpoints(out_dir, keep):
    steps = sorted(int(f[5:-3]) for f in os.listdir(out_dir) if f.startswith("ckpt_") and f.endswith(".pt"))
    for s in steps[:-keep] if keep else []:
        os.remove(os.path.join(out_dir, f"ckpt_{s}.pt"))


# ----------------------------------------------------------------------------- sampling entry point

def parse_labels(text, classes, n_classes):
    """Class indices or names, 'uncond' (the null class) or 'all' (every class and uncond)."""
    if n_classes == 0:
        return [0]
    if text == "all":
        return list(range(n_classes + 1))
    out = []
    for s in (s.strip() for s in text.split(",")):
        if not (s == "uncond" or s in classes or s.isdigit() and int(s) < n_classes):
            die(f"--labels: unknown class {s!r} (use 0-{n_classes - 1}, a class name, 'uncond' or 'all')")
        out.append(n_classes if s == "uncond" else classes.index(s) if s in classes else int(s))
    return out

def sample_main(args, device):
    path = args.ckpt or ckpt_file(args)
    ck = load_checkpoint(path, device)
    cfg = ck["config"]
    n_classes = 0 if cfg["uncond"] else len(ck["classes"])
    model = build_model(cfg, n_classes).to(device).to(memory_format=torch.channels_last).eval()
    load_weights(model, ck["ema"], path)
    alphas_cumprod = torch.cumprod(1 - make_betas(cfg["schedule"], cfg["steps"]), 0).float().to(device)
    labels = parse_labels(args.labels, ck["classes"], n_classes)
    labels, nrow = ([labels[i % len(labels)] for i in range(args.num_samples)], 10) if args.num_samples else (
        [lab for lab in labels for _ in range(args.n)], args.n)
    os.makedirs(args.out_dir, exist_ok=True)
    with autocast(args, device):
        if args.cfg_sweep:  # the seed's guidance-scale comparison: one row per W, the same seeds in every row
            try:
                scales = [float(s) for s in args.cfg_sweep.split(",")]
            except ValueError:
                scales = [-1.0]
            if n_classes == 0 or min(scales) < 0:
                die("--cfg-sweep needs a conditional model and guidance scales >= 0, e.g. 0,3,7")
            rows = [generate(model, alphas_cumprod, labels, args, n_classes, args.seed, cfg=w) for w in scales]
            save_grid(torch.cat(rows), os.path.join(args.out_dir, "cfg_sweep.png"), len(labels))
            print(f"wrote rows for W = {scales} to {args.out_dir}/cfg_sweep.png")
            return model, alphas_cumprod, n_classes
        trace = []
        x = generate(model, alphas_cumprod, labels, args, n_classes, args.seed, trace)
        save_grid(x, os.path.join(args.out_dir, "samples.png"), nrow)
        if args.gif:
            save_gif(trace, os.path.join(args.out_dir, "denoise.gif"), nrow)
    print(f"wrote {len(x)} samples (step {ck['step']}, cfg {args.cfg}) to {args.out_dir}/samples.png")
    return model, alphas_cumprod, n_classes

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
