// Pure logic of the aspect-bucket picker: no DOM, no ComfyUI, so `node --test` can check it.
//
// The bucket labels come from the node definition the server sends ("1152x896 (9:7)", see sdxl_core/buckets.py),
// so this file holds no copy of the bucket table.

export const CUSTOM = "custom";
export const EMPTY_LATENT = "SDXLTwoStage.EmptyLatent";
export const MICRO_CONDITIONING = "SDXLTwoStage.MicroConditioning";
// Widgets of the micro-conditioning node that follow the latent size, and the latent field each one copies.
export const FOLLOWING_WIDGETS = {
  width: "width",
  height: "height",
  target_width: "width",
  target_height: "height",
};
// Inputs through which a latent reaches a sampler, walked upstream to find where it was made.
const LATENT_INPUTS = ["latent_image", "samples", "latent"];
// Nodes whose output latent has the size of their input latent, so the walk upstream may pass through them. Any
// other producer (VAE Encode, a latent upscale, core Empty Latent Image, ...) sets a size this file cannot read.
export const SIZE_PRESERVING = new Set([
  "SDXLTwoStage.BaseSampler",
  "SDXLTwoStage.RefinerSampler",
  "KSampler",
  "KSamplerAdvanced",
  "SamplerCustom",
  "SamplerCustomAdvanced",
  "RepeatLatentBatch",
  "LatentFromBatch",
  "LatentBatchSeedBehavior",
  "SetLatentNoiseMask",
]);

/** {width, height} of a bucket label such as "1152x896 (9:7)", or null for "custom" and anything else. */
export function parseBucketLabel(label) {
  const match = /^(\d+)x(\d+)(\s|$)/.exec(String(label ?? ""));
  if (!match) return null;
  return { width: Number(match[1]), height: Number(match[2]) };
}

/** The label among `labels` whose bucket is exactly width x height, else "custom". */
export function labelForSize(labels, width, height) {
  for (const label of labels) {
    const size = parseBucketLabel(label);
    if (size && size.width === width && size.height === height) return label;
  }
  return CUSTOM;
}

/** The image size an empty-latent node will produce: its bucket's size, or the free size for "custom". */
export function latentSize(resolution, width, height) {
  return parseBucketLabel(resolution) ?? { width, height };
}

/**
 * What the empty-latent node's widgets should show after one of them changed.
 * A bucket picked in the combo moves width/height to it; a size typed by hand selects its bucket if there is one,
 * else "custom" (the typed size is then what the node produces).
 */
export function pickerUpdate(labels, changed, values) {
  if (changed === "resolution") {
    const size = parseBucketLabel(values.resolution);
    return size ? { resolution: values.resolution, ...size } : { ...values };
  }
  return { resolution: labelForSize(labels, values.width, values.height), width: values.width, height: values.height };
}

// The micro-conditioning node's widget defaults (nodes/micro_conditioning.py; a Python test keeps them equal).
export const MICRO_DEFAULTS = { width: 1024, height: 1024, target_width: 1024, target_height: 1024 };

function sameFollowed(a, b) {
  return Object.keys(FOLLOWING_WIDGETS).every((name) => a?.[name] === b?.[name]);
}

function followedSize(size) {
  const values = {};
  for (const [widget, field] of Object.entries(FOLLOWING_WIDGETS)) values[widget] = size[field];
  return values;
}

/**
 * Whether a micro-conditioning node follows the latent size. Once synced, it follows while its size widgets still
 * hold what the picker last put there (`state.lastSynced`). Never synced (a new node, or a workflow saved without
 * this extension), it follows only if it still shows its defaults or already the latent size: other values were
 * typed on purpose. `state.follow === false` (the user's choice, or an earlier override) never follows.
 */
export function isFollowing(state, current, size) {
  if (state?.follow === false) return false;
  if (state?.lastSynced) return sameFollowed(state.lastSynced, current);
  return sameFollowed(current, MICRO_DEFAULTS) || (size != null && sameFollowed(current, followedSize(size)));
}

/**
 * The next state of one micro-conditioning node when the latent size is `size`:
 * `{follow, values, state}` where `values` are the widget values to set (null when the user overrode them).
 */
export function planMicroSync(state, current, size) {
  if (!isFollowing(state, current, size)) {
    return { follow: false, values: null, state: { ...(state ?? {}), follow: false } };
  }
  const values = followedSize(size);
  return { follow: true, values, state: { follow: true, lastSynced: { ...values } } };
}

/** The state after the user typed into one of the node's size widgets: typing the latent's own size keeps
 * following, anything else is an override. `size` is the followed latent size, or null if none is found. */
export function afterManualEdit(state, current, size) {
  if (size != null && sameFollowed(current, followedSize(size))) {
    return { follow: true, lastSynced: { ...current } };
  }
  return { ...(state ?? {}), follow: false };
}

/** The state after the user asked to follow the latent size again: the current values count as synced, so the
 * next sync replaces them. */
export function resumeFollowing(current) {
  return { follow: true, lastSynced: { ...current } };
}

/**
 * The empty-latent node whose size a micro-conditioning node should follow, in a plain graph description
 * `{nodes: [{id, type, inputs: {name: originId | null}, downstream: [ids]}]}`: walk from the micro node down to
 * the first node with a latent input (the sampler its conditioning feeds), then up that latent chain, through
 * size-preserving nodes only, to an empty-latent node. A latent made elsewhere (an encoded image, an upscale) gives
 * null: there is no size to follow. Only a micro node that feeds no sampler yet falls back to the graph's only
 * empty-latent node; null when there is none or it is ambiguous.
 */
export function latentSourceFor(graph, microId) {
  const byId = new Map(graph.nodes.map((node) => [node.id, node]));
  const latentInputOf = (node) => LATENT_INPUTS.find((name) => node.inputs?.[name] != null);
  const seen = new Set();
  const queue = [...(byId.get(microId)?.downstream ?? [])];
  while (queue.length) {
    const id = queue.shift();
    if (seen.has(id) || !byId.has(id)) continue;
    seen.add(id);
    const node = byId.get(id);
    const input = latentInputOf(node);
    if (input) return emptyLatentUpstream(byId, byId.get(node.inputs[input]), latentInputOf);
    queue.push(...(node.downstream ?? []));
  }
  const latents = graph.nodes.filter((node) => node.type === EMPTY_LATENT);
  return latents.length === 1 ? latents[0].id : null;
}

function emptyLatentUpstream(byId, start, latentInputOf) {
  const walked = new Set();
  for (let node = start; node && !walked.has(node.id);) {
    walked.add(node.id);
    if (node.type === EMPTY_LATENT) return node.id;
    const input = SIZE_PRESERVING.has(node.type) ? latentInputOf(node) : undefined;
    node = input ? byId.get(node.inputs[input]) : undefined;
  }
  return null;
}
