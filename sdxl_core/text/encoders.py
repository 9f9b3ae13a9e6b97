"""SDXL's text encoders: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 on transformers' CLIP text models.

Outputs follow sgm's `FrozenCLIPEmbedder(layer="hidden", layer_idx=11)` and `FrozenOpenCLIPEmbedder2(layer=
"penultimate")`: the context is `hidden_states[config.context_layer]` (-2: the input of the last layer, without the
final LayerNorm); bigG's pooled vector is its final-LayerNorm state at the EOS position times `text_projection`.

EOS position: the *first* token equal to 49407 (transformers whenever the config's `eos_token_id` is not the legacy
2). sgm takes `argmax` of the ids instead; the two agree for every prompt made of vocabulary tokens (EOS is the
largest id and the first EOS comes before any EOS padding). Ids above 49407 are rejected.

Textual-inversion vectors enter in place of token embeddings (`forward(tokens, embeds=, embeds_mask=)`): at the
masked positions the token-embedding output is replaced before the position embeddings are added, which is where
ComfyUI splices them in (`SDClipModel.process_tokens`). transformers 5's `CLIPTextModel.forward` takes no
`inputs_embeds`, so the replacement is a forward hook on the token embedding for the duration of the call; the ids
stay in place, so the pooled vector is still read at the first EOS by id. ComfyUI reads it at `num_tokens - 1`,
where `num_tokens` counts the positions up to and including the first EOS plus the spliced vectors; as the vectors
always precede a chunk's EOS, that is the same position.

State dicts speak the single-file layout (what remains after the checkpoint prefix is stripped), in both
directions, through state-dict hooks, so the encoder also loads and saves correctly when nested in another module:
- CLIP-L: `text_model.*` (transformers names as stored by SDXL; mapped onto whatever layout the installed
  transformers uses: version 5 drops the `text_model.` level of `CLIPTextModel`);
- bigG: OpenCLIP names (`token_embedding.weight`, `transformer.resblocks.N.attn.in_proj_weight`, `text_projection`,
  ...), converted by `openclip_conversion`.
Precision: the encoder computes in its parameter dtype. ComfyUI computes CLIP in float32 whatever the stored dtype
(fp32 embeddings, weights cast per layer), so build with dtype=torch.float32 to reproduce its numbers; sgm and
diffusers run fp16 text encoders.

Bookkeeping keys are accepted and dropped on load: `text_model.embeddings.position_ids` (always arange(77) here;
merged checkpoints often carry float or shuffled ids) and `logit_scale`. `state_dict()` omits both.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import TextEncoderConfig
from ..operations import use_operations
from .openclip_conversion import (
    OPENCLIP_BOOKKEEPING_KEYS,
    openclip_key_to_transformers,
    openclip_to_transformers,
    transformers_key_to_openclip,
    transformers_to_openclip,
)
from .tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID

logger = logging.getLogger(__name__)

_TEXT_MODEL = "text_model."
_POSITION_IDS = "text_model.embeddings.position_ids"
_INNER = "hf_model."  # attribute holding the transformers model (a name no single-file key starts with)


def _hf_config(config: TextEncoderConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        projection_dim=config.projection_dim or config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        attention_dropout=0.0,
        bos_token_id=BOS_TOKEN_ID,
        # Not the legacy 2: transformers then pools at the first EOS (see module docstring).
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID if config.projection_dim is None else 0,
        attn_implementation="sdpa",
    )


class TextEncoder(nn.Module):
    """A CLIP text transformer returning (penultimate hidden states, projected pooled EOS state or None)."""

    def __init__(self, config: TextEncoderConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, *, operations=None,
                 compute_dtype: torch.dtype | None = None) -> None:
        """`operations`: the layer classes (default torch.nn; sdxl_core/operations.py), `compute_dtype`:
        what it computes in when that differs from the weights' `dtype` (manual casting)."""
        super().__init__()
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        if not -config.num_layers <= config.context_layer <= config.num_layers:
            raise ValueError(f"context_layer {config.context_layer} is outside the {config.num_layers + 1} hidden "
                             "states (embeddings + one per layer)")
        self.config = config
        self.has_projection = config.projection_dim is not None
        model_class = CLIPTextModelWithProjection if self.has_projection else CLIPTextModel
        # On the meta device this allocates nothing and the initialisers are no-ops: weights come from a checkpoint.
        with torch.device(device if device is not None else "cpu"):
            self.hf_model = model_class(_hf_config(config))
        if dtype is not None:
            self.hf_model.to(dtype)
        self.hf_model.eval()
        use_operations(self, operations, compute_dtype)
        # Where the installed transformers puts the text transformer's own weights ("" when flattened).
        self._hf_keys = frozenset(self.hf_model.state_dict().keys())
        self._hf_text_prefix = _TEXT_MODEL if any(k.startswith(_TEXT_MODEL) for k in self._hf_keys) else ""
        self._load_prefix = ""
        _register_layout_hooks(self)

    def _text_model(self) -> nn.Module:
        return getattr(self.hf_model, "text_model", self.hf_model)

    def forward(self, tokens: torch.Tensor, embeds: torch.Tensor | None = None,
                embeds_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context hidden states [B, T, hidden] and, for bigG, the projected pooled vector [B, projection_dim].

        `embeds` [B, T, hidden] replaces the token embeddings where `embeds_mask` [B, T] (bool) is set: the input
        vectors of textual-inversion embeddings (ComfyUI `SDClipModel.process_tokens`)."""
        self._check_tokens(tokens)
        token_embedding = self.hf_model.get_input_embeddings()
        device = token_embedding.weight.device
        tokens = tokens.to(device=device, dtype=torch.long)
        replace = self._embedding_replacement(tokens, embeds, embeds_mask)
        # Explicit positions: the model's position_ids buffer is bookkeeping that a meta build leaves empty.
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0)
        hook = token_embedding.register_forward_hook(replace) if replace is not None else None
        try:
            out = self.hf_model(input_ids=tokens, position_ids=positions, output_hidden_states=True)
        finally:
            if hook is not None:
                hook.remove()
        hidden = out.hidden_states[self.config.context_layer]
        pooled = out.text_embeds if self.has_projection else None
        return hidden, pooled

    def _embedding_replacement(self, tokens: torch.Tensor, embeds: torch.Tensor | None,
                               embeds_mask: torch.Tensor | None):
        """A forward hook for the token embedding that puts `embeds` at the masked positions, or None."""
        if embeds is None and embeds_mask is None:
            return None
        if embeds is None or embeds_mask is None:
            raise ValueError("embeds and embeds_mask go together: give both or neither")
        width = self.config.hidden_size
        if embeds.shape != (*tokens.shape, width) or not embeds.is_floating_point():
            raise ValueError(f"embeds must be a float tensor [{tokens.shape[0]}, {tokens.shape[1]}, {width}] "
                             f"(batch, length, this encoder's width), got {tuple(embeds.shape)} {embeds.dtype}")
        if embeds_mask.shape != tokens.shape or embeds_mask.dtype != torch.bool:
            raise ValueError(f"embeds_mask must be a bool tensor {tuple(tokens.shape)}, got "
                             f"{tuple(embeds_mask.shape)} {embeds_mask.dtype}")
        mask = embeds_mask.to(tokens.device)
        if bool((tokens[mask] == EOS_TOKEN_ID).any()):
            raise ValueError(f"an embedded position holds EOS ({EOS_TOKEN_ID}); the pooled output is read at the "
                             "first EOS, so embedded positions need another placeholder id")
        embeds = embeds.to(tokens.device)

        def replace(module, args, output):
            return torch.where(mask[..., None], embeds.to(output.dtype), output)

        return replace

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
            found = (f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor)
                     else type(tokens).__name__)
            raise ValueError(f"tokens must be an integer tensor [batch, length], got {found}")
        if not 0 < tokens.shape[1] <= self.config.max_position_embeddings:
            raise ValueError(f"token length must be 1..{self.config.max_position_embeddings}, got {tokens.shape[1]}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), found {low}..{high}")
        if self.has_projection and not bool((tokens == EOS_TOKEN_ID).any(dim=1).all()):
            raise ValueError(f"every token row needs an EOS ({EOS_TOKEN_ID}): the pooled output is read there")

    # --- single-file layout <-> the transformers model's own keys -------------------------------------------------

    def _transformers_to_hf(self, key: str) -> str:
        """`CLIPTextModelWithProjection`-style name → the installed model's name."""
        return self._hf_text_prefix + key[len(_TEXT_MODEL):] if key.startswith(_TEXT_MODEL) else key

    def _hf_to_transformers(self, key: str) -> str:
        return _TEXT_MODEL + key[len(self._hf_text_prefix):] if not key.startswith("text_projection") else key

    def single_file_key(self, hf_key: str) -> str:
        """The single-file name of one of the transformers model's parameters."""
        key = self._hf_to_transformers(hf_key)
        return transformers_key_to_openclip(key) if self.has_projection else key

    def _single_file_to_hf(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Convert the recognised single-file keys; return them and the keys left unrecognised."""
        known, unknown = {}, []
        for key, value in state_dict.items():
            if key == _POSITION_IDS:
                _check_position_ids(value, self.config.max_position_embeddings)
            elif self.has_projection:
                try:
                    openclip_key_to_transformers(key)
                    known[key] = value
                except KeyError:
                    unknown.append(key)
            elif key.startswith(_TEXT_MODEL):
                known[key] = value
            else:
                unknown.append(key)
        if self.has_projection:
            known = openclip_to_transformers(known)
        return {self._transformers_to_hf(k): v for k, v in known.items()}, unknown


def _register_layout_hooks(module: TextEncoder) -> None:
    # The public registration methods arrived in torch 2.5; older torch has the same hooks under private names.
    if hasattr(module, "register_state_dict_post_hook"):
        module.register_state_dict_post_hook(_save_single_file_layout)
        module.register_load_state_dict_pre_hook(_load_single_file_layout)
    else:
        module._register_state_dict_hook(_save_single_file_layout)
        module._register_load_state_dict_pre_hook(_load_single_file_layout, with_module=True)
    module.register_load_state_dict_post_hook(_after_load)


def _save_single_file_layout(module: TextEncoder, state_dict, prefix: str, local_metadata) -> None:
    inner = prefix + _INNER
    hf = {k[len(inner):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(inner)]}
    hf = {k: v for k, v in hf.items() if not k.endswith("embeddings.position_ids")}
    layout = {module._hf_to_transformers(k): v for k, v in hf.items()}
    if module.has_projection:
        layout = transformers_to_openclip(layout)
    for key, value in layout.items():
        state_dict[prefix + key] = value


def _load_single_file_layout(module: TextEncoder, state_dict, prefix: str, local_metadata, strict,
                             missing_keys, unexpected_keys, error_msgs) -> None:
    module._load_prefix = prefix  # for _after_load, which is not told the prefix
    # Keys already in the module's own layout (prefix + "hf_model.") load as they are.
    mine = [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _INNER)]
    if not mine:
        return
    single_file = {k[len(prefix):]: state_dict.pop(k) for k in mine}
    for key in OPENCLIP_BOOKKEEPING_KEYS if module.has_projection else ():
        single_file.pop(key, None)
    converted, unknown = module._single_file_to_hf(single_file)
    for key, value in converted.items():
        if key in module._hf_keys:
            state_dict[prefix + _INNER + key] = value
        else:  # a well-formed name this model lacks (e.g. a layer too many)
            unknown.append(module.single_file_key(key))
    for key in dict.fromkeys(unknown):  # left under their own names, for torch to report as unexpected
        state_dict[prefix + key] = single_file[key]


def _after_load(module: TextEncoder, incompatible_keys) -> None:
    # transformers keeps position_ids as a non-persistent buffer, which a meta build (or to_empty) leaves without
    # values; make it arange so that moving or saving the module never meets a meta or garbage buffer.
    embeddings = module._text_model().embeddings
    weight = embeddings.token_embedding.weight
    if not weight.is_meta:
        embeddings.position_ids = torch.arange(module.config.max_position_embeddings,
                                               device=weight.device).unsqueeze(0)
    # Report missing weights under the names the checkpoint should have used.
    inner = module._load_prefix + _INNER
    renamed = []
    for key in incompatible_keys.missing_keys:
        if key.startswith(inner) and not key.endswith("position_ids"):
            key = module._load_prefix + module.single_file_key(key[len(inner):])
        if key not in renamed:
            renamed.append(key)
    incompatible_keys.missing_keys[:] = renamed


def _check_position_ids(position_ids: torch.Tensor, length: int) -> None:
    """Position ids are bookkeeping (always arange here); say so when a checkpoint carries damaged ones."""
    if position_ids.is_meta:
        return
    expected = torch.arange(length, device=position_ids.device)
    values = position_ids.reshape(-1)
    if values.numel() != length or not torch.equal(values.double().round().long(), expected):
        logger.warning("checkpoint position_ids are not arange(%d); using arange(%d) as CLIP requires",
                       length, length)
