// The dataset page: gallery (keyset pages of the score API, or pages of a selection), map,
// histograms, per-class and confusion tables. Everything here is read from the /v1 API.
"use strict";

mountHeader();
const datasetId = decodeURIComponent(location.pathname.split("/")[3]);
const PAGE = 48;
const state = {
  map: null, // {count, labels, x, y, rmd, label, predicted, thumbnails}
  cursors: [], // the score API's next_cursor values of the pages shown so far
  selection: null, // {rows: Int32Array in rmd-ascending order, text}
  selectionPage: 0,
  filterPage: 0,
  thumbnails: true,
};

function decodeMap(buffer) {
  const view = new DataView(buffer);
  const length = view.getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, length)));
  const n = header.count;
  const offset = 4 + length;
  const names = header.arrays || ["x", "y", "rmd", "label", "predicted_label"];
  const column = (name) => new Uint16Array(buffer, offset + names.indexOf(name) * 2 * n, n);
  const scale = (q, [lo, hi]) => {
    const out = new Float32Array(q.length);
    const step = (hi - lo) / 65535;
    for (let i = 0; i < q.length; i++) out[i] = lo + q[i] * step;
    return out;
  };
  return {
    count: n, labels: header.labels, thumbnails: header.thumbnails,
    x: scale(column("x"), header.x), y: scale(column("y"), header.y), rmd: scale(column("rmd"), header.rmd),
    label: column("label"), predicted: column("predicted_label"),
    issue: names.includes("is_label_issue") ? column("is_label_issue") : null,
  };
}

// -- gallery ----------------------------------------------------------------------------------

function card(item) {
  const differs = item.predicted_label !== item.label;
  const image = state.thumbnails
    ? el("img", { alt: item.sample_id, class: "thumb" })
    : el("div", { class: "noimg" }, "no image");
  const node = el("a", { class: "card", href: samplePage(datasetId, item.sample_id), "data-sample-id": item.sample_id, "data-label": item.label },
    image,
    el("div", { class: "id" }, item.sample_id),
    el("div", { class: "meta" }, `rmd ${fmt(item.rmd)}`),
    el("div", { class: "meta" + (differs ? " differs" : "") },
      differs ? `${item.label} → ${item.predicted_label}` : item.label));
  if (state.thumbnails) loadThumbnail(image, datasetId, item.sample_id).catch(reportError);
  return node;
}

function showItems(items, info) {
  document.getElementById("gallery").replaceChildren(...items.map(card));
  document.getElementById("page-info").textContent = info;
}

async function showScorePage() {
  const params = new URLSearchParams({ limit: PAGE, order: document.getElementById("order").value });
  const label = document.getElementById("class-filter").value;
  if (label) params.set("label", label);
  const cursor = state.cursors[state.cursors.length - 1];
  if (cursor) params.set("cursor", cursor);
  const page = await apiJson(`/v1/datasets/${datasetId}/scores?${params}`);
  state.nextCursor = page.next_cursor;
  document.getElementById("next-page").disabled = !page.next_cursor;
  showItems(page.items, `page ${state.cursors.length + 1}`);
}

async function showRows(rows, page) {
  // A selection (rows of the map, sorted by rmd ascending) in pages of PAGE.
  const descending = document.getElementById("order").value === "desc";
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  const picked = [];
  for (let i = page * PAGE; i < Math.min(rows.length, (page + 1) * PAGE); i++) {
    picked.push(descending ? rows[rows.length - 1 - i] : rows[i]);
  }
  document.getElementById("next-page").disabled = page + 1 >= pages;
  if (!picked.length) {
    showItems([], "no samples");
    return;
  }
  const result = await apiJson(`/v1/datasets/${datasetId}/map/rows?rows=${picked.join(",")}`);
  showItems(result.items, `page ${page + 1} of ${pages}`);
}

function selectRows(predicate, text) {
  const m = state.map;
  const rows = [];
  for (let i = 0; i < m.count; i++) if (predicate(i)) rows.push(i);
  state.selection = { rows: Int32Array.from(rows), text: `${text}: ${rows.length} samples` };
  state.selectionPage = 0;
  updateGallery();
}

function currentFilterSelection() {
  // "predicted label differs" (with the class filter) is a selection of the map's rows.
  if (!document.getElementById("differs").checked) return null;
  const m = state.map;
  if (!m) return null;
  const label = document.getElementById("class-filter").value;
  const code = label ? m.labels.indexOf(label) : -1;
  const rows = [];
  for (let i = 0; i < m.count; i++) {
    if (m.label[i] !== m.predicted[i] && (code < 0 || m.label[i] === code)) rows.push(i);
  }
  return { rows: Int32Array.from(rows), text: `predicted label differs${label ? " in " + label : ""}: ${rows.length} samples` };
}

async function updateGallery() {
  try {
    const selection = state.selection || currentFilterSelection();
    document.getElementById("selection").textContent = selection ? selection.text : "";
    document.getElementById("clear-selection").hidden = !state.selection;
    if (selection) await showRows(selection.rows, state.selection ? state.selectionPage : state.filterPage);
    else await showScorePage();
  } catch (error) {
    reportError(error);
  }
}

function resetPaging() {
  state.cursors = [];
  state.selectionPage = 0;
  state.filterPage = 0;
}

document.getElementById("order").addEventListener("change", () => { resetPaging(); updateGallery(); });
document.getElementById("class-filter").addEventListener("change", () => { state.selection = null; resetPaging(); updateGallery(); });
document.getElementById("differs").addEventListener("change", () => { state.selection = null; resetPaging(); updateGallery(); });
document.getElementById("clear-selection").addEventListener("click", () => { state.selection = null; resetPaging(); updateGallery(); });
document.getElementById("first-page").addEventListener("click", () => { resetPaging(); updateGallery(); });
document.getElementById("next-page").addEventListener("click", () => {
  if (state.selection) state.selectionPage += 1;
  else if (currentFilterSelection()) state.filterPage = (state.filterPage || 0) + 1;
  else if (state.nextCursor) state.cursors.push(state.nextCursor);
  updateGallery();
});

// -- map --------------------------------------------------------------------------------------

const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
  "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8"];
const RMD_COLOURS = ["#313695", "#4575b4", "#74add1", "#abd9e9", "#fee090", "#fdae61", "#f46d43", "#d73027"];
let mapChart = null;
let seriesRows = [];

function mapGroups(mode) {
  const m = state.map;
  const groups = [];
  if (mode === "label") {
    m.labels.forEach((name, code) => groups.push({ name, colour: PALETTE[code % PALETTE.length], test: (i) => m.label[i] === code }));
  } else if (mode === "issue" && m.issue) {
    groups.push({ name: "not flagged", colour: "#b8c2d0", test: (i) => m.issue[i] === 0 });
    groups.push({ name: "suspected mislabel", colour: "#d62728", test: (i) => m.issue[i] === 1 });
  } else if (mode === "mislabel") {
    groups.push({ name: "predicted = label", colour: "#b8c2d0", test: (i) => m.label[i] === m.predicted[i] });
    groups.push({ name: "predicted differs", colour: "#d62728", test: (i) => m.label[i] !== m.predicted[i] });
  } else {
    // rows are sorted by rmd: equal-count buckets are contiguous ranges of rows
    const k = RMD_COLOURS.length;
    for (let b = 0; b < k; b++) {
      const lo = Math.floor((b * m.count) / k), hi = Math.floor(((b + 1) * m.count) / k);
      const text = hi > lo ? `rmd ${fmt(m.rmd[lo])}…${fmt(m.rmd[hi - 1])}` : `bucket ${b + 1}`;
      groups.push({ name: text, colour: RMD_COLOURS[b], test: (i) => i >= lo && i < hi });
    }
  }
  return groups;
}

function drawMap() {
  const m = state.map;
  const mode = document.getElementById("colour").value;
  const groups = mapGroups(mode);
  const members = groups.map(() => []);
  for (let i = 0; i < m.count; i++) {
    for (let g = 0; g < groups.length; g++) if (groups[g].test(i)) { members[g].push(i); break; }
  }
  seriesRows = members.map((rows) => Int32Array.from(rows));
  const big = m.count > 20000;
  const series = seriesRows.map((rows, g) => {
    const data = new Float32Array(rows.length * 2);
    rows.forEach((r, j) => { data[2 * j] = m.x[r]; data[2 * j + 1] = m.y[r]; });
    return {
      type: "scatter", name: groups[g].name, data, dimensions: ["x", "y"], symbolSize: big ? 2 : 6,
      // Big maps draw progressively (chunks of points per frame): pan and zoom never stall the
      // page for the whole redraw.
      large: true, largeThreshold: 2000, progressive: big ? 100000 : 0, progressiveThreshold: 200000, animation: false,
      itemStyle: { color: groups[g].colour, opacity: big ? 0.5 : 0.85 },
    };
  });
  mapChart.setOption({
    animation: false,
    legend: { type: "scroll", top: 0 },
    grid: { left: 40, right: 20, top: 40, bottom: 30 },
    tooltip: { trigger: "item", formatter: (p) => `${p.seriesName}<br>click to open` },
    xAxis: { type: "value", scale: true, splitLine: { show: false } },
    yAxis: { type: "value", scale: true, splitLine: { show: false } },
    dataZoom: [{ type: "inside", xAxisIndex: 0, filterMode: "none" }, { type: "inside", yAxisIndex: 0, filterMode: "none" }],
    toolbox: { feature: { brush: { type: ["rect", "polygon", "clear"] }, restore: {} } },
    brush: { xAxisIndex: 0, yAxisIndex: 0, seriesIndex: [], throttleType: "debounce", throttleDelay: 300, transformable: false },
    series,
  }, true);
  document.getElementById("map-info").textContent = `${m.count} points`;
}

function insidePolygon(x, y, polygon) {
  let inside = false;
  for (let i = 0, j = polygon.length - 1; i < polygon.length; j = i++) {
    const [xi, yi] = polygon[i], [xj, yj] = polygon[j];
    if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

function onBrush(event) {
  const area = (event.areas || [])[0];
  if (!area || !area.coordRange) return;
  const m = state.map;
  if (area.brushType === "rect") {
    const [[x0, x1], [y0, y1]] = area.coordRange;
    selectRows((i) => m.x[i] >= x0 && m.x[i] <= x1 && m.y[i] >= y0 && m.y[i] <= y1, "box on the map");
  } else if (area.brushType === "polygon") {
    selectRows((i) => insidePolygon(m.x[i], m.y[i], area.coordRange), "lasso on the map");
  }
}

async function onPointClick(event) {
  const rows = seriesRows[event.seriesIndex];
  if (!rows || event.dataIndex === undefined) return;
  const row = rows[event.dataIndex];
  const result = await apiJson(`/v1/datasets/${datasetId}/map/rows?rows=${row}`);
  location.href = samplePage(datasetId, result.items[0].sample_id);
}

// -- histogram, tables ------------------------------------------------------------------------

function drawHistogram() {
  const m = state.map;
  const bins = 40;
  const lo = m.count ? m.rmd[0] : 0, hi = m.count ? m.rmd[m.count - 1] : 1;
  const width = (hi - lo) / bins || 1;
  const counts = m.labels.map(() => new Array(bins).fill(0));
  for (let i = 0; i < m.count; i++) {
    const b = Math.min(bins - 1, Math.floor((m.rmd[i] - lo) / width));
    counts[m.label[i]][b] += 1;
  }
  const centres = Array.from({ length: bins }, (_, b) => (lo + (b + 0.5) * width).toFixed(1));
  const histogram = chart(document.getElementById("histogram"));
  histogram.setOption({
    animation: false,
    legend: { type: "scroll", top: 0 },
    tooltip: { trigger: "axis" },
    grid: { left: 45, right: 15, top: 40, bottom: 40 },
    xAxis: { type: "category", data: centres, name: "rmd", nameLocation: "middle", nameGap: 26 },
    yAxis: { type: "value", name: "samples" },
    series: m.labels.map((name, code) => ({
      type: "bar", name, stack: "all", data: counts[code], barCategoryGap: "5%",
      itemStyle: { color: PALETTE[code % PALETTE.length] },
    })).filter((s) => s.data.some((c) => c > 0)),
  });
}

function drawConfusion() {
  const m = state.map;
  const k = m.labels.length;
  const counts = Array.from({ length: k }, () => new Array(k).fill(0));
  for (let i = 0; i < m.count; i++) counts[m.label[i]][m.predicted[i]] += 1;
  const table = document.getElementById("confusion");
  const head = el("tr", {}, el("th", {}, "label \\ predicted"), ...m.labels.map((l) => el("th", {}, l)));
  const rows = m.labels.map((name, a) => {
    if (!counts[a].some((c) => c > 0)) return null;
    return el("tr", {}, el("th", {}, name), ...counts[a].map((c, b) => el("td", {
      class: "cell" + (a === b ? " diag" : ""), "data-label": name, "data-predicted": m.labels[b],
      onclick: () => selectRows((i) => m.label[i] === a && m.predicted[i] === b, `label ${name}, predicted ${m.labels[b]}`),
    }, c || "")));
  }).filter(Boolean);
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

async function drawSummary() {
  const summary = await apiJson(`/v1/datasets/${datasetId}/summary`);
  const body = document.querySelector("#classes tbody");
  body.replaceChildren(...summary.classes.map((c) => el("tr", {},
    el("td", {}, c.label), el("td", {}, c.count), el("td", {}, fmt(c.rmd_mean)), el("td", {}, fmt(c.rmd_p10)),
    el("td", {}, fmt(c.rmd_p50)), el("td", {}, fmt(c.rmd_p90)), el("td", {}, fmt(c.rmd_p99)),
    el("td", {}, `${(100 * c.predicted_differs).toFixed(1)} %`))));
  const select = document.getElementById("class-filter");
  for (const c of summary.classes) select.append(el("option", { value: c.label }, c.label));
}

// -- the dataset and its fit ------------------------------------------------------------------

async function showDataset() {
  const dataset = await apiJson(`/v1/datasets/${datasetId}`);
  document.title = `${dataset.name} · Sample difficulty`;
  document.getElementById("title").textContent = dataset.name;
  document.getElementById("crumb").textContent = `/ ${dataset.name}`;
  const fit = dataset.fit;
  document.getElementById("facts").textContent = [
    `encoder ${dataset.encoder || "–"}`, `${dataset.num_items} items`, `${dataset.num_embedded} embedded`,
    `${dataset.num_failed} failed`, fit ? `fit ${fit.id.slice(0, 8)}… (${fit.num_scored} scored, D=${fit.dim}, shrinkage ${fmt(fit.shrinkage, 3)})` : "not fitted yet",
  ].join(" · ");
  return dataset;
}

async function refit() {
  const status = document.getElementById("fit-status");
  try {
    const accepted = await apiJson(`/v1/datasets/${datasetId}/fit`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    for (;;) {
      const job = await apiJson(`/v1/jobs/${accepted.job_id}`);
      status.replaceChildren(jobText(job), " ", jobBar(job));
      if (["succeeded", "failed", "cancelled"].includes(job.state)) break;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    location.reload();
  } catch (error) {
    status.textContent = error.message;
  }
}
document.getElementById("refit").addEventListener("click", refit);

async function main() {
  try {
    const dataset = await showDataset();
    if (!dataset.fit) {
      const job = await latestJob(datasetId);
      document.getElementById("fit-status").textContent = jobText(job);
      return;
    }
    const [mapResponse] = await Promise.all([api(`/v1/datasets/${datasetId}/map`), drawSummary()]);
    state.map = decodeMap(await mapResponse.arrayBuffer());
    state.thumbnails = state.map.thumbnails;
    if (state.map.issue) {
      document.getElementById("colour").append(el("option", { value: "issue" }, "suspected mislabel (label-issue model)"));
    }
    if (!state.thumbnails) {
      document.getElementById("no-images").hidden = false;
    }
    await updateGallery();
    performance.mark("gallery-shown");
    mapChart = chart(document.getElementById("map"));
    drawMap();
    performance.mark("map-drawn");
    mapChart.on("click", onPointClick);
    mapChart.on("brushEnd", onBrush);
    document.getElementById("colour").addEventListener("change", drawMap);
    drawHistogram();
    drawConfusion();
    document.body.dataset.ready = "true";
  } catch (error) {
    reportError(error);
  }
}
main();
