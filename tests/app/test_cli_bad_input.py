"""Every bad command-line input gets its sentence before work starts, and no run leaves a file behind.

Each refusal is checked for its sentence, for the subcommand's own usage line where argparse reports it, for the
absence of a traceback, and for an output folder that holds nothing afterwards (no PNG, no temporary file).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdxl_core.app import arguments, runner
from sdxl_core.app.cli import main

REPO = Path(__file__).resolve().parents[2]


def _generate_args(paths, out, *extra):
    return ["generate", "--base", str(paths["base"]), "--refiner", str(paths["refiner"]), "--prompt", "a red cube",
            "--width", "64", "--height", "48", "--steps", "2", "--refiner-start", "1", "--cfg", "2.5",
            "--seed", "3", "--out", str(out), *extra]


def _nothing_written(folder: Path) -> bool:
    return not any(folder.iterdir())


@pytest.fixture
def out_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any checkpoint is loaded: the refusals under test come before loading."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a checkpoint was loaded before the bad input was refused")

    monkeypatch.setattr(runner, "load_checkpoint", refuse)


# --- refused while parsing: the subcommand's usage line, the option's sentence, nothing written ------------------

@pytest.mark.parametrize("extra, message", [
    (["--seed", str(2 ** 64)], "seeds run from 0 to 18446744073709551615 (2^64-1), got 18446744073709551616"),
    (["--seed", "-2"], "seeds run from 0 to 18446744073709551615"),
    (["--seed", "lucky"], "or 'random' (also spelled -1), got 'lucky'"),
    (["--cfg", "nan"], "expected the guidance scale as a finite number, got 'nan'"),
    (["--cfg", "inf"], "expected the guidance scale as a finite number, got 'inf'"),
    (["--cfg", "-1"], "expected the guidance scale of at least 0, got -1"),
    (["--bucket", "nan"], "two positive finite numbers"),
    (["--bucket", "16:0"], "two positive finite numbers"),
    (["--crop-top-left", "-5,-5"], "cannot be negative, got '-5,-5'"),
    (["--crop-top-left=-5,3"], "cannot be negative, got '-5,3'"),
    (["--width", "16384", "--height", "16384"], "16384 pixels is more than the 8192 this command accepts"),
    (["--width", "0", "--height", "64"], "image sides must be positive"),
    (["--original-size", "0x64"], "from 1 to 16384 pixels"),
    (["--steps", "0"], "expected the step count from 1 to 10000, got 0"),
    (["--aesthetic-score", "nan"], "expected an aesthetic score as a finite number"),
    (["--negative-aesthetic-score", "-inf"], "expected an aesthetic score as a finite number"),
    (["--refiner-switch", "nan"], "as a finite number, got 'nan'"),
    (["--batch-size", "0"], "expected the batch size from 1 to 4096"),
    (["--width", "8192", "--height", "8192", "--batch-size", "2"], "134 megapixels at once"),
])
def test_bad_values_are_refused_before_anything_runs(extra, message, out_folder, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SDXL_CORE_CACHE", str(cache))
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out_folder / "x.png"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: python -m sdxl_core demo" in err and "error:" in err and "Traceback" not in err
    assert _nothing_written(out_folder) and not cache.exists()  # not even the demo's cache was written


def test_img2img_strength_must_be_finite(tiny_checkpoints, out_folder, capsys):
    with pytest.raises(SystemExit):
        main(["img2img", "--model", str(tiny_checkpoints["refiner"]), "--image", "x.png", "--prompt", "p",
              "--strength", "nan", "--out", str(out_folder / "x.png")])
    err = capsys.readouterr().err
    assert "expected the strength as a finite number, got 'nan'" in err and "usage: python -m sdxl_core img2img" in err
    assert _nothing_written(out_folder)


def test_request_refusals_show_the_subcommand_usage(out_folder, capsys):
    """A value only the request can judge (not a multiple of 8) is reported with `generate`'s usage line."""
    with pytest.raises(SystemExit):
        main(["generate", "--base", "b.safetensors", "--prompt", "p", "--width", "100", "--height", "64",
              "--out", str(out_folder / "x.png")])
    err = capsys.readouterr().err
    assert "usage: python -m sdxl_core generate" in err and "multiple of 8" in err
    assert "{generate,img2img,demo,inspect}" not in err


def test_dash_values_are_joined_only_after_long_options():
    assert arguments.join_dash_values(["--crop-top-left", "-5,-5", "--seed", "-1", "--", "-3"]) == [
        "--crop-top-left=-5,-5", "--seed=-1", "--", "-3"]
    assert arguments.join_dash_values(["--cfg=-1", "-2"]) == ["--cfg=-1", "-2"]


# --- seeds -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["random", "-1"])
def test_a_random_seed_is_drawn_printed_and_recorded(spelling, tiny_checkpoints, out_folder, capsys):
    out = out_folder / "random.png"
    args = _generate_args(tiny_checkpoints, out)
    args[args.index("--seed") + 1] = spelling
    assert main(args) == 0
    recorded = json.loads(Image.open(out).text["sdxl_core"])["seed"]
    assert 0 <= recorded <= arguments.MAX_SEED
    err = capsys.readouterr().err
    assert f"seed: {recorded} (drawn at random" in err
    assert "loading base tiny_sdxl_base.safetensors ..." in err and "loading refiner tiny_sdxl_refiner" in err
    assert f"Seed: {recorded}," in Image.open(out).text["parameters"]


def test_the_largest_seed_runs(tiny_checkpoints, out_folder):
    out = out_folder / "max.png"
    args = _generate_args(tiny_checkpoints, out)
    args[args.index("--seed") + 1] = str(arguments.MAX_SEED)
    assert main(args) == 0
    assert json.loads(Image.open(out).text["sdxl_core"])["seed"] == arguments.MAX_SEED


def test_a_cfg_below_one_is_run_with_a_warning(monkeypatch, out_folder, capsys):
    from sdxl_core.app import runner as runner_module

    seen = {}
    monkeypatch.setattr(runner_module, "run_demo", lambda request, args: seen.setdefault("cfg", request.cfg) and 0)
    main(["demo", "--out", str(out_folder / "x.png"), "--cfg", "0"])
    assert seen["cfg"] == 0.0
    assert "warning: --cfg 0 below 1 weakens the prompt" in capsys.readouterr().err


# --- files checked before the base loads ---------------------------------------------------------------------------

def test_the_base_given_as_refiner_is_refused_before_loading(tiny_checkpoints, out_folder, no_loading, capsys):
    both_base = {"base": tiny_checkpoints["base"], "refiner": tiny_checkpoints["base"]}
    assert main(_generate_args(both_base, out_folder / "x.png")) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "refiner" in err and "Traceback" not in err and "loading" not in err
    assert _nothing_written(out_folder)


def test_a_damaged_refiner_is_refused_before_loading(tiny_checkpoints, out_folder, tmp_path, no_loading, capsys):
    damaged = tmp_path / "refiner.safetensors"
    damaged.write_bytes(tiny_checkpoints["refiner"].read_bytes()[:1000])
    paths = {"base": tiny_checkpoints["base"], "refiner": damaged}
    assert main(_generate_args(paths, out_folder / "x.png")) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "refiner.safetensors" in err and "Traceback" not in err
    assert _nothing_written(out_folder)


def test_a_checkpoint_given_as_lora_is_refused_before_loading(tiny_checkpoints, out_folder, no_loading, capsys):
    assert main(_generate_args(tiny_checkpoints, out_folder / "x.png", "--lora", str(tiny_checkpoints["refiner"]))) == 2
    err = capsys.readouterr().err
    assert "error: tiny_sdxl_refiner.safetensors is" in err and "not a LoRA" in err and "Traceback" not in err
    assert _nothing_written(out_folder)


def test_img2img_checks_its_model_before_loading(tiny_checkpoints, out_folder, tmp_path, no_loading, capsys):
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 48)).save(picture)
    damaged = tmp_path / "model.safetensors"
    damaged.write_bytes(b"not a checkpoint at all")
    assert main(["img2img", "--model", str(damaged), "--image", str(picture), "--prompt", "p",
                 "--out", str(out_folder / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "error: model.safetensors" in err and "Traceback" not in err
    assert _nothing_written(out_folder)


# --- the output path ---------------------------------------------------------------------------------------------

def test_an_unwritable_folder_is_refused_before_loading(tiny_checkpoints, out_folder, monkeypatch, no_loading,
                                                        capsys):
    """A read-only folder (here: the probe file cannot be created, as on a read-only mount) is refused first."""
    import errno
    import tempfile

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert main(_generate_args(tiny_checkpoints, out_folder / "x.png")) == 2
    err = capsys.readouterr().err
    assert f"error: --out {out_folder / 'x.png'}: cannot write into {out_folder} (the file system is read-only)" in err
    assert _nothing_written(out_folder)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, a folder no one can create files in")
def test_a_folder_no_one_can_write_is_refused(tiny_checkpoints, no_loading, capsys):
    assert main(_generate_args(tiny_checkpoints, Path("/sys/kernel/x.png"))) == 2
    assert "cannot write into /sys/kernel (permission denied)" in capsys.readouterr().err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tiny_checkpoints, out_folder, no_loading, capsys):
    out_folder.chmod(0o500)
    try:
        assert main(_generate_args(tiny_checkpoints, out_folder / "x.png")) == 2
    finally:
        out_folder.chmod(0o700)
    assert "permission denied" in capsys.readouterr().err
    assert _nothing_written(out_folder)


def test_a_folder_as_out_is_refused(tiny_checkpoints, out_folder, no_loading, capsys):
    folder = out_folder / "pictures.png"
    folder.mkdir()
    assert main(_generate_args(tiny_checkpoints, folder)) == 2
    assert "is a folder; name a file inside it" in capsys.readouterr().err


# --- interrupted or failing writes leave nothing ---------------------------------------------------------------

def _failing_png_writer(monkeypatch, error, after_images=0):
    """PIL writes `after_images` PNGs, then writes half of the next and raises `error`."""
    from PIL import Image as PILImage

    real_save = PILImage.Image.save
    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > after_images:
            fp.write(b"\x89PNG half a file")
            raise error
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", save)


@pytest.mark.parametrize("error, code, message", [
    (OSError(28, "No space left on device"), 2, "error: could not write {out} (the disk is full); nothing was "
                                                 "written. Free some space or choose another --out"),
    (KeyboardInterrupt(), 130, "cancelled; nothing was written"),
])
def test_a_failed_png_write_leaves_no_file(error, code, message, tiny_checkpoints, out_folder, monkeypatch, capsys):
    out = out_folder / "x.png"
    _failing_png_writer(monkeypatch, error)
    assert main(_generate_args(tiny_checkpoints, out)) == code
    err = capsys.readouterr().err
    assert message.format(out=out) in err and "Traceback" not in err
    assert _nothing_written(out_folder)


def test_a_batch_is_written_whole_or_not_at_all(tiny_checkpoints, out_folder, monkeypatch, capsys):
    _failing_png_writer(monkeypatch, OSError(28, "No space left on device"), after_images=1)
    assert main(_generate_args(tiny_checkpoints, out_folder / "x.png", "--batch-size", "2")) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert _nothing_written(out_folder)  # the complete first image was not kept either


def test_a_demo_cache_that_cannot_be_created_is_a_sentence(tmp_path, out_folder, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("SDXL_CORE_CACHE", str(blocker / "cache"))
    assert main(["demo", "--out", str(out_folder / "x.png"), "--width", "64", "--height", "64"]) == 2
    err = capsys.readouterr().err
    assert "error: the demo cannot create its cache folder" in err and "SDXL_CORE_CACHE" in err
    assert "Traceback" not in err and _nothing_written(out_folder)


def test_an_internal_error_says_so_and_asks_for_a_report(tiny_checkpoints, out_folder, monkeypatch, capsys):
    def broken(*_args, **_kwargs):
        raise RuntimeError("an unforeseen bug")

    monkeypatch.setattr(runner, "generate", broken)
    assert main(_generate_args(tiny_checkpoints, out_folder / "x.png")) == 70
    err = capsys.readouterr().err
    assert "error: internal error in sdxl_core; this is a bug" in err and "Please report it" in err
    assert "RuntimeError: an unforeseen bug" in err
    assert _nothing_written(out_folder)


_INTERRUPTED_RUN = """
import os, signal, sys
from PIL import Image
from sdxl_core.app.cli import main
from sdxl_core.runtime import atomic_write

real_save, real_unlink = Image.Image.save, atomic_write.os.unlink

def save(self, fp, *args, **kwargs):
    fp.write(b"half a PNG")
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the PNG is being written
    return real_save(self, fp, *args, **kwargs)

def unlink(path):
    os.kill(os.getpid(), signal.SIGINT)  # and again while the temporary file is being removed
    return real_unlink(path)

Image.Image.save = save
atomic_write.os.unlink = unlink
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_writing_and_again_during_cleanup(tiny_checkpoints, out_folder):
    """Real signals in a real process: the first Ctrl-C cancels, the second (during cleanup) changes nothing."""
    result = subprocess.run([sys.executable, "-c", _INTERRUPTED_RUN, *_generate_args(tiny_checkpoints,
                                                                                     out_folder / "x.png")],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 130, result.stderr
    assert "cancelled; nothing was written" in result.stderr
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    assert _nothing_written(out_folder)


def test_sigterm_cancels_like_ctrl_c(tiny_checkpoints, out_folder):
    script = _INTERRUPTED_RUN.replace("signal.SIGINT)  # Ctrl-C while", "signal.SIGTERM)  # a kill while")
    result = subprocess.run([sys.executable, "-c", script, *_generate_args(tiny_checkpoints, out_folder / "x.png")],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 130, result.stderr
    assert "cancelled; nothing was written" in result.stderr and "Traceback" not in result.stderr
    assert _nothing_written(out_folder)


def test_interrupt_handlers_are_restored_after_a_run(monkeypatch, out_folder):
    from sdxl_core.app import runner as runner_module

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(runner_module, "run_demo", lambda request, args: 0)
    assert main(["demo", "--out", str(out_folder / "x.png")]) == 0
    assert signal.getsignal(signal.SIGINT) is before
