"""Micro-conditioning nodes (SDXL paper §2.2–2.3): the size, crop and aesthetic values SDXL was trained with,
set on a CONDITIONING under ComfyUI's own field names, so ComfyUI's samplers read them the same way."""

from __future__ import annotations

from ._shared import CATEGORY, MAX_RESOLUTION, check_widgets, node_id, validate_widgets

_SIZE_TOOLTIP = ("During training SDXL was told each photo's size before it was resized. Here you tell it which "
                 "size to pretend the image had: the output size gives the usual result; smaller values (e.g. "
                 "512) imitate blurry, low-resolution training photos; larger ones (2048, 4096) push for sharper "
                 "detail. Does not change the output resolution.")


class MicroConditioning:
    """Set SDXL's size micro-conditioning (original size, crop, target size) on a conditioning."""

    SEARCH_ALIASES = ('original size', 'crop', 'target size', 'size conditioning')
    DESCRIPTION = ("Sets SDXL's micro-conditioning on a conditioning: the original size, the crop and the target "
                   "size the model should believe its training image had. Without this node they follow the "
                   "latent size (crop 0), which is what the paper does at inference. Wire the same values into "
                   "positive and negative unless you mean to contrast them.")
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The conditioning with width/height/crop_w/crop_h/target_width/target_height set (the refiner "
                       "reads the size and crop and ignores the target).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "Conditioning from an SDXL text-encode node (base or "
                                                         "refiner) or from ComfyUI's own SDXL encode nodes."}),
            "width": ("INT", {"default": 1024, "min": 8, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "Original width. " + _SIZE_TOOLTIP}),
            "height": ("INT", {"default": 1024, "min": 8, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "Original height. " + _SIZE_TOOLTIP}),
            "crop_w": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "Crop left: how many pixels the model should believe were cut from the "
                                          "left of the training photo. 0 gives centred, complete subjects; larger "
                                          "values imitate off-centre crops (heads and edges cut off)."}),
            "crop_h": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "Crop top: pixels the model should believe were cut from the top. 0 "
                                          "keeps subjects whole; larger values imitate cut-off tops."}),
            "target_width": ("INT", {"default": 1024, "min": 8, "max": MAX_RESOLUTION, "step": 8,
                                     "tooltip": "Target width: the training bucket the image was meant for. Keep "
                                                "it equal to the output width (the aspect-bucket picker does). "
                                                "Base only; the refiner ignores it."}),
            "target_height": ("INT", {"default": 1024, "min": 8, "max": MAX_RESOLUTION, "step": 8,
                                      "tooltip": "Target height: the training bucket's height. Keep it equal to "
                                                 "the output height. Base only; the refiner ignores it."}),
        }}

    def apply(self, conditioning: list, width: int, height: int, crop_w: int, crop_h: int, target_width: int,
              target_height: int):
        from sdxl_core.conditioning import with_micro_conditioning

        return (with_micro_conditioning(conditioning, width=width, height=height, crop_w=crop_w, crop_h=crop_h,
                                        target_width=target_width, target_height=target_height),)


class AestheticScore:
    """Set the refiner's aesthetic-score conditioning."""

    SEARCH_ALIASES = ('aesthetic score', 'ascore', 'refiner conditioning')
    DESCRIPTION = ("Sets the SDXL refiner's aesthetic score: the refiner was trained with each photo's rating from "
                   "an aesthetic predictor (roughly 1 = poor to 10 = excellent). Ask for a high score on the "
                   "positive (6 by default) and a low one on the negative (2.5 by default), so guidance pushes "
                   "towards nicer images. The base model has no aesthetic score and ignores it.")
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The refiner conditioning with aesthetic_score set.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "Refiner conditioning from 'SDXL Refiner Text Encode'."}),
            "aesthetic_score": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                          "tooltip": "Rating the refiner should aim for. Positive prompt: about 6 "
                                                     "(higher values exaggerate the 'pretty' look); negative prompt: "
                                                     "about 2.5, so guidance steers away from poor images."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, aesthetic_score=None):
        return validate_widgets(cls, aesthetic_score=aesthetic_score)

    def apply(self, conditioning: list, aesthetic_score: float):
        from sdxl_core.conditioning import with_micro_conditioning

        check_widgets(type(self), aesthetic_score=aesthetic_score)

        return (with_micro_conditioning(conditioning, aesthetic_score=float(aesthetic_score)),)


NODE_CLASS_MAPPINGS = {
    node_id("MicroConditioning"): MicroConditioning,
    node_id("AestheticScore"): AestheticScore,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("MicroConditioning"): "SDXL Micro-Conditioning (size, crop, target)",
    node_id("AestheticScore"): "SDXL Aesthetic Score (refiner)",
}
