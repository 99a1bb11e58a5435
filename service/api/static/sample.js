// One sample: the image, its numbers, its distance to every class, its nearest neighbours.
"use strict";

mountHeader();
const parts = location.pathname.split("/");
const datasetId = decodeURIComponent(parts[3]);
const sampleId = parts.slice(5).map(decodeURIComponent).join("/");

function numbersTable(detail) {
  const rows = [["sample ID", detail.sample_id], ["label", detail.label ?? "unlabelled"], ["predicted label", detail.predicted_label]];
  for (const [name, value] of Object.entries(detail.scores || {})) {
    if (!["sample_id", "label", "predicted_label"].includes(name)) rows.push([name, fmt(value, 3)]);
  }
  document.querySelector("#numbers tbody").replaceChildren(
    ...rows.map(([name, value]) => el("tr", {}, el("th", {}, name), el("td", {}, value))));
}

function distanceChart(detail) {
  const items = detail.class_distances;
  const node = document.getElementById("distances");
  node.style.height = `${Math.max(220, 28 * items.length + 60)}px`;
  const instance = chart(node);
  instance.setOption({
    animation: false,
    grid: { left: 110, right: 30, top: 10, bottom: 30 },
    tooltip: { trigger: "axis", axisPointer: { type: "shadow" } },
    xAxis: { type: "value", name: "rmd", nameLocation: "middle", nameGap: 22 },
    yAxis: { type: "category", inverse: true, data: items.map((d) => d.label) },
    series: [{
      type: "bar",
      data: items.map((d) => ({
        value: d.rmd,
        itemStyle: { color: d.label === detail.label ? "#2458c6" : d.label === detail.predicted_label ? "#d62728" : "#b8c2d0" },
      })),
      label: { show: true, position: "right", formatter: (p) => fmt(p.value) },
    }],
  });
}

function neighbourCard(neighbor, withImages) {
  const scores = neighbor.scores || {};
  const image = withImages ? el("img", { alt: neighbor.sample_id, class: "thumb" }) : el("div", { class: "noimg" }, "no image");
  const node = el("a", { class: "card", href: samplePage(datasetId, neighbor.sample_id), "data-sample-id": neighbor.sample_id },
    image,
    el("div", { class: "id" }, neighbor.sample_id),
    el("div", { class: "meta" }, `${neighbor.label ?? "unlabelled"} · sim ${fmt(neighbor.similarity, 3)}`),
    el("div", { class: "meta" }, `rmd ${fmt(scores.rmd)}`));
  if (withImages) loadThumbnail(image, datasetId, neighbor.sample_id).catch(reportError);
  return node;
}

async function main() {
  document.getElementById("back").href = `/ui/datasets/${datasetId}`;
  try {
    const detail = await apiJson(`/v1/datasets/${datasetId}/samples/${encodeSampleId(sampleId)}?k=12`);
    document.title = `${detail.sample_id} · Sample difficulty`;
    document.getElementById("title").textContent = detail.sample_id;
    document.getElementById("crumb").textContent = `/ ${detail.sample_id}`;
    numbersTable(detail);
    distanceChart(detail);
    if (detail.has_thumbnail) {
      const image = document.getElementById("image");
      image.hidden = false;
      await loadThumbnail(image, datasetId, detail.sample_id);
    } else {
      document.getElementById("no-image").hidden = false;
    }
    document.getElementById("neighbors").replaceChildren(...detail.neighbors.map((n) => neighbourCard(n, detail.has_thumbnail)));
    document.body.dataset.ready = "true";
  } catch (error) {
    reportError(error);
  }
}
main();
