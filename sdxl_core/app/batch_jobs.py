"""The lines of a batch file as jobs: each JSON object is read as the `generate` options it names.

A line's keys are the `generate` options with underscores (`base`, `prompt`, `batch_size`, `refiner_start`, ...).
Each line goes through the very argument parser and request builder of `python -m sdxl_core generate` (its values
are turned back into option tokens), so a job means exactly what the same options mean on the command line and is
refused with the same sentences. Command-line options of `batch` are defaults that a line overrides key by key;
a null value gives generate's own default (`"refiner": null`: the base alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..pipeline import GenerationRequest
from .defaults import FULL as GENERATE_DEFAULTS
from .options import _add_generation_arguments, _request_from_args

# Settings of the whole run (where and in what precision it computes, where it writes): the command line sets them.
RUN_WIDE = {"out": "--out DIR", "device": "--device", "dtype": "--dtype", "low_vram": "--low-vram"}
# Request settings left out of a job's name while they hold these values (see JobReader._name).
_UNSET_BY_DEFAULT = {"prediction": None, "zsnr": None, "rescale_cfg": 0.0}
# Bump when the naming recipe changes: names from an older recipe would otherwise be mistaken for other jobs.
_NAME_RECIPE = 1


class JobError(ValueError):
    """A line that is not a job `generate` would run; the message says what to change."""


class _LineParser(argparse.ArgumentParser):
    """The generate parser, raising the sentence instead of printing usage and exiting the process."""

    def error(self, message: str):
        raise JobError(message)


def generation_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
                      **kwargs) -> argparse.ArgumentParser:
    """A parser with exactly the options of `generate`."""
    parser = parser_class(**kwargs)
    _add_generation_arguments(parser, with_models=True)
    return parser


def make_defaults_only(parser: argparse.ArgumentParser) -> None:
    """Leave out of the namespace every option not given (and require none), so that what a line or the command
    line said can be told apart from generate's defaults."""
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            action.required = False


@dataclass(frozen=True)
class ModelSet:
    """The checkpoints a job samples with; jobs with equal model sets share loaded weights."""

    base: Path
    refiner: Path | None
    vae: Path | None
    loras: tuple[tuple[Path, float, float], ...]  # (file, UNet strength, text-encoder strength), applied in order


@dataclass(frozen=True)
class Job:
    line: int  # 1-based line of the batch file
    request: GenerationRequest
    models: ModelSet
    embeddings: tuple[Path, ...]
    name: str  # output file name, from the job's content

    def outputs(self, folder: Path) -> list[Path]:
        """Where the job's images go: the name, then _1, _2, ... for the rest of a batch, as `generate` names them."""
        first = folder / self.name
        return [first] + [first.with_name(f"{first.stem}_{index}{first.suffix}")
                          for index in range(1, self.request.batch_size)]

    def sources(self) -> dict:
        """The files behind the image, for its PNG text chunk (the keys `generate` writes)."""
        models = self.models
        return {"base": str(models.base), "refiner": str(models.refiner) if models.refiner else None,
                "vae": str(models.vae) if models.vae else None,
                "embeddings": [str(folder) for folder in self.embeddings] or None,
                "loras": [[str(path), model, clip] for path, model, clip in models.loras] or None}


def _value_text(key: str, value) -> str:
    """One JSON value as the text the option would have on the command line."""
    if isinstance(value, list) and key in ("original_size", "target_size") and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    if isinstance(value, list) and key == "crop_top_left" and len(value) == 2:
        return f"{value[0]},{value[1]}"
    if isinstance(value, list) and key == "lora" and 1 <= len(value) <= 3:
        return ":".join(str(part) for part in value)
    if isinstance(value, (bool, list, dict)):
        raise JobError(f"{key!r} takes a single value as on the command line, got {json.dumps(value)}")
    return str(value)


class JobReader:
    """Turns the objects of a batch file into jobs, with the command line's generate options as defaults."""

    def __init__(self, defaults: dict, dtype: str | None):
        self._parser = generation_parser(_LineParser, prog="a batch line", add_help=False)
        self._full_defaults = {action.dest: action.default for action in self._parser._actions}
        make_defaults_only(self._parser)
        self._actions = {action.dest: action for action in self._parser._actions}
        self._exclusive = [{action.dest for action in group._group_actions}
                           for group in self._parser._mutually_exclusive_groups]
        self._defaults = defaults
        self._dtype = dtype  # the precision changes the pixels, so it is part of what names an image

    @property
    def keys(self) -> list[str]:
        return sorted(dest for dest in self._actions if dest not in RUN_WIDE)

    def _tokens(self, line: dict) -> list[str]:
        tokens = []
        for key, value in line.items():
            if key in RUN_WIDE:
                raise JobError(f"{key!r} is set for the whole batch on the command line ({RUN_WIDE[key]}), not "
                               "per line")
            action = self._actions.get(key)
            if action is None:
                raise JobError(f"unknown key {key!r}; a line's keys are the generate options with underscores: "
                               f"{', '.join(self.keys)}")
            if value is None:
                continue  # null: generate's default (the command line's value is dropped in `job`)
            option = action.option_strings[0]
            if isinstance(action, argparse._StoreTrueAction):
                if not isinstance(value, bool):
                    raise JobError(f"{key!r} is a switch: true or false, got {json.dumps(value)}")
                tokens += [option] if value else []
            elif isinstance(action, argparse._AppendAction):
                items = value if isinstance(value, list) and not (key == "lora" and _is_lora_list(value)) else [value]
                # option=value keeps a value that starts with '-' (a prompt, say) from being read as an option
                tokens += [f"{option}={_value_text(key, item)}" for item in items]
            else:
                tokens.append(f"{option}={_value_text(key, value)}")
        return tokens

    def _merged(self, given: dict) -> dict:
        """The command line's values overridden by the line's: a line choosing one side of an either-or pair of
        options (--width/--height or --bucket; --refiner-start or --refiner-switch) drops the other side's default."""
        def member(dest: str) -> str:
            return "width" if dest == "height" else dest  # --height goes with --width, against --bucket

        defaults = dict(self._defaults)
        for group in self._exclusive:
            chosen = {member(dest) for dest in given if member(dest) in group}
            if chosen:
                defaults = {dest: value for dest, value in defaults.items()
                            if member(dest) not in group or member(dest) in chosen}
        return {**defaults, **given}

    def job(self, number: int, text: str) -> Job:
        """Line `number` (1-based) as a job; a JobError says what is wrong with it."""
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise JobError(f"not a JSON object ({error.msg} at column {error.colno}); each line holds one object "
                           'such as {"prompt": "a red cube", "seed": 3}') from None
        if not isinstance(line, dict):
            raise JobError(f"expected a JSON object of generate options, got {json.dumps(line)[:60]}")
        given = vars(self._parser.parse_args(self._tokens(line)))
        unset = {key for key, value in line.items() if value is None}
        settings = {key: value for key, value in self._merged(given).items() if key not in unset}
        for key, option in (("base", "--base"), ("prompt", "--prompt")):
            if key not in settings:
                raise JobError(f"no {key} for this job: give {key!r} on the line or {option} on the command line")
        args = argparse.Namespace(**{**self._full_defaults, **settings})
        request = _request_from_args(args, self._parser, GENERATE_DEFAULTS)
        # Absolute paths: a Ray worker on another node (or in another folder) opens the same files.
        models = ModelSet(base=_absolute(args.base), refiner=_absolute(args.refiner), vae=_absolute(args.vae),
                          loras=tuple((_absolute(path), model, clip) for path, model, clip in args.lora or ()))
        embeddings = tuple(_absolute(folder) for folder in args.embeddings or ())
        return Job(line=number, request=request, models=models, embeddings=embeddings,
                   name=self._name(request, models, embeddings))

    def _name(self, request: GenerationRequest, models: ModelSet, embeddings: tuple[Path, ...]) -> str:
        """A file name that changes whenever anything that shapes the pixels does: a readable start from the prompt
        and a hash of the settings, the files (as absolute paths) and the precision."""
        def absolute(path: Path | None) -> str | None:
            return str(path.resolve()) if path is not None else None  # links resolved: one file, one name

        # The model-sampling overrides count only when set, so the jobs of a batch file written before they existed
        # keep their names (and a rerun still skips their finished images).
        settings = {key: value for key, value in request.parameters().items()
                    if not (key in _UNSET_BY_DEFAULT and value == _UNSET_BY_DEFAULT[key])}
        content = {"recipe": _NAME_RECIPE, "request": settings, "base": absolute(models.base),
                   "refiner": absolute(models.refiner), "vae": absolute(models.vae),
                   "loras": [[absolute(path), model, clip] for path, model, clip in models.loras],
                   "embeddings": [absolute(folder) for folder in embeddings], "dtype": self._dtype}
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
        words = re.sub(r"[^a-z0-9]+", "-", request.prompt.lower()).strip("-")[:40].rstrip("-")
        return f"{words or 'image'}-{digest}.png"


def _absolute(path: Path | None) -> Path | None:
    return path.absolute() if path is not None else None


def _is_lora_list(value: list) -> bool:
    """[file, strength(, clip strength)]: one LoRA given as a list rather than a list of LoRAs."""
    return 2 <= len(value) <= 3 and isinstance(value[0], str) and all(
        isinstance(part, (int, float)) and not isinstance(part, bool) for part in value[1:])


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a batch file with their 1-based numbers."""
    with open(path, encoding="utf-8") as stream:
        for number, text in enumerate(stream, start=1):
            if text.strip():
                yield number, text
