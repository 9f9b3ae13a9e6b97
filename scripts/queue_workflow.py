"""Queue an API-format workflow on a running ComfyUI and save the images it produces (standard library only).

    python3 scripts/queue_workflow.py example_workflows/api/sdxl_two_stage_txt2img_api.json \\
        --server http://127.0.0.1:8188 --set 4.text_g="a red fox in the snow" --set 7.seed=123 --out ./renders

`--set NODE.INPUT=VALUE` overrides one input (VALUE is read as JSON when it parses, else as a string). The script
posts to /prompt, polls /history/<prompt_id> until the run is done, then downloads every output image via /view.
A workflow ComfyUI refuses is reported with its per-node errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class WorkflowError(RuntimeError):
    """ComfyUI refused the workflow, or running it failed."""


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> dict:
    """An API-format prompt from a file, with `NODE.INPUT=VALUE` overrides applied."""
    prompt = json.loads(Path(path).read_text())
    if not isinstance(prompt, dict) or not all(isinstance(n, dict) and "class_type" in n for n in prompt.values()):
        raise WorkflowError(f"{path} is not an API-format workflow (export it with 'Export (API)' in ComfyUI); "
                            "UI-format files with 'nodes' and 'links' cannot be queued directly")
    for item in overrides or []:
        target, sep, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not (sep and dot and node_id in prompt):
            raise WorkflowError(f"--set {item!r}: expected NODE.INPUT=VALUE with a node id from {sorted(prompt)}")
        inputs = prompt[node_id]["inputs"]
        if name not in inputs:  # ComfyUI ignores unknown inputs: a typo would silently change nothing
            raise WorkflowError(f"--set {item!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input "
                                f"{name!r}; its inputs are {sorted(inputs)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        inputs[name] = value
    return prompt


def _request(server: str, path: str, payload: dict | None = None, timeout: float = 30.0) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(server.rstrip("/") + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")
        try:
            details = json.loads(body)
        except json.JSONDecodeError:
            raise WorkflowError(f"{path}: HTTP {error.code}: {body[:500]}") from None
        raise WorkflowError(describe_refusal(details)) from None


def describe_refusal(details: dict) -> str:
    """ComfyUI's validation failure as readable lines: the prompt error, then each node's errors."""
    lines = [details.get("error", {}).get("message", "the workflow was refused")]
    for node_id, node in (details.get("node_errors") or {}).items():
        for error in node.get("errors", []):
            lines.append(f"  node {node_id} ({node.get('class_type')}): {error.get('message')}: "
                         f"{error.get('details')}")
    return "\n".join(lines)


def queue(server: str, prompt: dict, client_id: str | None = None) -> str:
    """Post the prompt; return its prompt_id."""
    reply = _request(server, "/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
    if reply.get("node_errors"):
        raise WorkflowError(describe_refusal(reply))
    return reply["prompt_id"]


def wait(server: str, prompt_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict:
    """Poll /history until the prompt finished; return its history entry (raise if it failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = _request(server, f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            status = entry["status"]
            if status.get("status_str") != "success":
                messages = [m for m in status.get("messages", []) if m[0] in ("execution_error",
                                                                            "execution_interrupted")]
                detail = messages[-1][1].get("exception_message", messages[-1][0]) if messages else status
                raise WorkflowError(f"the run failed: {detail}")
            return entry
        time.sleep(poll)
    raise WorkflowError(f"no result for prompt {prompt_id} after {timeout:.0f} s")


def output_images(entry: dict) -> list[dict]:
    """Every image a finished prompt produced: [{"filename", "subfolder", "type", "node"}]."""
    return [{**image, "node": node_id} for node_id, output in entry.get("outputs", {}).items()
            for image in output.get("images", [])]


def download(server: str, image: dict, folder: Path) -> Path:
    query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / image["filename"]
    with urllib.request.urlopen(f"{server.rstrip('/')}/view?{query}", timeout=60) as response:
        target.write_bytes(response.read())
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", help="an API-format workflow JSON (e.g. example_workflows/api/*_api.json)")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override one input; repeatable")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the downloaded images")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the run")
    args = parser.parse_args(argv)
    try:
        prompt = load_workflow(args.workflow, args.overrides)
        prompt_id = queue(args.server, prompt)
        print(f"queued {prompt_id}", file=sys.stderr)
        entry = wait(args.server, prompt_id, timeout=args.timeout)
        for image in output_images(entry):
            print(download(args.server, image, args.out))
    except (WorkflowError, urllib.error.URLError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
