// ComfyUI frontend extension of the SDXL two-stage pack: the aspect-bucket picker.
//
// On "SDXL Empty Latent": picking a bucket sets width and height to it, and typing a size selects the matching
// bucket (or "custom"). Every "SDXL Micro-Conditioning" node keeps its original and target sizes equal to the latent
// size of the sampler its conditioning feeds, until the user types other values into it; its context menu turns
// following back on. The decisions live in sdxl_buckets.js (pure, tested with `node --test`); this file only wires
// them to the graph.

import { app } from "../../scripts/app.js";
import {
  EMPTY_LATENT,
  FOLLOWING_WIDGETS,
  MICRO_CONDITIONING,
  afterManualEdit,
  latentSize,
  latentSourceFor,
  pickerUpdate,
  planMicroSync,
  resumeFollowing,
} from "./sdxl_buckets.js";

const EXTENSION = "sdxl_two_stage.aspect_buckets";
const STATE = "sdxl_follow_latent"; // node.properties key, saved with the workflow

function classOf(node) {
  return node?.comfyClass ?? node?.type;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function nodesOf(graph) {
  return graph?._nodes ?? graph?.nodes ?? [];
}

function linkOf(graph, id) {
  if (id == null || !graph?.links) return undefined;
  return typeof graph.links.get === "function" ? graph.links.get(id) : graph.links[id];
}

/** The graph as the plain description latentSourceFor() walks. */
function describe(graph) {
  return {
    nodes: nodesOf(graph).map((node) => {
      const inputs = {};
      for (const input of node.inputs ?? []) inputs[input.name] = linkOf(graph, input.link)?.origin_id ?? null;
      const downstream = [];
      for (const output of node.outputs ?? []) {
        for (const id of output.links ?? []) {
          const link = linkOf(graph, id);
          if (link) downstream.push(link.target_id);
        }
      }
      return { id: node.id, type: classOf(node), inputs, downstream };
    }),
  };
}

function currentLatentSize(node) {
  return latentSize(widget(node, "resolution")?.value, widget(node, "width")?.value, widget(node, "height")?.value);
}

function followedValues(node) {
  const values = {};
  for (const name of Object.keys(FOLLOWING_WIDGETS)) values[name] = widget(node, name)?.value;
  return values;
}

function followedLatentSize(graph, micro) {
  const sourceId = latentSourceFor(describe(graph), micro.id);
  const source = sourceId == null ? null : graph.getNodeById(sourceId);
  return source ? currentLatentSize(source) : null;
}

function syncMicroNode(graph, micro) {
  const size = followedLatentSize(graph, micro);
  if (!size) return;
  micro.properties ??= {};
  const plan = planMicroSync(micro.properties[STATE], followedValues(micro), size);
  micro.properties[STATE] = plan.state;
  if (!plan.values) return;
  for (const [name, value] of Object.entries(plan.values)) {
    const w = widget(micro, name);
    if (w && w.value !== value) w.value = value;
  }
  micro.setDirtyCanvas?.(true, true);
}

function syncAll(graph) {
  if (!graph) return;
  for (const node of nodesOf(graph)) {
    if (classOf(node) === MICRO_CONDITIONING) syncMicroNode(graph, node);
  }
}

function chainCallback(w, after) {
  const original = w.callback;
  w.callback = function (...args) {
    const result = original?.apply(this, args);
    after(...args);
    return result;
  };
}

function bucketLabels(node) {
  const values = widget(node, "resolution")?.options?.values;
  return (typeof values === "function" ? values() : values) ?? [];
}

function setUpPicker(node) {
  for (const name of ["resolution", "width", "height"]) {
    const w = widget(node, name);
    if (!w) continue;
    chainCallback(w, () => {
      const next = pickerUpdate(bucketLabels(node), name, {
        resolution: widget(node, "resolution").value,
        width: widget(node, "width").value,
        height: widget(node, "height").value,
      });
      for (const [key, value] of Object.entries(next)) {
        const target = widget(node, key);
        if (target && target.value !== value) target.value = value;
      }
      syncAll(node.graph ?? app.graph);
    });
  }
}

function setUpMicro(node) {
  node.properties ??= {};
  for (const name of Object.keys(FOLLOWING_WIDGETS)) {
    const w = widget(node, name);
    if (!w) continue;
    // A value typed by hand ends following, unless it is the latent's own size.
    chainCallback(w, () => {
      const graph = node.graph ?? app.graph;
      node.properties[STATE] = afterManualEdit(node.properties[STATE], followedValues(node),
        followedLatentSize(graph, node));
    });
  }
  const originalMenu = node.getExtraMenuOptions;
  node.getExtraMenuOptions = function (canvas, options) {
    const result = originalMenu?.apply(this, [canvas, options]);
    const following = node.properties[STATE]?.follow !== false;
    options.push({
      content: following ? "Stop following the latent size" : "Follow the latent size again",
      callback: () => {
        node.properties[STATE] = following ? { follow: false } : resumeFollowing(followedValues(node));
        syncMicroNode(node.graph ?? app.graph, node);
      },
    });
    return result;
  };
}

function setUpConnections(node) {
  const original = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    const result = original?.apply(this, args);
    // Re-wiring can change which latent a micro-conditioning node follows.
    queueMicrotask(() => syncAll(node.graph ?? app.graph));
    return result;
  };
}

const extension = {
  name: EXTENSION,
  nodeCreated(node) {
    const type = classOf(node);
    if (type === EMPTY_LATENT) setUpPicker(node);
    if (type === MICRO_CONDITIONING) setUpMicro(node);
    if (type === EMPTY_LATENT || type === MICRO_CONDITIONING) setUpConnections(node);
  },
  afterConfigureGraph() {
    syncAll(app.graph);
  },
};

// ComfyUI may serve this folder twice (WEB_DIRECTORY and a pyproject `[tool.comfy] web` entry under another name);
// the second copy must not register the extension again.
if (!app.extensions?.some((ext) => ext.name === EXTENSION)) {
  app.registerExtension(extension);
}
