"""Tests of cifar_cfg_unet.py (appended to test_smoke.py later, without the import line below)."""
import json
import os
import pickle
import shlex

import numpy as np
import pytest
import torch

from test_smoke import (pattern_images, make_image_folder, run, assert_bad_input, gaussian_eps, assert_moments,
                        image_size, torchrun, same_weights, load, ddim_gaussian_std, TINY)

CIFAR_TINY = [*TINY, "--sample-steps", "1"]  # training runs: the final 110-image grid in one denoising step


def make_cifar(root, per_class=8):
    """torchvision's cifar-10-batches-py: five train pickles, test_batch and batches.meta (latin1 pickles of
    {"data": uint8 [N, 3072] as R, G, B planes, "labels": [N]})."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    x, y = pattern_images(10, per_class, 32, 3, seed=0)
    order = np.random.default_rng(0).permutation(len(x))
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for name, idx in zip(names, np.array_split(order, 5)):
        batch = {"data": x[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1), "labels": y[idx].tolist()}
        pickle.dump(batch, open(os.path.join(folder, name), "wb"), protocol=2)
    xt, yt = pattern_images(10, 2, 32, 3, seed=1)
    pickle.dump({"data": xt.transpose(0, 3, 1, 2).reshape(len(xt), -1), "labels": yt.tolist()},
                open(os.path.join(folder, "test_batch"), "wb"), protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    pickle.dump({"label_names": names}, open(os.path.join(folder, "batches.meta"), "wb"), protocol=2)
    return root


@pytest.fixture(scope="module")
def cifar_data(tmp_path_factory):
    """Generated CIFAR-10 files (80 train, 20 test images); torchvision's md5 check reduced to 'file exists'."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: os.path.isfile(path))
        yield make_cifar(str(tmp_path_factory.mktemp("cifar")))


@pytest.fixture(scope="module")
def cifar_run(cifar_data, tmp_path_factory):
    """A tiny conditional run: 32 training images, batch 8, so 4 steps per epoch; 1 epoch, then resumed to 2."""
    out = str(tmp_path_factory.mktemp("cifar_out"))
    base = ["--data-dir", cifar_data, "--out-dir", out, *CIFAR_TINY, "--limit", "32", "--ckpt-every", "2",
            "--sample-every", "100"]
    assert run("cifar_cfg_unet", *base, "--epochs", "1") == 0
    assert run("cifar_cfg_unet", *base, "--epochs", "2", "--resume") == 0
    return type("Run", (), dict(data=cifar_data, out=out, base=base, ckpt=os.path.join(out, "ckpt.pt")))


def test_cifar_loader_reads_the_pickles(cifar_data):
    import cifar_cfg_unet as m
    args = m.get_args(["--data-dir", cifar_data, "--limit", "20"])
    splits, classes = m.get_data(args)
    assert classes[3] == "cat"
    (x, y), (xv, _), (xt, yt) = splits["train"], splits["val"], splits["test"]
    assert x.dtype == torch.uint8 and x.shape == (20, 3, 32, 32) and xv.shape == (8, 3, 32, 32)
    assert xt.shape == (20, 3, 32, 32) and yt.tolist() == np.repeat(np.arange(10), 2).tolist()
    # class k lights the k-th 3-pixel column stripe (pattern_images) in every channel
    for img, k in zip(x, y):
        assert img[:, :, 3 * k:3 * k + 3].float().mean() > 190 and img[:, :, 31].float().mean() < 60 or k == 10
    full = m.get_data(m.get_args(["--data-dir", cifar_data]))[0]
    train_set = {tuple(v.flatten()[:64].tolist()) for v in full["train"][0]}
    assert len(full["train"][0]) == 72 and not any(tuple(v.flatten()[:64].tolist()) in train_set for v in xv)
    assert torch.equal(m.get_data(args)[0]["val"][0], xv)  # the split is fixed, whatever --seed


def test_cifar_train_writes_run_files(cifar_run):
    out = cifar_run.out
    for f in ("config.json", "ckpt.pt", "log.jsonl", "loss_history.json", "samples_4.png", "samples_8.png",
              "reconstruction.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, 9))  # resumed at 4, not restarted
    hist = json.load(open(os.path.join(out, "loss_history.json")))
    assert hist["epochs"] == [0, 1] and all(len(hist[k]) == 2 for k in ("train_loss", "val_loss", "test_loss"))
    assert all(0 < v < 3 for k in ("train_loss", "val_loss", "test_loss") for v in hist[k])
    assert abs(hist["train_loss"][1] - np.mean([r["loss"] for r in log[4:]])) < 1e-6  # the epoch's mean
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 8 and ck["history"] == hist and ck["classes"][0] == "airplane"
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    assert image_size(os.path.join(out, "samples_8.png")) == (10 * 33 + 1, 11 * 33 + 1)  # 10 classes + uncond
    assert image_size(os.path.join(out, "reconstruction.png")) == (7 * 33 + 1, 8 * 33 + 1)


def test_cifar_validation_loss_is_on_fixed_noise(cifar_run):
    import cifar_cfg_unet as m
    ck = load(cifar_run.ckpt)
    model = m.build_model(ck["config"], 10).eval()
    model.load_state_dict(ck["model"])
    args = m.get_args(["--data-dir", cifar_run.data, "--steps", "20"])
    (xv, yv) = m.get_data(args)[0]["val"]
    ab = torch.cumprod(1 - m.make_betas("cosine", 20), 0).float()
    a, b = m.eval_loss(model, xv, yv, ab, args, 10), m.eval_loss(model, xv, yv, ab, args, 10)
    torch.manual_seed(1)  # the global RNG plays no part
    assert a == m.eval_loss(model, xv, yv, ab, args, 10) == b


def test_cifar_resume_gives_identical_weights(cifar_run, tmp_path):
    out = str(tmp_path / "straight")
    assert run("cifar_cfg_unet", *cifar_run.base, "--out-dir", out, "--epochs", "2") == 0
    a, b = load(os.path.join(out, "ckpt.pt")), load(cifar_run.ckpt)
    assert same_weights(a["model"], b["model"]) and same_weights(a["ema"], b["ema"])
    assert a["history"] == b["history"]


@pytest.mark.parametrize("sampler,cfg,labels", [("ddpm", "3", "3,uncond"), ("ddim", "0", "cat,ship"),
                                                ("dpmpp", "1", "0,9")])
def test_cifar_sample_each_sampler(cifar_run, tmp_path, sampler, cfg, labels):
    assert run("cifar_cfg_unet", "--sample", "--ckpt", cifar_run.ckpt, "--out-dir", str(tmp_path), "--sampler",
               sampler, "--cfg", cfg, "--sample_classes", labels, "--n", "4", "--device", "cpu",
               "--sample-steps", "4") == 0
    assert image_size(os.path.join(tmp_path, "samples.png")) == (4 * 33 + 1, 2 * 33 + 1)


def test_cifar_cfg_sweep_and_gif(cifar_run, tmp_path):
    from PIL import Image
    common = ["--sample", "--ckpt", cifar_run.ckpt, "--out-dir", str(tmp_path), "--device", "cpu", "--n", "1"]
    assert run("cifar_cfg_unet", *common, "--cfg-sweep", "0,3,7", "--labels", "1,2,3,4", "--sample-steps", "3") == 0
    sweep = np.asarray(Image.open(tmp_path / "cfg_sweep.png"), dtype=float)
    assert sweep.shape[:2] == (3 * 33 + 1, 4 * 33 + 1)
    assert np.abs(sweep[1:33] - sweep[34:66]).mean() > 1  # W=0 and W=3 rows differ
    assert run("cifar_cfg_unet", *common, "--gif", "--sample-steps", "5", "--labels", "1,2") == 0
    with Image.open(tmp_path / "denoise.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (33 + 1, 2 * 33 + 1)


def test_cifar_uncond_end_to_end(cifar_data, tmp_path):
    out = str(tmp_path / "out")
    assert run("cifar_cfg_unet", "--data-dir", cifar_data, "--out-dir", out, *CIFAR_TINY, "--limit", "16", "--uncond",
               "--epochs", "1", "--data-on-device") == 0
    ck = load(os.path.join(out, "ckpt.pt"))
    assert not any(k.startswith("label_emb") for k in ck["model"])
    assert image_size(os.path.join(out, "samples_2.png")) == (10 * 33 + 1, 33 + 1)  # one row, no labels
    assert run("cifar_cfg_unet", "--sample", "--out-dir", out, "--num_samples", "3", "--device", "cpu",
               "--sample-steps", "3") == 0
    assert image_size(os.path.join(out, "samples.png")) == (3 * 33 + 1, 33 + 1)


def test_cifar_seed_workflows(cifar_data, tmp_path, monkeypatch):
    """The seed's Example Workflows, verbatim but for --epochs 1 and a tiny model on the generated data."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--data-dir", cifar_data, *CIFAR_TINY, "--limit", "16", "--sample-every", "100"]
    sample = ["--device", "cpu", "--sample-steps", "3"]
    commands = [
        "--epochs 1 --save_model --run_name quick_test",
        "--inference --model_path models/quick_test/ckpt.pt --num_samples 16",
        "--epochs 1 --batch_size 64 --lr 0.003 --save_model --run_name DDPM_50epochs --save_dir outputs_50ep",
        "--conditional --epochs 1 --p_uncond 0.1 --save_model --run_name DDPM_conditional "
        "--save_dir outputs_conditional",
        "--inference --conditional --model_path models/DDPM_conditional/ckpt.pt --num_samples 16 "
        "--guidance_scale 5.0 --sample_classes 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0 --save_dir airplane_samples",
        *[f"--inference --conditional --model_path models/DDPM_conditional/ckpt.pt --num_samples 10 "
          f"--guidance_scale {w} --sample_classes 3,3,3,3,3,3,3,3,3,3 --save_dir cats_guidance_{w}"
          for w in ("0.0", "3.0", "7.0")]]
    for cmd in commands:
        argv = shlex.split(cmd)
        # TINY sets --batch-size 8; the seed's --batch_size 64 (the same flag) comes later and wins, so cap it
        extra = sample if "--inference" in argv else tiny + (["--limit", "64"] if "--batch_size" in argv else [])
        assert run("cifar_cfg_unet", *extra, *argv) == 0, cmd
    assert load("models/quick_test/ckpt.pt")["step"] == 2
    assert load("models/DDPM_50epochs/ckpt.pt")["config"]["lr"] == 0.003
    assert os.path.isfile("outputs_50ep/loss_history.json") and os.path.isfile("out/cifar_cfg_unet/samples.png")
    assert image_size("airplane_samples/samples.png") == (10 * 33 + 1, 2 * 33 + 1)
    assert all(image_size(f"cats_guidance_{w}/samples.png") == (10 * 33 + 1, 33 + 1) for w in ("0.0", "3.0", "7.0"))


def test_cifar_film_conditioning_conditions(monkeypatch):
    """Overfit a tiny model on two 8x8 images of two classes: at --cfg 1 each label gives its own image.
    The label only matters where x_t hides the class (high noise), so training draws t weighted toward it."""
    import cifar_cfg_unet as m
    monkeypatch.setattr(m, "IMAGE_SIZE", 8)
    torch.manual_seed(0)
    x0 = torch.tensor([[0.8, -0.8, -0.8], [-0.8, -0.8, 0.8]]).view(2, 3, 1, 1).repeat(1, 1, 8, 8)
    x0[:, :, :4] *= -1  # red-ish vs blue-ish, top half inverted
    ab = torch.cumprod(1 - m.make_betas("cosine", 20), 0).float()
    model = m.UNet(16, 1, (1,), n_classes=2, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        y = torch.randint(0, 2, (8,))
        t = torch.randint(0, 20, (8,)).maximum(torch.randint(0, 20, (8,)))  # P(t) grows with t
        loss = m.p_losses(model, x0[y], y, ab, 0.1, 2, t=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    args = type("A", (), dict(cfg=1.0, sampler="ddim", sample_steps=20, eta=0.0))
    out = m.generate(model.eval(), ab, [0, 1] * 8, args, 2, seed=1)
    nearest = ((out[:, None] - x0[None]) ** 2).mean((2, 3, 4)).argmin(1)
    assert (nearest == torch.tensor([0, 1] * 8)).sum() >= 14, nearest  # a label-blind model: 8 of 16 on average


def test_cifar_samplers_match_gaussian_moments():
    import cifar_cfg_unet as m
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
    # started part way (the reconstruction figure): x_t of Gaussian data, denoised back to the data's moments
    t = 500
    xt = ab[t].sqrt() * (mu + s * torch.randn((4000, 16), generator=g)) + (1 - ab[t]).sqrt() * torch.randn(
        (4000, 16), generator=g)
    assert_moments(m.ddim_sample(eps_fn, xt, ab, t + 1, 1.0, g, t_start=t), mu, s)


def test_cifar_schedules():
    import cifar_cfg_unet as m
    for name in ("linear", "cosine", "sigmoid"):
        for T in (10, 100, 1000):
            ab = torch.cumprod(1 - m.make_betas(name, T), 0)
            assert (ab[1:] < ab[:-1]).all() and (ab > 0).all() and ab[0] <= 1 and ab[-1] < 1e-3, (name, T)
    t = torch.tensor([0.0, 250, 500, 999])
    f = lambda u: torch.cos((u / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2
    ab = torch.cumprod(1 - m.make_betas("cosine", 1000), 0)
    assert torch.allclose(ab[t.long()].float(), (f(t + 1) / f(torch.tensor(0.0))).float(), rtol=1e-4)


def test_cifar_periodic_checkpoints_and_config_rerun(cifar_data, tmp_path):
    out = str(tmp_path / "out")
    assert run("cifar_cfg_unet", "--data-dir", cifar_data, "--out-dir", out, *CIFAR_TINY, "--iters", "7",
               "--limit", "16", "--save-every", "2", "--keep", "2", "--ckpt-every", "2", "--sample-every", "100", "--loss", "l1") == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_")) == ["ckpt_4.pt", "ckpt_6.pt"]
    assert load(os.path.join(out, "ckpt.pt"))["step"] == 7
    assert json.load(open(os.path.join(out, "loss_history.json")))["epochs"] == [0, 1, 2]  # 2 steps per epoch
    cfg = json.load(open(os.path.join(out, "config.json")))
    out2 = str(tmp_path / "again")
    assert run("cifar_cfg_unet", "--config", os.path.join(out, "config.json"), "--out-dir", out2, "--iters", "1") == 0
    cfg2 = json.load(open(os.path.join(out2, "config.json")))
    assert {k for k in cfg if cfg[k] != cfg2[k]} == {"out_dir", "iters", "config"}
    assert cfg2["loss"] == "l1" and cfg2["save_every"] == 2


def test_cifar_tensorboard_scalars(cifar_data, tmp_path):
    pytest.importorskip("tensorboard", reason="CI installs tensorboard; locally optional")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "out")
    assert run("cifar_cfg_unet", "--data-dir", cifar_data, "--out-dir", out, *CIFAR_TINY, "--limit", "16",
               "--epochs", "1", "--tensorboard") == 0
    tags = EventAccumulator(os.path.join(out, "tb")).Reload().Tags()
    assert {"loss", "lr", "img_per_s", "val_loss", "test_loss"} <= set(tags["scalars"]) and "samples" in tags["images"]


def test_cifar_bad_inputs(cifar_run, capsys, tmp_path):
    sample = ["--sample", "--ckpt", cifar_run.ckpt, "--device", "cpu", "--out-dir", str(tmp_path)]
    assert "--labels" in assert_bad_input(capsys, "cifar_cfg_unet", *sample, "--labels", "12")
    assert "--labels" in assert_bad_input(capsys, "cifar_cfg_unet", *sample, "--labels", "unicorn")
    assert "--cfg" in assert_bad_input(capsys, "cifar_cfg_unet", *sample, "--guidance_scale", "-1")
    assert "--cfg-sweep" in assert_bad_input(capsys, "cifar_cfg_unet", *sample, "--cfg-sweep", "0,-3")
    assert "no checkpoint" in assert_bad_input(capsys, "cifar_cfg_unet", "--inference", "--model_path",
                                               str(tmp_path / "x.pt"))
    assert "--steps" in assert_bad_input(capsys, "cifar_cfg_unet", "--timesteps", "0")
    assert "--conditional" in assert_bad_input(capsys, "cifar_cfg_unet", "--conditional", "--uncond")
    err = assert_bad_input(capsys, "cifar_cfg_unet", "--data-dir", str(tmp_path / "nothing"), "--out-dir",
                           str(tmp_path / "o"), "--device", "cpu")
    assert "cifar-10-batches-py" in err and str(tmp_path / "nothing") in err
    assert "--batch-size" in assert_bad_input(capsys, "cifar_cfg_unet", "--data-dir", cifar_run.data, "--limit", "5",
                                              "--batch-size", "8", "--out-dir", str(tmp_path / "o"))
    mismatched = [*cifar_run.base, "--width", "64", "--resume", "--epochs", "3"]
    assert "does not match" in assert_bad_input(capsys, "cifar_cfg_unet", *mismatched)


def test_cifar_image_folder(tmp_path):
    folder = make_image_folder(str(tmp_path / "imgs"), per_class=8)
    out = str(tmp_path / "out")
    assert run("cifar_cfg_unet", "--image-folder", folder, "--out-dir", out, *CIFAR_TINY, "--iters", "2") == 0
    assert image_size(os.path.join(out, "samples_2.png")) == (10 * 33 + 1, 4 * 33 + 1)  # 3 classes + uncond
    assert load(os.path.join(out, "ckpt.pt"))["classes"] == ["cat", "dog", "ship"]


def test_cifar_torchrun_two_processes(tmp_path):
    folder = make_image_folder(str(tmp_path / "imgs"), per_class=8)  # 20 train images: 1 step per epoch at 2 x 8
    out = str(tmp_path / "out")
    r = torchrun("cifar_cfg_unet.py", 2, "--image-folder", folder, "--out-dir", out, *CIFAR_TINY, "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "global batch 16" in r.stdout
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 2 and len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0], ck["rng"][1])
    assert ck["history"]["epochs"] == [0, 1] and len(open(os.path.join(out, "log.jsonl")).readlines()) == 2


def test_cifar_fid_writes_json(cifar_run, tmp_path, monkeypatch):
    fid = pytest.importorskip("fid")
    real_inception = fid.inception_v3
    monkeypatch.setattr(fid, "inception_v3", lambda weights="download": real_inception(None))  # random weights
    assert run("cifar_cfg_unet", "--sample", "--ckpt", cifar_run.ckpt, "--out-dir", str(tmp_path), "--fid", "8",
               "--data-dir", cifar_run.data, "--device", "cpu", "--sample-steps", "2", "--n", "1") == 0
    res = json.load(open(tmp_path / "fid.json"))
    assert res["n"] == 8 and np.isfinite(res["fid"]) and res["fid"] > 0 and res["cfg"] == 3.0
