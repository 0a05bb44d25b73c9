// lungserve page, whole slides: submit a slide as a job (POST /jobs), follow its progress,
// show its class map when done, download its GeoJSON for QuPath. Uses page.js's helpers
// ($, el, authHeaders, askForKey); plain browser JavaScript, nothing from outside this server.
"use strict";

const JOB_POLL_MS = 500;
const JOB_FINAL = ["done", "failed", "cancelled"];
const slideJobs = []; // one entry per submitted slide: {name, id, card, status}

async function jobFetch(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) askForKey("The API key was refused; enter a valid one and submit the slide again.");
  return response;
}

async function jobError(response) {
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    payload = null;
  }
  return payload?.error?.message || `HTTP ${response.status}`;
}

function renderJobCard(name) {
  const bar = el("progress", { max: "1", value: "0", "aria-label": `Progress of ${name}` });
  const line = el("p", { class: "muted job-state", role: "status", text: "Uploading…" });
  const cancel = el("button", { type: "button", class: "secondary job-cancel", text: "Cancel" });
  const body = el("div", { class: "body" }, el("h3", { text: name }), line, bar, el("div", { class: "actions" }, cancel));
  const card = el("li", { class: "card large job", "data-state": "uploading", "aria-busy": "true" },
    el("div", { class: "figure" }), body);
  $("jobs").append(card);
  return card;
}

function updateJob(entry, status) {
  entry.status = status;
  const { card } = entry;
  const { tiles_done: done, tiles_total: total } = status.progress;
  const bar = card.querySelector("progress");
  bar.max = Math.max(total, 1);
  bar.value = status.state === "done" ? bar.max : done;
  bar.setAttribute("aria-valuetext", total ? `${done} of ${total} tiles` : "not started");
  const words = {
    queued: "Queued: waiting for a free slot.",
    running: total ? `Running: ${done.toLocaleString()} of ${total.toLocaleString()} tiles.` : "Opening the slide…",
    done: `Done: ${total.toLocaleString()} tiles.`,
    failed: `Failed: ${status.error || "unknown error"}`,
    cancelled: "Cancelled.",
  };
  const line = card.querySelector(".job-state");
  line.textContent = words[status.state] || status.state;
  line.classList.toggle("error", status.state === "failed");
  card.dataset.state = status.state;
  card.querySelector(".job-cancel").disabled = JOB_FINAL.includes(status.state);
}

async function submitSlide(file) {
  const entry = { name: file.name, id: null, card: renderJobCard(file.name), status: null };
  slideJobs.push(entry);
  const body = new FormData();
  body.append("file", file, file.name);
  const response = await jobFetch("/jobs", { method: "POST", body });
  if (!response.ok) {
    entry.card.dataset.state = "failed";
    entry.card.querySelector(".job-state").textContent = await jobError(response);
    entry.card.setAttribute("aria-busy", "false");
    return;
  }
  const status = await response.json();
  entry.id = status.id;
  entry.card.querySelector(".job-cancel").addEventListener("click", () => cancelJob(entry));
  updateJob(entry, status);
  await followJob(entry);
}

async function followJob(entry) {
  while (!JOB_FINAL.includes(entry.status.state)) {
    await new Promise((resolve) => setTimeout(resolve, JOB_POLL_MS));
    const response = await jobFetch(`/jobs/${entry.id}`);
    if (!response.ok) {
      entry.card.querySelector(".job-state").textContent = await jobError(response);
      break;
    }
    updateJob(entry, await response.json());
  }
  if (entry.status.state === "done") await showJobResult(entry);
  entry.card.setAttribute("aria-busy", "false");
}

async function cancelJob(entry) {
  const response = await jobFetch(`/jobs/${entry.id}`, { method: "DELETE" });
  if (response.ok) updateJob(entry, await response.json());
}

async function showJobResult(entry) {
  const [picture, result] = await Promise.all([
    jobFetch(`/jobs/${entry.id}/classmap.png`), jobFetch(`/jobs/${entry.id}/result`),
  ]);
  if (!picture.ok || !result.ok) return;
  const r = await result.json();
  const img = el("img", {
    class: "class-map", src: URL.createObjectURL(await picture.blob()),
    alt: `Class map of ${entry.name}: each ${r.tile_source_px} px tile coloured by its predicted class, referred tiles hatched`,
  });
  entry.card.querySelector(".figure").replaceChildren(img);
  const s = r.summary;
  const shares = Object.entries(s.tissue_share).map(([c, p]) => `${c} ${percent(p)}`).join(", ");
  const facts = el("p", { class: "job-summary",
    text: `${r.width} × ${r.height} px: ${s.tissue_tiles} tissue tiles (${shares}), ` +
      `${s.background_tiles} background, ${s.referred_tiles} referred.` });
  const download = el("button", { type: "button", class: "job-geojson", text: "Download GeoJSON (QuPath)" });
  download.addEventListener("click", () => downloadGeoJson(entry));
  const actions = entry.card.querySelector(".actions");
  actions.replaceChildren(download);
  actions.before(facts);
}

async function downloadGeoJson(entry) {
  const response = await jobFetch(`/jobs/${entry.id}/result.geojson`);
  if (!response.ok) return;
  const link = el("a", {
    href: URL.createObjectURL(await response.blob()),
    download: `${entry.name.replace(/\.[^.]*$/, "")}.geojson`,
  });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

document.addEventListener("DOMContentLoaded", () => {
  const input = $("slide-input");
  const label = document.querySelector('label[for="slide-input"]');
  input.addEventListener("change", () => {
    for (const file of input.files) submitSlide(file);
    input.value = "";
  });
  input.addEventListener("focus", () => label.classList.add("file-focus"));
  input.addEventListener("blur", () => label.classList.remove("file-focus"));
  window.lungserve.jobs = slideJobs; // for tests and the curious
});
