"""The pack inside a real ComfyUI (CPU), driven over its HTTP API exactly as a user's script would.

Skipped unless COMFYUI_PATH names a ComfyUI checkout. COMFYUI_PYTHON names the interpreter that has ComfyUI's
requirements (default: this one). The test starts `main.py --cpu` on a free local port with the pack loaded from a
temporary custom_nodes folder (through --extra-model-paths-config, like ComfyUI's own execution tests), tiny
checkpoints written by the test in its checkpoints folder, and queues every API-format example.
"""

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run")]

sys.path.insert(0, str(REPO / "scripts"))
import queue_workflow as client  # noqa: E402

API_DIR = REPO / "example_workflows" / "api"
PACK_FOLDER = "sdxl_two_stage"
TINY = {"sd_xl_base_1.0.safetensors": "tiny_sdxl_base.safetensors",
        "sd_xl_refiner_1.0.safetensors": "tiny_sdxl_refiner.safetensors"}
# The examples' ControlNet, replaced by a tiny one for the tiny base (random weights, so it visibly steers).
TINY_CONTROLNETS = {"diffusers_xl_canny_full.safetensors": "tiny_controlnet.safetensors"}
INPAINT_PICTURE = "inpaint.png"  # RGBA: the transparent right half is what LoadImage's MASK repaints
W, H, STEPS, HANDOFF = 64, 96, 4, 3
LORA = "tiny_style.safetensors"
STARTUP_TIMEOUT = 240
# COMFYUI_FRONT_END_ROOT serves another frontend build (e.g. the comfyui-frontend-package wheel's static folder)
# instead of the one ComfyUI's requirements pin.
FRONT_END = (["--front-end-root", os.environ["COMFYUI_FRONT_END_ROOT"]] if os.environ.get("COMFYUI_FRONT_END_ROOT")
             else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_tiny_embedding(path: Path) -> None:
    """An SDXL textual-inversion file for the tiny encoders: clip_l and clip_g vectors of their widths."""
    import torch
    from safetensors.torch import save_file

    from sdxl_core.config import TINY_CLIP_G, TINY_CLIP_L

    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(5)
    save_file({"clip_l": torch.randn(2, TINY_CLIP_L.hidden_size, generator=generator),
               "clip_g": torch.randn(2, TINY_CLIP_G.hidden_size, generator=generator)}, str(path))


def _write_tiny_lora(path: Path, base_checkpoint: Path) -> None:
    """A kohya-format LoRA over every layer of the tiny base (UNet and both text encoders)."""
    from safetensors.torch import save_file

    from sdxl_core.checkpoints.loading import load_checkpoint
    from tests._lora_files import kohya_lora

    path.parent.mkdir(parents=True, exist_ok=True)
    state = kohya_lora(load_checkpoint(base_checkpoint), seed=7)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    for sub in ("custom_nodes", "models/checkpoints", "models/vae", "input", "output", "temp", "user",
                "base/custom_nodes"):
        (root / sub).mkdir(parents=True)
    (root / "custom_nodes" / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    for kind, path in tiny_checkpoints.items():
        shutil.copyfile(path, root / "models" / "checkpoints" / f"tiny_sdxl_{kind}.safetensors")
    pixels = (np.indices((H, W, 3)).sum(axis=0) * 7 % 256).astype(np.uint8)
    Image.fromarray(pixels).save(root / "input" / "example.png")
    _write_tiny_embedding(root / "models" / "embeddings" / "shiny.safetensors")
    _write_tiny_lora(root / "models" / "loras" / LORA, tiny_checkpoints["base"])
    from tests._checkpoints import write_tiny_controlnet

    for tiny in TINY_CONTROLNETS.values():
        write_tiny_controlnet(root / "models" / "controlnet" / tiny)
    # What the mask editor saves: the painted-over part transparent (LoadImage's MASK is 1 - alpha).
    rgba = np.dstack([pixels[..., ::-1], np.full((H, W), 255, np.uint8)])
    rgba[:, W // 2:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "input" / INPAINT_PICTURE)
    (root / "extra_model_paths.yaml").write_text(
        f"sdxl_two_stage_test:\n  base_path: {root}\n  custom_nodes: custom_nodes\n"
        "  checkpoints: models/checkpoints\n  vae: models/vae\n  embeddings: models/embeddings\n"
        "  loras: models/loras\n  controlnet: models/controlnet\n")
    port = _free_port()
    log = open(root / "comfyui.log", "w")
    command = [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
               "--port", str(port), "--extra-model-paths-config", str(root / "extra_model_paths.yaml"),
               "--output-directory", str(root / "output"), "--input-directory", str(root / "input"),
               "--temp-directory", str(root / "temp"), "--user-directory", str(root / "user"),
               "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--preview-method", "latent2rgb",
               # A base directory of its own, so a read-only checkout without custom_nodes/ or models/ starts too
               # (CI's copy of ComfyUI is one); the pack and the models come from the extra paths above.
               "--base-directory", str(root / "base"), *FRONT_END]
    process = subprocess.Popen(command, cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{(root / 'comfyui.log').read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/system_stats", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer in {STARTUP_TIMEOUT} s")
                time.sleep(1)
        yield {"url": url, "root": root, "log": root / "comfyui.log"}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _get(server, path):
    with urllib.request.urlopen(server["url"] + path, timeout=30) as response:
        return json.loads(response.read())


def _example(name: str, **overrides) -> dict:
    prompt = json.loads((API_DIR / f"{name}_api.json").read_text())
    for node in prompt.values():
        if "ckpt_name" in node["inputs"]:
            node["inputs"]["ckpt_name"] = TINY[node["inputs"]["ckpt_name"]]
        if "control_net_name" in node["inputs"]:
            node["inputs"]["control_net_name"] = TINY_CONTROLNETS[node["inputs"]["control_net_name"]]
    for key, value in overrides.items():
        node_id, name_ = key.split(".")
        prompt[node_id]["inputs"][name_] = value
    return prompt


def _run(server, prompt) -> tuple[list[Path], dict]:
    prompt_id = client.queue(server["url"], prompt)
    entry = client.wait(server["url"], prompt_id, timeout=600)
    images = [client.download(server["url"], image, server["root"] / "downloads")
              for image in client.output_images(entry)]
    return images, entry


def test_pack_loads_and_object_info_lists_every_node(server):
    import nodes

    log = server["log"].read_text()
    # Only the pack's own import counts: core extras may fail in a venv without their optional modules (torchaudio).
    pack_failures = [line for line in log.splitlines()
                     if (("IMPORT FAILED" in line or "Cannot import" in line) and PACK_FOLDER in line)
                     or "SDXL two-stage nodes" in line]
    assert not pack_failures, log[-3000:]
    assert f"custom_nodes/{PACK_FOLDER}" in log  # the import-times table lists the pack, so it was loaded
    info = _get(server, "/object_info")
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert name in info, f"{name} missing from /object_info"
        entry = info[name]
        assert entry["category"] == cls.CATEGORY and entry["output"] == list(cls.RETURN_TYPES)
        assert entry["display_name"] == nodes.NODE_DISPLAY_NAME_MAPPINGS[name]
        for input_name, spec in entry["input"]["required"].items():
            assert spec[1]["tooltip"], f"{name}.{input_name}"
    # The V3 schema states a combo as ("COMBO", {"options": [...]}), which both frontends read.
    kind, options = info["SDXLTwoStage.CheckpointLoader"]["input"]["required"]["ckpt_name"]
    assert kind == "COMBO"
    loader = options["options"]
    assert set(TINY.values()) <= set(loader)
    extensions = _get(server, "/extensions")
    assert f"/extensions/{PACK_FOLDER}/sdxl_two_stage.js" in extensions, extensions
    with urllib.request.urlopen(server["url"] + f"/extensions/{PACK_FOLDER}/sdxl_buckets.js", timeout=30) as reply:
        assert b"export function parseBucketLabel" in reply.read()
    templates = _get(server, "/workflow_templates")
    assert sorted(templates[PACK_FOLDER]) == ["SDXL ControlNet two-stage (canny)", "SDXL inpainting",
                                              "SDXL refiner image polish", "SDXL two-stage text to image"]
    quoted = urllib.parse.quote("SDXL two-stage text to image.json")  # the browser fetches it by its title
    with urllib.request.urlopen(server["url"] + f"/api/workflow_templates/{PACK_FOLDER}/{quoted}", timeout=30) as r:
        assert json.loads(r.read())["models"][0]["name"] == "sd_xl_base_1.0.safetensors"
    help_page = urllib.parse.quote("SDXLTwoStage.BaseSampler.md")
    with urllib.request.urlopen(server["url"] + f"/extensions/{PACK_FOLDER}/docs/{help_page}", timeout=30) as r:
        assert r.read().startswith(b"# SDXL Base Sampler")
    chinese = _get(server, "/i18n")["zh"]["nodeDefs"]["SDXLTwoStage.BaseSampler"]
    assert chinese["display_name"].startswith("SDXL 基础采样器")


def _local_two_stage(root: Path, lora: tuple[str, float, float] | None = None) -> np.ndarray:
    """The same graph run in this process through the node classes (the reference for the server's PNG);
    `lora` = (file, strength_model, strength_clip) puts a Load SDXL LoRA node after the base loader."""
    from nodes import comfy_host
    from tests._nodes_helpers import node

    comfy_host.set_standalone_model_folders({"checkpoints": [str(root / "models" / "checkpoints")],
                                             "loras": [str(root / "models" / "loras")]})
    try:
        base, vae = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default")
        refiner, _ = node("CheckpointLoader").load("tiny_sdxl_refiner.safetensors", "default")
        if lora is not None:
            (base,) = node("LoraLoader").apply(base, *lora)
    finally:
        comfy_host.set_standalone_model_folders({})
    prompt = _example("sdxl_two_stage_txt2img")
    text = prompt["4"]["inputs"]["text_g"]
    negative = prompt["5"]["inputs"]["text_g"]
    positive = node("MicroConditioning").apply(node("TextEncodeBase").encode(base, text, "", "encode")[0],
                                               1024, 1024, 0, 0, 1024, 1024)[0]
    negative_base = node("TextEncodeBase").encode(base, negative, "", "encode")[0]
    latent = node("EmptyLatent").generate("custom", W, H, 1)[0]
    seed, cfg = prompt["7"]["inputs"]["seed"], prompt["7"]["inputs"]["cfg"]
    handoff = node("BaseSampler").sample(base, positive, negative_base, latent, seed, STEPS, cfg, "euler", "normal",
                                         HANDOFF, True, 1.0)[0]
    refiner_positive = node("TextEncodeRefiner").encode(refiner, text, "encode")[0]
    refiner_negative = node("AestheticScore").apply(node("TextEncodeRefiner").encode(refiner, negative,
                                                                                      "encode")[0], 2.5)[0]
    refined = node("RefinerSampler").sample(refiner, refiner_positive, refiner_negative, handoff, seed, STEPS, cfg,
                                            "euler", "normal", HANDOFF, 1.0)[0]
    image = node("VAEDecode").decode(vae, refined, "auto")[0]
    return np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8)


def test_two_stage_txt2img_example_runs_and_matches_the_nodes_in_process(server):
    prompt = _example("sdxl_two_stage_txt2img", **{
        "3.resolution": "custom", "3.width": W, "3.height": H, "7.steps": STEPS, "7.end_at_step": HANDOFF,
        "11.steps": STEPS, "11.start_at_step": HANDOFF})
    images, entry = _run(server, prompt)
    assert len(images) == 1
    with Image.open(images[0]) as png:
        assert png.size == (W, H)
        assert json.loads(png.info["prompt"])["7"]["class_type"] == "SDXLTwoStage.BaseSampler"
        served = np.asarray(png.convert("RGB"))
    expected = _local_two_stage(server["root"])
    # Another torch build runs inside ComfyUI, so allow rounding to land one level apart.
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 2


def test_lora_node_in_the_two_stage_example_matches_the_nodes_in_process(server):
    sizes = {"3.resolution": "custom", "3.width": W, "3.height": H, "7.steps": STEPS, "7.end_at_step": HANDOFF,
             "11.steps": STEPS, "11.start_at_step": HANDOFF}
    prompt = _example("sdxl_two_stage_txt2img", **sizes)
    prompt["20"] = {"class_type": "SDXLTwoStage.LoraLoader",
                    "inputs": {"model": ["1", 0], "lora_name": LORA, "strength_model": 0.8, "strength_clip": 0.6}}
    for consumer in ("4", "5", "7"):  # the base's text encoders and sampler take the LoRA'd model
        prompt[consumer]["inputs"]["model"] = ["20", 0]
    images, _ = _run(server, prompt)
    with Image.open(images[0]) as png:
        served = np.asarray(png.convert("RGB"))
    expected = _local_two_stage(server["root"], (LORA, 0.8, 0.6))
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 2
    assert np.abs(served.astype(int) - _local_two_stage(server["root"]).astype(int)).max() > 2  # it did something
    prompt["20"]["inputs"]["model"] = ["2", 0]  # the refiner into the LoRA loader
    prompt["11"]["inputs"]["model"] = ["20", 0]
    for consumer in ("4", "5", "7"):
        prompt[consumer]["inputs"]["model"] = ["1", 0]
    with pytest.raises(client.WorkflowError, match="SDXL LoRAs are trained for the base model"):
        _run(server, prompt)


def _nodes_in_process(root: Path, prompt: dict, core_nodes: dict) -> dict:
    """Run an API prompt in this process: the pack's nodes through their classes (what the server runs), each core
    node through `core_nodes[class_type](**inputs)`, which stands in for it. Returns every node's outputs."""
    import nodes
    from nodes import comfy_host

    comfy_host.set_standalone_model_folders({folder: [str(root / "models" / folder)]
                                             for folder in ("checkpoints", "vae", "loras", "controlnet")})
    outputs: dict[str, tuple] = {}

    def run(node_id: str) -> tuple:
        if node_id not in outputs:
            entry = prompt[node_id]
            inputs = {name: run(value[0])[value[1]] if isinstance(value, list) else value
                      for name, value in entry["inputs"].items()}
            if entry["class_type"] in core_nodes:
                outputs[node_id] = core_nodes[entry["class_type"]](**inputs)
            else:
                cls = nodes.NODE_CLASS_MAPPINGS[entry["class_type"]]
                outputs[node_id] = getattr(cls(), cls.FUNCTION)(**inputs)
        return outputs[node_id]

    try:
        for node_id in prompt:
            run(node_id)
    finally:
        comfy_host.set_standalone_model_folders({})
    return outputs


def _load_image_like_comfyui(path: Path):
    """ComfyUI's LoadImage on a single-frame picture: RGB in 0..1, and the MASK as 1 - alpha (64x64 zeros
    without an alpha channel)."""
    import torch

    with Image.open(path) as picture:
        rgb = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]
        if "A" in picture.getbands():
            mask = 1.0 - torch.from_numpy(np.asarray(picture.getchannel("A"), dtype=np.float32) / 255.0)[None]
        else:
            mask = torch.zeros(1, 64, 64)
    return rgb, mask


def _save_image_stand_in(images, filename_prefix):
    return (np.clip(255.0 * images[0].numpy(), 0, 255).astype(np.uint8),)


def _served(images: list[Path], prefix: str) -> np.ndarray:
    (path,) = [image for image in images if image.name.startswith(prefix)]
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


def test_inpainting_example_runs_and_matches_the_nodes_in_process(server):
    """LoadImage's painted mask -> SDXL VAE Encode -> core SetLatentNoiseMask -> SDXL Base Sampler: the server's
    picture equals the same graph run here, and the mask made a difference."""
    prompt = _example("sdxl_inpaint", **{"2.image": INPAINT_PICTURE, "7.steps": STEPS, "7.end_at_step": STEPS})
    images, _ = _run(server, prompt)
    served = _served(images, "sdxl_inpaint")
    assert served.shape == (H, W, 3)

    def set_latent_noise_mask(samples, mask):  # ComfyUI's SetLatentNoiseMask
        return ({**samples, "noise_mask": mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])},)

    core = {"LoadImage": lambda image: _load_image_like_comfyui(server["root"] / "input" / image),
            "SetLatentNoiseMask": set_latent_noise_mask, "SaveImage": _save_image_stand_in}
    (expected,) = _nodes_in_process(server["root"], prompt, core)["9"]
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 2
    core["SetLatentNoiseMask"] = lambda samples, mask: (samples,)
    (unmasked,) = _nodes_in_process(server["root"], prompt, core)["9"]
    assert np.abs(served.astype(int) - unmasked.astype(int)).max() > 2


def test_controlnet_example_runs_and_matches_the_nodes_in_process(server):
    """Core LoadImage -> Canny -> SDXL Apply ControlNet (with Load SDXL ControlNet) -> the two-stage samplers: the
    server's picture equals the same graph run here on the server's edge map, and the ControlNet made a
    difference."""
    prompt = _example("sdxl_controlnet_two_stage", **{
        "3.resolution": "custom", "3.width": W, "3.height": H, "11.steps": STEPS, "11.end_at_step": HANDOFF,
        "15.steps": STEPS, "15.start_at_step": HANDOFF})
    prompt["30"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "canny_edges"}}
    images, _ = _run(server, prompt)
    served, edges = _served(images, "sdxl_controlnet"), _served(images, "canny_edges")
    assert served.shape == (H, W, 3) and edges.shape == (H, W, 3) and edges.max() > 0

    import torch

    control = torch.from_numpy(edges.astype(np.float32) / 255.0)[None]
    core = {"LoadImage": lambda image: (None, None), "Canny": lambda image, **_: (control,),
            "SaveImage": _save_image_stand_in}
    (expected,) = _nodes_in_process(server["root"], prompt, core)["17"]
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 2
    prompt["10"]["inputs"]["strength"] = 0.0
    (plain,) = _nodes_in_process(server["root"], prompt, core)["17"]
    assert np.abs(served.astype(int) - plain.astype(int)).max() > 2


def test_controlnet_on_the_refiner_is_refused_with_a_sentence(server):
    prompt = _example("sdxl_controlnet_two_stage", **{
        "3.resolution": "custom", "3.width": W, "3.height": H, "11.steps": STEPS, "11.end_at_step": HANDOFF,
        "15.steps": STEPS, "15.start_at_step": HANDOFF})
    prompt["10"]["inputs"].update(positive=["12", 0], negative=["14", 0])  # refiner conditioning into Apply
    prompt["11"]["inputs"].update(positive=["6", 0], negative=["5", 0])
    prompt["15"]["inputs"].update(positive=["10", 0], negative=["10", 1])
    node, message = _failure(server, prompt)
    assert node == "10" and "SDXL ControlNets steer the base" in message


def test_refiner_img2img_example_runs(server):
    prompt = _example("sdxl_refiner_img2img", **{"6.steps": STEPS})
    images, _ = _run(server, prompt)
    with Image.open(images[0]) as png, Image.open(server["root"] / "input" / "example.png") as source:
        assert png.size == source.size
        refined, original = np.asarray(png.convert("RGB")), np.asarray(source.convert("RGB"))
    assert not np.array_equal(refined, original)


def test_core_nodes_before_and_after_ours(server):
    """Core ConditioningConcat, RepeatLatentBatch, ImageScaleBy and PreviewImage around the pack's nodes."""
    prompt = _example("sdxl_two_stage_txt2img", **{
        "3.resolution": "custom", "3.width": W, "3.height": H, "7.steps": STEPS, "7.end_at_step": STEPS})
    prompt["20"] = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["6", 0],
                                                                   "conditioning_from": ["4", 0]}}
    prompt["21"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["3", 0], "amount": 2}}
    prompt["7"]["inputs"].update(positive=["20", 0], latent_image=["21", 0])
    prompt["12"]["inputs"]["samples"] = ["7", 0]
    prompt["22"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["12", 0], "upscale_method": "nearest-exact",
                                                             "scale_by": 2.0}}
    prompt["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["22", 0]}}
    for unused in ("8", "9", "10", "11", "2"):
        del prompt[unused]
    images, _ = _run(server, prompt)
    assert len(images) == 2
    with Image.open(images[0]) as first, Image.open(images[1]) as second:
        assert first.size == (2 * W, 2 * H)
        assert not np.array_equal(np.asarray(first), np.asarray(second))  # each batch item has its own noise


class _WebSocket:
    """Just enough of a WebSocket client (RFC 6455, unmasked server frames) to read ComfyUI's /ws messages."""

    def __init__(self, url: str, client_id: str):
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the server closed the WebSocket"
            data += chunk
        return data

    def messages(self):
        """Yield ("text", dict) and ("binary", bytes) messages as they arrive."""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(length)
            opcode = first & 0x0F
            if opcode == 1:
                yield "text", json.loads(payload)
            elif opcode == 2:
                yield "binary", payload

    def close(self):
        self.sock.close()


def test_progress_per_step_with_latent_previews_over_the_websocket(server):
    """What the frontend shows: one progress message per sampler step, per node, and JPEG latent previews."""
    client_id = uuid.uuid4().hex
    ws = _WebSocket(server["url"], client_id)
    try:
        prompt = _example("sdxl_two_stage_txt2img", **{
            "3.resolution": "custom", "3.width": W, "3.height": H, "7.steps": STEPS, "7.end_at_step": HANDOFF,
            "11.steps": STEPS, "11.start_at_step": HANDOFF, "7.seed": 5, "11.seed": 5})
        prompt_id = client.queue(server["url"], prompt, client_id=client_id)
        progress, previews = {}, []
        for kind, message in ws.messages():
            if kind == "binary":
                previews.append(message)
                continue
            data = message.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if message["type"] == "progress":
                progress.setdefault(data["node"], []).append((data["value"], data["max"]))
            if message["type"] in ("execution_success", "execution_error"):
                assert message["type"] == "execution_success", data
                break
    finally:
        ws.close()
    assert progress["7"] == [(i, HANDOFF) for i in range(1, HANDOFF + 1)]
    assert progress["11"] == [(i, STEPS - HANDOFF) for i in range(1, STEPS - HANDOFF + 1)]
    assert len(previews) >= STEPS
    event, image_type = struct.unpack(">II", previews[0][:8])
    assert event in (1, 4)  # PREVIEW_IMAGE or PREVIEW_IMAGE_WITH_METADATA (protocol.py)
    if event == 1:
        assert image_type == 1 and previews[0][8:10] == b"\xff\xd8"  # JPEG


def test_prompts_name_embeddings_from_comfyuis_embeddings_folder(server):
    settings = {"3.resolution": "custom", "3.width": W, "3.height": H, "7.steps": STEPS, "7.end_at_step": HANDOFF,
                "11.steps": STEPS, "11.start_at_step": HANDOFF}
    prompt = _example("sdxl_two_stage_txt2img", **settings, **{"4.text_g": "a (embedding:shiny:1.2) lighthouse",
                                                                "8.text": "a embedding:shiny lighthouse"})
    images, _ = _run(server, prompt)
    assert len(images) == 1
    prompt = _example("sdxl_two_stage_txt2img", **settings, **{"4.text_g": "a embedding:dull lighthouse"})
    with pytest.raises(client.WorkflowError, match=r"embedding:dull, which is not in .*available: shiny"):
        _run(server, prompt)


def _refusal(server, prompt) -> dict:
    """The node_errors of a prompt ComfyUI refuses at queue time."""
    request = urllib.request.Request(server["url"] + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    return json.loads(refused.value.read())["node_errors"]


@pytest.mark.parametrize("setting", ["7.cfg", "11.cfg", "10.aesthetic_score", "20.strength_model"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_floats_are_refused_when_queued(server, setting, value):
    """NaN passes ComfyUI's own `<`/`>` range checks; each FLOAT input of the pack refuses it (and infinities) at
    queue time, before any node runs, and nothing is written."""
    prompt = _example("sdxl_two_stage_txt2img", **{"3.resolution": "custom", "3.width": W, "3.height": H})
    prompt["20"] = {"class_type": "SDXLTwoStage.LoraLoader",
                    "inputs": {"model": ["1", 0], "lora_name": LORA, "strength_model": 0.8, "strength_clip": 0.6}}
    prompt["7"]["inputs"]["model"] = ["20", 0]
    node_id, name = setting.split(".")
    prompt[node_id]["inputs"][name] = value
    outputs = sorted((server["root"] / "output").rglob("*"))
    with pytest.raises(client.WorkflowError, match=rf"node {node_id} .*{name} must be a finite number"):
        client.queue(server["url"], prompt)
    assert sorted((server["root"] / "output").rglob("*")) == outputs
    assert _get(server, "/queue")["queue_pending"] == []


def _failure(server, prompt) -> tuple[str, str]:
    """Run a prompt that fails: the failing node and its message."""
    prompt_id = client.queue(server["url"], prompt)
    with pytest.raises(client.WorkflowError):
        client.wait(server["url"], prompt_id, timeout=600)
    messages = dict((kind, data) for kind, data in _get(server, f"/history/{prompt_id}")[prompt_id]["status"]
                    ["messages"])
    error = messages["execution_error"]
    return str(error["node_id"]), error["exception_message"]


def _two_stage(**overrides) -> dict:
    return _example("sdxl_two_stage_txt2img", **{
        "3.resolution": "custom", "3.width": W, "3.height": H, "7.steps": STEPS, "7.end_at_step": HANDOFF,
        "11.steps": STEPS, "11.start_at_step": HANDOFF, **overrides})


def test_a_range_error_is_refused_at_queue_time_once_on_its_input(server):
    errors = _refusal(server, _example("sdxl_two_stage_txt2img", **{"7.steps": 0}))
    (entry,) = errors["7"]["errors"]
    assert entry["extra_info"]["input_name"] == "steps" and "min of 1" in entry["message"]


def test_settings_over_several_inputs_fail_once_before_the_node_works(server):
    node, message = _failure(server, _two_stage(**{"7.end_at_step": STEPS + 1}))
    assert node == "7" and message.count("past the last step") == 1
    node, message = _failure(server, _two_stage(**{"3.width": 100}))
    assert node == "3" and "multiple of 8" in message


def test_wiring_mistakes_the_links_show_stop_the_run_at_the_base_before_it_samples(server):
    prompt = _two_stage()
    prompt["11"]["inputs"]["positive"] = ["6", 0]  # base conditioning into the refiner
    node, message = _failure(server, prompt)
    assert node == "7" and "this is base conditioning wired into the refiner model" in message
    prompt = _two_stage(**{"11.start_at_step": HANDOFF - 1})  # the refiner set to another K than the base
    node, message = _failure(server, prompt)
    assert node == "7" and f"hands off at step {HANDOFF} of {STEPS}" in message
    prompt = _two_stage()
    prompt["7"]["inputs"]["negative"] = ["10", 0]  # refiner conditioning into the base
    node, message = _failure(server, prompt)
    assert node == "7" and "this is refiner conditioning wired into the base model" in message


def test_the_wrong_checkpoint_in_the_refiner_fails_with_a_sentence_at_run_time(server):
    prompt = _two_stage()
    prompt["11"]["inputs"]["model"] = ["1", 0]  # the base checkpoint in the refiner's slot: known once loaded
    node, message = _failure(server, prompt)
    assert node == "11" and "needs the SDXL refiner checkpoint" in message


def test_interrupt_stops_sampling_within_a_step(server):
    prompt = _example("sdxl_two_stage_txt2img", **{
        "3.resolution": "custom", "3.width": W, "3.height": H, "7.steps": 2000, "7.end_at_step": 2000,
        "7.seed": 99})
    prompt_id = client.queue(server["url"], prompt)
    deadline = time.monotonic() + 120
    while not _get(server, "/queue")["queue_running"]:
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.2)
    time.sleep(3)  # let the loaders and encoders finish and the sampler start
    request = urllib.request.Request(server["url"] + "/interrupt", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()
    stopped = time.monotonic()
    with pytest.raises(client.WorkflowError, match="execution_interrupted|interrupted"):
        client.wait(server["url"], prompt_id, timeout=120)
    assert time.monotonic() - stopped < 30


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PLAYWRIGHT_CORE = os.environ.get("PLAYWRIGHT_CORE")


@pytest.mark.skipif(not (PLAYWRIGHT_CORE and Path(CHROMIUM).exists() and shutil.which("node")),
                    reason="set PLAYWRIGHT_CORE to an npm playwright-core folder (and have Debian's chromium)")
def test_real_frontend_loads_the_example_and_the_picker_works(server):
    """ComfyUI's own frontend in headless Chromium: see tests/frontend/check_in_chromium.mjs for the checks."""
    import nodes

    result = subprocess.run(
        [shutil.which("node"), str(REPO / "tests" / "frontend" / "check_in_chromium.mjs"), server["url"],
         str(REPO / "example_workflows" / "SDXL two-stage text to image.json"), TINY["sd_xl_base_1.0.safetensors"],
         TINY["sd_xl_refiner_1.0.safetensors"]],
        capture_output=True, text=True, timeout=400, env={**os.environ, "CHROMIUM": CHROMIUM})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    findings = json.loads(result.stdout.strip().splitlines()[-1])
    assert findings["types"] == sorted(nodes.NODE_CLASS_MAPPINGS)  # every node type registered in the frontend
    entry = client.wait(server["url"], findings["promptId"], timeout=600)
    images = client.output_images(entry)
    assert len(images) == 1
    path = client.download(server["url"], images[0], server["root"] / "downloads")
    with Image.open(path) as png:
        assert png.size == (64, 64)
        assert "workflow" in png.info  # the frontend sent the UI workflow along, as it does for users


def test_comfyui_model_management_tracks_and_lets_go_of_our_networks(tiny_checkpoints):
    """In ComfyUI's own model management: our networks are counted as loaded models while used, and once ComfyUI
    drops the loader's output nothing else (no patcher, no cache) keeps them in memory."""
    script = f"""
import gc, importlib.util, sys, weakref
sys.path.insert(0, {COMFYUI!r})
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm
spec = importlib.util.spec_from_file_location("pack_under_test", {str(REPO / "__init__.py")!r})
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
host = sys.modules["pack_under_test.nodes.comfy_host"]
loaders = sys.modules["pack_under_test.nodes.loaders"]
host.set_standalone_model_folders({{}})
from sdxl_core.checkpoints.loading import load_checkpoint
assert host.comfy_available()
model = loaders._cached(("test",), lambda: load_checkpoint({str(tiny_checkpoints["base"])!r}))
host.prepare_networks([model.unet])
host.prepare_networks([model.clip_g, model.clip_l], role="text_encoder")
print("loaded", len(mm.current_loaded_models))
unet = weakref.ref(model.unet)
del model
gc.collect()
print("alive", unet() is not None, "loaded", len(mm.current_loaded_models), "cached", len(loaders._cache))
"""
    result = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", script], cwd=COMFYUI,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded 3" in result.stdout
    assert "alive False loaded 0 cached 0" in result.stdout
