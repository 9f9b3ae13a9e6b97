"""The command line: `python -m sdxl_core {generate,img2img,demo,inspect,batch}`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from . import arguments
from .control_args import add_control_arguments, control_options
from .options import _add_generation_arguments, _add_img2img_arguments, _img2img_request_from_args, _request_from_args


def build_parser() -> argparse.ArgumentParser:
    from .inspect import add_inspect_arguments

    parser = argparse.ArgumentParser(prog="python -m sdxl_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="text to image with the SDXL base and (optionally) refiner")
    _add_generation_arguments(generate, with_models=True)
    add_control_arguments(generate)
    img2img = commands.add_parser("img2img", help="rework an image with the SDXL refiner (or base): encode, "
                                                  "partial denoise, decode")
    _add_img2img_arguments(img2img)
    demo = commands.add_parser("demo", help="the whole two-stage path on tiny built-in random-weight models")
    _add_generation_arguments(demo, with_models=False)
    inspect = commands.add_parser("inspect", help="say what a checkpoint file is, from its header")
    add_inspect_arguments(inspect)
    from .batch import add_batch_arguments

    batch = commands.add_parser("batch", help="many generate runs from a JSON-lines file, resumable, locally or "
                                              "on a Ray cluster (docs/batch.md)")
    add_batch_arguments(batch)
    # A value refused after parsing is reported with its own subcommand's usage line, not the top-level one.
    parser.subcommand_parsers = dict(commands.choices)
    return parser


def _note_unusual_settings(args: argparse.Namespace) -> None:
    """Say so when a legal value is unlikely to be what was meant (the run goes on)."""
    cfg = getattr(args, "cfg", None)
    if cfg is not None and cfg < 1.0:
        print(f"warning: --cfg {cfg:g} below 1 weakens the prompt (at 0 the image follows the negative prompt "
              "alone); SDXL works best around 5-8", file=sys.stderr)


def _resolve_seed(args: argparse.Namespace) -> None:
    if not hasattr(args, "seed"):
        return
    args.seed, drawn = arguments.resolve_seed(args.seed)
    if drawn:
        print(f"seed: {args.seed} (drawn at random; --seed {args.seed} repeats this image)", file=sys.stderr)


def _run_command(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(arguments.join_dash_values(sys.argv[1:] if argv is None else argv))
    command_parser = parser.subcommand_parsers[args.command]
    if args.command == "inspect":
        from .inspect import run_inspect

        return run_inspect(args)
    if args.command == "batch":
        from .batch import run_batch

        return run_batch(args)
    from . import defaults
    from .runner import run_demo, run_generate, run_img2img

    _resolve_seed(args)
    _note_unusual_settings(args)
    if args.command in ("generate", "img2img"):
        args.controls = control_options(args, command_parser)
    if args.command == "img2img":
        return run_img2img(_img2img_request_from_args(args, command_parser), args)
    if args.command == "demo":
        request = _request_from_args(args, command_parser, defaults.DEMO)
        return run_demo(request, args)
    request = _request_from_args(args, command_parser, defaults.FULL)
    return run_generate(request, args)


@contextmanager
def _cancel_on_first_interrupt() -> Iterator[None]:
    """The first Ctrl-C (or SIGTERM) cancels the run; every later one is ignored, so the cleanup that follows
    (temporary files removed, the message printed) finishes without a second traceback. The handlers are restored
    afterwards unless a signal came (then the process is on its way out)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    watched = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {number: signal.getsignal(number) for number in watched}
    received = []

    def cancel(number, _frame):
        received.append(number)
        for each in watched:
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt

    for number in watched:
        signal.signal(number, cancel)
    try:
        yield
    finally:
        if not received:
            for number, handler in previous.items():
                signal.signal(number, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status is 0, 2 for a refusal, 130 when cancelled. What a user can cause ends in
    an `error: ...` sentence; anything else is reported as an internal error, with the details for a report."""
    with _cancel_on_first_interrupt():
        try:
            return _run_command(argv)
        except KeyboardInterrupt:
            print("\ncancelled; nothing was written", file=sys.stderr)
            return 130
        except Exception:  # noqa: BLE001 - the last stop before a bare traceback
            print("\nerror: internal error in sdxl_core; this is a bug, not something you did. Please report it "
                  "(https://github.com/sdxl-twostage/sdxl-twostage-nodes/issues) with the command line and the "
                  "details below:\n" + traceback.format_exc(), file=sys.stderr)
            return 70


if __name__ == "__main__":
    sys.exit(main())
