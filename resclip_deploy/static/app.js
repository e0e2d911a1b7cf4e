// The page at / : it calls the same API as any other client (/v1/info, /v1/segment).
// body[data-state] (loading, ready, locked, busy, done, error) and body[data-answers] (segment
// requests answered) say where it is, for people reading the markup and for tests.
"use strict";

const TOKEN_KEY = "resclip-token";
const $ = (id) => document.getElementById(id);
let chosen = null;

class ServerError extends Error {}

function setState(state) {
  document.body.dataset.state = state;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// The token goes only to this page's own origin, and only once the server asked for one.
async function api(path, options = {}) {
  const headers = new Headers(options.headers);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) $("token-row").hidden = false;
  return response;
}

// The API's one-line {"error": ...}; a proxy in front of it may answer with a page instead.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (typeof body.error === "string") return body.error;
  } catch (_) {
    // not JSON: the status is all there is
  }
  return `${response.status} ${response.statusText}`.trim();
}

function unreachable(error) {
  return `The server did not answer (${error.message}).`;
}

function describeModel(info) {
  const source = info.model || {};
  const weights = source.pretrained || (source.file || "").split("/").pop();
  const s = info.settings;
  const method = [s.method, s.rcs && "RCS", s.sfr && "SFR"].filter(Boolean).join(" + ");
  const vocabulary = String(info.vocabulary.source || "").replace(/^preset:/, "preset ");
  return [weights ? `${source.model} (${weights})` : source.model, method,
    `${vocabulary}, ${info.classes.length} classes`, info.precision].join(" · ");
}

async function loadInfo() {
  let response;
  try {
    response = await api("/v1/info");
  } catch (error) {
    showError(unreachable(error));
    setState("error");
    return;
  }
  if (!response.ok) {
    showError(await errorOf(response));
    setState(response.status === 401 ? "locked" : "error");
    return;
  }
  const info = await response.json();
  $("model").textContent = describeModel(info);
  $("classes-row").hidden = !info.runtime_classes;
  $("classes").placeholder = info.classes.join(", ");
  showError("");
  setState("ready");
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} bytes`;
  if (bytes < 1 << 20) return `${Math.round(bytes / 1024)} KiB`;
  return `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

function choose(file) {
  chosen = file || null;
  $("file-name").textContent = chosen ? `${chosen.name} (${size(chosen.size)})` : "No image chosen";
  $("segment").disabled = !chosen;
}

// As the overlay's own legend writes it (overlay.format_percent): a class present never reads
// 0.0%.
function percent(fraction) {
  const pct = 100 * fraction;
  return pct > 0 && pct < 0.05 ? "<0.1%" : `${pct.toFixed(1)}%`;
}

function cell(tag, text, className) {
  const element = document.createElement(tag);
  if (text !== undefined) element.textContent = text;
  if (className) element.className = className;
  return element;
}

function legendRow(name, fraction, colour) {
  const swatch = cell("span", undefined, "swatch");
  // CSSOM, which the page's CSP allows (a style attribute would be refused)
  swatch.style.backgroundColor = colour;
  swatch.title = colour;
  swatch.setAttribute("role", "img");
  swatch.setAttribute("aria-label", colour);
  const first = cell("td");
  first.append(swatch);
  const row = document.createElement("tr");
  row.append(first, cell("th", name), cell("td", percent(fraction), "num"));
  row.cells[1].scope = "row";
  return row;
}

async function showResult(body, seconds) {
  const image = $("overlay");
  image.src = `data:image/jpeg;base64,${body.overlay_jpeg}`;
  await image.decode();
  $("elapsed").textContent =
    `${body.width} × ${body.height} px, answered in ${seconds.toFixed(2)} s`;
  // sorted here too: JavaScript puts integer-like keys (a class named "1") first
  const rows = Object.entries(body.fractions).sort((a, b) => b[1] - a[1])
    .map(([name, fraction]) => legendRow(name, fraction, body.colors[name]));
  $("legend").tBodies[0].replaceChildren(...rows);
  $("result").hidden = false;
}

async function segment(event) {
  event.preventDefault();
  if (!chosen) return;
  const query = new URLSearchParams({ format: "json", overlay: "true" });
  const classes = $("classes").value.trim();
  if (!$("classes-row").hidden && classes) query.set("classes", classes);
  const form = new FormData();
  form.append("image", chosen, chosen.name);
  setState("busy");
  showError("");
  $("result").hidden = true;
  $("segment").disabled = true;
  $("status").textContent = "Segmenting…";
  const start = performance.now();
  try {
    const response = await api(`/v1/segment?${query}`, { method: "POST", body: form });
    if (!response.ok) throw new ServerError(await errorOf(response));
    const body = await response.json();
    await showResult(body, (performance.now() - start) / 1000);
    setState("done");
  } catch (error) {
    showError(error instanceof ServerError ? error.message : unreachable(error));
    setState("error");
  } finally {
    $("status").textContent = "";
    $("segment").disabled = !chosen;
    document.body.dataset.answers = Number(document.body.dataset.answers) + 1;
  }
}

function wireDrop() {
  const zone = $("drop");
  // A file dropped beside the zone would make the browser leave the page to show it.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => event.preventDefault());
  }
  zone.addEventListener("dragenter", () => zone.classList.add("over"));
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) choose(event.dataTransfer.files[0]);
  });
}

function wireToken() {
  const field = $("token");
  field.value = sessionStorage.getItem(TOKEN_KEY) || "";
  if (field.value) $("token-row").hidden = false;
  field.addEventListener("change", () => {
    const token = field.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    loadInfo();
  });
}

$("file").addEventListener("change", (event) => choose(event.target.files[0]));
$("form").addEventListener("submit", segment);
wireDrop();
wireToken();
loadInfo();
