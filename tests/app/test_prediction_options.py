"""--prediction, --zsnr and --rescale-cfg on generate, img2img and batch lines: they change how the base samples
exactly as the checkpoint's own markers would, they are recorded in the PNG, and `inspect` shows what a file
declares."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdxl_core.app.cli import main
from sdxl_core.app.inspect import describe

SMALL = ["--width", "32", "--height", "32", "--steps", "3", "--cfg", "4", "--seed", "7"]


@pytest.fixture(scope="module")
def marked(tiny_checkpoints, tmp_path_factory):
    """The demo's tiny base as it is (eps), and the same weights with ComfyUI's v_pred (+ ztsnr) markers."""
    folder = tmp_path_factory.mktemp("marked")
    base = tiny_checkpoints["base"]
    state = load_file(str(base))
    from safetensors import safe_open

    with safe_open(str(base), "pt") as handle:
        metadata = handle.metadata()
    files = {"eps": base}
    for name, markers in (("vpred", ("v_pred",)), ("vpred_zsnr", ("v_pred", "ztsnr"))):
        files[name] = folder / f"{name}.safetensors"
        save_file({**state, **{marker: torch.tensor([]) for marker in markers}}, str(files[name]), metadata=metadata)
    return files


def _generate(base, out, *extra) -> Image.Image:
    assert main(["generate", "--base", str(base), "--prompt", "a red cube", *SMALL, "--out", str(out), *extra]) == 0
    return Image.open(out)


def _pixels(image: Image.Image) -> bytes:
    return image.tobytes()


def test_the_override_samples_as_the_markers_do_and_is_recorded(marked, tmp_path):
    from_markers = _generate(marked["vpred_zsnr"], tmp_path / "markers.png", "--rescale-cfg", "0.7")
    overridden = _generate(marked["eps"], tmp_path / "flags.png", "--prediction", "v_prediction", "--zsnr",
                           "--rescale-cfg", "0.7")
    assert _pixels(overridden) == _pixels(from_markers)
    for image in (from_markers, overridden):
        assert "Prediction: v_prediction, ZSNR: True, RescaleCFG: 0.7" in image.text["parameters"]
        settings = json.loads(image.text["sdxl_core"])
        assert (settings["prediction"], settings["zsnr"], settings["rescale_cfg"]) == ("v_prediction", True, 0.7)
    plain = _generate(marked["eps"], tmp_path / "eps.png")
    assert "Prediction: eps, ZSNR: False, RescaleCFG: 0.0" in plain.text["parameters"]
    assert _pixels(plain) != _pixels(from_markers)


def test_an_explicit_prediction_sets_zsnr_as_comfyuis_node_does(marked, tmp_path):
    # ModelSamplingDiscrete(v_prediction, zsnr=False) on a v_pred+ztsnr file turns zsnr off ...
    off = _generate(marked["vpred_zsnr"], tmp_path / "off.png", "--prediction", "v_prediction")
    assert _pixels(off) == _pixels(_generate(marked["vpred"], tmp_path / "vpred.png"))
    assert "ZSNR: False" in off.text["parameters"]
    # ... eps on a v-pred file samples it as the unmarked weights, and auto + --zsnr adds zsnr to the file's type.
    eps = _generate(marked["vpred"], tmp_path / "eps.png", "--prediction", "eps")
    assert _pixels(eps) == _pixels(_generate(marked["eps"], tmp_path / "plain.png"))
    added = _generate(marked["vpred"], tmp_path / "added.png", "--zsnr")
    assert _pixels(added) == _pixels(_generate(marked["vpred_zsnr"], tmp_path / "both.png"))


def test_rescale_cfg_changes_the_image_only_when_guidance_runs(marked, tmp_path):
    plain = _generate(marked["vpred_zsnr"], tmp_path / "plain.png")
    rescaled = _generate(marked["vpred_zsnr"], tmp_path / "rescaled.png", "--rescale-cfg", "0.7")
    assert _pixels(plain) != _pixels(rescaled)


def test_img2img_takes_the_same_flags(marked, tmp_path):
    picture = tmp_path / "in.png"
    Image.fromarray((torch.arange(32 * 32 * 3) % 251).reshape(32, 32, 3).to(torch.uint8).numpy()).save(picture)

    def rework(model, out, *extra):
        assert main(["img2img", "--model", str(model), "--image", str(picture), "--prompt", "a red cube",
                     "--steps", "3", "--cfg", "4", "--seed", "2", "--strength", "0.6", "--out", str(out),
                     *extra]) == 0
        return Image.open(out)

    from_markers = rework(marked["vpred_zsnr"], tmp_path / "markers.png", "--rescale-cfg", "0.5")
    overridden = rework(marked["eps"], tmp_path / "flags.png", "--prediction", "v_prediction", "--zsnr",
                        "--rescale-cfg", "0.5")
    assert _pixels(from_markers) == _pixels(overridden)
    assert "Prediction: v_prediction, ZSNR: True, RescaleCFG: 0.5" in overridden.text["parameters"]


def test_batch_lines_carry_the_flags(marked, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a red cube", "prediction": "v_prediction", "zsnr": True,
                                "rescale_cfg": 0.7}) + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(jobs), "--base", str(marked["eps"]), *SMALL, "--out", str(out)]) == 0
    (written,) = json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])["outputs"]
    image = Image.open(written)
    assert "Prediction: v_prediction, ZSNR: True, RescaleCFG: 0.7" in image.text["parameters"]
    reference = _generate(marked["vpred_zsnr"], tmp_path / "reference.png", "--rescale-cfg", "0.7")
    assert _pixels(image) == _pixels(reference)


@pytest.mark.parametrize("extra, message", [
    (["--rescale-cfg", "1.5"], "share in [0, 1]"),
    (["--rescale-cfg", "nan"], "RescaleCFG multiplier"),
    (["--prediction", "x0"], "invalid choice"),
])
def test_bad_values_are_refused_with_a_sentence(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path / "x.png"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_inspect_shows_the_prediction_type_and_zsnr(marked, capsys):
    assert main(["inspect", str(marked["vpred_zsnr"]), str(marked["eps"])]) == 0
    text = capsys.readouterr().out
    assert "prediction: v_prediction, zero terminal SNR (from the v_pred and ztsnr markers" in text
    assert "prediction: eps, no zero terminal SNR (from no v_pred marker" in text
    data = describe(marked["vpred"]).to_json()
    assert (data["prediction"], data["zsnr"]) == ("v_prediction", False)
    assert main(["inspect", "--json", str(marked["vpred_zsnr"])]) == 0
    assert json.loads(capsys.readouterr().out)["zsnr"] is True


def test_batch_names_change_only_when_an_override_is_set(marked):
    from sdxl_core.app.batch_jobs import JobReader

    reader = JobReader({"base": marked["eps"]}, None)
    plain = reader.job(1, json.dumps({"prompt": "a red cube"}))
    again = reader.job(2, json.dumps({"prompt": "a red cube", "rescale_cfg": 0.0, "prediction": "auto"}))
    assert again.name == plain.name  # the defaults spelt out name the same image
    for line in ({"rescale_cfg": 0.7}, {"prediction": "v_prediction"}, {"zsnr": True}):
        assert reader.job(3, json.dumps({"prompt": "a red cube", **line})).name != plain.name, line
