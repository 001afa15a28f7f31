from test_smoke import (pattern_images, make_image_folder, run, assert_bad_input, gaussian_eps, assert_moments,
                        image_size, torchrun, same_weights, load, ddim_gaussian_std, TINY, HERE)
import json
import os
import pickle
import sys
import urllib.error
from types import SimpleNamespace

import pytest
import torch

# ----------------------------------------------------------------------------- cifar_dit_ddp.py

DIT_TINY = [*TINY, "--heads", "4", "--kv-heads", "2", "--recon-t", "0.5", "--ckpt-every", "100", "--lr", "1e-3",
            "--warmup", "1"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar(root, per_class=1):
    """cifar-10-batches-py as torchvision reads it: pickled dicts with 'data' [N, 3072] (channel planes,
    row-major) and 'labels', five training batches, a test batch and batches.meta with the class names."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = pattern_images(10, per_class, 32, 3, seed=i)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), "labels": y.tolist()}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES}, f)
    return root


@pytest.fixture(scope="module", autouse=True)
def dit_no_checksum():
    """The generated files are not the real ones: patch only torchvision's md5 checks."""
    import torchvision.datasets.cifar as cifar
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
        mp.setattr(cifar, "check_integrity", lambda *a, **k: True)
        yield


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """A tiny run on generated CIFAR-10 (50 images: 45 train + 5 held out, 5 steps/epoch): 2 epochs, then
    resumed to 3, with periodic checkpoints every epoch, keeping 1."""
    root = tmp_path_factory.mktemp("dit")
    data, out = make_cifar(str(root / "data")), str(root / "out")
    base = ["--data-dir", data, "--out-dir", out, *DIT_TINY, "--save-every", "1", "--keep", "1"]
    assert run("cifar_dit_ddp", *base, "--epochs", "2") == 0
    assert run("cifar_dit_ddp", *base, "--epochs", "3", "--resume") == 0
    return SimpleNamespace(data=data, out=out, base=base, ckpt=os.path.join(out, "ckpt.pt"))


def test_dit_train_writes_run_files(dit_run):
    out = dit_run.out
    for f in ("config.json", "ckpt.pt", "best.pt", "log.jsonl", "samples_15.png", "reconstruction.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_")) == ["ckpt_15.pt"]  # --keep 1
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 16))  # resumed at 10, not restarted
    epochs = [r for r in log if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and all(r["epoch_time"] > 0 for r in epochs)
    ck, best = load(dit_run.ckpt), load(os.path.join(out, "best.pt"))
    assert ck["step"] == 15 and {"model", "ema", "opt", "rng", "config", "classes"} <= ck.keys()
    assert ck["classes"] == CIFAR_CLASSES and ck["best_val"] == min(r["val_loss"] for r in epochs)
    assert best["best_val"] == ck["best_val"] and best["step"] in (5, 10, 15)
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    assert image_size(os.path.join(out, "samples_15.png")) == (10 * 33 + 1, 11 * 33 + 1)  # + uncond row
    assert image_size(os.path.join(out, "sample_grid.png")) == (10 * 33 + 1, 10 * 33 + 1)  # seed's 10x10
    assert image_size(os.path.join(out, "timestep_grid.png")) == (4 * 33 + 1, 10 * 33 + 1)  # 4 sampler steps
    assert image_size(os.path.join(out, "reconstruction.png")) == (10 * 33 + 1, 3 * 33 + 1)


def test_dit_resume_gives_identical_weights(dit_run, tmp_path):
    out = str(tmp_path / "straight")
    assert run("cifar_dit_ddp", *dit_run.base, "--out-dir", out, "--epochs", "3") == 0
    a, b = load(os.path.join(out, "ckpt.pt")), load(dit_run.ckpt)
    assert same_weights(a["model"], b["model"]) and same_weights(a["ema"], b["ema"])


@pytest.mark.parametrize("sampler,cfg", [("ddpm", "3"), ("ddim", "0"), ("dpmpp", "2")])
def test_dit_sample_each_sampler(dit_run, tmp_path, sampler, cfg):
    out = str(tmp_path)
    assert run("cifar_dit_ddp", "--sample", "--ckpt", dit_run.ckpt, "--out-dir", out, "--sampler", sampler,
               "--sample-steps", "4", "--cfg", cfg, "--labels", "cat,9,uncond", "--n", "4", "--device", "cpu") == 0
    assert image_size(os.path.join(out, "samples.png")) == (4 * 33 + 1, 3 * 33 + 1)
    assert image_size(os.path.join(out, "timestep_grid.png"))[1] == 3 * 33 + 1  # one row per label


def test_dit_gif_and_config_rerun(dit_run, tmp_path):
    from PIL import Image
    assert run("cifar_dit_ddp", "--sample", "--ckpt", dit_run.ckpt, "--gif", "--out-dir", str(tmp_path),
               "--sample-steps", "5", "--labels", "1,2", "--n", "3", "--device", "cpu") == 0
    with Image.open(tmp_path / "denoise.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (3 * 33 + 1, 2 * 33 + 1)
    cfg = json.load(open(os.path.join(dit_run.out, "config.json")))
    out2 = str(tmp_path / "again")
    assert run("cifar_dit_ddp", "--config", os.path.join(dit_run.out, "config.json"), "--out-dir", out2,
               "--iters", "1") == 0
    cfg2 = json.load(open(os.path.join(out2, "config.json")))
    assert {k for k in cfg if cfg[k] != cfg2[k]} == {"out_dir", "iters", "config", "resume"}
    assert cfg2["kv_heads"] == 2 and cfg2["save_every"] == 1


def test_dit_gqa_equals_mha_and_shapes():
    import cifar_dit_ddp as m
    torch.manual_seed(0)
    x = torch.randn(3, 17, 32)
    for kv in (1, 2, 4):
        assert m.GQAttention(32, 4, kv)(x).shape == x.shape
    gqa, mha = m.GQAttention(32, 4, 4), torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([gqa.q.weight, gqa.kv.weight]))  # kv rows are [W_k; W_v]
        mha.in_proj_bias.copy_(torch.cat([gqa.q.bias, gqa.kv.bias]))
        mha.out_proj.weight.copy_(gqa.proj.weight), mha.out_proj.bias.copy_(gqa.proj.bias)
    assert torch.allclose(gqa(x), mha(x, x, x, need_weights=False)[0], atol=1e-5)
    # with fewer kv heads, each group of queries attends with its own shared key/value head
    g2 = m.GQAttention(32, 4, 2)
    k, v = g2.kv(x).view(3, 17, 2, 2, 8).permute(2, 0, 3, 1, 4)
    q = g2.q(x).view(3, 17, 4, 8).transpose(1, 2)
    att = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v.repeat_interleave(2, 1)
    assert torch.allclose(g2(x), g2.proj(att.transpose(1, 2).reshape(3, 17, 32)), atol=1e-5)


@pytest.mark.parametrize("cond", ["token", "adaln"])
def test_dit_both_cond_modes_on_an_image_folder(tmp_path, cond):
    import cifar_dit_ddp as m
    folder, out = make_image_folder(str(tmp_path / "imgs"), per_class=8), str(tmp_path / "out")
    assert run("cifar_dit_ddp", "--image-folder", folder, "--out-dir", out, *DIT_TINY, "--cond", cond,
               "--iters", "3", "--sample-every", "100", "--lr", "1e-2") == 0
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["classes"] == ["cat", "dog", "ship"]
    model = m.build_model(ck["config"], 3)
    model.load_state_dict(ck["model"])
    assert model.pos.shape[1] == 64 + (cond == "token")  # the seed's 65 positions with the token
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 5])
    with torch.no_grad():  # after training the output depends on the class (heads start at zero)
        assert not torch.allclose(model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([2, 2])))
    fresh = m.build_model(ck["config"], 3)
    assert fresh(x, t, torch.tensor([0, 1])).abs().max() == 0  # zero-initialised output layer (DiT)


def test_dit_samplers_match_gaussian_moments():
    import cifar_dit_ddp as m
    mu, s = 1.0, 0.5
    ab = torch.cumprod(1 - m.make_betas("linear", 1000), 0).float()
    eps_fn = gaussian_eps(mu, s, ab)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4000, 16), generator=g)
    assert_moments(m.ddim_sample(eps_fn, x, ab, 1000, 1.0, g), mu, s)  # eta=1 on all T steps: ddpm
    for steps in (20, 50):
        assert_moments(m.dpmpp_sample(eps_fn, x, ab, steps), mu, s)
        out = m.ddim_sample(eps_fn, x, ab, steps, 0.0)
        assert_moments(out, mu, ddim_gaussian_std(m.sample_timesteps(1000, steps), ab, s), tol=0.01)
        assert abs(out.mean().item() - mu) < 0.02 * mu
    # reconstruction: a truncated schedule denoises from t0; for data = mu exactly, x_t0 returns to mu
    x0 = torch.full((8, 16), mu)
    xt = ab[300].sqrt() * x0 + (1 - ab[300]).sqrt() * torch.randn(8, 16, generator=g)
    back = m.ddim_sample(gaussian_eps(mu, 1e-4, ab), xt, ab[:301], 50, 0.0)
    assert torch.allclose(back, x0, atol=1e-3)


def test_dit_torchrun_two_processes(dit_run, tmp_path):
    """2 ranks (gloo), 2 accumulated micro-batches: both ranks train, rank 0 alone writes, weights equal."""
    out, ranks = str(tmp_path / "out"), str(tmp_path / "ranks")
    wrapper = tmp_path / "dit_ranks.py"  # patches the md5 checks, saves each rank's trained weights
    wrapper.write_text(f"import os, sys, torch\nsys.path.insert(0, {HERE!r})\nimport cifar_dit_ddp as m\n"
                       "import torchvision.datasets.cifar as c\nc.check_integrity = lambda *a, **k: True\n"
                       "c.CIFAR10._check_integrity = lambda self: True\n"
                       "seen = {}\nupdate = m.update_ema\n"
                       "m.update_ema = lambda ema, model, d: (seen.update(model=model), update(ema, model, d))\n"
                       f"m.main(sys.argv[1:])\nos.makedirs({ranks!r}, exist_ok=True)\n"
                       f"torch.save(seen['model'].state_dict(), os.path.join({ranks!r}, os.environ['RANK'] + '.pt'))\n")
    r = torchrun(str(wrapper), 2, "--data-dir", dit_run.data, "--out-dir", out, *DIT_TINY, "--iters", "3",
                 "--batch-size", "4", "--accum", "2", "--sample-every", "100")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("global batch 16 (4 x 2 devices x 2 accumulated)") == 1  # printed by rank 0 only
    assert same_weights(load(os.path.join(ranks, "0.pt")), load(os.path.join(ranks, "1.pt")))
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 3 and len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0], ck["rng"][1])
    assert same_weights(ck["model"], load(os.path.join(ranks, "0.pt")))
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]  # one writer
    assert not any(f.endswith(".tmp") or f.startswith("ckpt_") for f in os.listdir(out))


def test_dit_eval_writes_seed_keys(dit_run, tmp_path, monkeypatch):
    fid = pytest.importorskip("fid")
    real_inception = fid.inception_v3
    monkeypatch.setattr(fid, "inception_v3", lambda weights="download": real_inception(None))  # random weights
    out = str(tmp_path)
    assert run("cifar_dit_ddp", "--eval", "--ckpt", dit_run.ckpt, "--fid", "10", "--is", "--data-dir",
               dit_run.data, "--out-dir", out, "--sample-steps", "2", "--device", "cpu") == 0
    res = json.load(open(os.path.join(out, "evaluation_results.json")))
    assert set(res) == {"num_samples", "checkpoint", "fid_score", "inception_score_mean", "inception_score_std"}
    assert res["num_samples"] == 10 and res["checkpoint"] == dit_run.ckpt and res["fid_score"] >= 0
    assert res["inception_score_mean"] >= 1
    assert image_size(os.path.join(out, "real_vs_fake.png")) == (10 * 33 + 1, 10 * 33 + 1)


def test_dit_loss_plot_or_one_message(tmp_path, capsys, monkeypatch):
    import cifar_dit_ddp as m
    recs = [{"step": 1, "loss": 1.0}, {"step": 1, "val_loss": 0.9, "epoch_time": 2.0}, {"step": 2, "loss": 0.5}]
    with monkeypatch.context() as mp:  # restores sys.modules as it was (a half-removed matplotlib breaks later users)
        mp.setitem(sys.modules, "matplotlib", None)  # as if not installed
        m.plot_loss(str(tmp_path), recs, "t")
    assert "log.jsonl" in capsys.readouterr().out and not os.path.exists(tmp_path / "training_loss.png")
    pytest.importorskip("matplotlib")
    m.plot_loss(str(tmp_path), recs, "t")
    assert os.path.getsize(tmp_path / "training_loss.png") > 0


def test_dit_tensorboard_scalars(dit_run, tmp_path):
    pytest.importorskip("tensorboard", reason="CI installs tensorboard; locally optional")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path)
    assert run("cifar_dit_ddp", "--data-dir", dit_run.data, "--out-dir", out, *DIT_TINY, "--iters", "2",
               "--tensorboard") == 0
    acc = EventAccumulator(os.path.join(out, "tb")).Reload()
    assert {"loss", "lr", "img_per_s", "val_loss"} <= set(acc.Tags()["scalars"]) and "samples" in acc.Tags()["images"]


def test_dit_bad_inputs(dit_run, capsys, tmp_path, monkeypatch):
    sample = ["--sample", "--ckpt", dit_run.ckpt, "--device", "cpu", "--out-dir", str(tmp_path)]
    assert "--labels" in assert_bad_input(capsys, "cifar_dit_ddp", *sample, "--labels", "cow")
    assert "--kv-heads" in assert_bad_input(capsys, "cifar_dit_ddp", "--heads", "4", "--kv-heads", "3")
    assert "--fid" in assert_bad_input(capsys, "cifar_dit_ddp", "--eval", "--ckpt", dit_run.ckpt)
    assert "--cfg" in assert_bad_input(capsys, "cifar_dit_ddp", *sample, "--cfg", "-1")
    assert "no checkpoint" in assert_bad_input(capsys, "cifar_dit_ddp", "--sample", "--ckpt", str(tmp_path / "x"))
    assert "--batch-size" in assert_bad_input(capsys, "cifar_dit_ddp", "--data-dir", dit_run.data, "--limit", "12",
                                              "--batch-size", "16", "--out-dir", str(tmp_path / "o"))
    os.makedirs(tmp_path / "empty" / "a")
    assert "--image-folder" in assert_bad_input(capsys, "cifar_dit_ddp", "--image-folder", str(tmp_path / "empty"),
                                                "--out-dir", str(tmp_path / "o"))
    mismatched = [*dit_run.base, "--out-dir", dit_run.out, "--kv-heads", "4", "--resume", "--epochs", "9"]
    assert "does not match" in assert_bad_input(capsys, "cifar_dit_ddp", *mismatched)
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: False)  # missing files, no network
    monkeypatch.setattr(cifar, "download_and_extract_archive",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    err = assert_bad_input(capsys, "cifar_dit_ddp", "--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path))
    assert "cifar-10-batches-py" in err and str(tmp_path / "none") in err
