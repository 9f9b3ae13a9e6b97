#!/usr/bin/env python3
"""Peak resident memory of the two-stage SDXL run, step by step, next to the weights it holds.

Each path runs in a child process of its own, so one path's memory never counts towards another's and the
operating system's numbers are the child's alone. The child samples its own resident set (/proc/self/status
VmRSS, every few milliseconds) and attributes each sample to the step running at that moment; its overall peak is
the kernel's high-water mark (VmHWM), which no sampling can miss (or the largest sample, where the kernel's lazily
folded counters put VmHWM a few pages lower).

    python benchmarks/memory_two_stage.py                        # tiny random checkpoints, 64x64: checks the path
    python benchmarks/memory_two_stage.py --full-size /data/sdxl  # full-size random checkpoints (written once,
                                                                  # ~13 GB of files), 256x256, 6 steps, refiner from 4
    python benchmarks/memory_two_stage.py --full-size /data/sdxl --size 1024 --json memory.json
    COMFYUI_PATH=~/ComfyUI COMFYUI_PYTHON=~/ComfyUI/venv/bin/python \\
        python benchmarks/memory_two_stage.py --full-size /data/sdxl   # cli, nodes and comfyui, one after another
    ... --paths nodes            # one path alone (cli, nodes, comfyui); the tiny default runs cli and nodes
    python benchmarks/memory_two_stage.py --full-size /data/sdxl --dry-run  # commands and estimates; runs nothing

Paths:
- cli: `python -m sdxl_core generate --base ... --refiner ...` at its defaults (checkpoints opened stage by stage,
  weights held in the file's precision where that is exact: sdxl_core/runtime/stages.py, sdxl_core/operations.py).
- nodes (with COMFYUI_PATH and COMFYUI_PYTHON): the pack's two-stage example workflow
  (example_workflows/api/sdxl_two_stage_txt2img_api.json at this size and step split) inside ComfyUI.
- comfyui (with COMFYUI_PATH and COMFYUI_PYTHON): the same graph with ComfyUI's own nodes: CheckpointLoaderSimple
  x2, CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner, EmptyLatentImage, KSamplerAdvanced x2, VAEDecode, SaveImage.
  ComfyUI recognises models by their full-size shapes, so this path needs --full-size.
Both ComfyUI paths are run by ComfyUI's own executor (`execution.PromptExecutor`, as its server's prompt worker
runs a queued prompt: output cache, model management, node instances) in a child that set ComfyUI up as its
main.py does (`--cpu` for --device cpu, its built-in nodes, the pack from this checkout); each node's time counts
towards its step, and after the run the child is sampled again for what ComfyUI keeps between runs (raw, and once
the C heap has returned its free pages).

Full-size checkpoints are random weights in the original single-file layout with exactly the published keys,
shapes and dtypes (tests/data/manifests), written by the tests' own helper `write_from_manifest`. Memory does not
depend on the values. A benchmark, not a test: tests/test_bench.py-style CI runs only the tiny default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

RESULT_MARK = "MEMORY_TWO_STAGE_RESULT "
SAMPLE_SECONDS = 0.005
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry"
GB = 1e9


def _size(nbytes: int) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


# ---------------------------------------------------------------------------------------------------------------
# In the child: sample the resident set per step


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


class StepSampler:
    """A thread sampling the process's resident memory, attributing each sample to the current step."""

    def __init__(self):
        self.step = "start-up"
        self.order: list[str] = []
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StepSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    def enter(self, step: str) -> None:
        self._sample()  # the moment before belongs to the step that is ending
        self.step = step

    def _sample(self) -> None:
        rss = _status_bytes("VmRSS")
        if self.step not in self.peaks:
            self.order.append(self.step)
        self.peaks[self.step] = max(self.peaks.get(self.step, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()

    def result(self) -> dict:
        # The kernel's per-CPU RSS counters are folded into VmHWM lazily, so a sample may exceed it by a few pages.
        return {"steps": [{"step": step, "peak_rss": self.peaks[step]} for step in self.order],
                "peak_rss": max(_status_bytes("VmHWM"), *self.peaks.values())}


def _trim_heap() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns large blocks itself
        pass


def child_cli(argv: list[str]) -> dict:
    """The command line in this process, each pipeline step labelled (`sdxl_core.pipeline.pipeline_stage`)."""
    import contextlib

    import sdxl_core.pipeline as pipeline
    from sdxl_core.app.cli import main

    with StepSampler() as sampler:
        real_stage = pipeline.pipeline_stage

        @contextlib.contextmanager
        def labelled(model, part, residency=None):
            sampler.enter(f"{model.kind} {part}")
            with real_stage(model, part, residency):
                yield
            sampler.enter("between steps")

        pipeline.pipeline_stage = labelled
        sampler.enter("open checkpoints")
        code = main(argv)
        sampler.enter("write PNG")
    if code != 0:
        raise SystemExit(f"the command line failed with exit status {code}")
    return sampler.result()


CFG = 7.0
SEED = 42


def pack_graph(base: str, refiner: str, size: int, steps: int, refiner_start: int) -> tuple[dict, dict]:
    """The pack's two-stage example workflow (example_workflows/api) at this size and step split, and the step
    each node belongs to."""
    prompt = json.loads((ROOT / "example_workflows" / "api" / "sdxl_two_stage_txt2img_api.json").read_text())
    by_type: dict[str, list[str]] = {}
    for node_id, node in sorted(prompt.items(), key=lambda item: int(item[0])):
        by_type.setdefault(node["class_type"].removeprefix("SDXLTwoStage."), []).append(node_id)

    def inputs(kind: str, index: int = 0) -> dict:
        return prompt[by_type[kind][index]]["inputs"]

    inputs("CheckpointLoader", 0)["ckpt_name"], inputs("CheckpointLoader", 1)["ckpt_name"] = base, refiner
    inputs("EmptyLatent").update(resolution="custom", width=size, height=size)
    inputs("MicroConditioning").update(width=size, height=size, target_width=size, target_height=size)
    for index, text in enumerate((PROMPT, NEGATIVE)):
        inputs("TextEncodeBase", index)["text_g"] = text
        inputs("TextEncodeRefiner", index)["text"] = text
    inputs("SaveImage")["filename_prefix"] = "memory_two_stage"
    inputs("BaseSampler").update(steps=steps, end_at_step=refiner_start, cfg=CFG, seed=SEED)
    inputs("RefinerSampler").update(steps=steps, start_at_step=refiner_start, cfg=CFG, seed=SEED)
    steps_of = {"EmptyLatent": "latent", "TextEncodeBase": "base text", "MicroConditioning": "base text",
                "TextEncodeRefiner": "refiner text", "AestheticScore": "refiner text", "BaseSampler": "base unet",
                "RefinerSampler": "refiner unet", "VAEDecode": "base vae", "SaveImage": "write PNG"}
    labels = {node_id: steps_of[kind] for kind, ids in by_type.items() if kind in steps_of for node_id in ids}
    labels[by_type["CheckpointLoader"][0]], labels[by_type["CheckpointLoader"][1]] = "base load", "refiner load"
    return prompt, labels


def comfyui_graph(base: str, refiner: str, size: int, steps: int, refiner_start: int) -> tuple[dict, dict]:
    """The same two-stage graph with ComfyUI's own nodes (CheckpointLoaderSimple x2, CLIPTextEncodeSDXL,
    CLIPTextEncodeSDXLRefiner, KSamplerAdvanced x2, VAEDecode), and the step each node belongs to."""
    def sampler(model: str, positive: str, negative: str, latent: str, first: bool) -> dict:
        return {"class_type": "KSamplerAdvanced", "inputs": {
            "model": [model, 0], "add_noise": "enable" if first else "disable", "noise_seed": SEED, "steps": steps,
            "cfg": CFG, "sampler_name": "euler", "scheduler": "normal", "positive": [positive, 0],
            "negative": [negative, 0], "latent_image": [latent, 0], "start_at_step": 0 if first else refiner_start,
            "end_at_step": refiner_start if first else 10000,
            "return_with_leftover_noise": "enable" if first else "disable"}}

    sizes = {"width": size, "height": size}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": refiner}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {**sizes, "batch_size": 1}},
        **{node_id: {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "clip": ["1", 1], **sizes, "crop_w": 0, "crop_h": 0, "target_width": size, "target_height": size,
            "text_g": text, "text_l": text}} for node_id, text in (("4", PROMPT), ("5", NEGATIVE))},
        **{node_id: {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "clip": ["2", 1], "ascore": score, **sizes, "text": text}}
           for node_id, text, score in (("6", PROMPT, 6.0), ("7", NEGATIVE, 2.5))},
        "8": sampler("1", "4", "5", "3", True),
        "9": sampler("2", "6", "7", "8", False),
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "memory_two_stage"}},
    }
    labels = {"1": "base load", "2": "refiner load", "3": "latent", "4": "base text", "5": "base text",
              "6": "refiner text", "7": "refiner text", "8": "base unet", "9": "refiner unet", "10": "base vae",
              "11": "write PNG"}
    return prompt, labels


def start_comfyui(comfyui: Path, checkpoint_folders: set[Path], device: str, output: Path, *, pack: bool):
    """ComfyUI set up in this process as its main.py sets it up for the server (its built-in nodes, and the pack
    when `pack`), with the checkpoints' folders and an output folder of our own; returns its `execution` module."""
    import asyncio

    sys.path.insert(0, str(comfyui))  # ComfyUI's `nodes` module, not the pack's `nodes/` folder
    sys.argv = ["main.py", *(["--cpu"] if device == "cpu" else [])]
    import comfy.options

    comfy.options.enable_args_parsing()
    import execution
    import folder_paths

    import nodes

    output.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(output))
    folder_paths.set_temp_directory(str(output / "temp"))
    for folder in checkpoint_folders:
        folder_paths.add_model_folder_path("checkpoints", str(folder))
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if pack and not asyncio.run(nodes.load_custom_node(str(ROOT))):
        raise SystemExit(f"ComfyUI could not load the pack from {ROOT} (see the log above)")
    return execution


def validated_graph(execution, graph: str, base: str, refiner: str, size: int, steps: int,
                    refiner_start: int) -> tuple[dict, dict, list]:
    """(prompt, step of each node, output nodes) of one graph, accepted by ComfyUI's own prompt validation."""
    import asyncio

    build = pack_graph if graph == "nodes" else comfyui_graph
    prompt, labels = build(base, refiner, size, steps, refiner_start)
    valid = asyncio.run(execution.validate_prompt("memory_two_stage", prompt, None))
    if not valid[0]:
        raise SystemExit(f"ComfyUI refused the {graph} graph: {valid[1]} {json.dumps(valid[3])[:2000]}")
    return prompt, labels, valid[2]


def child_in_comfyui(graph: str, comfyui: Path, base: Path, refiner: Path, size: int, steps: int,
                     refiner_start: int, device: str, output: Path) -> dict:
    """One graph ("nodes": the pack's example workflow, "comfyui": ComfyUI's own nodes) run by ComfyUI's own
    executor in this process (ComfyUI's interpreter), as its server's prompt worker runs a queued prompt: its output
    cache, its model management, its node instances. Each node's time is labelled with its step; after the run the
    process is sampled once more for what ComfyUI's cache keeps between runs."""
    execution = start_comfyui(comfyui, {base.parent, refiner.parent}, device, output, pack=graph == "nodes")
    prompt, labels, outputs = validated_graph(execution, graph, base.name, refiner.name, size, steps, refiner_start)

    with StepSampler() as sampler:
        class Server:  # what the executor reports to: the step of each node as it starts
            client_id = None
            last_node_id = None

            def send_sync(self, event, data, sid=None):
                if event == "executing" and data.get("node") is not None:
                    sampler.enter(labels.get(str(data["node"]), str(data["node"])))

        executor = execution.PromptExecutor(Server(), cache_type=execution.CacheType.CLASSIC)
        sampler.enter("start-up")
        executor.execute(prompt, "memory_two_stage", {"client_id": "memory_two_stage"}, outputs)
        sampler.enter("held after the run")
        time.sleep(0.5)
        # The same once the C heap has handed its free pages back: what the cache and the loaded models keep alive,
        # without the freed working memory glibc keeps for the next run.
        sampler.enter("held, heap trimmed")
        _trim_heap()
        time.sleep(0.5)
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        raise SystemExit(f"the {graph} graph failed in ComfyUI: {json.dumps(errors)[:3000]}")
    if not list(output.glob("memory_two_stage*.png")):
        raise SystemExit(f"the {graph} graph ran but wrote no image into {output}")
    return sampler.result()


# ---------------------------------------------------------------------------------------------------------------
# In the parent: checkpoints, children, report


def tiny_checkpoints(folder: Path) -> dict[str, Path]:
    from sdxl_core.app.demo import demo_checkpoints

    return demo_checkpoints(folder)


def full_size_checkpoints(folder: Path, *, write: bool) -> dict[str, Path]:
    """Full-size random checkpoints from the manifests, written once into `folder` (~6.9 GB + 6.1 GB)."""
    from tests._checkpoints import write_from_manifest

    manifests = ROOT / "tests" / "data" / "manifests"
    paths = {}
    for kind in ("base", "refiner"):
        path = folder / f"sdxl_{kind}_random.safetensors"
        manifest = manifests / f"sdxl_{kind}_manifest.json"
        if not path.exists():
            if not write:
                print(f"would write {path} from {manifest.relative_to(ROOT)}", file=sys.stderr)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                print(f"writing {path} from {manifest.relative_to(ROOT)} (once)", file=sys.stderr)
                write_from_manifest(manifest, path, seed={"base": 1, "refiner": 2}[kind])
        paths[kind] = path
    return paths


def weights_held(paths: dict[str, Path], device: str) -> dict:
    """What each network weighs in the precision the CLI holds it in, from the headers alone, and the files."""
    import torch

    from sdxl_core.checkpoints.loading import open_checkpoint

    report = {}
    for kind, path in paths.items():
        model = open_checkpoint(path, device=torch.device(device), expect=kind)
        report[kind] = {"file_bytes": path.stat().st_size,
                        "held_bytes": {name: model.weight_bytes(name) for name in model.component_names}}
    return report


def cli_argv(paths: dict[str, Path], size: int, steps: int, refiner_start: int, device: str, out: Path) -> list[str]:
    return ["generate", "--base", str(paths["base"]), "--refiner", str(paths["refiner"]), "--prompt", PROMPT,
            "--negative", NEGATIVE, "--width", str(size), "--height", str(size), "--steps", str(steps),
            "--refiner-start", str(refiner_start), "--device", device, "--out", str(out)]


def run_child(command: list[str], env: dict | None = None) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    killed = " (killed by a signal: the out-of-memory killer?)" if done.returncode < 0 else ""
    raise RuntimeError(f"the child exited with status {done.returncode}{killed} and no result:\n{tail}")


def _stage_weights(step: str, held: dict) -> int | None:
    """Weights the pipeline step `step` ("base unet", "refiner text", ...) reads, from `weights_held`."""
    from sdxl_core.runtime.residency import STAGE_PARTS

    kind, _, part = step.partition(" ")
    names = STAGE_PARTS.get(part)
    if kind not in held or names is None:
        return None
    return sum(held[kind]["held_bytes"].get(name, 0) for name in names)


def report(results: dict, held: dict) -> str:
    total_held = sum(sum(entry["held_bytes"].values()) for entry in held.values())
    total_files = sum(entry["file_bytes"] for entry in held.values())
    lines = [f"weights: {_size(total_held)} as the CLI holds them (base + refiner), files {_size(total_files)}", ""]
    for path, result in results.items():
        lines.append(f"{path}: peak resident {_size(result['peak_rss'])} (VmHWM), {result.get('seconds', '?')} s")
        lines.append(f"  {'step':<18} {'peak RSS':>10} {'its weights':>12}")
        for entry in result["steps"]:
            weights = _stage_weights(entry["step"], held)
            shown = _size(weights) if weights is not None else ""
            lines.append(f"  {entry['step']:<18} {_size(entry['peak_rss']):>10} {shown:>12}")
        lines.append("")
    return "\n".join(lines)


PATHS = ("cli", "nodes", "comfyui")


def estimated_peak(paths: dict[str, Path], size: int, device: str, path: str) -> int:
    """What the largest step of `path` adds to the process's start-up memory, from the headers alone: the core's
    own estimate (sdxl_core/runtime/memory_estimate.py) of the CLI's steps; the pack's nodes hold, in addition, the
    VAE each checkpoint loader returns (both read at load, kept with ComfyUI's cached output)."""
    import torch

    from sdxl_core.checkpoints.loading import open_checkpoint
    from sdxl_core.runtime.memory_estimate import estimate_generation

    models = {kind: open_checkpoint(p, device=torch.device(device), expect=kind) for kind, p in paths.items()}
    estimate = estimate_generation(models["base"], models["refiner"], size, size, 1, device=torch.device(device),
                                   uses_refiner=True)
    extra = sum(model.weight_bytes("vae") for model in models.values()) if path == "nodes" else 0
    return estimate.peak.total + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", type=Path, metavar="DIR",
                        help="use (and write once, ~13 GB) full-size random checkpoints in DIR instead of tiny ones")
    parser.add_argument("--size", type=int, help="image side in pixels (default 256 full-size, 64 tiny)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--refiner-start", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu (the issue's case) or cuda")
    parser.add_argument("--paths", nargs="+", choices=PATHS,
                        help="which runs to measure (default: cli; with COMFYUI_PATH and COMFYUI_PYTHON also nodes, "
                             "and with --full-size also comfyui)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--dry-run", action="store_true", help="say what would run; write and run nothing")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "cli":
        print(RESULT_MARK + json.dumps(child_cli(args.child_args)))
        return 0
    if args.child in ("nodes", "comfyui"):
        comfyui, base, refiner, output = (Path(value) for value in args.child_args[:4])
        print(RESULT_MARK + json.dumps(child_in_comfyui(args.child, comfyui, base, refiner, args.size, args.steps,
                                                        args.refiner_start, args.device, output)))
        return 0
    if not Path("/proc/self/status").exists():
        parser.error("this benchmark reads /proc/self/status (Linux) for per-step resident memory")

    comfyui, comfy_python = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")
    if bool(comfyui) != bool(comfy_python):
        parser.error("give both COMFYUI_PATH (the checkout) and COMFYUI_PYTHON (its interpreter) for the paths in "
                     "ComfyUI")
    chosen = args.paths or ["cli", *(["nodes"] if comfyui else []), *(["comfyui"] if comfyui and args.full_size
                                                                       else [])]
    if not comfyui and set(chosen) & {"nodes", "comfyui"}:
        parser.error("the nodes and comfyui paths run inside ComfyUI: set COMFYUI_PATH and COMFYUI_PYTHON")
    if "comfyui" in chosen and not args.full_size:
        parser.error("ComfyUI recognises SDXL by its full-size shapes: add --full-size DIR for its own nodes' path")

    size = args.size or (256 if args.full_size else 64)
    with tempfile.TemporaryDirectory(prefix="memory_two_stage_") as scratch:
        scratch = Path(scratch)
        if args.full_size:
            paths = full_size_checkpoints(args.full_size.expanduser(), write=not args.dry_run)
        else:
            paths = tiny_checkpoints(scratch / "tiny")
        settings = ["--size", str(size), "--steps", str(args.steps), "--refiner-start", str(args.refiner_start),
                    "--device", args.device]
        me = [sys.executable, str(Path(__file__).resolve()), *settings]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        children = {}
        for path in chosen:
            if path == "cli":
                children[path] = ([*me, "--child", "cli", "--",
                                   *cli_argv(paths, size, args.steps, args.refiner_start, args.device,
                                             scratch / "cli.png")], env)
            else:
                children[path] = ([comfy_python, str(Path(__file__).resolve()), *settings, "--child", path, "--",
                                   str(Path(comfyui).expanduser()), str(paths["base"]), str(paths["refiner"]),
                                   str(scratch / path)], None)
        if args.dry_run:
            for name, (command, _) in children.items():
                print(f"{name}: {' '.join(command)}")
            if all(path.exists() for path in paths.values()):
                print(json.dumps(weights_held(paths, args.device), indent=2))
                for name in children:
                    if name != "comfyui":
                        print(f"{name}: its largest step adds an estimated "
                              f"{_size(estimated_peak(paths, size, args.device, name))} to start-up memory")
            return 0
        held = weights_held(paths, args.device)
        results = {}
        for name, (command, child_env) in children.items():
            started = time.perf_counter()
            results[name] = run_child(command, child_env)
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            print(f"{name}: done in {results[name]['seconds']} s", file=sys.stderr)
    print(report(results, held))
    if args.json:
        args.json.write_text(json.dumps({"size": size, "steps": args.steps, "refiner_start": args.refiner_start,
                                         "device": args.device, "weights": held, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
