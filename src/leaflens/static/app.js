// The leaflens page: send one photo to POST /v1/predict and show what came back. No build step, no framework.
"use strict";

const $ = (id) => document.getElementById(id);

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

function clearMessages() {
  $("error").hidden = true;
  $("error").textContent = "";
  $("status").textContent = "";
}

function percent(p) {
  return `${(100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1)} %`;
}

function summaryText(top) {
  if (top.healthy) {
    return { text: `This ${top.crop} leaf looks healthy.`, kind: "healthy" };
  }
  return { text: `Signs of ${top.disease} on ${top.crop}.`, kind: "disease" };
}

function render(prediction) {
  const top = prediction.top_k[0];
  $("top-diagnosis").textContent = top.display_name;
  const summary = summaryText(top);
  $("summary").textContent = summary.text;
  $("summary").className = `summary ${summary.kind}`;
  $("not-sure").hidden = !prediction.not_sure;

  const list = $("top-k");
  list.replaceChildren();
  for (const d of prediction.top_k.slice(0, 3)) {
    const item = document.createElement("li");
    item.dataset.testid = "diagnosis";
    const label = document.createElement("div");
    label.className = "label";
    const name = document.createElement("span");
    name.textContent = d.display_name;
    const value = document.createElement("span");
    value.textContent = percent(d.probability);
    label.append(name, value);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-valuenow", (100 * d.probability).toFixed(1));
    const fill = document.createElement("span");
    fill.style.width = `${(100 * d.probability).toFixed(1)}%`;
    bar.append(fill);
    item.append(label, bar);
    list.append(item);
  }

  if (prediction.explanation) {
    $("overlay").src = prediction.explanation;
    $("overlay-figure").hidden = false;
  } else {
    $("overlay-figure").hidden = true;
  }
  $("timing").textContent =
    `Model ${prediction.model_version}, ${prediction.inference_ms.toFixed(1)} ms` +
    (prediction.explanation_error ? ` (no overlay: ${prediction.explanation_error})` : "");
  $("result").hidden = false;
}

async function diagnose(file) {
  clearMessages();
  $("result").hidden = true;
  if (!file) return;
  // Preview straight from the file; the server checks the bytes, so a non-image fails there with a reason.
  const previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("status").textContent = "Diagnosing…";

  const form = new FormData();
  form.append("file", file, file.name || "photo.jpg");
  const explain = $("explain").checked ? "?explain=true" : "";
  let response;
  try {
    response = await fetch(`/v1/predict${explain}`, { method: "POST", body: form });
  } catch (err) {
    showError(`Could not reach the server: ${err.message}`);
    return;
  }
  let body;
  try {
    body = await response.json();
  } catch {
    showError(`The server answered ${response.status} without a readable body.`);
    return;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    showError(`Could not diagnose this file: ${message}`);
    return;
  }
  $("status").textContent = "";
  render(body);
}

async function loadModelInfo() {
  try {
    const response = await fetch("/v1/model");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const info = await response.json();
    const crops = [...new Set(info.labels.map((l) => l.crop))].join(", ");
    if (!info.explain_available) {
      $("explain").checked = false;
      $("explain").disabled = true;
      $("explain").parentElement.title = "Grad-CAM is not installed on this server.";
    }
    $("model-info").textContent = `Model ${info.version} (${info.arch || "unknown"}), ${info.num_classes} classes. Crops: ${crops}.`;
  } catch (err) {
    $("model-info").textContent = `Model information unavailable (${err.message}).`;
  }
}

function setUp() {
  for (const id of ["file-input", "camera-input"]) {
    $(id).addEventListener("change", (event) => {
      diagnose(event.target.files[0]);
      event.target.value = ""; // choosing the same file again still fires "change"
    });
  }
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length > 1) {
      showError("Drop one photo at a time.");
      return;
    }
    diagnose(event.dataTransfer.files[0]);
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("file-input").click();
  });
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
