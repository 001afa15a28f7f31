"""Tests of what only celeba_crossattn.py has: its loaders on the real formats (CelebA, CelebA-HQ,
the CIFAR-10 and MNIST modes), attribute rows and toggles, the attribute tokens, a damaged JPEG
during training, and the seed's spelling --attrs. The contract tests are in test_smoke.py.

    pytest tests_celeba_crossattn.py
"""
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import celeba_crossattn as m
from test_smoke import (CELEBA_NAMES, HERE, TINY, assert_bad_input, grid_size, image_size, load,
                        make_celeba, make_cifar, make_mnist, run)

SCRIPT = "celeba_crossattn"
ARGS = [*TINY, "--size", "32", "--workers", "0", "--toggle", "Male,Smiling"]


def truncate(path):
    """Cut a JPEG in half: PIL reads its header, then fails with "image file is truncated"."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def config(*argv):
    return vars(m.get_args([str(a) for a in argv]))


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory):
    """Three steps (an epoch of the 12 generated faces, 000005.jpg truncated) with the JPEGs
    decoded by two DataLoader workers: a separate process, so that the workers' stderr is seen."""
    root = tmp_path_factory.mktemp("faces")
    data, out = make_celeba(str(root / "data")), str(root / "out")
    truncate(os.path.join(data, "celeba", "img_align_celeba", "000005.jpg"))
    cmd = [sys.executable, os.path.join(HERE, SCRIPT + ".py"), "--data-dir", data, "--out-dir", out,
           *ARGS, "--workers", "2", "--iters", "3"]
    res = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    return SimpleNamespace(res=res, data=data, out=out, ckpt=os.path.join(out, "ckpt.pt"))


def test_truncated_jpeg_is_skipped_with_a_warning(faces_run):
    assert faces_run.res.returncode == 0, faces_run.res.stderr[-2000:]
    warnings = [line for line in faces_run.res.stderr.splitlines() if "warning:" in line]
    assert warnings and all("000005.jpg" in w for w in warnings)
    assert len(warnings) <= 3  # once in each process that met it: 2 workers, reconstruction
    assert load(faces_run.ckpt)["step"] == 3


def test_faces_dataset_uses_the_next_image_once_warned(tmp_path, capsys):
    make_celeba(str(tmp_path))
    truncate(str(tmp_path / "celeba" / "img_align_celeba" / "000005.jpg"))
    data, meta = m.get_data(config("--data-dir", tmp_path, "--size", 32))
    assert meta["kind"] == "attrs" and meta["classes"] == CELEBA_NAMES and len(data) == 12
    capsys.readouterr()
    x, c = data[torch.tensor([4, 0, 4])]
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[0], data[torch.tensor([5])][0][0]) and torch.equal(x[0], x[2])
    assert torch.equal(c, data.conds[[5, 0, 5]])  # the stand-in's own attributes
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "000005.jpg" in err[0]


def test_attribute_rows_and_the_toggle_grid():
    names = CELEBA_NAMES
    meta = dict(kind="attrs", classes=names, freq=[0.9, 0.1] + [0.5] * 38)
    cfg = config("--toggle", "Eyeglasses,Young")
    cond, drop, nrow = m.conditions(["Male,-Smiling", "Eyeglasses"], 3000, meta, cfg)
    assert cond.shape == (6000, 40) and nrow == 3000 and not drop.any()
    a, b = cond[:3000], cond[3000:]
    assert (a[:, 0] == 1).all() and (a[:, 1] == 0).all() and (b[:, 2] == 1).all()
    assert torch.equal(a[:, 3:], b[:, 3:])  # unnamed attributes: the same draws in every row
    assert abs(b[:, 0].mean() - 0.9) < 0.03 and abs(b[:, 1].mean() - 0.1) < 0.03
    grid, _, _ = m.conditions(["all"], 4, meta, cfg)
    base = grid[:4]
    assert grid.shape == (12, 40)
    for k, j in enumerate([names.index("Eyeglasses"), names.index("Young")]):
        changed = (grid[4 * (k + 1):4 * (k + 2)] != base).any(0)
        assert changed[j] and changed.sum() == 1  # exactly the toggled attribute, c -> 1 - c
    uncond, drop, _ = m.conditions(["all"], 4, meta, dict(cfg, uncond=True))
    assert len(uncond) == 4 and drop.all()


def test_unknown_attributes_are_one_line_naming_the_flag(capsys):
    meta = dict(kind="attrs", classes=CELEBA_NAMES, freq=[0.5] * 40)
    for labels, cfg, flag in [(["Male,Smiley"], config(), "--labels"),
                              (["all"], config("--toggle", "Beard"), "--toggle")]:
        with pytest.raises(SystemExit) as e:
            m.conditions(labels, 2, meta, cfg)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {flag}")


def test_toggled_attribute_changes_its_token_and_the_output_null_tokens_ignore_it():
    torch.manual_seed(0)
    model = m.build_model(config("--width", 32, "--depth", 1), dict(classes=CELEBA_NAMES,
                                                                      channels=3)).eval()
    for p in (model.tokens.on, model.tokens.off):  # trained-like tokens: an effect above fp noise
        torch.nn.init.normal_(p)
    c = torch.bernoulli(torch.full((2, 40), 0.5), generator=torch.Generator().manual_seed(0))
    flipped = c.clone()
    flipped[:, 2] = 1 - flipped[:, 2]  # Eyeglasses
    keep = torch.zeros(2, dtype=torch.bool)
    changed = (model.tokens(c, keep) - model.tokens(flipped, keep)).abs().amax(dim=(0, 2)) > 0
    assert changed[2] and changed.sum() == 1
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 15])
    with torch.no_grad():
        assert (model(x, t, c, keep) - model(x, t, flipped, keep)).abs().max() > 1e-3
        assert torch.equal(model(x, t, c, ~keep), model(x, t, flipped, ~keep))


def test_sample_attrs_spelling_and_toggles_share_the_noise(faces_run, tmp_path):
    """--attrs (the seed's spelling of --labels); in toggles.png every row starts from the same
    noise: with --cfg 0 (the condition unused) its rows are the same images."""
    out = tmp_path / "cfg0"
    assert run(SCRIPT, "--sample", "--ckpt", faces_run.ckpt, "--out-dir", out, "--device", "cpu",
               "--attrs", "Male,-Smiling", "--per-label", 3, "--toggle", "Young,Eyeglasses",
               "--cfg", 0, "--sample-steps", 3) == 0
    assert image_size(out / "samples.png") == grid_size(3, 1, 32)
    assert image_size(out / "toggles.png") == grid_size(3, 3, 32)  # the row, 2 toggles
    rows = pixels(out / "toggles.png")[1:].reshape(3, 33, -1, 3)  # each with its bottom padding
    assert (rows == rows[0]).all() and rows.std() > 0
    assert (pixels(out / "samples.png")[1:] == rows[0]).all()


def test_sample_attrs_from_an_image_row(faces_run, tmp_path, monkeypatch):
    conds = []
    generate = m.generate
    monkeypatch.setattr(m, "generate", lambda model, cond, *a, **k: conds.append(cond) or
                        generate(model, cond, *a, **k))
    assert run(SCRIPT, "--sample", "--ckpt", faces_run.ckpt, "--out-dir", tmp_path, "--device",
               "cpu", "--attrs-from", "000003.jpg", "--labels", "Male", "--per-label", 2,
               "--sample-steps", 2) == 0
    with open(os.path.join(faces_run.data, "celeba", "list_attr_celeba.txt")) as f:
        row = f.read().splitlines()[4].split()
    want = torch.tensor([float(v == "1") for v in row[1:]])
    want[0] = 1  # Male
    assert row[0] == "000003.jpg" and conds[-1].shape == (2, 40)
    assert (conds[-1] == want).all()  # samples.png, drawn after toggles.png
    assert image_size(tmp_path / "toggles.png") == grid_size(2, 7, 32)  # --toggle's 6


def test_real_celeba_faces_and_the_partition_file(tmp_path):
    real = os.path.join(HERE, "..", "shared", "data", "celeba")
    if not os.path.isdir(real):
        pytest.skip("the 32 real CelebA faces are not beside the repository")
    shutil.copytree(real, tmp_path / "celeba")
    cfg = config("--data-dir", tmp_path)
    data, meta = m.get_data(cfg)
    with open(tmp_path / "celeba" / "list_attr_celeba.txt") as f:
        rows = [line.split() for line in f][2:]
    assert len(data) == 32 and meta["classes"][31] == "Smiling" and meta["size"] == 64
    assert meta["fid_ref"] == "celeba-train" and meta["channels"] == 3 and not meta["hflip"]
    x, c = data[torch.tensor([5])]
    assert x.shape == (1, 3, 64, 64) and x.float().std() > 20
    assert c[0].tolist() == [float(v == "1") for v in rows[5][1:]]
    assert meta["freq"] == pytest.approx(data.conds.mean(0).tolist())
    with open(tmp_path / "celeba" / "list_eval_partition.txt", "w") as f:  # 0 train, 1 valid
        f.write("".join(f"{r[0]} {int(i % 4 == 0)}\n" for i, r in enumerate(rows)))
    data, _ = m.get_data(cfg)
    assert data.conds.tolist() == [[float(v == "1") for v in r[1:]]
                                   for i, r in enumerate(rows) if i % 4]


def test_celeba_hq_layout(tmp_path):
    """CelebA-HQ through --image-dir and --attr-file: other names, the same attribute format."""
    make_celeba(str(tmp_path), n=10)
    hq = tmp_path / "CelebAMask-HQ"
    hq.mkdir()
    shutil.move(str(tmp_path / "celeba" / "img_align_celeba"), hq / "CelebA-HQ-img")
    shutil.move(str(tmp_path / "celeba" / "list_attr_celeba.txt"),
                hq / "CelebAMask-HQ-attribute-anno.txt")
    data, meta = m.get_data(config("--data-dir", tmp_path / "none", "--image-dir",
                                   hq / "CelebA-HQ-img", "--attr-file",
                                   hq / "CelebAMask-HQ-attribute-anno.txt", "--size", 48))
    assert len(data) == 10 and meta["classes"] == CELEBA_NAMES and meta["kind"] == "attrs"
    assert data[torch.tensor([9])][0].shape == (1, 3, 48, 48)
    assert meta["fid_ref"] == "image-folder"  # any folder: no FID statistics cached by name


def test_bad_celeba_files_are_one_line(tmp_path, capsys, monkeypatch):
    bad = str(tmp_path / "bad")
    train = ["--data-dir", bad, "--out-dir", tmp_path / "out", *ARGS, "--iters", 1]
    rows = [f"{i:06d}.jpg" + " 1" * 40 for i in range(1, 13)]
    make_celeba(bad, rows=rows[:5] + [rows[5] + " 1"] + rows[6:])  # one row with 41 values
    assert "malformed attribute file at row 8" in assert_bad_input(capsys, SCRIPT, *train)
    make_celeba(bad, rows=rows[:5] + [rows[5].replace(" 1", " 0", 1)] + rows[6:])  # 0, not -1
    assert "at row 8" in assert_bad_input(capsys, SCRIPT, *train)
    make_celeba(bad, rows=rows[:-1])  # line 1 says 12
    assert "line 1" in assert_bad_input(capsys, SCRIPT, *train)
    make_celeba(bad)
    os.remove(os.path.join(bad, "celeba", "img_align_celeba", "000007.jpg"))
    err = assert_bad_input(capsys, SCRIPT, *train)
    assert "missing" in err and "000007.jpg" in err
    assert "no CelebA" in assert_bad_input(capsys, SCRIPT, *train, "--data-dir", tmp_path / "none")
    make_celeba(bad)  # a typo in --toggle or --attrs-from stops the start, not the first grid
    assert "--toggle" in assert_bad_input(capsys, SCRIPT, *train, "--toggle", "Beard")
    assert "--attrs-from" in assert_bad_input(capsys, SCRIPT, *train, "--attrs-from", "9.jpg")
    assert "--size" in assert_bad_input(capsys, SCRIPT, *train, "--size", 8)

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(m.torchvision.datasets, "CelebA", offline)
    err = assert_bad_input(capsys, SCRIPT, *train, "--data-dir", tmp_path / "none", "--download")
    assert "download" in err and "list_attr_celeba.txt" in err


def test_cifar10_mode(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity",
                        lambda path, md5=None: os.path.isfile(path))
    data, out = make_cifar(str(tmp_path / "data"), per_class=1), tmp_path / "out"
    assert run(SCRIPT, "--dataset", "cifar10", "--data-dir", data, "--out-dir", out, *ARGS,
               "--iters", 1) == 0
    meta = load(out / "ckpt.pt")["meta"]
    assert meta["classes"][3] == "cat" and meta["kind"] == "classes" and meta["size"] == 32
    assert meta["freq"] == pytest.approx([0.1] * 10) and meta["fid_ref"] == "cifar10-train"
    assert image_size(out / "samples_1.png") == grid_size(2, 11, 32)  # 10 classes + uncond
    assert run(SCRIPT, "--sample", "--out-dir", out, "--labels", "cat,uncond", "--per-label", 3,
               "--device", "cpu", "--sample-steps", 2) == 0
    assert image_size(out / "samples.png") == grid_size(3, 2, 32)
    assert not os.path.exists(out / "toggles.png")  # classes: no attribute toggles
    assert "--labels" in assert_bad_input(capsys, SCRIPT, "--sample", "--out-dir", out, "--labels",
                                          "cow", "--device", "cpu")


def test_mnist_mode_at_its_odd_size(tmp_path):
    """MNIST at 28 px: 28 -> 14 -> 7 -> 4 -> 2 and back up to each skip's size."""
    data, out = make_mnist(str(tmp_path / "data"), per_class=1), tmp_path / "out"
    assert run(SCRIPT, "--dataset", "mnist", "--data-dir", data, "--out-dir", out, *ARGS,
               "--size", 28, "--iters", 1) == 0
    ck = load(out / "ckpt.pt")
    assert ck["meta"]["channels"] == 1 and ck["meta"]["size"] == 28
    assert ck["model"]["stem.weight"].shape[1] == 1
    assert image_size(out / "samples_1.png") == grid_size(2, 11, 28)
