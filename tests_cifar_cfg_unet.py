"""Tests of what only cifar_cfg_unet.py has: its CIFAR-10 loader and fixed split, the FiLM-
conditioned U-Net, seed 001's loss history, guidance-scale sweep, sample count, spellings and
example workflows. The contract of every script is in test_smoke.py.

    pytest tests_cifar_cfg_unet.py
"""
import json
import os
import pickle
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import cifar_cfg_unet as m
from test_smoke import (CIFAR_CLASSES, TINY, assert_bad_input, grid_size, image_size, load,
                        make_cifar, read_log, run)

SCRIPT = "cifar_cfg_unet"


@pytest.fixture(scope="module", autouse=True)
def no_checksums():
    """The generated CIFAR-10 files are not the real ones: torchvision's md5 check becomes "the
    file exists"."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("torchvision.datasets.cifar.check_integrity",
                   lambda path, md5=None: os.path.isfile(path))
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Generated CIFAR-10: 80 training images (8 of them held out), 20 test images."""
    return make_cifar(str(tmp_path_factory.mktemp("cifar")))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """16 training images at batch 4: 4 steps an epoch. "resumed" trains 1 epoch, is resumed to
    step 6 (mid-epoch), then to 2 epochs; "straight" trains 2 epochs at once."""
    out = {k: str(tmp_path_factory.mktemp(k)) for k in ("resumed", "straight")}
    base = ["--data-dir", data, *TINY, "--limit", 16, "--ckpt-every", 2, "--sample-every", 100]
    assert run(SCRIPT, *base, "--out-dir", out["resumed"], "--epochs", 1) == 0
    assert run(SCRIPT, *base, "--out-dir", out["resumed"], "--iters", 6, "--resume") == 0
    assert run(SCRIPT, *base, "--out-dir", out["resumed"], "--epochs", 2, "--resume") == 0
    assert run(SCRIPT, *base, "--out-dir", out["straight"], "--epochs", 2) == 0
    return out


def test_loader_reads_the_pickles_and_holds_out_a_fixed_sample(data):
    config = vars(m.get_args(["--data-dir", data]))
    train, meta = m.get_data(config)
    ref, ref_meta = m.get_data(config, "fid")  # the FID reference: the training images, in order
    test, _ = m.get_data(config, "test")
    with open(os.path.join(data, "cifar-10-batches-py", "data_batch_1"), "rb") as f:
        batch = pickle.load(f)  # R, G, B planes of 32 x 32
    assert meta["classes"] == CIFAR_CLASSES and meta["hflip"] and meta["size"] == 32
    assert ref_meta["fid_ref"] == "cifar10-train" and len(ref) == 80 and len(test) == 20
    assert torch.equal(ref.tensors[0][:3].flatten(1), torch.tensor(batch["data"][:3]))
    assert test.tensors[1].tolist() == np.repeat(np.arange(10), 2).tolist()
    order = torch.randperm(80, generator=torch.Generator().manual_seed(42))  # SPLIT_SEED
    assert torch.equal(train.tensors[0], ref.tensors[0][order])
    images, labels = train.tensors
    assert images.dtype == torch.uint8 and images.shape == (80, 3, 32, 32)
    for img, k in zip(images, labels):  # class k lights the k-th 3-pixel column stripe
        assert img[:, :, 3 * k:3 * k + 3].float().mean() > 190 > img[:, :, 31].float().mean()
    first, val = m.split_data(train, 20, config["val_size"])  # --val-size 5000: at most a tenth
    other, _ = m.get_data(vars(m.get_args(["--data-dir", data, "--seed", "7"])))
    assert len(first) == 20 and torch.equal(val[torch.arange(8)][0], other.tensors[0][72:])
    seen = {img.numpy().tobytes() for img in images[:72]}
    assert not any(img.numpy().tobytes() in seen for img in val[torch.arange(8)][0])


def test_film_conditioning_conditions():
    """Overfit a tiny U-Net on two 8x8 images of two classes: guided (W=3), each label gives its own
    image. The label matters only where x_t hides the class (high noise): training draws t toward
    it."""
    torch.manual_seed(0)
    x0 = torch.tensor([[0.8, -0.8, -0.8], [-0.8, -0.8, 0.8]]).view(2, 3, 1, 1).repeat(1, 1, 8, 8)
    x0[:, :, :4] *= -1  # red-ish and blue-ish, the top half inverted
    ab = m.make_alphas_cumprod("cosine", 20, "cpu")
    model = m.UNet(16, 1, (1,), 0, n_classes=2, dropout=0.0, size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        y = torch.randint(0, 2, (8,))
        t = torch.randint(0, 20, (8,)).maximum(torch.randint(0, 20, (8,)))  # P(t) grows with t
        loss = m.p_losses(model, x0[y], y, ab, 0.1, t=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    y = torch.tensor([0, 1] * 8)
    out = m.generate(model.eval(), y, torch.zeros(16).bool(), ab, (3, 8, 8), 1, steps=20, w=3)
    nearest = ((out[:, None] - x0[None]) ** 2).mean((2, 3, 4)).argmin(1)
    assert (nearest == y).sum() >= 14, nearest  # a label-blind model: 8 of 16 on average


def test_loss_history_resumes_exactly(runs, data):
    """loss_history.json: an entry per epoch, the same whether the run was resumed (at an epoch's
    end and mid-epoch) or not; train_loss is the epoch's mean logged loss, val_loss and test_loss
    the model's (not the EMA's) on the held-out and the test images."""
    out = runs["resumed"]
    history = json.load(open(os.path.join(out, "loss_history.json")))
    assert history == json.load(open(os.path.join(runs["straight"], "loss_history.json")))
    assert history["epochs"] == [0, 1]  # the resume at step 6 took epoch 0 from ckpt.pt
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert losses == [r["loss"] for r in read_log(runs["straight"]) if "loss" in r]
    assert history["train_loss"] == pytest.approx([np.mean(losses[:4]), np.mean(losses[4:])])
    ck = load(os.path.join(out, "ckpt.pt"))
    model = m.build_model(ck["config"], ck["meta"]).eval().to(memory_format=torch.channels_last)
    model.load_state_dict(ck["model"])
    ab = m.make_alphas_cumprod("cosine", 20, "cpu")
    train, _ = m.get_data(ck["config"])
    for key, split in (("val_loss", m.split_data(train, 16, 5000)[1]),
                       ("test_loss", m.get_data(ck["config"], "test")[0])):
        loss = m.eval_loss(model, split, ab, ck["config"], None)
        assert history[key][1] == pytest.approx(loss, rel=1e-6), key


def test_logged_loss_weights_each_line_by_its_steps(tmp_path):
    lines = [dict(step=3, loss=1.0), dict(step=3, val_loss=9.0), dict(step=4, loss=2.0),
             dict(step=8, loss=4.0)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert m.logged_loss(str(tmp_path), 0, 4) == (3 * 1.0 + 2.0) / 4
    assert m.logged_loss(str(tmp_path), 4, 8) == 4.0 and m.logged_loss(str(tmp_path), 8, 9) is None


def test_cfg_sweep_rows_share_their_seeds(runs, tmp_path, capsys):
    ckpt = os.path.join(runs["straight"], "ckpt.pt")
    common = ["--sample", "--ckpt", ckpt, "--out-dir", tmp_path, "--device", "cpu",
              "--sample-steps", 3, "--per-label", 1, "--labels", "1,2,3,uncond"]
    assert run(SCRIPT, *common, "--cfg-sweep", "0,1,7") == 0
    assert image_size(tmp_path / "cfg_sweep.png") == grid_size(4, 3, 32)
    assert not os.path.exists(tmp_path / "samples.png")
    assert run(SCRIPT, *common, "--cfg", 1) == 0  # the plain samples: the sweep's W=1 row
    sweep = np.asarray(Image.open(tmp_path / "cfg_sweep.png"), dtype=float)
    plain = np.asarray(Image.open(tmp_path / "samples.png"), dtype=float)  # a row per label

    def cell(img, row, col):
        return img[33 * row + 1:33 * row + 33, 33 * col + 1:33 * col + 33]
    for c in range(4):
        assert np.array_equal(cell(sweep, 1, c), cell(plain, c, 0))
    assert np.abs(cell(sweep, 0, 0) - cell(sweep, 1, 0)).mean() > 1  # W=0 and W=1 differ
    for row in (1, 2):  # but not for the unconditional column (up to rounding)
        assert np.abs(cell(sweep, 0, 3) - cell(sweep, row, 3)).mean() < 0.5
    for bad in ("0,-3", "0,x"):
        assert "--cfg-sweep" in assert_bad_input(capsys, SCRIPT, *common, "--cfg-sweep", bad)


def test_uncond_never_trains_a_class(data, tmp_path, capsys):
    """--uncond: the label embedding stays, but only the null class is trained; one grid row."""
    out = tmp_path / "out"
    assert run(SCRIPT, "--data-dir", data, "--out-dir", out, *TINY, "--limit", 16, "--iters", 2,
               "--uncond") == 0
    ck = load(out / "ckpt.pt")
    emb, ema = ck["model"]["label_emb.0.weight"], ck["ema"]["label_emb.0.weight"]
    assert torch.equal(emb[:10], ema[:10]) and not torch.equal(emb[10], ema[10])  # only null moved
    assert image_size(out / "samples_2.png") == grid_size(2, 1, 32)
    sample = ["--sample", "--out-dir", out, "--device", "cpu", "--sample-steps", 3]
    assert run(SCRIPT, *sample, "--total-samples", 3) == 0
    assert image_size(out / "samples.png") == grid_size(3, 1, 32)
    assert "--uncond" in assert_bad_input(capsys, SCRIPT, *sample, "--cfg-sweep", "0,3")


def test_model_settings_it_cannot_build(data, tmp_path, capsys):
    train = ["--data-dir", data, "--out-dir", tmp_path, *TINY, "--iters", 1]
    for mults in ("1,x", "1,2,2,2,2,2,2"):  # seven levels halve 32 pixels below one
        assert "--mults" in assert_bad_input(capsys, SCRIPT, *train, "--mults", mults)
    assert not os.path.exists(tmp_path / "config.json")


def test_seed_spellings():
    args = m.get_args(["--batch_size", "16", "--timesteps", "100", "--log_interval", "5",
                       "--p_uncond", "0.2", "--guidance_scale", "5", "--sample_classes", "0,3",
                       "--inference", "--model_path", "a.pt", "--save_dir", "o", "--no_cuda",
                       "--num_samples", "12", "--run_name", "r", "--conditional", "--save_model"])
    assert args.batch_size == 16 and args.steps == 100 and args.log_every == 5
    assert args.p_uncond == 0.2 and args.cfg == 5.0 and args.labels == ["0,3"] and args.sample
    assert args.ckpt == "a.pt" and args.out_dir == "o" and args.device == "cpu"
    assert args.total_samples == 12 and args.run_name == "r" and not args.uncond


def test_seed_workflows(data, tmp_path, monkeypatch):
    """The seed's Example Workflows as written, but for --epochs 1 and a tiny model on generated
    data; --run_name NAME leaves the checkpoint in models/NAME/ckpt.pt for --model_path."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--data-dir", data, *TINY, "--limit", 16, "--sample-every", 100]
    sample = ["--device", "cpu", "--sample-steps", 3]
    commands = [
        "--epochs 1 --save_model --run_name quick_test",
        "--inference --model_path models/quick_test/ckpt.pt --num_samples 16",
        "--epochs 1 --batch_size 64 --lr 0.003 --save_model --run_name DDPM_50epochs "
        "--save_dir outputs_50ep",
        "--conditional --epochs 1 --p_uncond 0.1 --save_model --run_name DDPM_conditional "
        "--save_dir outputs_conditional",
        "--inference --conditional --model_path models/DDPM_conditional/ckpt.pt --num_samples 16 "
        "--guidance_scale 5.0 --sample_classes 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0 "
        "--save_dir airplane_samples",
        *[f"--inference --conditional --model_path models/DDPM_conditional/ckpt.pt --num_samples "
          f"10 --guidance_scale {w} --sample_classes 3,3,3,3,3,3,3,3,3,3 --save_dir "
          f"cats_guidance_{w}" for w in ("0.0", "3.0", "7.0")]]
    for cmd in commands:
        argv = shlex.split(cmd)
        # TINY's --batch-size 4 comes first, the seed's --batch_size 64 wins: 64 images for it
        extra = sample if "--inference" in argv else tiny
        if "--batch_size" in argv:
            extra = tiny + ["--limit", 64]
        assert run(SCRIPT, *extra, *argv) == 0, cmd
    assert load("models/quick_test/ckpt.pt")["step"] == 4  # 16 images, batch 4
    assert load("models/DDPM_50epochs/ckpt.pt")["config"]["lr"] == 0.003
    assert json.load(open("outputs_50ep/loss_history.json"))["epochs"] == [0]
    assert image_size("out/cifar_cfg_unet/samples.png") == grid_size(10, 2, 32)
    assert image_size("airplane_samples/samples.png") == grid_size(10, 2, 32)
    for w in ("0.0", "3.0", "7.0"):
        assert image_size(f"cats_guidance_{w}/samples.png") == grid_size(10, 1, 32)
