"""Train a class-conditional DDPM with classifier-free guidance on MNIST (or a plain DDPM with
--uncond), then sample from it by class or, with CLIP, from a text prompt.

    python mnist_ddpm.py                                  # train; MNIST is downloaded into ./data
    python mnist_ddpm.py --uncond                         # plain DDPM, no labels (seed's Task 1)
    python mnist_ddpm.py --sample --labels 3,7 --cfg 3    # sample from out/mnist_ddpm/ckpt.pt
    python mnist_ddpm.py --sample --clip-prompt "two"     # CLIP-guided: pip install open_clip_torch
    python mnist_ddpm.py --sample --fid 10000             # FID against the MNIST test set (fid.py)
    torchrun --nproc_per_node=4 mnist_ddpm.py             # several GPUs, DistributedDataParallel

Follows seed 004, "Diffusion Models: From Theory to Text-Guided Generation" (DDPM, class-conditional
DDPM, CLIP-guided sampling), with the collection's shared command line (README).
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import socket
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset
from tqdm import tqdm

if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):  # the torch.amp API
    sys.exit(f"error: torch {torch.__version__} is older than 2.5: pip install 'torch>=2.5'")

# ----------------------------------------------------------------------------- config

NAME = "mnist_ddpm"  # names the output folder; checkpoints record it
NET = dict(predicts="eps", width="base channels of the U-Net", depth="residual blocks per level")
DEFAULTS = dict(  # this script's values of the flags whose defaults differ between the five scripts
    width=32, depth=1, dropout=0.0, steps=1000, schedule="cosine", p_uncond=0.1, min_snr=5.0,
    iters=2000, batch_size=32, lr=5e-3, lr_decay="cosine", warmup=100, weight_decay=0.0,
    ema=0.999, val_size=0, workers=0, log_every=50, sample_every=1000, ckpt_every=500, cfg=1.5,
    per_label=10, sampler="ddim", sample_steps=20, eta=1.0)
# Sized for a laptop CPU: on 2 cores with AVX2 kernels (an Intel Xeon, an AMD EPYC) 190-257 s of
# training, about 40 s for 1,000 samples (README, bench.py --mnist-quality). DDIM with eta 1: the
# fresh noise of every step lets the network mend the last step's errors (speckle, broken strokes),
# which a deterministic sampler keeps.
PRESETS = dict(  # --preset NAME: other defaults (the command line and --config still win)
    cpu={}, gpu=dict(patch=1, mults="1,2,2", depth=2, batch_size=64, iters=5000, lr=3e-3,
                     min_snr=0.0, cfg=1.9, sampler="dpmpp", sample_steps=10, eta=0.0))
OWN_FLAGS = [  # this script's flags beyond the collection's: (flag, argparse keywords)
    ("--preset", dict(choices=sorted(PRESETS), default="cpu",
                      help="cpu: the defaults, sized for a laptop; gpu: the 28x28 U-Net, "
                           "5,000 steps of 64")),
    ("--mults", dict(default="1,2", help="channel multipliers, a level each")),
    ("--patch", dict(type=int, default=2, help="the U-Net sees p x p pixels as one (28/p pixels)"))]
EXTRAS = {}  # the source project's extras register here (last section); the rest runs without them
# a run's own names, never carried over (KEEP_OUT); what --resume may change, not the run's math
KEEP_OUT = ["out_dir", "resume", "sample", "ckpt", "config", "overwrite", "run_name"]
RESUMABLE = ["iters", "epochs", "log_every", "sample_every", "ckpt_every", "save_every", "keep",
             "workers", "device", "dtype", "compile", "tensorboard", "data_dir", "fid",
             "fid_weights"]


def die(msg):
    """Bad input: one line on stderr, exit status 2 (the exit carries the line: see begin)."""
    print(f"error: {msg}", file=sys.stderr)
    stop = SystemExit(2)
    stop.line = msg
    raise stop


def get_args(argv=None):
    """The flags with this script's DEFAULTS, OWN_FLAGS and source spellings, over a saved run's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = die  # argparse's own errors in one line too
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="./data", help="where the data set is or is downloaded to")
    g.add_argument("--image-folder", help="train on your own images, one sub-folder per class")
    g.add_argument("--limit", type=int, default=0, help="use the first N training images (0: all)")
    g.add_argument("--val-size", type=int, help="images held out for the validation loss, best.pt")
    g.add_argument("--workers", type=int, help="DataLoader processes that decode images")
    g = p.add_argument_group("model and diffusion")
    g.add_argument("--width", type=int, help=NET["width"])
    g.add_argument("--depth", type=int, help=NET["depth"])
    g.add_argument("--dropout", type=float, help="dropout probability in the blocks")
    g.add_argument("--steps", type=int, help="diffusion timesteps T of the noise schedule")
    g.add_argument("--schedule", choices=["linear", "cosine", "sigmoid"], help="noise schedule")
    g.add_argument("--p-uncond", type=float, help="probability of dropping the condition (CFG)")
    g.add_argument("--uncond", action="store_true", help="plain DDPM: the condition is never used")
    g.add_argument("--loss", choices=["mse", "l1"], default="mse", help="loss on the prediction")
    g.add_argument("--min-snr", type=float, default=0.0,
                   help="min-SNR-gamma loss weighting: min(snr, gamma) on the x0 error (0: off)")
    g = p.add_argument_group("training")
    g.add_argument("--iters", type=int, help="optimizer steps")
    g.add_argument("--epochs", type=int, default=0, help="passes over the data (0: --iters)")
    g.add_argument("--batch-size", type=int, help="images per micro-batch and device")
    g.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, help="AdamW learning rate after the warm-up")
    g.add_argument("--lr-decay", choices=["none", "cosine"], help="after the warm-up: to 0 or not")
    g.add_argument("--warmup", type=int, help="steps of linear learning-rate warm-up")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="largest gradient norm (0: off)")
    g.add_argument("--ema", type=float, help="EMA decay, warmed up as (1 + n) / (10 + n)")
    g.add_argument("--seed", type=int, default=0, help="random seed: runs are repeatable")
    g.add_argument("--log-every", type=int, help="steps between log.jsonl lines")
    g.add_argument("--sample-every", type=int, help="steps between samples_<step>.png grids")
    g.add_argument("--ckpt-every", type=int, help="steps between ckpt.pt saves")
    g.add_argument("--save-every", type=int, default=0, help="steps between kept ckpt_<step>.pt")
    g.add_argument("--keep", type=int, default=0, help="keep the newest K ckpt_<step>.pt (0: all)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir with its own settings (from its ckpt.pt); "
                        "only these may change: --" + ", --".join(RESUMABLE).replace("_", "-"))
    g = p.add_argument_group("sampling")
    g.add_argument("--sample", action="store_true", help="no training: sample from --ckpt")
    g.add_argument("--ckpt", help="checkpoint to sample from (default: the run's ckpt.pt)")
    g.add_argument("--labels", nargs="+", default=["all"], help="what to sample (see conditions)")
    g.add_argument("--per-label", type=int, help="samples of each label with --sample (a row)")
    g.add_argument("--cfg", type=float, help="guidance W: e_u + W (e_c - e_u); 0 uncond, 1 cond")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"],
                   help="ancestral DDPM on all T steps, DDIM or DPM-Solver++(2M) on --sample-steps")
    g.add_argument("--sample-steps", type=int, help="steps K of ddim and dpmpp")
    g.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 ancestral")
    g.add_argument("--gif", action="store_true", help="with --sample, also write denoise.gif")
    g.add_argument("--fid", type=int, default=0, help="FID and IS of N samples (fid.json)")
    g.add_argument("--fid-weights", default="download", help="Inception weights: download, a path")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", default=f"out/{NAME}", help="where everything is written")
    g.add_argument("--device", choices=["cuda", "mps", "cpu"], help="default: the best present")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast; auto: bf16 on CUDA 8.0+, fp16 on older CUDA, else fp32")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument("--tensorboard", action="store_true", help="also log to <out-dir>/tb")
    g.add_argument("--config", help="a run's config.json: its settings become the defaults")
    g.add_argument("--overwrite", action="store_true",
                   help="a new run in an --out-dir that holds one (its files are replaced)")
    g = p.add_argument_group(f"{NAME} and its source project")
    for flag, kw in OWN_FLAGS + EXTRAS.get("flags", []):
        g.add_argument(flag, **kw)
    p.set_defaults(**DEFAULTS)
    spellings = EXTRAS.get("spellings", {})  # the source project's flag names -> ours (None: drop)
    argv = [spellings.get(a, a) for a in (sys.argv[1:] if argv is None else argv)]
    argv = [a for a in argv if a is not None]
    args = p.parse_args(argv)
    if PRESETS.get(vars(args).get("preset")):  # a script's named set of defaults, under --config's
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    if args.config or args.resume:  # the settings of a saved run, under the command line's
        args = saved_settings(p, argv, args)
    check_args(args)
    return args


def saved_settings(p, argv, args):
    """The command line over a saved run's settings: --config's (a new run like it) or --resume's
    (the run itself: only RESUMABLE may change), never KEEP_OUT; unknown ones warned and dropped."""
    flag, source = "--config", args.config
    if args.resume:
        flag, source = "--resume", os.path.join(args.out_dir, "ckpt.pt")
        saved = fill_in(load_checkpoint(source, "cpu")["config"], vars(args), source)
    else:
        try:
            with open(source) as f:
                saved = dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            die(f"--config {source}: not a readable config.json ({type(e).__name__})")
    actions = {a.dest: a for a in p._actions}
    unknown = sorted(set(saved) - set(actions))
    saved = {k: v for k, v in saved.items() if k in actions and k not in KEEP_OUT}
    for k, v in saved.items():
        if not fits(v, getattr(args, k), actions[k].choices):
            die(f"{flag} {source}: {k} = {json.dumps(v)} is not a value of --{k.replace('_', '-')}")
    if unknown:
        print(f"warning: {flag} {source}: ignored, unknown: {', '.join(unknown)}", file=sys.stderr)
    p.set_defaults(**saved)
    new = p.parse_args(argv)
    changed = [k for k in saved if k not in RESUMABLE and getattr(new, k) != saved[k]]
    if args.resume and changed:
        die(f"--resume: --{changed[0].replace('_', '-')} {getattr(new, changed[0])} is not the "
            f"run's {saved[changed[0]]} (--help says what may change on --resume)")
    return new


def fits(value, today, choices):
    """A saved value of today's type (an int for a float; any for None), among the choices."""
    values = value if isinstance(value, list) else [value]
    ok = today is None or type(value) is type(today) or (type(today), type(value)) == (float, int)
    return value == today or ok and (not choices or all(v in choices for v in values))


def fill_in(saved, today, source):
    """A saved run's settings; today's for any it lacks (an older script's), said in one line."""
    missing = sorted(set(today) - set(saved) - set(KEEP_OUT))
    if missing:
        print(f"note: {source} has no {', '.join(missing)}: today's values", file=sys.stderr)
    return {**today, **saved}


def check_args(a):
    """The range of every setting, in one table: the first one outside ends the run, in one line."""
    abar_T = torch.prod(1 - make_betas(a.schedule, max(a.steps, 1))).item()  # x_T's signal^2
    out = a.out_dir if os.path.isdir(a.out_dir) else None  # a link there: a write would follow it
    links = [n for n in os.listdir(out) if os.path.islink(os.path.join(out, n))] if out else []
    checks = [("--steps", a.steps > 0, "> 0"), ("--iters", a.iters > 0, "> 0"),
              ("--epochs", a.epochs >= 0, ">= 0"), ("--batch-size", a.batch_size > 0, "> 0"),
              ("--accum", a.accum > 0, "> 0"), ("--lr", a.lr > 0, "> 0"),
              ("--warmup", a.warmup >= 0, ">= 0"), ("--weight-decay", a.weight_decay >= 0, ">= 0"),
              ("--grad-clip", a.grad_clip >= 0, ">= 0"), ("--ema", 0 <= a.ema < 1, "in [0, 1)"),
              ("--p-uncond", 0 <= a.p_uncond < 1, "in [0, 1)"), ("--width", a.width > 0, "> 0"),
              ("--depth", a.depth > 0, "> 0"), ("--dropout", 0 <= a.dropout < 1, "in [0, 1)"),
              ("--limit", a.limit >= 0, ">= 0"), ("--val-size", a.val_size >= 0, ">= 0"),
              ("--workers", a.workers >= 0, ">= 0"), ("--log-every", a.log_every > 0, "> 0"),
              ("--sample-every", a.sample_every > 0, "> 0"), ("--keep", a.keep >= 0, ">= 0"),
              ("--ckpt-every", a.ckpt_every > 0, "> 0"), ("--cfg", a.cfg >= 0, ">= 0"),
              ("--save-every", a.save_every >= 0, ">= 0"), ("--per-label", a.per_label > 0, "> 0"),
              ("--sample-steps", a.sample_steps > 0, "> 0"), ("--eta", 0 <= a.eta <= 1, "in [0,1]"),
              ("--min-snr", a.min_snr >= 0, ">= 0"),
              ("--min-snr", not a.min_snr or a.loss == "mse", "0 with --loss l1 (it weighs MSE)"),
              ("--fid", a.fid == 0 or a.fid >= 10, "0 or >= 10 (IS splits the samples in 10)"),
              ("--steps", abar_T <= 0.01, f"enough for the {a.schedule} schedule to reach noise"),
              ("--config", not (a.config and a.resume), "unset with --resume (it has its own)"),
              ("--out-dir", not links, f"free of symbolic links (it has {links[:1]})"),
              ("--tensorboard", not a.tensorboard or importlib.util.find_spec("tensorboard"),
               "unset without the tensorboard package (pip install tensorboard)")]
    for flag, ok, rule in checks:
        if not ok:
            die(f"{flag} {getattr(a, flag[2:].replace('-', '_'))}: must be {rule}")
    for k, v in vars(a).items():
        try:
            json.dumps(v, allow_nan=False)  # no flag takes inf or nan (nor does config.json)
        except ValueError:
            die(f"--{k.replace('_', '-')} {v}: must be finite")


# ----------------------------------------------------------------------------- data

META = dict(classes=[str(i) for i in range(10)], channels=1, size=28, hflip=False,
            fid_ref="mnist-test")  # the facts of the data set (get_data's meta for MNIST)


def get_data(config, split="train"):
    """(data set of (uint8 [1, 28, 28] image, label) pairs, meta): MNIST's training set, or for
    split="fid" the FID reference (its test set); or --image-folder (its own reference)."""
    if config["image_folder"]:
        images, labels, classes = image_folder(config["image_folder"], 28, 1)
        return TensorDataset(images, labels), dict(META, classes=classes, fid_ref="image-folder")
    root = config["data_dir"]
    ds = download_once(lambda: torchvision.datasets.MNIST(root, split == "train", download=True),
                       f"put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-"
                       f"ubyte and t10k-labels-idx1-ubyte in {root}/MNIST/raw/")
    return TensorDataset(ds.data[:, None], ds.targets), dict(META)


def conditions(labels, per_label, meta, config):
    """(cond, drop, row length) of --labels: class names or indices, 'uncond', or 'all'."""
    return label_conds(labels, per_label, meta, config["uncond"])


def image_folder(path, size, channels):
    """uint8 [N, C, size, size] images (resized, centre-cropped), labels, classes of an ImageFolder
    tree in a fixed random order (--limit and the held-out images see every class); hidden files
    and folders (.ipynb_checkpoints, ._x.png) skipped with a note."""
    if not os.path.isdir(path):
        die(f"--image-folder {path}: not a folder")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and e.name[0] != ".")
    files, hidden = [], sum(e.name[0] == "." for e in os.scandir(path))
    for c, name in enumerate(classes):
        for root, _, names in sorted(os.walk(os.path.join(path, name), followlinks=True)):
            for n in sorted(names):
                f = os.path.join(root, n)
                if any(part[0] == "." for part in os.path.relpath(f, path).split(os.sep)):
                    hidden += 1
                elif n.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS):
                    files.append((f, c))
    empty = sorted(set(classes) - {classes[c] for _, c in files})
    if not classes or empty:
        die(f"--image-folder {path}: no images in {empty or 'class folders'}")
    if hidden and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: --image-folder: {hidden} hidden files and folders skipped (names with '.')")
    tf = torchvision.transforms
    resize = tf.Compose([tf.Resize(size), tf.CenterCrop(size), tf.PILToTensor()])
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    images = [resize(picture(files[i][0], channels)) for i in
              tqdm(order, desc="reading images", leave=False, disable=None)]  # None: a terminal
    return torch.stack(images), torch.tensor([files[i][1] for i in order]), classes


def picture(path, channels):
    """An image file as the 8-bit L or RGB picture it shows: 16- and 32-bit grey scaled (not
    clipped), transparency over white, an animation's first frame; or one line naming the file."""
    try:
        with Image.open(path) as im:
            if im.mode == "F":
                raise ValueError("floating-point pixels; save it with 8 or 16 bits")
            if im.mode.startswith("I"):  # 16-bit PNG, TIFF: 0..65535
                im = im.convert("I").point(lambda v: v * (1 / 257))
            if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            return im.convert("L" if channels == 1 else "RGB")
    except Exception as e:  # whatever Pillow raises for a file it cannot show (OSError, bomb ...)
        die(f"--image-folder: {path} is not a readable image ({type(e).__name__}: {e})")


def download_once(fetch, where):
    """A torchvision data set, downloaded by one process per machine while the others wait."""
    wait = dist.is_initialized() and int(os.environ.get("LOCAL_RANK", 0)) > 0
    if wait:
        dist.barrier()
    try:
        ds = fetch()
    except Exception as e:  # no network, or broken files: say which files go where
        die(f"could not read or download the data set ({type(e).__name__}); {where}")
    finally:  # the others go on also when this process failed (and stop too, see begin)
        if dist.is_initialized() and not wait:
            dist.barrier()
    return ds


def split_data(data, limit, val_size):
    """(train, val): the last val_size images (at most a tenth) held out, the --limit first."""
    n = len(data) - min(val_size, len(data) // 10)
    return Subset(data, torch.arange(min(limit or n, n))), Subset(data, torch.arange(n, len(data)))


def batches(n, batch_size, seed, rank, world, start):
    """Index batches forever, each rank its share; a seed and start give the same (--resume)."""
    sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler))
        for b in range(skip, per_epoch):
            yield idx[b * batch_size:(b + 1) * batch_size]
        epoch, skip = epoch + 1, 0


def loader(data, batch_size, seed, rank, world, start, workers, device):
    """(uint8 images, conditions) batches from `start` on; its own generator (exact --resume)."""
    if len(data) // world < batch_size:
        die(f"--batch-size {batch_size} is larger than the data set ({len(data) // world} images "
            f"per device)")
    return iter(DataLoader(data, batch_size=None, num_workers=workers, generator=torch.Generator(),
                           sampler=batches(len(data), batch_size, seed, rank, world, start),
                           pin_memory=device.type == "cuda", persistent_workers=workers > 0))


def to_model(images, device):
    """uint8 [0, 255] -> float [-1, 1] on the device, channels_last (faster convolutions)."""
    x = images.to(device, non_blocking=True).float() / 127.5 - 1
    return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- model

def timestep_embedding(t, dim):
    """Sinusoidal embedding: [sin(t * f_k), cos(t * f_k)], f_k = 10000^(-k / (dim/2 - 1))."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; FiLM by the embedding: h = norm(h) * (1 + scale) + shift."""

    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
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
        self.heads = heads
        self.norm = nn.GroupNorm(8, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # [B, heads, H*W, C/heads] each
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """U-Net with a level per multiplier (28 -> 14 -> 7 pixels for 1,2,2): residual blocks,
    attention at the 7x7 bottleneck, skips concatenated. With patch p the first level sees p x p
    pixels as p^2 channels (PixelUnshuffle), for p^2 times fewer FLOPs in the costliest level.
    The label embedding (row n_classes: the null label of CFG) is added to the time embedding."""

    def __init__(self, width, depth, mults, patch, n_classes=10, dropout=0.0):
        super().__init__()
        emb_dim, chs = 4 * width, [width * m for m in mults]
        self.width, self.null = width, n_classes
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(n_classes + 1, emb_dim)
        self.stem = nn.Sequential(nn.PixelUnshuffle(patch),
                                  nn.Conv2d(patch ** 2, width, 3, padding=1))
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
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2),
                                             nn.Conv2d(c, c, 3, padding=1)))
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(),
                                 nn.Conv2d(c, patch ** 2, 3, padding=1), nn.PixelShuffle(patch))

    def forward(self, x, t, y, drop):
        y = torch.where(drop, self.null, y)
        emb = self.time_mlp(timestep_embedding(t, self.width)) + self.label_emb(y)
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


def build_model(config, meta):
    """The network for a run's settings and its data's facts; one it cannot build ends the run."""
    try:
        mults = [int(m) for m in config["mults"].split(",")]
    except ValueError:
        mults = [0]
    if min(mults) < 1:
        die(f"--mults {config['mults']}: must be positive integers, e.g. 1,2,2")
    if config["patch"] < 1 or 28 % (config["patch"] * 2 ** (len(mults) - 1)):
        die(f"--patch {config['patch']} --mults {config['mults']}: 28 pixels must halve evenly "
            f"at every level")
    if config["width"] % 8:
        die(f"--width {config['width']}: must be a multiple of 8 (GroupNorm's 8 groups)")
    return UNet(config["width"], config["depth"], mults, config["patch"], len(meta["classes"]),
                config["dropout"])


# ----------------------------------------------------------------------------- diffusion

def make_betas(schedule, T):
    """beta_1..beta_T, each below 0.999 so that abar_T > 0 however short the schedule."""
    if schedule == "cosine":  # Nichol & Dhariwal: abar(t) = f(t) / f(0), f = cos(...)^2
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2)
        return (1 - f[1:] ** 2 / f[:-1] ** 2).clamp(max=0.999)
    if schedule == "sigmoid":  # sigmoid(linspace(-6, 6)) between 1e-4 and 0.02
        betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (0.02 - 1e-4) + 1e-4
    else:  # linear (Ho et al.): 1e-4 .. 0.02
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return (betas * 1000 / T).clamp(max=0.999)  # those are for T=1000: any T ends as noisy


def make_alphas_cumprod(schedule, T, device):
    """abar_t = prod_{s <= t} (1 - beta_s), float32 on the device."""
    return torch.cumprod(1 - make_betas(schedule, T), 0).float().to(device)


def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps"""
    abar = alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def loss_target(x0, noise, abar):
    """What the network learns to predict: the noise eps (Ho et al.)."""
    return noise


def eps_from_pred(pred, x, abar):
    """The network's prediction as the noise eps that the samplers take: it is eps."""
    return pred


def p_losses(model, x0, cond, alphas_cumprod, p_uncond, loss="mse", min_snr=0.0, t=None,
             noise=None, drop=None):
    """||loss_target - model(x_t, t, cond)||^2 (or L1), x_t = q_sample(x0, t, eps), the condition
    dropped with probability p_uncond (CFG), min-SNR-gamma weighted if min_snr > 0; t, eps and the
    drops from the CPU generator (which --resume restores on any device) unless given."""
    B, device = x0.shape[0], x0.device
    t = torch.randint(0, len(alphas_cumprod), (B,)).to(device) if t is None else t
    noise = torch.randn(x0.shape).to(device) if noise is None else noise
    drop = (torch.rand(B) < p_uncond).to(device) if drop is None else drop
    pred = model(q_sample(x0, t, noise, alphas_cumprod), t, cond, drop).float()
    abar = alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))
    target = loss_target(x0, noise, abar)
    error = (pred - target).square() if loss == "mse" else (pred - target).abs()
    if min_snr:  # min-SNR-gamma (Hang et al.): the implied x0 error weighted by min(snr, gamma).
        # At fixed x_t an x0 error d is an eps error -sqrt(snr) d, so a target error k d with
        # k = loss_target(1, -sqrt(snr)) (it is linear): k^2 = snr for eps, snr + 1 for v
        snr = abar / (1 - abar)
        k = loss_target(torch.ones_like(snr), -snr.sqrt(), abar)
        error = error * snr.clamp(max=min_snr) / k.square()
    return error.mean()


@torch.no_grad()
def eval_loss(model, data, alphas_cumprod, config, dtype, batch_size=250):
    """Mean loss over `data`, condition kept, on timesteps and noise fixed by seed 0: comparable
    between steps, and the training's random streams are untouched."""
    g, total, device = torch.Generator().manual_seed(0), 0.0, alphas_cumprod.device
    for idx in torch.arange(len(data)).split(batch_size):
        images, cond = data[idx]
        x0 = to_model(images, device)
        t = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        drop = torch.full((len(x0),), config["uncond"], device=device)
        with autocast(dtype, device):
            loss = p_losses(model, x0, cond.to(device), alphas_cumprod, 0, config["loss"],
                            config["min_snr"], t, noise, drop)
        total += loss.item() * len(x0)
    return total / len(data)


# ----------------------------------------------------------------------------- sampling

def cfg_denoiser(model, cond, drop, w, rows=100):
    """Guided prediction pred_u + w * (pred_c - pred_u) (w=0 unconditional, w=1 conditional), both
    halves in one doubled batch; rows with drop stay unconditional. A CPU takes `rows` at a time."""
    def net(*inputs):  # one batch of 2,000 rows outgrows a CPU's caches: 12.6 s vs 8.2 s by 100
        size = rows if inputs[0].device.type == "cpu" else len(inputs[0])
        return torch.cat([model(*part) for part in zip(*(v.split(size) for v in inputs))]).float()

    if w in (0, 1) or drop.all():  # one half is enough
        d = torch.ones_like(drop) if w == 0 else drop
        return lambda x, t: net(x, t, cond, d)

    def pred_fn(x, t):
        pred_c, pred_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]),
                             torch.cat([drop, torch.ones_like(drop)])).chunk(2)
        return pred_u + w * (pred_c - pred_u)
    return pred_fn


def denoiser(model, cond, drop, w, alphas_cumprod):
    """eps(x, t) for the samplers: the guided prediction as eps, the clean image it implies clipped
    to [-1, 1] and eps recomputed. Near t = T, x0 = (x - sqrt(1-abar) eps) / sqrt(abar) multiplies
    any error of eps by 1/sqrt(abar) (2e4 with the cosine schedule)."""
    pred_fn = cfg_denoiser(model, cond, drop, w)

    def eps_fn(x, t):
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = eps_from_pred(pred_fn(x, t), x, abar)
        x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    return eps_fn


def ddim_timesteps(t_start, steps):
    """`steps` timesteps evenly from t_start down to 0."""
    return torch.linspace(t_start, 0, steps).round().long().tolist()


def dpmpp_timesteps(alphas_cumprod, t_start, steps):
    """`steps` timesteps evenly in lambda = log(alpha / sigma), from t_start or from lambda = -5
    (where x_t is pure noise already; the cosine schedule reaches -10: wasted steps) down to 0."""
    lam = 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod)).cpu()
    grid = torch.linspace(max(lam[t_start].item(), -5.0), lam[0].item(), steps)
    return sorted({int((lam - g).abs().argmin()) for g in grid}, reverse=True)


def ddim_sample(eps_fn, x, alphas_cumprod, timesteps, eta=0.0, generator=None, callback=None):
    """DDIM (Song et al.) from x at timesteps[0] down to the clean image; eta=1 on every timestep is
    DDPM's ancestral sampler. callback(x, t) returns each step's x: recorded, or steered."""
    for i, t in enumerate(tqdm(timesteps, "sampling", leave=False, disable=len(timesteps) < 50)):
        abar = alphas_cumprod[t]
        abar_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else abar ** 0
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device))
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        # sigma^2 = eta^2 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        if callback is not None:
            x = callback(x, t)
    return x


def dpmpp_sample(eps_fn, x, alphas_cumprod, timesteps, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, lambda = log(alpha / sigma), from x at
    timesteps[0] down the timesteps; the last step, to the clean image, is first order."""
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    lam = torch.log(alpha / sigma)
    x0_prev, h_prev = None, None
    for i, t in enumerate(tqdm(timesteps, "sampling", leave=False, disable=len(timesteps) < 50)):
        x0 = (x - sigma[t] * eps_fn(x, torch.full((x.shape[0],), t, device=x.device))) / alpha[t]
        if i + 1 == len(timesteps):
            x = x0
        else:
            s = timesteps[i + 1]
            h = lam[s] - lam[t]
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)  # 2nd order
            x = sigma[s] / sigma[t] * x - alpha[s] * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            x = callback(x, t)
    return x


@torch.no_grad()  # not inference_mode: a steering callback may take gradients
def generate(model, cond, drop, alphas_cumprod, shape, seed=0, sampler="ddim", steps=50, eta=0.0,
             w=1.0, x=None, t_start=None, columns=None, callback=None):
    """Images in [-1, 1] for the rows of cond (drop: unconditional) from fixed seeds: from noise
    (`columns`: a grid whose rows share their noise, so they differ by condition only), or from x
    at t_start (a reconstruction). ddpm walks every timestep; ddim and dpmpp take `steps`."""
    T, g = len(alphas_cumprod), torch.Generator().manual_seed(seed)
    if x is None:
        x, t_start = torch.randn((columns or len(cond), *shape), generator=g), T - 1
        x = x.repeat(len(cond) // len(x), 1, 1, 1)
    x = x.to(alphas_cumprod.device).contiguous(memory_format=torch.channels_last)
    K = max(1, round(min(steps, T) * (t_start + 1) / T))
    eps_fn = denoiser(model, cond.to(x.device), drop.to(x.device), w, alphas_cumprod)
    if sampler == "dpmpp":
        ts = dpmpp_timesteps(alphas_cumprod, t_start, K)
        return dpmpp_sample(eps_fn, x, alphas_cumprod, ts, callback).clamp(-1, 1)
    if sampler == "ddpm":
        K, eta = t_start + 1, 1.0
    ts = ddim_timesteps(t_start, K)
    return ddim_sample(eps_fn, x, alphas_cumprod, ts, eta, g, callback).clamp(-1, 1)


def sampling(config):
    """The sampler settings of a run's or the command line's config, as generate's keywords."""
    return dict(sampler=config["sampler"], steps=config["sample_steps"], eta=config["eta"],
                w=config["cfg"])


def tracer(trace, rows=slice(None)):
    """A sampler callback keeping every step's x (its `rows`) on the CPU: path figures, GIFs."""
    def keep(x, t):
        trace.append(x[rows].cpu())
        return x
    return keep


def label_conds(labels, per_label, meta, uncond):
    """(labels, drop, row length) of --labels (names, indices, uncond, all), per_label a row."""
    classes = meta["classes"]
    words = [w.strip() for text in labels for w in text.split(",") if w.strip()]
    if uncond or words == ["all"]:
        words = ["uncond"] if uncond else classes + ["uncond"]
    names, rows = classes + ["uncond"], []
    for w in words:
        if w not in names and not (w.isdigit() and int(w) <= len(classes)):
            die(f"--labels: unknown class {w!r} (use {', '.join(classes)}, 0-{len(classes)}, "
                f"uncond or all)")
        rows.append(names.index(w) if w in names else int(w))
    y = torch.tensor(rows).repeat_interleave(per_label)
    return y.clamp(max=len(classes) - 1), y == len(classes), per_label


def save_grid(x, path, nrow):
    """Images in [-1, 1] as one PNG, nrow to a row."""
    torchvision.utils.save_image(x * 0.5 + 0.5, path, nrow=nrow, padding=1, pad_value=1.0)


def path_figure(trace, path):
    """Denoising paths: a row per traced sample, 10 columns from noise to image."""
    cols = torch.linspace(0, len(trace) - 1, min(len(trace), 10)).round().long().tolist()
    save_grid(torch.stack([trace[c] for c in cols], 1).flatten(0, 1).clamp(-1, 1), path, len(cols))


def save_gif(trace, path, nrow):
    """denoise.gif: one frame per sampler step (at most 50), the whole grid in each."""
    frames = torch.linspace(0, len(trace) - 1, min(len(trace), 50)).round().long().tolist()
    imgs = []
    for f in frames:
        grid = torchvision.utils.make_grid(trace[f].clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=1)
        imgs.append(Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()))
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=80, loop=0)


# ------------------------------------------------------------------- EMA, checkpoints, system

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model; buffers copied."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def save_checkpoint(path, state):
    """A temporary file of its own, flushed to the disk, renamed over `path` (the folder flushed): a
    crash, a power cut or a full disk never leaves a broken file, nor loses the previous one."""
    folder, tmp = os.path.dirname(path) or ".", None
    try:
        fd, tmp = tempfile.mkstemp(".tmp", os.path.basename(path) + ".", folder)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # POSIX: the folder's entry too
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
    except (OSError, RuntimeError) as e:  # a full disk: RuntimeError "... unexpected pos ..."
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        reason = str(e).splitlines()[0] if isinstance(e, OSError) else "no space left on the device"
        sys.exit(f"error: {reason} while writing {path}; the previous one is kept")


def load_checkpoint(path, device):
    """A checkpoint of this script, read as tensors and plain values only (it cannot run code)."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path} (train first, or pass --ckpt)")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ck, dict) or ck.get("script") != NAME:
        die(f"{path} is not a checkpoint of {NAME}.py")
    if ck.get("predicts", NET["predicts"]) != NET["predicts"]:  # the script changed since
        die(f"{path}: its network predicts {ck['predicts']}, this script's {NET['predicts']}")
    return ck


def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError:
        die(f"{path} does not match this model (check --width, --depth and the data)")


def setup(name):
    """The device (the best present unless named), DDP when torchrun sets RANK: NCCL, CPU gloo."""
    present = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    name = name or next(k for k, ok in present.items() if ok)
    if not present[name]:
        die(f"--device {name}: not present on this machine")
    ddp, rank, world = "RANK" in os.environ, 0, 1
    if ddp:
        dist.init_process_group("nccl" if name == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(name)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(name), ddp, rank, world


def amp_dtype(name, device):
    """--dtype as autocast's dtype (None: fp32). auto: bf16 where the GPU computes in bf16 (compute
    capability 8.0 on), fp16 with loss scaling on older GPUs (T4, V100, P100), else fp32."""
    if name == "auto" and device.type == "cuda":
        name = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


def autocast(dtype, device):
    return torch.autocast(device.type, dtype) if dtype else nullcontext()


def rng_states(device):
    """This process's random streams: the CPU's and the GPU's (dropout draws there)."""
    states = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def lock(out_dir, new):
    """Claim --out-dir with an OS lock on out_dir/lock, freed when the process ends however it ends:
    a second run, or a new one (`new`) where a run's files are, stops in one line."""
    path = os.path.join(out_dir, "lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+")
        try:  # exclusive, without waiting, on the file still at `path` (not one unlock removed)
            if os.name == "nt":  # Windows
                import msvcrt
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                raise FileNotFoundError(path)
        except OSError:
            die(f"--out-dir {out_dir}: in use by another run (its process is named in {path})")
        f.truncate(0)
        print(socket.gethostname(), os.getpid(), file=f, flush=True)  # who holds it, for people
    except OSError as e:
        die(f"--out-dir {out_dir}: cannot write there ({e.strerror})")
    held = [n for n in ("ckpt.pt", "log.jsonl", "config.json") if os.path.exists(f"{out_dir}/{n}")]
    if new and held:
        unlock(f)
        die(f"--out-dir {out_dir} holds a run ({held[0]}): --resume continues it, --overwrite "
            f"replaces it, or choose another --out-dir")
    return f


def unlock(f):
    """Remove the lock file, then close it, which frees the OS lock (Windows: close it only)."""
    if os.name != "nt":
        os.remove(f.name)
    f.close()


# ----------------------------------------------------------------------------- training

def new_run(config, meta, device, dtype):
    """What training and sampling both need: model, EMA copy, noise schedule, image shape."""
    model = build_model(config, meta).to(device).to(memory_format=torch.channels_last)
    return SimpleNamespace(config=config, meta=meta, model=model, device=device, dtype=dtype,
                           ema=copy.deepcopy(model).eval().requires_grad_(False), step=0,
                           alphas_cumprod=make_alphas_cumprod(config["schedule"], config["steps"],
                                                              device),
                           shape=(meta["channels"], meta["size"], meta["size"]), writer=None)


def build_run(args, device, rank, world):
    """Data, model, EMA, optimizer, loss scaler, with --resume its state; writes nothing."""
    torch.manual_seed(args.seed + rank)  # each rank its own noise, timesteps, drops and flips
    data, meta = get_data(vars(args))
    run = new_run(vars(args), meta, device, amp_dtype(args.dtype, device))
    run.train_set, run.val_set = split_data(data, args.limit, args.val_size)
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=args.lr, fused=device.type == "cuda",
                                weight_decay=args.weight_decay)
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.dtype == torch.float16)
    run.per_epoch = len(run.train_set) // (args.batch_size * args.accum * world)
    run.total = args.epochs * max(run.per_epoch, 1) if args.epochs else args.iters
    run.ckpt, run.best_val, run.state = os.path.join(args.out_dir, "ckpt.pt"), math.inf, {}
    run.periodic = []  # the steps of this run's ckpt_<step>.pt files (--keep removes only those)
    if args.resume:  # weights, EMA, optimizer, scaler, step, the extras' state, random streams
        ck = load_checkpoint(run.ckpt, device)
        if len(ck["rng"]) != world:
            die(f"--resume: {run.ckpt} was trained by {len(ck['rng'])} processes, not {world}")
        load_weights(run.model, ck["model"], run.ckpt)
        load_weights(run.ema, ck["ema"], run.ckpt)
        run.opt.load_state_dict(ck["opt"])
        if ck["scaler"]:  # empty when trained without fp16: a fresh scaler starts
            run.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"][rank]["cpu"].cpu())
        if "cuda" in ck["rng"][rank] and device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"][rank]["cuda"].cpu(), device)
        run.step, run.best_val, run.state = ck["step"], ck["best_val"], ck["extras"]
        run.periodic = ck.get("periodic", [])
    if run.step >= run.total:
        die(f"--resume: {run.ckpt} is at step {run.step} already (raise --iters or --epochs)")
    return run


def begin(args, device, ddp, rank, world):
    """Every rank's run and batch stream, then --out-dir locked by rank 0. A rank that cannot start
    (data, a bad checkpoint, the lock) stops every rank with its line, none left in a collective."""
    run, held, failure = None, None, None
    try:
        run = build_run(args, device, rank, world)
        run.stream = loader(run.train_set, args.batch_size, args.seed, rank, world,
                            run.step * args.accum, args.workers, device)
        held = lock(args.out_dir, not (args.resume or args.overwrite)) if rank == 0 else None
    except SystemExit as e:
        failure = e
    lines = [getattr(failure, "line", failure and f"rank {rank} stopped")] * world
    if ddp:
        dist.all_gather_object(lines, lines[0])
    if held and any(lines):
        unlock(held)
    if failure:
        raise failure
    if any(lines):
        die(next(line for line in lines if line))
    run.lock_file = held
    return run


def start_run(args, run, world):
    """Rank 0, once every rank can start: config.json, log.jsonl cut back to the resumed step (a
    crash trains the steps since the last checkpoint again), an --overwrite's old best.pt gone."""
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(run.config, f, indent=2)
    log = os.path.join(args.out_dir, "log.jsonl")
    if os.path.exists(log):
        with open(log) as f:
            lines = [line for line in f if line.endswith("\n")]  # a kill -9 may cut the last one
        with open(log, "w") as f:
            f.writelines(line for line in lines if json.loads(line)["step"] <= run.step)
    if not args.resume and os.path.exists(f"{args.out_dir}/best.pt"):  # --overwrite: not this run's
        os.remove(f"{args.out_dir}/best.pt")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        run.writer = SummaryWriter(os.path.join(args.out_dir, "tb"))
    print(f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(run.train_set)} images + {len(run.val_set)} held out, global batch "
          f"{args.batch_size * args.accum * world}, {run.per_epoch} steps per epoch, "
          f"{run.device}, autocast {run.dtype}")


def get_lr(step, lr, warmup, total, decay):
    """Linear warm-up over `warmup` steps, then constant or (decay "cosine") down to 0 at total."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if decay == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return lr


def train_step(model, wrapped, run, micro, ddp):
    """One optimizer step on the micro-batches (DDP all-reduces on the last only); the mean loss.
    Under fp16 the loss is scaled and the scaler skips a step whose gradients are not finite."""
    c = run.config
    run.opt.zero_grad(set_to_none=True)
    total = 0.0
    for i, (images, cond) in enumerate(micro):
        x0 = to_model(images, run.device)
        if run.meta["hflip"]:  # random horizontal flips, drawn from the CPU generator
            flip = (torch.rand(len(x0)) < 0.5).to(run.device)
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
        with wrapped.no_sync() if ddp and i + 1 < len(micro) else nullcontext():
            with autocast(run.dtype, run.device):
                loss = p_losses(model, x0, cond.to(run.device), run.alphas_cumprod,
                                1.0 if c["uncond"] else c["p_uncond"], c["loss"],
                                c["min_snr"]) / len(micro)
            run.scaler.scale(loss).backward()
        total = total + loss.detach()
    run.scaler.unscale_(run.opt)
    if c["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), c["grad_clip"])
    run.scaler.step(run.opt)
    run.scaler.update()
    return total


def log_record(losses, step, lr, seconds, run, ddp, world):
    """The log line: mean loss of the steps since the last line over all ranks, lr, images/s. Under
    fp16 a non-finite loss is a step the scaler skipped (counted); otherwise it stops the run."""
    losses = torch.stack(losses)
    ok = losses.isfinite()
    sums = torch.stack([torch.where(ok, losses, 0).sum(), ok.sum(), (~ok).sum()]).float()
    if ddp:
        dist.all_reduce(sums)
    if sums[2] and run.dtype != torch.float16:
        sys.exit(f"error: the loss is not finite at step {step}; stopped, {run.ckpt} is kept")
    n = len(losses) * run.config["batch_size"] * run.config["accum"] * world
    rec = dict(step=step, loss=(sums[0] / sums[1].clamp(min=1)).item(), lr=lr,
               img_per_s=n / seconds, elapsed=time.time() - run.t0)
    if run.dtype == torch.float16:
        rec["skipped"] = int(sums[2])
    return rec


def write_log(rec, run):
    with open(os.path.join(run.config["out_dir"], "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    for k, v in rec.items():
        if run.writer and k not in ("step", "elapsed"):
            run.writer.add_scalar(k, v, rec["step"])


def save_run(run, step, periodic, ddp, world, master):
    """ckpt.pt, best.pt at the EMA model's lowest validation loss, periodic ckpt_<step>.pt (newest
    --keep); every rank's random streams gathered; non-finite weights never saved: the run stops."""
    rng = [rng_states(run.device)] * world
    if ddp:
        dist.all_gather_object(rng, rng[0])
    if not all(p.isfinite().all() for m in (run.model, run.ema) for p in m.parameters()):
        sys.exit(f"error: the weights are not finite at step {step}; stopped, {run.ckpt} is kept")
    if not master:
        return
    out, keep, improved = run.config["out_dir"], run.config["keep"], False
    if len(run.val_set):
        val = eval_loss(run.ema, run.val_set, run.alphas_cumprod, run.config, run.dtype)
        improved, run.best_val = val < run.best_val, min(val, run.best_val)
        write_log(dict(step=step, val_loss=val), run)
    run.periodic = run.periodic + [step] * bool(periodic)
    drop = run.periodic[:-keep] if keep else []  # this run's own, older than the newest K
    run.periodic = run.periodic[len(drop):]
    state = dict(script=NAME, model=run.model.state_dict(), ema=run.ema.state_dict(),
                 opt=run.opt.state_dict(), scaler=run.scaler.state_dict(), step=step, rng=rng,
                 config=run.config, meta=run.meta, best_val=run.best_val, extras=run.state,
                 periodic=run.periodic, predicts=NET["predicts"])
    for name in ["ckpt.pt"] + ["best.pt"] * improved + [f"ckpt_{step}.pt"] * periodic:
        save_checkpoint(os.path.join(out, name), state)
    for s in drop:
        os.remove(os.path.join(out, f"ckpt_{s}.pt"))


def sample_grid(run, step, trace=None):
    """samples_<step>.png: the EMA model on the rows of conditions(["all"]), --per-label each, from
    fixed seeds, so that grids of different steps compare; `trace` keeps each row's first path."""
    cond, drop, nrow = conditions(["all"], run.config["per_label"], run.meta, run.config)
    callback = None if trace is None else tracer(trace, slice(None, None, nrow))
    with autocast(run.dtype, run.device):
        x = generate(run.ema, cond, drop, run.alphas_cumprod, run.shape, run.config["seed"],
                     **sampling(run.config), columns=nrow, callback=callback)
    save_grid(x, os.path.join(run.config["out_dir"], f"samples_{step}.png"), nrow)
    if run.writer:
        run.writer.add_image("samples", torchvision.utils.make_grid(x * 0.5 + 0.5, nrow=nrow), step)
    return x


def reconstruction(run, path, fracs=(0.25, 0.5, 0.75, 1.0)):
    """reconstruction.png: up to 8 training images (rows), noised to t = T/4, T/2, 3T/4, T-1 and
    restored by the EMA model with their condition (w=1); returns the restored images' MSE per t."""
    images, cond = run.train_set[torch.arange(min(8, len(run.train_set)))]
    x0, T = to_model(images, run.device), len(run.alphas_cumprod)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(run.device)
    drop = torch.full((len(x0),), run.config["uncond"])
    cols, errors = [x0], {}
    for t in [round(f * (T - 1)) for f in fracs]:
        xt = q_sample(x0, torch.full((len(x0),), t, device=run.device), noise, run.alphas_cumprod)
        with autocast(run.dtype, run.device):
            x = generate(run.ema, cond, drop, run.alphas_cumprod, run.shape,
                         **dict(sampling(run.config), w=1.0), x=xt, t_start=t)
        cols += [xt.clamp(-1, 1), x]
        errors[t] = round(F.mse_loss(x.float(), x0).item(), 4)
    save_grid(torch.stack(cols, 1).flatten(0, 1), path, len(cols))
    return errors


def train(args, device, ddp, rank, world):
    """Train with the command line's settings, saving as it goes; returns the run (for --fid)."""
    run, master = begin(args, device, ddp, rank, world), rank == 0
    wrapped = run.model
    if ddp:
        wrapped = DDP(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    model = torch.compile(wrapped) if args.compile else wrapped
    try:
        if master:
            start_run(args, run, world)
        losses, run.t0, t_log = [], time.time(), time.time()
        if master and "train" in EXTRAS:  # the source project's figures (last section)
            EXTRAS["train"](run, run.step)
        pbar = tqdm(range(run.step, run.total), initial=run.step, total=run.total,
                    disable=not master)
        for step in pbar:
            # learning rate: linear warm-up, then constant or cosine decay (--lr-decay)
            lr = get_lr(step, args.lr, args.warmup, run.total, args.lr_decay)
            for group in run.opt.param_groups:
                group["lr"] = lr

            # forward, backward and update on --accum micro-batches, then the EMA (warmed up)
            micro = [next(run.stream) for _ in range(args.accum)]
            losses.append(train_step(model, wrapped, run, micro, ddp))
            update_ema(run.ema, run.model, min(args.ema, (1 + step) / (10 + step)))
            done = step + 1
            last, periodic = done == run.total, args.save_every and done % args.save_every == 0
            save = last or periodic or done % args.ckpt_every == 0

            # logging, also before every save: a non-finite loss stops the run before it
            if done % args.log_every == 0 or save:
                rec = log_record(losses, done, lr, time.time() - t_log, run, ddp, world)
                losses, t_log = [], time.time()
                if master:
                    write_log(rec, run)
                    pbar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.1f}")

            # checkpoint: ckpt.pt (atomically), best.pt, ckpt_<step>.pt every --save-every steps
            if save:
                run.step = done
                save_run(run, done, periodic, ddp, world, master)

            # sample grid of the EMA model (the last one's denoising paths), the extras' figures
            if master and (done % args.sample_every == 0 or last):
                trace = [] if last else None
                sample_grid(run, done, trace)
                if last:
                    path_figure(trace, os.path.join(args.out_dir, "reverse.png"))
                t_log = time.time()  # images/s counts training only
            if master and "train" in EXTRAS:
                EXTRAS["train"](run, done)
        if master:
            errors = reconstruction(run, os.path.join(args.out_dir, "reconstruction.png"))
            print(f"done: step {run.total} in {time.time() - run.t0:.0f}s, loss {rec['loss']:.4f}, "
                  f"reconstruction MSE by t {errors} -> {args.out_dir}")
    finally:
        if run.lock_file:
            unlock(run.lock_file)
    return run


# ----------------------------------------------------------------------------- entry points

def load_run(path, device, dtype, today):
    """A checkpoint's EMA model, built from its config (today's where it lacks one) and meta."""
    ck = load_checkpoint(path, device)
    run = new_run(fill_in(ck["config"], today, path), ck["meta"], device, dtype)
    load_weights(run.ema, ck["ema"], path)
    run.ckpt, run.step = path, ck["step"]
    return run


def sample_main(run, args):
    """--sample: samples.png (--labels, --per-label each; the run's --uncond), reverse.png (rows'
    denoising paths), with --gif denoise.gif; or what the source project's extras draw instead."""
    config = dict(vars(args), uncond=run.config["uncond"])
    cond, drop, nrow = conditions(args.labels, args.per_label, run.meta, config)
    if "sample" in EXTRAS and EXTRAS["sample"](run, args):
        return
    os.makedirs(args.out_dir, exist_ok=True)
    trace = []
    with autocast(run.dtype, run.device):
        x = generate(run.ema, cond, drop, run.alphas_cumprod, run.shape, args.seed,
                     **sampling(config), columns=nrow, callback=tracer(trace))
    save_grid(x, os.path.join(args.out_dir, "samples.png"), nrow)
    path_figure([x[::nrow] for x in trace], os.path.join(args.out_dir, "reverse.png"))
    if args.gif:
        save_gif(trace, os.path.join(args.out_dir, "denoise.gif"), nrow)
    print(f"wrote {len(x)} samples of step {run.step} to {args.out_dir}/samples.png")


def fid_reference(config, n):
    """The real images --fid compares with (get_data's "fid" split), checked before any sampling."""
    if not n:
        return None
    ref, meta = get_data(config, "fid")
    if n > len(ref):
        die(f"--fid {n}: the reference set ({meta['fid_ref']}) has only {len(ref)} images")
    return ref, meta["fid_ref"]


def run_fid(run, args, ref, rank, world, batch_size=250):
    """fid.json: FID and IS of --fid samples, each conditioned as its reference image (each rank its
    share; fid.evaluate sums the statistics over the ranks); real_vs_fake.png to look at."""
    import fid  # only here: the script runs without fid.py
    data, name = ref
    mine = torch.arange(rank, args.fid, world).split(batch_size)
    drop = torch.full((batch_size,), run.config["uncond"])

    def fake():
        for i in mine:
            with autocast(run.dtype, run.device):
                x = generate(run.ema, data[i][1], drop[:len(i)], run.alphas_cumprod, run.shape,
                             args.seed + 1 + int(i[0]), **sampling(vars(args)))
            yield ((x.float() + 1) * 127.5).round().byte()  # uint8, as the PNGs papers measure
    # the TF graph's preprocessing (fid.py's mode "tf"): FID comparable with the papers' numbers;
    # the real statistics cached under a key of the reference images' bytes, n, mode and weights
    try:
        key = fid.cache_key((data[i][0] for i in torch.arange(args.fid).split(batch_size)),
                            args.fid, "tf", args.fid_weights)
        cache = os.path.join(run.config["data_dir"], f"fid_stats_{name}_{key}.npz")
        res = fid.evaluate(fake(), (data[i][0] for i in mine), sum(map(len, mine)), mode="tf",
                           cache=cache, inception_score=True, weights=args.fid_weights,
                           device=run.device)
    except (ValueError, RuntimeError, OSError) as e:
        die(f"--fid: {str(e).splitlines()[0]}")
    if rank == 0:
        res = dict(fid_score=res["fid"], inception_score_mean=res["inception_score_mean"],
                   inception_score_std=res["inception_score_std"], num_samples=res["n"],
                   reference=name, mode=res["mode"], checkpoint=run.ckpt, step=run.step,
                   **sampling(vars(args)))
        with open(os.path.join(args.out_dir, "fid.json"), "w") as f:
            json.dump(res, f, indent=2)
        images, cond = data[torch.arange(10)]  # a look: ten real images above ten samples
        with autocast(run.dtype, run.device):
            x = generate(run.ema, cond, drop[:10], run.alphas_cumprod, run.shape, args.seed,
                         **sampling(vars(args)))
        save_grid(torch.cat([to_model(images, run.device), x]),
                  os.path.join(args.out_dir, "real_vs_fake.png"), 10)
        print(f"FID {res['fid_score']:.2f}, IS {res['inception_score_mean']:.2f} of {args.fid} "
              f"samples against {name} -> {args.out_dir}/fid.json")


def main(argv=None):
    args = get_args(argv)
    device, ddp, rank, world = setup(args.device)
    try:
        if args.sample:  # the checkpoint's run; only rank 0 writes samples
            run = load_run(args.ckpt or os.path.join(args.out_dir, "ckpt.pt"), device,
                           amp_dtype(args.dtype, device), vars(args))
            config = dict(run.config, data_dir=args.data_dir)
            ref = fid_reference(config, args.fid)
            if rank == 0:
                sample_main(run, args)
        else:
            ref = fid_reference(vars(args), args.fid)
            run = train(args, device, ddp, rank, world)
        if args.fid:
            run_fid(run, args, ref, rank, world)
    except OSError as e:  # a full or read-only disk, a folder gone: one line (the lock is freed)
        sys.exit(f"error: {e}")
    finally:
        if ddp:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- seed 004's extras

def forward_figure(run, step):
    """forward.png when a run starts: q(x_t | x_0) on six training digits, t from 0 to T-1."""
    if step > 0:
        return
    images, _ = run.train_set[torch.arange(min(6, len(run.train_set)))]
    x0, ab = to_model(images, run.device), run.alphas_cumprod
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(run.device)
    ts = torch.linspace(0, len(ab) - 1, 10).round().long().tolist()
    path_figure([q_sample(x0, torch.full((len(x0),), t, device=run.device), noise, ab).cpu()
                 for t in ts], os.path.join(run.config["out_dir"], "forward.png"))


def clip_guide(encode_image, encode_text, prompt, scale, steps, lr):
    """The seed's CLIP guidance as a sampler callback: after every step, `steps` gradient steps of
    size lr * scale on 1 - cos(encode_image(x), encode_text(prompt))."""
    with torch.enable_grad():
        text = F.normalize(encode_text([prompt]).float(), dim=-1).detach()

    def steer(x, t):
        for _ in range(steps):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                loss = (1 - (F.normalize(encode_image(x).float(), dim=-1) * text).sum(-1)).sum()
                x = x - lr * scale * torch.autograd.grad(loss, x)[0]
        return x.detach()
    return steer


def load_clip(device):
    """The seed's CLIP ViT-B/32 (open_clip, OpenAI weights): images in [-1, 1] upsampled to 224,
    grey to RGB and normalised as CLIP's training images."""
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
        x = F.interpolate((x + 1) / 2, size=224, mode="bilinear", align_corners=False)
        return model.encode_image((x.repeat(1, 3, 1, 1) - mean) / std)
    return encode_image, lambda prompts: model.encode_text(tokenizer(prompts).to(device))


def clip_sample(run, args):
    """--clip-prompt: unconditional samples (top row) and the same seeds steered toward the prompt
    by CLIP (bottom row) in clip_<prompt>.png. Returns whether it did."""
    if not args.clip_prompt:
        return False
    if args.clip_scale < 0 or args.clip_steps < 0 or args.clip_lr <= 0:
        die("--clip-scale and --clip-steps must be >= 0, --clip-lr > 0")
    steer = clip_guide(*load_clip(run.device), args.clip_prompt, args.clip_scale, args.clip_steps,
                       args.clip_lr)
    cond, drop = torch.zeros(args.per_label, dtype=torch.long), torch.ones(args.per_label).bool()
    rows = [generate(run.ema, cond, drop, run.alphas_cumprod, run.shape, args.seed,
                     **sampling(vars(args)), callback=callback) for callback in (None, steer)]
    name = "".join(c if c.isalnum() else "_" for c in args.clip_prompt)
    os.makedirs(args.out_dir, exist_ok=True)
    save_grid(torch.cat(rows), os.path.join(args.out_dir, f"clip_{name}.png"), args.per_label)
    print(f"wrote unguided (top row) and CLIP-guided samples to {args.out_dir}/clip_{name}.png")
    return True


EXTRAS.update(
    flags=[("--clip-prompt", dict(help="--sample: CLIP-guided samples toward this text")),
           ("--clip-scale", dict(type=float, default=2.0, help="CLIP guidance scale (seed: 2)")),
           ("--clip-steps", dict(type=int, default=5, help="CLIP gradient steps per timestep")),
           ("--clip-lr", dict(type=float, default=0.15, help="CLIP gradient step size"))],
    spellings={"--timesteps": "--steps", "--guidance_scale": "--cfg"},
    train=forward_figure, sample=clip_sample)


if __name__ == "__main__":
    main()
