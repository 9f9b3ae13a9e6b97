// The pack in ComfyUI's real frontend, in headless Chromium: node types registered, the extension registered once,
// the two-stage example loads, the bucket picker moves the sizes, and the frontend's own graphToPrompt queues it.
//
//   node tests/frontend/check_in_chromium.mjs <comfyui url> <ui workflow json> <base ckpt> <refiner ckpt>
//
// Needs Debian's chromium (CHROMIUM, default /usr/bin/chromium) and the npm package playwright-core, found through
// NODE_PATH or PLAYWRIGHT_CORE (its folder). Prints one JSON line of findings; exits 1 on the first failed check.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE ?? "playwright-core");
const [url, workflowPath, baseCkpt, refinerCkpt] = process.argv.slice(2);
const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const errors = [];
try {
  const page = await browser.newPage();
  page.on("console", (message) => {
    if (message.type() === "error" && /sdxl/i.test(message.text())) errors.push(message.text());
  });
  // Only errors of this pack count: the headless frontend has unrelated failures of its own (settings store).
  page.on("pageerror", (error) => {
    if (/extensions\//.test(String(error.stack))) errors.push(String(error.stack));
  });
  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types
    && Object.keys(window.LiteGraph.registered_node_types).some((t) => t.startsWith("SDXLTwoStage.")),
  null, { timeout: 120000 });

  const findings = await page.evaluate(async ({ workflow, baseCkpt, refinerCkpt }) => {
    const app = window.app;
    const out = {};
    out.types = Object.keys(window.LiteGraph.registered_node_types).filter((t) => t.startsWith("SDXLTwoStage.")).sort();
    out.extensionCount = app.extensions.filter((e) => e.name === "sdxl_two_stage.aspect_buckets").length;
    await app.loadGraphData(workflow);
    const nodes = app.graph._nodes ?? app.graph.nodes;
    out.nodeCount = nodes.length;
    const byType = (type) => nodes.find((n) => n.type === type);
    const w = (node, name) => node.widgets.find((x) => x.name === name);
    const latent = byType("SDXLTwoStage.EmptyLatent");
    const micro = byType("SDXLTwoStage.MicroConditioning");
    const sizes = () => ["width", "height", "target_width", "target_height"].map((n) => w(micro, n).value);
    const pick = (name, value) => { const x = w(latent, name); x.value = value; x.callback?.(value); };

    pick("resolution", "1344x768 (7:4)");
    out.afterBucket = { latent: [w(latent, "width").value, w(latent, "height").value], micro: sizes() };
    pick("width", 832); pick("height", 1216);
    out.afterTyping = { resolution: w(latent, "resolution").value, micro: sizes() };
    const mw = w(micro, "width"); mw.value = 4096; mw.callback?.(4096);
    pick("resolution", "1024x1024 (1:1)");
    out.afterOverride = sizes();
    // The node's own context menu (as LiteGraph builds it) turns following back on.
    const menu = app.canvas.getNodeMenuOptions(micro).filter(Boolean);
    const resume = menu.find((option) => option.content === "Follow the latent size again");
    out.menuOffersResume = Boolean(resume);
    resume?.callback?.();
    pick("resolution", "1152x896 (9:7)");
    out.afterResume = sizes();
    mw.value = 4096; mw.callback?.(4096);

    // Queue a tiny run through the frontend's own graph -> API conversion.
    pick("resolution", "custom"); pick("width", 64); pick("height", 64);
    for (const node of nodes) {
      const ckpt = node.widgets?.find((x) => x.name === "ckpt_name");
      if (ckpt) ckpt.value = /efiner/.test(node.title ?? "") ? refinerCkpt : baseCkpt;
      for (const [name, value] of [["steps", 3], ["end_at_step", 2], ["start_at_step", 2]]) {
        const x = node.widgets?.find((y) => y.name === name);
        if (x) x.value = value;
      }
    }
    const { output } = await app.graphToPrompt();
    out.promptMicroWidth = output[String(micro.id)].inputs.width;
    const response = await window.comfyAPI.api.api.queuePrompt(0, { output, workflow: app.graph.serialize() });
    out.promptId = response.prompt_id;
    return out;
  }, { workflow, baseCkpt, refinerCkpt });

  // findings.types is compared with the pack's node mappings by the caller (tests/nodes/test_comfyui_integration.py).
  assert.ok(findings.types.length > 0, JSON.stringify(findings.types));
  assert.equal(findings.extensionCount, 1);
  assert.deepEqual(findings.afterBucket, { latent: [1344, 768], micro: [1344, 768, 1344, 768] });
  assert.deepEqual(findings.afterTyping, { resolution: "832x1216 (13:19)", micro: [832, 1216, 832, 1216] });
  assert.deepEqual(findings.afterOverride, [4096, 1216, 832, 1216]);
  assert.equal(findings.menuOffersResume, true);
  assert.deepEqual(findings.afterResume, [1152, 896, 1152, 896]);
  assert.equal(findings.promptMicroWidth, 4096);
  assert.ok(findings.promptId);
  assert.deepEqual(errors, []);
  console.log(JSON.stringify(findings));
} finally {
  await browser.close();
}
