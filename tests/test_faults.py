"""Fault injection: bad arguments, NaNs, and kills (SIGKILL, SIGINT, SIGTERM) at every point of a
conversion and during training.  What is on disk must always be the old state or the new one, and
every mistake one line on stderr, no traceback, no output file."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from minidiff.cli.common import MAX_SEED
from minidiff.images import read_metadata, save_image

HERE = Path(__file__).parent


def minidiff(*args, cwd, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "minidiff.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(r, *words):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


# --- bad arguments: checked before JAX is imported -------------------------------------------------------


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("pictures")
    Image.new("RGB", (1, 1)).save(d / "tiny.png")
    Image.new("RGB", (64, 48), (200, 40, 40)).save(d / "ok.png")
    (d / "not_an_image.png").write_text("hello")
    (d / "folder").mkdir()
    return d


BEFORE_JAX = [  # (arguments after the prompt, words the one-line error must contain)
    (["--seed", str(2**70)], ["--seed", "out of range"]),
    (["--seed", "-1"], ["--seed", "out of range"]),
    (["--seed", str(MAX_SEED + 1)], ["--seed", "2**32 - 1"]),
    (["--guidance", "nan"], ["--guidance", "not a finite number"]),
    (["--guidance", "inf"], ["--guidance", "not a finite number"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--n", "0"], ["--n", "at least 1"]),
    (["--n", "x"], ["--n", "not an integer"]),
    (["-o", "folder"], ["-o folder", "is a folder"]),
    (["-o", "out.bmp"], ["-o out.bmp", "unknown image type"]),
    (["-o", "/proc/minidiff/out.png"], ["-o /proc/minidiff/out.png", "cannot write"]),
    (["--init-image", "tiny.png"], ["--init-image tiny.png", "1x1", "too small"]),
    (["--init-image", "missing.png"], ["--init-image missing.png", "no such file"]),
    (["--init-image", "not_an_image.png"], ["--init-image not_an_image.png", "cannot read"]),
    (["--init-image", "ok.png", "--strength", "2"], ["--strength", "(0, 1]"]),
    (["--strength", "0.5"], ["--strength", "--init-image"]),
    (["--eta", "-1"], ["--eta", ">= 0"]),
    (["--model", "nope.safetensors"], ["--model nope.safetensors", "no such file"]),
]


@pytest.mark.parametrize("args,words", BEFORE_JAX, ids=[" ".join(a) for a, _ in BEFORE_JAX])
def test_a_bad_argument_is_one_line_before_jax_loads(pictures, args, words):
    """In a fresh interpreter: the error, exit status 2, nothing written, and JAX never imported."""
    code = textwrap.dedent(f"""
        import sys
        from minidiff.cli import main
        rc = main(["txt2img", "a red circle", *{args!r}, "--no-progress"] + ([] if "-o" in {args!r} else ["-o", "x.png"]))
        assert "jax" not in sys.modules, "JAX was imported before the argument was checked"
        sys.exit(rc)
    """)
    before = set(os.listdir(pictures))
    r = subprocess.run([sys.executable, "-c", code], cwd=pictures, capture_output=True, text=True, timeout=60)
    one_line_error(r, *words)
    assert set(os.listdir(pictures)) == before


@pytest.mark.slow
def test_bad_requests_that_need_the_model_are_refused_before_compiling(pictures):
    r = minidiff("txt2img", "a red circle", "--n", "100000000", "--no-progress", cwd=pictures)
    err = one_line_error(r, "--n 100000000", "GiB (estimated)", "free")
    assert "at most --n" in err
    one_line_error(minidiff("txt2img", "a red circle", "--height", "33", cwd=pictures), "--height", "multiple of")
    assert not (pictures / "txt2img.png").exists()


def test_argparse_mistakes_are_one_line_and_version(tmp_path):
    r = minidiff("txt2img", cwd=tmp_path)
    one_line_error(r, "prompt", "--help")
    r = minidiff("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("minidiff ")


# --- outputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.jpeg", "a.webp"])
def test_every_image_type_keeps_the_metadata(tmp_path, name):
    meta = {"prompt": "un cercle rouge, 🐎", "seed": 7, "guidance_scale": 3.0}
    path = save_image(tmp_path / name, np.full((8, 8, 3), 100, np.uint8), meta)
    assert read_metadata(path) == {k: str(v) for k, v in meta.items()}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.slow
def test_a_missing_extension_gets_png_and_a_huge_init_image_is_resized(tmp_path):
    from PIL import Image

    Image.new("RGB", (6000, 4000), (40, 200, 60)).save(tmp_path / "huge.png")
    r = minidiff("txt2img", "a green circle", "--init-image", "huge.png", "--steps", "2", "--no-progress",
                 "-o", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(6000x4000) resized to 32x16" in r.stdout  # its aspect, the longer side at the model's 32, multiples of 8
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (32, 16) and im.text["init_image"] == "huge.png"


# --- the built-in model knows its limits -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini():
    from minidiff.pipeline import load_pipeline

    return load_pipeline()


def test_the_built_in_model_names_words_it_never_saw(mini):
    assert mini.unknown_words("an astronaut riding a horse") == ["an", "astronaut", "riding", "horse"]
    assert mini.unknown_words("A small red circle in the top left.") == []
    assert mini.unknown_words("a 🐱") == ["🐱"]
    assert mini.guidance_scale == 3.0  # stored with the model
    with pytest.warns(UserWarning, match="unknown words: astronaut, horse"):
        mini.warn_unknown_words(["a red astronaut", "a horse"])


def test_nan_is_an_error_naming_the_stage(mini):
    def broken(part, path):
        import copy

        tree = copy.deepcopy(mini.params[part])
        node = tree
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = np.full_like(np.asarray(node[path[-1]]), np.nan)
        return mini.with_params(**{part: tree})

    text = broken("text_encoder", ["final_layer_norm", "bias"])
    with pytest.raises(ValueError, match="the text encoder's states are not finite"):
        text("a red circle", steps=2)
    unet = broken("unet", ["conv_out", "bias"])
    with pytest.raises(ValueError, match="the UNet's output is not finite .* from denoising step 1 of 2"):
        unet("a red circle", steps=2)
    vae = broken("vae", ["decoder", "conv_out", "bias"])
    with pytest.raises(ValueError, match="the VAE decoder's pixels are not finite"):
        vae("a red circle", steps=2)


# --- conversion: killed at every point, the old pair or the new one ---------------------------------------

DRIVER = textwrap.dedent("""
    import os, signal, sys
    point, sig = sys.argv[1], int(sys.argv[2])
    args = sys.argv[3:]
    die = lambda: os.kill(os.getpid(), sig)
    real_replace, renames = os.replace, [0]

    def replace(a, b):  # minidiff.files renames through os.replace
        if point == f"before_rename_{renames[0]}":
            die()
        real_replace(a, b)
        renames[0] += 1
        if point == f"after_rename_{renames[0] - 1}":
            die()

    os.replace = replace
    import minidiff.convert as convert
    real_write = convert.write_safetensors

    def write_safetensors(filename, tensors, metadata=None):
        real_write(filename, tensors, metadata)
        if point == "mid_write":  # the weights half on disk
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            die()

    convert.write_safetensors = write_safetensors
    from minidiff.cli import main
    sys.exit(main(args))
""")

POINTS = ["mid_write", "before_rename_0", "after_rename_0", "after_rename_1"]
SIGNALS = [signal.SIGKILL, signal.SIGINT, signal.SIGTERM]


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import sd_fixtures as fx

    root = tmp_path_factory.mktemp("fault_ckpt")
    unet, vae, text = fx.build_models(fx.SD1_SMALL)
    return fx.save_ldm(fx.ldm_state_dict(unet, vae, text, "sd1"), root / "sd1.safetensors")


def _state(dst: Path):
    """(dtype of the config the weights carry, of the weights themselves, whether the .json is a true copy)."""
    from minidiff.convert import load_converted

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, config = load_converted(dst)
    dtypes = {np.asarray(a).dtype.name for a in __import__("jax").tree.leaves(params) if np.asarray(a).dtype.kind == "f"}
    stale_copy = any("differs from the config stored" in str(w.message) for w in caught)
    return config.dtype, dtypes, stale_copy


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("point", POINTS)
def test_a_conversion_killed_anywhere_leaves_the_old_pair_or_the_new(checkpoint_file, tmp_path, point, sig):
    dst = tmp_path / "model.safetensors"
    old = minidiff("convert", checkpoint_file, dst, "--dtype", "float16", cwd=tmp_path)
    assert old.returncode == 0, old.stderr[-2000:]
    (tmp_path / "driver.py").write_text(DRIVER)
    r = subprocess.run([sys.executable, "driver.py", point, str(int(sig)), "convert", str(checkpoint_file), str(dst),
                        "--dtype", "float32", "--overwrite"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    config_dtype, weight_dtypes, stale_copy = _state(dst)
    assert weight_dtypes == {config_dtype}, "the weights and the config they carry disagree"
    new = point == "after_rename_0" or point == "after_rename_1"
    assert config_dtype == ("float32" if new else "float16")
    assert stale_copy == (point == "after_rename_0"), "the .json copy is stale only between the two renames"
    temps = sorted(p.name for p in tmp_path.glob(".*.tmp"))
    if sig == signal.SIGKILL:
        assert r.returncode == -signal.SIGKILL
        assert temps or new, "a SIGKILL before the renames leaves its temporary files (the next run removes them)"
        again = minidiff("convert", checkpoint_file, dst, "--dtype", "float32", "--overwrite", cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        assert all(f"removed {tmp_path / t}" in again.stdout for t in temps)
        assert _state(dst) == ("float32", {"float32"}, False)
    else:  # Ctrl-C or kill: one line, exit 130, nothing half-written left
        assert r.returncode == 130, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert temps == []
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_conversion_destinations_are_checked_first(checkpoint_file, tmp_path):
    (tmp_path / "model.json").write_text('{"mine": true}')
    r = minidiff("convert", checkpoint_file, tmp_path / "model.safetensors", cwd=tmp_path)
    one_line_error(r, "model.json exists", "--overwrite")
    assert json.loads((tmp_path / "model.json").read_text()) == {"mine": True}
    r = minidiff("convert", checkpoint_file, "/proc/minidiff.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = minidiff("convert", checkpoint_file, tmp_path / "ok.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    for f in ("ok.safetensors", "ok.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~umask


# --- training: killed at random moments, always a loadable checkpoint, --resume continues -----------------


@pytest.mark.slow
def test_training_killed_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path):
    from minidiff.train.checkpoint import CHECKPOINT, load_checkpoint

    r = minidiff("train", "--out", tmp_path / "none", "--resume", cwd=tmp_path)
    one_line_error(r, "--resume", "holds no checkpoint")
    out = tmp_path / "run"
    args = ["train", "--data", "mixture", "--steps", "400", "--checkpoint-every", "20", "--no-progress", "--out", out]
    rng = np.random.default_rng(0)
    steps = []
    for attempt, sig in enumerate([signal.SIGKILL, signal.SIGINT, signal.SIGKILL, signal.SIGTERM]):
        cmd = [sys.executable, "-m", "minidiff.cli", *map(str, args)] + (["--resume"] if (out / CHECKPOINT).exists() else [])
        p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300  # on a loaded machine start-up alone can take longer than the delay
        while not (out / CHECKPOINT).exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # so that there is always a checkpoint to resume from
        time.sleep(float(rng.uniform(1.0, 6.0)))
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        if p.returncode == 0:  # finished before the signal
            break
        if sig != signal.SIGKILL:
            assert p.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        if (out / CHECKPOINT).exists():
            steps.append(int(load_checkpoint(out)[0]["step"]))  # never a damaged file
        assert not [f for f in out.glob(".*.tmp") if sig != signal.SIGKILL]
    assert steps == sorted(steps), "a resumed run never goes back"
    final = minidiff(*args, "--resume", cwd=tmp_path, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert int(load_checkpoint(out)[0]["step"]) == 400
    assert not list(out.glob(".*.tmp"))
