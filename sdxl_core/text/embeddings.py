"""Textual-inversion embeddings named in prompts as `embedding:name`, found and read as ComfyUI 0.3.64 does
(`comfy/sd1_clip.py`: `SDTokenizer.tokenize_with_weights`, `_try_get_embedding`, `load_embed`), except that every
case ComfyUI logs and ignores is refused here with a sentence.

Syntax (ComfyUI's): within one weighted segment of the prompt, a word starts an embedding when it begins the segment
with `embedding:` or follows a space or newline: `a photo of embedding:cat`, `(embedding:cat:1.2)`. The name runs to
the next whitespace; text after it is ordinary prompt text. If no file has the name as written, trailing commas are
dropped from it (`embedding:cat, red` finds `cat` and keeps the comma as text). Anywhere else (`photo,embedding:cat`)
the characters are plain text, as in ComfyUI.

Lookup: in each folder and (like ComfyUI) all of its subfolders, the name as a relative path, as is or with
`.safetensors`, `.pt`, `.bin` appended (that order). ComfyUI visits the folders in an unordered set, so a name found
in two places resolves arbitrarily there; here the given folders' order decides, then the depth below them, and a
tie is refused. A name that would leave its folder (`../x`) is not looked up there.

Contents (what `load_embed` accepts, in its order): A1111's `string_to_param`; a list of name→tensor dicts (the
tensors of the encoder's width, concatenated); the encoder's key (`clip_l` / `clip_g` in SDXL files); a LoRA's
bundled embeddings (`bundle_emb.*.string_to_param.*`, then `bundle_emb.*.<key>`); and, where ComfyUI would take
the first tensor of any file, only a file holding exactly one tensor. `.pt`/`.bin` files are read with
`torch.load(weights_only=True)`; a pickle that needs more (ComfyUI falls back to raw zip records) is refused.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

EMBEDDING_PREFIX = "embedding:"
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
ENCODER_NAMES = {"clip_l": "CLIP-L", "clip_g": "OpenCLIP bigG"}
# ComfyUI splits a segment before every "embedding:" that follows a space or a newline.
_WORD_SPLIT = re.compile(f"[ \n]{re.escape(EMBEDDING_PREFIX)}")
_LISTED_NAMES = 20  # names shown in a "not found" message before "and N more"


class EmbeddingError(ValueError):
    """An `embedding:` reference that cannot be used: missing, unreadable, or not made for this encoder."""


def split_embedding_words(segment: str) -> list[str]:
    """A weighted segment cut before each `embedding:` that follows a space or newline (ComfyUI's word split)."""
    pieces = _WORD_SPLIT.split(segment)
    words = pieces[:1] + [EMBEDDING_PREFIX + piece for piece in pieces[1:]]
    return [word for word in words if word]


class EmbeddingLibrary:
    """Where `embedding:name` is looked up: folders (with their subfolders) or a mapping name → tensors.

    A mapping's values are what a file would hold: one tensor [n, width] (or [width]), or a dict of tensors such as
    {"clip_l": [n, 768], "clip_g": [n, 1280]}. Files are read once per library.
    """

    def __init__(self, directories: Sequence[str | os.PathLike] = (), mapping: Mapping[str, object] | None = None):
        if mapping is not None and directories:
            raise ValueError("an EmbeddingLibrary reads either folders or a mapping, not both")
        self._directories = [Path(d) for d in directories]
        for directory in self._directories:
            if not directory.is_dir():
                raise EmbeddingError(f"embedding folder {str(directory)!r} does not exist or is not a folder")
        self._mapping = dict(mapping) if mapping is not None else None
        if self._mapping is not None:
            bad = [name for name in self._mapping if not isinstance(name, str)]
            if bad:
                raise TypeError(f"embedding names must be str, got {bad[0]!r}")
        self._folders: list[tuple[int, int, Path]] | None = None
        self._contents: dict[Path, object] = {}

    @classmethod
    def from_source(cls, source) -> EmbeddingLibrary | None:
        """A library from a folder, a list of folders, a name → tensors mapping, or a library (None stays None)."""
        if source is None or isinstance(source, EmbeddingLibrary):
            return source
        if isinstance(source, (str, os.PathLike)):
            return cls([source])
        if isinstance(source, Mapping):
            return cls(mapping=source)
        if isinstance(source, Sequence) and all(isinstance(d, (str, os.PathLike)) for d in source):
            return cls(source)
        raise TypeError("embeddings must be a folder, a list of folders, a mapping name → tensors or an "
                        f"EmbeddingLibrary, got {type(source).__name__}")

    def describe(self) -> str:
        """Where this library looks, for messages."""
        if self._mapping is not None:
            return "the given embedding mapping"
        if not self._directories:
            return "no embedding folder (none is configured)"
        return "the embedding folder(s) " + ", ".join(str(d) for d in self._directories)

    def names(self) -> list[str]:
        """Every embedding name this library offers (file paths relative to their folder, without extension)."""
        if self._mapping is not None:
            return sorted(self._mapping)
        names = set()
        for index, _, folder in self._search_folders():  # the folders a lookup searches, links followed
            for path in folder.iterdir():
                if path.suffix.lower() in EMBEDDING_EXTENSIONS and path.is_file():
                    names.add(path.relative_to(self._directories[index]).with_suffix("").as_posix())
        return sorted(names)

    def vectors(self, name: str, key: str, width: int) -> torch.Tensor | None:
        """The embedding's vectors for one encoder, float32 [n, width]; None when no embedding has this name."""
        found = self._find(name)
        if found is None:
            return None
        label, content = found
        return _select_vectors(content, key, width, f"embedding:{name} ({label})")

    def resolve(self, text: str, key: str, width: int) -> tuple[torch.Tensor, str]:
        """The vectors named at the start of `text` (what follows `embedding:`) and the text left after the name
        (ComfyUI `SDTokenizer._try_get_embedding`). Refuses names that are not found."""
        words = text.split()
        if not words:
            raise EmbeddingError(f"{EMBEDDING_PREFIX!r} in the prompt must be followed by an embedding name; "
                                 f"{self._available()}")
        name, leftover = words[0], " ".join(words[1:])
        vectors = self.vectors(name, key, width)
        if vectors is None:
            stripped = name.rstrip(",")
            if stripped and stripped != name:
                vectors = self.vectors(stripped, key, width)
                leftover = f"{name[len(stripped):]} {leftover}"
        if vectors is None:
            name = name.rstrip(",") or name
            looked = ""
            if self._mapping is None:
                looked = (f" (looked for {name} and {name}" + f", {name}".join(EMBEDDING_EXTENSIONS)
                          + " there and in the subfolders)")
            raise EmbeddingError(f"the prompt names embedding:{name}, which is not in {self.describe()}{looked}; "
                                 f"{self._available()}. ComfyUI would drop it with a warning; this project refuses")
        return vectors, leftover

    def _available(self) -> str:
        names = self.names()
        if not names:
            return "no embeddings are available there"
        shown = ", ".join(names[:_LISTED_NAMES])
        more = f" and {len(names) - _LISTED_NAMES} more" if len(names) > _LISTED_NAMES else ""
        return f"available: {shown}{more}"

    # --- lookup ---------------------------------------------------------------------------------------------------

    def _find(self, name: str) -> tuple[str, object] | None:
        if self._mapping is not None:
            for candidate in (name, *(name[:-len(ext)] for ext in EMBEDDING_EXTENSIONS
                                      if name.lower().endswith(ext))):
                if candidate in self._mapping:
                    return f"mapping entry {candidate!r}", self._mapping[candidate]
            return None
        path = self._find_file(name)
        if path is None:
            return None
        if path not in self._contents:
            self._contents[path] = read_embedding_file(path)
        return str(path), self._contents[path]

    def _find_file(self, name: str) -> Path | None:
        matches: dict[Path, tuple[int, int, Path]] = {}
        for rank in self._search_folders():
            path = _file_in(rank[2], name)
            if path is not None:
                real = path.resolve()
                if real not in matches or rank[:2] < matches[real][:2]:
                    matches[real] = (rank[0], rank[1], path)
        if not matches:
            return None
        ranked = sorted(matches.values(), key=lambda m: m[:2])
        ties = [m[2] for m in ranked if m[:2] == ranked[0][:2]]
        if len(ties) > 1:
            listed = ", ".join(str(p) for p in ties)
            raise EmbeddingError(f"embedding:{name} matches several files at the same depth ({listed}); ComfyUI "
                                 "would pick one at random. Name it by its path below the embeddings folder "
                                 "(embedding:subfolder/name) or rename one")
        return ranked[0][2]

    def _search_folders(self) -> list[tuple[int, int, Path]]:
        """(folder index, depth, folder) for each given folder and its subfolders, links followed (ComfyUI's
        `expand_directory_list`)."""
        if self._folders is None:
            folders, seen = [], set()
            for index, root in enumerate(self._directories):
                for current, subfolders, _ in os.walk(root, followlinks=True):
                    subfolders.sort()
                    real = Path(current).resolve()
                    if real in seen:  # a link loop
                        subfolders.clear()
                        continue
                    seen.add(real)
                    depth = len(Path(current).relative_to(root).parts)
                    folders.append((index, depth, Path(current)))
            self._folders = folders
        return self._folders


def _file_in(folder: Path, name: str) -> Path | None:
    """`name` (as given, then with each known extension) inside `folder`, refusing paths that leave it."""
    base = Path(os.path.abspath(folder))
    path = Path(os.path.abspath(base / name))
    try:
        if os.path.commonpath((base, path)) != str(base):
            return None
    except ValueError:  # different drives on Windows
        return None
    if path.is_file():
        return path
    for extension in EMBEDDING_EXTENSIONS:
        candidate = path.with_name(path.name + extension)
        if candidate.is_file():
            return candidate
    return None


def read_embedding_file(path: str | os.PathLike) -> object:
    """The tensors of one embedding file: safetensors, or a `.pt`/`.bin` that `torch.load(weights_only=True)`
    reads. Anything needing a full unpickle is refused: unpickling can run arbitrary code."""
    path = Path(path)
    if path.name.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError for damaged files
            raise EmbeddingError(f"embedding file {path} is not a readable safetensors file: {error}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EmbeddingError(
            f"embedding file {path} is a pickle that torch.load(weights_only=True) refuses (it holds objects other "
            "than tensors and plain containers); unpickling it fully could run arbitrary code, so it is not loaded. "
            "Convert it to .safetensors with a tool you trust") from None
    except Exception as error:
        raise EmbeddingError(f"embedding file {path} could not be read as a torch file: {error}") from None


def _select_vectors(content: object, key: str, width: int, label: str) -> torch.Tensor:
    """The vectors one encoder uses from a file's content (ComfyUI `load_embed`'s cases, in its order), checked."""
    encoder = ENCODER_NAMES.get(key, key)
    expected = f"{key!r} of shape [n, {width}] for the {encoder} encoder"
    if isinstance(content, torch.Tensor):
        tensor, source = content, "its tensor"
    elif isinstance(content, list):
        parts = [value.reshape(-1, width) for entry in content if isinstance(entry, Mapping)
                 for value in entry.values() if isinstance(value, torch.Tensor) and value.shape[-1:] == (width,)]
        if not parts:
            raise EmbeddingError(f"{label} is a list without any tensor {width} wide; expected {expected}")
        tensor, source = torch.cat(parts), "its list entries"
    elif isinstance(content, Mapping):
        tensor, source = _from_mapping(content, key, width, label, expected)
    else:
        raise EmbeddingError(f"{label} holds a {type(content).__name__}; expected tensors ({expected})")
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        found = f"{tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise EmbeddingError(f"{label}: {source} is a {found}; expected floating-point vectors ({expected})")
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[-1] != width or tensor.shape[0] == 0:
        hint = ""
        if tensor.shape[-1:] == (768,) and key == "clip_g":
            hint = " (768 wide: an SD1.5 embedding, which has nothing for SDXL's bigG encoder)"
        raise EmbeddingError(f"{label}: {source} has shape {list(tensor.shape)}; expected {expected}{hint}")
    # A copy: the caller's (or the cache's) tensor is never handed out to be modified.
    return tensor.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _from_mapping(content: Mapping, key: str, width: int, label: str, expected: str) -> tuple[object, str]:
    if "string_to_param" in content:
        params = content["string_to_param"]
        if isinstance(params, Mapping) and params:
            return next(iter(params.values())), "its A1111 string_to_param tensor"
        raise EmbeddingError(f"{label} has an empty or malformed 'string_to_param'; expected {expected}")
    if key in content:
        return content[key], f"its {key!r} tensor"
    others = [other for other in ENCODER_NAMES if other != key and other in content]
    if others:
        raise EmbeddingError(f"{label} has no {expected}: it holds {others[0]!r} "
                             f"{_shape(content[others[0]])} only, made for the {ENCODER_NAMES[others[0]]} encoder")
    for suffix in (".string_to_param.*", f".{key}"):
        bundled = [value for name, value in content.items()
                   if isinstance(name, str) and name.startswith("bundle_emb.") and name.endswith(suffix)]
        if bundled:
            try:
                return torch.cat([v.reshape(-1, v.shape[-1]) for v in bundled]), "its bundled (bundle_emb.*) tensors"
            except (RuntimeError, AttributeError) as error:
                raise EmbeddingError(f"{label}: its bundled embeddings do not fit together ({error})") from None
    tensors = {name: value for name, value in content.items() if isinstance(value, torch.Tensor)}
    if len(tensors) == 1:
        (name, value), = tensors.items()
        return value, f"its only tensor {name!r}"
    held = ", ".join(f"{name} {_shape(value)}" for name, value in tensors.items()) or "no tensors"
    raise EmbeddingError(f"{label} has no {expected}; it holds {held}")


def _shape(value: object) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else f"({type(value).__name__})"
