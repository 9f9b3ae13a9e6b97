// ComfyUI frontend extension of the SDXL two-stage pack: the aspect-bucket picker.
//
// On "SDXL Empty Latent": picking a bucket sets width and height to it, and typing a size selects the matching
// bucket (or "custom"). Every "SDXL Micro-Conditioning" node keeps its original and target sizes equal to the latent
// size of the sampler its conditioning feeds, until the user types other values into it; a "follow latent size"
// toggle on the node shows and switches that state (its context menu offers the same). A latent width or height
// driven by a link (a primitive node's value) is followed too. The decisions live in sdxl_buckets.js (pure, tested
// with `node --test`); this file only wires them to the graph.
//
// Only the frontend's public node API is used (getInputLink / getOutputNodes, addWidget, per-node callbacks): no
// reads of the deprecated `input.link` / `output.links`, no patched prototypes, so it runs on frontend 1.27 and 1.58.

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
const FOLLOW_TOGGLE = "follow latent size"; // the toggle widget showing that state

function classOf(node) {
  return node?.comfyClass ?? node?.type;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function nodesOf(graph) {
  return graph?._nodes ?? graph?.nodes ?? [];
}

/** The plain description latentSourceFor() walks: per node its latent-carrying inputs' origins and the nodes its
 * outputs feed, read through the node API. */
function describe(graph) {
  return {
    nodes: nodesOf(graph).map((node) => {
      const inputs = {};
      (node.inputs ?? []).forEach((input, slot) => {
        inputs[input.name] = node.getInputLink?.(slot)?.origin_id ?? null;
      });
      const downstream = [];
      (node.outputs ?? []).forEach((_, slot) => {
        for (const target of node.getOutputNodes?.(slot) ?? []) downstream.push(target.id);
      });
      return { id: node.id, type: classOf(node), inputs, downstream };
    }),
  };
}

// Widgets whose changes move a followed size from outside the pack's nodes (a primitive linked into a latent's
// width or height); chained once each.
const watchedSources = new WeakSet();

/** The value of input `name` of `node`: what a linked node supplies (a primitive's "value" widget, or an SDXL Empty
 * Latent's width/height output), else the node's own widget; undefined when a link brings a value this page cannot
 * know before the run. */
function inputValue(node, name, depth = 0) {
  const slot = node.inputs?.findIndex((input) => input.name === name) ?? -1;
  const link = slot >= 0 ? node.getInputLink?.(slot) : null;
  if (!link) return widget(node, name)?.value;
  const origin = node.graph?.getNodeById(link.origin_id);
  if (!origin || depth > 8) return undefined;
  if (classOf(origin) === EMPTY_LATENT) {
    const field = origin.outputs?.[link.origin_slot]?.name;
    return field === "width" || field === "height" ? currentLatentSize(origin, depth + 1)?.[field] : undefined;
  }
  const source = widget(origin, "value");
  if (!source) return undefined;
  if (!watchedSources.has(source)) {
    watchedSources.add(source);
    chainCallback(source, () => syncAll(origin.graph ?? app.graph));
  }
  return source.value;
}

function currentLatentSize(node, depth = 0) {
  const size = latentSize(widget(node, "resolution")?.value, inputValue(node, "width", depth),
    inputValue(node, "height", depth));
  return Number.isFinite(size.width) && Number.isFinite(size.height) ? size : null;
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

function isFollowingNow(micro) {
  return micro.properties?.[STATE]?.follow !== false;
}

/** Make the node's follow toggle show the stored state. */
function showFollowState(micro) {
  const toggle = widget(micro, FOLLOW_TOGGLE);
  const following = isFollowingNow(micro);
  if (toggle && toggle.value !== following) {
    toggle.value = following;
    micro.setDirtyCanvas?.(true, true);
  }
}

function syncMicroNode(graph, micro) {
  const size = followedLatentSize(graph, micro);
  micro.properties ??= {};
  if (size) {
    const plan = planMicroSync(micro.properties[STATE], followedValues(micro), size);
    micro.properties[STATE] = plan.state;
    for (const [name, value] of Object.entries(plan.values ?? {})) {
      const w = widget(micro, name);
      if (w && w.value !== value) w.value = value;
    }
    if (plan.values) micro.setDirtyCanvas?.(true, true);
  }
  showFollowState(micro);
}

function setFollowing(micro, follow) {
  micro.properties ??= {};
  micro.properties[STATE] = follow ? resumeFollowing(followedValues(micro)) : { follow: false };
  syncMicroNode(micro.graph ?? app.graph, micro);
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
      showFollowState(node);
    });
  }
  // The state on the node itself: a toggle that is not a node input (never saved in widgets_values nor sent to
  // the server; the state lives in node.properties).
  const toggle = node.addWidget("toggle", FOLLOW_TOGGLE, isFollowingNow(node), (value) => setFollowing(node, value),
    { on: "following the latent", off: "own values", serialize: false });
  if (toggle) toggle.serialize = false;
  // The same switch in the node's context menu (a per-node hook, chained with whatever was there).
  const originalMenu = node.getExtraMenuOptions;
  node.getExtraMenuOptions = function (canvas, options) {
    const result = originalMenu?.apply(this, [canvas, options]);
    const following = isFollowingNow(node);
    options.push({
      content: following ? "Stop following the latent size" : "Follow the latent size again",
      callback: () => setFollowing(node, !following),
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
