"""Tests of the collection: offline, on a CPU, on data generated here in the real on-disk formats.

    pytest test_smoke.py            # everything this machine can run (GPU tests skip without CUDA)
    pytest test_smoke.py -m gpu     # only the GPU tests, on a machine with CUDA

One table, SCRIPTS, says what differs between the five scripts; the tests of what every script
promises run over it. Then the sampler math and the spine test, then a section per script, fid.py
and bench.py.
"""
import ast
import importlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import fid

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--width", "32", "--depth", "1", "--batch-size", "4", "--steps", "20", "--sample-steps", "3",
        "--per-label", "2", "--log-every", "1", "--device", "cpu", "--lr", "1e-3", "--warmup", "1"]


# ----------------------------------------------------------------------------- data in the real formats

def pattern_images(n_classes, per_class, size, channels, seed=0):
    """uint8 [N, size, size, C] images whose class is visible: class k lights up the k-th stripe."""
    g = np.random.default_rng(seed)
    x = g.integers(0, 40, (n_classes * per_class, size, size, channels), dtype=np.uint8)
    y = np.repeat(np.arange(n_classes), per_class)
    w = max(1, size // n_classes)
    for i, k in enumerate(y):
        x[i, :, k * w:(k + 1) * w] = 255 - (k * 9) % 60
    return x, y


def make_mnist(root, per_class=20):
    """torchvision's MNIST/raw: four IDX files (magic 0 0 8 ndim, big-endian sizes, raw uint8)."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, seed in (("train", 0), ("t10k", 1)):
        x, y = pattern_images(10, per_class, 28, 1, seed)
        for kind, a in (("images-idx3", x[..., 0]), ("labels-idx1", y.astype(np.uint8))):
            with open(os.path.join(raw, f"{split}-{kind}-ubyte"), "wb") as f:
                f.write(struct.pack(">BBBB", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape))
                f.write(a.astype(np.uint8).tobytes())
    return root


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def make_cifar(root, per_class=8, test_per_class=2):
    """torchvision's cifar-10-batches-py: five train pickles, test_batch, batches.meta (dicts with
    "data": uint8 [N, 3072] as R, G, B planes, and "labels")."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    x, y = pattern_images(10, per_class, 32, 3, seed=0)
    xt, yt = pattern_images(10, test_per_class, 32, 3, seed=1)
    order = np.random.default_rng(0).permutation(len(x))
    parts = [(f"data_batch_{i + 1}", idx) for i, idx in enumerate(np.array_split(order, 5))]
    for name, (xs, ys) in [(n, (x[i], y[i])) for n, i in parts] + [("test_batch", (xt, yt))]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": xs.transpose(0, 3, 1, 2).reshape(len(xs), -1), "labels": ys.tolist()}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES}, f)
    return root


STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def make_stl10(root, per_class=2):
    """torchvision's stl10_binary: uint8 images stored [N, C, W, H] (column-major), labels 1..10."""
    d = os.path.join(root, "stl10_binary")
    os.makedirs(d, exist_ok=True)
    for split, seed in (("train", 0), ("test", 1)):
        x, y = pattern_images(10, per_class, 96, 3, seed)
        open(os.path.join(d, f"{split}_X.bin"), "wb").write(x.transpose(0, 3, 2, 1).tobytes())
        open(os.path.join(d, f"{split}_y.bin"), "wb").write((y + 1).astype(np.uint8).tobytes())
    open(os.path.join(d, "unlabeled_X.bin"), "wb").write(x[:1].transpose(0, 3, 2, 1).tobytes())
    open(os.path.join(d, "class_names.txt"), "w").write("\n".join(STL_CLASSES) + "\n")
    return root


CELEBA_NAMES = ["Male", "Smiling", "Eyeglasses", "Blond_Hair", "Young", "Heavy_Makeup"] + [
    f"Attr_{k}" for k in range(34)]


def make_celeba(root, n=12, rows=None):
    """CelebA's layout: celeba/img_align_celeba/<6 digits>.jpg (178x218 as the real crops) and
    celeba/list_attr_celeba.txt (the count, 40 names, a row of 1/-1 per image); `rows` replaces the
    attribute rows."""
    folder = os.path.join(root, "celeba", "img_align_celeba")
    os.makedirs(folder, exist_ok=True)
    x, _ = pattern_images(n, 1, 218, 3)
    g = np.random.default_rng(0)
    lines = [str(n), " ".join(CELEBA_NAMES)]
    for i in range(n):
        Image.fromarray(x[i, :, 20:198]).save(os.path.join(folder, f"{i + 1:06d}.jpg"))
        lines.append(f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in g.choice([-1, 1], 40)))
    lines[2:] = rows or lines[2:]
    with open(os.path.join(root, "celeba", "list_attr_celeba.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return root


def make_image_folder(root, classes=("cat", "dog", "ship"), per_class=8, size=32):
    """An ImageFolder tree of PNGs: <root>/<class>/<i>.png."""
    x, y = pattern_images(len(classes), per_class, size, 3)
    for i, (img, k) in enumerate(zip(x, y)):
        os.makedirs(os.path.join(root, classes[k]), exist_ok=True)
        Image.fromarray(img).save(os.path.join(root, classes[k], f"{i}.png"))
    return root


@pytest.fixture(scope="session", autouse=True)
def no_checksums():
    """The generated CIFAR-10 and STL-10 files are not the real ones: torchvision's md5 checks
    become "the files exist"."""
    import torchvision.datasets as tvd
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("torchvision.datasets.cifar.check_integrity",
                   lambda path, md5=None: os.path.isfile(path))
        mp.setattr(tvd.STL10, "_check_integrity", lambda self: True)
        yield


# ----------------------------------------------------------------------------- the five scripts

# data: the writer of the script's real data set; size, channels: its images; rows: rows of its
# sample grids; files: what its source project adds to a run; args: its own tiny settings;
# bad_label: a --labels value it refuses; folder_size: its images from an --image-folder.
SCRIPTS = {
    "mnist_ddpm": SimpleNamespace(data=make_mnist, size=28, channels=1, rows=11,
                                  files=["forward.png"], args=[], bad_label="12"),
    "cifar_cfg_unet": SimpleNamespace(data=make_cifar, size=32, channels=3, rows=11,
                                      files=["loss_history.json"], args=[], bad_label="cow"),
    "cifar_dit_ddp": SimpleNamespace(data=make_cifar, size=32, channels=3, rows=11,
                                     files=["best.pt", "sample_grid.png", "timestep_grid.png"],
                                     args=[], bad_label="cow"),
    "stl10_vpred_clip": SimpleNamespace(data=make_stl10, size=96, channels=3, rows=11, files=[],
                                        args=["--batch-size", "2", "--diag-every", "0"],
                                        bad_label="11"),
    "celeba_crossattn": SimpleNamespace(data=make_celeba, size=32, channels=3, rows=3, files=[],
                                        args=["--size", "32", "--workers", "0", "--toggle",
                                              "Male,Smiling"], bad_label="Male,Smiley"),
}


def run(script, *args):
    """A script's main() in this process; returns its exit status (0 when main returns)."""
    try:
        importlib.import_module(script).main([str(a) for a in args])
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit(message): printed, status 1, as by the interpreter
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else 1
    return 0


def torchrun(script, nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, script + ".py"), *map(str, args)]
    return subprocess.run(cmd, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300,
                          capture_output=True, text=True)


def assert_bad_input(capsys, script, *args):
    """Bad input ends with status 2 and one line on stderr naming the problem; returns the line."""
    capsys.readouterr()
    assert run(script, *args) == 2, args
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def image_size(path):
    with Image.open(path) as im:
        return im.size


def grid_size(cols, rows, size):
    """A save_grid PNG: 1 px padding around each image."""
    return cols * (size + 1) + 1, rows * (size + 1) + 1


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Each script's generated data set, made once: data_dir(script) is its --data-dir."""
    made = {}

    def get(script):
        if script not in made:
            made[script] = SCRIPTS[script].data(str(tmp_path_factory.mktemp(script)))
        return made[script]
    return get


def base_args(script, data):
    return ["--data-dir", data, *TINY, *SCRIPTS[script].args]


@pytest.fixture(scope="session", params=list(SCRIPTS))
def trained(request, data_dir, tmp_path_factory):
    """Each script's tiny run: 2 steps, then resumed to 4; checkpoints every 2 steps, ckpt_<step>.pt
    every 2 with only the newest kept, sample grids at steps 3 and 4."""
    script = request.param
    out = str(tmp_path_factory.mktemp(script + "_run"))
    base = [*base_args(script, data_dir(script)), "--out-dir", out, "--ckpt-every", "2",
            "--sample-every", "3", "--save-every", "2", "--keep", "1"]
    assert run(script, *base, "--iters", 2) == 0
    assert run(script, *base, "--iters", 4, "--resume") == 0
    return SimpleNamespace(script=script, s=SCRIPTS[script], out=out, base=base,
                           ckpt=os.path.join(out, "ckpt.pt"), data=data_dir(script))


def test_train_writes_its_files(trained):
    s, out = trained.s, trained.out
    for f in ["config.json", "ckpt.pt", "ckpt_4.pt", "log.jsonl", "samples_3.png", "samples_4.png",
              "reverse.png", "reconstruction.png", *s.files]:
        assert os.path.isfile(os.path.join(out, f)), f
    assert not any(f.endswith(".tmp") or f in ("lock", "ckpt_2.pt") for f in os.listdir(out))
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4]  # resumed, not restarted
    ck = load(trained.ckpt)
    assert {"script", "model", "ema", "opt", "scaler", "step", "config", "meta", "rng", "best_val",
            "extras"} <= ck.keys() and ck["script"] == trained.script and ck["step"] == 4
    assert ck["meta"]["size"] == s.size and ck["meta"]["channels"] == s.channels
    assert image_size(os.path.join(out, "samples_4.png")) == grid_size(2, s.rows, s.size)
    assert image_size(os.path.join(out, "reverse.png")) == grid_size(3, s.rows, s.size)  # 3 steps
    assert image_size(os.path.join(out, "reconstruction.png")) == grid_size(9, 8, s.size)
    assert json.load(open(os.path.join(out, "config.json")))["iters"] == 4


def test_resume_equals_a_straight_run(trained, tmp_path):
    out = str(tmp_path / "straight")
    assert run(trained.script, *trained.base, "--out-dir", out, "--iters", 4) == 0
    a, b = load(os.path.join(out, "ckpt.pt")), load(trained.ckpt)
    assert same_weights(a["model"], b["model"]) and same_weights(a["ema"], b["ema"])
    assert [r.get("loss") for r in read_log(out)] == [r.get("loss") for r in read_log(trained.out)]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_sample_with_each_sampler(trained, tmp_path, sampler):
    s = trained.s
    assert run(trained.script, "--sample", "--ckpt", trained.ckpt, "--out-dir", tmp_path, "--gif",
               "--sampler", sampler, "--sample-steps", 3, "--cfg", 3, "--per-label", 2,
               "--device", "cpu", *s.args) == 0
    assert image_size(tmp_path / "samples.png") == grid_size(2, s.rows, s.size)
    with Image.open(tmp_path / "denoise.gif") as gif:  # a frame per step; ddpm walks all T=20
        assert gif.n_frames == (20 if sampler == "ddpm" else 3)
        assert gif.size == grid_size(2, s.rows, s.size)
    steps = 10 if sampler == "ddpm" else 3  # path figures show at most 10 columns
    assert image_size(tmp_path / "reverse.png") == grid_size(steps, s.rows, s.size)


def test_bad_input_is_one_line(trained, capsys, tmp_path):
    """SPEC's and the attack's bad inputs: one line naming the flag or file, exit status 2, and a
    failed start leaves the run as it was."""
    script, ckpt = trained.script, trained.ckpt
    sample = ["--sample", "--ckpt", ckpt, "--out-dir", tmp_path / "s", "--device", "cpu"]
    train = [*base_args(script, trained.data), "--out-dir", tmp_path / "o", "--iters", 1]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"script": "another"}, tmp_path / "other.pt")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"width": 32, "no_such_setting": 1}))
    (tmp_path / "a_file").write_text("")
    os.makedirs(tmp_path / "empty" / "a")
    cases = [(["--steps", 0], "--steps"), ([*sample, "--cfg", -1], "--cfg"),
             ([*sample, "--eta", 1.5], "--eta"), ([*train, "--lr", -1], "--lr"),
             ([*train, "--warmup", -1], "--warmup"), ([*train, "--log-every", 0], "--log-every"),
             ([*train, "--ckpt-every", 0], "--ckpt-every"), ([*train, "--depth", 0], "--depth"),
             ([*train, "--width", 12], "--width"), ([*train, "--val-size", -1], "--val-size"),
             ([*train, "--fid", 1], "--fid"), ([*train, "--dtype", "fp8"], "--dtype"),
             ([*sample, "--labels", trained.s.bad_label], "--labels"),
             (["--sample", "--ckpt", tmp_path / "x.pt"], "no checkpoint"),
             (["--sample", "--ckpt", tmp_path / "junk.pt"], "not a readable checkpoint"),
             (["--sample", "--ckpt", tmp_path / "other.pt"], f"not a checkpoint of {script}"),
             ([*train, "--batch-size", 999], "--batch-size"),
             ([*train, "--image-folder", tmp_path / "empty"], "--image-folder"),
             ([*train, "--image-folder", tmp_path / "a_file"], "--image-folder"),
             ([*train, "--out-dir", tmp_path / "a_file"], "--out-dir"),
             ([*train, "--config", tmp_path / "bad.json"], "--config"),
             ([*train, "--config", tmp_path / "other.json"], "--config"),
             ([*sample, "--fid", 100000, "--data-dir", trained.data], "--fid 100000"),
             ([*trained.base, "--resume", "--iters", 4], "already"),
             ([*trained.base, "--resume", "--iters", 8, "--width", 64], "does not match")]
    if not torch.cuda.is_available():
        cases.append(([*sample, "--device", "cuda"], "--device cuda"))
    config = open(os.path.join(trained.out, "config.json")).read()
    for args, expected in cases:
        assert expected in assert_bad_input(capsys, script, *args), args
    assert open(os.path.join(trained.out, "config.json")).read() == config  # failed starts
    assert not os.path.exists(tmp_path / "s")  # nothing sampled before the checks


@pytest.mark.parametrize("script", SCRIPTS)
def test_torchrun_with_two_ranks(script, tmp_path):
    """Two gloo processes: the global batch is printed once, rank 0 alone writes, each rank keeps
    its own random stream in the checkpoint."""
    folder, out = make_image_folder(str(tmp_path / "imgs")), str(tmp_path / "out")
    r = torchrun(script, 2, "--image-folder", folder, "--out-dir", out, *TINY, *SCRIPTS[script].args,
                 "--iters", 2, "--batch-size", 2, "--accum", 2, "--sample-every", 100)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("global batch 8") == 1  # 2 images x 2 micro-batches x 2 ranks
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["cpu"], ck["rng"][1]["cpu"])
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2]  # one writer


def test_fid_writes_fid_json(trained, tmp_path, monkeypatch):
    real = fid.inception_v3
    monkeypatch.setattr(fid, "inception_v3", lambda weights="download": real(None))  # offline
    assert run(trained.script, "--sample", "--ckpt", trained.ckpt, "--out-dir", tmp_path, "--fid", 10,
               "--data-dir", trained.data, "--sample-steps", 2, "--device", "cpu") == 0
    res = json.load(open(tmp_path / "fid.json"))
    assert res["num_samples"] == 10 and res["fid_score"] > 0 and res["inception_score_mean"] >= 1
    assert res["checkpoint"] == str(trained.ckpt) and res["step"] == 4 and res["reference"]
    assert res["sampler"] == "ddim" and res["steps"] == 2 and "mode" in res
    size = trained.s.size
    assert image_size(tmp_path / "real_vs_fake.png") == grid_size(10, 2, size)  # real row, fake row


@pytest.mark.parametrize("script", SCRIPTS)
def test_image_folder_sees_every_class(script, tmp_path, capsys):
    """--image-folder: its class names, a grid row each (+ unconditional), and --limit takes images
    of every class (the folder is read class by class)."""
    m = importlib.import_module(script)
    folder, out = make_image_folder(str(tmp_path / "imgs")), str(tmp_path / "out")
    args = [*base_args(script, ""), "--image-folder", folder, "--out-dir", out]
    assert run(script, *args, "--iters", 1, "--limit", 6, "--warmup", 0) == 0  # warm-up 0 trains
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["meta"]["classes"] == ["cat", "dog", "ship"]
    size = SCRIPTS[script].size
    assert image_size(os.path.join(out, "samples_1.png")) == grid_size(2, 4, size)
    data, _ = m.get_data(vars(m.get_args(args)))
    first, _ = m.split_data(data, 6, 0)
    cond = first[torch.arange(6)][1]
    assert len(set((cond.argmax(1) if cond.dim() > 1 else cond).tolist())) == 3
    with open(os.path.join(folder, "dog", "0.png"), "wb") as f:  # a damaged image: named, at start
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert "0.png" in assert_bad_input(capsys, script, *args, "--iters", 1)


def test_config_reruns_a_run(trained, tmp_path):
    """--config: a new run with the saved settings (never the saved --resume), the command line
    overriding them."""
    out = str(tmp_path / "again")
    assert run(trained.script, "--config", os.path.join(trained.out, "config.json"), "--out-dir", out,
               "--iters", 1) == 0
    a = json.load(open(os.path.join(trained.out, "config.json")))
    b = json.load(open(os.path.join(out, "config.json")))
    assert a["resume"] and not b["resume"]
    assert {k for k in a if a[k] != b[k]} == {"out_dir", "iters", "config", "resume"}


# ----------------------------------------------------------------------------- the spine and its math

SPINE = """die get_args check_args image_folder download_once split_data batches loader to_model
timestep_embedding make_betas make_alphas_cumprod q_sample p_losses eval_loss cfg_denoiser denoiser
ddim_timesteps dpmpp_timesteps ddim_sample dpmpp_sample generate sampling tracer label_conds save_grid
path_figure save_gif update_ema save_checkpoint load_checkpoint load_weights setup amp_dtype autocast
rng_states lock pid_alive new_run build_run start_run get_lr train_step log_record write_log save_run
sample_grid reconstruction train load_run sample_main fid_reference run_fid main""".split()
OWN = ["get_data", "conditions", "build_model", "loss_target", "eps_from_pred"]
BANNERS = ["config", "data", "model", "diffusion", "sampling", "EMA, checkpoints, system",
           "training", "entry points"]


def top_level(script):
    """(function name -> source text, section banners in order) of a script."""
    src = open(os.path.join(HERE, script + ".py")).read()
    functions = {n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body
                 if isinstance(n, ast.FunctionDef)}
    banners = [line.strip("# -") for line in src.splitlines() if line.startswith("# ----")]
    return functions, banners


def test_spine_is_the_same_text_in_all_five():
    """The spine functions are one text in the five files, every function the five share is spine
    or one of their own parts, and the pages have the same sections, the extras last."""
    pages = {s: top_level(s) for s in SCRIPTS}
    for name in SPINE:
        texts = {s: pages[s][0].get(name) for s in SCRIPTS}
        assert None not in texts.values(), f"{name} is missing in " + str(
            [s for s in SCRIPTS if texts[s] is None])
        differ = [s for s in SCRIPTS if texts[s] != texts["mnist_ddpm"]]
        assert not differ, f"spine function {name} differs from mnist_ddpm.py's in {differ}"
    shared = set.intersection(*(set(functions) for functions, _ in pages.values()))
    assert shared <= set(SPINE) | set(OWN), shared - set(SPINE) - set(OWN)
    assert all(set(OWN) <= set(functions) for functions, _ in pages.values())
    for script, (_, banners) in pages.items():
        assert banners[:-1] == BANNERS and "extras" in banners[-1], (script, banners)


def gaussian_eps(mu, s, alphas_cumprod):
    """The optimal noise prediction for x0 ~ N(mu, s^2 I):
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""
    def eps_fn(x, t):
        abar = alphas_cumprod[t].view(-1, *[1] * (x.dim() - 1))
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s ** 2 + 1 - abar)
    return eps_fn


def assert_moments(x, mu, s, tol=0.02):
    assert abs(x.mean().item() - mu) < tol * abs(mu), (x.mean().item(), mu)
    assert abs(x.std().item() - s) < tol * s, (x.std().item(), s)


def ddim_gaussian_std(ts, ab, s):
    """DDIM (eta=0) is first order: for Gaussian data each step scales the deviation from the mean
    by <u_prev, u_t> / |u_t|^2 with u = (sqrt(abar) s, sqrt(1 - abar)), a little less than the
    exact |u_prev| / |u_t|: its std falls short of s by about pi^2 / (8 K) (6 % at K=20), a
    property of the method, checked exactly."""
    std = 1.0
    for i, t in enumerate(ts):
        a, b = ab[t].item(), ab[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        std *= ((a * b) ** 0.5 * s * s + ((1 - a) * (1 - b)) ** 0.5) / (a * s * s + 1 - a)
    return std


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_samplers_reproduce_gaussian_data(schedule):
    """Every sampler, driven by the exact denoiser of x0 ~ N(mu, s^2), from pure noise and from a
    partial start (a reconstruction), reproduces the data's mean and standard deviation."""
    import mnist_ddpm as m  # the samplers are spine: the same text in every script
    mu, s, g = 1.0, 0.5, torch.Generator().manual_seed(0)
    ab = m.make_alphas_cumprod(schedule, 1000, "cpu")
    eps_fn, x = gaussian_eps(mu, s, ab), torch.randn((4000, 16), generator=g)
    assert_moments(m.ddim_sample(eps_fn, x, ab, list(range(999, -1, -1)), 1.0, g), mu, s)  # ddpm
    for steps in (20, 50):
        assert_moments(m.dpmpp_sample(eps_fn, x, ab, m.dpmpp_timesteps(ab, 999, steps)), mu, s)
        ts = m.ddim_timesteps(999, steps)
        out = m.ddim_sample(eps_fn, x, ab, ts, 0.0)
        assert_moments(out, mu, ddim_gaussian_std(ts, ab, s), tol=0.01)
        assert abs(out.mean().item() - mu) < 0.02 * mu
    x0 = mu + s * torch.randn((4000, 16), generator=g)
    xt = m.q_sample(x0, torch.full((4000,), 400), torch.randn(x0.shape, generator=g), ab)
    assert_moments(m.ddim_sample(eps_fn, xt, ab, list(range(400, -1, -1)), 1.0, g), mu, s)
    assert_moments(m.dpmpp_sample(eps_fn, xt, ab, m.dpmpp_timesteps(ab, 400, 50)), mu, s)


@pytest.mark.parametrize("T", [10, 20, 1000])
def test_schedules_stay_in_range(T):
    import mnist_ddpm as m
    for name in ("linear", "cosine", "sigmoid"):
        ab = m.make_alphas_cumprod(name, T, "cpu")
        assert (ab[1:] < ab[:-1]).all() and (ab > 0).all() and ab[0] < 1 and ab[-1] < 2e-3, name
    f = lambda u: torch.cos((u / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2
    t = torch.tensor([0.0, 250, 500, 999])
    ab = m.make_alphas_cumprod("cosine", 1000, "cpu")
    assert torch.allclose(ab[t.long()], (f(t + 1) / f(torch.tensor(0.0))).float(), rtol=1e-4)


def test_denoiser_guides_and_clips():
    """Guidance is eps_u + w (eps_c - eps_u) in one doubled batch (rows to drop stay
    unconditional), and the implied clean image is clipped: near t = T an eps error of 0.01 would
    otherwise reach the samples multiplied by 1/sqrt(abar)."""
    import mnist_ddpm as m
    calls = []

    def model(x, t, y, drop):  # eps_u = 1, eps_c = 0
        calls.append(drop.tolist())
        return torch.ones_like(x) * drop.view(-1, 1, 1, 1)
    y, drop = torch.tensor([3, 7]), torch.tensor([False, True])
    pred = m.cfg_denoiser(model, y, drop, 6.0)(torch.zeros(2, 1, 2, 2), torch.zeros(2).long())
    assert calls == [[False, True, True, True]]
    assert torch.equal(pred[:, 0, 0, 0], torch.tensor([1 - 6.0, 1.0]))
    ab = m.make_alphas_cumprod("cosine", 1000, "cpu")
    exact = gaussian_eps(0.0, 0.3, ab)
    x = torch.randn((500, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    noisy = m.ddim_sample(lambda x, t: exact(x, t) + 0.01, x, ab, m.ddim_timesteps(999, 25))
    assert noisy.abs().max() > 3
    clipped = m.denoiser(lambda x, t, y, d: exact(x, t) + 0.01, y[:1].expand(500), drop[:1].expand(500),
                         1.0, ab)
    for out in (m.ddim_sample(clipped, x, ab, m.ddim_timesteps(999, 25)),
                m.dpmpp_sample(clipped, x, ab, m.dpmpp_timesteps(ab, 999, 25))):
        assert out.abs().max() <= 1 and abs(out.std().item() - 0.3) < 0.04


# ----------------------------------------------------------------------------- nothing lost, no traceback

def poison(m, monkeypatch, call, value):
    """From training call `call` of the script's p_losses on, add `value(loss)` to the loss."""
    calls, p_losses = [], m.p_losses

    def poisoned(*args, **kwargs):
        loss = p_losses(*args, **kwargs)
        calls.append(torch.is_grad_enabled())  # validation runs without gradients
        return loss + value(loss) if calls.count(True) >= call else loss
    monkeypatch.setattr(m, "p_losses", poisoned)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_non_finite_update_is_never_saved(script, data_dir, tmp_path, monkeypatch):
    """A finite loss with non-finite gradients (loss + sqrt(|0 * loss|)) on the last step, a save
    step: the run stops, ckpt.pt stays the finite one of step 2."""
    m, out = importlib.import_module(script), str(tmp_path)
    args = [*base_args(script, data_dir(script)), "--out-dir", out, "--ckpt-every", 2,
            "--log-every", 100, "--sample-every", 100]
    assert run(script, *args, "--iters", 2) == 0
    poison(m, monkeypatch, 1, lambda loss: (0 * loss).abs().sqrt())
    assert run(script, *args, "--iters", 3, "--resume") == 1
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 2 and all(v.isfinite().all() for v in ck["model"].values())
    assert not os.path.exists(os.path.join(out, "lock"))


@pytest.mark.parametrize("dtype,status", [("fp32", 1), ("fp16", 0)])
def test_a_non_finite_loss_stops_fp32_but_is_skipped_under_fp16(dtype, status, data_dir, tmp_path,
                                                                monkeypatch):
    import mnist_ddpm as m
    poison(m, monkeypatch, 2, lambda loss: torch.where(torch.rand(()) < 2, torch.inf, 0.0))
    args = [*base_args("mnist_ddpm", data_dir("mnist_ddpm")), "--out-dir", tmp_path, "--iters", 2,
            "--dtype", dtype]
    assert run("mnist_ddpm", *args) == status
    if dtype == "fp16":  # the scaler skipped the step and counted it
        assert [r.get("skipped") for r in read_log(tmp_path)] == [0, 1]


def test_a_second_run_on_the_folder_is_refused(data_dir, tmp_path, capsys):
    """A lock names the run holding --out-dir; a dead process's lock is taken over."""
    args = [*base_args("mnist_ddpm", data_dir("mnist_ddpm")), "--out-dir", tmp_path, "--iters", 1]
    (tmp_path / "lock").write_text(f"{os.uname().nodename} {os.getpid()}\n")  # alive: this process
    assert "in use by process" in assert_bad_input(capsys, "mnist_ddpm", *args)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "lock").write_text(f"{os.uname().nodename} {dead}\n")
    assert run("mnist_ddpm", *args) == 0 and not os.path.exists(tmp_path / "lock")


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_log_reads_as_one_run_after_a_crash(script, data_dir, tmp_path):
    """A crash after step 3 with the last checkpoint at step 2 (here: ckpt_2.pt put back as
    ckpt.pt): --resume trains steps 3 and 4 again, and log.jsonl has each step once. Periodic
    checkpoints need not be a multiple of --ckpt-every."""
    out = str(tmp_path)
    args = [*base_args(script, data_dir(script)), "--out-dir", out, "--ckpt-every", 3,
            "--save-every", 2, "--sample-every", 100]
    assert run(script, *args, "--iters", 3) == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_")) == ["ckpt_2.pt"]
    shutil.copy(os.path.join(out, "ckpt_2.pt"), os.path.join(out, "ckpt.pt"))
    assert run(script, *args, "--iters", 4, "--resume") == 0
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4]


def test_a_full_disk_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    import mnist_ddpm as m
    args = [*base_args("mnist_ddpm", data_dir("mnist_ddpm")), "--out-dir", tmp_path,
            "--sample-every", 100]
    assert run("mnist_ddpm", *args, "--iters", 2) == 0

    def full(state, path):  # what torch.save does on a full disk: a partial file, then this
        open(path, "wb").write(b"PK\3\4 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(m.torch, "save", full)
    capsys.readouterr()
    assert run("mnist_ddpm", *args, "--iters", 4, "--resume") == 1
    assert "no space left on the device" in capsys.readouterr().err
    monkeypatch.undo()
    assert load(tmp_path / "ckpt.pt")["step"] == 2 and not list(tmp_path.glob("*.tmp"))


def test_torchrun_bad_flag_and_sampling(data_dir, tmp_path):
    """Under torchrun a bad flag is one line from each rank (before the process group starts), and
    --sample writes its files from rank 0 only."""
    r = torchrun("mnist_ddpm", 2, "--steps", 0)
    assert r.stderr.count("error: --steps 0: must be > 0") == 2 and r.returncode != 0
    assert "exitcode  : 2" in r.stderr and "mnist_ddpm.py\", line" not in r.stderr
    out = str(tmp_path / "out")
    assert run("mnist_ddpm", *base_args("mnist_ddpm", data_dir("mnist_ddpm")), "--out-dir", out,
               "--iters", 1) == 0
    r = torchrun("mnist_ddpm", 2, "--sample", "--out-dir", out, "--per-label", 1, "--device", "cpu")
    assert r.returncode == 0 and r.stdout.count("wrote 11 samples") == 1, r.stderr[-2000:]


def test_download_once_per_machine(monkeypatch):
    """Local rank 0 downloads, then meets the others at a barrier; they read after it."""
    import mnist_ddpm as m
    events = []
    monkeypatch.setattr(m.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(m.dist, "barrier", lambda: events.append("barrier"))
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        m.download_once(lambda: events.append(f"fetch {rank}"), "")
    assert events == ["fetch 0", "barrier", "barrier", "fetch 1"]


# ----------------------------------------------------------------------------- every device

def test_autocast_dtype_by_device(monkeypatch):
    """bf16 where the GPU computes in bf16 (compute capability 8.0 on), fp16 with loss scaling on
    older GPUs (T4: 7.5), fp32 on CPU and MPS unless asked."""
    import mnist_ddpm as m
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for capability, expected in (((7, 5), torch.float16), ((8, 0), torch.bfloat16)):
        monkeypatch.setattr(m.torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert m.amp_dtype("auto", cuda) is expected and m.amp_dtype("fp32", cuda) is None
    assert m.amp_dtype("auto", cpu) is None and m.amp_dtype("auto", torch.device("mps")) is None
    assert m.amp_dtype("fp16", cpu) is torch.float16 and m.amp_dtype("bf16", cpu) is torch.bfloat16


def test_fp16_with_loss_scaling_resumes_exactly(data_dir, tmp_path):
    """--dtype fp16 on the CPU (slow there: one script; the code is spine): autocast and the
    gradient scaler, whose state --resume restores."""
    script = "mnist_ddpm"
    base = [*base_args(script, data_dir(script)), "--dtype", "fp16", "--sample-every", 100,
            "--ckpt-every", 2]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(script, *base, "--out-dir", a, "--iters", 2) == 0
    assert run(script, *base, "--out-dir", a, "--iters", 3, "--resume") == 0
    assert run(script, *base, "--out-dir", b, "--iters", 3) == 0
    ca, cb = load(os.path.join(a, "ckpt.pt")), load(os.path.join(b, "ckpt.pt"))
    assert same_weights(ca["model"], cb["model"]) and same_weights(ca["ema"], cb["ema"])
    assert ca["scaler"]["scale"] == cb["scaler"]["scale"] and ca["scaler"]["_growth_tracker"] > 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["auto", "fp16", "bf16"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_trains_resumes_samples_and_measures(script, dtype, data_dir, tmp_path, monkeypatch):
    """On a GPU, with each autocast dtype it computes in: train, resume (the CPU and GPU random
    streams restored: equal to a straight run up to the GPU's non-deterministic sums), every
    sampler, --fid with stand-in Inception weights."""
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    base = [*base_args(script, data_dir(script)), "--device", "cuda", "--dtype", dtype,
            "--sample-every", 100, "--ckpt-every", 2, "--lr", "1e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(script, *base, "--out-dir", a, "--iters", 2) == 0
    assert run(script, *base, "--out-dir", a, "--iters", 3, "--resume") == 0
    assert run(script, *base, "--out-dir", b, "--iters", 3) == 0
    ca, cb = load(a / "ckpt.pt"), load(b / "ckpt.pt")
    assert "cuda" in ca["rng"][0] and ca["scaler"] == cb["scaler"]
    for k in ca["model"]:  # another noise stream would differ by about the learning rate, 1e-3
        assert torch.allclose(ca["model"][k].float(), cb["model"][k].float(), atol=1e-5), k
    for sampler in ("ddpm", "ddim", "dpmpp"):
        assert run(script, "--sample", "--ckpt", a / "ckpt.pt", "--out-dir", tmp_path / sampler,
                   "--sampler", sampler, "--device", "cuda", "--dtype", dtype) == 0
        assert os.path.isfile(tmp_path / sampler / "samples.png")
    real = fid.inception_v3
    monkeypatch.setattr(fid, "inception_v3", lambda weights="download": real(None))
    assert run(script, "--sample", "--ckpt", a / "ckpt.pt", "--out-dir", tmp_path / "fid",
               "--fid", 10, "--data-dir", data_dir(script), "--device", "cuda") == 0
    assert json.load(open(tmp_path / "fid" / "fid.json"))["fid_score"] > 0


@pytest.mark.gpu
@needs_cuda
def test_gpu_compile_and_two_gpus(data_dir, tmp_path):
    """--compile trains; with two GPUs, torchrun trains on both (NCCL)."""
    base = [*base_args("mnist_ddpm", data_dir("mnist_ddpm")), "--device", "cuda",
            "--sample-every", 100]
    assert run("mnist_ddpm", *base, "--out-dir", tmp_path / "c", "--iters", 2, "--compile") == 0
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU: torchrun on two is not tried")
    r = torchrun("mnist_ddpm", 2, *base, "--out-dir", tmp_path / "d", "--iters", 2)
    assert r.returncode == 0 and r.stdout.count("global batch 8") == 1, r.stderr[-3000:]
