// lungserve page: drop images, see labels, probabilities, referrals, Grad-CAM and class maps.
// Plain browser JavaScript, no libraries and no network beyond this server (works offline).
"use strict";

const SLIDE_EXTENSIONS = ["tif", "tiff", "svs", "ndpi", "mrxs", "scn", "bif", "vms", "vmu"];
const IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "bmp", ...SLIDE_EXTENSIONS];
const PARALLEL = 4; // requests in flight; the server batches them
const MAX_RETRIES = 5; // on 503 overloaded, after Retry-After

const state = {
  classes: [],
  colours: {},
  tileSourcePx: 768,
  modelVersion: "",
  explain: null, // whether the model has Grad-CAM outputs (from /page/config.json)
  results: [], // one entry per file, in the order added
  queue: [],
  running: 0,
  total: 0,
  done: 0,
};

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "lungserve-api-key";

// With LUNGSERVE_API_KEYS_FILE the API needs a key; the page itself is open. The key the user
// types is kept in sessionStorage (this tab only) and sent as X-API-Key.
function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { "X-API-Key": key } : {};
}

function askForKey(message) {
  const form = $("key-form");
  form.hidden = false;
  $("model-line").textContent = message;
  $("api-key").focus();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function extension(name) {
  const dot = name.lastIndexOf(".");
  return dot < 0 ? "" : name.slice(dot + 1).toLowerCase();
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

const REASONS = {
  low_confidence: "low confidence",
  out_of_distribution: "unlike the training images",
};

async function loadModel() {
  try {
    const response = await fetch("/page/config.json", { headers: authHeaders() });
    if (response.status === 401) {
      askForKey("This server needs an API key before it shows its model.");
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    $("key-form").hidden = true;
    const config = await response.json();
    state.classes = config.classes;
    state.colours = config.colours;
    state.tileSourcePx = config.tile_source_px;
    state.explain = config.explain;
    state.modelVersion = config.model.version;
    $("model-line").textContent =
      `Model ${config.model.name} ${config.model.version} on ${config.provider}; classes ${state.classes.join(", ")}; ` +
      `large images are tiled in ${state.tileSourcePx} px squares` +
      (config.explain ? "; Grad-CAM available." : "; this model has no Grad-CAM outputs.");
    $("model-estimate").textContent = estimateLine(config.estimate);
    renderLegend();
  } catch (err) {
    $("model-line").textContent = `The model description could not be loaded (${err.message}); results still work.`;
  }
}

function estimateLine(estimate) {
  if (!estimate) {
    return "This model publishes no accuracy estimate on unseen tissue groups (model.json has no \"estimate\").";
  }
  const pct = (x) => `${(100 * x).toFixed(1)}%`;
  const [lo, hi] = estimate.interval;
  return `Accuracy on tissue groups it never saw: ${pct(estimate.accuracy)} ` +
    `(95% interval ${pct(lo)} to ${pct(hi)}; ${estimate.method}, ${estimate.groups} groups).`;
}

function renderLegend() {
  const legend = $("legend");
  legend.replaceChildren();
  for (const cls of state.classes) {
    const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
    swatch.style.background = state.colours[cls] || "#999";
    legend.append(el("span", {}, swatch, cls));
  }
  legend.append(el("span", {}, el("span", { class: "swatch refer", "aria-hidden": "true" }), "refer (hatched)"));
}

// --- adding files -----------------------------------------------------------------------

function addFiles(files) {
  const list = Array.from(files).filter((f) => f.size > 0 || IMAGE_EXTENSIONS.includes(extension(f.name)));
  for (const file of list) {
    const entry = { file, name: file.webkitRelativePath || file.name, status: "queued" };
    entry.card = renderCard(entry);
    state.results.push(entry);
    state.queue.push(entry);
  }
  state.total += list.length;
  updateStatus();
  pump();
}

async function filesFromEntry(entry, out) {
  // Folders dropped on the page (FileSystem entries API).
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    if (IMAGE_EXTENSIONS.includes(extension(file.name))) out.push(file);
    return;
  }
  if (entry.isDirectory) {
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (batch.length === 0) break;
      for (const child of batch) await filesFromEntry(child, out);
    }
  }
}

async function onDrop(event) {
  event.preventDefault();
  $("drop-zone").classList.remove("dragging");
  const items = Array.from(event.dataTransfer.items || []);
  const entries = items.map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
  if (entries.length && entries.every((e) => e)) {
    const files = [];
    for (const entry of entries) await filesFromEntry(entry, files);
    addFiles(files);
  } else {
    addFiles(event.dataTransfer.files);
  }
}

// --- requests -----------------------------------------------------------------------------

async function post(path, file, extra = {}) {
  for (let attempt = 0; ; attempt += 1) {
    const body = new FormData();
    body.append("file", file, file.name);
    const query = new URLSearchParams(extra).toString();
    const response = await fetch(query ? `${path}?${query}` : path, { method: "POST", body, headers: authHeaders() });
    let payload = null;
    try {
      payload = await response.json();
    } catch {
      payload = null;
    }
    if (response.status === 503 && attempt < MAX_RETRIES && payload?.error?.code === "overloaded") {
      const wait = Number(response.headers.get("Retry-After") || "1");
      await new Promise((resolve) => setTimeout(resolve, 1000 * wait));
      continue;
    }
    if (response.status === 401) askForKey("The API key was refused; enter a valid one and add the images again.");
    if (!response.ok) {
      const message = payload?.error?.message || `HTTP ${response.status}`;
      const error = new Error(message);
      error.code = payload?.error?.code || `http_${response.status}`;
      throw error;
    }
    return payload;
  }
}

async function imageSize(file) {
  // Only what the browser can decode; TIFF and slide files go to /analyze directly.
  if (SLIDE_EXTENSIONS.includes(extension(file.name))) return null;
  try {
    const bitmap = await createImageBitmap(file);
    const size = { width: bitmap.width, height: bitmap.height };
    bitmap.close();
    return size;
  } catch {
    return null;
  }
}

function isLarge(file, size) {
  if (size === null) return SLIDE_EXTENSIONS.includes(extension(file.name));
  return Math.max(size.width, size.height) >= 1.5 * state.tileSourcePx;
}

async function process(entry) {
  entry.status = "running";
  setBusy(entry.card, true);
  try {
    const size = await imageSize(entry.file);
    if (isLarge(entry.file, size)) {
      entry.kind = "large image";
      entry.analysis = await post("/analyze", entry.file);
      renderAnalysis(entry);
    } else {
      entry.kind = "tile";
      entry.prediction = await post("/predict", entry.file);
      renderPrediction(entry);
    }
    entry.status = "done";
  } catch (err) {
    entry.status = "error";
    entry.error = err.message;
    renderError(entry.card, err.message);
  } finally {
    setBusy(entry.card, false);
    state.done += 1;
    updateStatus();
  }
}

function pump() {
  while (state.running < PARALLEL && state.queue.length) {
    const entry = state.queue.shift();
    state.running += 1;
    process(entry).finally(() => {
      state.running -= 1;
      pump();
    });
  }
}

function updateStatus() {
  const pending = state.total - state.done;
  $("status").textContent = state.total
    ? `${state.done} of ${state.total} done${pending ? `, ${pending} in progress` : ""}.`
    : "";
  $("export-csv").disabled = !state.results.some((r) => r.status === "done");
  $("clear").disabled = state.results.length === 0 || pending > 0;
}

// --- rendering ----------------------------------------------------------------------------

function renderCard(entry) {
  const figure = el("div", { class: "figure" });
  const body = el("div", { class: "body" },
    el("h3", { text: entry.name }),
    el("p", { class: "muted", text: "Waiting…" }),
  );
  const card = el("li", { class: "card", "data-name": entry.name, "aria-busy": "true" }, figure, body);
  if (!SLIDE_EXTENSIONS.includes(extension(entry.file.name))) {
    entry.objectUrl = URL.createObjectURL(entry.file);
    figure.append(el("img", { src: entry.objectUrl, alt: `${entry.name}, as uploaded` }));
  }
  $("results").append(card);
  return card;
}

function setBusy(card, busy) {
  card.setAttribute("aria-busy", busy ? "true" : "false");
}

function decisionBadge(result) {
  if (!result.decision) return null;
  const refer = result.decision === "refer";
  const text = refer ? `Refer${result.reason ? `: ${REASONS[result.reason] || result.reason}` : ""}` : "Accept";
  return el("span", { class: `decision ${refer ? "refer" : "accept"}`, text });
}

function bars(probabilities, name) {
  const grid = el("div", { class: "bars" });
  for (const [cls, p] of Object.entries(probabilities)) {
    const fill = el("span");
    fill.style.width = percent(p);
    fill.style.background = state.colours[cls] || "#0b5cad";
    grid.append(
      el("span", { text: cls }),
      el("div", {
        class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": "100",
        "aria-valuenow": (100 * p).toFixed(1), "aria-label": `${cls} probability for ${name}`,
      }, fill),
      el("span", { class: "num", text: percent(p) }),
    );
  }
  return grid;
}

function renderPrediction(entry) {
  const r = entry.prediction;
  const card = entry.card;
  card.classList.toggle("refer", r.decision === "refer");
  const body = card.querySelector(".body");
  const label = el("p", { class: "label-line" }, el("strong", { text: r.label }), ` ${percent(r.confidence)}`);
  const badge = decisionBadge(r);
  if (badge) label.append(badge);
  const cam = el("button", { type: "button", class: "secondary gradcam", "aria-pressed": "false", text: "Grad-CAM overlay" });
  cam.addEventListener("click", () => toggleGradCam(entry, cam));
  if (state.explain === false) {
    cam.disabled = true;
    cam.title = "The model being served has no Grad-CAM outputs";
  }
  const note = el("p", { class: "cam-note muted" });
  body.replaceChildren(body.querySelector("h3"), label, bars(r.probabilities, entry.name), el("div", { class: "actions" }, cam), note);
  card.classList.add("done");
}

async function toggleGradCam(entry, button) {
  const img = entry.card.querySelector(".figure img");
  const note = entry.card.querySelector(".cam-note");
  const on = button.getAttribute("aria-pressed") !== "true";
  if (on && !entry.camUrl) {
    button.disabled = true;
    note.textContent = "Computing Grad-CAM…";
    try {
      const answer = await post("/explain", entry.file);
      entry.explanation = answer.explanation;
      entry.camUrl = `data:${answer.explanation.media_type};base64,${answer.explanation.overlay_png}`;
      note.textContent = "";
    } catch (err) {
      note.textContent = "";
      renderError(entry.card, `Grad-CAM unavailable: ${err.message}`);
      button.disabled = false;
      return;
    }
    button.disabled = false;
  }
  button.setAttribute("aria-pressed", on ? "true" : "false");
  img.src = on ? entry.camUrl : entry.objectUrl;
  img.alt = on
    ? `${entry.name} with the Grad-CAM heatmap for ${entry.explanation.class}: bright yellow where the model found the most evidence`
    : `${entry.name}, as uploaded`;
  img.classList.toggle("cam", on);
}

function renderAnalysis(entry) {
  const a = entry.analysis;
  const card = entry.card;
  card.classList.add("large", "done");
  card.classList.toggle("refer", a.summary.referred_tiles > 0);
  const figure = card.querySelector(".figure");
  const mapUrl = `data:image/png;base64,${a.overlay_png}`;
  const imageUrl = `data:image/png;base64,${a.thumbnail_png}`;
  const img = el("img", {
    class: "class-map", src: mapUrl,
    alt: `Class map of ${entry.name}: each ${a.tile_source_px} px tile coloured by its predicted class, referred tiles hatched`,
  });
  figure.replaceChildren(img);
  const toggle = el("button", { type: "button", class: "secondary", "aria-pressed": "true", text: "Class map overlay" });
  toggle.addEventListener("click", () => {
    const on = toggle.getAttribute("aria-pressed") !== "true";
    toggle.setAttribute("aria-pressed", on ? "true" : "false");
    img.src = on ? mapUrl : imageUrl;
    img.alt = on ? `Class map of ${entry.name}` : `${entry.name}, without the class map`;
  });
  const s = a.summary;
  const table = el("table", { class: "summary" },
    el("caption", { class: "visually-hidden", text: `Share of tissue by class in ${entry.name}` }),
    el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Class" }), el("th", { scope: "col", text: "Tissue tiles" }), el("th", { scope: "col", text: "Share" }))),
  );
  const tbody = el("tbody");
  for (const [cls, share] of Object.entries(s.tissue_share)) {
    const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
    swatch.style.background = a.colours[cls] || "#999";
    tbody.append(el("tr", {}, el("td", {}, swatch, cls), el("td", { class: "num", text: String(s.tissue_tiles_by_class[cls]) }), el("td", { class: "num", text: percent(share) })));
  }
  table.append(tbody);
  const facts = el("p", { class: "muted",
    text: `${a.width} × ${a.height} px (${a.source.reader}, ${a.source.format}); ${s.tiles} tiles of ${a.tile_source_px} px: ` +
      `${s.tissue_tiles} tissue, ${s.background_tiles} background skipped, ${s.referred_tiles} referred.` });
  const label = el("p", { class: "label-line" });
  if (s.tissue_tiles > 0) {
    const top = Object.entries(s.tissue_share).sort((x, y) => y[1] - x[1])[0];
    label.append(el("strong", { text: top[0] }), ` on ${percent(top[1])} of the tissue`);
    if (s.referred_tiles > 0) label.append(el("span", { class: "decision refer", text: `Refer: ${s.referred_tiles} tile(s)` }));
  } else {
    label.append(el("strong", { text: "No tissue found" }));
  }
  const body = card.querySelector(".body");
  body.replaceChildren(body.querySelector("h3"), label, facts, table, el("div", { class: "actions" }, toggle));
}

function renderError(card, message) {
  const body = card.querySelector(".body");
  const waiting = body.querySelector("p.muted:not(.cam-note)");
  if (waiting && waiting.textContent === "Waiting…") waiting.remove();
  body.append(el("p", { class: "error", role: "alert", text: message }));
}

// --- CSV -------------------------------------------------------------------------------------

function csvCell(value) {
  const text = value === null || value === undefined ? "" : String(value);
  return /[",\n\r]/.test(text) || /^[=+\-@]/.test(text) ? `"${text.replace(/^([=+\-@])/, "'$1").replace(/"/g, '""')}"` : text;
}

function toCsv() {
  const classes = state.classes.length ? state.classes
    : Object.keys(state.results.find((r) => r.prediction)?.prediction.probabilities || {});
  const header = ["file", "kind", "label", "confidence", ...classes.map((c) => `p_${c}`), "decision", "reason",
    "tiles", "tissue_tiles", "background_tiles", "referred_tiles", ...classes.map((c) => `tissue_share_${c}`),
    "model_version", "error"];
  const rows = [header];
  for (const r of state.results) {
    if (r.status === "queued" || r.status === "running") continue;
    const p = r.prediction;
    const a = r.analysis;
    const s = a?.summary;
    rows.push([
      r.name, r.kind || "", p?.label ?? "", p ? p.confidence.toFixed(6) : "",
      ...classes.map((c) => (p ? p.probabilities[c]?.toFixed(6) ?? "" : "")),
      p?.decision ?? (s ? (s.referred_tiles > 0 ? "refer" : "accept") : ""), p?.reason ?? "",
      s?.tiles ?? "", s?.tissue_tiles ?? "", s?.background_tiles ?? "", s?.referred_tiles ?? "",
      ...classes.map((c) => (s ? s.tissue_share[c]?.toFixed(6) ?? "" : "")),
      (p || a)?.model?.version ?? "", r.error ?? "",
    ]);
  }
  return rows.map((row) => row.map(csvCell).join(",")).join("\r\n") + "\r\n";
}

function exportCsv() {
  const blob = new Blob([toCsv()], { type: "text/csv;charset=utf-8" });
  const link = el("a", { href: URL.createObjectURL(blob), download: "lungserve-results.csv" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function clearResults() {
  for (const r of state.results) if (r.objectUrl) URL.revokeObjectURL(r.objectUrl);
  state.results = [];
  state.total = 0;
  state.done = 0;
  $("results").replaceChildren();
  updateStatus();
}

// --- wiring -------------------------------------------------------------------------------

function init() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", onDrop);
  for (const id of ["file-input", "folder-input"]) {
    const input = $(id);
    const label = document.querySelector(`label[for="${id}"]`);
    input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
    // The input is visually hidden; show its focus on its label for keyboard users.
    input.addEventListener("focus", () => label.classList.add("file-focus"));
    input.addEventListener("blur", () => label.classList.remove("file-focus"));
  }
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    loadModel();
  });
  $("export-csv").addEventListener("click", exportCsv);
  $("clear").addEventListener("click", clearResults);
  loadModel();
}

window.lungserve = { state, toCsv }; // for tests and the curious
document.addEventListener("DOMContentLoaded", init);
