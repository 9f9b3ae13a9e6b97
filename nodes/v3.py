"""The pack's nodes in ComfyUI's V3 schema (`comfy_api`, pinned to the version alias in `comfy_host.V3_API_VERSION`).

Each node is declared once, in its family module (inputs, outputs, tooltips, checks, the function that runs), and
this module states that declaration as a V3 `io.ComfyNode`: `define_schema()` builds the `io.Schema` from it on
every call (so model-file lists stay current, as V1's INPUT_TYPES does), `execute()` is a classmethod that runs the
node's function on a fresh object (nothing is kept on the class between prompts), `validate_inputs()` keeps the
V1 check's exact signature, because ComfyUI skips its own range check for exactly the inputs a check names and
reports the check's sentence once per named input. The node ids, inputs, outputs and their order do not change,
so saved workflows and API prompts keep loading.

A declaration feature this module does not know how to state in V3 is refused when the schema is built (a
sentence naming the node and the feature), never dropped.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from . import comfy_host

# V1 widget types, the V3 class that states each, and the V1 options each carries (V1 name -> V3 argument).
_WIDGETS = {
    "INT": ("Int", {"default": "default", "min": "min", "max": "max", "step": "step", "tooltip": "tooltip",
                    "control_after_generate": "control_after_generate", "forceInput": "force_input"}),
    "FLOAT": ("Float", {"default": "default", "min": "min", "max": "max", "step": "step", "round": "round",
                        "tooltip": "tooltip", "forceInput": "force_input"}),
    "STRING": ("String", {"default": "default", "multiline": "multiline", "placeholder": "placeholder",
                          "dynamicPrompts": "dynamic_prompts", "tooltip": "tooltip", "forceInput": "force_input"}),
    "BOOLEAN": ("Boolean", {"default": "default", "label_on": "label_on", "label_off": "label_off",
                            "tooltip": "tooltip", "forceInput": "force_input"}),
}
_COMBO_OPTIONS = {"default": "default", "tooltip": "tooltip", "control_after_generate": "control_after_generate"}
_SOCKET_OPTIONS = {"tooltip": "tooltip", "lazy": "lazy"}
# ComfyUI's own socket types by their V3 names; any other type (the pack's SDXL_MODEL, another pack's) is a
# custom type of the same name.
_SOCKETS = {"IMAGE": "Image", "LATENT": "Latent", "CONDITIONING": "Conditioning", "MASK": "Mask", "MODEL": "Model",
            "CLIP": "Clip", "VAE": "Vae", "CONTROL_NET": "ControlNet", "INT": "Int", "FLOAT": "Float",
            "STRING": "String", "BOOLEAN": "Boolean"}
# V1 class attributes with no counterpart here: a node that sets one is refused rather than run without it.
_UNSTATED = ("INPUT_IS_LIST", "OUTPUT_IS_LIST", "IS_CHANGED", "check_lazy_status", "NOT_IDEMPOTENT")


class DeclarationError(TypeError):
    """A node declaration that the V3 statement cannot carry over whole."""


def extension(node_classes: Mapping[str, type], display_names: Mapping[str, str]):
    """ComfyUI's `ComfyExtension` listing every node of `node_classes` (node id -> declaring class) as V3."""
    api = comfy_host.v3_api()
    v3_nodes = [v3_node(api.io, name, cls, display_names.get(name, name)) for name, cls in node_classes.items()]

    class SDXLTwoStageExtension(api.ComfyExtension):
        async def get_node_list(self) -> list:
            return list(v3_nodes)

    return SDXLTwoStageExtension()


def v3_node(io: Any, node_id: str, declared: type, display_name: str) -> type:
    """The V3 `io.ComfyNode` for the node `declared` declares (its INPUT_TYPES, RETURN_*, FUNCTION, checks)."""
    unstated = [name for name in _UNSTATED if hasattr(declared, name)]
    if unstated:
        raise DeclarationError(f"{node_id} sets {', '.join(unstated)}, which the pack's V3 statement does not carry; "
                               "state it in nodes/v3.py before registering the node")
    hidden_inputs = _hidden(io, node_id, declared.INPUT_TYPES().get("hidden", {}))
    aliases = tuple(getattr(declared, "SEARCH_ALIASES", ()))
    schema_fields = {field.name for field in dataclasses.fields(io.Schema)}

    def define_schema(cls):
        fields = dict(node_id=node_id, display_name=display_name, category=declared.CATEGORY,
                      description=getattr(declared, "DESCRIPTION", ""), inputs=_inputs(io, node_id, declared),
                      outputs=_outputs(io, node_id, declared), hidden=[hidden for _, hidden in hidden_inputs],
                      is_output_node=bool(getattr(declared, "OUTPUT_NODE", False)))
        # Search aliases reach the node search in ComfyUI versions whose schema has the field (0.3.64's has not).
        if aliases and "search_aliases" in schema_fields:
            fields["search_aliases"] = list(aliases)
        return io.Schema(**fields)

    def execute(cls, **inputs):
        for name, hidden in hidden_inputs:
            inputs[name] = getattr(cls.hidden, hidden.name)
        return getattr(declared(), declared.FUNCTION)(**inputs)

    namespace = {"define_schema": classmethod(define_schema), "execute": classmethod(execute),
                 "__doc__": declared.__doc__, "__module__": declared.__module__, "DECLARED_BY": declared,
                 "SEARCH_ALIASES": aliases}
    check = inspect.getattr_static(declared, "VALIDATE_INPUTS", None)
    if check is not None:
        namespace["validate_inputs"] = classmethod(_same_signature(check, declared.VALIDATE_INPUTS))
    return type(declared.__name__, (io.ComfyNode,), namespace)


def _same_signature(check: Any, bound_check: Any):
    """A V3 validate_inputs that runs the declared check and shows ComfyUI the check's own parameters."""
    if not isinstance(check, classmethod):
        raise DeclarationError(f"VALIDATE_INPUTS of {bound_check.__qualname__} must be a classmethod")

    def validate_inputs(cls, **values):
        return bound_check(**values)

    validate_inputs.__signature__ = inspect.signature(check.__func__)
    return validate_inputs


def _hidden(io: Any, node_id: str, hidden: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(V1 argument name, io.Hidden) for each hidden input."""
    known = {member.value: member for member in io.Hidden}
    pairs = []
    for name, spec in hidden.items():
        value = spec[0] if isinstance(spec, (tuple, list)) else spec
        if value not in known:
            raise DeclarationError(f"{node_id} asks for the hidden input {name!r} = {value!r}; V3 offers "
                                   f"{sorted(known)}")
        pairs.append((name, known[value]))
    return pairs


def _inputs(io: Any, node_id: str, declared: type) -> list:
    inputs = []
    declaration = declared.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in declaration.get(section, {}).items():
            inputs.append(_input(io, node_id, name, spec, optional=section == "optional"))
    return inputs


def _input(io: Any, node_id: str, name: str, spec: tuple, optional: bool):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, (list, tuple)):
        return io.Combo.Input(name, options=list(kind), optional=optional,
                              **_arguments(node_id, name, options, _COMBO_OPTIONS))
    if kind in _WIDGETS:
        class_name, known = _WIDGETS[kind]
        return getattr(io, class_name).Input(name, optional=optional, **_arguments(node_id, name, options, known))
    return _socket(io, kind).Input(name, optional=optional, **_arguments(node_id, name, options, _SOCKET_OPTIONS))


def _outputs(io: Any, node_id: str, declared: type) -> list:
    types = declared.RETURN_TYPES
    names = getattr(declared, "RETURN_NAMES", None) or (None,) * len(types)
    tooltips = getattr(declared, "OUTPUT_TOOLTIPS", None) or (None,) * len(types)
    if not len(types) == len(names) == len(tooltips):
        raise DeclarationError(f"{node_id} declares {len(types)} RETURN_TYPES, {len(names)} RETURN_NAMES and "
                               f"{len(tooltips)} OUTPUT_TOOLTIPS; give one of each per output")
    # No output ids: V3 wants them apart from the input ids (EmptyLatent has a width input and a width output), and
    # workflows link outputs by position, which ComfyUI's default ids follow.
    return [_socket(io, kind).Output(display_name=name, tooltip=tooltip)
            for kind, name, tooltip in zip(types, names, tooltips)]


def _socket(io: Any, kind: str):
    return getattr(io, _SOCKETS[kind]) if kind in _SOCKETS else io.Custom(kind)


def _arguments(node_id: str, name: str, options: Mapping[str, Any], known: Mapping[str, str]) -> dict:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DeclarationError(f"{node_id}.{name} has the option(s) {unknown}, which the pack's V3 statement does "
                               f"not carry (it knows {sorted(known)}); add them in nodes/v3.py")
    return {known[key]: value for key, value in options.items()}
