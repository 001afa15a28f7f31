from test_smoke import (pattern_images, make_image_folder, run, assert_bad_input, gaussian_eps, assert_moments,  # noqa
                        image_size, load, same_weights, ddim_gaussian_std, torchrun, json, np, os, pytest, sys, torch,
                        Image, SimpleNamespace)

# ----------------------------------------------------------------------------- stl10_vpred_clip.py

STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL_TINY = ["--width", "32", "--depth", "1", "--batch-size", "2", "--steps", "20", "--sample-steps", "2",
            "--n", "1", "--log-every", "1", "--device", "cpu"]


def make_stl10(root, per_class=2):
    """torchvision's stl10_binary layout: uint8 images stored [N, C, W, H] (column-major), labels 1..10."""
    d = os.path.join(root, "stl10_binary")
    os.makedirs(d, exist_ok=True)
    for split, seed in (("train", 0), ("test", 1)):
        x, y = pattern_images(10, per_class, 96, 3, seed)
        open(os.path.join(d, f"{split}_X.bin"), "wb").write(x.transpose(0, 3, 2, 1).tobytes())
        open(os.path.join(d, f"{split}_y.bin"), "wb").write((y + 1).astype(np.uint8).tobytes())
    open(os.path.join(d, "unlabeled_X.bin"), "wb").write(x[:1].transpose(0, 3, 2, 1).tobytes())
    open(os.path.join(d, "class_names.txt"), "w").write("\n".join(STL_CLASSES) + "\n")
    return root


@pytest.fixture(scope="module")
def stl_data(tmp_path_factory):
    """Generated STL-10 files (only torchvision's md5 check patched) and a [11, 16] --text-emb file."""
    root = str(tmp_path_factory.mktemp("stl"))
    make_stl10(os.path.join(root, "data"))
    emb = os.path.join(root, "emb.pt")
    torch.save(dict(emb=torch.randn(11, 16), context_dim=16,
                    prompts=[f"a photo of a {c}" for c in STL_CLASSES] + [""]), emb)
    import torchvision
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
        yield SimpleNamespace(data=os.path.join(root, "data"), emb=emb)


@pytest.fixture(scope="module")
def stl_run(stl_data, tmp_path_factory):
    """A tiny CLIP-path run with --accum 2: 2 steps, then resumed to 3 with a grid and the diagnostics."""
    out = str(tmp_path_factory.mktemp("stl_run"))
    base = ["--data-dir", stl_data.data, "--text-emb", stl_data.emb, "--out-dir", out, *STL_TINY, "--accum", "2",
            "--ckpt-every", "1", "--sample-every", "3", "--diag-every", "3", "--cfg", "1"]
    assert run("stl10_vpred_clip", *base, "--iters", "2") == 0
    assert run("stl10_vpred_clip", *base, "--iters", "3", "--resume") == 0
    return SimpleNamespace(out=out, base=base, ckpt=os.path.join(out, "ckpt.pt"))


def test_stl_train_writes_run_files_and_diagnostics(stl_run, stl_data):
    out = stl_run.out
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3]  # resumed at 2, not restarted
    assert log[0]["lr"] < log[2]["lr"]  # still warming up
    ck = load(stl_run.ckpt)
    assert ck["step"] == 3 and ck["classes"] == STL_CLASSES and ck["context_dim"] == 16
    assert torch.equal(ck["ema"]["text_emb"], load(stl_data.emb)["emb"])  # the frozen table, in the checkpoint
    assert "label_emb.weight" not in ck["model"]
    assert image_size(os.path.join(out, "samples_3.png")) == (97 + 1, 11 * 97 + 1)  # 10 classes + uncond
    diag = os.path.join(out, "diagnostics", "step_3")
    assert image_size(os.path.join(diag, "reconstruction_sweep.png")) == (6 * 97 + 1, 4 * 97 + 1)  # orig + 5 t
    assert image_size(os.path.join(diag, "reconstruction.png")) == (6 * 97 + 1, 2 * 97 + 1)  # noisy / restored
    assert image_size(os.path.join(diag, "grid_cfg1.0.png")) == (97 + 1, 11 * 97 + 1)
    assert image_size(os.path.join(diag, "collage.png")) == (2 * 97 + 1, 4 * 97 + 1)  # 2 steps, 4 samples
    assert image_size(os.path.join(diag, "embeddings.png")) == (480, 400)


def test_stl_resume_gives_identical_weights(stl_run, tmp_path):
    out = str(tmp_path / "straight")
    assert run("stl10_vpred_clip", *stl_run.base, "--out-dir", out, "--iters", "3", "--diag-every", "0") == 0
    a, b = load(os.path.join(out, "ckpt.pt")), load(stl_run.ckpt)
    assert same_weights(a["model"], b["model"]) and same_weights(a["ema"], b["ema"])


@pytest.mark.parametrize("sampler,cfg", [("ddpm", "1"), ("ddim", "6"), ("dpmpp", "0")])
def test_stl_sample_each_sampler(stl_run, tmp_path, sampler, cfg):
    assert run("stl10_vpred_clip", "--sample", "--ckpt", stl_run.ckpt, "--out-dir", tmp_path, "--sampler", sampler,
               "--sample-steps", "3", "--eta", "0", "--cfg", cfg, "--label", "3", "uncond", "--n", "1", "--gif",
               "--device", "cpu") == 0
    assert image_size(tmp_path / "samples.png") == (97 + 1, 2 * 97 + 1)
    with Image.open(tmp_path / "denoise.gif") as gif:  # one frame per step; ddpm walks all T=20
        assert gif.n_frames == (20 if sampler == "ddpm" else 3) and gif.size == (97 + 1, 2 * 97 + 1)


def test_stl_diagnostics_and_sweep_from_checkpoint(stl_run, tmp_path):
    assert run("stl10_vpred_clip", "--diagnostics", "--sweep", "--ckpt", stl_run.ckpt, "--out-dir", tmp_path,
               "--schedules", "cosine", "linear", "--cfg", "0", "6", "--eta", "0", "1", "--labels", "10",
               "--n", "1", "--sample-steps", "2", "--seed", "42", "--device", "cpu") == 0
    assert sorted(os.listdir(tmp_path / "diagnostics" / "step_3")) == [
        "collage.png", "embeddings.png", "grid_cfg0.0.png", "reconstruction.png", "reconstruction_sweep.png"]
    for schedule in ("cosine", "linear"):
        names = sorted(os.listdir(tmp_path / "sweeps" / schedule))
        assert names == sorted(f"grid_{schedule}_cfg{w}_eta{e}.png" for w in ("0.0", "6.0") for e in ("0.0", "1.0"))
        assert image_size(tmp_path / "sweeps" / schedule / names[0]) == (96, 96)  # one image: no padding
    a, b = (np.asarray(Image.open(tmp_path / "sweeps" / s / f"grid_{s}_cfg6.0_eta0.0.png"))
            for s in ("cosine", "linear"))
    assert not np.array_equal(a, b)  # the schedule really changes the sampler


def test_stl_learned_cond_periodic_checkpoints_and_config(stl_data, tmp_path):
    out = str(tmp_path / "learned")
    assert run("stl10_vpred_clip", "--data-dir", stl_data.data, "--out-dir", out, *STL_TINY, "--cond", "learned",
               "--iters", "4", "--save-every", "1", "--keep", "2", "--sample-every", "100", "--diag-every", "0") == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_")) == ["ckpt_3.pt", "ckpt_4.pt"]
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["ema"]["label_emb.weight"].shape == (11, 4 * 32) and "text_emb" not in ck["ema"]
    before = load(os.path.join(out, "ckpt_3.pt"))["model"]["label_emb.weight"]
    assert not torch.equal(ck["model"]["label_emb.weight"], before)  # the label embeddings are trained
    cfg = json.load(open(os.path.join(out, "config.json")))
    out2 = str(tmp_path / "again")
    assert run("stl10_vpred_clip", "--config", os.path.join(out, "config.json"), "--out-dir", out2, "--iters", "1") == 0
    cfg2 = json.load(open(os.path.join(out2, "config.json")))
    assert {k for k in cfg if cfg[k] != cfg2[k]} == {"out_dir", "iters", "config"} and cfg2["cond"] == "learned"


def test_stl_loader_reads_stl10_binary(stl_data):
    import stl10_vpred_clip as m
    args = m.get_args(["--data-dir", stl_data.data])
    images, labels, classes = m.get_data(args)
    x, y = pattern_images(10, 2, 96, 3, 0)
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 96, 96)
    assert torch.equal(images, torch.from_numpy(x).permute(0, 3, 1, 2))  # rows and columns the right way round
    assert labels.tolist() == y.tolist() and classes == STL_CLASSES
    assert m.get_data(m.get_args(["--data-dir", stl_data.data]), train=False)[0].shape == (20, 3, 96, 96)
    sub, sub_labels, _ = m.get_data(m.get_args(["--data-dir", stl_data.data, "--overfit", "5"]))
    again = m.get_data(m.get_args(["--data-dir", stl_data.data, "--overfit", "5"]))[0]
    assert sub.shape[0] == 5 and torch.equal(sub, again) and not torch.equal(sub, images[:5])
    assert len(set(sub_labels.tolist())) > 1  # a random subset, not the first class only


def test_stl_image_folder_is_resized_to_96(tmp_path):
    import stl10_vpred_clip as m
    folder = make_image_folder(str(tmp_path / "imgs"), per_class=2, size=32)
    images, labels, classes = m.get_data(m.get_args(["--image-folder", folder]))
    assert images.shape == (6, 3, 96, 96) and classes == ["cat", "dog", "ship"]


def test_stl_v_eps_x0_round_trip():
    import stl10_vpred_clip as m
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    ab = m.make_alphas_cumprod("cosine", 500, "cpu").double()
    t = torch.tensor([0, 100, 300, 499])
    x0, eps = x0.double(), eps.double()
    xt, abar = m.q_sample(x0, t, eps, ab), ab[t].view(-1, 1, 1, 1)
    v = m.v_target(x0, eps, abar)
    assert torch.allclose(m.v_to_eps(v, xt, abar), eps, atol=1e-10)
    assert torch.allclose(m.v_to_x0(v, xt, abar), x0, atol=1e-10)
    assert torch.allclose(m.eps_from_v(lambda x, t_: m.v_target(x0, eps, ab[t_].view(-1, 1, 1, 1)), ab)(xt, t), eps)


def stl_v_from_eps(eps_fn, ab):
    """The analytic eps-denoiser as a v-denoiser: v = sqrt(abar) eps - sqrt(1-abar) x0, x0 from x_t and eps."""
    def v_fn(x, t):
        abar, eps = ab[t].view(-1, *[1] * (x.dim() - 1)), eps_fn(x, t)
        return abar.sqrt() * eps - (1 - abar).sqrt() * (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    return v_fn


def test_stl_samplers_match_gaussian_moments_through_v():
    import stl10_vpred_clip as m
    mu, s = 1.0, 0.5
    ab = m.make_alphas_cumprod("cosine", 500, "cpu")  # T=500: log-SNR reaches -9.2 at t=T-1
    eps_fn = m.eps_from_v(stl_v_from_eps(gaussian_eps(mu, s, ab), ab), ab)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4000, 16), generator=g)
    assert_moments(m.sample(eps_fn, x, ab, "ddpm", 0, 0.0, g), mu, s)  # ancestral on all T steps
    for steps in (20, 50):
        assert_moments(m.sample(eps_fn, x, ab, "dpmpp", steps, 0.0), mu, s)
        out = m.sample(eps_fn, x, ab, "ddim", steps, 0.0)
        assert_moments(out, mu, ddim_gaussian_std(m.sample_timesteps(499, steps), ab, s), tol=0.01)
        assert abs(out.mean().item() - mu) < 0.02 * mu
    # a partial start (the reconstructions): from x_t of Gaussian data at t=250, back to the data's moments
    x0 = mu + s * torch.randn((4000, 1, 4, 4), generator=g)  # image-shaped, as q_sample expects
    xt = m.q_sample(x0, torch.full((4000,), 250), torch.randn(x0.shape, generator=g), ab)
    assert_moments(m.sample(eps_fn, xt, ab, "ddpm", 0, 0.0, g, t_start=250), mu, s)  # ancestral from t=250


def test_stl_cfg_on_v_is_one_doubled_batch():
    import stl10_vpred_clip as m
    calls = []

    def model(x, t, y):
        calls.append(y.tolist())
        return torch.ones_like(x) * (y.view(-1, 1) == 10)  # v_u = 1, v_c = 0
    y = torch.tensor([3, 7])
    v = m.cfg_denoiser(model, y, 6.0, 10)(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    assert calls == [[3, 7, 10, 10]] and torch.allclose(v, torch.full((2, 5), 1 - 6.0))  # v_u + 6 (v_c - v_u)
    v0 = m.cfg_denoiser(model, y, 0.0, 10)(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    assert torch.equal(v0, torch.ones(2, 5))  # W=0: the unconditional prediction


def test_stl_cross_attention_uses_the_context():
    import stl10_vpred_clip as m
    torch.manual_seed(0)
    model = m.UNet(32, 1, 10, 16, "clip").eval()
    model.text_emb.copy_(torch.randn(11, 16))
    x, t = torch.randn(1, 3, 96, 96).repeat(3, 1, 1, 1), torch.tensor([5, 5, 5])
    with torch.no_grad():
        out = model(x, t, torch.tensor([0, 1, 10]))
        assert (out[0] - out[1]).abs().max() > 1e-4 and (out[0] - out[2]).abs().max() > 1e-4
        model.text_emb[10] += 1.0  # change only the unconditional row
        out2 = model(x, t, torch.tensor([0, 1, 10]))
    assert torch.equal(out2[:2], out[:2]) and (out2[2] - out[2]).abs().max() > 1e-4
    assert "text_emb" not in dict(model.named_parameters())  # the CLIP table is frozen (a buffer)


def test_stl_clip_errors_are_one_line(stl_data, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    base = ["--data-dir", stl_data.data, "--out-dir", tmp_path / "o", *STL_TINY, "--iters", "1"]
    err = assert_bad_input(capsys, "stl10_vpred_clip", *base)
    assert "pip install open_clip_torch" in err and "--text-emb" in err
    bad = tmp_path / "bad.pt"
    torch.save(dict(emb=torch.randn(5, 16), context_dim=16, prompts=[""] * 5), bad)
    assert "11" in assert_bad_input(capsys, "stl10_vpred_clip", *base, "--text-emb", bad)
    assert "--text-emb" in assert_bad_input(capsys, "stl10_vpred_clip", *base, "--text-emb", tmp_path / "x.pt")


def test_stl_bad_inputs(stl_run, capsys, tmp_path):
    sample = ["--sample", "--ckpt", stl_run.ckpt, "--device", "cpu", "--out-dir", tmp_path]
    assert "--labels" in assert_bad_input(capsys, "stl10_vpred_clip", *sample, "--labels", "11")
    assert "--cfg" in assert_bad_input(capsys, "stl10_vpred_clip", *sample, "--cfg", "-1")
    assert "--sweep" in assert_bad_input(capsys, "stl10_vpred_clip", *sample, "--cfg", "1", "6")
    assert "--steps" in assert_bad_input(capsys, "stl10_vpred_clip", "--steps", "0")
    assert "no checkpoint" in assert_bad_input(capsys, "stl10_vpred_clip", "--sample", "--ckpt", tmp_path / "x.pt")
    assert "--batch-size" in assert_bad_input(capsys, "stl10_vpred_clip", *stl_run.base, "--out-dir", tmp_path,
                                              "--batch-size", "64")
    mismatched = [*stl_run.base, "--width", "64", "--resume", "--iters", "5"]
    assert "does not match" in assert_bad_input(capsys, "stl10_vpred_clip", *mismatched)


def test_stl_tensorboard_with_projector(stl_data, tmp_path):
    pytest.importorskip("tensorboard", reason="CI installs tensorboard; locally optional")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "out")
    assert run("stl10_vpred_clip", "--data-dir", stl_data.data, "--text-emb", stl_data.emb, "--out-dir", out,
               *STL_TINY, "--iters", "1", "--tensorboard") == 0
    acc = EventAccumulator(os.path.join(out, "tb")).Reload()
    assert {"loss", "lr", "img_per_s"} <= set(acc.Tags()["scalars"]) and "samples" in acc.Tags()["images"]
    meta = [os.path.join(d, "metadata.tsv") for d, _, files in os.walk(out) if "metadata.tsv" in files]
    assert meta and open(meta[0]).read().split() == STL_CLASSES + ["uncond"]


def test_stl_fid(stl_run, tmp_path, monkeypatch):
    import fid
    real_inception = fid.inception_v3
    monkeypatch.setattr(fid, "inception_v3", lambda weights="download": real_inception(None))  # random, offline
    assert run("stl10_vpred_clip", "--sample", "--ckpt", stl_run.ckpt, "--out-dir", tmp_path, "--fid", "10",
               "--data-dir", stl_run.base[1],
               "--labels", "1", "--n", "1", "--sample-steps", "2", "--device", "cpu") == 0
    res = json.load(open(tmp_path / "fid.json"))
    assert res["n"] == 10 and np.isfinite(res["fid"]) and res["inception_score_mean"] > 0 and res["cfg"] == 6.0


def test_stl_torchrun_two_processes_with_accum(tmp_path):
    folder = make_image_folder(str(tmp_path / "imgs"), per_class=4, size=32)  # a subprocess: no md5 patch, so a folder
    out = str(tmp_path / "out")
    tiny = [a if a != "--n" else "--num-samples" for a in STL_TINY]  # torchrun's parser takes --n for its --nnodes
    r = torchrun("stl10_vpred_clip.py", 2, "--image-folder", folder, "--cond", "learned", "--out-dir", out, *tiny,
                 "--iters", "2", "--accum", "2", "--sample-every", "100", "--diag-every", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "global batch 8" in r.stdout  # 2 images x 2 micro-batches x 2 processes
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 2 and len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0], ck["rng"][1])
    assert len(open(os.path.join(out, "log.jsonl")).readlines()) == 2  # one writer
