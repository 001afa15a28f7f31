"""Smoke tests for the collection: offline, on a CPU, on data generated here in the real on-disk formats.

    pytest test_smoke.py

Shared machinery first (data fixtures, an in-process runner, the analytic Gaussian denoiser), then one
section per script.
"""
import importlib
import json
import os
import struct
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--width", "32", "--depth", "1", "--batch-size", "8", "--steps", "20", "--sample-steps", "4",
        "--log-every", "1", "--device", "cpu"]


# ----------------------------------------------------------------------------- shared machinery

def pattern_images(n_classes, per_class, size, channels, seed=0):
    """uint8 [N, size, size, C] images whose class is visible: class k lights up the k-th stripe."""
    g = np.random.default_rng(seed)
    x = g.integers(0, 40, (n_classes * per_class, size, size, channels), dtype=np.uint8)
    y = np.repeat(np.arange(n_classes), per_class)
    w = max(1, size // n_classes)
    for i, k in enumerate(y):
        x[i, :, k * w:(k + 1) * w] = 255 - (k * 9) % 60
    return x, y


def write_idx(path, array):
    """MNIST's IDX format: magic (0, 0, dtype 0x08, ndim), big-endian sizes, then raw uint8."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def make_mnist(root, per_class=20):
    """The four uncompressed IDX files torchvision's MNIST reads, in <root>/MNIST/raw."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, seed in (("train", 0), ("t10k", 1)):
        x, y = pattern_images(10, per_class, 28, 1, seed)
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), x[..., 0])
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), y)
    return root


def make_image_folder(root, classes=("cat", "dog", "ship"), per_class=6, size=32):
    """An ImageFolder tree of PNGs: <root>/<class>/<i>.png."""
    x, y = pattern_images(len(classes), per_class, size, 3)
    for i, (img, k) in enumerate(zip(x, y)):
        os.makedirs(os.path.join(root, classes[k]), exist_ok=True)
        Image.fromarray(img).save(os.path.join(root, classes[k], f"{i}.png"))
    return root


def run(script, *args):
    """Run a script's main() in this process; returns the exit status (0 when main returns)."""
    mod = importlib.import_module(script)
    try:
        mod.main([str(a) for a in args])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def assert_bad_input(capsys, script, *args):
    """Bad input ends with status 2 and a single line on stderr naming the problem."""
    capsys.readouterr()
    assert run(script, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def gaussian_eps(mu, s, alphas_cumprod):
    """Optimal noise prediction for x0 ~ N(mu, s^2 I):
    E[eps | x_t] = sqrt(1-abar) * (x_t - sqrt(abar) * mu) / (abar * s^2 + 1 - abar)."""
    def eps_fn(x, t):
        abar = alphas_cumprod[t].view(-1, *[1] * (x.dim() - 1))
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s ** 2 + 1 - abar)
    return eps_fn


def assert_moments(x, mu, s, tol=0.02):
    assert abs(x.mean().item() - mu) < tol * abs(mu), (x.mean().item(), mu)
    assert abs(x.std().item() - s) < tol * s, (x.std().item(), s)


def image_size(path):
    with Image.open(path) as im:
        return im.size


def torchrun(script, nproc, *args, cwd=HERE):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- mnist_ddpm.py

@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A tiny conditional run on generated MNIST: 4 steps, then resumed to 6."""
    root = tmp_path_factory.mktemp("mnist")
    data, out = make_mnist(str(root / "data")), str(root / "out")
    base = ["--data-dir", data, "--out-dir", out, *TINY, "--sample-every", "3", "--ckpt-every", "2"]
    assert run("mnist_ddpm", *base, "--iters", "4") == 0
    assert run("mnist_ddpm", *base, "--iters", "6", "--resume") == 0
    return SimpleNamespace(data=data, out=out, base=base)


def test_mnist_train_writes_run_files(mnist_run):
    out = mnist_run.out
    for f in ("config.json", "ckpt.pt", "log.jsonl", "forward.png", "reverse.png", "samples_3.png",
              "samples_6.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # resumed at 4, not restarted
    assert {"loss", "lr", "img_per_s", "elapsed"} <= log[0].keys()
    assert json.load(open(os.path.join(out, "config.json")))["iters"] == 6
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 6 and {"model", "ema", "opt", "rng", "config"} <= ck.keys()
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    # 11 rows (10 digits + unconditional) of 10 samples, 28 px with 1 px padding
    assert image_size(os.path.join(out, "samples_6.png")) == (10 * 29 + 1, 11 * 29 + 1)


def test_mnist_resume_gives_identical_weights(mnist_run, tmp_path):
    out = str(tmp_path / "straight")
    assert run("mnist_ddpm", *mnist_run.base, "--out-dir", out, "--iters", "6") == 0
    a, b = load(os.path.join(out, "ckpt.pt")), load(os.path.join(mnist_run.out, "ckpt.pt"))
    assert same_weights(a["model"], b["model"]) and same_weights(a["ema"], b["ema"])


@pytest.mark.parametrize("sampler,cfg", [("ddpm", "3"), ("ddim", "0"), ("ddim", "1"), ("dpmpp", "2")])
def test_mnist_sample_each_sampler(mnist_run, tmp_path, sampler, cfg):
    out = str(tmp_path)
    assert run("mnist_ddpm", "--sample", "--ckpt", os.path.join(mnist_run.out, "ckpt.pt"), "--out-dir", out,
               "--sampler", sampler, "--sample-steps", "4", "--cfg", cfg, "--labels", "3,uncond", "--n", "4",
               "--device", "cpu") == 0
    assert image_size(os.path.join(out, "samples.png")) == (4 * 29 + 1, 2 * 29 + 1)
    assert os.path.isfile(os.path.join(out, "reverse.png"))


def test_mnist_uncond(tmp_path):
    data, out = make_mnist(str(tmp_path / "data")), str(tmp_path / "out")
    assert run("mnist_ddpm", "--data-dir", data, "--out-dir", out, *TINY, "--iters", "2", "--uncond") == 0
    assert image_size(os.path.join(out, "samples_2.png")) == (10 * 29 + 1, 29 + 1)  # one row, no labels
    assert run("mnist_ddpm", "--sample", "--out-dir", out, "--n", "3", "--device", "cpu",
               "--sample-steps", "3") == 0
    assert image_size(os.path.join(out, "samples.png")) == (3 * 29 + 1, 29 + 1)


def test_mnist_gif_has_one_frame_per_step(mnist_run, tmp_path):
    assert run("mnist_ddpm", "--sample", "--ckpt", os.path.join(mnist_run.out, "ckpt.pt"), "--gif",
               "--out-dir", str(tmp_path), "--sample-steps", "5", "--labels", "1,2", "--n", "3",
               "--device", "cpu") == 0
    with Image.open(tmp_path / "denoise.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (3 * 29 + 1, 2 * 29 + 1)


def test_mnist_periodic_checkpoints_and_config_rerun(tmp_path):
    data, out = make_mnist(str(tmp_path / "data")), str(tmp_path / "out")
    assert run("mnist_ddpm", "--data-dir", data, "--out-dir", out, *TINY, "--iters", "7",
               "--save-every", "2", "--keep", "2", "--ckpt-every", "2", "--sample-every", "100") == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_")) == ["ckpt_4.pt", "ckpt_6.pt"]
    assert load(os.path.join(out, "ckpt.pt"))["step"] == 7
    cfg = json.load(open(os.path.join(out, "config.json")))
    out2 = str(tmp_path / "again")
    assert run("mnist_ddpm", "--config", os.path.join(out, "config.json"), "--out-dir", out2, "--iters", "1") == 0
    cfg2 = json.load(open(os.path.join(out2, "config.json")))
    assert {k for k in cfg if cfg[k] != cfg2[k]} == {"out_dir", "iters", "config"}
    assert cfg2["iters"] == 1 and cfg2["save_every"] == 2


def test_mnist_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="CI installs tensorboard; locally optional")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data, out = make_mnist(str(tmp_path / "data")), str(tmp_path / "out")
    assert run("mnist_ddpm", "--data-dir", data, "--out-dir", out, *TINY, "--iters", "2", "--tensorboard") == 0
    acc = EventAccumulator(os.path.join(out, "tb")).Reload()
    assert {"loss", "lr", "img_per_s"} <= set(acc.Tags()["scalars"]) and "samples" in acc.Tags()["images"]


def test_mnist_samplers_match_gaussian_moments():
    import mnist_ddpm as m
    mu, s = 1.0, 0.5
    ab = torch.cumprod(1 - m.make_betas("cosine", 1000), 0).float()
    eps_fn = gaussian_eps(mu, s, ab)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4000, 16), generator=g)
    assert_moments(m.ddim_sample(eps_fn, x, ab, 1000, 1.0, g), mu, s)  # eta=1 on all T steps: ddpm
    for steps in (20, 50):
        assert_moments(m.dpmpp_sample(eps_fn, x, ab, steps), mu, s)
        out = m.ddim_sample(eps_fn, x, ab, steps, 0.0)
        assert_moments(out, mu, ddim_gaussian_std(m.sample_timesteps(1000, steps), ab, s), tol=0.01)
        assert abs(out.mean().item() - mu) < 0.02 * mu


def ddim_gaussian_std(ts, ab, s):
    """DDIM (eta=0) is first order: for Gaussian data each step scales the deviation from the mean by
    <u_prev, u_t> / |u_t|^2 with u = (sqrt(abar) s, sqrt(1 - abar)), a little less than the exact
    |u_prev| / |u_t|, so its std falls short of s by about pi^2 / (8 K) at best (6 % at K=20, 2.5 % at 50):
    a property of the method, checked here exactly."""
    std = 1.0
    for i, t in enumerate(ts):
        a, b = ab[t].item(), ab[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        std *= ((a * b) ** 0.5 * s * s + ((1 - a) * (1 - b)) ** 0.5) / (a * s * s + 1 - a)
    return std


def test_mnist_schedules():
    import mnist_ddpm as m
    for name in ("linear", "cosine"):
        ab = torch.cumprod(1 - m.make_betas(name, 1000), 0)
        assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 1e-3 and ab[0] > 0.999
        assert (m.make_betas(name, 20) < 1).all()  # short schedules keep abar > 0
    t = torch.tensor([0.0, 250, 500, 999])
    f = lambda u: torch.cos((u / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2
    ab = torch.cumprod(1 - m.make_betas("cosine", 1000), 0)
    assert torch.allclose(ab[t.long()].float(), (f(t + 1) / f(torch.tensor(0.0))).float(), rtol=1e-4)


def test_mnist_clip_guidance_moves_toward_prompt():
    import mnist_ddpm as m
    ab = torch.cumprod(1 - m.make_betas("cosine", 20), 0).float()
    eps_fn = gaussian_eps(0.0, 0.3, ab)
    model = lambda x, t, y: eps_fn(x, t)  # a denoiser whose samples stay inside [-1, 1]
    g = torch.Generator().manual_seed(0)
    proj, target = torch.randn(28 * 28, 16, generator=g) / 28, torch.randn(16, generator=g)
    encode_image, encode_text = lambda x: x.flatten(1) @ proj, lambda prompts: target[None]  # stand-in CLIP
    args = SimpleNamespace(cfg=1.0, sampler="ddim", sample_steps=10, eta=0.0)
    guide = m.clip_guide(encode_image, encode_text, "two", scale=2.0, steps=3, lr=0.15)
    cos = lambda x: torch.nn.functional.cosine_similarity(encode_image(x), target[None]).mean().item()
    plain = m.generate(model, ab, [10] * 6, args, 10, seed=1)
    guided = m.generate(model, ab, [10] * 6, args, 10, seed=1, guide=guide)
    assert cos(guided) > cos(plain) + 0.3


def test_mnist_clip_without_open_clip_is_one_line(mnist_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    err = assert_bad_input(capsys, "mnist_ddpm", "--sample", "--ckpt", os.path.join(mnist_run.out, "ckpt.pt"),
                           "--clip-prompt", "two", "--device", "cpu", "--out-dir", "/tmp/unused")
    assert "pip install open_clip_torch" in err


def test_mnist_bad_inputs(mnist_run, capsys, tmp_path):
    ckpt = os.path.join(mnist_run.out, "ckpt.pt")
    sample = ["--sample", "--ckpt", ckpt, "--device", "cpu", "--out-dir", str(tmp_path)]
    assert "--labels" in assert_bad_input(capsys, "mnist_ddpm", *sample, "--labels", "12")
    assert "no checkpoint" in assert_bad_input(capsys, "mnist_ddpm", "--sample", "--ckpt", str(tmp_path / "x.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a readable" in assert_bad_input(capsys, "mnist_ddpm", "--sample", "--ckpt", str(tmp_path / "junk.pt"))
    assert "--steps" in assert_bad_input(capsys, "mnist_ddpm", "--steps", "0")
    assert "--cfg" in assert_bad_input(capsys, "mnist_ddpm", *sample, "--cfg", "-1")
    os.makedirs(tmp_path / "empty" / "a")
    assert "--image-folder" in assert_bad_input(capsys, "mnist_ddpm", "--image-folder", str(tmp_path / "empty"),
                                                "--out-dir", str(tmp_path / "o"))
    assert "--batch-size" in assert_bad_input(capsys, "mnist_ddpm", "--data-dir", mnist_run.data, "--limit", "5",
                                              "--batch-size", "8", "--out-dir", str(tmp_path / "o"))
    mismatched = [*mnist_run.base[:-4], "--out-dir", mnist_run.out, "--width", "64", "--resume", "--iters", "8"]
    assert "does not match" in assert_bad_input(capsys, "mnist_ddpm", *mismatched)


def test_mnist_image_folder(tmp_path):
    folder = make_image_folder(str(tmp_path / "imgs"), classes=tuple("0123456789"), per_class=2)
    assert run("mnist_ddpm", "--image-folder", folder, "--out-dir", str(tmp_path / "out"), *TINY,
               "--iters", "2") == 0
    assert os.path.isfile(tmp_path / "out" / "samples_2.png")


def test_mnist_torchrun_two_processes(tmp_path):
    data, out = make_mnist(str(tmp_path / "data")), str(tmp_path / "out")
    r = torchrun("mnist_ddpm.py", 2, "--data-dir", data, "--out-dir", out, *TINY, "--iters", "3",
                 "--sample-every", "100")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "global batch 16" in r.stdout
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 3 and len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0], ck["rng"][1])
    assert len([line for line in open(os.path.join(out, "log.jsonl"))]) == 3  # one writer


def test_mnist_fid_writes_json(mnist_run, tmp_path, monkeypatch):
    import fid
    net = fid.inception_v3
    monkeypatch.setattr(fid, "inception_v3", lambda weights="download": net(None))  # offline: random weights
    out = str(tmp_path)
    assert run("mnist_ddpm", "--sample", "--ckpt", os.path.join(mnist_run.out, "ckpt.pt"), "--out-dir", out,
               "--data-dir", mnist_run.data, "--fid", "12", "--sample-steps", "2", "--n", "1", "--device", "cpu") == 0
    res = json.load(open(os.path.join(out, "fid.json")))
    assert res["n"] == 12 and res["fid"] >= 0 and res["sampler"] == "ddim" and res["cfg"] == 2.0
    assert os.path.isfile(os.path.join(mnist_run.data, "fid_stats_mnist-test_28_12.npz"))
    assert image_size(os.path.join(out, "real_vs_fake.png")) == (10 * 29 + 1, 10 * 29 + 1)
