// Shared by the dashboard's pages: the API key (kept in this browser only), API calls, helpers.
"use strict";

const KEY_STORAGE = "difficulty.apiKey";

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    if (response.status === 401) showKeyPrompt(detail);
    throw new ApiError(response.status, detail);
  }
  return response;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

// Thumbnails go through fetch (an <img src> cannot send the Bearer header); the HTTP cache
// still applies (private, max-age).
async function loadThumbnail(img, datasetId, sampleId) {
  const response = await api(`/v1/datasets/${datasetId}/samples/${encodeSampleId(sampleId)}/thumbnail`);
  const url = URL.createObjectURL(await response.blob());
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = reject;
    img.src = url;
  });
}

function encodeSampleId(sampleId) {
  return sampleId.split("/").map(encodeURIComponent).join("/");
}

function samplePage(datasetId, sampleId) {
  return `/ui/datasets/${datasetId}/samples/${encodeSampleId(sampleId)}`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function fmt(value, digits = 2) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  return Math.abs(value) >= 1000 ? value.toFixed(0) : value.toFixed(digits);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function jobText(job) {
  if (!job) return "never fitted";
  const p = job.progress || {};
  let text = job.state + (job.stage ? ` · ${job.stage}` : "");
  if (job.state === "running" || job.state === "queued") {
    if (p.total) text += ` · ${p.done}/${p.total}`;
    if (p.eta_seconds) text += ` · ETA ${duration(p.eta_seconds)}`;
  }
  if (job.error) text += ` · ${job.error}`;
  return text;
}

function jobBar(job) {
  const p = (job && job.progress) || {};
  const share = job && job.state === "succeeded" ? 1 : p.total ? p.done / p.total : 0;
  const bar = el("span", { class: "bar" }, el("div", { style: `width:${Math.round(100 * share)}%` }));
  return bar;
}

async function latestJob(datasetId) {
  const jobs = await apiJson(`/v1/datasets/${datasetId}/jobs`);
  jobs.sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  return jobs[0] || null;
}

function showKeyPrompt(reason) {
  const box = document.getElementById("key-status");
  if (box) box.textContent = reason ? `(${reason})` : "";
  const input = document.getElementById("api-key");
  if (input) input.focus();
}

function mountHeader() {
  const input = el("input", { id: "api-key", type: "password", placeholder: "API key", size: "18" });
  input.value = apiKey();
  const save = el("button", { id: "save-key", onclick: () => {
    if (input.value) localStorage.setItem(KEY_STORAGE, input.value.trim());
    else localStorage.removeItem(KEY_STORAGE);
    location.reload();
  } }, "Use key");
  const header = el("header", {},
    el("h1", {}, el("a", { href: "/ui/" }, "Sample difficulty")),
    el("span", { class: "muted", id: "crumb" }),
    el("span", { class: "key" }, el("span", { id: "key-status", class: "error" }), input, save));
  document.body.prepend(header);
}

function chart(node) {
  const instance = echarts.init(node, null, { renderer: "canvas" });
  window.addEventListener("resize", () => instance.resize());
  return instance;
}

function reportError(error) {
  const box = document.getElementById("errors");
  if (box) box.textContent = String(error.message || error);
}
