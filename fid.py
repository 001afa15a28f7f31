"""FID and Inception Score with the TensorFlow 2015-12-05 Inception, in plain torch.

    python fid.py samples/ data/real/            # FID of two folders (or .npz files: mu, sigma)
    python fid.py data/real/ real_stats.npz --save-stats
    python fid.py samples/ --is --mode pytorch-fid   # Inception Score, preprocessed as pytorch-fid
    from fid import evaluate; evaluate(fake_batches, real_loader, n=10000, cache="real_stats.npz")
Two preprocessings (--mode, mode=). "tf", the default, is the TF graph's, as the code behind the
papers' FIDs runs it (TTUR, openai's evaluator; DDPM, ADM, EDM, DiT), so FIDs stand next to theirs:
TF1's legacy bilinear resize of the 0..255 values, then (x - 128) / 128. "pytorch-fid" gives
pytorch-fid's numbers: half-pixel bilinear resize of x / 255, then 2x - 1. Statistics files
record their mode, and modes never mix: evaluate() refuses a cache without one (an older fid.py's);
the command line takes an .npz without one (pytorch-fid's; TTUR's and ADM's reference statistics,
which are tf) as --mode, with a warning.
Follows mseitzer/pytorch-fid (network, weights) and openai/improved-gan (Inception Score)."""
import argparse
import hashlib
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models.inception as tvi
from tqdm import tqdm

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
MODES = ("tf", "pytorch-fid")


# ----------------------------------------------------------------------------- network
def legacy_resize(x, size=(299, 299)):
    """TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False) of x [N, C, H, W] to
    size (h, w): out[i] = lerp(x[lo], x[hi], s - lo) at s = i * n_in / n_out, lo = floor(s), hi =
    min(lo + 1, n_in - 1), along W, then H (F.interpolate: s = (i + 0.5) * n_in / n_out - 0.5)."""
    for n_out in reversed(size):  # W, then H: .mT swaps them, twice
        s = torch.arange(n_out, dtype=torch.float64, device=x.device) * x.shape[-1] / n_out
        lo = s.floor().long()
        hi = (lo + 1).clamp(max=x.shape[-1] - 1)
        x = torch.lerp(x[..., lo], x[..., hi], (s - lo).to(x.dtype)).mT
    return x


def preprocess(x, mode="tf"):
    """Images [N, 1 or 3, H, W] in [0, 1] or uint8 -> the network's input [N, 3, 299, 299]."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if x.dtype != torch.uint8 and (x.min() < -0.1 or x.max() > 1.1):  # e.g. [-1, 1]: refuse
        raise ValueError(f"images must be in [0, 1] or uint8, got [{x.min():.3g}, {x.max():.3g}]")
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale: as PIL's convert("RGB")
    if mode == "tf":  # the graph's Cast, ResizeBilinear, Sub 128, Mul 1/128: [-1, 0.9921875]
        x = x.float() if x.dtype == torch.uint8 else 255 * x.clamp(0, 1)  # clamp as a PNG would
        return (legacy_resize(x) - 128) / 128
    x = x.float() / 255 if x.dtype == torch.uint8 else x.clamp(0, 1)  # pytorch-fid's: [-1, 1]
    return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1


# The 2015 TF graph differs from torchvision's Inception3 only in the pool branch of the mixed
# blocks: TF's average pool ignores the zero padding, and the last block (Mixed_7c) max-pools.
avg_pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tvi.InceptionA):
    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool(x))], 1)


class FIDInceptionC(tvi.InceptionC):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool(x))], 1)


class FIDInceptionE(tvi.InceptionE):
    max_pool = False  # True in Mixed_7c

    def forward(self, x):
        b3, bd = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class FIDInception(tvi.Inception3):
    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        A, C, E = FIDInceptionA, FIDInceptionC, FIDInceptionE  # torchvision's blocks' arguments
        blocks = {"5b": A(192, 32), "5c": A(256, 64), "5d": A(288, 64), "6b": C(768, 128),
                  "6c": C(768, 160), "6d": C(768, 160), "6e": C(768, 192), "7b": E(1280),
                  "7c": E(2048)}
        for name, block in blocks.items():
            setattr(self, "Mixed_" + name, block)
        self.Mixed_7c.max_pool = True

    def forward(self, x, mode="tf"):
        """Images [N, 1 or 3, H, W] in [0, 1] or uint8, preprocessed in `mode` (see preprocess())
        -> (pool3 features [N, 2048], logits [N, 1008])."""
        x = preprocess(x, mode)
        for module in list(self.children())[:-2]:  # stem, Mixed_5b..7c, avgpool (not dropout, fc)
            x = module(x)
        return x.flatten(1), self.fc(x.flatten(1))


def one_line(e):  # an exception's text (torch's span many lines) as one line of an error message
    return " ".join(str(e).split())[:200]


def inception_v3(weights="download"):
    """The FID Inception in eval mode; weights: "download" (cached by torch.hub), a path, a
    state_dict, None (random). Anything but its state dict -> RuntimeError naming the file."""
    net = FIDInception()
    source = weights if isinstance(weights, (str, os.PathLike)) else "the state dict"
    if weights == "download":
        source = FID_WEIGHTS_URL
        try:
            weights = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu",
                                                         weights_only=True)
        except OSError as e:  # offline: say which file goes where
            raise RuntimeError(f"cannot download {FID_WEIGHTS_URL} ({e}); put it into "
                               f"{torch.hub.get_dir()}/checkpoints or pass its path") from e
    if weights is not None:
        try:
            if isinstance(weights, (str, os.PathLike)):
                weights = torch.load(weights, "cpu", weights_only=True)
            net.load_state_dict(weights)  # strict: every key and shape must match
        except Exception as e:  # missing, truncated, not torch's, not a dict, other keys or shapes
            raise RuntimeError(f"{source}: not the FID Inception's weights: {one_line(e)}") from e
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- statistics
def _rank():  # -1 without torch.distributed
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else -1


def _all_reduce(*tensors):  # sums over all ranks (gloo on CPU, NCCL on CUDA), as is without a group
    if _rank() >= 0:
        cuda = torch.distributed.get_backend() == "nccl"
        tensors = [t.to("cuda" if cuda else "cpu") for t in tensors]
        for t in tensors:
            torch.distributed.all_reduce(t)
    return [t.cpu() for t in tensors]


@torch.no_grad()
def features(images, model, n=None, batch_size=50, device="cpu", desc="inception", mode="tf"):
    """Yield (features [b, 2048] float64, logits [b, 1008]) of the first n images (all if None) of
    a tensor [N, C, H, W] or an iterable of such batches or of (images, labels), preprocessed in
    `mode`; draws only the batches needed; too few -> ValueError."""
    model.eval()
    seen = 0
    with tqdm(total=n, desc=desc, unit="img", disable=_rank() > 0) as bar:
        for batch in [images] if torch.is_tensor(images) else images:
            batch = batch[0] if isinstance(batch, (tuple, list)) else batch
            for x in batch[:None if n is None else n - seen].split(batch_size):
                f, logits = model(x.to(device), mode)
                seen += len(x)
                bar.update(len(x))
                yield f.cpu().double(), logits.cpu()
            if seen == n:
                return
    if n is not None and seen < n:
        raise ValueError(f"only {seen} images available, {n} requested")


def statistics(images, model, n=None, batch_size=50, device="cpu", desc="inception",
               keep_logits=False, mode="tf"):
    """(mu, sigma, logits or None) from float64 sums: mu = S1/N, sigma = (S2 - N mu mu^T)/(N-1),
    as np.cov. Distributed: each rank passes its share; sums all-reduced, logits in rank order."""
    s0, s1, s2 = (torch.zeros(shape, dtype=torch.float64) for shape in (1, 2048, (2048, 2048)))
    kept = [torch.zeros(0, 1008)]
    for f, logits in features(images, model, n, batch_size, device, desc, mode):
        s0, s1, s2 = s0 + len(f), s1 + f.sum(0), s2 + f.T @ f
        kept += [logits - model.fc.bias.cpu()] if keep_logits else []  # IS: no bias, as OpenAI's
    s0, s1, s2 = _all_reduce(s0, s1, s2)
    logits = torch.cat(kept) if keep_logits else None
    if keep_logits and _rank() >= 0:  # gather in rank order
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, logits.numpy())
        logits = torch.from_numpy(np.concatenate(parts))
    if (count := int(s0.item())) < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {count}")
    if count < 2048 and _rank() <= 0:  # same text from the same line: Python shows it once
        warnings.warn("FID/IS of fewer than 2048 images is biased, not comparable with published "
                      "numbers")
    mu = s1 / count
    return mu.numpy(), ((s2 - count * torch.outer(mu, mu)) / (count - 1)).numpy(), logits


def load_stats(path):
    """(mu, sigma, n, mode) of an .npz file, n and mode None where it has none (pytorch-fid's,
    TTUR's, ADM's, an older fid.py's). Missing, truncated or foreign file -> ValueError."""
    try:
        with np.load(path) as f:  # a .npy file: TypeError (not an NpzFile); a pickle: ValueError
            n = int(f["n"]) if "n" in f else None
            return f["mu"], f["sigma"], n, str(f["mode"]) if "mode" in f else None
    except (OSError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file with mu and sigma: {one_line(e)}")


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) >= 0. Tr sqrtm(S1 S2) = Tr sqrtm(A S2 A), A =
    S1^(1/2): same eigenvalues, A S2 A symmetric PSD: eigh gives them real, also for singular S."""
    mu1, mu2, s1, s2 = (np.asarray(x, dtype=np.float64) for x in (mu1, mu2, sigma1, sigma2))
    if not (s1.shape == s2.shape == mu1.shape * 2 == mu2.shape * 2
            and all(np.isfinite(x).all() for x in (mu1, mu2, s1, s2))):
        raise ValueError(f"statistics must be finite, of matching shapes: {s1.shape} {s2.shape}")
    w, v = np.linalg.eigh(s1)  # eigh/eigvalsh read one triangle: symmetric by construction
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # clip: rounding makes zero eigenvalues < 0
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a), 0, None)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def inception_score(logits, splits=10):
    """(mean, std) over `splits` consecutive parts of exp(E_x KL(p(y|x) || p(y))), p(y|x) =
    softmax(logits); as openai/improved-gan: all 1008 classes, parts in order (no shuffle)."""
    p = torch.as_tensor(logits, dtype=torch.float64).softmax(1)
    if len(p) < splits:
        raise ValueError(f"the Inception Score needs at least {splits} images, got {len(p)}")
    parts = [p[k * len(p) // splits:(k + 1) * len(p) // splits] for k in range(splits)]
    xlogy = torch.special.xlogy  # x log y with 0 log 0 = 0; KL = sum_y p log p - p log p(y)
    scores = [(xlogy(q, q) - xlogy(q, q.mean(0))).sum(1).mean().exp().item() for q in parts]
    return float(np.mean(scores)), float(np.std(scores))


_inception_score = inception_score  # evaluate's flag of the same name hides it there


def cache_key(images, n, mode, weights):
    """A name for the statistics of exactly these reference images (their bytes, in order), n, the
    preprocessing mode and the Inception weights (a file's bytes): another data set, size or
    weight file never meets statistics cached for the first."""
    key = hashlib.sha256(f"{n} {mode} {FID_WEIGHTS_URL if weights == 'download' else ''}".encode())
    for x in images:
        key.update(torch.as_tensor(x).contiguous().cpu().numpy().tobytes())
    if isinstance(weights, (str, os.PathLike)) and weights != "download":
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                key.update(block)
    return key.hexdigest()[:16]


def evaluate(fake, real, n, *, cache=None, inception_score=False, weights="download",
             device="cpu", batch_size=50, mode="tf") -> dict:
    """FID (and IS) of the first n images of `fake` against the first n of `real` (see features()),
    preprocessed in `mode`; real statistics read from / written to the .npz `cache` (mu, sigma, n,
    mode). Distributed: each rank passes its shares, n = their size; rank 0 alone reads and writes
    the cache (no shared file system needed) and tells the other ranks what it found."""
    total = int(_all_reduce(torch.tensor([float(n)], dtype=torch.float64))[0].item())
    found = None  # rank 0's cache: None (none), (mu, sigma), or why it cannot be used (a str)
    if cache is not None and _rank() <= 0 and os.path.exists(cache):  # before the pass over fake
        try:
            mu2, sigma2, count, cached_mode = load_stats(cache)
            if cached_mode != mode:  # no mode: an older fid.py's (pytorch-fid) or foreign: refuse
                raise ValueError(f"{cache} holds statistics of preprocessing mode "
                                 f"{cached_mode or 'unknown'}, not {mode}: delete it to recompute")
            if count is not None and count != total:
                raise ValueError(f"{cache} holds the statistics of {count} images, not {total}")
            found = mu2, sigma2
        except ValueError as e:
            found = str(e)
    if _rank() >= 0:  # rank 0 decides for all, so that all take part in the same passes
        torch.distributed.broadcast_object_list(box := [found], src=0)
        found = box[0]
    if isinstance(found, str):
        raise ValueError(found)
    model = inception_v3(weights).to(device)
    mu1, sigma1, logits = statistics(fake, model, n, batch_size, device, "FID fake",
                                     inception_score, mode)
    if found is None:  # all ranks pass over their shares of `real`, together
        mu2, sigma2, _ = statistics(real, model, n, batch_size, device, "FID real", mode=mode)
        if cache is not None and _rank() <= 0:
            os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp"  # its own temporary file, then os.replace: never
            with open(tmp, "wb") as fh:           # a broken cache, whoever else writes one
                np.savez(fh, mu=mu2, sigma=sigma2, n=total, mode=mode)
            os.replace(tmp, cache)
    else:
        mu2, sigma2 = found
    is_mean, is_std = _inception_score(logits) if inception_score else (None, None)
    return {"fid": frechet_distance(mu1, sigma1, mu2, sigma2), "inception_score_mean": is_mean,
            "inception_score_std": is_std, "n": total, "mode": mode}


# ----------------------------------------------------------------------------- command line
def die(msg):
    print(f"fid.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_images(files, batch_size):
    """uint8 batches [b, 3, H, W] read as pytorch-fid reads (PIL, RGB), of consecutive images of one
    size (sizes may mix): the network resizes them in its mode, as in evaluate()."""
    from PIL import Image  # comes with torchvision; only the command line reads files
    from torchvision.transforms.functional import pil_to_tensor
    batch = []
    for f in files:
        x = pil_to_tensor(Image.open(f).convert("RGB"))
        if batch and (len(batch) == batch_size or x.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(x)
    yield torch.stack(batch)


def main(argv=None):
    p = argparse.ArgumentParser(description="FID of two image folders or .npz files; IS with --is.")
    p.add_argument("path", nargs="+",
                   help="PATH_A PATH_B: image folders (recursive) or .npz files with mu, sigma")
    p.add_argument("--save-stats", action="store_true",
                   help="write mu, sigma, n and mode of folder PATH_A to PATH_B (.npz)")
    p.add_argument("--mode", choices=MODES, default="tf",
                   help="preprocessing: tf (default; as the TF graph in the papers' FID code, "
                        "comparable with published FIDs) or pytorch-fid (as pytorch-fid)")
    p.add_argument("--batch-size", type=int, default=50, help="images per batch (default 50)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, mps or cpu")
    p.add_argument("--weights", default="download", type=lambda w: None if w == "none" else w,
                   help="'download' (once, cached by torch.hub), a local .pth path, or 'none' "
                        "(random weights, tests)")
    p.add_argument("--is", dest="inception_score", action="store_true",
                   help="Inception Score of folder PATH_A")
    a = p.parse_args(argv)
    try:
        least = 1 if a.inception_score and not a.save_stats else 2
        if not least <= len(a.path) <= 2 or a.batch_size < 1:
            die(f"expected PATH_A PATH_B (or a folder with --is) and --batch-size >= 1, got "
                f"{a.path} {a.batch_size}")
        inputs = []  # per path: its image files (a list), or the (mu, sigma) of an .npz file
        for i, path in enumerate(a.path[:1] if a.save_stats else a.path):
            files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                           if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
            folder_only = i == 0 and (a.save_stats or a.inception_score)
            if not files and (folder_only or not (path.endswith(".npz") and os.path.isfile(path))):
                die(f"{path}: not a folder with images{'' if folder_only else ' nor an .npz file'}")
            if files:
                inputs.append(files)
                continue
            mu, sigma, _, mode = load_stats(path)
            if mode not in (None, a.mode):
                die(f"{path} holds statistics of --mode {mode}, not --mode {a.mode}")
            if mode is None:  # e.g. TTUR's or ADM's reference statistics (tf): the user's call
                warnings.warn(f"{path} records no preprocessing mode; taken as --mode {a.mode}")
            inputs.append((mu, sigma))
        folders = any(isinstance(x, list) for x in inputs)
        model = inception_v3(a.weights).to(a.device) if folders else None
        stats = [statistics(read_images(x, a.batch_size), model, None, a.batch_size, a.device,
                            a.path[i], a.inception_score and i == 0, a.mode)
                 if isinstance(x, list) else x for i, x in enumerate(inputs)]
        if a.save_stats:
            np.savez(a.path[1], mu=stats[0][0], sigma=stats[0][1], n=len(inputs[0]), mode=a.mode)
            return print(f"saved the statistics of {len(inputs[0])} images to {a.path[1]}")
        if a.inception_score:
            print("IS: {:.6g} +- {:.6g}".format(*_inception_score(stats[0][2])))
        if len(stats) == 2:
            print(f"FID: {frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])}")
    except (ValueError, KeyError, RuntimeError, OSError) as e:  # too few images, bad files
        die(one_line(e))


if __name__ == "__main__":
    main()
