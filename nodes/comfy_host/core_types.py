"""ComfyUI's own MODEL / CLIP / VAE, in and out of this pack's nodes (part of the door to ComfyUI, nodes/comfy_host).

In: our samplers, text encoders and VAE code run on the weights a ComfyUI MODEL / CLIP / VAE holds. ComfyUI loads
the object first (its ModelPatcher applies the LoRA weight patches and places it), then a network of ours is built
on the meta device around those very tensors (sdxl_core/checkpoints/shared_weights.py) for this one use: no copy,
and ComfyUI's model management counts the memory, as the object is its own.
Out: our loaded networks wrapped in ComfyUI's own model classes sharing our tensors, so core KSampler, ControlNet
and other packs run on them; that ComfyUI object's ModelPatcher then also places the network for our own nodes, so
one set of tensors has one patcher (two would each believe they own its device).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence

import torch

from .host import _PATCHER_ATTRIBUTE, _load_host

# Attribute under which a network of ours keeps the ComfyUI object made from it (MODEL patcher, CLIP or VAE).
_COMFY_ATTRIBUTE = "_sdxl_twostage_comfy"

# What ComfyUI's model options may hold for our samplers to run a MODEL exactly: other entries change how the
# UNet or guidance computes, which this core does not do.
_MODEL_OPTION_NAMES = {
    "model_function_wrapper": "a UNet function wrapper (model_function_wrapper)",
    "sampler_cfg_function": "a custom CFG function (sampler_cfg_function, e.g. from RescaleCFG or a guidance node)",
    "sampler_post_cfg_function": "a post-CFG function (sampler_post_cfg_function, e.g. from PerpNeg or SAG)",
    "sampler_pre_cfg_function": "a pre-CFG function (sampler_pre_cfg_function)",
    "sampler_calc_cond_batch_function": "a custom conditioning batch function (sampler_calc_cond_batch_function)",
    "denoise_mask_function": "a denoise mask function (denoise_mask_function)",
}
_TRANSFORMER_OPTION_NAMES = {
    "patches_replace": "attention replacements (transformer_options patches_replace, e.g. from IPAdapter or "
                       "attention-couple nodes)",
    "patches": "UNet block or attention patches (transformer_options patches, e.g. from FreeU or Self-Attention "
               "Guidance)",
}
# Harmless to this core: cfg 1 then also runs the negative, which changes nothing without post-CFG functions.
_HARMLESS_MODEL_OPTIONS = {"disable_cfg1_optimization"}


def _comfy(name: str):
    return importlib.import_module(name)


def _comfy_class(module: str, name: str):
    """A class of ComfyUI's, if its module is loaded (no import: an object of it exists only once it is)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


def _is_comfy(value, module: str, name: str) -> bool:
    cls = _comfy_class(module, name)
    return cls is not None and isinstance(value, cls)


def is_comfy_model(value) -> bool:
    """True for a ComfyUI MODEL (a ModelPatcher around one of ComfyUI's diffusion models)."""
    return _is_comfy(value, "comfy.model_patcher", "ModelPatcher") and \
        _is_comfy(getattr(value, "model", None), "comfy.model_base", "BaseModel")


def is_comfy_clip(value) -> bool:
    return _is_comfy(value, "comfy.sd", "CLIP")


def is_comfy_vae(value) -> bool:
    return _is_comfy(value, "comfy.sd", "VAE")


def _unsupported_patches(patcher, allowed_object_patches: frozenset = frozenset()) -> list[str]:
    """What a ModelPatcher carries beyond weight patches that this core cannot honour, in words."""
    found = []
    for key, value in patcher.model_options.items():
        if key == "transformer_options":
            found += [_TRANSFORMER_OPTION_NAMES.get(name, f"transformer_options {name!r}")
                      for name, entry in value.items() if entry]
        elif key not in _HARMLESS_MODEL_OPTIONS and value:
            found.append(_MODEL_OPTION_NAMES.get(key, f"the model option {key!r}"))
    found += [f"an object patch of {name!r}" for name in patcher.object_patches if name not in allowed_object_patches]
    if patcher.weight_wrapper_patches:
        found.append("weight wrappers (weight_wrapper_patches)")
    for group, what in ((patcher.wrappers, "wrappers"), (patcher.callbacks, "callbacks")):
        found += [f"{kind} {what}" for kind, by_key in group.items() if any(by_key.values())]
    if patcher.hook_patches or patcher.forced_hooks is not None or patcher.current_hooks is not None:
        found.append("hooks (the Create Hook / Set Model Hooks / Set CLIP Hooks nodes)")
    if patcher.additional_models:
        found.append(f"additional models ({', '.join(sorted(patcher.additional_models))})")
    if patcher.injections:
        found.append(f"injections ({', '.join(sorted(patcher.injections))})")
    return found


def _refuse(found: list[str], what: str, node: str) -> None:
    if found:
        raise ValueError(f"this {what} carries {'; '.join(found)}, which the {node} cannot run (it runs the SDXL "
                         f"networks with weight patches such as LoRAs, nothing else); use ComfyUI's own nodes for "
                         f"this {what}, or remove the node that added it")


def _stage_kind(base_model, what: str) -> str:
    model_base = _comfy("comfy.model_base")
    if isinstance(base_model, model_base.SDXLRefiner):
        return "refiner"
    if isinstance(base_model, model_base.SDXL):
        return "base"
    raise ValueError(f"this {what} is a {type(base_model).__name__} model, not an SDXL base or refiner; these nodes "
                     "run SDXL only (load an SDXL checkpoint with Load Checkpoint, or use ComfyUI's own sampler)")


def _prediction_of(model_sampling) -> tuple[str, bool]:
    """(prediction type, zero terminal SNR) of ComfyUI's model sampling object, when it is SDXL's discrete
    schedule with eps or v prediction (ComfyUI's default, or its ModelSamplingDiscrete node); refused otherwise."""
    from sdxl_core.config import SDXL_NOISE_SCHEDULE, NoiseScheduleConfig
    from sdxl_core.sampling.schedules import DiscreteSchedule

    ms = _comfy("comfy.model_sampling")
    kind = type(model_sampling).__name__
    special = tuple(getattr(ms, name) for name in ("EDM", "X0", "IMG_TO_IMG", "CONST", "ModelSamplingDiscreteDistilled")
                    if hasattr(ms, name))
    if not isinstance(model_sampling, ms.ModelSamplingDiscrete) or isinstance(model_sampling, special):
        raise ValueError(f"this MODEL samples with {kind} (set by a ModelSampling node), which these samplers do not "
                         "run; they run SDXL's discrete schedule with eps or v prediction (ModelSamplingDiscrete "
                         "eps / v_prediction, with or without zsnr)")
    prediction = "v_prediction" if isinstance(model_sampling, ms.V_PREDICTION) else "eps"
    theirs = model_sampling.sigmas.detach().float().cpu()
    for zsnr in (False, True):
        config = NoiseScheduleConfig(**{**SDXL_NOISE_SCHEDULE.__dict__, "zsnr": zsnr})
        ours = DiscreteSchedule(config).sigmas
        if ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6):
            return prediction, zsnr
    raise ValueError("this MODEL's noise schedule is not SDXL's (another beta schedule or timestep count); these "
                     "samplers run SDXL's own schedule only")


def _load_full(patchers: list, memory_required: int = 0) -> None:
    host = _load_host()
    # Whole: our layers are not comfy.ops layers, which ComfyUI's partial loading would stream.
    host.model_management.load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)


def core_stage_from_comfy_model(patcher, node: str, memory_required: int = 0, extra_patchers: Sequence = ()):
    """A ComfyUI MODEL as this core's SDXLModel for one sampling run: ComfyUI loads it (applying its weight patches
    and placing it, with `extra_patchers` such as ControlNets, and `memory_required` for the activations), then
    our UNet is built around the loaded tensors. Use it right away and let it go: the next load may move them."""
    from sdxl_core.checkpoints.detect import HINT_UNET_HEAD_CHANNELS, infer_unet_config
    from sdxl_core.checkpoints.errors import StateDictMismatchError
    from sdxl_core.checkpoints.shared_weights import adopt_tensors, named_tensors, stage_config_for
    from sdxl_core.checkpoints.validation import build_component
    from sdxl_core.models.bundle import SDXLModel
    from sdxl_core.operations import manual_cast

    _refuse(_unsupported_patches(patcher, frozenset({"model_sampling", "manual_cast_dtype"})), "MODEL", node)
    kind = _stage_kind(patcher.model, "MODEL")
    prediction, zsnr = _prediction_of(patcher.get_model_object("model_sampling"))
    unet_options = patcher.model.model_config.unet_config
    if unet_options.get("num_head_channels", -1) <= 0:
        raise ValueError("this MODEL's UNet counts attention heads per block (num_heads), not by width; it is not "
                         "an SDXL UNet these samplers run")
    _load_full([patcher, *extra_patchers], memory_required)
    base_model = patcher.model
    tensors = named_tensors(base_model.diffusion_model)
    try:
        unet_config = infer_unet_config({k: tuple(v.shape) for k, v in tensors.items()},
                                        {HINT_UNET_HEAD_CHANNELS: str(unet_options["num_head_channels"])})
        config = stage_config_for(kind, unet=unet_config, prediction=prediction, zsnr=zsnr)
        storage = base_model.get_dtype()
        compute = patcher.get_model_object("manual_cast_dtype")
        cast = compute is not None and compute != storage
        unet = build_component("unet", config, operations=manual_cast if cast else None,
                               compute_dtype=compute if cast else None)
        adopt_tensors(unet, tensors, "ComfyUI MODEL's UNet")
    except StateDictMismatchError as error:
        raise ValueError(f"the {node} cannot run this MODEL: {error}") from None
    unet.requires_grad_(False).eval()
    return SDXLModel(config, unet=unet, dtype=compute if cast else storage)


def model_memory_required(patcher, latent_shape: Sequence[int], branches: int) -> int:
    """ComfyUI's own estimate of a MODEL's activation memory for `branches` conditioning rows per latent."""
    batch, *rest = latent_shape
    return int(patcher.memory_required([batch * branches, *rest]))


def core_text_encoders_from_comfy_clip(clip, node: str):
    """A ComfyUI CLIP of an SDXL base or refiner as this core's SDXLModel holding text encoders built around the
    CLIP's loaded tensors (its weight patches applied), computing in float32 as ComfyUI's CLIP does."""
    from sdxl_core.checkpoints.errors import StateDictMismatchError
    from sdxl_core.checkpoints.shared_weights import (
        adopt_tensors,
        named_tensors,
        stage_config_for,
        text_encoder_config,
        text_encoder_name,
    )
    from sdxl_core.models.bundle import SDXLModel
    from sdxl_core.operations import manual_cast
    from sdxl_core.text.encoders import TextEncoder

    sdxl_clip = _comfy("comfy.sdxl_clip")
    clip_model = _comfy("comfy.clip_model")
    found = _unsupported_patches(clip.patcher)
    if clip.layer_idx is not None:
        found.append(f"a last layer of {clip.layer_idx} (CLIP Set Last Layer; SDXL reads the penultimate layer)")
    if clip.tokenizer_options:
        found.append(f"tokenizer options {sorted(clip.tokenizer_options)}")
    if clip.use_clip_schedule or clip.apply_hooks_to_conds:
        found.append("scheduled CLIP hooks")
    _refuse(found, "CLIP", node)
    cond_model = clip.cond_stage_model
    if isinstance(cond_model, sdxl_clip.SDXLClipModel):
        kind, names = "base", ("clip_g", "clip_l")
    elif isinstance(cond_model, sdxl_clip.SDXLRefinerClipModel):
        kind, names = "refiner", ("clip_g",)
    else:
        raise ValueError(f"this CLIP is a {type(cond_model).__name__}, not the text encoders of an SDXL base or "
                         f"refiner; the {node} encodes for SDXL only (use ComfyUI's CLIP Text Encode for it)")
    _load_full([clip.patcher])
    encoders = {}
    try:
        for name in names:
            wrapper = getattr(cond_model, name)
            transformer = wrapper.transformer
            if (wrapper.layer, wrapper.layer_idx) != ("hidden", -2):
                raise ValueError(f"this CLIP's {name} reads its layer {wrapper.layer} {wrapper.layer_idx}; SDXL reads "
                                 "the penultimate one (remove CLIP Set Last Layer)")
            tensors = named_tensors(transformer)
            if name == "clip_l":  # SDXL's CLIP-L has no projection; ComfyUI builds one and never uses it
                tensors.pop("text_projection.weight", None)
            first = transformer.text_model.encoder.layers[0]
            activation = next((key for key, fn in clip_model.ACTIVATIONS.items() if fn is first.mlp.activation), None)
            if activation is None:
                raise ValueError(f"this CLIP's {name} uses an activation this core does not have")
            config = text_encoder_config({k: tuple(v.shape) for k, v in tensors.items()},
                                         num_heads=first.self_attn.heads, hidden_act=activation)
            storage = tensors["text_model.embeddings.token_embedding.weight"].dtype
            cast = storage != torch.float32
            encoder = TextEncoder(config, device="meta", operations=manual_cast if cast else None,
                                  compute_dtype=torch.float32 if cast else None)
            adopt_tensors(encoder, {text_encoder_name(encoder, key): value for key, value in tensors.items()},
                          f"ComfyUI CLIP's {name}")
            encoders[name] = encoder.requires_grad_(False).eval()
        config = stage_config_for(kind, clip_g=encoders["clip_g"].config,
                                  clip_l=encoders["clip_l"].config if "clip_l" in encoders else None)
    except StateDictMismatchError as error:
        raise ValueError(f"the {node} cannot use this CLIP: {error}") from None
    return SDXLModel(config, **encoders, dtype=torch.float32)


def core_vae_from_comfy_vae(vae, node: str, memory_required: int = 0):
    """A ComfyUI VAE of SDXL's kind (4 latent channels, 8x) as this core's AutoencoderKL around its loaded
    tensors."""
    from sdxl_core.checkpoints.detect import infer_vae_config
    from sdxl_core.checkpoints.errors import StateDictMismatchError
    from sdxl_core.checkpoints.shared_weights import adopt_tensors, named_tensors
    from sdxl_core.checkpoints.validation import build_component

    vae.throw_exception_if_invalid()
    autoencoder = _comfy("comfy.ldm.models.autoencoder")
    if (not isinstance(vae.first_stage_model, (autoencoder.AutoencoderKL, autoencoder.AutoencodingEngine))
            or vae.latent_channels != 4 or vae.downscale_ratio != 8 or vae.latent_dim != 2):
        raise ValueError(f"this VAE ({type(vae.first_stage_model).__name__}, {vae.latent_channels} latent channels) "
                         f"is not an SDXL-style VAE; the {node} needs a 4-channel image VAE (use ComfyUI's VAE nodes "
                         "for this one)")
    _refuse(_unsupported_patches(vae.patcher), "VAE", node)
    _load_full([vae.patcher], memory_required)
    tensors = named_tensors(vae.first_stage_model)
    try:
        module = build_component("vae", infer_vae_config({k: tuple(v.shape) for k, v in tensors.items()}, {}))
        adopt_tensors(module, tensors, "ComfyUI VAE")
    except StateDictMismatchError as error:
        raise ValueError(f"the {node} cannot use this VAE: {error}") from None
    return module.requires_grad_(False).eval()


def vae_memory_required(vae, shape: Sequence[int], decode: bool) -> int:
    """ComfyUI's own estimate for one pass of its VAE ([B, 4, h, w] latents to decode, [B, 3, H, W] to encode)."""
    estimate = vae.memory_used_decode if decode else vae.memory_used_encode
    return int(estimate(list(shape), vae.vae_dtype))


def _unload_patcher(host: types.SimpleNamespace, patcher) -> None:
    """Take a patcher out of ComfyUI's loaded models (moving its weights to the offload device)."""
    for loaded in list(host.model_management.current_loaded_models):
        if loaded.model is patcher:
            if loaded.model_finalizer is not None:
                loaded.model_unload()
            host.model_management.current_loaded_models.remove(loaded)


def _set_patcher(host: types.SimpleNamespace, network: torch.nn.Module, patcher) -> None:
    old = network.__dict__.get(_PATCHER_ATTRIBUTE)
    if old is not None and old is not patcher:
        _unload_patcher(host, old)
    network.__dict__[_PATCHER_ATTRIBUTE] = patcher


def _text_model_options(config) -> dict:
    """Our text encoder's architecture in the names of ComfyUI's CLIP text model config (`*_model_config`)."""
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_heads, "num_hidden_layers": config.num_layers,
            "hidden_act": config.hidden_act, "max_position_embeddings": config.max_position_embeddings,
            "vocab_size": config.vocab_size, "projection_dim": config.projection_dim or config.hidden_size}


def comfy_model_from_core(model, node: str = "SDXL to ComfyUI"):
    """ComfyUI's MODEL for our loaded stage's UNet, sharing its tensors (made once and kept on the UNet)."""
    host = _load_host()
    patcher = model.unet.__dict__.get(_COMFY_ATTRIBUTE)
    if patcher is None:
        model_config, sd = _comfy_model_config(model)
        patcher = _comfy_model_from_core(host, model, model_config, sd, node)
        model.unet.__dict__[_COMFY_ATTRIBUTE] = patcher
        _set_patcher(host, model.unet, patcher)
    return patcher


def comfy_objects_from_core(model, vae=None, node: str = "SDXL to ComfyUI"):
    """(MODEL, CLIP, VAE): ComfyUI's own objects for our loaded stage (and VAE, default the stage's), sharing every
    weight tensor with it. Made once per network and kept on it, so the same ComfyUI objects come back every time."""
    host = _load_host()
    if host is None:
        raise RuntimeError(f"the {node} node makes ComfyUI objects and runs only inside ComfyUI")
    vae = model.vae if vae is None else vae
    patcher = comfy_model_from_core(model, node)
    # One CLIP holds both text encoders: it fits only the pair it was made from (a LoRA may replace just one).
    made = model.clip_g.__dict__.get(_COMFY_ATTRIBUTE)
    clip = made[0] if made is not None and made[1] is model.clip_l else None
    if clip is None:
        model_config, sd = _comfy_model_config(model)
        clip = _comfy_clip_from_core(host, model, model_config, sd, node)
        for network in (model.clip_g, model.clip_l):
            if network is not None:
                network.__dict__[_COMFY_ATTRIBUTE] = (clip, model.clip_l)
                _set_patcher(host, network, clip.patcher)
    comfy_vae = vae.__dict__.get(_COMFY_ATTRIBUTE)
    if comfy_vae is None:
        comfy_vae = _comfy_vae_from_core(vae)
        vae.__dict__[_COMFY_ATTRIBUTE] = comfy_vae
        _set_patcher(host, vae, comfy_vae.patcher)
    return patcher, clip, comfy_vae


def _comfy_model_config(model):
    """ComfyUI's model config for our UNet, found by ComfyUI's own detection from the tensors (no data read)."""
    from sdxl_core.checkpoints.detect import UNET_PREFIX, V_PRED_MARKER, ZTSNR_MARKER
    from sdxl_core.checkpoints.shared_weights import named_tensors

    sd = {UNET_PREFIX + key: value for key, value in named_tensors(model.unet).items()}
    if model.config.prediction == "v_prediction":
        sd[V_PRED_MARKER] = torch.tensor([])
    if model.config.noise_schedule.zsnr:
        sd[ZTSNR_MARKER] = torch.tensor([])
    model_config = _comfy("comfy.model_detection").model_config_from_unet(sd, UNET_PREFIX)
    if model_config is None:
        raise ValueError("ComfyUI does not recognise this UNet as one of its models (its detection knows the "
                         "published SDXL base and refiner layouts), so it cannot be handed to ComfyUI")
    return model_config, sd


def _comfy_model_from_core(host, model, model_config, sd, node: str):
    from sdxl_core.checkpoints.detect import UNET_PREFIX
    from sdxl_core.checkpoints.errors import StateDictMismatchError
    from sdxl_core.checkpoints.shared_weights import adopt_tensors, named_tensors
    from sdxl_core.operations import compute_dtype_of

    mm = host.model_management
    tensors = named_tensors(model.unet)
    storage = next(iter(tensors.values())).dtype
    compute = compute_dtype_of(model.unet)
    model_config.set_inference_dtype(storage, compute if compute != storage else None)
    # Built on the meta device: no memory, then our tensors are installed (ComfyUI's own loader copies instead).
    base_model = model_config.get_model(sd, UNET_PREFIX, device=torch.device("meta"))
    kind = _stage_kind(base_model, "UNet")
    if kind != model.kind:
        raise ValueError(f"ComfyUI reads this SDXL {model.kind} as an SDXL {kind}; it cannot be handed over")
    try:
        adopt_tensors(base_model.diffusion_model, tensors, "UNet, as ComfyUI builds it,")
    except StateDictMismatchError as error:
        raise ValueError(f"the {node} cannot hand this UNet to ComfyUI: {error}") from None
    prediction, zsnr = _prediction_of(base_model.model_sampling)
    if (prediction, zsnr) != (model.config.prediction, model.config.noise_schedule.zsnr):
        raise ValueError(f"ComfyUI would sample this {model.kind} as {prediction}{' with zsnr' if zsnr else ''}, "
                         f"but it is {model.config.prediction}; it cannot be handed over unchanged")
    _require_materialised(base_model, "MODEL")
    base_model.requires_grad_(False).eval()
    device = next(iter(tensors.values())).device
    base_model.device = device
    return host.model_patcher.ModelPatcher(base_model, load_device=mm.get_torch_device(),
                                           offload_device=mm.unet_offload_device())


def _require_materialised(module: torch.nn.Module, what: str) -> None:
    empty = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if empty:
        raise RuntimeError(f"the ComfyUI {what} made from this model has tensors without data: {empty[:5]}")


def _comfy_clip_from_core(host, model, model_config, sd, node: str):
    from sdxl_core.checkpoints.errors import StateDictMismatchError
    from sdxl_core.checkpoints.shared_weights import adopt_tensors, named_tensors, tensor_slots, text_encoder_name

    comfy_sd = _comfy("comfy.sd")
    encoders = {"clip_g": model.clip_g, **({"clip_l": model.clip_l} if model.clip_l is not None else {})}
    storage = next(iter(named_tensors(model.clip_g).values())).dtype
    options = {"initial_device": torch.device("meta"), "dtype": storage,
               **{f"{name}_model_config": _text_model_options(encoder.config) for name, encoder in encoders.items()}}
    target = model_config.clip_target(state_dict=sd)
    clip = comfy_sd.CLIP(target, embedding_directory=host.folder_paths.get_folder_paths("embeddings"),
                         model_options=options)
    for name, encoder in encoders.items():
        transformer = getattr(clip.cond_stage_model, name).transformer
        ours = named_tensors(encoder)
        tensors = {}
        for slot, _, _, _ in tensor_slots(transformer):
            key = text_encoder_name(encoder, slot)
            if key in ours:
                tensors[slot] = ours[key]
            elif name == "clip_l" and slot == "text_projection.weight":
                # ComfyUI computes a CLIP-L projection that SDXL never reads (its checkpoints have none).
                width = encoder.config.hidden_size
                tensors[slot] = torch.eye(width, dtype=storage, device=ours[next(iter(ours))].device)
        try:
            adopt_tensors(transformer, tensors, f"{name}, as ComfyUI builds it,")
        except StateDictMismatchError as error:
            raise ValueError(f"the {node} cannot hand this {name} to ComfyUI: {error}") from None
    _require_materialised(clip.cond_stage_model, "CLIP")
    clip.patcher.size = 0
    clip.patcher.model_size()  # counted with our tensors, not the meta ones it was built with
    clip.patcher.model.device = next(iter(named_tensors(model.clip_g).values())).device
    return clip


def _comfy_vae_from_core(vae):
    from sdxl_core.checkpoints.errors import StateDictMismatchError
    from sdxl_core.checkpoints.shared_weights import adopt_tensors, named_tensors
    from sdxl_core.operations import compute_dtype_of

    comfy_sd = _comfy("comfy.sd")
    config = vae.config
    tensors = named_tensors(vae)
    ddconfig = {"double_z": True, "z_channels": config.latent_channels, "resolution": 256,
                "in_channels": config.image_channels, "out_ch": config.image_channels, "ch": config.base_channels,
                "ch_mult": list(config.channel_mult), "num_res_blocks": config.num_res_blocks, "attn_resolutions": [],
                "dropout": 0.0}
    if config.norm_groups != 32:
        raise ValueError(f"ComfyUI's VAE uses 32 GroupNorm groups; this VAE has {config.norm_groups}")
    storage = next(iter(tensors.values())).dtype
    compute = compute_dtype_of(vae)
    # Built on the meta device from meta stand-ins (ComfyUI's VAE constructor copies the weights it is given into
    # new ones), then our tensors are installed.
    with torch.device("meta"):
        shapes = {key: torch.empty(value.shape, dtype=value.dtype) for key, value in tensors.items()}
        comfy_vae = comfy_sd.VAE(sd=shapes, config={"params": {"ddconfig": ddconfig,
                                                              "embed_dim": config.latent_channels}}, dtype=compute)
    try:
        adopt_tensors(comfy_vae.first_stage_model, tensors, "VAE, as ComfyUI builds it,")
    except StateDictMismatchError as error:
        raise ValueError(f"this VAE cannot be handed to ComfyUI: {error}") from None
    if storage != compute:
        # Weights kept in their file's precision, computing in another: ComfyUI's layers cast each weight on use
        # when their patcher forces it (what ComfyUI does for its own manual-cast models).
        comfy_vae.patcher.force_cast_weights = True
    _require_materialised(comfy_vae.first_stage_model, "VAE")
    comfy_vae.patcher.size = 0
    comfy_vae.patcher.model_size()
    comfy_vae.patcher.model.device = next(iter(tensors.values())).device
    return comfy_vae
