"""Tests of the collection: offline, on a CPU, on data generated here in the real on-disk formats.

    pytest test_smoke.py            # everything this machine can run (GPU tests skip without CUDA)
    pytest test_smoke.py -m gpu     # only the GPU tests, on a machine with CUDA

One table, SCRIPTS, says what differs between the five scripts; the tests of what every script
promises run over it. Then the spine and its math, a section per script, fid.py and bench.py.
"""
import ast
import errno
import importlib
import json
import os
import pickle
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision
from PIL import Image

import fid

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--width", "32", "--depth", "1", "--batch-size", "4", "--steps", "10", "--log-every", "1",
        "--sample-steps", "3", "--per-label", "2", "--device", "cpu", "--lr", "1e-3",
        "--warmup", "1"]


# ------------------------------------------------------------------------ data in the real formats

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
                f.write(struct.pack(f">BBBB{a.ndim}I", 0, 0, 8, a.ndim, *a.shape))
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
            pickle.dump({"data": xs.transpose(0, 3, 1, 2).reshape(len(xs), -1),
                         "labels": ys.tolist()}, f)
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
    """CelebA's layout: celeba/img_align_celeba/<6 digits>.jpg (178x218 as the real crops), and
    celeba/list_attr_celeba.txt (count, 40 names, rows of 1/-1); `rows` replaces the rows."""
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
    """Generated CIFAR-10 and STL-10 files: torchvision's md5 checks become "the files exist"."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("torchvision.datasets.cifar.check_integrity",
                   lambda path, md5=None: os.path.isfile(path))
        mp.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
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
    "stl10_vpred_clip": SimpleNamespace(data=make_stl10, size=32, channels=3, rows=11, files=[],
                                        args=["--batch-size", "2", "--diag-every", "0",
                                              "--size", "32"],
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


def torchrun(script, nproc, *args, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(HERE, script + ".py"), *map(str, args)]
    return subprocess.run(cmd, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                          timeout=300, capture_output=True, text=True)


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
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4]  # not restarted
    ck = load(trained.ckpt)
    assert {"script", "model", "ema", "opt", "scaler", "step", "config", "meta", "rng", "best_val",
            "extras"} <= ck.keys() and ck["script"] == trained.script and ck["step"] == 4
    assert ck["meta"]["size"] == s.size and ck["meta"]["channels"] == s.channels
    assert image_size(os.path.join(out, "samples_4.png")) == grid_size(2, s.rows, s.size)
    assert image_size(os.path.join(out, "reverse.png")) == grid_size(3, s.rows, s.size)  # 3 steps
    assert image_size(os.path.join(out, "reconstruction.png")) == grid_size(9, 8, s.size)
    assert json.load(open(os.path.join(out, "config.json")))["iters"] == 4


def test_resume_equals_a_straight_run_and_config_reruns_it(trained, tmp_path):
    """--resume ends as a straight run does; --config: a new run with the saved settings (never
    the saved --resume), the command line overriding them."""
    out, again = str(tmp_path / "straight"), str(tmp_path / "again")
    assert run(trained.script, *trained.base, "--out-dir", out, "--iters", 4) == 0
    a, b = load(os.path.join(out, "ckpt.pt")), load(trained.ckpt)
    assert same_weights(a["model"], b["model"]) and same_weights(a["ema"], b["ema"])
    assert [r.get("loss") for r in read_log(out)] == [r.get("loss") for r in read_log(trained.out)]
    config = os.path.join(trained.out, "config.json")
    assert run(trained.script, "--config", config, "--out-dir", again, "--iters", 1) == 0
    a, b = json.load(open(config)), json.load(open(os.path.join(again, "config.json")))
    assert a["resume"] and not b["resume"]
    assert {k for k in a if a[k] != b[k]} == {"out_dir", "iters", "config", "resume"}


@pytest.mark.parametrize("sampler,steps", [("ddpm", 10), ("ddim", 3), ("dpmpp", 3)])
def test_sample_with_each_sampler(trained, tmp_path, sampler, steps):
    s = trained.s
    assert run(trained.script, "--sample", "--ckpt", trained.ckpt, "--out-dir", tmp_path, "--gif",
               "--sampler", sampler, "--sample-steps", 3, "--cfg", 3, "--per-label", 2,
               "--device", "cpu", *s.args) == 0
    assert image_size(tmp_path / "samples.png") == grid_size(2, s.rows, s.size)
    with Image.open(tmp_path / "denoise.gif") as gif:  # a frame per step; ddpm walks all T=10
        assert gif.n_frames == steps
        assert gif.size == grid_size(2, s.rows, s.size)
    assert image_size(tmp_path / "reverse.png") == grid_size(steps, s.rows, s.size)  # <= 10 columns


def test_bad_input_is_one_line(trained, capsys, tmp_path):
    """The collection's and the attack's bad inputs: one line naming the flag or file, exit status
    2, and a failed start leaves the run as it was."""
    script, ckpt = trained.script, trained.ckpt
    sample = ["--sample", "--ckpt", ckpt, "--out-dir", tmp_path / "s", "--device", "cpu"]
    train = [*base_args(script, trained.data), "--out-dir", tmp_path / "o", "--iters", 1]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"script": "another"}, tmp_path / "other.pt")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"width": None, "no_such_setting": 1}))
    (tmp_path / "a_file").write_text("")
    os.makedirs(tmp_path / "empty" / "a")
    os.makedirs(tmp_path / "linked")
    os.symlink(tmp_path / "a_file", tmp_path / "linked" / "log.jsonl")  # a write would leave
    torch.save(dict(load(ckpt), predicts="x0"), tmp_path / "x0.pt")  # the script predicted x0
    cases = [([*train, flag, value], flag) for flag, value in [  # each names its flag
        ("--lr", -1), ("--warmup", -1), ("--log-every", 0), ("--ckpt-every", 0), ("--depth", 0),
        ("--width", 12), ("--val-size", -1), ("--fid", 1), ("--dtype", "fp8"),
        ("--batch-size", 999), ("--image-folder", tmp_path / "empty"),
        ("--image-folder", tmp_path / "a_file"), ("--out-dir", tmp_path / "a_file"),
        ("--config", tmp_path / "bad.json"), ("--config", tmp_path / "other.json")]]
    cases += [(["--steps", 0], "--steps"), ([*sample, "--cfg", -1], "--cfg"),
              ([*sample, "--eta", 1.5], "--eta"), ([*sample, "--cfg", "inf"], "--cfg inf"),
              ([*train, "--min-snr", 5, "--loss", "l1"], "--min-snr 5.0: must be 0 with --loss"),
              ([*train, "--lr", "inf"], "--lr inf"),
              ([*train, "--steps", 1, "--schedule", "linear"], "--steps 1: must be enough"),
              ([*train, "--out-dir", tmp_path / "linked"], "symbolic link"),
              ([*sample, "--labels", trained.s.bad_label], "--labels"),
              (["--sample", "--ckpt", tmp_path / "x.pt"], "no checkpoint"),
              (["--sample", "--ckpt", tmp_path / "junk.pt"], "not a readable checkpoint"),
              (["--sample", "--ckpt", tmp_path / "other.pt"], f"not a checkpoint of {script}"),
              ([*sample, "--fid", 100000, "--data-dir", trained.data], "--fid 100000"),
              ([*trained.base, "--resume", "--iters", 4], "already"),
              ([*trained.base, "--resume", "--iters", 8, "--width", 64], "--width 64 is not"),
              ([*trained.base, "--resume", "--iters", 8, "--config", tmp_path / "bad.json"],
               "unset with --resume"), ([*sample, "--ckpt", tmp_path / "x0.pt"], "predicts x0")]
    if not torch.cuda.is_available():
        cases.append(([*sample, "--device", "cuda"], "--device cuda"))
    with pytest.raises(SystemExit):  # --help speaks of this script's model only
        importlib.import_module(script).get_args(["--help"])
    assert ("U-Net" if script == "cifar_dit_ddp" else "DiT") not in capsys.readouterr().out
    config = open(os.path.join(trained.out, "config.json")).read()
    for args, expected in cases:
        assert expected in assert_bad_input(capsys, script, *args), args
    assert open(os.path.join(trained.out, "config.json")).read() == config  # failed starts
    assert not os.path.exists(tmp_path / "s")  # nothing sampled before the checks


@pytest.mark.parametrize("script", SCRIPTS)
def test_torchrun_with_two_ranks(script, tmp_path):
    """Two gloo processes, 2 micro-batches a step: the global batch printed once, rank 0 alone
    writes, each rank's random stream kept, and both ranks end with the weights rank 0 saved."""
    folder, out, ranks = make_image_folder(str(tmp_path / "imgs")), tmp_path / "out", tmp_path / "r"
    (tmp_path / "ranks.py").write_text(textwrap.dedent(f"""\
        import os, sys, torch
        sys.path.insert(0, {HERE!r})
        import {script} as m
        train = m.train

        def train_and_keep(*args):  # each rank keeps its weights
            run = train(*args)
            os.makedirs({str(ranks)!r}, exist_ok=True)
            torch.save(run.model.state_dict(), os.path.join({str(ranks)!r}, os.environ["RANK"]))
            return run
        m.train = train_and_keep
        m.main(sys.argv[1:])
        """))
    preset = ["--preset", "cpu", "--width", 48] if script == "cifar_dit_ddp" else []  # 6 heads
    r = torchrun(str(tmp_path / "ranks"), 2, "--image-folder", folder, "--out-dir", out, *TINY,
                 *SCRIPTS[script].args, *preset, "--iters", 2, "--batch-size", 2, "--accum", 2,
                 "--sample-every", 100)  # the DiT: its CPU command, tiny
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("global batch 8") == 1  # 2 images x 2 micro-batches x 2 ranks
    ck = load(out / "ckpt.pt")
    assert ck["step"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["cpu"], ck["rng"][1]["cpu"])
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2]  # one writer
    rank0 = load(ranks / "0")
    assert same_weights(rank0, load(ranks / "1")) and same_weights(ck["model"], rank0)


def test_fid_writes_fid_json(trained, tmp_path, monkeypatch):
    """--fid from a checkpoint written before --size and --min-snr existed: settings newer than
    the checkpoint come from the command line."""
    real, ckpt, s = fid.inception_v3, tmp_path / "older.pt", trained.s
    monkeypatch.setattr(fid, "inception_v3", lambda weights="download": real(None))  # offline
    ck = load(trained.ckpt)
    for key in ("size", "min_snr"):
        ck["config"].pop(key, None)
    torch.save(ck, ckpt)
    assert run(trained.script, "--sample", "--ckpt", ckpt, "--out-dir", tmp_path, "--fid", 10,
               "--data-dir", trained.data, "--sample-steps", 2, "--device", "cpu", *s.args) == 0
    res = json.load(open(tmp_path / "fid.json"))
    assert res["num_samples"] == 10 and res["fid_score"] > 0 and res["inception_score_mean"] >= 1
    assert res["checkpoint"] == str(ckpt) and res["step"] == 4 and res["reference"]
    sampler = importlib.import_module(trained.script).DEFAULTS["sampler"]
    assert res["sampler"] == sampler and res["steps"] == 2 and "mode" in res
    assert image_size(tmp_path / "real_vs_fake.png") == grid_size(10, 2, s.size)  # real, fake rows


@pytest.mark.parametrize("script", SCRIPTS)
def test_image_folder_sees_every_class(script, tmp_path, capsys):
    """--image-folder: its class names, a grid row each (+ unconditional), and --limit takes images
    of every class (the folder is read class by class)."""
    m = importlib.import_module(script)
    folder, out = make_image_folder(str(tmp_path / "imgs")), str(tmp_path / "out")
    args = [*base_args(script, ""), "--image-folder", folder, "--out-dir", out]
    assert run(script, *args, "--iters", 1, "--limit", 6, "--warmup", 0) == 0  # warm-up 0 trains
    assert load(os.path.join(out, "ckpt.pt"))["meta"]["classes"] == ["cat", "dog", "ship"]
    assert image_size(os.path.join(out, "samples_1.png")) == grid_size(2, 4, SCRIPTS[script].size)
    data, _ = m.get_data(vars(m.get_args(args)))
    first, _ = m.split_data(data, 6, 0)
    cond = first[torch.arange(6)][1]
    assert len(set((cond.argmax(1) if cond.dim() > 1 else cond).tolist())) == 3
    with open(os.path.join(folder, "dog", "0.png"), "wb") as f:  # a damaged image: named, at start
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert "0.png" in assert_bad_input(capsys, script, *args, "--iters", 1, "--overwrite")


# ------------------------------------------------------------------------ the spine and its math

SPINE = """die get_args saved_settings fits fill_in check_args image_folder picture download_once
split_data batches loader to_model timestep_embedding make_betas make_alphas_cumprod q_sample
p_losses eval_loss cfg_denoiser denoiser ddim_timesteps dpmpp_timesteps ddim_sample dpmpp_sample
generate sampling tracer label_conds save_grid path_figure save_gif update_ema save_checkpoint
load_checkpoint load_weights setup amp_dtype autocast rng_states lock unlock new_run build_run
begin start_run get_lr train_step log_record write_log save_run sample_grid reconstruction train
load_run sample_main fid_reference run_fid main""".split()
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
    """Guidance is eps_u + w (eps_c - eps_u) in one doubled batch (dropped rows unconditional) that
    a CPU takes `rows` at a time (a bigger batch outgrows its caches), and the implied clean image
    is clipped: near t = T an eps error grows by 1/sqrt(abar)."""
    import mnist_ddpm as m
    calls = []

    def model(x, t, y, drop):  # eps_u = 1, eps_c = 0
        calls.append(drop.tolist())
        return torch.ones_like(x) * drop.view(-1, 1, 1, 1)
    y, drop = torch.tensor([3, 7]), torch.tensor([False, True])
    pred = m.cfg_denoiser(model, y, drop, 6.0, rows=3)(torch.zeros(2, 1, 2, 2), torch.zeros(2))
    assert calls == [[False, True, True], [True]]
    assert torch.equal(pred[:, 0, 0, 0], torch.tensor([1 - 6.0, 1.0]))
    ab = m.make_alphas_cumprod("cosine", 1000, "cpu")
    exact = gaussian_eps(0.0, 0.3, ab)
    x = torch.randn((500, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    noisy = m.ddim_sample(lambda x, t: exact(x, t) + 0.01, x, ab, m.ddim_timesteps(999, 25))
    assert noisy.abs().max() > 3
    clipped = m.denoiser(lambda x, t, y, d: exact(x, t) + 0.01, y[:1].expand(500),
                         drop[:1].expand(500), 1.0, ab)
    for out in (m.ddim_sample(clipped, x, ab, m.ddim_timesteps(999, 25)),
                m.dpmpp_sample(clipped, x, ab, m.dpmpp_timesteps(ab, 999, 25))):
        assert out.abs().max() <= 1 and abs(out.std().item() - 0.3) < 0.04


@pytest.mark.parametrize("script", ["mnist_ddpm", "stl10_vpred_clip"])  # eps and v targets
def test_min_snr_weights_the_x0_error(script):
    """--min-snr gamma: whatever the network predicts, the loss is the mean of min(snr, gamma)
    |x0 - x0_hat|^2, x0_hat the clean image its prediction implies (Hang et al. 2023)."""
    m, g = importlib.import_module(script), torch.Generator().manual_seed(0)
    ab = m.make_alphas_cumprod("cosine", 1000, "cpu")
    x0, noise, pred = torch.randn((3, 64, 1, 2, 2), generator=g)
    t = torch.arange(0, 1000, 1000 // 64)[:64]
    abar, xt = ab[t].view(-1, 1, 1, 1), m.q_sample(x0, t, noise, ab)
    x0_hat = (xt - (1 - abar).sqrt() * m.eps_from_pred(pred, xt, abar)) / abar.sqrt()
    drop = torch.zeros(64, dtype=torch.bool)
    for gamma in (1.0, 5.0):
        loss = m.p_losses(lambda *a: pred, x0, None, ab, 0, "mse", gamma, t, noise, drop)
        weight = (abar / (1 - abar)).clamp(max=gamma)
        assert torch.allclose(loss, (weight * (x0 - x0_hat) ** 2).mean(), rtol=1e-4)
    plain = m.p_losses(lambda *a: pred, x0, None, ab, 0, "mse", 0.0, t, noise, drop)
    assert torch.allclose(plain, (pred - m.loss_target(x0, noise, abar)).square().mean())


# -------------------------------------------------------------------- nothing lost, no traceback

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


def test_a_run_never_replaces_another_runs_files(data_dir, tmp_path, capsys):
    """The OS lock refuses a second run; an unheld lock file is free. A new run where a run is needs
    --resume or --overwrite; --config carries settings (unknown: a warning); --keep removes this
    run's ckpt_<step>.pt only. --resume: the checkpoint's settings, an older one's with today's."""
    import mnist_ddpm as m
    args = [*base_args("mnist_ddpm", data_dir("mnist_ddpm")), "--out-dir", tmp_path,
            "--sample-every", 100]
    held = m.lock(str(tmp_path), True)  # as another run holds it
    assert "in use by another run" in assert_bad_input(capsys, "mnist_ddpm", *args, "--iters", 1)
    m.unlock(held)
    (tmp_path / "lock").write_text("a container that is gone\n")
    for name in ("ckpt_100.pt", "ckpt_final.pt"):  # not this run's
        (tmp_path / name).write_text("someone's")
    assert run("mnist_ddpm", *args, "--iters", 3, "--save-every", 1, "--keep", 1) == 0
    assert sorted(f.name for f in tmp_path.glob("ckpt_*")) == ["ckpt_100.pt", "ckpt_3.pt",
                                                                "ckpt_final.pt"]
    assert not os.path.exists(tmp_path / "lock")
    assert "--resume" in assert_bad_input(capsys, "mnist_ddpm", *args, "--iters", 1)
    assert load(tmp_path / "ckpt.pt")["step"] == 3 and len(read_log(tmp_path)) == 3
    config = json.load(open(tmp_path / "config.json"))
    (tmp_path / "old.json").write_text(json.dumps(dict(config, retired_flag=1)))
    again = m.get_args(["--config", str(tmp_path / "old.json")])
    assert (again.out_dir, again.iters, again.keep) == ("out/mnist_ddpm", 3, 1)
    assert "retired_flag" in capsys.readouterr().err
    assert run("mnist_ddpm", *args, "--iters", 2, "--overwrite", "--schedule", "linear",
               "--lr", "2e-3") == 0
    resume = ["--out-dir", tmp_path, "--device", "cpu", "--resume", "--iters", 3]
    assert "--schedule cosine is not the run's linear" in assert_bad_input(
        capsys, "mnist_ddpm", *resume, "--schedule", "cosine")
    ck = load(tmp_path / "ckpt.pt")
    torch.save(dict(ck, rng=ck["rng"] * 2), tmp_path / "ckpt.pt")
    assert "by 2 processes, not 1" in assert_bad_input(capsys, "mnist_ddpm", *resume)
    del ck["config"]["min_snr"]
    torch.save(ck, tmp_path / "ckpt.pt")
    assert run("mnist_ddpm", *resume) == 0
    assert "has no min_snr: today's values" in capsys.readouterr().err
    config = json.load(open(tmp_path / "config.json"))
    assert (config["schedule"], config["lr"], config["iters"]) == ("linear", 2e-3, 3)


def test_image_folder_reads_every_mode_and_skips_hidden_files(tmp_path, capsys, monkeypatch):
    """16-bit grey scaled, not clipped; transparency over white; CMYK, animations as they look;
    hidden files and folders skipped; a float image or a decompression bomb: one line, the file."""
    import mnist_ddpm as m
    root = tmp_path / "imgs"
    for folder in ("a", "b", ".ipynb_checkpoints"):
        os.makedirs(root / folder)
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(root / "a" / "deep.png")  # I;16
    Image.new("LA", (8, 8), (0, 0)).save(root / "a" / "clear.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(root / "b" / "cmyk.jpg")
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(root / "b" / "anim.png", save_all=True, append_images=frames[1:])
    (root / "b" / "._anim.png").write_bytes(b"\0\5\26\7")  # macOS's resource fork
    Image.new("L", (8, 8)).save(root / ".ipynb_checkpoints" / "x.png")
    images, labels, classes = m.image_folder(str(root), 8, 3)
    assert classes == ["a", "b"] and sorted(labels.tolist()) == [0, 0, 1, 1]
    assert sorted(images[:, :, 0, 0].tolist()) == [[116] * 3, [255, 0, 0], [255] * 3, [255] * 3]
    assert "2 hidden files and folders skipped" in capsys.readouterr().out
    args = [*base_args("mnist_ddpm", ""), "--image-folder", root, "--out-dir", tmp_path / "o"]
    Image.fromarray(np.ones((8, 8), np.float32)).save(root / "b" / "float.tiff")
    assert "float.tiff" in assert_bad_input(capsys, "mnist_ddpm", *args)
    os.remove(root / "b" / "float.tiff")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8 x 8 pixels > 2 x 10: a bomb
    assert "DecompressionBombError" in assert_bad_input(capsys, "mnist_ddpm", *args)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_log_reads_as_one_run_after_a_crash(script, data_dir, tmp_path):
    """A crash after step 3, the last checkpoint at step 2 (ckpt_2.pt put back): --resume trains
    steps 3 and 4 again, logged once each. Periodic checkpoints need not divide --ckpt-every."""
    out = str(tmp_path)
    args = [*base_args(script, data_dir(script)), "--out-dir", out, "--ckpt-every", 3,
            "--save-every", 2, "--sample-every", 100]
    assert run(script, *args, "--iters", 3) == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_")) == ["ckpt_2.pt"]
    shutil.copy(os.path.join(out, "ckpt_2.pt"), os.path.join(out, "ckpt.pt"))
    assert run(script, *args, "--iters", 4, "--resume") == 0
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4]


def test_a_full_disk_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    """A full disk while saving, a read-only one while logging: one line, ckpt.pt of step 2 stays,
    no temporary file or lock is left. A checkpoint is on the disk before it replaces the last."""
    import mnist_ddpm as m
    args = [*base_args("mnist_ddpm", data_dir("mnist_ddpm")), "--out-dir", tmp_path,
            "--sample-every", 100]
    assert run("mnist_ddpm", *args, "--iters", 2) == 0

    def full(state, f):  # what torch.save does on a full disk: part of the file, then this
        f.write(b"PK\3\4 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(m.torch, "save", full)
    capsys.readouterr()
    assert run("mnist_ddpm", *args, "--iters", 4, "--resume") == 1
    assert "no space left on the device" in capsys.readouterr().err

    def read_only(rec, run):  # what a write raises on a disk remounted read-only
        raise OSError(errno.EROFS, "Read-only file system", "log.jsonl")
    monkeypatch.setattr(m, "write_log", read_only)
    assert run("mnist_ddpm", *args, "--iters", 4, "--resume") == 1
    assert "error: [Errno 30] Read-only file system: 'log.jsonl'" in capsys.readouterr().err
    monkeypatch.undo()
    assert load(tmp_path / "ckpt.pt")["step"] == 2 and not list(tmp_path.glob("*.tmp"))
    assert not os.path.exists(tmp_path / "lock")
    (tmp_path / "ckpt.pt.tmp").mkdir()  # another writer's temporary name
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or replace(a, b))
    m.save_checkpoint(str(tmp_path / "ckpt.pt"), {"step": 5})
    assert events == ["fsync", "replace", "fsync"] and load(tmp_path / "ckpt.pt")["step"] == 5


def test_torchrun_bad_flag_and_sampling(data_dir, tmp_path):
    """Under torchrun a bad flag is one line, no traceback; --sample writes from rank 0 only. Ranks
    started without torchrun (as by a cluster scheduler): rank 0 finds --out-dir in use, and both
    stop at once with its line (not rank 1 in a collective until a timeout, or a traceback)."""
    import mnist_ddpm as m
    r = torchrun("mnist_ddpm", 2, "--steps", 0)
    assert r.stderr.count("error: --steps 0: must be > 0") >= 1 and r.returncode != 0
    assert "exitcode  : 2" in r.stderr and "mnist_ddpm.py\", line" not in r.stderr
    out, args = str(tmp_path / "out"), base_args("mnist_ddpm", data_dir("mnist_ddpm"))
    assert run("mnist_ddpm", *args, "--out-dir", out, "--iters", 1) == 0
    r = torchrun("mnist_ddpm", 2, "--sample", "--out-dir", out, "--per-label", 1, "--device", "cpu")
    assert r.returncode == 0 and r.stdout.count("wrote 11 samples") == 1, r.stderr[-2000:]
    held = m.lock(str(tmp_path / "locked"), True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]),
                   WORLD_SIZE="2", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(HERE, "mnist_ddpm.py"), *args, "--out-dir", held.name[:-5],
           "--iters", "1"]
    ranks = [subprocess.Popen(cmd, env=dict(env, RANK=r, LOCAL_RANK=r), stderr=subprocess.PIPE,
                              text=True) for r in "01"]
    errs = [p.communicate(timeout=120)[1].strip() for p in ranks]
    m.unlock(held)
    assert [p.returncode for p in ranks] == [2, 2]
    assert errs[0] == errs[1] and errs[0].startswith("error: --out-dir") and "\n" not in errs[0]


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
    """On a GPU, each autocast dtype it computes in: train, resume (equal to a straight run up to
    the GPU's non-deterministic sums), every sampler, --fid with stand-in Inception weights."""
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


# ----------------------------------------------------------------------------- mnist_ddpm.py

FAKE_OPEN_CLIP = """\
import os, torch
def create_model_and_transforms(name, pretrained):
    with open(os.path.join(os.path.dirname(__file__), "calls"), "a") as f:
        f.write(f"{name} {pretrained} {os.environ.get('RANK', 0)}\\n")
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.image, m.text = torch.nn.Linear(3, 512), torch.nn.Embedding(64, 512)
    m.encode_image = lambda x: m.image(x.mean(dim=(2, 3)))
    m.encode_text = lambda tokens: m.text(tokens).mean(1)
    return m, None, None
def get_tokenizer(name):
    return lambda prompts: torch.tensor([[ord(c) % 64 for c in f"{p:8}"[:8]] for p in prompts])
"""


@pytest.fixture
def fake_open_clip(tmp_path, monkeypatch):
    """A stand-in for open_clip's ViT-B/32 (no weights here: small maps of images and of tokens),
    imported here and in tmp_path/fake for other processes; returns the file it notes each model
    made in: "<name> <pretrained> <RANK>"."""
    path = tmp_path / "fake" / "open_clip.py"
    path.parent.mkdir()
    path.write_text(FAKE_OPEN_CLIP)
    mod = type(sys)("open_clip")
    mod.__file__ = str(path)
    exec(FAKE_OPEN_CLIP, vars(mod))
    monkeypatch.setitem(sys.modules, "open_clip", mod)
    return path.parent / "calls"


def test_mnist_clip_guidance_steers_toward_the_prompt(data_dir, tmp_path, fake_open_clip):
    import mnist_ddpm as m
    ab = m.make_alphas_cumprod("cosine", 20, "cpu")
    model = lambda x, t, y, drop: gaussian_eps(0.0, 0.3, ab)(x, t)  # samples inside [-1, 1]
    g = torch.Generator().manual_seed(0)
    proj, target = torch.randn(28 * 28, 16, generator=g) / 28, torch.randn(16, generator=g)
    encode_image = lambda x: x.flatten(1) @ proj  # a stand-in CLIP
    steer = m.clip_guide(encode_image, lambda prompts: target[None], "two", 2.0, 3, 0.15)
    cos = lambda x: torch.cosine_similarity(encode_image(x), target[None]).mean().item()
    args = [torch.zeros(6).long(), torch.ones(6).bool(), ab, (1, 28, 28), 1, "ddim", 10]
    assert cos(m.generate(model, *args, callback=steer)) > cos(m.generate(model, *args)) + 0.3
    out = str(tmp_path / "run")
    assert run("mnist_ddpm", *base_args("mnist_ddpm", data_dir("mnist_ddpm")), "--out-dir", out,
               "--iters", 1) == 0
    assert run("mnist_ddpm", "--sample", "--out-dir", out, "--clip-prompt", "two",
               "--per-label", 3, "--sample-steps", 2, "--device", "cpu") == 0
    assert fake_open_clip.read_text() == "ViT-B-32 openai 0\n"  # the seed's CLIP, once
    assert image_size(os.path.join(out, "clip_two.png")) == grid_size(3, 2, 28)  # plain, steered


def test_mnist_patch_unet_keeps_28_pixels_and_refuses_uneven_levels(data_dir, tmp_path, capsys):
    """--patch p: the U-Net works on 28/p pixels of p*p channels and gives back 28x28; each level
    must halve evenly, or the start is refused in one line."""
    import mnist_ddpm as m
    meta = dict(classes=list("0123456789"))
    for patch, mults in ((1, "1,2,2"), (2, "1,2"), (4, "1")):
        model = m.build_model(dict(width=16, depth=1, mults=mults, patch=patch, dropout=0.0), meta)
        x = torch.randn(3, 1, 28, 28)
        out = model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3]), torch.zeros(3).bool())
        assert out.shape == x.shape
    unshuffle = m.UNet(16, 1, [1], 2).stem[0]
    assert torch.equal(unshuffle(x)[0, :, 0, 0], x[0, 0, :2, :2].flatten())  # a 2x2 patch
    train = [*base_args("mnist_ddpm", data_dir("mnist_ddpm")), "--out-dir", tmp_path, "--iters", 1]
    for args in (["--patch", 3], ["--patch", 2, "--mults", "1,2,2"], ["--mults", "1,x"]):
        assert f"{args[0]} {args[1]}" in assert_bad_input(capsys, "mnist_ddpm", *train, *args)


@pytest.mark.parametrize("script,preset,spelled", [
    ("mnist_ddpm", "gpu", "--patch 1 --mults 1,2,2 --depth 2 --batch-size 64 --iters 5000 "
     "--lr 3e-3 --min-snr 0 --cfg 1.9 --sampler dpmpp --sample-steps 10 --eta 0"),
    ("cifar_cfg_unet", "cpu", "--patch 2 --width 64 --depth 1 --mults 1,2,2 --attn-res 8 "
     "--dropout 0 --iters 4000 --batch-size 32 --lr 1e-3 --lr-decay cosine --warmup 100 --ema "
     "0.999 --min-snr 5 --val-size 0 --log-every 50 --sample-every 4000 --ckpt-every 500 "
     "--sampler dpmpp --sample-steps 10"),
    ("cifar_dit_ddp", "cpu", "--width 192 --depth 8 --heads 6 --kv-heads 2 --schedule cosine "
     "--min-snr 5 --iters 4000 --batch-size 32 --lr 1e-3 --lr-decay cosine --warmup 100 --ema "
     "0.999 --val-size 0 --sample-every 4000 --ckpt-every 500 --cfg 3 --sampler dpmpp "
     "--sample-steps 10")])
def test_preset_is_the_spelled_out_command(script, preset, spelled, tmp_path, capsys):
    """--preset is the README's command in one flag; the command line and a --config run win over
    it; an unknown preset is a one-line error."""
    m = importlib.import_module(script)
    chosen = vars(m.get_args(["--preset", preset]))
    assert chosen == dict(vars(m.get_args(spelled.split())), preset=preset)
    assert m.get_args(["--preset", preset, "--iters", "7"]).iters == 7
    (tmp_path / "c.json").write_text(json.dumps(dict(chosen, iters=9)))  # a preset run, 9 steps
    again = vars(m.get_args(["--config", str(tmp_path / "c.json")]))
    assert (again["iters"], again["patch"], again["preset"]) == (9, chosen["patch"], preset)
    assert "--preset" in assert_bad_input(capsys, script, "--preset", "tpu")


# ----------------------------------------------------------------------------- cifar_cfg_unet.py

def test_cifar_loader_holds_out_a_fixed_sample(data_dir):
    import cifar_cfg_unet as m
    config = vars(m.get_args(["--data-dir", data_dir("cifar_cfg_unet")]))
    (train, meta), (ref, _), (test, _) = [m.get_data(config, s) for s in ("train", "fid", "test")]
    with open(os.path.join(config["data_dir"], "cifar-10-batches-py", "data_batch_1"), "rb") as f:
        assert torch.equal(ref.tensors[0][:3].flatten(1), torch.tensor(pickle.load(f)["data"][:3]))
    assert meta["classes"] == CIFAR_CLASSES and len(ref) == 80 and len(test) == 20
    images, labels = train.tensors
    for img, k in zip(images, labels):  # class k lights the k-th 3-pixel column stripe
        assert img[:, :, 3 * k:3 * k + 3].float().mean() > 190 > img[:, :, 31].float().mean()
    other = m.get_data(dict(config, seed=7))[0]  # the held-out images, whatever --seed
    assert torch.equal(m.split_data(train, 0, 5000)[1].indices, torch.arange(72, 80))
    assert torch.equal(other.tensors[0], images) and not torch.equal(images, ref.tensors[0])


def test_cifar_film_conditioning_conditions():
    """A tiny U-Net overfit on two 8x8 images of two classes: each label gives its own image. The
    label matters only where x_t hides the class (high noise): training draws t toward it."""
    import cifar_cfg_unet as m
    torch.manual_seed(0)
    x0 = torch.tensor([[0.8, -0.8, -0.8], [-0.8, -0.8, 0.8]]).view(2, 3, 1, 1).repeat(1, 1, 8, 8)
    x0[:, :, :4] *= -1
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


def test_cifar_seed_workflows_and_cfg_sweep(data_dir, tmp_path, monkeypatch, capsys):
    """Seed 001's workflows as written (a tiny model), --run_name's models/NAME/ckpt.pt; the W=1
    row of --cfg-sweep is --cfg 1. Without --preset cpu, a CPU run says how long it takes."""
    monkeypatch.chdir(tmp_path)
    tiny = [*base_args("cifar_cfg_unet", data_dir("cifar_cfg_unet")), "--limit", 16,
            "--sample-every", 100]
    sample = ["--device", "cpu", "--sample-steps", 2]
    commands = ["--epochs 1 --save_model --run_name quick_test",
                "--inference --model_path models/quick_test/ckpt.pt --num_samples 16",
                "--conditional --epochs 1 --p_uncond 0.1 --save_model --run_name DDPM_conditional "
                "--save_dir outputs_conditional",
                "--inference --conditional --model_path models/DDPM_conditional/ckpt.pt "
                "--num_samples 10 --guidance_scale 3.0 --sample_classes 3,3,3,3,3,3,3,3,3,3 "
                "--save_dir cats"]
    for cmd in commands:
        assert run("cifar_cfg_unet", *(sample if "--inference" in cmd else tiny),
                   *shlex.split(cmd)) == 0, cmd
    assert json.load(open("outputs_conditional/loss_history.json"))["epochs"] == [0]
    assert image_size("out/cifar_cfg_unet/samples.png") == grid_size(10, 2, 32)  # 16, 10 a row
    assert image_size("cats/samples.png") == grid_size(10, 1, 32)
    common = ["--sample", "--ckpt", "models/DDPM_conditional/ckpt.pt", "--out-dir", "s", *sample,
              "--per-label", 1, "--labels", "1,2,uncond"]
    assert run("cifar_cfg_unet", *common, "--cfg-sweep", "0,1,7") == 0
    assert run("cifar_cfg_unet", *common, "--cfg", 1) == 0  # a row per label, one column
    sweep, plain = (np.asarray(Image.open(f"s/{f}.png")) for f in ("cfg_sweep", "samples"))
    assert sweep.shape[:2] == grid_size(3, 3, 32)[::-1]
    assert all(np.array_equal(sweep[34:66, 1 + 33 * c:33 + 33 * c], plain[1 + 33 * c:33 + 33 * c,
                                                                          1:33]) for c in range(3))
    capsys.readouterr()
    assert run("cifar_cfg_unet", *tiny, "--iters", 11, "--log-every", 100, "--out-dir", "e") == 0
    assert "more on this CPU; --preset cpu trains" in capsys.readouterr().out


# ----------------------------------------------------------------------------- cifar_dit_ddp.py

def test_dit_gqa_equals_mha_and_the_grouped_form():
    import cifar_dit_ddp as m
    torch.manual_seed(0)
    x = torch.randn(3, 17, 32)
    gqa, mha = m.GQAttention(32, 4, 4), torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():  # kv's rows are [W_k; W_v], as MHA's in_proj after W_q
        mha.in_proj_weight.copy_(torch.cat([gqa.q.weight, gqa.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([gqa.q.bias, gqa.kv.bias]))
        mha.out_proj.load_state_dict(gqa.proj.state_dict())
    assert torch.allclose(gqa(x), mha(x, x, x, need_weights=False)[0], atol=1e-5)
    g2 = m.GQAttention(32, 4, 2)  # 2 key/value heads, each shared by 2 query heads
    k, v = g2.kv(x).view(3, 17, 2, 2, 8).permute(2, 0, 3, 1, 4).repeat_interleave(2, 2)
    q = g2.q(x).view(3, 17, 4, 8).transpose(1, 2)
    att = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v
    assert torch.allclose(g2(x), g2.proj(att.transpose(1, 2).reshape(3, 17, 32)), atol=1e-5)


@pytest.mark.parametrize("token", [False, True])
def test_dit_conditioning_token_or_adaln(token):
    import cifar_dit_ddp as m
    config = dict(width=32, depth=2, heads=4, kv_heads=2, patch=4, cond_token=token, dropout=0.0)
    model = m.build_model(config, dict(m.META, classes=["a", "b", "c"]))
    assert model.pos.shape[1] == 64 + token  # the seed's 65 positions with the token
    x, t = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1), torch.tensor([5, 5])
    y, keep = torch.tensor([0, 2]), torch.zeros(2, dtype=torch.bool)
    assert model(x, t, y, keep).abs().max() == 0  # the zero-initialised output layer (DiT)
    for p in model.parameters():  # as if trained
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        assert not torch.allclose(*model(x, t, y, keep))  # the class reaches the output
        assert torch.allclose(model(x, t, y, ~keep), model(x, t, torch.tensor([3, 3]), keep))


def test_dit_seed_spellings_figures_and_best_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    """The seed's commands; without --preset cpu, a CPU run says how long it takes."""
    out, real = tmp_path / "run", fid.inception_v3
    data = data_dir("cifar_dit_ddp")
    assert run("cifar_dit_ddp", *base_args("cifar_dit_ddp", data), "--out-dir", out,
               "--cond-token", "--hidden-dim", 32, "--num-heads", 4, "--num-epochs", 1,
               "--batch-size", 4, "--learning-rate", 2e-3, "--ckpt-every", 3) == 0
    assert "more on this CPU; --preset cpu trains" in capsys.readouterr().out
    ck, best = load(out / "ckpt.pt"), load(out / "best.pt")
    val = [r for r in read_log(out) if "val_loss" in r]
    assert [r["step"] for r in val] == list(range(3, 19, 3))  # 72 images, 18 steps of 4
    assert ck["model"]["pos"].shape == (1, 65, 32)
    assert ck["best_val"] == best["best_val"] == min(r["val_loss"] for r in val)
    assert image_size(out / "sample_grid.png") == grid_size(2, 10, 32)  # the class rows
    assert (out / "timestep_grid.png").read_bytes() == (out / "reverse.png").read_bytes()
    monkeypatch.setattr(fid, "inception_v3", lambda weights="download": real(None))  # offline
    assert run("cifar_dit_ddp", "--eval", "--checkpoint", out / "ckpt.pt", "--num-samples", 10,
               "--calculate-is", "--data-dir", data, "--out-dir", tmp_path, "--sample-steps", 2,
               "--device", "cpu") == 0
    assert json.load(open(tmp_path / "fid.json"))["num_samples"] == 10


# ----------------------------------------------------------------------------- stl10_vpred_clip.py

def test_stl_loader_reads_stl10_binary(data_dir):
    import stl10_vpred_clip as m
    config = vars(m.get_args(["--data-dir", data_dir("stl10_vpred_clip"), "--cond", "learned"]))
    (data, meta), (ref, ref_meta) = m.get_data(config), m.get_data(config, "fid")
    for ds, seed in ((data, 0), (ref, 1)):  # the train and the test split
        x, y = pattern_images(10, 2, 96, 3, seed)
        assert torch.equal(ds.tensors[0], torch.from_numpy(x).permute(0, 3, 1, 2))  # not transposed
        assert ds.tensors[1].tolist() == y.tolist()
    assert meta["classes"] == STL_CLASSES and ref_meta["fid_ref"] == "stl10-test"
    small, small_meta = m.get_data(dict(config, size=32), "fid")  # --size 32: resized, as a whole
    assert small.tensors[0].shape == (20, 3, 32, 32) and small_meta["size"] == 32
    assert abs(small.tensors[0].float().mean() - ref.tensors[0].float().mean()) < 1
    with pytest.raises(SystemExit):
        m.get_data(dict(config, size=36))


def test_stl_v_prediction_through_the_samplers():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 and back; the samplers, fed the exact v of Gaussian
    data through eps_from_pred, reproduce the data, from noise and from a partial start."""
    import stl10_vpred_clip as m
    mu, s, g = 1.0, 0.5, torch.Generator().manual_seed(0)
    ab = m.make_alphas_cumprod("cosine", 500, "cpu")  # log-SNR reaches -9.2 at t = T-1
    scale = torch.tensor([s, 1]).view(2, 1, 1, 1, 1)
    x0, eps = torch.randn((2, 4000, 1, 4, 4), generator=g) * scale
    x0 = x0 + mu  # x0 ~ N(mu, s^2), eps ~ N(0, 1)
    t = torch.randint(0, 500, (4000,), generator=g)
    xt, abar = m.q_sample(x0, t, eps, ab), ab[t].view(-1, 1, 1, 1)
    assert torch.allclose(m.eps_from_pred(m.loss_target(x0, eps, abar), xt, abar), eps, atol=1e-4)
    exact = gaussian_eps(mu, s, ab)

    def eps_fn(x, t):  # the exact v, as the network would give it, turned into eps
        abar = ab[t].view(-1, 1, 1, 1)
        e = exact(x, t)
        v = m.loss_target((x - (1 - abar).sqrt() * e) / abar.sqrt(), e, abar)
        return m.eps_from_pred(v, x, abar)
    noise = torch.randn((4000, 1, 4, 4), generator=g)
    assert_moments(m.ddim_sample(eps_fn, noise, ab, list(range(499, -1, -1)), 1.0, g), mu, s)
    assert_moments(m.dpmpp_sample(eps_fn, noise, ab, m.dpmpp_timesteps(ab, 499, 20)), mu, s)
    xt = m.q_sample(x0, torch.full((4000,), 250), eps, ab)
    assert_moments(m.ddim_sample(eps_fn, xt, ab, list(range(250, -1, -1)), 1.0, g), mu, s)


def test_stl_cross_attention_reads_the_frozen_table():
    import stl10_vpred_clip as m
    torch.manual_seed(0)
    meta = dict(m.META, text_emb=torch.randn(11, 16), context_dim=16)
    model = m.build_model(dict(width=32, depth=1, dropout=0.0), meta).eval()
    x, t = torch.randn(1, 3, 96, 96).repeat(3, 1, 1, 1), torch.tensor([5, 5, 5])
    y, keep = torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        out = model(x, t, y, keep)
        assert (out[0] - out[1]).abs().max() > 1e-4  # the text reaches the image
        model.text_emb[10] += 1.0  # change only the null row
        assert torch.equal(model(x, t, y, keep), out) and not torch.equal(model(x, t, y, ~keep),
                                                                          model(x, t, y, keep))
    assert "text_emb" not in dict(model.named_parameters())  # frozen: a buffer


def test_stl_card_command_without_open_clip(data_dir, tmp_path, capsys, monkeypatch):
    """The card's packages only: one line says learned embeddings stand in for CLIP, config.json
    says so, and the run trains and samples; --schedule linear --steps 10 stays finite."""
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    args = [*base_args("stl10_vpred_clip", data_dir("stl10_vpred_clip")), "--out-dir", tmp_path,
            "--batch-size", 2, "--iters", 2, "--schedule", "linear", "--steps", 10]
    assert run("stl10_vpred_clip", *args, "--diag-every", 0) == 0
    out = capsys.readouterr().out
    assert out.count("open_clip is not installed") == 1 and "pip install open_clip_torch" in out
    assert json.load(open(tmp_path / "config.json"))["cond"] == "learned"
    assert all(np.isfinite(r["loss"]) for r in read_log(tmp_path) if "loss" in r)
    assert run("stl10_vpred_clip", "--sample", "--out-dir", tmp_path, "--per-label", 1,
               "--sample-steps", 2, "--device", "cpu") == 0


def test_stl_clip_table_computed_once_per_machine(tmp_path, fake_open_clip):
    """Two ranks, a stand-in open_clip: local rank 0 computes and caches the table, rank 1 reads
    it after the barrier (it used to compute it too, into the same .tmp file)."""
    folder, out = make_image_folder(str(tmp_path / "imgs")), tmp_path / "out"
    args = ["--image-folder", folder, "--out-dir", out, *TINY, "--batch-size", 2, "--iters", 1,
            "--diag-every", 0, "--size", 32]
    r = torchrun("stl10_vpred_clip", 2, *args, PYTHONPATH=str(tmp_path / "fake"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert fake_open_clip.read_text() == "ViT-B-32 openai 0\n"
    assert load(out / "ckpt.pt")["meta"]["text_emb"].shape == (4, 512)


@pytest.mark.parametrize("trained", ["stl10_vpred_clip"], indirect=True)
def test_stl_diagnostics_and_sweep_from_a_checkpoint(trained, tmp_path):
    assert run("stl10_vpred_clip", "--diagnostics", "--sweep", "--checkpoint", trained.ckpt,
               "--out", tmp_path, "--data-dir", trained.data, "--schedulers", "cosine", "linear",
               "--sweep-cfg", 0, 6, "--sweep-eta", 1, "--labels", "10", "--per-label", 1,
               "--sample-steps", 2, "--device", "cpu") == 0
    assert sorted(os.listdir(tmp_path / "diagnostics" / "step_4")) == [
        "collage.png", "embeddings.png", "grid_cfg6.0.png", "reconstruction.png",
        "reconstruction_sweep.png"]
    for schedule in ("cosine", "linear"):
        names = sorted(os.listdir(tmp_path / "sweeps" / schedule))
        assert names == [f"grid_{schedule}_cfg{w}_eta1.0.png" for w in ("0.0", "6.0")]
    a, b = (np.asarray(Image.open(tmp_path / "sweeps" / s / f"grid_{s}_cfg6.0_eta1.0.png"))
            for s in ("cosine", "linear"))
    assert not np.array_equal(a, b)  # the schedule changes the sampler


# ----------------------------------------------------------------------------- celeba_crossattn.py

def test_celeba_damaged_jpeg_is_skipped_with_a_warning(tmp_path):
    """A truncated face, decoded by DataLoader workers mid-run: named once per process, the next
    image stands in, the run (and its --resume) goes on."""
    data = make_celeba(str(tmp_path))
    path = os.path.join(data, "celeba", "img_align_celeba", "000005.jpg")
    open(path, "r+b").truncate(os.path.getsize(path) // 2)
    args = [*base_args("celeba_crossattn", data), "--out-dir", tmp_path / "out", "--workers", 2,
            "--iters", 3]
    r = subprocess.run([sys.executable, os.path.join(HERE, "celeba_crossattn.py"),
                        *map(str, args)], capture_output=True, text=True, timeout=600)
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert r.returncode == 0 and warnings and all("000005.jpg" in w for w in warnings), r.stderr
    assert load(tmp_path / "out" / "ckpt.pt")["step"] == 3


def test_celeba_attribute_rows_toggles_and_tokens():
    """--labels attribute rows (others drawn by frequency, alike in every row), the toggle grid, a
    flipped attribute changes exactly its token; dropped rows (null tokens) ignore attributes."""
    import celeba_crossattn as m
    meta = dict(m.META, classes=CELEBA_NAMES, freq=[0.9, 0.1] + [0.5] * 38)
    config = vars(m.get_args(["--toggle", "Eyeglasses,Young"]))
    cond, drop, _ = m.conditions(["Male,-Smiling", "Eyeglasses"], 3000, meta, config)
    a, b = cond[:3000], cond[3000:]
    assert (a[:, 0] == 1).all() and (a[:, 1] == 0).all() and (b[:, 2] == 1).all() and not drop.any()
    assert torch.equal(a[:, 3:], b[:, 3:]) and abs(b[:, 0].mean() - 0.9) < 0.03
    grid = m.conditions(["all"], 4, meta, config)[0]
    for k, j in enumerate([2, 4]):  # Eyeglasses, Young
        assert ((grid[4 * k + 4:4 * k + 8] != grid[:4]).any(0) == (torch.arange(40) == j)).all()
    torch.manual_seed(0)
    model = m.build_model(vars(m.get_args(["--width", "32", "--depth", "1"])), meta).eval()
    for p in (model.tokens.on, model.tokens.off):  # trained-like tokens: effects above rounding
        torch.nn.init.normal_(p)
    flipped = grid[4:6]
    keep = torch.zeros(2, dtype=torch.bool)
    changed = (model.tokens(grid[:2], keep) - model.tokens(flipped, keep)).abs().amax(dim=(0, 2))
    assert changed.nonzero().flatten().tolist() == [2]
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 15])
    with torch.no_grad():
        assert (model(x, t, grid[:2], keep) - model(x, t, flipped, keep)).abs().max() > 1e-3
        assert torch.equal(model(x, t, grid[:2], ~keep), model(x, t, flipped, ~keep))


def test_celeba_real_faces_hq_layout_and_bad_files(tmp_path, capsys):
    import celeba_crossattn as m
    real = os.path.join(HERE, "..", "shared", "data", "celeba")
    if os.path.isdir(real):  # the 32 real faces, and CelebA's partition file: 0 is train
        shutil.copytree(real, tmp_path / "celeba")
        rows = [line.split() for line in open(tmp_path / "celeba" / "list_attr_celeba.txt")][2:]
        with open(tmp_path / "celeba" / "list_eval_partition.txt", "w") as f:
            f.write("".join(f"{r[0]} {int(i % 4 == 0)}\n" for i, r in enumerate(rows)))
        data, meta = m.get_data(vars(m.get_args(["--data-dir", str(tmp_path)])))
        x, c = data[torch.tensor([0])]
        assert len(data) == 24 and meta["classes"][31] == "Smiling" and x.shape == (1, 3, 64, 64)
        assert c[0].tolist() == [float(v == "1") for v in rows[1][1:]] and x.float().std() > 20
    hq = tmp_path / "hq" / "celeba"  # CelebA-HQ: other names, the same attribute format
    make_celeba(str(hq.parent), n=10)
    data, meta = m.get_data(vars(m.get_args(["--image-dir", str(hq / "img_align_celeba"),
                                             "--attr-file", str(hq / "list_attr_celeba.txt"),
                                             "--size", "48"])))
    assert len(data) == 10 and data[torch.tensor([9])][0].shape == (1, 3, 48, 48)
    bad = str(tmp_path / "bad")
    train = [*base_args("celeba_crossattn", bad), "--out-dir", tmp_path / "o"]
    rows = [f"{i:06d}.jpg" + " 1" * 40 for i in range(1, 13)]
    for rows_, expected in [(rows[:5] + [rows[5] + " 1"] + rows[6:], "at row 8"),
                            (rows[:5] + [rows[5].replace(" 1", " 0", 1)] + rows[6:], "at row 8"),
                            (rows[:-1], "line 1")]:
        make_celeba(bad, rows=rows_)
        assert expected in assert_bad_input(capsys, "celeba_crossattn", *train)
    make_celeba(bad)
    os.remove(os.path.join(bad, "celeba", "img_align_celeba", "000007.jpg"))
    assert "000007.jpg" in assert_bad_input(capsys, "celeba_crossattn", *train)
    make_celeba(bad)  # a typo in --toggle stops the start, not the first sample grid
    assert "--toggle" in assert_bad_input(capsys, "celeba_crossattn", *train, "--toggle", "Beard")


@pytest.mark.parametrize("dataset,script", [("cifar10", "cifar_cfg_unet"), ("mnist", "mnist_ddpm")])
def test_celeba_model_on_cifar10_and_mnist(dataset, script, data_dir, tmp_path):
    """The seed's other data sets: one-hot class tokens; MNIST at its odd 28 px, one channel."""
    out, size = tmp_path / "out", SCRIPTS[script].size  # CIFAR-10 32 px, MNIST 28
    assert run("celeba_crossattn", *base_args("celeba_crossattn", data_dir(script)),
               "--dataset", dataset, "--size", size, "--out-dir", out, "--iters", 1) == 0
    meta = load(out / "ckpt.pt")["meta"]
    assert meta["kind"] == "classes" and meta["channels"] == 3 - 2 * (dataset == "mnist")
    assert meta["freq"] == pytest.approx([0.1] * 10) and meta["fid_ref"] == f"{dataset}-train"
    assert image_size(out / "samples_1.png") == grid_size(2, 11, size)  # 10 classes + uncond


# ----------------------------------------------------------------------------- fid.py

@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory):
    """Random weights whose activations neither vanish nor explode (BatchNorm statistics of two
    images) and whose softmax is neither uniform nor one-hot."""
    torch.manual_seed(0)
    net = fid.inception_v3(None)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = the batch's
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 299, 299))
        net.fc.weight *= 0.1
    path = tmp_path_factory.mktemp("fid") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def fid_images(n, seed, size=32):
    low = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


def cheap_distance(mu1, s1, mu2, s2):
    """Stands in for frechet_distance (2048 x 2048 eigendecompositions take seconds) where a test
    checks what reaches it: it changes with every entry of both statistics."""
    return float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())


def test_fid_frechet_distance_and_inception_score():
    """Closed form for diagonal covariances, the textbook sqrtm for full ones, exact for singular
    (rank 9) ones; IS of uniform and of one-hot softmax."""
    mu1, mu2, v1, v2 = np.array([[0.0, 1, -2], [1, 1, 0.5], [1, 4, 0.25], [9, 1, 0.25]])
    closed = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 64, 64))
    s1, s2 = a @ a.T / 64 + 0.5 * np.eye(64), b @ b.T / 64 + 0.1 * np.eye(64)
    textbook = np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid.frechet_distance(np.zeros(64), s1, np.zeros(64), s2) == pytest.approx(textbook)
    x1, x2 = rng.standard_normal((10, 256)), rng.standard_normal((10, 256)) * 2 + 0.3
    m1, m2, c1, c2 = x1.mean(0), x2.mean(0), np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    nuclear = np.linalg.svd((x1 - m1) @ (x2 - m2).T / 9, compute_uv=False).sum()  # Tr sqrtm
    exact = ((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * nuclear
    assert fid.frechet_distance(m1, c1, m2, c2) == pytest.approx(exact, rel=1e-6)
    assert fid.inception_score(torch.zeros(20, 1008)) == pytest.approx((1.0, 0.0))
    one_hot = 1e4 * torch.nn.functional.one_hot(torch.arange(40) % 4, 1008).double()
    assert fid.inception_score(one_hot) == pytest.approx((4.0, 0.0))


def tf_resize_by_loops(a, out_h, out_w):
    """TF1's ResizeBilinear (no half-pixel centres) as its kernel computes it, on nested lists:
    source coordinate = output index * in / out, lerp between floor and the next (clamped)."""
    rows = []
    for i in range(out_h):
        y = i * len(a) / out_h
        y0, y1 = int(y), min(int(y) + 1, len(a) - 1)
        row = []
        for j in range(out_w):
            x = j * len(a[0]) / out_w
            x0, x1 = int(x), min(int(x) + 1, len(a[0]) - 1)
            top, bottom = (a[y][x0] + (a[y][x1] - a[y][x0]) * (x - x0) for y in (y0, y1))
            row.append(top + (bottom - top) * (y - y0))
        rows.append(row)
    return rows


def test_fid_tf_mode_preprocessing():
    """tf: TF1's legacy resize of 0-255 values, then (x - 128) / 128, up to 0.9921875; pytorch-fid:
    x / 255, half-pixel bilinear, 2x - 1, as fid.py computed before the modes."""
    assert fid.legacy_resize(torch.tensor([[[[0.0, 1], [2, 3]]]]), (4, 4))[0, 0].tolist() == [
        [0, 0.5, 1, 1], [1, 1.5, 2, 2], [2, 2.5, 3, 3], [2, 2.5, 3, 3]]
    x = torch.tensor(np.random.default_rng(0).integers(0, 256, (1, 2, 5, 4)), dtype=torch.float64)
    for size in ((7, 7), (2, 3), (9, 5)):
        expected = [tf_resize_by_loops(x[0, c].tolist(), *size) for c in range(2)]
        assert torch.allclose(fid.legacy_resize(x, size)[0], torch.tensor(expected, dtype=x.dtype))
    images = fid_images(2, 0) * 255
    half_pixel = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear")
    assert (fid.legacy_resize(images) - half_pixel).abs().max() > 1
    big = torch.rand(1, 3, 299, 299) * 255
    assert torch.equal(fid.legacy_resize(big), big)
    white = torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)  # grey: as PIL's convert("RGB")
    assert torch.equal(fid.preprocess(white), torch.full((1, 3, 299, 299), 0.9921875))
    assert torch.equal(fid.preprocess(white, "pytorch-fid"), torch.ones(1, 3, 299, 299))
    x = fid_images(1, 4, size=37)
    before = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear") - 1
    assert torch.equal(fid.preprocess(x, "pytorch-fid"), before)
    with pytest.raises(ValueError):
        fid.preprocess(2 * x - 1)  # images in [-1, 1] must not give a silent wrong value


def test_fid_network_layout_and_pytorch_fid(fid_weights, monkeypatch):
    net = fid.inception_v3(fid_weights)
    ref = torchvision.models.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}
    x = (fid_images(2, 0, size=37) * 255).round() / 255  # exactly uint8 values
    f, logits = net(x)
    assert f.shape == (2, 2048) and logits.shape == (2, 1008) and f.abs().mean() > 1e-3
    assert torch.allclose(net((x * 255).round().byte())[0], f, rtol=1e-5, atol=1e-5)
    pfi = pytest.importorskip("pytorch_fid.inception")  # optional: not a requirement
    state = torch.load(fid_weights, weights_only=True)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state)
    with torch.no_grad():
        expected = pfi.InceptionV3([3]).eval()(x)[0].flatten(1)
    assert torch.allclose(net(x, "pytorch-fid")[0], expected, rtol=1e-4, atol=1e-4)


def test_fid_evaluate_caches_by_mode(fid_weights, tmp_path, monkeypatch):
    """evaluate draws only the batches it needs; the .npz cache records n and mode and is refused
    for another n or mode, or cut short; cache_key names it anew for one changed pixel."""
    monkeypatch.setattr(fid, "frechet_distance", cheap_distance)
    drawn = []

    def fake():  # batches of 2: n=3 takes exactly 2
        for i in range(5):
            drawn.append(i)
            yield fid_images(2, 10 + i)

    def no_real():
        raise AssertionError("real images read although the cache holds them")
        yield
    cache = str(tmp_path / "stats" / "real.npz")
    first = fid.evaluate(fake(), [(fid_images(2, 20 + i), None) for i in range(2)], 3, cache=cache,
                         weights=fid_weights)
    assert drawn == [0, 1] and first["n"] == 3 and first["mode"] == "tf" and first["fid"] > 0
    assert fid.evaluate(fake(), no_real(), 3, cache=cache, weights=fid_weights) == first
    for kwargs, message in [(dict(n=2), "statistics of 3 images"),
                            (dict(n=3, mode="pytorch-fid"), "mode tf, not pytorch-fid")]:
        with pytest.raises(ValueError, match=message):
            fid.evaluate(no_real(), no_real(), cache=cache, weights=fid_weights, **kwargs)
    (tmp_path / "cut.npz").write_bytes(open(cache, "rb").read()[:1000])
    with pytest.raises(ValueError, match="cut.npz: not a readable .npz file"):
        fid.evaluate(no_real(), no_real(), 3, cache=str(tmp_path / "cut.npz"))
    with pytest.raises(ValueError, match="only 1 images available, 2 requested"):
        fid.evaluate([fid_images(1, 0)], no_real(), 2, weights=fid_weights)
    (tmp_path / "bad.pth").write_bytes(b"not weights")
    with pytest.raises(RuntimeError, match="bad.pth: not the FID Inception's weights"):
        fid.inception_v3(str(tmp_path / "bad.pth"))
    real = [fid_images(2, 20), fid_images(2, 21)]
    key = fid.cache_key(real, 4, "tf", None)
    assert key == fid.cache_key(iter(real), 4, "tf", None)  # the same images: the same file
    assert key != fid.cache_key(real, 4, "tf", fid_weights)  # a weight file
    real[1][0, 0, 0, 0] += 0.5  # one pixel of one reference image
    assert key != fid.cache_key(real, 4, "tf", None)


def fid_rank(rank, world, init, weights, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    fid.frechet_distance = cheap_distance
    images = fid_images(12, 30)[rank * 6:(rank + 1) * 6], fid_images(12, 31)[rank * 6:rank * 6 + 6]
    # each rank its own cache path, as on nodes without a shared file system: rank 0's is absent,
    # so all ranks compute the real statistics together, then rank 0 alone writes them
    results = [fid.evaluate(iter(images[0].split(4)), [images[1]], 6, inception_score=True,
                            cache=f"{out}.{rank}.npz", weights=weights) for _ in range(2)]
    torch.save(results, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_fid_distributed_equals_one_process(fid_weights, tmp_path, monkeypatch):
    """Two ranks: statistics summed, logits gathered in rank order, the cache decided by rank 0
    (the second evaluate reads rank 0's cache; rank 1 has none and must not wait for one)."""
    monkeypatch.setattr(fid, "frechet_distance", cheap_distance)
    out = str(tmp_path / "r")
    torch.multiprocessing.spawn(fid_rank, args=(2, f"file://{tmp_path}/pg", fid_weights, out),
                                nprocs=2)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0][0] == ranks[0][1] and ranks[0][0]["n"] == 12
    assert os.path.exists(f"{out}.0.npz") and not os.path.exists(f"{out}.1.npz")
    single = fid.evaluate(fid_images(12, 30), fid_images(12, 31), 12, inception_score=True,
                          weights=fid_weights)
    # equal up to float32 rounding: the features' last bits vary with batch size, threads and the
    # CPU's kernels (1.6e-6 apart with AVX2 kernels); a statistic summed wrongly is far off
    for key in ("fid", "inception_score_mean"):
        assert single[key] == pytest.approx(ranks[0][0][key], rel=1e-4), key


def test_fid_command_line(fid_weights, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for folder, count in [("a/sub", 10), ("b", 2)]:
        os.makedirs(tmp_path / folder)
        for i in range(count):  # mixed sizes, one grey image
            image = Image.fromarray(rng.integers(0, 256, (16 + i, 16, 3), dtype=np.uint8))
            (image.convert("L") if i == 0 else image).save(tmp_path / folder / f"{i}.png")
    r = subprocess.run([sys.executable, os.path.join(HERE, "fid.py"), str(tmp_path / "a"),
                        str(tmp_path / "b"), "--is", "--weights", fid_weights, "--batch-size", "4"],
                       capture_output=True, text=True, timeout=300)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].startswith("IS: ") and float(lines[1][5:]) >= 0, r.stderr
    for mode in fid.MODES:
        fid.main([str(tmp_path / "b"), str(tmp_path / f"{mode}.npz"), "--save-stats", "--mode",
                  mode, "--weights", fid_weights])
    fid.main([str(tmp_path / "tf.npz"), str(tmp_path / "tf.npz")])  # .npz only: no network
    assert capsys.readouterr().out.splitlines()[-1] == "FID: 0.0"
    (tmp_path / "cut.npz").write_bytes((tmp_path / "tf.npz").read_bytes()[:500])
    os.makedirs(tmp_path / "empty")
    for argv, expected in [([tmp_path / "tf.npz", tmp_path / "pytorch-fid.npz"], "--mode"),
                           ([tmp_path / "tf.npz", tmp_path / "cut.npz"], "cut.npz"),
                           ([tmp_path / "b", tmp_path / "tf.npz", "--weights",
                             tmp_path / "cut.npz"], "not the FID Inception's weights"),
                           ([tmp_path / "empty", tmp_path / "b"], "not a folder with images"),
                           ([tmp_path / "b"], "expected PATH_A PATH_B")]:
        with pytest.raises(SystemExit) as exit_info:
            fid.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("fid.py: error:") and expected in err
        assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- bench.py

def test_bench_runs_every_script_through_the_same_calls(tmp_path, capsys):
    import bench
    out = str(tmp_path / "bench.json")
    bench.main(["--tiny", "--script", "mnist_ddpm", "--script", "stl10_vpred_clip",
                "--batch-size", "2", "--sample-batch", "2", "--steps", "1", "--out", out])
    res = json.load(open(out))
    assert [r["script"] for r in res["results"]] == ["mnist_ddpm", "stl10_vpred_clip"]
    for r in res["results"]:
        assert r["img_per_s"] > 0 and r["gflop_per_img"] > 0 and r["sample_step_s"] > 0
        assert r["achieved_gflop_s"] == pytest.approx(r["gflop_per_img"] * r["img_per_s"])
    assert res["matmul_peak_gflop_s"] > 0 and "model name" not in res["machine"]


def test_bench_mnist_quality_reads_the_grid_and_measures_distance(tmp_path):
    """--mnist-quality's pieces: the samples come back from samples.png exactly as the script saved
    them, and the Frechet distance of features is 0 for one set and grows with a shifted mean."""
    import bench
    import mnist_ddpm as m
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    m.save_grid(x.float() / 127.5 - 1, tmp_path / "g.png", 3)
    assert torch.equal(bench.read_grid(tmp_path / "g.png", 2, 3), x)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)  # CIFAR-10's samples
    m.save_grid(x.float() / 127.5 - 1, tmp_path / "c.png", 2)
    assert torch.equal(bench.read_grid(tmp_path / "c.png", 2, 2, 32, 3), x)
    assert bench.CifarClassifier()(x)[1].shape == (4, 256)
    f = torch.randn(500, 4, generator=torch.Generator().manual_seed(0)).double()
    assert bench.frechet(f, f) == pytest.approx(0, abs=1e-9)
    assert bench.frechet(f, f + 2) == pytest.approx(4 * 4, rel=1e-6)  # |mu1 - mu2|^2, same sigma


def test_bench_quality_runs_the_command_on_tiny_settings(data_dir, tmp_path, monkeypatch, capsys):
    """--mnist-quality end to end, tiny, trained by torchrun: a run per training seed (other
    weights), each scored by every classifier, the headline the lowest agreement and the worst
    ratio; --resample only samples the runs again."""
    import bench
    monkeypatch.chdir(tmp_path)
    args = ["--mnist-quality", "--data-dir", data_dir("mnist_ddpm"), "--seeds", "0,1", "--nproc",
            "2", "--flags", "--iters 2 --width 8 --batch-size 4 --sample-steps 2"]
    for again in ([], ["--resample"]):
        bench.main(args + again)
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["seed"] for r in rows] == [0, 1]
        for r in rows:
            scores = r["classifiers"].values()
            assert list(r["classifiers"]) == ["cnn", "mlp", "cnn16"] and r["sample_s"] > 0
            assert (r["train_s"] is None) == bool(again) and r["images_seen"] == 2 * 4 * 2
            assert r["worst_ratio"] == max(s["fd_samples"] / s["fd_real_1000"] for s in scores)
            assert r["agreement"] == min(s["agreement"] for s in scores)
    ckpts = [load(f"out/mnist_ddpm_quality_seed{s}/ckpt.pt") for s in (0, 1)]
    assert not same_weights(ckpts[0]["model"], ckpts[1]["model"])
