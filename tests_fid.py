"""Tests of fid.py: offline, CPU, random Inception weights (the real ones cannot be downloaded in CI)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fid  # noqa: E402


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


def _fid_textbook(mu1, s1, mu2, s2):
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_fid_frechet_distance_closed_form_and_textbook():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    closed = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()  # = 1 + 6.25 + 4 + 1 + 0
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(3):
        a, b = rng.standard_normal((2, 64, 64))
        s1, s2 = a @ a.T / 64 + 0.5 * np.eye(64), b @ b.T / 64 + 0.1 * np.eye(64)
        m1, m2 = rng.standard_normal((2, 64))
        assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(_fid_textbook(m1, s1, m2, s2), rel=1e-6)
        assert fid.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-6)


def test_fid_frechet_distance_singular_statistics():
    # 10 samples of 256 features: rank-9 covariances, as FID from fewer images than features
    rng = np.random.default_rng(1)
    x1, x2 = rng.standard_normal((10, 256)), rng.standard_normal((10, 256)) * 2 + 0.3
    m1, m2, s1, s2 = x1.mean(0), x2.mean(0), np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    d = fid.frechet_distance(m1, s1, m2, s2)
    # exact for low rank: Tr sqrtm(S1 S2) = nuclear norm of X1c X2c^T / (n - 1)
    nuclear = np.linalg.svd((x1 - m1) @ (x2 - m2).T / 9, compute_uv=False).sum()
    exact = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * nuclear
    assert np.isfinite(d) and d >= 0 and d == pytest.approx(exact, rel=1e-6)
    assert fid.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-6 * np.trace(s1))
    with pytest.raises(ValueError):
        fid.frechet_distance(m1, s1, m2[:-1], s2[:-1, :-1])
    with pytest.raises(ValueError):
        fid.frechet_distance(m1, s1 * np.nan, m2, s2)


def test_fid_inception_score_uniform_and_one_hot():
    mean, std = fid.inception_score(torch.zeros(20, 1008))
    assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    k = 4
    one_hot = 1e4 * torch.nn.functional.one_hot(torch.arange(40) % k, 1008).double()  # softmax: exactly one-hot
    mean, std = fid.inception_score(one_hot)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        fid.inception_score(one_hot[:9])


def test_fid_network_layout_and_preprocessing(fid_weights):
    net = fid.inception_v3(fid_weights)
    ref = torchvision.models.Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.items()}
    assert not net.training and [m.max_pool for m in (net.Mixed_7b, net.Mixed_7c)] == [False, True]
    x = (_fid_images(2, 0, size=37) * 255).round() / 255  # exactly representable as uint8
    f, logits = net(x)
    assert f.shape == (2, 2048) and logits.shape == (2, 1008) and f.abs().mean() > 1e-3
    f8, _ = net((x[1:] * 255).round().to(torch.uint8))
    assert torch.allclose(f8, f[1:], rtol=1e-5, atol=1e-5)
    gray = x[:1, :1]
    assert torch.allclose(net(gray)[0], net(gray.repeat(1, 3, 1, 1))[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        net(2 * x - 1)  # images in [-1, 1] must not give a silent wrong value


def test_fid_network_equals_pytorch_fid(fid_weights, monkeypatch):
    pfi = pytest.importorskip("pytorch_fid.inception")  # optional: not a requirement of the repo
    state = torch.load(fid_weights, weights_only=True)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state)
    x = _fid_images(1, 1, size=45)
    with torch.no_grad():
        expected = pfi.InceptionV3([3]).eval()(x)[0].flatten(1)
    assert torch.allclose(fid.inception_v3(state)(x)[0], expected, rtol=1e-4, atol=1e-4)


def test_fid_evaluate_truncates_and_caches(fid_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "frechet_distance", _fid_cheap_distance)
    drawn = []

    def fake():  # grayscale batches of 2: n=3 must draw exactly 2 batches
        for i in range(5):
            drawn.append(i)
            yield _fid_images(2, 10 + i, channels=1)

    def no_real():
        raise AssertionError("real images consumed although the cache exists")
        yield

    cache = str(tmp_path / "stats" / "real_32_3.npz")
    real = [(_fid_images(2, 20 + i), torch.zeros(2)) for i in range(3)]  # a loader's (images, labels)
    first = fid.evaluate(fake(), real, 3, cache=cache, weights=fid_weights)
    assert drawn == [0, 1] and first["n"] == 3 and first["inception_score_mean"] is None
    assert first["fid"] > 0 and np.isfinite(first["fid"])
    with np.load(cache) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and int(f["n"]) == 3
    drawn.clear()
    again = fid.evaluate(fake(), no_real(), 3, cache=cache, weights=fid_weights)
    assert drawn == [0, 1] and again["fid"] == pytest.approx(first["fid"], rel=1e-9)
    with pytest.raises(ValueError, match="holds the statistics of 3 images"):
        fid.evaluate(fake(), no_real(), 2, cache=cache, weights=fid_weights)
    with pytest.raises(ValueError, match="only 1 images available, 2 requested"):
        fid.evaluate([_fid_images(1, 0)], real, 2, weights=fid_weights)


def _fid_rank(rank, world, init, weights, cache, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    fid.frechet_distance = _fid_cheap_distance
    fake = _fid_images(12, 30)[rank * 6:(rank + 1) * 6]
    real = _fid_images(12, 31)[rank * 6:(rank + 1) * 6]
    result = fid.evaluate(iter(fake.split(4)), [real], 6, cache=cache, inception_score=True, weights=weights)
    torch.save(result, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_fid_distributed_equals_single_process(fid_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "frechet_distance", _fid_cheap_distance)  # compares mu and sigma entry by entry
    cache = str(tmp_path / "real.npz")
    torch.multiprocessing.spawn(_fid_rank, args=(2, f"file://{tmp_path}/pg", fid_weights, cache, str(tmp_path / "r")),
                                nprocs=2)
    ranks = [torch.load(tmp_path / f"r.{r}", weights_only=False) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["n"] == 12
    with np.load(cache) as f:
        assert int(f["n"]) == 12  # written once, by rank 0, with the statistics of all 12 real images

    def no_real():
        raise AssertionError("real images consumed although the cache exists")
        yield

    single = fid.evaluate(_fid_images(12, 30), no_real(), 12, cache=cache, inception_score=True, weights=fid_weights)
    assert single["fid"] > 0 and single["fid"] == pytest.approx(ranks[0]["fid"], rel=1e-6)
    # 12 images in 10 parts of 1 or 2 images: the score depends on the order of the gathered logits
    assert single["inception_score_mean"] - 1 == pytest.approx(ranks[0]["inception_score_mean"] - 1, rel=1e-4)
    assert single["inception_score_std"] == pytest.approx(ranks[0]["inception_score_std"], rel=1e-4)
    assert single["inception_score_mean"] > 1 + 1e-4 and single["inception_score_std"] > 1e-4


def test_fid_command_line(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    for folder, count in [("a/sub", 10), ("b", 2)]:
        os.makedirs(tmp_path / folder)
        for i in range(count):
            image = Image.fromarray(rng.integers(0, 256, (16 + i, 16, 3), dtype=np.uint8))  # mixed sizes
            (image.convert("L") if i == 0 else image).save(tmp_path / folder / f"{i}.png")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fid.py")
    run = subprocess.run([sys.executable, script, str(tmp_path / "a"), str(tmp_path / "b"), "--is", "--weights",
                          "none", "--batch-size", "4"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("IS: ") and lines[1].startswith("FID: ") and float(lines[1][5:]) >= 0

    fid.main([str(tmp_path / "b"), str(tmp_path / "b.npz"), "--save-stats", "--weights", "none"])
    fid.main([str(tmp_path / "b.npz"), str(tmp_path / "b.npz")])  # .npz only: no network, no download
    assert capsys.readouterr().out.splitlines()[-1] == "FID: 0.0"
    os.makedirs(tmp_path / "empty")
    for argv in [[str(tmp_path / "missing"), str(tmp_path / "b")], [str(tmp_path / "empty"), str(tmp_path / "b")],
                 [str(tmp_path / "b.npz"), "--is"], [str(tmp_path / "b")]]:
        with pytest.raises(SystemExit) as exit_info:
            fid.main(argv + ["--weights", "none"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("fid.py: error:") and len(err.strip().splitlines()) == 1
