// The dataset list: name, encoder, items, the last job with live progress; upload + fit.
"use strict";

mountHeader();
let refreshTimer = null;

async function refresh() {
  const body = document.querySelector("#datasets tbody");
  let list;
  try {
    list = await apiJson("/v1/datasets");
  } catch (error) {
    reportError(error);
    return;
  }
  const jobs = await Promise.all(list.items.map((d) => latestJob(d.id).catch(() => null)));
  body.replaceChildren();
  let active = false;
  list.items.forEach((dataset, i) => {
    const job = jobs[i];
    if (job && (job.state === "queued" || job.state === "running")) active = true;
    body.append(el("tr", { "data-id": dataset.id },
      el("td", {}, el("a", { href: `/ui/datasets/${dataset.id}` }, dataset.name)),
      el("td", {}, dataset.encoder || "–"),
      el("td", {}, dataset.num_items),
      el("td", {}, dataset.num_embedded),
      el("td", {}, dataset.num_failed),
      el("td", { class: "job-state" }, jobText(job)),
      el("td", {}, jobBar(job))));
  });
  document.getElementById("empty").hidden = list.items.length > 0;
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, active ? 1000 : 5000);
}

async function uploadAndFit() {
  const status = document.getElementById("upload-status");
  const file = document.getElementById("archive").files[0];
  if (!file) {
    status.textContent = "Choose an archive first.";
    return;
  }
  const button = document.getElementById("upload-fit");
  button.disabled = true;
  try {
    const body = { name: document.getElementById("new-name").value || file.name };
    const encoder = document.getElementById("new-encoder").value.trim();
    if (encoder) body.encoder = encoder;
    status.textContent = "Creating the dataset…";
    const created = await apiJson("/v1/datasets", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    status.textContent = `Uploading ${file.name} (${(file.size / 1e6).toFixed(1)} MB)…`;
    const form = new FormData();
    form.append("file", file, file.name);
    const upload = await apiJson(`/v1/datasets/${created.id}/items`, { method: "POST", body: form });
    status.textContent = `Uploaded ${upload.num_items ?? ""} items; starting the fit…`;
    const accepted = await apiJson(`/v1/datasets/${created.id}/fit`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    refresh();
    await follow(created.id, accepted.job_id, status);
  } catch (error) {
    status.textContent = `Failed: ${error.message}`;
    status.className = "error";
  } finally {
    button.disabled = false;
  }
}

async function follow(datasetId, jobId, status) {
  for (;;) {
    const job = await apiJson(`/v1/jobs/${jobId}`);
    status.replaceChildren(el("span", { id: "upload-job" }, jobText(job)), " ", jobBar(job));
    if (job.state === "succeeded") {
      status.append(" ", el("a", { id: "open-dataset", href: `/ui/datasets/${datasetId}` }, "open the dataset"));
      refresh();
      return;
    }
    if (job.state === "failed" || job.state === "cancelled") {
      refresh();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

document.getElementById("upload-fit").addEventListener("click", uploadAndFit);
refresh();
