"""The node pack without ComfyUI: contract of every node, the two-stage graph on tiny checkpoints, validation."""

import gc
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nodes
from nodes import comfy_host
from tests._nodes_helpers import PREFIX, model_folders, node, node_class, use_folders

REPO = Path(__file__).resolve().parents[2]
SIZE_W, SIZE_H = 64, 96  # pixels: an 8x12 latent keeps every UNet call in milliseconds
STEPS, HANDOFF = 3, 2


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory):
    found = model_folders(tmp_path_factory.mktemp("models"), tiny_checkpoints)
    use_folders(found)
    yield found
    comfy_host.set_standalone_model_folders({})


@pytest.fixture(scope="module")
def loaded(folders):
    base, base_vae = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default")
    refiner, _ = node("CheckpointLoader").load("tiny_sdxl_refiner.safetensors", "default")
    return base, base_vae, refiner


@pytest.fixture(scope="module")
def conds(loaded):
    base, _, refiner = loaded
    return {
        "base": (node("TextEncodeBase").encode(base, "a red cube", "", "encode")[0],
                 node("TextEncodeBase").encode(base, "blurry", "", "encode")[0]),
        "refiner": (node("TextEncodeRefiner").encode(refiner, "a red cube", "encode")[0],
                    node("TextEncodeRefiner").encode(refiner, "blurry", "encode")[0]),
    }


def _all_inputs(cls):
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


# --- the node contract ---------------------------------------------------------------------------------------------

def test_every_node_follows_the_v1_contract():
    assert not nodes.FAILED_FAMILIES
    # Every family's nodes are registered, none under another family's id.
    families = [importlib.import_module(f"nodes.{family}") for family in nodes.FAMILIES]
    assert len(nodes.NODE_CLASS_MAPPINGS) == sum(len(family.NODE_CLASS_MAPPINGS) for family in families)
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert name.startswith(PREFIX) and name in nodes.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY.startswith("sdxl_two_stage/")
        assert callable(getattr(cls, cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        assert cls.DESCRIPTION
        # Words the node search finds it by (V3 schemas that carry search aliases show them).
        assert cls.SEARCH_ALIASES and all(isinstance(word, str) and word for word in cls.SEARCH_ALIASES), name
        for input_name, entry in _all_inputs(cls).items():
            assert len(entry) == 2, f"{name}.{input_name}"
            assert len(entry[1].get("tooltip", "")) > 20, f"{name}.{input_name} needs a tooltip"


def test_micro_conditioning_tooltips_explain_the_fields():
    inputs = _all_inputs(node_class("MicroConditioning"))
    assert "original" in inputs["width"][1]["tooltip"].lower()
    assert "crop" in inputs["crop_w"][1]["tooltip"].lower() and "left" in inputs["crop_w"][1]["tooltip"].lower()
    assert "bucket" in inputs["target_width"][1]["tooltip"].lower()
    assert "2.5" in _all_inputs(node_class("AestheticScore"))["aesthetic_score"][1]["tooltip"]


def test_combo_defaults_are_options():
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        for input_name, (spec, options) in _all_inputs(cls).items():
            if isinstance(spec, list) and spec and "default" in options:
                assert options["default"] in spec, f"{name}.{input_name}"


def _import_like_comfyui(code: str, before: str = "") -> str:
    """Run `code` after importing the repo as ComfyUI does (a package named after its path, no ComfyUI)."""
    script = (
        before + "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('custom_nodes_x_pack', {str(REPO / '__init__.py')!r})\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)\n"
        + code)
    result = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_pack_imports_like_comfyui_without_heavy_modules():
    out = _import_like_comfyui(
        "print(len(pack.NODE_CLASS_MAPPINGS), pack.WEB_DIRECTORY)\n"
        "print('heavy:', sorted(m for m in ('transformers', 'sdxl_core.pipeline', 'sdxl_core.models.unet', 'comfy') "
        "if m in sys.modules))\n")
    assert f"{len(nodes.NODE_CLASS_MAPPINGS)} ./web/js" in out
    assert "heavy: []" in out
    assert (REPO / "web" / "js" / "sdxl_two_stage.js").is_file()


def test_a_broken_family_leaves_the_others_loaded():
    out = _import_like_comfyui("print(sorted(pack.NODE_CLASS_MAPPINGS))\n",
                               before="import sys; sys.modules['sdxl_core.sampling.samplers'] = None\n")
    assert "SDXLTwoStage.CheckpointLoader" in out and "SDXLTwoStage.BaseSampler" not in out
    assert "sampling nodes are unavailable" in out


# --- loaders -------------------------------------------------------------------------------------------------------

def test_loader_lists_only_model_files(folders):
    choices = node_class("CheckpointLoader").INPUT_TYPES()["required"]["ckpt_name"][0]
    assert choices == ["tiny_sdxl_base.safetensors", "tiny_sdxl_refiner.safetensors"]
    assert node_class("VAELoader").INPUT_TYPES()["required"]["vae_name"][0] == ["tiny_sdxl_vae.safetensors"]


def test_loader_reports_stage_and_shares_loaded_files(loaded, folders):
    base, base_vae, refiner = loaded
    assert (base.kind, refiner.kind) == ("base", "refiner")
    assert base_vae is base.vae
    again, _ = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default")
    assert again is base  # one copy in memory while something still holds it
    fp32, _ = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "fp32")
    assert fp32 is base  # "default" is fp32 on the CPU: the same cache entry would be fine either way
    bf16, _ = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "bf16")
    assert bf16 is not base and next(bf16.unet.parameters()).dtype == torch.bfloat16


def test_loader_cache_lets_go_when_nobody_holds_the_model(folders):
    model, _ = node("CheckpointLoader").load("tiny_sdxl_refiner.safetensors", "bf16")
    first_id = id(model)
    del model, _
    gc.collect()
    from nodes import loaders

    assert all(id(value) != first_id for value in loaders._cache.values())


def test_loader_errors_are_sentences(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="was not found in the 'checkpoints' folders"):
        node("CheckpointLoader").load("missing.safetensors", "default")
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "fp8")


def test_separate_vae_matches_the_checkpoint_vae(loaded, folders):
    _, base_vae, _ = loaded
    (vae,) = node("VAELoader").load("tiny_sdxl_vae.safetensors", "default")
    for (name, a), (_, b) in zip(vae.state_dict().items(), base_vae.state_dict().items()):
        assert torch.equal(a, b), name


def test_loader_takes_a_separate_vae_for_a_checkpoint_without_one(loaded, folders, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nodes.loaders import BAKED_VAE

    _, base_vae, _ = loaded
    vae_choices = node_class("CheckpointLoader").INPUT_TYPES()["optional"]["vae_name"]
    assert vae_choices[0] == [BAKED_VAE, "tiny_sdxl_vae.safetensors"] and vae_choices[1]["default"] == BAKED_VAE
    source = Path(folders["checkpoints"][0]) / "tiny_sdxl_base.safetensors"
    with safe_open(str(source), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("first_stage_model.")}
        metadata = f.metadata()
    extra = tmp_path / "checkpoints"
    extra.mkdir()
    save_file(state, str(extra / "no_vae.safetensors"), metadata=metadata)
    use_folders({**folders, "checkpoints": [*folders["checkpoints"], str(extra)]})
    try:
        with pytest.raises(Exception, match="has no VAE.*the vae_name input of the ComfyUI loader node"):
            node("CheckpointLoader").load("no_vae.safetensors", "default")
        model, vae = node("CheckpointLoader").load("no_vae.safetensors", "default", "tiny_sdxl_vae.safetensors")
        assert vae is model.vae and vae is not base_vae
        for (name, a), (_, b) in zip(vae.state_dict().items(), base_vae.state_dict().items()):
            assert torch.equal(a, b), name
        # The same checkpoint with another VAE choice is another model, not the cached one.
        baked, _ = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default", BAKED_VAE)
        separate, _ = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default",
                                                    "tiny_sdxl_vae.safetensors")
        assert baked is not separate and baked.vae is not separate.vae
    finally:
        use_folders(folders)


# --- conditioning --------------------------------------------------------------------------------------------------

def test_text_encode_leaves_sizes_to_the_latent(conds):
    positive, _ = conds["base"]
    context, options = positive[0]
    assert set(options) == {"pooled_output"}
    assert context.shape[:2] == (1, 77) and options["pooled_output"].shape == (1, 1280)
    refiner_context, refiner_options = conds["refiner"][0][0]
    assert set(refiner_options) == {"pooled_output"} and refiner_context.shape[-1] < context.shape[-1]


def test_micro_conditioning_sets_comfyui_fields_without_touching_the_input(conds):
    positive, _ = conds["base"]
    (out,) = node("MicroConditioning").apply(positive, 4096, 2048, 16, 32, 1024, 512)
    assert out[0][1] == {**positive[0][1], "width": 4096, "height": 2048, "crop_w": 16, "crop_h": 32,
                         "target_width": 1024, "target_height": 512}
    assert out[0][0] is positive[0][0] and set(positive[0][1]) == {"pooled_output"}
    (scored,) = node("AestheticScore").apply(conds["refiner"][1], 2.5)
    assert scored[0][1]["aesthetic_score"] == 2.5


def test_text_encode_reads_embeddings_from_the_embeddings_folder(loaded, folders, tmp_path):
    from safetensors.torch import save_file

    from sdxl_core.pipeline import encode_base_conditioning, encode_refiner_conditioning

    base, _, refiner = loaded
    widths = {"clip_l": base.clip_l.config.hidden_size, "clip_g": base.clip_g.config.hidden_size}
    (tmp_path / "styles").mkdir()
    save_file({key: torch.randn(3, width) for key, width in widths.items()},
              str(tmp_path / "styles" / "shiny.safetensors"))
    save_file({"clip_l": torch.randn(2, widths["clip_l"])}, str(tmp_path / "l_only.safetensors"))
    use_folders({**folders, "embeddings": [str(tmp_path), str(tmp_path / "not_there")]})
    try:
        prompt = "a (embedding:shiny:1.2) cube"
        (base_cond,) = node("TextEncodeBase").encode(base, prompt, "", "encode")
        (refiner_cond,) = node("TextEncodeRefiner").encode(refiner, prompt, "encode")
        with pytest.raises(ValueError, match=r"embedding:dull, which is not in .*available: l_only, styles/shiny"):
            node("TextEncodeBase").encode(base, "embedding:dull", "", "encode")
        with pytest.raises(ValueError, match="no 'clip_g'"):
            node("TextEncodeRefiner").encode(refiner, "embedding:l_only", "encode")
    finally:
        use_folders(folders)
    want = encode_base_conditioning(base, prompt, embeddings=tmp_path)
    assert torch.equal(base_cond[0][0], want[0][0])
    assert torch.equal(base_cond[0][1]["pooled_output"], want[0][1]["pooled_output"])
    want_refiner = encode_refiner_conditioning(refiner, prompt, embeddings=tmp_path)
    assert torch.equal(refiner_cond[0][0], want_refiner[0][0])
    plain = encode_base_conditioning(base, "a (shiny:1.2) cube")
    assert not torch.equal(base_cond[0][0], plain[0][0])


def test_text_encode_refuses_the_other_stage(loaded):
    base, _, refiner = loaded
    with pytest.raises(ValueError, match="needs the SDXL base checkpoint, but the model given is the SDXL refiner"):
        node("TextEncodeBase").encode(refiner, "a", "", "encode")
    with pytest.raises(ValueError, match="needs the SDXL refiner checkpoint"):
        node("TextEncodeRefiner").encode(base, "a", "encode")


# --- latent --------------------------------------------------------------------------------------------------------

def test_empty_latent_buckets_and_custom_sizes():
    cls = node_class("EmptyLatent")
    choices = cls.INPUT_TYPES()["required"]["resolution"][0]
    assert choices[0] == "custom" and len(choices) == 41 and "1024x1024 (1:1)" in choices
    latent, width, height = node("EmptyLatent").generate("1344x768 (7:4)", 64, 64, 2)
    assert (width, height) == (1344, 768) and latent["samples"].shape == (2, 4, 96, 168)
    latent, width, height = node("EmptyLatent").generate("custom", 72, 64, 1)
    assert (width, height) == (72, 64) and latent["samples"].shape == (1, 4, 8, 9)
    assert not latent["samples"].any()


def test_empty_latent_validation():
    from nodes.latent import _check

    with pytest.raises(ValueError) as refused:
        _check("custom", 1000, 1001, 1)
    assert str(refused.value) == ("height must be a multiple of 8 pixels (one latent cell), got 1001; the nearest are "
                                  "1000 and 1008")
    _check("custom", 1000, 1000, 1)
    with pytest.raises(ValueError, match="at least 64"):
        _check("custom", 8, 64, 1)
    with pytest.raises(ValueError, match="must be one of"):
        _check("999x1 (x)", 64, 64, 1)
    # With a bucket chosen the free size is unused, so it need not be valid.
    _check("1024x1024 (1:1)", 1001, 64, 1)
    with pytest.raises(ValueError, match="multiple of 8"):
        node("EmptyLatent").generate("custom", 100, 64, 1)


# --- sampling ------------------------------------------------------------------------------------------------------

def _two_stage(loaded, conds, seed=11):
    base, base_vae, refiner = loaded
    latent, _, _ = node("EmptyLatent").generate("custom", SIZE_W, SIZE_H, 1)
    (handoff,) = node("BaseSampler").sample(base, *conds["base"], latent, seed, STEPS, 4.0, "euler", "normal",
                                            HANDOFF, True, 1.0)
    (refined,) = node("RefinerSampler").sample(refiner, *conds["refiner"], handoff, seed, STEPS, 4.0, "euler",
                                               "normal", HANDOFF, 1.0)
    (image,) = node("VAEDecode").decode(base_vae, refined, "auto")
    return handoff, refined, image


def test_two_stage_graph_equals_the_core_pipeline(loaded, conds):
    """The node graph (latent-size micro-conditioning by default) reproduces `pipeline.generate` bit for bit."""
    from sdxl_core.pipeline import GenerationRequest, generate

    base, _, refiner = loaded
    handoff, refined, image = _two_stage(loaded, conds)
    request = GenerationRequest(prompt="a red cube", negative="blurry", width=SIZE_W, height=SIZE_H, steps=STEPS,
                                refiner_start=HANDOFF, cfg=4.0, sampler="euler", scheduler="normal", seed=11)
    expected = generate(base, refiner, request)
    assert torch.equal(refined["samples"], expected.latent["samples"])
    assert torch.equal(image, expected.images)
    assert image.shape == (1, SIZE_H, SIZE_W, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0



def test_refiner_checks_the_handoff_it_continues(loaded, conds):
    """A handed-off latent says where the base stopped; a refiner set to another step, step count or scheduler, or
    to start over (re-noising the leftover noise), stops with a sentence instead of silently mis-denoising."""
    base, _, refiner = loaded
    handoff, refined, _ = _two_stage(loaded, conds)
    refine = node("RefinerSampler").sample
    with pytest.raises(ValueError, match=f"handed off at step {HANDOFF} of {STEPS}.*start_at_step = {HANDOFF}"):
        refine(refiner, *conds["refiner"], handoff, 11, STEPS, 4.0, "euler", "normal", HANDOFF - 1, 1.0)
    with pytest.raises(ValueError, match=f"handed off at step {HANDOFF} of {STEPS}.*steps = {STEPS}"):
        refine(refiner, *conds["refiner"], handoff, 11, STEPS + 1, 4.0, "euler", "normal", HANDOFF, 1.0)
    with pytest.raises(ValueError, match="scheduler normal"):
        refine(refiner, *conds["refiner"], handoff, 11, STEPS, 4.0, "euler", "karras", HANDOFF, 1.0)
    with pytest.raises(ValueError, match="still holds the base's noise"):
        refine(refiner, *conds["refiner"], handoff, 11, STEPS, 4.0, "euler", "normal", 0, 0.3)
    # What the refiner returns is finished: no handoff mark travels on, and a finished base latent carries none.
    assert set(refined) == {"samples"}
    (finished,) = node("BaseSampler").sample(base, *conds["base"], handoff, 11, STEPS, 4.0, "euler", "normal",
                                             STEPS, True, 1.0)
    assert set(finished) == {"samples"}
    # A latent from elsewhere (core KSamplerAdvanced, a file) carries no mark and is taken as it is.
    refine(refiner, *conds["refiner"], {"samples": handoff["samples"]}, 11, STEPS, 4.0, "euler", "normal",
           HANDOFF - 1, 1.0)

def test_base_sampler_widgets_map_to_ksampler_advanced(loaded, conds):
    """end_at_step / leftover_noise mean what KSamplerAdvanced's end_at_step / return_with_leftover_noise mean."""
    from sdxl_core.sampling.ksampler import sample_latent
    from sdxl_core.sampling.settings import SamplingSettings

    base = loaded[0]
    latent, _, _ = node("EmptyLatent").generate("custom", SIZE_W, SIZE_H, 1)
    settings = SamplingSettings(seed=3, steps=STEPS, cfg=4.0, sampler="euler", scheduler="normal")

    def run(end, leftover):
        return node("BaseSampler").sample(base, *conds["base"], latent, 3, STEPS, 4.0, "euler", "normal", end,
                                          leftover, 1.0)[0]["samples"]

    def core(**kwargs):
        return sample_latent(base, latent, *conds["base"], settings, **kwargs)["samples"]

    assert torch.equal(run(STEPS, True), core())  # K = N: the base alone, fully denoised
    assert torch.equal(run(HANDOFF, True), core(end_step=HANDOFF, return_with_leftover_noise=True))
    assert torch.equal(run(HANDOFF, False), core(end_step=HANDOFF))
    assert not torch.equal(run(HANDOFF, True), run(HANDOFF, False))


def test_refiner_img2img_by_strength(loaded, conds):
    _, base_vae, refiner = loaded
    image = torch.rand(1, SIZE_H, SIZE_W, 3, generator=torch.Generator().manual_seed(0))
    (latent,) = node("VAEEncode").encode(base_vae, image, "auto")
    assert latent["samples"].shape == (1, 4, SIZE_H // 8, SIZE_W // 8)
    (again,) = node("VAEEncode").encode(base_vae, image, "auto")
    assert torch.equal(latent["samples"], again["samples"])  # deterministic, so ComfyUI's cache tells the truth
    (light,) = node("RefinerSampler").sample(refiner, *conds["refiner"], latent, 5, STEPS, 4.0, "euler", "normal",
                                             0, 0.3, )
    assert light["samples"].shape == latent["samples"].shape
    assert not torch.equal(light["samples"], latent["samples"])
    (nothing,) = node("RefinerSampler").sample(refiner, *conds["refiner"], latent, 5, STEPS, 4.0, "euler",
                                               "normal", 0, 0.0)
    assert torch.equal(nothing["samples"], latent["samples"])  # denoise 0 changes nothing


def test_tiled_decode_on_request(loaded, conds):
    _, base_vae, _ = loaded
    latent = {"samples": torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(1))}
    full = node("VAEDecode").decode(base_vae, latent, "never")[0]
    tiled = node("VAEDecode").decode(base_vae, latent, "always")[0]
    assert full.shape == tiled.shape == (1, 96, 64, 3)
    with pytest.raises(ValueError, match="tiling must be one of"):
        node("VAEDecode").decode(base_vae, latent, "sometimes")


# --- validation: every wiring mistake is a sentence, never a shape traceback ---------------------------------------

def test_refiner_conditioning_into_the_base_sampler(loaded, conds):
    base = loaded[0]
    latent, _, _ = node("EmptyLatent").generate("custom", SIZE_W, SIZE_H, 1)
    with pytest.raises(ValueError, match="this is refiner conditioning wired into the base model"):
        node("BaseSampler").sample(base, conds["refiner"][0], conds["base"][1], latent, 0, STEPS, 4.0, "euler",
                                   "normal", HANDOFF, True, 1.0)


def test_base_conditioning_into_the_refiner(loaded, conds):
    refiner = loaded[2]
    latent, _, _ = node("EmptyLatent").generate("custom", SIZE_W, SIZE_H, 1)
    with pytest.raises(ValueError, match="negative conditioning .* this is base conditioning wired into the refiner"):
        node("RefinerSampler").sample(refiner, conds["refiner"][0], conds["base"][1], latent, 0, STEPS, 4.0, "euler",
                                      "normal", HANDOFF, 1.0)


def test_wrong_checkpoint_in_each_sampler_slot(loaded, conds):
    base, _, refiner = loaded
    latent, _, _ = node("EmptyLatent").generate("custom", SIZE_W, SIZE_H, 1)
    with pytest.raises(ValueError, match="SDXL Latent Refiner needs the SDXL refiner checkpoint, but the model "
                                         "given is the SDXL base"):
        node("RefinerSampler").sample(base, *conds["base"], latent, 0, STEPS, 4.0, "euler", "normal", HANDOFF, 1.0)
    with pytest.raises(ValueError, match="SDXL Base Sampler needs the SDXL base checkpoint"):
        node("BaseSampler").sample(refiner, *conds["refiner"], latent, 0, STEPS, 4.0, "euler", "normal", HANDOFF,
                                   True, 1.0)


def test_step_validation_before_running():
    from nodes.sampling import _check_base, _check_refiner

    _check_base(25, 20, 1.0)
    with pytest.raises(ValueError, match=r"^end_at_step \(K = 30\) is past the last step \(N = 25\)"):
        _check_base(25, 30, 1.0)
    with pytest.raises(ValueError, match="at least 1"):
        _check_base(0, 0, 1.0)
    with pytest.raises(ValueError, match="at most 1.0"):
        _check_base(25, 20, 1.5)
    _check_refiner(25, 20, 1.0)
    with pytest.raises(ValueError, match=r"^start_at_step \(K = 26\) is past the last step \(N = 25\)"):
        _check_refiner(25, 26, 1.0)
    with pytest.raises(ValueError, match="use either start_at_step"):
        _check_refiner(25, 20, 0.3)
    with pytest.raises(ValueError, match="past the last step"):
        node("BaseSampler").sample(None, [], [], {}, 0, 25, 4.0, "euler", "normal", 30, True, 1.0)


def test_no_node_repeats_a_validation_sentence_over_several_inputs():
    """ComfyUI reports a VALIDATE_INPUTS sentence once per input in its signature: a check over several inputs
    belongs in the node's function, where it is raised once."""
    import inspect

    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if hasattr(cls, "VALIDATE_INPUTS"):
            parameters = [p for p in inspect.signature(cls.VALIDATE_INPUTS).parameters if p != "cls"]
            assert len(parameters) <= 1, f"{name}.VALIDATE_INPUTS takes {parameters}"


def test_base_refuses_a_handoff_from_a_shortened_img2img_schedule(loaded, conds):
    # With denoise < 1 the base's step K lies on a shortened grid (lower noise) while the refiner continues step K
    # of the full N-step grid: the handed-off latent would be treated as noisier than it is.
    from nodes.sampling import _check_base

    with pytest.raises(ValueError, match="denoise 1.0.*start_at_step 0"):
        _check_base(25, 20, 0.6, True)
    _check_base(25, 20, 0.6, False)
    _check_base(25, 25, 0.6, True)
    latent, _, _ = node("EmptyLatent").generate("custom", SIZE_W, SIZE_H, 1)
    with pytest.raises(ValueError, match="denoise 1.0"):
        node("BaseSampler").sample(loaded[0], *conds["base"], latent, 0, 4, 4.0, "euler", "normal", 3, True, 0.5)

def test_step_validation_also_guards_direct_calls(loaded, conds):
    base = loaded[0]
    latent, _, _ = node("EmptyLatent").generate("custom", SIZE_W, SIZE_H, 1)
    with pytest.raises(ValueError, match="past the last step"):
        node("BaseSampler").sample(base, *conds["base"], latent, 0, 4, 4.0, "euler", "normal", 9, True, 1.0)
    with pytest.raises(ValueError, match="sampler_name must be one of"):
        node("BaseSampler").sample(base, *conds["base"], latent, 0, 4, 4.0, "nope", "normal", 2, True, 1.0)


def test_decode_refuses_a_model_in_the_vae_slot(loaded):
    base = loaded[0]
    with pytest.raises(ValueError, match="expected an SDXL VAE"):
        node("VAEDecode").decode(base, {"samples": torch.zeros(1, 4, 8, 8)}, "auto")


def test_image_sides_not_multiple_of_8_on_encode(loaded):
    with pytest.raises(ValueError, match="multiples of 8"):
        node("VAEEncode").encode(loaded[1], torch.rand(1, 60, 64, 3), "auto")


def test_vae_encode_gives_the_posterior_mean_like_comfyui(loaded):
    """ComfyUI's VAEEncode returns the posterior's mean (its regularizer samples only when asked), so the pack's
    encode gives the same latent for the same image and the two nodes can stand in for each other."""
    from sdxl_core.runtime.vae_decoding import encode_images

    vae = loaded[1]
    image = torch.rand(1, SIZE_H, SIZE_W, 3, generator=torch.Generator().manual_seed(5))
    (latent,) = node("VAEEncode").encode(vae, image, "never")
    mean = encode_images(vae, image.movedim(-1, 1) * 2 - 1, sample=False, tiled=False)
    torch.testing.assert_close(latent["samples"], mean.float().cpu())


def test_core_image_to_image_is_the_nodes_img2img_chain(loaded):
    """`sdxl_core.pipeline.image_to_image` (the CLI's img2img) is VAE Encode -> Refiner Sampler (start 0, denoise)
    -> VAE Decode with the refiner's text-encode nodes, bit for bit."""
    from sdxl_core.pipeline import ImageToImageRequest, image_to_image

    _, _, refiner = loaded
    image = torch.rand(1, SIZE_H, SIZE_W, 3, generator=torch.Generator().manual_seed(1))
    positive = node("TextEncodeRefiner").encode(refiner, "a red cube", "encode")[0]
    negative = node("TextEncodeRefiner").encode(refiner, "blurry", "encode")[0]
    (latent,) = node("VAEEncode").encode(refiner.vae, image, "auto")
    (refined,) = node("RefinerSampler").sample(refiner, positive, negative, latent, 5, STEPS, 4.0, "dpmpp_2m",
                                               "karras", 0, 0.3)
    (expected,) = node("VAEDecode").decode(refiner.vae, refined, "auto")
    request = ImageToImageRequest(prompt="a red cube", negative="blurry", strength=0.3, steps=STEPS, cfg=4.0,
                                  sampler="dpmpp_2m", scheduler="karras", seed=5)
    result = image_to_image(refiner, image, request)
    assert torch.equal(result.latent["samples"], refined["samples"])
    assert torch.equal(result.images, expected)


# --- LoRA ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loras(folders, loaded, tmp_path_factory):
    """models/loras with two kohya LoRAs for the tiny base (one in a subfolder)."""
    from safetensors.torch import save_file

    from tests._lora_files import kohya_lora

    root = tmp_path_factory.mktemp("loras")
    (root / "sub").mkdir()
    for name, state in (("style.safetensors", kohya_lora(loaded[0], seed=3)),
                        ("sub/detail.safetensors", kohya_lora(loaded[0], seed=4, alpha=None, rank=2))):
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / name))
    use_folders({**folders, "loras": [str(root)]})
    yield root
    use_folders(folders)


def test_lora_node_widgets_are_comfyuis(loras):
    inputs = _all_inputs(node_class("LoraLoader"))
    assert inputs["lora_name"][0] == ["style.safetensors", "sub/detail.safetensors"]
    for strength in ("strength_model", "strength_clip"):
        options = inputs[strength][1]
        assert inputs[strength][0] == "FLOAT"
        assert (options["default"], options["min"], options["max"], options["step"]) == (1.0, -10.0, 10.0, 0.01)


def test_lora_node_chains_and_leaves_its_input_alone(loaded, loras):
    from sdxl_core.checkpoints.lora import apply_lora

    base = loaded[0]
    assert node("LoraLoader").apply(base, "style.safetensors", 0.0, 0.0)[0] is base
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    (one,) = node("LoraLoader").apply(base, "style.safetensors", 1.0, 0.5)
    (two,) = node("LoraLoader").apply(one, "sub/detail.safetensors", -0.5, 0.0)
    assert one.unet is not base.unet and one.clip_g is not base.clip_g and two.clip_g is one.clip_g
    assert all(torch.equal(v, before[k]) for k, v in base.unet.state_dict().items())
    expected = apply_lora(apply_lora(base, loras / "style.safetensors", 1.0, 0.5), loras / "sub" / "detail.safetensors",
                          -0.5, 0.0)
    for (key, ours), (_, theirs) in zip(two.unet.named_parameters(), expected.unet.named_parameters()):
        assert torch.equal(ours, theirs), key
    assert not torch.equal(two.unet.out[2].weight, one.unet.out[2].weight)
    with pytest.raises(ValueError, match="strength_model must be at most 10.0"):
        node("LoraLoader").apply(base, "style.safetensors", 10.5, 1.0)


def test_lora_node_reads_a_file_once_per_node_and_keeps_only_the_latest_prompts_nodes(loaded, loras, monkeypatch):
    """The V3 node keeps nothing on its class: what each LoRA node read lives in nodes/lora.py, per node id, as
    ComfyUI's LoraLoader keeps it per node object, and only for the nodes of the prompt being run."""
    from nodes import lora as lora_nodes
    from sdxl_core.checkpoints import lora as core_lora

    reads = []
    real_read = core_lora.read_lora_file
    monkeypatch.setattr(core_lora, "read_lora_file", lambda path: reads.append(path.name) or real_read(path))
    monkeypatch.setattr(lora_nodes, "_last_read", {})
    base = loaded[0]
    prompt = {"20": {}, "21": {}}
    for _ in range(2):  # a re-queued prompt
        node("LoraLoader").apply(base, "style.safetensors", 1.0, 1.0, prompt=prompt, unique_id="20")
        node("LoraLoader").apply(base, "sub/detail.safetensors", 1.0, 1.0, prompt=prompt, unique_id="21")
    assert reads == ["style.safetensors", "detail.safetensors"]
    node("LoraLoader").apply(base, "sub/detail.safetensors", 1.0, 1.0, prompt={"20": {}}, unique_id="20")
    assert reads[2:] == ["detail.safetensors"] and set(lora_nodes._last_read) == {"20"}


def test_lora_node_refuses_a_base_lora_on_the_refiner(loaded, loras):
    with pytest.raises(ValueError, match="SDXL LoRAs are trained for the base model, whose layers differ from the "
                                         "refiner.s: apply it to the base"):
        node("LoraLoader").apply(loaded[2], "style.safetensors", 1.0, 1.0)
    with pytest.raises(ValueError, match="needs an SDXL model from the SDXL checkpoint loader"):
        node("LoraLoader").apply(loaded[1], "style.safetensors", 1.0, 1.0)


def test_two_stage_graph_with_a_lora_equals_the_core_pipeline(loaded, conds, loras):
    from sdxl_core.checkpoints.lora import apply_lora
    from sdxl_core.pipeline import GenerationRequest, generate

    base, base_vae, refiner = loaded
    (styled,) = node("LoraLoader").apply(base, "style.safetensors", 0.8, 0.6)
    styled_conds = {**conds, "base": (node("TextEncodeBase").encode(styled, "a red cube", "", "encode")[0],
                                      node("TextEncodeBase").encode(styled, "blurry", "", "encode")[0])}
    _, refined, image = _two_stage((styled, base_vae, refiner), styled_conds)
    request = GenerationRequest(prompt="a red cube", negative="blurry", width=SIZE_W, height=SIZE_H, steps=STEPS,
                                refiner_start=HANDOFF, cfg=4.0, sampler="euler", scheduler="normal", seed=11)
    expected = generate(apply_lora(base, loras / "style.safetensors", 0.8, 0.6), refiner, request)
    assert torch.equal(refined["samples"], expected.latent["samples"])
    assert torch.equal(image, expected.images)
    _, plain, _ = _two_stage(loaded, conds)
    assert (plain["samples"] - refined["samples"]).abs().max() > 1e-3  # the LoRA changed the picture


def test_base_sampler_refuses_a_mismatched_refiner_before_it_samples(monkeypatch, loaded, conds):
    """With the queued graph (ComfyUI's hidden PROMPT), the base checks the refiner its latent feeds first."""
    import json

    from nodes import sampling

    def never(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(sampling, "_run", never)
    prompt = json.loads((Path(__file__).resolve().parents[2] / "example_workflows" / "api" /
                         "sdxl_two_stage_txt2img_api.json").read_text())
    prompt["11"]["inputs"].update(steps=4, start_at_step=2)
    latent, _, _ = node("EmptyLatent").generate("custom", SIZE_W, SIZE_H, 1)
    with pytest.raises(ValueError, match="is set to start at step 2 of 4"):
        node("BaseSampler").sample(loaded[0], *conds["base"], latent, 0, 4, 4.0, "euler", "normal", 3, True, 1.0,
                                   prompt=prompt, unique_id="7")
