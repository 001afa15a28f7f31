"""Tests of what only cifar_dit_ddp.py has: its CIFAR-10 loader, the DiT's grouped-query attention
and its two ways of conditioning, seed 002's figures, spellings and evaluation command, and equal
weights on two ranks with accumulated steps. The contract of every script is in test_smoke.py.

    pytest tests_cifar_dit_ddp.py
"""
import json
import os
import pickle
import sys

import pytest
import torch

import cifar_dit_ddp as m
import fid
from test_smoke import (CIFAR_CLASSES, HERE, TINY, assert_bad_input, grid_size, image_size, load,
                        make_cifar, make_image_folder, read_log, run, same_weights, torchrun)

SCRIPT = "cifar_dit_ddp"


@pytest.fixture(scope="module", autouse=True)
def no_checksums():
    """The generated CIFAR-10 files are not the real ones: torchvision's md5 check becomes "the
    file exists"."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("torchvision.datasets.cifar.check_integrity",
                   lambda path, md5=None: os.path.isfile(path))
        yield


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """The seed's model (the fused time+class token) trained with the seed's spellings on
    generated CIFAR-10: 80 images, 8 held out, 72 / batch 8 = 9 steps in its one epoch; a
    checkpoint (and a validation loss) every 3 steps."""
    data = make_cifar(str(tmp_path_factory.mktemp("cifar")))
    out = str(tmp_path_factory.mktemp("seed_run"))
    assert run(SCRIPT, "--data-dir", data, "--out-dir", out, *TINY, "--kv-heads", 2,
               "--cond-token", "--hidden-dim", 32, "--num-heads", 4, "--num-epochs", 1,
               "--batch-size", 8, "--num-steps", 20, "--learning-rate", 2e-3,
               "--guidance-scale", 3, "--ckpt-every", 3) == 0
    return dict(data=data, out=out, ckpt=os.path.join(out, "ckpt.pt"))


def test_loader_reads_the_cifar_pickles(seed_run):
    config = dict(image_folder=None, data_dir=seed_run["data"])
    data, meta = m.get_data(config)
    with open(os.path.join(seed_run["data"], "cifar-10-batches-py", "data_batch_1"), "rb") as f:
        batch = pickle.load(f)  # the first batch's rows come first: R, G, B planes of 32 x 32
    images, labels = data[torch.arange(3)]
    assert len(data) == 80 and images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    assert torch.equal(images.flatten(1), torch.tensor(batch["data"][:3]))
    assert labels.tolist() == batch["labels"][:3]
    assert meta["classes"] == CIFAR_CLASSES and meta["hflip"] and meta["size"] == 32
    ref, ref_meta = m.get_data(config, "fid")  # CIFAR-10's FID reference: its training images
    assert ref_meta["fid_ref"] == "cifar10-train" and torch.equal(ref.tensors[0], data.tensors[0])


def test_seed_spellings_train_the_seeds_model(seed_run):
    config = json.load(open(os.path.join(seed_run["out"], "config.json")))
    assert (config["width"], config["heads"], config["epochs"], config["steps"]) == (32, 4, 1, 20)
    assert config["lr"] == 2e-3 and config["cfg"] == 3 and config["cond_token"]
    ck = load(seed_run["ckpt"])
    assert ck["step"] == 9 and ck["model"]["pos"].shape == (1, 65, 32)  # 64 patches + the token


def test_best_pt_follows_the_validation_loss(seed_run):
    val = [r for r in read_log(seed_run["out"]) if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6, 9]
    best = min(val, key=lambda r: r["val_loss"])
    ck, best_ck = load(seed_run["ckpt"]), load(os.path.join(seed_run["out"], "best.pt"))
    assert ck["best_val"] == best_ck["best_val"] == best["val_loss"]
    assert best_ck["step"] == best["step"]


def test_seed_figures(seed_run):
    out = seed_run["out"]
    assert image_size(os.path.join(out, "samples_9.png")) == grid_size(2, 11, 32)  # + uncond row
    assert image_size(os.path.join(out, "sample_grid.png")) == grid_size(2, 10, 32)  # classes only
    timestep_grid = open(os.path.join(out, "timestep_grid.png"), "rb").read()
    assert timestep_grid == open(os.path.join(out, "reverse.png"), "rb").read()
    assert image_size(os.path.join(out, "timestep_grid.png")) == grid_size(3, 11, 32)  # 3 steps


def test_seed_eval_command(seed_run, tmp_path, monkeypatch):
    real = fid.inception_v3
    monkeypatch.setattr(fid, "inception_v3", lambda weights="download": real(None))  # offline
    assert run(SCRIPT, "--eval", "--checkpoint", seed_run["ckpt"], "--num-samples", 10,
               "--calculate-fid", "--calculate-is", "--is", "--data-dir", seed_run["data"],
               "--out-dir", tmp_path, "--sample-steps", 2, "--device", "cpu") == 0
    res = json.load(open(tmp_path / "fid.json"))
    assert res["num_samples"] == 10 and res["checkpoint"] == seed_run["ckpt"]
    assert res["fid_score"] > 0 and res["inception_score_mean"] >= 1
    assert res["inception_score_std"] >= 0 and res["reference"] == "cifar10-train"


def test_build_model_refuses_what_the_dit_cannot_take(seed_run, capsys, tmp_path):
    args = ["--data-dir", seed_run["data"], "--out-dir", tmp_path / "o", *TINY, "--iters", 1]
    for bad, flag in [(["--heads", 4, "--kv-heads", 3], "--kv-heads"),
                      (["--kv-heads", 0], "--kv-heads"), (["--width", 36], "--width"),
                      (["--patch", 5], "--patch"), (["--patch", 0], "--patch")]:
        assert flag in assert_bad_input(capsys, SCRIPT, *args, *bad), bad
    assert not os.path.exists(tmp_path / "o")


def test_gqa_equals_mha_and_the_grouped_form():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 32)
    gqa, mha = m.GQAttention(32, 4, 4), torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():  # kv's rows are [W_k; W_v], as MHA's in_proj after W_q
        mha.in_proj_weight.copy_(torch.cat([gqa.q.weight, gqa.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([gqa.q.bias, gqa.kv.bias]))
        mha.out_proj.weight.copy_(gqa.proj.weight)
        mha.out_proj.bias.copy_(gqa.proj.bias)
    assert torch.allclose(gqa(x), mha(x, x, x, need_weights=False)[0], atol=1e-5)
    # 2 key/value heads: each pair of query heads attends with its own shared key/value head
    g2 = m.GQAttention(32, 4, 2)
    assert g2.kv.out_features == 2 * 2 * 8
    k, v = g2.kv(x).view(3, 17, 2, 2, 8).permute(2, 0, 3, 1, 4)
    q = g2.q(x).view(3, 17, 4, 8).transpose(1, 2)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    att = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v
    assert torch.allclose(g2(x), g2.proj(att.transpose(1, 2).reshape(3, 17, 32)), atol=1e-5)


@pytest.mark.parametrize("token", [False, True])
def test_conditioning_token_or_adaln(token):
    config = dict(width=32, depth=2, heads=4, kv_heads=2, patch=4, cond_token=token, dropout=0.0)
    meta = dict(classes=["a", "b", "c"], channels=3, size=32)
    model = m.build_model(config, meta)
    assert model.pos.shape[1] == 64 + token  # the seed's 65 positions with the token
    x, t = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1), torch.tensor([5, 5])  # one image twice
    y, keep = torch.tensor([0, 2]), torch.zeros(2, dtype=torch.bool)
    assert model(x, t, y, keep).abs().max() == 0  # zero-initialised output layer (DiT)
    torch.manual_seed(0)
    for p in model.parameters():  # as if trained: every path from the condition open
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        out = model(x, t, y, keep)
        assert not torch.allclose(out[0], out[1])  # the class reaches the output
        dropped = model(x, t, y, ~keep)  # drop: the null class, whatever y says
        assert torch.allclose(dropped, model(x, t, torch.tensor([3, 3]), keep))
        assert torch.allclose(dropped[0], dropped[1])
    model = m.build_model(dict(config, dropout=0.5), meta).train()  # --dropout: the MLP's hidden
    h = torch.randn(2, 65, 32)
    assert not torch.equal(model.blocks[0].mlp(h), model.blocks[0].mlp(h))


def test_loss_plot_or_one_line(tmp_path, capsys, monkeypatch):
    """training_loss.png's title sums the training time over the resumed parts of a run."""
    recs = [dict(step=1, loss=1.0, elapsed=30.0), dict(step=2, loss=0.5, elapsed=60.0),
            dict(step=2, val_loss=0.6), dict(step=3, loss=0.4, elapsed=20.0),  # resumed at 2
            dict(step=4, loss=0.3, elapsed=30.0), dict(step=4, val_loss=0.4)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with monkeypatch.context() as mp:  # restores sys.modules: a half-removed matplotlib breaks
        mp.setitem(sys.modules, "matplotlib", None)  # as if not installed
        m.plot_loss(str(tmp_path), per_epoch=2)
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "log.jsonl" in out
    assert "training 1.5 min, 45.0 s per epoch (2.0 epochs)" in out  # 60 + 30 s, 4 steps
    assert not os.path.exists(tmp_path / "training_loss.png")
    pytest.importorskip("matplotlib")
    m.plot_loss(str(tmp_path), per_epoch=2)
    assert image_size(tmp_path / "training_loss.png")[0] > 100


def test_two_ranks_hold_equal_weights(tmp_path):
    """torchrun, 2 ranks (gloo), 2 accumulated micro-batches a step: after the run both ranks hold
    the same weights, and rank 0 saved them."""
    folder, out, ranks = make_image_folder(str(tmp_path / "imgs")), tmp_path / "out", tmp_path / "r"
    wrapper = tmp_path / "dit_ranks.py"  # saves each rank's trained weights after main()
    wrapper.write_text(
        f"import os, sys, torch\nsys.path.insert(0, {HERE!r})\nimport cifar_dit_ddp as m\n\n"
        "train = m.train\n\n\ndef train_and_save(*args):\n    run = train(*args)\n"
        f"    os.makedirs({str(ranks)!r}, exist_ok=True)\n"
        f"    torch.save(run.model.state_dict(), os.path.join({str(ranks)!r}, "
        "os.environ['RANK'] + '.pt'))\n    return run\n\n\n"
        "m.train = train_and_save\nm.main(sys.argv[1:])\n")
    r = torchrun(str(wrapper.with_suffix("")), 2, "--image-folder", folder, "--out-dir", out,
                 *TINY, "--heads", 4, "--iters", 2, "--batch-size", 2, "--accum", 2,
                 "--sample-every", 100)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = load(ranks / "0.pt"), load(ranks / "1.pt")
    assert same_weights(rank0, rank1) and same_weights(load(out / "ckpt.pt")["model"], rank0)
