// Pure logic of the aspect-bucket picker (web/js/sdxl_buckets.js). Run: node --test tests/web/
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  CUSTOM,
  EMPTY_LATENT,
  MICRO_CONDITIONING,
  afterManualEdit,
  isFollowing,
  labelForSize,
  latentSize,
  latentSourceFor,
  parseBucketLabel,
  pickerUpdate,
  planMicroSync,
  resumeFollowing,
} from "../../web/js/sdxl_buckets.js";

const LABELS = [CUSTOM, "1024x1024 (1:1)", "1152x896 (9:7)", "896x1152 (7:9)", "1344x768 (7:4)"];

test("bucket labels parse to sizes; custom and junk do not", () => {
  assert.deepEqual(parseBucketLabel("1152x896 (9:7)"), { width: 1152, height: 896 });
  assert.deepEqual(parseBucketLabel("1344x768"), { width: 1344, height: 768 });
  assert.equal(parseBucketLabel(CUSTOM), null);
  assert.equal(parseBucketLabel("x12 (1:1)"), null);
  assert.equal(parseBucketLabel(undefined), null);
});

test("a size finds its bucket, or custom", () => {
  assert.equal(labelForSize(LABELS, 896, 1152), "896x1152 (7:9)");
  assert.equal(labelForSize(LABELS, 1152, 1152), CUSTOM);
});

test("the latent size is the bucket's, or the free size for custom", () => {
  assert.deepEqual(latentSize("1344x768 (7:4)", 64, 64), { width: 1344, height: 768 });
  assert.deepEqual(latentSize(CUSTOM, 640, 480), { width: 640, height: 480 });
});

test("picking a bucket moves width and height; typing a size picks its bucket", () => {
  assert.deepEqual(pickerUpdate(LABELS, "resolution", { resolution: "1152x896 (9:7)", width: 1024, height: 1024 }),
    { resolution: "1152x896 (9:7)", width: 1152, height: 896 });
  assert.deepEqual(pickerUpdate(LABELS, "resolution", { resolution: CUSTOM, width: 1152, height: 896 }),
    { resolution: CUSTOM, width: 1152, height: 896 });
  assert.deepEqual(pickerUpdate(LABELS, "width", { resolution: "1024x1024 (1:1)", width: 1344, height: 768 }),
    { resolution: "1344x768 (7:4)", width: 1344, height: 768 });
  assert.deepEqual(pickerUpdate(LABELS, "height", { resolution: "1024x1024 (1:1)", width: 1024, height: 1000 }),
    { resolution: CUSTOM, width: 1024, height: 1000 });
});

const DEFAULTS = { width: 1024, height: 1024, target_width: 1024, target_height: 1024 };

test("a fresh micro-conditioning node follows the latent and remembers what it was given", () => {
  const plan = planMicroSync(undefined, DEFAULTS, { width: 1344, height: 768 });
  assert.equal(plan.follow, true);
  assert.deepEqual(plan.values, { width: 1344, height: 768, target_width: 1344, target_height: 768 });
  assert.deepEqual(plan.state, { follow: true, lastSynced: plan.values });
  const next = planMicroSync(plan.state, plan.values, { width: 896, height: 1152 });
  assert.deepEqual(next.values, { width: 896, height: 1152, target_width: 896, target_height: 1152 });
});

test("values typed by hand are kept: the node stops following", () => {
  const synced = planMicroSync(undefined, DEFAULTS, { width: 1344, height: 768 });
  const typed = { ...synced.values, width: 4096, height: 4096 };
  const state = afterManualEdit(synced.state, typed, { width: 1344, height: 768 });
  assert.equal(state.follow, false);
  const plan = planMicroSync(state, typed, { width: 1024, height: 1024 });
  assert.equal(plan.values, null);
  assert.equal(plan.follow, false);
  // Even without the edit hook, a difference from the last synced values is an override.
  assert.equal(isFollowing(synced.state, typed, { width: 1024, height: 1024 }), false);
});

test("typing the latent's own size keeps following", () => {
  const size = { width: 1344, height: 768 };
  const state = afterManualEdit({ follow: false }, { width: 1344, height: 768, target_width: 1344,
    target_height: 768 }, size);
  assert.equal(state.follow, true);
});

test("a workflow saved with deliberate sizes and no picker state is not overwritten", () => {
  const saved = { width: 4096, height: 4096, target_width: 1024, target_height: 1024 };
  assert.equal(planMicroSync(undefined, saved, { width: 1024, height: 1024 }).values, null);
  const matching = { width: 832, height: 1216, target_width: 832, target_height: 1216 };
  assert.equal(planMicroSync(undefined, matching, { width: 832, height: 1216 }).follow, true);
});

test("following can be turned back on from the menu", () => {
  const typed = { width: 4096, height: 4096, target_width: 5, target_height: 5 };
  const plan = planMicroSync(resumeFollowing(typed), typed, { width: 832, height: 1216 });
  assert.deepEqual(plan.values, { width: 832, height: 1216, target_width: 832, target_height: 1216 });
  assert.equal(plan.state.follow, true);
});

function graph(...nodes) {
  return { nodes };
}

test("a micro node follows the empty latent of the sampler its conditioning feeds", () => {
  const g = graph(
    { id: 1, type: "SDXLTwoStage.TextEncodeBase", inputs: {}, downstream: [2] },
    { id: 2, type: MICRO_CONDITIONING, inputs: { conditioning: 1 }, downstream: [3] },
    { id: 3, type: "SDXLTwoStage.BaseSampler", inputs: { positive: 2, latent_image: 4 }, downstream: [5] },
    { id: 4, type: EMPTY_LATENT, inputs: {}, downstream: [3] },
    { id: 5, type: "SDXLTwoStage.RefinerSampler", inputs: { latent_image: 3 }, downstream: [] },
    { id: 6, type: EMPTY_LATENT, inputs: {}, downstream: [7] },
    { id: 7, type: MICRO_CONDITIONING, inputs: {}, downstream: [8] },
    { id: 8, type: "SDXLTwoStage.RefinerSampler", inputs: { latent_image: 9, positive: 7 }, downstream: [] },
    { id: 9, type: "RepeatLatentBatch", inputs: { samples: 3 }, downstream: [8] },
  );
  assert.equal(latentSourceFor(g, 2), 4);
  // through the refiner's latent chain: 8 <- 9 (RepeatLatentBatch) <- 3 (base sampler) <- 4
  assert.equal(latentSourceFor(g, 7), 4);
});

test("a latent whose size changed or came from elsewhere is not followed, even with one empty latent around", () => {
  const g = graph(
    { id: 1, type: EMPTY_LATENT, inputs: {}, downstream: [2] },
    { id: 2, type: "SDXLTwoStage.BaseSampler", inputs: { latent_image: 1 }, downstream: [3] },
    { id: 3, type: "LatentUpscaleBy", inputs: { samples: 2 }, downstream: [5] },
    { id: 4, type: MICRO_CONDITIONING, inputs: {}, downstream: [5] },
    { id: 5, type: "SDXLTwoStage.RefinerSampler", inputs: { latent_image: 3, positive: 4 }, downstream: [] },
    { id: 6, type: "VAEEncode", inputs: {}, downstream: [8] },
    { id: 7, type: MICRO_CONDITIONING, inputs: {}, downstream: [8] },
    { id: 8, type: "SDXLTwoStage.RefinerSampler", inputs: { latent_image: 6, positive: 7 }, downstream: [9] },
    { id: 9, type: "SDXLTwoStage.VAEDecode", inputs: { samples: 8 }, downstream: [] },
  );
  assert.equal(latentSourceFor(g, 4), null); // upscaled: the empty latent's size is no longer the sampler's
  assert.equal(latentSourceFor(g, 7), null); // an encoded image: its size is not known to the picker
});

test("an unwired micro node follows the only empty latent, or none when ambiguous", () => {
  const one = graph({ id: 1, type: MICRO_CONDITIONING, inputs: {}, downstream: [] },
    { id: 2, type: EMPTY_LATENT, inputs: {}, downstream: [] });
  assert.equal(latentSourceFor(one, 1), 2);
  const two = graph(...one.nodes, { id: 3, type: EMPTY_LATENT, inputs: {}, downstream: [] });
  assert.equal(latentSourceFor(two, 1), null);
});

test("cycles do not hang the walk", () => {
  const g = graph({ id: 1, type: MICRO_CONDITIONING, inputs: {}, downstream: [2] },
    { id: 2, type: "X", inputs: { latent_image: 3 }, downstream: [1] },
    { id: 3, type: "Y", inputs: { samples: 2 }, downstream: [2] });
  assert.equal(latentSourceFor(g, 1), null);
});
