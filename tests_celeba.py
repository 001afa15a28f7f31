"""Tests for celeba_crossattn.py (appended to test_smoke.py later, without the import line below)."""
import json
import os
import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from test_smoke import (HERE, TINY, assert_bad_input, assert_moments, ddim_gaussian_std, gaussian_eps,
                        image_size, load, make_image_folder, make_mnist, pattern_images, run, same_weights,
                        torchrun)

CELEBA_NAMES = ["Male", "Smiling", "Eyeglasses", "Blond_Hair", "Young", "Heavy_Makeup"] + [f"Attr_{k}" for k in range(34)]
CELEBA_TINY = [*TINY, "--size", "32", "--workers", "0", "--cfg", "1", "--toggle", "Male,Smiling"]


def celeba_write(root, n=12, rows=None):
    """CelebA's layout: celeba/img_align_celeba/<6 digits>.jpg (178x218 like the real crops) and
    celeba/list_attr_celeba.txt (count, 40 names, one row of 1/-1 per image); rows overrides the attribute rows."""
    folder = os.path.join(root, "celeba", "img_align_celeba")
    os.makedirs(folder, exist_ok=True)
    x, _ = pattern_images(n, 1, 218, 3)
    g = np.random.default_rng(0)
    lines = [str(n), " ".join(CELEBA_NAMES)]
    for i in range(n):
        Image.fromarray(x[i, :, 20:198]).save(os.path.join(folder, f"{i + 1:06d}.jpg"))
        lines.append(f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in g.choice([-1, 1], len(CELEBA_NAMES))))
    lines[2:] = rows or lines[2:]
    with open(os.path.join(root, "celeba", "list_attr_celeba.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return root


def celeba_write_cifar(root, n=30):
    """torchvision's cifar-10-batches-py: pickled dicts with 'data' (uint8 [N, 3072], CHW rows) and 'labels'."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    x, y = pattern_images(10, n // 10, 32, 3)
    batch = {"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), "labels": y.tolist()}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    return root


@pytest.fixture(scope="module")
def celeba_run(tmp_path_factory):
    """A tiny run on generated CelebA at 32 px: 4 steps, then resumed to 6, with periodic checkpoints."""
    root = tmp_path_factory.mktemp("celeba")
    data, out = celeba_write(str(root / "data")), str(root / "out")
    base = ["--data-dir", data, "--out-dir", out, *CELEBA_TINY, "--ckpt-every", "2", "--save-every", "2",
            "--keep", "2"]
    assert run("celeba_crossattn", *base, "--iters", "4") == 0
    assert run("celeba_crossattn", *base, "--iters", "6", "--resume") == 0
    return SimpleNamespace(data=data, out=out, base=base, ckpt=os.path.join(out, "ckpt.pt"))


def test_celeba_train_writes_run_files(celeba_run):
    out = celeba_run.out
    for f in ("config.json", "ckpt.pt", "log.jsonl", "samples_4.png", "samples_6.png", "reconstruct.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # resumed at 4, not restarted
    assert {"loss", "lr", "img_per_s", "elapsed"} <= log[0].keys()
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 6 and {"model", "ema", "opt", "rng", "config"} <= ck.keys()
    assert ck["config"]["classes"] == CELEBA_NAMES and ck["config"]["kind"] == "attrs"
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_")) == ["ckpt_4.pt", "ckpt_6.pt"]
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    # the first 8 images' attributes, then one row per toggled attribute, 32 px + 1 px padding
    assert image_size(os.path.join(out, "samples_6.png")) == (8 * 33 + 1, 3 * 33 + 1)
    assert image_size(os.path.join(out, "reconstruct.png")) == (8 * 33 + 1, 4 * 33 + 1)  # real + 3 noise levels


def test_celeba_resume_gives_identical_weights(celeba_run, tmp_path):
    out = str(tmp_path / "straight")
    assert run("celeba_crossattn", *celeba_run.base, "--out-dir", out, "--iters", "6") == 0
    a, b = load(os.path.join(out, "ckpt.pt")), load(celeba_run.ckpt)
    assert same_weights(a["model"], b["model"]) and same_weights(a["ema"], b["ema"])


def test_celeba_config_rerun(celeba_run, tmp_path):
    out = str(tmp_path / "again")
    cfg = json.load(open(os.path.join(celeba_run.out, "config.json")))
    assert run("celeba_crossattn", "--config", os.path.join(celeba_run.out, "config.json"), "--out-dir", out,
               "--iters", "1", "--save-every", "0") == 0
    cfg2 = json.load(open(os.path.join(out, "config.json")))
    assert {k for k in cfg if cfg[k] != cfg2[k]} == {"out_dir", "iters", "config", "save_every", "resume"}
    assert cfg2["size"] == 32 and cfg2["width"] == 32


@pytest.mark.parametrize("sampler,cfg", [("ddpm", "3"), ("ddim", "0"), ("ddim", "1"), ("dpmpp", "2")])
def test_celeba_sample_each_sampler(celeba_run, tmp_path, sampler, cfg):
    out = str(tmp_path)
    assert run("celeba_crossattn", "--sample", "--ckpt", celeba_run.ckpt, "--out-dir", out, "--sampler", sampler,
               "--sample-steps", "4", "--cfg", cfg, "--attrs", "Male,-Smiling", "--n", "4", "--device", "cpu",
               "--toggle", "Young,Eyeglasses", *(["--gif"] if sampler == "dpmpp" else [])) == 0
    assert image_size(os.path.join(out, "samples.png")) == (4 * 33 + 1, 33 + 1)
    assert image_size(os.path.join(out, "toggles.png")) == (4 * 33 + 1, 3 * 33 + 1)  # base + 2 toggles
    if sampler == "dpmpp":
        with Image.open(os.path.join(out, "denoise.gif")) as gif:
            assert gif.n_frames == 4 and gif.size == (4 * 33 + 1, 33 + 1)


def test_celeba_attrs_and_toggle_change_tokens_and_output(celeba_run):
    import celeba_crossattn as m
    cfg = load(celeba_run.ckpt)["config"]
    args = SimpleNamespace(seed=0, n=5, attrs="Male,-Smiling", attrs_from=None, attr_file=None)
    conds = m.attr_conds(args, cfg)
    assert conds.shape == (5, 40) and (conds[:, 0] == 1).all() and (conds[:, 1] == 0).all()
    args.attrs_from, args.attrs = "000003.jpg", ""
    row = open(os.path.join(celeba_run.data, "celeba", "list_attr_celeba.txt")).read().splitlines()[4].split()
    assert row[0] == "000003.jpg" and conds.new_tensor([v == "1" for v in row[1:]]).equal(m.attr_conds(args, cfg)[0])
    torch.manual_seed(0)
    model = m.build_model(cfg).eval()
    c = conds[:2]
    flipped = c.clone()
    flipped[:, 2] = 1 - flipped[:, 2]  # Eyeglasses
    drop = torch.zeros(2, dtype=torch.bool)
    tok, tok2 = model.cond(c, drop), model.cond(flipped, drop)
    changed = (tok - tok2).abs().amax(dim=(0, 2)) > 0
    assert changed[2] and changed.sum() == 1  # exactly the toggled attribute's token
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        assert (model(x, t, c, drop) - model(x, t, flipped, drop)).abs().max() > 1e-4
        assert torch.allclose(model(x, t, c, ~drop), model(x, t, flipped, ~drop))  # null tokens ignore c


def test_celeba_loader_real_files(tmp_path):
    import celeba_crossattn as m
    real = os.path.join(HERE, "..", "shared", "data", "celeba")
    if not os.path.isdir(real):
        pytest.skip("the 32 real CelebA faces are not beside the repo")
    shutil.copytree(real, tmp_path / "celeba")
    args = SimpleNamespace(data_dir=str(tmp_path), image_dir=None, attr_file=None, image_folder=None,
                           dataset="celeba", download=False, size=64, limit=0)
    data, names, kind = m.get_data(args)
    rows = [line.split() for line in open(tmp_path / "celeba" / "list_attr_celeba.txt")][2:]
    assert kind == "attrs" and len(names) == 40 and names[31] == "Smiling" and len(data) == 32
    x, c = data[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 64) and x.float().std() > 20
    assert c.tolist() == [float(v == "1") for v in rows[5][1:]]
    # CelebA's own split file: only partition 0 (train) is used
    with open(tmp_path / "celeba" / "list_eval_partition.txt", "w") as f:
        f.write("".join(f"{r[0]} {int(i % 4 == 0)}\n" for i, r in enumerate(rows)))
    data, _, _ = m.get_data(args)
    assert len(data) == 24 and data.conds.tolist() == [[float(v == "1") for v in r[1:]]
                                                       for i, r in enumerate(rows) if i % 4]


def test_celeba_hq_layout(tmp_path):
    """CelebA-HQ via --image-dir/--attr-file: other folder and file names, same attribute format."""
    celeba_write(str(tmp_path), n=10)
    hq = tmp_path / "CelebAMask-HQ"
    hq.mkdir()
    shutil.move(str(tmp_path / "celeba" / "img_align_celeba"), hq / "CelebA-HQ-img")
    shutil.move(str(tmp_path / "celeba" / "list_attr_celeba.txt"), hq / "CelebAMask-HQ-attribute-anno.txt")
    out = str(tmp_path / "out")
    assert run("celeba_crossattn", "--image-dir", hq / "CelebA-HQ-img", "--attr-file",
               hq / "CelebAMask-HQ-attribute-anno.txt", "--out-dir", out, *CELEBA_TINY, "--iters", "1") == 0
    assert load(os.path.join(out, "ckpt.pt"))["config"]["size"] == 32


def test_celeba_bad_inputs(celeba_run, capsys, tmp_path):
    ckpt, name = celeba_run.ckpt, "celeba_crossattn"
    sample = ["--sample", "--ckpt", ckpt, "--device", "cpu", "--out-dir", str(tmp_path / "s")]
    assert "--attrs: unknown attribute 'Smiley'" in assert_bad_input(capsys, name, *sample, "--attrs", "Male,Smiley")
    assert "--toggle" in assert_bad_input(capsys, name, *sample, "--toggle", "Beard")
    assert "--attrs-from" in assert_bad_input(capsys, name, *sample, "--attrs-from", "999999.jpg")
    bad = str(tmp_path / "bad")
    rows = [f"{i:06d}.jpg" + " 1" * 40 for i in range(1, 13)]
    celeba_write(bad, rows=rows[:5] + [rows[5] + " 1"] + rows[6:])  # one row with 41 values
    train = ["--data-dir", bad, "--out-dir", str(tmp_path / "o"), *CELEBA_TINY, "--iters", "1"]
    assert "malformed attribute file at row 8" in assert_bad_input(capsys, name, *train)
    celeba_write(bad, rows=rows[:5] + [rows[5].replace(" 1", " 0", 1)] + rows[6:])  # a 0, not -1
    assert "malformed" in assert_bad_input(capsys, name, *train)
    celeba_write(bad, rows=rows[:-1])  # the count on line 1 says 12
    assert "malformed" in assert_bad_input(capsys, name, *train)
    celeba_write(bad)
    os.remove(os.path.join(bad, "celeba", "img_align_celeba", "000007.jpg"))
    err = assert_bad_input(capsys, name, *train)
    assert "missing" in err and "000007.jpg" in err
    assert "no CelebA" in assert_bad_input(capsys, name, "--data-dir", str(tmp_path / "none"), *train[2:])
    assert "--batch-size" in assert_bad_input(capsys, name, "--data-dir", celeba_run.data, "--limit", "5",
                                              "--out-dir", str(tmp_path / "o"), *CELEBA_TINY)
    assert "no checkpoint" in assert_bad_input(capsys, name, "--sample", "--ckpt", str(tmp_path / "x.pt"))
    assert "--steps" in assert_bad_input(capsys, name, "--steps", "0")
    assert "--cfg" in assert_bad_input(capsys, name, *sample, "--cfg", "-1")
    mismatched = [*celeba_run.base, "--width", "64", "--resume", "--iters", "8"]
    assert "does not match" in assert_bad_input(capsys, name, *mismatched)


def test_celeba_cifar10_mode(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # md5 of the real files
    data, out = celeba_write_cifar(str(tmp_path / "data")), str(tmp_path / "out")
    assert run("celeba_crossattn", "--dataset", "cifar10", "--data-dir", data, "--out-dir", out, *CELEBA_TINY,
               "--iters", "2") == 0
    cfg = load(os.path.join(out, "ckpt.pt"))["config"]
    assert cfg["classes"][3] == "cat" and cfg["kind"] == "classes" and cfg["freq"] == pytest.approx([0.1] * 10)
    assert image_size(os.path.join(out, "samples_2.png")) == (10 * 33 + 1, 11 * 33 + 1)  # 10 classes + uncond
    assert run("celeba_crossattn", "--sample", "--out-dir", out, "--labels", "3,uncond", "--n", "3",
               "--device", "cpu", "--sample-steps", "3") == 0
    assert image_size(os.path.join(out, "samples.png")) == (3 * 33 + 1, 2 * 33 + 1)
    assert "--labels" in assert_bad_input(capsys, "celeba_crossattn", "--sample", "--out-dir", out, "--labels", "10")


def test_celeba_image_folder(tmp_path, capsys):
    folder, out = make_image_folder(str(tmp_path / "imgs"), per_class=3), str(tmp_path / "out")
    assert run("celeba_crossattn", "--image-folder", folder, "--out-dir", out, *CELEBA_TINY, "--iters", "1") == 0
    cfg = load(os.path.join(out, "ckpt.pt"))["config"]
    assert cfg["classes"] == ["cat", "dog", "ship"] and cfg["kind"] == "classes" and cfg["size"] == 32
    assert image_size(os.path.join(out, "samples_1.png")) == (10 * 33 + 1, 4 * 33 + 1)  # 3 classes + uncond
    os.makedirs(tmp_path / "empty" / "a")
    assert "--image-folder" in assert_bad_input(capsys, "celeba_crossattn", "--image-folder", str(tmp_path / "empty"),
                                                "--out-dir", out)


def test_celeba_mnist_mode_odd_size(tmp_path):
    """MNIST at its own 28 px: 28 -> 14 -> 7 -> 4 -> 2 and back, upsampling to each skip's size."""
    data, out = make_mnist(str(tmp_path / "data"), per_class=2), str(tmp_path / "out")
    assert run("celeba_crossattn", "--dataset", "mnist", "--data-dir", data, "--out-dir", out, *CELEBA_TINY,
               "--size", "28", "--iters", "2", "--p-uncond", "0") == 0
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["config"]["channels"] == 1 and ck["model"]["stem.weight"].shape[1] == 1
    assert image_size(os.path.join(out, "samples_2.png")) == (10 * 29 + 1, 10 * 29 + 1)  # no uncond row


def test_celeba_samplers_match_gaussian_moments():
    import celeba_crossattn as m
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


def test_celeba_clipped_x0_bounds_eps_errors():
    """Near t = T, x0 = (x - sqrt(1-abar) eps) / sqrt(abar) multiplies an eps error by ~2e4: clipping x0 to the
    image range keeps a 0.01 error from reaching the samples."""
    import celeba_crossattn as m
    ab = torch.cumprod(1 - m.make_betas("cosine", 1000), 0).float()
    exact = gaussian_eps(0.0, 0.3, ab)
    eps_fn = lambda x, t: exact(x, t) + 0.01
    x = torch.randn((500, 16), generator=torch.Generator().manual_seed(0))
    assert m.ddim_sample(eps_fn, x, ab, 25, 0.0).abs().max() > 3
    for out in (m.ddim_sample(eps_fn, x, ab, 25, 0.0, clip=True), m.dpmpp_sample(eps_fn, x, ab, 25, clip=True)):
        assert out.abs().max() <= 1 and abs(out.std().item() - 0.3) < 0.04


def test_celeba_ema_warmup():
    import celeba_crossattn as m
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for step, decay in [(0, 0.0), (7, 1 - 8 ** (-2 / 3)), (10 ** 6, 0.999)]:
        ema, model = m.copy.deepcopy(a), m.copy.deepcopy(b)
        m.update_ema(ema, model, step, SimpleNamespace(ema=0.999))
        assert torch.allclose(ema.weight, decay * a.weight + (1 - decay) * b.weight, atol=1e-6)


def test_celeba_fid(celeba_run, tmp_path, monkeypatch):
    fid = pytest.importorskip("fid")
    net = fid.inception_v3
    monkeypatch.setattr(fid, "inception_v3", lambda weights: net(None))  # random weights, offline
    out = str(tmp_path)
    assert run("celeba_crossattn", "--sample", "--ckpt", celeba_run.ckpt, "--out-dir", out, "--fid", "6",
               "--n", "2", "--sample-steps", "2", "--device", "cpu") == 0
    res = json.load(open(os.path.join(out, "fid.json")))
    assert res["n"] == 6 and res["fid"] > 0 and res["sampler"] == "ddim"


def test_celeba_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="CI installs tensorboard; locally optional")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data, out = celeba_write(str(tmp_path / "data")), str(tmp_path / "out")
    assert run("celeba_crossattn", "--data-dir", data, "--out-dir", out, *CELEBA_TINY, "--iters", "2",
               "--tensorboard") == 0
    acc = EventAccumulator(os.path.join(out, "tb")).Reload()
    assert {"loss", "lr", "img_per_s"} <= set(acc.Tags()["scalars"]) and "samples" in acc.Tags()["images"]


def test_celeba_torchrun_two_processes(tmp_path):
    data, out = celeba_write(str(tmp_path / "data")), str(tmp_path / "out")
    r = torchrun("celeba_crossattn.py", 2, "--data-dir", data, "--out-dir", out, *CELEBA_TINY, "--iters", "2",
                 "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "global batch 8" in r.stdout
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 2 and len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0], ck["rng"][1])
    assert len(open(os.path.join(out, "log.jsonl")).readlines()) == 2  # one writer
