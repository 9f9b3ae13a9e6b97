"""The command line: generate on tiny checkpoints, the demo, and a clear message for every bad argument."""

import json

import pytest
import torch
from PIL import Image

from sdxl_core.app.cli import main


def _generate_args(paths, out, *extra):
    return ["generate", "--base", str(paths["base"]), "--refiner", str(paths["refiner"]), "--prompt", "a red cube",
            "--width", "64", "--height", "48", "--steps", "3", "--refiner-start", "2", "--cfg", "2.5",
            "--seed", "3", "--out", str(out), *extra]


def test_generate_writes_a_png_with_its_parameters(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "cube.png"
    assert main(_generate_args(tiny_checkpoints, out, "--original-size", "128x96", "--crop-top-left", "4,8")) == 0
    image = Image.open(out)
    assert image.size == (64, 48)
    settings = json.loads(image.text["sdxl_core"])
    assert settings["original_size"] == [96, 128]  # stored as (h, w), as sgm orders it
    assert settings["crop_top_left"] == [4, 8]
    assert settings["target_size"] == [48, 64]
    assert settings["refiner_start"] == 2 and settings["seed"] == 3
    assert "Steps: 3" in image.text["parameters"]
    assert "wrote" in capsys.readouterr().out
    # Same seed, same picture.
    again = tmp_path / "again.png"
    assert main(_generate_args(tiny_checkpoints, again, "--original-size", "128x96", "--crop-top-left", "4,8")) == 0
    assert Image.open(again).tobytes() == image.tobytes()


@pytest.mark.parametrize("extra, message", [
    (["--width", "100"], "give both --width and --height"),
    (["--bucket", "wide"], "W:H"),
    (["--original-size", "big"], "WIDTHxHEIGHT"),
    (["--crop-top-left", "1"], "TOP,LEFT"),
    (["--refiner-switch", "1.5"], "fraction"),
    (["--sampler", "nope"], "invalid choice"),
])
def test_bad_arguments_say_what_was_expected(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path / "x.png"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_size_not_a_multiple_of_8_and_refiner_start_past_the_end(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "x.png"), "--width", "100", "--height", "64"])
    assert "multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "x.png"), "--steps", "4", "--refiner-start", "9"])
    assert "refiner start step" in capsys.readouterr().err


def test_wrong_checkpoint_in_a_slot_is_an_error_not_a_traceback(tiny_checkpoints, tmp_path, capsys):
    swapped = {"base": tiny_checkpoints["refiner"], "refiner": tiny_checkpoints["base"]}
    out = tmp_path / "x.png"
    assert main(_generate_args(swapped, out)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "refiner" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_output_folder_is_refused_before_loading(tiny_checkpoints, tmp_path, capsys):
    assert main(_generate_args(tiny_checkpoints, tmp_path / "nowhere" / "x.png")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_runs_the_whole_path(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_CORE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--width", "64", "--height", "64", "--steps", "2"]) == 0
    assert Image.open(out).size == (64, 64)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*/*.safetensors")) == [
        "tiny_sdxl_base.safetensors", "tiny_sdxl_refiner.safetensors"]


@pytest.mark.parametrize("failure, message", [
    ("residency", "budget"),
    ("oom", "out of memory"),
])
def test_gpu_memory_failures_are_a_sentence_not_a_traceback(tiny_checkpoints, tmp_path, capsys, monkeypatch,
                                                           failure, message):
    """A residency budget that cannot hold a stage, or the card running out of memory, ends the run with exit
    code 2 and a sentence (with the --low-vram hint for out-of-memory), like every other refusal."""
    import torch

    from sdxl_core.app import runner
    from sdxl_core.runtime.residency import ResidencyError

    def fail(*_args, **_kwargs):
        if failure == "residency":
            raise ResidencyError("this stage needs 4.80 GiB of weights but the plan's budget is 3.00 GiB")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(runner, "generate", fail)
    out = tmp_path / "x.png"
    assert main(_generate_args(tiny_checkpoints, out)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    if failure == "oom":
        assert "--low-vram" in err
    assert not out.exists()


def test_a_refiner_switch_fraction_always_gives_a_valid_step(tmp_path, monkeypatch):
    """--refiner-switch accepts any fraction in (0, 1); on few steps it must round to a step in 1..N rather than
    to 0, which the request then refuses as if the user had typed a bad --refiner-start."""
    from sdxl_core.app import cli, runner

    seen = {}
    monkeypatch.setattr(runner, "run_demo", lambda request, args: seen.setdefault("request", request) and 0)
    assert cli.main(["demo", "--out", str(tmp_path / "x.png"), "--steps", "2", "--refiner-switch", "0.2"]) == 0
    assert seen["request"].refiner_start == 1


def test_generate_with_an_embeddings_folder(tiny_checkpoints, tmp_path, capsys):
    from safetensors.torch import save_file

    from sdxl_core.config import TINY_CLIP_G, TINY_CLIP_L

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"clip_l": torch.randn(2, TINY_CLIP_L.hidden_size), "clip_g": torch.randn(2, TINY_CLIP_G.hidden_size)},
              str(folder / "shiny.safetensors"))
    out = tmp_path / "shiny.png"
    args = _generate_args(tiny_checkpoints, out, "--embeddings", str(folder))
    args[args.index("--prompt") + 1] = "a (embedding:shiny:1.2) red cube"
    assert main(args) == 0
    assert json.loads(Image.open(out).text["sdxl_core"])["embeddings"] == [str(folder)]
    # A name that is not there is an error naming what is, before anything is written.
    missing = tmp_path / "missing.png"
    args[args.index("--out") + 1] = str(missing)
    args[args.index("--prompt") + 1] = "embedding:dull cube"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "embedding:dull" in err and "available: shiny" in err and "Traceback" not in err
    assert not missing.exists()


def test_embeddings_option_needs_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "x.png"), "--embeddings", str(tmp_path / "nowhere")])
    assert "is not a folder" in capsys.readouterr().err


def _picture(path, width=64, height=48):
    pixels = (torch.arange(height * width * 3) % 251).reshape(height, width, 3).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def _img2img_args(model, image, out, *extra):
    return ["img2img", "--model", str(model), "--image", str(image), "--prompt", "a red cube", "--steps", "3",
            "--cfg", "2.5", "--seed", "4", "--out", str(out), *extra]


def test_img2img_reworks_a_picture_with_the_refiner_and_records_how(tiny_checkpoints, tmp_path, capsys):
    source = _picture(tmp_path / "in.png")
    out = tmp_path / "refined.png"
    assert main(_img2img_args(tiny_checkpoints["refiner"], source, out, "--strength", "0.4")) == 0
    image = Image.open(out)
    assert image.size == (64, 48)
    settings = json.loads(image.text["sdxl_core"])
    assert settings["strength"] == 0.4 and settings["model_kind"] == "refiner" and settings["steps"] == 3
    assert "Denoising strength: 0.4" in image.text["parameters"]
    assert image.tobytes() != Image.open(source).tobytes()
    # The base reworks pictures too; the kind is read from the file.
    base_out = tmp_path / "base.png"
    assert main(_img2img_args(tiny_checkpoints["base"], source, base_out, "--prompt-l", "a cube")) == 0
    assert json.loads(Image.open(base_out).text["sdxl_core"])["model_kind"] == "base"
    assert capsys.readouterr().out.count("wrote") == 2


@pytest.mark.parametrize("setup, extra, message", [
    (lambda tmp: _picture(tmp / "odd.png", 60, 48), [], "is 60x48 pixels; SDXL's VAE needs sides that are multiples "
                                                        "of 8: crop or resize it to 56x48"),
    (lambda tmp: tmp / "missing.png", [], "does not exist"),
    (lambda tmp: (tmp / "notes.png").write_text("not a picture") and tmp / "notes.png", [], "is not a picture"),
])
def test_img2img_bad_pictures_are_sentences_and_write_nothing(tiny_checkpoints, tmp_path, capsys, setup, extra,
                                                              message):
    out = tmp_path / "out.png"
    assert main(_img2img_args(tiny_checkpoints["refiner"], setup(tmp_path), out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_img2img_strength_outside_its_range_is_refused(tiny_checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_img2img_args(tiny_checkpoints["refiner"], tmp_path / "x.png", tmp_path / "y.png", "--strength", "0"))
    assert exit_info.value.code == 2
    assert "in (0, 1]" in capsys.readouterr().err


def test_batch_size_writes_one_file_per_image(tiny_checkpoints, tmp_path):
    out = tmp_path / "batch.png"
    assert main(_generate_args(tiny_checkpoints, out, "--batch-size", "2")) == 0
    first, second = Image.open(out), Image.open(tmp_path / "batch_1.png")
    assert first.size == second.size == (64, 48)
    assert first.tobytes() != second.tobytes()  # one seed, a batch of different noise, as ComfyUI draws it
    assert json.loads(first.text["sdxl_core"])["batch_size"] == 2


@pytest.fixture(scope="module")
def lora_file(tiny_checkpoints, tmp_path_factory):
    pytest.importorskip("diffusers")  # the test LoRA is named from diffusers' module paths
    from safetensors.torch import save_file

    from sdxl_core.checkpoints.loading import load_checkpoint
    from tests._lora_files import kohya_lora

    path = tmp_path_factory.mktemp("loras") / "style.safetensors"
    save_file(kohya_lora(load_checkpoint(tiny_checkpoints["base"]), seed=3), str(path))
    return path


def test_generate_merges_loras_into_the_base(tiny_checkpoints, lora_file, tmp_path):
    plain, styled, off = tmp_path / "plain.png", tmp_path / "styled.png", tmp_path / "off.png"
    assert main(_generate_args(tiny_checkpoints, plain)) == 0
    assert main(_generate_args(tiny_checkpoints, styled, "--lora", f"{lora_file}:0.7")) == 0
    assert main(_generate_args(tiny_checkpoints, off, "--lora", f"{lora_file}:0:0")) == 0
    assert Image.open(styled).tobytes() != Image.open(plain).tobytes()
    assert Image.open(off).tobytes() == Image.open(plain).tobytes()  # strength 0: the model as loaded
    assert json.loads(Image.open(styled).text["sdxl_core"])["loras"] == [[str(lora_file), 0.7, 0.7]]


def test_a_base_lora_on_the_refiner_is_a_sentence(tiny_checkpoints, lora_file, tmp_path, capsys):
    source = _picture(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(_img2img_args(tiny_checkpoints["refiner"], source, out, "--lora", str(lora_file))) == 2
    assert "refiner" in capsys.readouterr().err
    assert not out.exists()


def test_lora_option_reads_strengths_from_the_right(tmp_path):
    from sdxl_core.app.options import _lora

    odd = tmp_path / "c:style.safetensors"  # a colon inside the name (a Windows drive letter) stays in the path
    odd.write_bytes(b"")
    assert _lora(str(odd)) == (odd, 1.0, 1.0)
    assert _lora(f"{odd}:0.5") == (odd, 0.5, 0.5)
    assert _lora(f"{odd}:0.5:-1") == (odd, 0.5, -1.0)
    with pytest.raises(Exception, match="is not a file"):
        _lora(str(tmp_path / "missing.safetensors:0.5"))
    with pytest.raises(Exception, match="must be finite numbers"):
        _lora(f"{odd}:nan")
