// The deit web page: upload an image, show the top-5 and the attention rollout map.
// Plain browser JavaScript, no build step and no third-party code.
"use strict";

const TOP_K = 5;
// Same anchor colours as deit.explain's colormap (dark blue -> orange -> light yellow).
const ANCHORS = [
  [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99],
  [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164],
];

const $ = (id) => document.getElementById(id);
const state = { explanation: null, view: null, requestId: 0 };

function colour(v) {
  const pos = Math.min(Math.max(v, 0), 1) * (ANCHORS.length - 1);
  const lo = Math.min(Math.floor(pos), ANCHORS.length - 2);
  const f = pos - lo;
  return ANCHORS[lo].map((c, i) => Math.round(c * (1 - f) + ANCHORS[lo + 1][i] * f));
}

function setStatus(message, isError = false) {
  const el = $("status");
  el.textContent = message;
  el.classList.toggle("error", isError);
  el.setAttribute("role", isError ? "alert" : "status");
}

async function postImage(path, file) {
  const body = new FormData();
  body.append("file", file, file.name || "upload");
  const response = await fetch(path, { method: "POST", body });
  const isJson = (response.headers.get("content-type") || "").includes("json");
  const data = isJson ? await response.json() : null;
  if (!response.ok) {
    const reason = data && data.error ? data.error : `HTTP ${response.status}`;
    throw new Error(reason);
  }
  return data;
}

function showPredictions(predictions) {
  const list = $("predictions");
  list.replaceChildren();
  for (const p of predictions) {
    const pct = (100 * p.score).toFixed(p.score >= 0.1 ? 1 : 2);
    const item = document.createElement("li");
    item.className = "prediction";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${pct}%`;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${Math.max(0.5, 100 * p.score)}%`;
    bar.append(fill);
    item.append(label, value, bar);
    list.append(item);
  }
}

function selectedToken() {
  const checked = document.querySelector('input[name="token"]:checked');
  return checked ? checked.value : "cls";
}

function drawAttention() {
  const canvas = $("attention");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const { explanation, view } = state;
  if (!explanation || !view) return;
  const token = explanation.maps[selectedToken()] ? selectedToken() : explanation.tokens[0];
  const map = explanation.maps[token];
  // Fit the model's view into the canvas, keeping its aspect ratio.
  const scale = Math.min(canvas.width / view.width, canvas.height / view.height);
  const w = Math.round(view.width * scale);
  const h = Math.round(view.height * scale);
  const x = Math.round((canvas.width - w) / 2);
  const y = Math.round((canvas.height - h) / 2);
  ctx.imageSmoothingEnabled = view.width >= 112;
  ctx.drawImage(view, x, y, w, h);
  // The map, min-max normalised and colour-mapped, upsampled smoothly over the view.
  const [gh, gw] = explanation.grid;
  const values = map.flat();
  const lo = Math.min(...values);
  const span = Math.max(...values) - lo || 1;
  const heat = document.createElement("canvas");
  heat.width = gw;
  heat.height = gh;
  const pixels = heat.getContext("2d").createImageData(gw, gh);
  values.forEach((v, i) => {
    const [r, g, b] = colour((v - lo) / span);
    pixels.data.set([r, g, b, 255], 4 * i);
  });
  heat.getContext("2d").putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.globalAlpha = Number($("opacity").value) / 100;
  ctx.drawImage(heat, x, y, w, h);
  ctx.globalAlpha = 1;
  const name = token === "dist" ? "distillation token" : "class token";
  canvas.setAttribute("aria-label", `Attention rollout map of the ${name} over the image`);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("could not display the model's view"));
    img.src = src;
  });
}

// The out-of-distribution verdict: a visible warning when the image is unlike the training data.
function showOod(ood) {
  const el = $("ood-warning");
  el.hidden = !(ood && ood.unusual);
  el.textContent = el.hidden
    ? ""
    : "This image looks unlike anything the model was trained on: the labels below are " +
      `probably meaningless (${ood.method} score ${ood.score.toFixed(2)}).`;
}

async function classify(file) {
  const id = ++state.requestId;
  const preview = $("preview");
  const previewImg = $("preview-img");
  if (previewImg.src.startsWith("blob:")) URL.revokeObjectURL(previewImg.src);
  previewImg.src = URL.createObjectURL(file);
  previewImg.alt = `Uploaded image ${file.name || ""}`.trim();
  $("preview-name").textContent = file.name || "";
  preview.hidden = false;
  setStatus(`Classifying ${file.name || "image"}…`);
  document.body.setAttribute("aria-busy", "true");
  try {
    const result = await postImage(`v1/classify?top_k=${TOP_K}`, file);
    if (id !== state.requestId) return; // a newer image was chosen meanwhile
    showPredictions(result.predictions);
    showOod(result.ood);
    const top = result.predictions[0];
    setStatus(`Prediction: ${top.label} (${(100 * top.score).toFixed(1)}%)`);
    const explanation = await postImage("v1/explain?format=json&token=both", file);
    if (id !== state.requestId) return;
    state.view = await loadImage(explanation.view);
    state.explanation = explanation;
    $("token-dist").disabled = !explanation.maps.dist;
    drawAttention();
  } catch (err) {
    if (id !== state.requestId) return;
    $("predictions").replaceChildren();
    showOod(null);
    state.explanation = null;
    drawAttention();
    setStatus(`Could not classify ${file.name || "the image"}: ${err.message}`, true);
  } finally {
    if (id === state.requestId) document.body.removeAttribute("aria-busy");
  }
}

async function loadSample(url, name, title) {
  try {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const blob = await response.blob();
    await classify(new File([blob], name, { type: blob.type }));
  } catch (err) {
    setStatus(`Could not load the sample "${title}": ${err.message}`, true);
  }
}

// The samples the server offers for this model (images that fit it; none rather than wrong ones).
async function showSamples() {
  try {
    const samples = await (await fetch("v1/samples")).json();
    const list = $("sample-list");
    list.replaceChildren();
    for (const sample of samples) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = sample.title;
      button.addEventListener("click", () => loadSample(sample.url, sample.file, sample.title));
      const item = document.createElement("li");
      item.append(button);
      list.append(item);
    }
    $("samples").hidden = samples.length === 0;
  } catch (err) {
    $("samples").hidden = true;
  }
}

async function showModelInfo() {
  try {
    const info = await (await fetch("v1/model")).json();
    const c = info.config;
    const params = (info.parameters / 1e6).toFixed(1);
    const kind = info.distilled ? "distilled DeiT" : "DeiT";
    document.title = `${info.source} · DeiT image classifier`;
    $("model-info").textContent =
      `${info.source} · ${kind}, ${params}M parameters, ${c.img_size} px input, ` +
      `${info.num_labels} classes`;
    $("token-dist").disabled = !info.distilled;
  } catch (err) {
    $("model-info").textContent = `Model information unavailable: ${err.message}`;
  }
}

function setUpDropZone() {
  const zone = $("drop-zone");
  const stop = (e) => { e.preventDefault(); e.stopPropagation(); };
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { stop(e); zone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (e) => { stop(e); zone.classList.remove("dragging"); });
  }
  zone.addEventListener("drop", (e) => {
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) classify(file);
  });
  // Dropping next to the zone should not navigate away from the page.
  window.addEventListener("dragover", stop);
  window.addEventListener("drop", stop);
}

document.addEventListener("DOMContentLoaded", () => {
  $("file-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) classify(file);
  });
  for (const radio of document.querySelectorAll('input[name="token"]')) {
    radio.addEventListener("change", drawAttention);
  }
  $("opacity").addEventListener("input", drawAttention);
  setUpDropZone();
  showModelInfo();
  showSamples();
});
