"""Model-sampling nodes: what this pack's SDXL model predicts and how guidance is combined, patched onto the model as
ComfyUI's `ModelSamplingDiscrete` and `RescaleCFG` nodes patch ComfyUI's MODEL.

Those two core nodes take ComfyUI's MODEL, which this pack's loader does not produce; these are their counterparts
for SDXL_MODEL, with the same widgets (the prediction types our samplers run: eps and v_prediction). The model
coming in is never modified (the loader caches it and other branches may use it): the output is a new model that
shares every weight (sdxl_core/sampling/model_sampling.py `with_prediction`, `with_rescale_cfg`).
"""

from __future__ import annotations

from sdxl_core.config import PREDICTION_TYPES

from ._shared import CATEGORY, SDXL_MODEL, check_widgets, node_id, validate_widgets

_RESCALE_DEFAULT = 0.7  # ComfyUI RescaleCFG's default, the value the paper and v-prediction model cards use


def _require_model(model) -> None:
    from sdxl_core.models.bundle import SDXLModel

    if not isinstance(model, SDXLModel):
        raise ValueError(f"model needs an SDXL model from 'Load SDXL Checkpoint', got {type(model).__name__}")


class ModelSamplingDiscrete:
    """Sample an SDXL model as eps or v-prediction, with or without zero terminal SNR."""

    SEARCH_ALIASES = ("model sampling discrete", "v prediction", "vpred", "zsnr", "zero terminal snr", "noobai")
    DESCRIPTION = ("Sets what the SDXL model predicts, as ComfyUI's ModelSamplingDiscrete node does: eps (SDXL 1.0, "
                   "Pony, Illustrious) or v_prediction (NoobAI-XL v-pred and other v-prediction fine-tunes), and "
                   "whether its schedule has zero terminal SNR. The loader already reads the checkpoint's v_pred "
                   "and ztsnr markers; use this node for a file that lacks them. Weights are shared, not copied.")
    CATEGORY = f"{CATEGORY}/model"
    RETURN_TYPES = (SDXL_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same SDXL model, sampled with this prediction type and schedule.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (SDXL_MODEL, {"tooltip": "The SDXL model from 'Load SDXL Checkpoint' (or a LoRA node)."}),
            "sampling": (list(PREDICTION_TYPES), {
                "default": "eps",
                "tooltip": "What the network predicts: eps, the noise (most SDXL models), or v_prediction (the "
                           "model card says 'v-pred'). The wrong choice gives grey, washed-out or burnt images."}),
            "zsnr": ("BOOLEAN", {
                "default": False,
                "tooltip": "Zero terminal SNR: the schedule rescaled so its last noise level is pure noise. On for "
                           "v-prediction models trained with it (NoobAI-XL v-pred); off otherwise."}),
        }}

    def patch(self, model, sampling: str, zsnr: bool):
        from sdxl_core.sampling.model_sampling import with_prediction

        _require_model(model)
        check_widgets(type(self), sampling=sampling)
        return (with_prediction(model, sampling, bool(zsnr)),)


class RescaleCFG:
    """Patch RescaleCFG onto an SDXL model: guidance rescaled towards the conditional prediction's spread."""

    SEARCH_ALIASES = ("rescale cfg", "cfg rescale", "v prediction", "zsnr")
    DESCRIPTION = ("RescaleCFG (Lin et al. 2024, 'Common Diffusion Noise Schedules and Sample Steps are Flawed'), as "
                   "ComfyUI's RescaleCFG node: every sampler running this model rescales the guided prediction to "
                   "the spread of the conditional one and blends that in by the multiplier. It keeps v-prediction "
                   "and zero-terminal-SNR models (NoobAI-XL v-pred: 0.7) from over-saturating at usual CFG values.")
    CATEGORY = f"{CATEGORY}/model"
    RETURN_TYPES = (SDXL_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same SDXL model with RescaleCFG applied by the sampler nodes.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (SDXL_MODEL, {"tooltip": "The SDXL model, usually after SDXL Model Sampling for a v-prediction "
                                              "model."}),
            "multiplier": ("FLOAT", {
                "default": _RESCALE_DEFAULT, "min": 0.0, "max": 1.0, "step": 0.01,
                "tooltip": "Share of the rescaled guidance: 0 is plain CFG, 1 fully rescaled; 0.7 is usual for "
                           "v-prediction models."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, multiplier=None):
        return validate_widgets(cls, multiplier=multiplier)

    def patch(self, model, multiplier: float):
        from sdxl_core.sampling.model_sampling import with_rescale_cfg

        _require_model(model)
        check_widgets(type(self), multiplier=multiplier)
        return (with_rescale_cfg(model, multiplier),)


NODE_CLASS_MAPPINGS = {
    node_id("ModelSamplingDiscrete"): ModelSamplingDiscrete,
    node_id("RescaleCFG"): RescaleCFG,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("ModelSamplingDiscrete"): "SDXL Model Sampling (eps / v-prediction, zsnr)",
    node_id("RescaleCFG"): "SDXL RescaleCFG",
}
