"""Reading model files without trusting them: content sniffing, the safetensors header, one tensor at a time.

The safetensors format (huggingface/safetensors `docs/`): an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the raw little-endian
tensor bytes. The header is parsed here rather than through `safe_open` so that a truncated download is reported
before any tensor is read, and tensors are read with plain positioned reads into fresh buffers instead of through
`safe_open`'s memory map: mapped pages that have been read count towards the process's resident memory until the
map is closed, so a load that casts (fp16 file -> fp32 weights) would peak at file size + weights, and weights that
stay views of the map keep the file open (on Windows it then cannot be replaced). Fresh buffers keep the peak at
the weights plus one tensor and leave the loaded weights independent of the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..runtime.atomic_write import atomic_write
from .errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeFormatError, UnsupportedFormatError

# safetensors dtype codes -> torch dtypes (FP8 codes only where this torch build has them).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        _DTYPES[_code] = getattr(torch, _name)
_CODES = {dtype: code for code, dtype in _DTYPES.items()}

# A real header is a few hundred kB (2,515 entries for the SDXL base); anything near this is not a header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# How much of a file's start is enough to recognise its format.
_SNIFF_BYTES = 64


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype ("F16", "BF16", ...), as shown in reports."""
    return _CODES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by its header entry (shape, dtype) and read only when `read()` is called."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    origin: str  # "file.safetensors:key" (or a description of the conversion), for error messages
    loader: Callable[[], torch.Tensor] = field(repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self) -> torch.Tensor:
        return self.loader()


def sniff_format(path: Path) -> str:
    """Name a file's format from its first bytes: "safetensors", or raise a CheckpointError saying what it is."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file") from None
    except OSError as error:
        raise CheckpointNotFoundError(f"{path}: cannot be read ({error.strerror or error})") from None
    if size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy?")
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        kind = "zip archive of pickles (torch.save)" if head.startswith(b"PK") else "pickle stream"
        raise UnsafeFormatError(
            f"{path.name} is a PyTorch pickle checkpoint ({kind}, the .ckpt/.pt/.bin format). Unpickling can run "
            "arbitrary code hidden in the file, so this project loads only .safetensors files. Download the "
            ".safetensors release of this model, or convert the file with a tool you trust.")
    if head.startswith(b"GGUF"):
        raise UnsupportedFormatError(f"{path.name} is a GGUF (quantized) file; this project loads SDXL "
                                     ".safetensors checkpoints only: download the .safetensors release of this model")
    if head.startswith(b"version https://git-lfs"):
        raise UnsupportedFormatError(f"{path.name} is a Git LFS pointer ({size} bytes), not the model itself: "
                                     "fetch the real file (git lfs pull) or download it directly")
    if head.lstrip()[:1] == b"<":
        raise UnsupportedFormatError(f"{path.name} is an HTML/XML document, not a model: the download probably "
                                     "returned an error or login page instead of the file")
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if len(head) < 9 and size < 9:
        raise CorruptCheckpointError(f"{path.name} is only {size} bytes: too short for a safetensors header "
                                     "(a truncated file?)")
    raise UnsupportedFormatError(f"{path.name} is not a safetensors file (it starts with bytes {head[:12].hex()}); "
                                 "this project loads SDXL .safetensors checkpoints and diffusers folders")


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of one safetensors file."""

    path: Path
    tensors: dict[str, LazyTensor]
    metadata: dict[str, str]


def read_header(path: Path | str) -> SafetensorsHeader:
    """Parse and validate a safetensors header; tensors come back as `LazyTensor`s that read from `path`."""
    path = Path(path)
    sniff_format(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > _MAX_HEADER_BYTES:
            raise CorruptCheckpointError(f"{path.name}: the header claims {header_len} bytes, which no real "
                                         "safetensors header has; the file is damaged")
        if 8 + header_len > size:
            raise CorruptCheckpointError(f"{path.name} is truncated: its header alone needs {8 + header_len} bytes "
                                         f"but the file has {size} (an interrupted download or copy?)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(f"{path.name}: the safetensors header is not valid JSON ({error}); "
                                     "the file is damaged") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path.name}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(f"{path.name}: the header's __metadata__ is not a string map")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: dict[str, LazyTensor] = {}
    data_end = 0
    for name, entry in header.items():
        dtype, shape, begin, end = _parse_entry(path, name, entry)
        data_end = max(data_end, end)
        tensors[name] = LazyTensor(shape=shape, dtype=dtype, origin=f"{path.name}:{name}",
                                   loader=_reader(path, data_start + begin, end - begin, dtype, shape))
    if data_end > data_len:
        raise CorruptCheckpointError(
            f"{path.name} is truncated: its header places tensor data up to byte {data_start + data_end}, but the "
            f"file ends at byte {size} ({data_start + data_end - size} bytes missing; an interrupted download or "
            "copy?). Download the file again.")
    return SafetensorsHeader(path=path, tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()})


def _parse_entry(path: Path, name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """Validate one header entry: a known dtype, a shape of non-negative ints, offsets that fit that shape."""
    try:
        code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        raise CorruptCheckpointError(f"{path.name}: the header entry for {name!r} is malformed: {entry!r}") from None
    if code not in _DTYPES:
        raise CorruptCheckpointError(f"{path.name}: tensor {name!r} has dtype {code!r}, which this torch build "
                                     f"cannot hold (known: {', '.join(sorted(_DTYPES))})")
    dtype = _DTYPES[code]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if min(shape, default=0) < 0 or begin < 0 or end - begin != expected:
        raise CorruptCheckpointError(f"{path.name}: tensor {name!r} of shape {list(shape)} {code} needs {expected} "
                                     f"bytes but its header entry spans bytes {begin}..{end}; the file is damaged")
    return dtype, shape, begin, end


def _reader(path: Path, offset: int, nbytes: int, dtype: torch.dtype,
            shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy()) if nbytes else memoryview(b"")
        done = 0
        try:
            with open(path, "rb", buffering=0) as handle:
                handle.seek(offset)
                while done < nbytes:
                    got = handle.readinto(view[done:])
                    if not got:
                        raise CorruptCheckpointError(f"{path.name} ended while reading tensor data at byte "
                                                     f"{offset + done}: the file was truncated after it was opened")
                    done += got
        except OSError as error:
            raise CorruptCheckpointError(f"{path.name}: reading tensor data at byte {offset + done} failed "
                                         f"({error.strerror or error}); is the disk or network share healthy?"
                                         ) from None
        return buffer.view(dtype).reshape(shape)

    return read


def read_sharded(folder: Path, candidates: tuple[str, ...], what: str) -> tuple[dict[str, LazyTensor], dict, Path]:
    """Read the weights of one diffusers component folder: a single file or a sharded `*.safetensors.index.json`.

    `candidates` are the file names to try, in order of preference; each may also exist as `<name>.index.json`.
    Returns (tensors, metadata, the file or index that was used).
    """
    for name in candidates:
        single, index = folder / name, folder / f"{name}.index.json"
        if single.is_file():
            header = read_header(single)
            return dict(header.tensors), header.metadata, single
        if index.is_file():
            return (*_read_index(index, what), index)
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    if pickles:
        raise UnsafeFormatError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}) for the {what}. Unpickling can run arbitrary "
            "code, so this project loads only .safetensors; download the safetensors files of this model.")
    raise CheckpointNotFoundError(f"{folder}: no weights for the {what} (looked for "
                                  f"{', '.join(candidates)} and their .index.json)")


def _read_index(index: Path, what: str) -> tuple[dict[str, LazyTensor], dict]:
    """Read a sharded-weights index (`{"metadata":…, "weight_map": {tensor: shard file}}`) and its shards' headers."""
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
        weight_map = content["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CorruptCheckpointError(f"{index}: not a valid sharded-weights index (a JSON object with a "
                                     "'weight_map' of tensor name -> shard file)") from None
    tensors: dict[str, LazyTensor] = {}
    metadata: dict[str, str] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index.parent / str(shard_name)
        if not shard.is_file():
            raise CorruptCheckpointError(f"{index.name} lists the shard {shard_name}, which is missing from "
                                         f"{index.parent} (an incomplete download of the {what}?)")
        header = read_header(shard)
        metadata.update(header.metadata)
        listed = {key for key, value in weight_map.items() if value == shard_name}
        absent = sorted(listed - set(header.tensors))
        if absent:
            raise CorruptCheckpointError(f"{shard.name} lacks {len(absent)} tensors that {index.name} places in it, "
                                         f"e.g. {absent[0]!r}; the shard does not belong to this index")
        for key in listed:
            tensors[key] = header.tensors[key]
    return tensors, metadata


def file_size_of(path: Path) -> int:
    """Total bytes of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return os.path.getsize(path)


def write_safetensors(path: Path | str, tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str] | None = None
                      ) -> None:
    """Write a safetensors file tensor by tensor: only one tensor is in memory at a time (names in sorted order).

    Each `LazyTensor.read()` must return a tensor of exactly its declared shape and dtype; it is written as raw
    little-endian bytes after the JSON header, as the format specifies.
    """
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = sorted(tensors)
    for name in names:
        entry = tensors[name]
        nbytes = entry.numel * torch.empty((), dtype=entry.dtype).element_size()
        header[name] = {"dtype": dtype_code(entry.dtype), "shape": list(entry.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned, as safetensors itself does
    with atomic_write(path) as handle:  # never a half-written file under the real name
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name in names:
            entry = tensors[name]
            tensor = entry.read()
            if tuple(tensor.shape) != tuple(entry.shape) or tensor.dtype != entry.dtype:
                raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, declared "
                                 f"{entry.shape} {entry.dtype}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                handle.write(memoryview(data.view(torch.uint8).numpy()))
            del tensor, data
