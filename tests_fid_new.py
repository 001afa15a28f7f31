"""New fid.py tests: the "tf" and "pytorch-fid" preprocessing modes, statistics files that record
their mode, one-line errors for bad files, and the cache decided by rank 0. To be merged into the
"fid.py" section of test_smoke.py.

    python -m pytest -q tests_fid_new.py
"""
import datetime
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fid


# ----------------------------------------------------------------------------- as in test_smoke.py
# fid_weights, _fid_images and _fid_cheap_distance are copies of test_smoke.py's: drop them when
# merging this file there.

@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """Random weights whose activations neither vanish nor explode (BatchNorm statistics of 2 images), and whose
    softmax is neither uniform nor one-hot, so that the Inception Score differs between images."""
    torch.manual_seed(0)
    net = fid.inception_v3(None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats = the batch's stats
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 299, 299))
        net.fc.weight *= 0.1
    path = tmp_path_factory.mktemp("fid") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def _fid_images(n, seed, channels=3, size=32):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _fid_cheap_distance(mu1, s1, mu2, s2):
    """Stands in for frechet_distance (tested above; two 2048x2048 eigendecompositions cost seconds) where a test
    checks what reaches it: it changes with every entry of both statistics."""
    return float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())


# ----------------------------------------------------------------------------- new tests

def _fid_tf_resize_loops(a, out_h, out_w):
    """TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False) on a list of rows, as
    its C++ kernel computes it: in = out_index * in_size / out_size, top/bottom lerps along x."""
    in_h, in_w = len(a), len(a[0])
    out = []
    for i in range(out_h):
        y = i * in_h / out_h
        y0, y1 = int(y), min(int(y) + 1, in_h - 1)
        row = []
        for j in range(out_w):
            x = j * in_w / out_w
            x0, x1 = int(x), min(int(x) + 1, in_w - 1)
            top = a[y0][x0] + (a[y0][x1] - a[y0][x0]) * (x - x0)
            bottom = a[y1][x0] + (a[y1][x1] - a[y1][x0]) * (x - x0)
            row.append(top + (bottom - top) * (y - y0))
        out.append(row)
    return out


def _fid_previous_preprocessing(x):
    """fid.py's preprocessing before the modes (= pytorch-fid's), copied."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = F.interpolate(x.clamp(0, 1), size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


class _FidSeen(Exception):  # carries the first conv's input out of the forward pass, and stops it
    pass


def _fid_first_conv_input(net, x, mode):
    def stop(module, args):
        raise _FidSeen(args[0])

    hook = net.Conv2d_1a_3x3.register_forward_pre_hook(stop)
    try:
        with pytest.raises(_FidSeen) as seen:
            net(x, mode)
    finally:
        hook.remove()
    return seen.value.args[0]


def test_fid_legacy_resize_against_loops():
    # tf.compat.v1.image.resize_bilinear([[0, 1], [2, 3]], (4, 4)): the last row and column repeat
    expected = [[0, 0.5, 1, 1], [1, 1.5, 2, 2], [2, 2.5, 3, 3], [2, 2.5, 3, 3]]
    assert fid.legacy_resize(torch.tensor([[[[0.0, 1], [2, 3]]]]), (4, 4))[0, 0].tolist() == expected
    rng = np.random.default_rng(0)
    for (h, w), (out_h, out_w) in [((3, 3), (7, 7)), ((5, 4), (2, 3)), ((4, 6), (9, 5))]:
        x = rng.integers(0, 256, (2, 3, h, w))
        got = fid.legacy_resize(torch.tensor(x, dtype=torch.float64), (out_h, out_w))
        assert got.shape == (2, 3, out_h, out_w)
        for n in range(2):
            for c in range(3):
                want = _fid_tf_resize_loops(x[n, c].tolist(), out_h, out_w)
                assert torch.allclose(got[n, c], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-9)
    x32 = torch.tensor(x, dtype=torch.float32)  # float32, as the network gets it
    assert torch.allclose(fid.legacy_resize(x32, (9, 5)), got.float(), rtol=0, atol=1e-4)


def test_fid_legacy_resize_differs_from_interpolate_except_identity():
    x = _fid_images(2, 0) * 255
    legacy = fid.legacy_resize(x)
    half_pixel = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (legacy - half_pixel).abs().max() > 1  # 0..255 values: shifted by half an input pixel
    assert torch.equal(legacy[..., 0, 0], x[..., 0, 0])  # s = 0 reads the first pixel exactly
    big = torch.rand(1, 3, 299, 299) * 255
    assert torch.equal(fid.legacy_resize(big), big)
    assert torch.equal(F.interpolate(big, size=(299, 299), mode="bilinear", align_corners=False), big)


def test_fid_preprocessing_seen_by_the_first_conv():
    net = fid.inception_v3(None)
    white, black = torch.full((1, 1, 8, 8), 255, dtype=torch.uint8), torch.zeros(1, 3, 5, 7)
    mid = torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)
    for mode, top in [("tf", 0.9921875), ("pytorch-fid", 1.0)]:  # tf: (x - 128) / 128
        for x, value in [(white, top), (white.float() / 255, top), (black, -1.0)]:
            seen = _fid_first_conv_input(net, x, mode)
            assert seen.shape == (1, 3, 299, 299) and torch.equal(seen, torch.full_like(seen, value))
            assert torch.equal(seen, fid.preprocess(x, mode))
    assert torch.equal(fid.preprocess(mid, "tf"), torch.zeros(1, 3, 299, 299))
    x = (_fid_images(2, 3, size=20) * 255).round().to(torch.uint8)
    seen = _fid_first_conv_input(net, x, "tf")
    want = (fid.legacy_resize(x.float()) - 128) / 128
    assert torch.equal(seen, want) and seen.min() >= -1 and seen.max() <= 0.9921875
    assert torch.equal(fid.preprocess(x), want)  # "tf" is the default
    with pytest.raises(ValueError, match="mode must be one of"):
        net(x, "TF")


def test_fid_pytorch_fid_mode_equals_previous_features(fid_weights):
    net = fid.inception_v3(fid_weights)
    x = _fid_images(1, 4, size=37)
    for images in [x, (x * 255).round().to(torch.uint8), x[:, :1]]:  # float, uint8, grayscale
        before = _fid_previous_preprocessing(images)
        assert torch.equal(_fid_first_conv_input(net, images, "pytorch-fid"), before)
        with torch.no_grad():
            f, logits = net(images, "pytorch-fid")
            for module in list(net.children())[:-2]:
                before = module(before)
        assert torch.equal(f, before.flatten(1)) and torch.equal(logits, net.fc(before.flatten(1)))
    with torch.no_grad():
        f_tf = net(images)[0]
    assert (f_tf - f).abs().max() > 1e-3 * f.abs().max()  # the modes feed different inputs


def test_fid_cache_records_its_mode(fid_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "frechet_distance", _fid_cheap_distance)

    def untouched():
        raise AssertionError("images consumed although the cache is refused")
        yield

    fake, real = _fid_images(2, 1), _fid_images(2, 2)
    cache = str(tmp_path / "real.npz")
    res = fid.evaluate(fake, real, 2, cache=cache, weights=fid_weights, mode="pytorch-fid")
    assert res["mode"] == "pytorch-fid" and res["fid"] > 0
    with np.load(cache) as f:
        assert str(f["mode"]) == "pytorch-fid" and int(f["n"]) == 2
    with pytest.raises(ValueError, match="preprocessing mode pytorch-fid, not tf: delete it"):
        fid.evaluate(untouched(), untouched(), 2, cache=cache, weights=fid_weights)
    again = fid.evaluate(fake, untouched(), 2, cache=cache, weights=fid_weights, mode="pytorch-fid")
    assert again == res
    tf = fid.evaluate(fake, real, 2, cache=str(tmp_path / "tf.npz"), weights=fid_weights)
    assert tf["mode"] == "tf" and tf["fid"] != pytest.approx(res["fid"], rel=1e-3)
    with np.load(cache) as f:  # a cache of fid.py before the modes: mu, sigma, n
        np.savez(tmp_path / "old.npz", mu=f["mu"], sigma=f["sigma"], n=2)
    for mode in fid.MODES:
        with pytest.raises(ValueError, match="preprocessing mode unknown"):
            fid.evaluate(untouched(), untouched(), 2, cache=str(tmp_path / "old.npz"), mode=mode)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "real.npz").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.npz: not a readable .npz file") as info:
        fid.evaluate(untouched(), untouched(), 2, cache=str(tmp_path / "cut.npz"))
    assert len(str(info.value).splitlines()) == 1


def test_fid_bad_weights_one_line(fid_weights, tmp_path):
    state = torch.load(fid_weights, weights_only=True)
    bad = {"list.pth": [1, 2], "nested.pth": {"model": state},
           "shape.pth": {**state, "fc.weight": torch.zeros(10, 2048)}}
    for name, obj in bad.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "cut.pth").write_bytes(Path(fid_weights).read_bytes()[:100000])
    (tmp_path / "text.pth").write_text("not weights")
    for name in list(bad) + ["cut.pth", "text.pth", "missing.pth"]:
        with pytest.raises(RuntimeError, match=f"{name}: not the FID Inception's weights") as info:
            fid.inception_v3(str(tmp_path / name))
        assert len(str(info.value).splitlines()) == 1
    with pytest.raises(RuntimeError, match="Unexpected key.*model"):
        fid.inception_v3({"model": state, **state})


def _fid_folder(root, sizes):
    rng = np.random.default_rng(0)
    os.makedirs(root)
    for i, (h, w) in enumerate(sizes):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        (image.convert("L") if i == 0 else image).save(root / f"{i}.png")
    return [torch.from_numpy(np.array(Image.open(root / f"{i}.png").convert("RGB"))).permute(2, 0, 1)
            for i in range(len(sizes))]


def _fid_main_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        fid.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("fid.py: error:") and len(err.splitlines()) == 1
    return err


def test_fid_command_line_modes(fid_weights, tmp_path, capsys):
    images = _fid_folder(tmp_path / "a", [(16, 16), (16, 16), (20, 18)])  # sizes mix
    net = fid.inception_v3(fid_weights)
    with torch.no_grad():  # what the reader must feed the network: as evaluate() does, in "tf";
        expected = {"tf": torch.cat([net(x[None])[0] for x in images]),  # fid.py's old reader:
                    "pytorch-fid": torch.cat([net(F.interpolate(x[None] / 255, size=(299, 299),
                                                                mode="bilinear"), "pytorch-fid")[0]
                                              for x in images])}
    for mode in fid.MODES:
        fid.main([str(tmp_path / "a"), str(tmp_path / f"{mode}.npz"), "--save-stats", "--mode", mode,
                  "--weights", fid_weights, "--batch-size", "2"])
        with np.load(tmp_path / f"{mode}.npz") as f:
            assert str(f["mode"]) == mode and int(f["n"]) == 3
            mu, sigma = f["mu"], f["sigma"]
        want = expected[mode].double().numpy()
        assert np.allclose(mu, want.mean(0), rtol=1e-5, atol=1e-6 * abs(want).max())
        assert np.allclose(sigma, np.cov(want, rowvar=False), rtol=1e-4, atol=1e-6 * want.var(0).max())
    assert not np.allclose(expected["tf"], expected["pytorch-fid"], rtol=1e-3)
    capsys.readouterr()

    fid.main([str(tmp_path / "tf.npz"), str(tmp_path / "tf.npz")])
    assert capsys.readouterr().out.splitlines() == ["FID: 0.0"]
    t, p = tmp_path / "tf.npz", tmp_path / "pytorch-fid.npz"
    for argv in [[p, p], [p, t], [t, p, "--mode", "pytorch-fid"], [tmp_path / "a", p, "--weights", "none"]]:
        assert "holds statistics of --mode" in _fid_main_error(capsys, *argv)
    with np.load(tmp_path / "tf.npz") as f:  # no mode: pytorch-fid's, TTUR's, ADM's files
        np.savez(tmp_path / "reference.npz", mu=f["mu"], sigma=f["sigma"])
    with pytest.warns(UserWarning, match="records no preprocessing mode; taken as --mode tf"):
        fid.main([str(tmp_path / "tf.npz"), str(tmp_path / "reference.npz")])
    assert capsys.readouterr().out.splitlines() == ["FID: 0.0"]


def test_fid_command_line_pytorch_fid_mode_equals_pytorch_fid(fid_weights, tmp_path, monkeypatch):
    pfi = pytest.importorskip("pytorch_fid.inception")  # optional: not a requirement of the repo
    from pytorch_fid.fid_score import compute_statistics_of_path
    state = torch.load(fid_weights, weights_only=True)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state)
    _fid_folder(tmp_path / "a", [(24, 20)] * 3)  # pytorch-fid batches only images of one size
    fid.main([str(tmp_path / "a"), str(tmp_path / "a.npz"), "--save-stats", "--mode", "pytorch-fid",
              "--weights", fid_weights, "--batch-size", "2"])
    mu, sigma = compute_statistics_of_path(str(tmp_path / "a"), pfi.InceptionV3([3]).eval(), 2, 2048, "cpu", 0)
    with np.load(tmp_path / "a.npz") as f:
        assert np.allclose(f["mu"], mu, rtol=1e-5, atol=1e-6 * abs(mu).max())
        assert np.allclose(f["sigma"], sigma, rtol=1e-4, atol=1e-6 * abs(sigma).max())


def test_fid_command_line_bad_files_one_line(fid_weights, tmp_path, capsys):
    _fid_folder(tmp_path / "a", [(8, 8), (8, 8)])
    fid.main([str(tmp_path / "a"), str(tmp_path / "s.npz"), "--save-stats", "--weights", "none"])
    capsys.readouterr()
    (tmp_path / "cut.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:5000])
    (tmp_path / "text.npz").write_text("not numpy")
    np.save(tmp_path / "array.npy", np.zeros(3))
    os.replace(tmp_path / "array.npy", tmp_path / "array.npz")
    np.savez(tmp_path / "nomu.npz", m=np.zeros(3))
    for name in ["cut.npz", "text.npz", "array.npz", "nomu.npz"]:
        err = _fid_main_error(capsys, tmp_path / "s.npz", tmp_path / name)
        assert f"{name}: not a readable .npz file" in err
    torch.save([1, 2], tmp_path / "list.pth")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "keys.pth")
    (tmp_path / "cut.pth").write_bytes(Path(fid_weights).read_bytes()[:100000])
    for name in ["list.pth", "keys.pth", "cut.pth", "missing.pth"]:
        err = _fid_main_error(capsys, tmp_path / "a", tmp_path / "s.npz", "--weights", tmp_path / name)
        assert f"{name}: not the FID Inception's weights" in err


def _fid_rank(rank, world, init, weights, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    fid.frechet_distance = _fid_cheap_distance
    fake, real = _fid_images(2, 40)[rank:rank + 1], _fid_images(2, 41)[rank:rank + 1]
    state = torch.load(weights, weights_only=True)  # read once, used by each evaluate below
    results = []
    # each rank names its own cache file, as ranks on nodes without a shared file system see them:
    # rank 0's exists, rank 1's not ("cached"); rank 0's not, rank 1's is garbage ("fresh");
    # rank 0's is of the other mode, rank 1's not ("refused": every rank raises, none waits)
    for case in ["cached", "fresh", "refused"]:
        cache = f"{out}.{case}.{rank}.npz"
        try:
            results.append(fid.evaluate(fake, real, 1, cache=cache, weights=state))
        except ValueError as e:
            results.append(str(e))
    torch.save(results, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_fid_distributed_cache_decided_by_rank0(fid_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "frechet_distance", _fid_cheap_distance)
    out = str(tmp_path / "r")
    net = fid.inception_v3(fid_weights)
    mu_fake, sigma_fake, _ = fid.statistics(_fid_images(2, 40), net)  # both ranks' shares, in "tf"
    mu_real, sigma_real, _ = fid.statistics(_fid_images(2, 41), net)
    mu_cached, sigma_cached = mu_real[::-1], sigma_real[::-1, ::-1]  # not the ranks' real images'
    np.savez(f"{out}.cached.0.npz", mu=mu_cached, sigma=sigma_cached, n=2, mode="tf")
    (tmp_path / "r.fresh.1.npz").write_bytes(b"garbage only rank 1 could read")
    np.savez(f"{out}.refused.0.npz", mu=np.zeros(2048), sigma=np.eye(2048), n=2, mode="pytorch-fid")
    ctx = torch.multiprocessing.spawn(_fid_rank, args=(2, f"file://{tmp_path}/pg", fid_weights, out),
                                      nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("fid.evaluate deadlocked: the ranks disagreed about the cache")
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    assert ranks[0] == ranks[1]
    # a rank's batch of 1 image against this process's 2: the convolutions round differently
    cached = _fid_cheap_distance(mu_fake, sigma_fake, mu_cached, sigma_cached)
    fresh = _fid_cheap_distance(mu_fake, sigma_fake, mu_real, sigma_real)
    assert ranks[0][0]["fid"] == pytest.approx(cached, rel=1e-4) and cached != pytest.approx(fresh)
    assert ranks[0][1]["fid"] == pytest.approx(fresh, rel=1e-4)
    with np.load(f"{out}.fresh.0.npz") as f:  # written by rank 0, with both ranks' real images
        assert int(f["n"]) == 2 and str(f["mode"]) == "tf"
    assert (tmp_path / "r.fresh.1.npz").read_bytes() == b"garbage only rank 1 could read"
    assert not os.path.exists(f"{out}.cached.1.npz") and not os.path.exists(f"{out}.fresh.1.npz.tmp")
    assert "preprocessing mode pytorch-fid, not tf" in ranks[0][2]
