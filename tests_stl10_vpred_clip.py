"""Tests of what only stl10_vpred_clip.py has: its STL-10 loader on the real binary format, its
v-prediction, its cross-attention U-Net and frozen CLIP table (cached once per machine, or learned
embeddings when open_clip is missing), and seed 000's diagnostics, sweeps, projector and spellings.
The contract every script keeps is tested in test_smoke.py.

    pytest tests_stl10_vpred_clip.py
"""
import contextlib
import io
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import stl10_vpred_clip as m
from test_smoke import (HERE, STL_CLASSES, assert_bad_input, assert_moments, gaussian_eps,
                        grid_size, image_size, load, make_image_folder, make_stl10, pattern_images,
                        read_log, run, torchrun)

SCRIPT = "stl10_vpred_clip"
TINY = ["--width", "32", "--depth", "1", "--batch-size", "2", "--sample-steps", "2",
        "--per-label", "1", "--log-every", "1", "--device", "cpu", "--lr", "1e-3", "--warmup", "1",
        "--cfg", "1"]


class FakeClip(torch.nn.Module):
    """Stands in for open_clip's ViT-B/32 (no weights here): small learned maps of images and of
    tokens."""

    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(3, 512), torch.nn.Embedding(64, 512)

    def encode_image(self, x):
        return self.image(x.mean(dim=(2, 3)))

    def encode_text(self, tokens):
        return self.text(tokens).mean(1)


def fake_tokenizer(prompts):
    return torch.tensor([[ord(c) % 64 for c in f"{p:8}"[:8]] for p in prompts])


@pytest.fixture
def fake_open_clip(monkeypatch):
    """An `open_clip` module with the two calls the script makes; returns the (model, weights) it
    asked for."""
    calls, mod = [], type(sys)("open_clip")

    def create_model_and_transforms(name, pretrained):
        calls.append((name, pretrained))
        return FakeClip(), None, None
    mod.create_model_and_transforms = create_model_and_transforms
    mod.get_tokenizer = lambda name: fake_tokenizer
    monkeypatch.setitem(sys.modules, "open_clip", mod)
    return calls


@pytest.fixture(scope="module", autouse=True)
def no_checksums():
    """The generated STL-10 files are not the real ones: torchvision's md5 check passes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
        yield


@pytest.fixture(scope="module")
def stl(tmp_path_factory):
    """Generated STL-10 files and a [11, 16] --text-emb file."""
    root = tmp_path_factory.mktemp("stl")
    emb = str(root / "emb.pt")
    torch.save(dict(emb=torch.randn(11, 16), context_dim=16,
                    prompts=[f"a photo of a {c}" for c in STL_CLASSES] + [""]), emb)
    return SimpleNamespace(data=make_stl10(str(root / "data")), emb=emb)


@pytest.fixture(scope="module")
def learned(stl, tmp_path_factory):
    """The card's packages only (open_clip not importable): 3 steps on the linear schedule with
    T=10 (NaN before issue 12), ckpt_2.pt kept; what it printed."""
    out = str(tmp_path_factory.mktemp("learned"))
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setitem(sys.modules, "open_clip", None)  # as if not installed
        status = run(SCRIPT, "--data-dir", stl.data, "--out-dir", out, *TINY, "--iters", 3,
                     "--schedule", "linear", "--steps", 10, "--save-every", 2,
                     "--sample-every", 100, "--diag-every", 0)
    assert status == 0
    return SimpleNamespace(out=out, ckpt=os.path.join(out, "ckpt.pt"), printed=printed.getvalue())


# ----------------------------------------------------------------------------- data

def test_loader_reads_stl10_binary(stl):
    config = vars(m.get_args(["--data-dir", stl.data, "--cond", "learned"]))
    data, meta = m.get_data(config)
    images, labels = data.tensors
    x, y = pattern_images(10, 2, 96, 3, 0)
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 96, 96)
    assert torch.equal(images, torch.from_numpy(x).permute(0, 3, 1, 2))  # rows, columns right
    assert labels.tolist() == y.tolist() and meta["classes"] == STL_CLASSES
    assert meta["hflip"] and meta["size"] == 96 and meta["channels"] == 3
    assert meta["text_emb"] is None and meta["context_dim"] == 4 * 64  # --width 64
    ref, ref_meta = m.get_data(config, "fid")
    x, _ = pattern_images(10, 2, 96, 3, 1)  # the test split
    assert torch.equal(ref.tensors[0], torch.from_numpy(x).permute(0, 3, 1, 2))
    assert ref_meta["fid_ref"] == "stl10-test"


def test_image_folder_is_resized_to_96(tmp_path):
    folder = make_image_folder(str(tmp_path / "imgs"), per_class=2, size=32)
    data, meta = m.get_data(vars(m.get_args(["--image-folder", folder, "--cond", "learned"])))
    assert data.tensors[0].shape == (6, 3, 96, 96) and meta["classes"] == ["cat", "dog", "ship"]
    assert meta["fid_ref"] == "image-folder"


def test_seed_spellings():
    a = m.get_args(["--overfit", "5", "--timesteps", "7", "--guidance_scale", "3", "--label", "3",
                    "uncond", "--checkpoint", "c.pt", "--schedulers", "cosine", "linear", "--out",
                    "o"])
    assert (a.limit, a.steps, a.cfg, a.labels, a.ckpt, a.schedules, a.out_dir) == (
        5, 7, 3.0, ["3", "uncond"], "c.pt", ["cosine", "linear"], "o")
    assert m.get_args(["--diagnostics"]).sample and not m.get_args([]).sample  # no training


# ----------------------------------------------------------------------------- v-prediction

def test_v_eps_x0_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn((2, 4, 3, 8, 8), generator=g).double()
    ab = m.make_alphas_cumprod("cosine", 500, "cpu").double()
    t = torch.tensor([0, 100, 300, 499])
    xt, abar = m.q_sample(x0, t, eps, ab), ab[t].view(-1, 1, 1, 1)
    v = m.loss_target(x0, eps, abar)
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0)
    assert torch.allclose(m.eps_from_pred(v, xt, abar), eps, atol=1e-10)
    assert torch.allclose(abar.sqrt() * xt - (1 - abar).sqrt() * v, x0, atol=1e-10)  # x0 from v


def exact_v(mu, s, ab):
    """The exact v-prediction for x0 ~ N(mu, s^2): the optimal eps, and x0 from x_t and it."""
    eps_fn = gaussian_eps(mu, s, ab)

    def v_fn(x, t):
        abar, eps = ab[t].view(-1, *[1] * (x.dim() - 1)), eps_fn(x, t)
        return m.loss_target((x - (1 - abar).sqrt() * eps) / abar.sqrt(), eps, abar)
    return v_fn


def test_samplers_reproduce_gaussian_data_through_v():
    """The spine's samplers on eps_from_pred of the exact v: the data's mean and std, from noise
    and (the reconstructions) from x_t at t=250."""
    mu, s, g = 1.0, 0.5, torch.Generator().manual_seed(0)
    ab = m.make_alphas_cumprod("cosine", 500, "cpu")  # the seed's T=500: log-SNR -9.2 at t=T-1
    v_fn = exact_v(mu, s, ab)

    def eps_fn(x, t):
        return m.eps_from_pred(v_fn(x, t), x, ab[t].view(-1, 1, 1, 1))
    x = torch.randn((4000, 1, 4, 4), generator=g)
    assert_moments(m.ddim_sample(eps_fn, x, ab, m.ddim_timesteps(499, 500), 1.0, g), mu, s)
    assert_moments(m.dpmpp_sample(eps_fn, x, ab, m.dpmpp_timesteps(ab, 499, 20)), mu, s)
    out = m.ddim_sample(eps_fn, x, ab, m.ddim_timesteps(499, 50), 0.0)
    assert_moments(out, mu, s, tol=0.05)  # first order: its std falls short by pi^2 / (8 K)
    x0 = mu + s * torch.randn(x.shape, generator=g)
    xt = m.q_sample(x0, torch.full((4000,), 250), torch.randn(x.shape, generator=g), ab)
    assert_moments(m.ddim_sample(eps_fn, xt, ab, m.ddim_timesteps(250, 251), 1.0, g), mu, s)
    assert_moments(m.dpmpp_sample(eps_fn, xt, ab, m.dpmpp_timesteps(ab, 250, 20)), mu, s)


def test_guidance_on_v_in_one_doubled_batch():
    """denoiser guides v, v = v_u + w (v_c - v_u), in one doubled batch (rows to drop stay
    unconditional), and only then turns it into eps."""
    calls = []

    def model(x, t, y, drop):  # v_u = 0.1, v_c = 0.2 + y / 100
        calls.append((y.tolist(), drop.tolist()))
        return torch.where(drop, 0.1, 0.2 + y / 100).view(-1, 1, 1, 1).expand_as(x)
    ab = m.make_alphas_cumprod("cosine", 500, "cpu")
    x, t = torch.full((2, 3, 2, 2), 0.3), torch.tensor([20, 20])
    y, drop = torch.tensor([3, 7]), torch.tensor([False, True])
    eps = m.denoiser(model, y, drop, 6.0, ab)(x, t)
    assert calls == [([3, 7, 3, 7], [False, True, True, True])]
    v = torch.tensor([0.1 + 6 * (0.23 - 0.1), 0.1]).view(-1, 1, 1, 1)
    assert torch.allclose(eps, m.eps_from_pred(v, x, ab[20]).expand_as(x), atol=1e-5)


# ----------------------------------------------------------------------------- the model

def test_cross_attention_uses_the_frozen_table():
    torch.manual_seed(0)
    meta = dict(classes=STL_CLASSES, channels=3, text_emb=torch.randn(11, 16), context_dim=16)
    model = m.build_model(dict(width=32, depth=1, dropout=0.0), meta).eval()
    assert torch.equal(model.text_emb, meta["text_emb"])  # build_model copies meta's table
    assert "text_emb" not in dict(model.named_parameters())  # frozen: a buffer
    x, t = torch.randn(1, 3, 96, 96).repeat(3, 1, 1, 1), torch.tensor([5, 5, 5])
    y, drop = torch.tensor([0, 1, 4]), torch.tensor([False, False, True])
    with torch.no_grad():
        out = model(x, t, y, drop)
        assert (out[0] - out[1]).abs().max() > 1e-4 and (out[0] - out[2]).abs().max() > 1e-4
        assert torch.allclose(model(x[:1], t[:1], torch.tensor([10]), drop[:1]), out[2:], atol=1e-5)
        model.text_emb[10] += 1.0  # only the null row (drop) changes
        again = model(x, t, y, drop)
    assert torch.equal(again[:2], out[:2]) and (again[2] - out[2]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- CLIP or not

def test_without_open_clip_it_trains_and_samples(learned, tmp_path, monkeypatch, capsys):
    """Issue 14: the card's command without open_clip trains learned embeddings, says so in one
    line, records cond "learned", and samples. Also issue 12: linear schedule, T=10, finite."""
    notice = [line for line in learned.printed.splitlines() if "open_clip" in line]
    assert len(notice) == 1 and "learned label embeddings" in notice[0]
    assert "pip install open_clip_torch" in notice[0] and "--text-emb" in notice[0]
    assert json.load(open(os.path.join(learned.out, "config.json")))["cond"] == "learned"
    losses = [r["loss"] for r in read_log(learned.out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    ck = load(learned.ckpt)
    assert ck["meta"]["text_emb"] is None and "text_emb" not in ck["ema"]
    emb = ck["model"]["label_emb.weight"]
    assert emb.shape == (11, 4 * 32)
    before = load(os.path.join(learned.out, "ckpt_2.pt"))["model"]["label_emb.weight"]
    assert not torch.equal(emb, before)  # the label embeddings are trained
    monkeypatch.setitem(sys.modules, "open_clip", None)
    capsys.readouterr()
    assert run(SCRIPT, "--sample", "--ckpt", learned.ckpt, "--out-dir", tmp_path, "--labels", "cat",
               "uncond", "--per-label", 1, "--sample-steps", 2, "--device", "cpu") == 0
    assert image_size(tmp_path / "samples.png") == grid_size(1, 2, 96)
    assert "note:" not in capsys.readouterr().out  # sampling needs no CLIP


def test_clip_table_computed_once_and_cached(tmp_path, fake_open_clip):
    folder = make_image_folder(str(tmp_path / "imgs"), per_class=2)
    config = vars(m.get_args(["--image-folder", folder, "--out-dir", str(tmp_path / "out")]))
    _, meta = m.get_data(config)
    cache = load(tmp_path / "out" / "clip_text_emb_stl10_vitb32.pt")
    assert cache["prompts"] == ["a photo of a cat", "a photo of a dog", "a photo of a ship", ""]
    assert cache["emb"].shape == (4, 512) and cache["context_dim"] == 512
    assert torch.allclose(cache["emb"].norm(dim=1), torch.ones(4))
    assert torch.equal(meta["text_emb"], cache["emb"]) and meta["context_dim"] == 512
    assert config["cond"] == "clip"
    _, again = m.get_data(dict(config))
    assert torch.equal(again["text_emb"], cache["emb"])
    assert fake_open_clip == [("ViT-B-32", "openai")]  # the second call read the cache
    os.rename(os.path.join(folder, "ship"), os.path.join(folder, "truck"))  # other prompts
    m.get_data(dict(config))
    assert len(fake_open_clip) == 2


FAKE_OPEN_CLIP = f"""import os, sys
sys.path.insert(0, {HERE!r})
from tests_stl10_vpred_clip import FakeClip, fake_tokenizer


def create_model_and_transforms(name, pretrained):
    with open(os.environ["CLIP_CALLS"], "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    return FakeClip(), None, None


def get_tokenizer(name):
    return fake_tokenizer
"""


def test_torchrun_computes_the_clip_table_once(tmp_path, monkeypatch):
    """Issue 12: two ranks on one machine: rank 0 computes and caches the table, rank 1 waits and
    reads it (before, both computed it and wrote one .tmp file)."""
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "open_clip.py").write_text(FAKE_OPEN_CLIP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("CLIP_CALLS", str(tmp_path / "calls"))
    folder, out = make_image_folder(str(tmp_path / "imgs"), per_class=2), str(tmp_path / "out")
    r = torchrun(SCRIPT, 2, "--image-folder", folder, "--out-dir", out, *TINY, "--iters", 1,
                 "--steps", 10, "--diag-every", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "calls").read_text() == "0\n"
    table = load(os.path.join(out, "clip_text_emb_stl10_vitb32.pt"))["emb"]
    assert torch.equal(load(os.path.join(out, "ckpt.pt"))["ema"]["text_emb"], table)


def test_bad_text_emb_is_one_line(stl, capsys, tmp_path):
    base = ["--data-dir", stl.data, "--out-dir", tmp_path / "o", *TINY, "--iters", 1]
    bad = tmp_path / "bad.pt"
    torch.save(dict(emb=torch.randn(5, 16), context_dim=16, prompts=[""] * 5), bad)
    assert "[11, D]" in assert_bad_input(capsys, SCRIPT, *base, "--text-emb", bad)
    missing = assert_bad_input(capsys, SCRIPT, *base, "--text-emb", tmp_path / "x.pt")
    assert "--text-emb" in missing and "x.pt" in missing
    assert not os.path.exists(tmp_path / "o")


# ----------------------------------------------------------------------------- seed 000's extras

def test_diagnostics_and_sweep_from_a_checkpoint(learned, stl, tmp_path, capsys):
    """The seed's inference_full and inference_sweeps in its own spellings."""
    out = tmp_path / "figs"
    assert run(SCRIPT, "--diagnostics", "--sweep", "--checkpoint", learned.ckpt, "--out", out,
               "--schedulers", "cosine", "linear", "--sweep-cfg", 0, 6, "--sweep-eta", 0, 1,
               "--label", 10, "--per-label", 1, "--sample-steps", 2, "--seed", 42,
               "--data-dir", stl.data, "--device", "cpu") == 0
    assert sorted(os.listdir(out)) == ["diagnostics", "sweeps"]  # and no samples.png
    diag = out / "diagnostics" / "step_3"
    assert sorted(os.listdir(diag)) == ["collage.png", "embeddings.png", "grid_cfg6.0.png",
                                        "reconstruction.png", "reconstruction_sweep.png"]
    assert image_size(diag / "embeddings.png") == (480, 400)
    assert image_size(diag / "collage.png") == grid_size(2, 4, 96)  # 2 steps, 4 samples
    assert image_size(diag / "grid_cfg6.0.png") == grid_size(1, 11, 96)  # 10 classes + uncond
    assert image_size(diag / "reconstruction.png") == grid_size(6, 2, 96)  # image + 5 t, 2 rows
    assert image_size(diag / "reconstruction_sweep.png") == grid_size(6, 4, 96)  # 4 images
    for schedule in ("cosine", "linear"):
        names = sorted(os.listdir(out / "sweeps" / schedule))
        assert names == sorted(f"grid_{schedule}_cfg{w}_eta{e}.png" for w in ("0.0", "6.0")
                               for e in ("0.0", "1.0"))
        assert image_size(out / "sweeps" / schedule / names[0]) == (96, 96)  # one image
    a, b = (np.asarray(Image.open(out / "sweeps" / s / f"grid_{s}_cfg6.0_eta0.0.png"))
            for s in ("cosine", "linear"))
    assert not np.array_equal(a, b)  # the schedule changes the sampler
    sweep = ["--sweep", "--ckpt", learned.ckpt, "--out-dir", tmp_path / "x", "--device", "cpu"]
    assert "--sweep-eta" in assert_bad_input(capsys, SCRIPT, *sweep, "--sweep-eta", 2)
    assert not os.path.exists(tmp_path / "x")


def test_tensorboard_projector_of_the_clip_table(stl, tmp_path):
    """A CLIP run (--text-emb): the table is the model's frozen buffer in the checkpoint, and the
    diagnostics send it to TensorBoard's projector with the class names."""
    pytest.importorskip("tensorboard", reason="CI installs tensorboard; locally optional")
    out = str(tmp_path / "out")
    assert run(SCRIPT, "--data-dir", stl.data, "--text-emb", stl.emb, "--out-dir", out, *TINY,
               "--steps", 10, "--iters", 1, "--diag-every", 1, "--tensorboard") == 0
    ck = load(os.path.join(out, "ckpt.pt"))
    assert torch.equal(ck["ema"]["text_emb"], load(stl.emb)["emb"])
    assert ck["meta"]["context_dim"] == 16
    assert "label_emb.weight" not in ck["model"] and ck["config"]["cond"] == "clip"
    names = [os.path.join(d, "metadata.tsv") for d, _, fs in os.walk(out) if "metadata.tsv" in fs]
    assert names and open(names[0]).read().split() == STL_CLASSES + ["uncond"]
