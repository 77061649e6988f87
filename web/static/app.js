// The page: upload images, show input and overlay side by side, re-threshold without re-running
// the model, download what predict.py would write. Every name and value from the server or the
// user goes into the page through textContent or attributes, never as HTML.
"use strict";

const UPLOADS_AT_ONCE = 2;          // the server queues the rest; this keeps the page responsive

const state = {
  info: null,
  items: [],                        // {file, card, result, error, done}
  generation: 0,                    // bumped when a TTA change re-runs the batch
  settings: { score: 0.5, fill: true, outline: true, text: false },
  tta: false,
};

const $ = (selector, root = document) => root.querySelector(selector);

function settingsQuery(extra = {}) {
  const s = state.settings;
  const params = new URLSearchParams({
    score: s.score.toFixed(2), fill: s.fill ? 1 : 0, outline: s.outline ? 1 : 0, text: s.text ? 1 : 0, ...extra,
  });
  return params.toString();
}

function formatBytes(n) {
  return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MB` : `${Math.round(n / 1024)} kB`;
}

function addMessage(text) {
  const li = document.createElement("li");
  li.textContent = text;
  $("#messages").append(li);
}

// ------------------------------------------------------------------------------ start-up

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    state.info = await response.json();
  } catch (err) {
    $("#model-info").textContent = `cannot reach the server (${err})`;
    return;
  }
  const info = state.info;
  const classes = info.class_names.length ? info.class_names.join(", ") : "unnamed classes";
  $("#model-info").textContent =
    `model ${info.checkpoint || "(checkpoint)"} · classes: ${classes} · device ${info.device}`;
  const mpx = info.max_pixels / 1e6;
  $("#limits-hint").textContent = `PNG, JPEG or TIFF; 8 or 16 bit; gray, RGB or RGBA; ` +
    `up to ${formatBytes(info.max_bytes)} and ${mpx >= 10 ? mpx.toFixed(0) : mpx.toFixed(2)} Mpx each`;
  const slider = $("#score");
  slider.min = info.min_score;
  slider.value = info.default_score;
  state.settings.score = Number(slider.value);
  $("#score-value").textContent = state.settings.score.toFixed(2);
}

// ------------------------------------------------------------------------------ batch

function addFiles(files) {
  for (const file of files) {
    const card = $("#card-template").content.firstElementChild.cloneNode(true);
    $(".name", card).textContent = file.name;
    setupViewer(card);
    setupTable(card);
    $("#results").append(card);
    state.items.push({ file, card, result: null, error: null, done: false, running: false });
  }
  pump();
}

function updateProgress() {
  const items = state.items;
  const done = items.filter((i) => i.done).length;
  const failed = items.filter((i) => i.error).length;
  const bar = $("#progress");
  bar.max = Math.max(items.length, 1);
  bar.value = done;
  let text = `${done} of ${items.length} image${items.length === 1 ? "" : "s"} done`;
  if (failed) text += `, ${failed} failed`;
  $("#progress-text").textContent = text;
  const ids = items.filter((i) => i.result).map((i) => i.result.id);
  const all = $("#download-all");
  if (ids.length) {
    all.href = `/api/download.zip?${settingsQuery({ ids: ids.join(",") })}`;
    all.classList.remove("disabled");
    all.removeAttribute("aria-disabled");
  } else {
    all.removeAttribute("href");
    all.classList.add("disabled");
    all.setAttribute("aria-disabled", "true");
  }
  document.body.dataset.busy = items.some((i) => !i.done) ? "1" : "0";
}

function pump() {
  const running = state.items.filter((i) => i.running).length;
  const next = state.items.filter((i) => !i.done && !i.running).slice(0, UPLOADS_AT_ONCE - running);
  for (const item of next) upload(item);
  updateProgress();
}

async function upload(item) {
  const generation = state.generation;
  item.running = true;
  setStatus(item, state.tta ? "predicting (TTA)…" : "predicting…");
  const max = state.info ? state.info.max_bytes : Infinity;
  let failure = null;
  let result = null;
  if (item.file.size > max) {
    failure = `${item.file.name}: ${formatBytes(item.file.size)} is over this server's upload limit of ${formatBytes(max)}`;
  } else {
    try {
      const query = new URLSearchParams({ name: item.file.name, tta: state.tta ? 1 : 0 });
      const response = await fetch(`/api/predict?${query}&${settingsQuery()}`, {
        method: "POST", body: item.file, headers: { "Content-Type": "application/octet-stream" },
      });
      const body = await response.json().catch(() => ({ error: `${item.file.name}: HTTP ${response.status}` }));
      if (response.ok) result = body;
      else failure = body.error || `${item.file.name}: HTTP ${response.status}`;
    } catch (err) {
      failure = `${item.file.name}: upload failed (${err})`;
    }
  }
  item.running = false;
  if (generation !== state.generation) {       // TTA changed meanwhile: this run is stale
    pump();
    return;
  }
  item.done = true;
  if (failure) {
    item.error = failure;
    item.card.dataset.state = "error";
    setStatus(item, "failed");
    const p = $(".error", item.card);
    p.textContent = failure;
    p.hidden = false;
    addMessage(failure);
  } else {
    item.result = result;
    item.error = null;
    showResult(item, result, true);
  }
  pump();
}

function setStatus(item, text) {
  $(".status", item.card).textContent = text;
}

// ------------------------------------------------------------------------------ one result

function showResult(item, summary, fresh) {
  const card = item.card;
  $(".body", card).hidden = false;
  $(".error", card).hidden = true;
  setStatus(item, `${summary.width}×${summary.height} px${summary.tta ? " · TTA" : ""}` +
    (summary.tiles > 1 ? ` · ${summary.tiles} tiles` : "") +
    ` · ${summary.detections} detections before the threshold`);
  $(".count", card).textContent = String(summary.count);
  const parts = Object.entries(summary.per_class).map(([name, n]) => `${name}: ${n}`);
  $(".per-class", card).textContent = parts.length ? `(${parts.join(", ")})` : "";
  const base = `/api/results/${encodeURIComponent(summary.id)}`;
  const query = settingsQuery();
  const input = $("img.input", card);
  const overlay = $("img.overlay", card);
  if (fresh) {
    input.src = `${base}/image.png`;
    card.viewer.reset(summary.width, summary.height);
  }
  const overlaySrc = `${base}/overlay.png?${query}`;
  if (overlay.getAttribute("src") !== overlaySrc) {
    card.dataset.state = "drawing";
    overlay.onload = () => { if (overlay.getAttribute("src") === overlaySrc) card.dataset.state = "done"; };
    overlay.onerror = overlay.onload;
    overlay.src = overlaySrc;
  } else {
    card.dataset.state = "done";
  }
  card.dataset.score = summary.score.toFixed(2);
  for (const a of card.querySelectorAll(".downloads a")) {
    a.href = `${base}/files/${a.dataset.kind}?${query}`;
  }
  card.table.rows = summary.instances;
  card.table.render();
}

async function refreshResults() {
  const wanted = settingsQuery();
  await Promise.all(state.items.filter((i) => i.result).map(async (item) => {
    const response = await fetch(`/api/results/${encodeURIComponent(item.result.id)}?${wanted}`);
    const body = await response.json();
    if (wanted !== settingsQuery()) return;       // settings moved on meanwhile
    if (response.ok) {
      item.result = body;
      showResult(item, body, false);
    } else {
      item.card.dataset.state = "error";
      const p = $(".error", item.card);
      p.textContent = body.error;
      p.hidden = false;
    }
  }));
  updateProgress();
}

// ------------------------------------------------------------------------------ zoom and pan

function setupViewer(card) {
  const stages = [...card.querySelectorAll(".stage")];
  const images = stages.map((s) => $("img", s));
  const view = { scale: 1, x: 0, y: 0, width: 0, height: 0 };
  const apply = () => {
    for (const img of images) img.style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
  };
  const fit = () => {
    const box = stages[0].getBoundingClientRect();
    if (!view.width || !box.width) return;
    view.scale = Math.min(box.width / view.width, box.height / view.height);
    view.x = (box.width - view.width * view.scale) / 2;
    view.y = (box.height - view.height * view.scale) / 2;
    apply();
  };
  card.viewer = { reset(width, height) { view.width = width; view.height = height; fit(); } };
  for (const stage of stages) {
    stage.addEventListener("wheel", (event) => {
      event.preventDefault();
      const box = stage.getBoundingClientRect();
      const px = event.clientX - box.left, py = event.clientY - box.top;
      const factor = Math.exp(-event.deltaY * 0.0015);
      const scale = Math.min(Math.max(view.scale * factor, 0.05), 64);
      view.x = px - (px - view.x) * (scale / view.scale);
      view.y = py - (py - view.y) * (scale / view.scale);
      view.scale = scale;
      apply();
    }, { passive: false });
    let drag = null;
    stage.addEventListener("pointerdown", (event) => {
      drag = { x: event.clientX - view.x, y: event.clientY - view.y };
      stage.setPointerCapture(event.pointerId);
      stage.classList.add("dragging");
    });
    stage.addEventListener("pointermove", (event) => {
      if (!drag) return;
      view.x = event.clientX - drag.x;
      view.y = event.clientY - drag.y;
      apply();
    });
    const end = () => { drag = null; stage.classList.remove("dragging"); };
    stage.addEventListener("pointerup", end);
    stage.addEventListener("pointercancel", end);
    stage.addEventListener("dblclick", fit);
  }
  window.addEventListener("resize", fit);
}

// ------------------------------------------------------------------------------ sortable table

function setupTable(card) {
  const table = $("table.instances", card);
  const sort = { key: "id", type: "number", dir: 1 };
  card.table = {
    rows: [],
    render() {
      const rows = [...this.rows].sort((a, b) => {
        const x = a[sort.key], y = b[sort.key];
        const order = sort.type === "number" ? x - y : String(x).localeCompare(String(y));
        return order * sort.dir || a.id - b.id;
      });
      const body = document.createElement("tbody");
      for (const row of rows) {
        const tr = document.createElement("tr");
        for (const key of ["id", "class", "score", "area_px", "equivalent_diameter_px"]) {
          const td = document.createElement("td");
          const value = row[key];
          td.textContent = key === "score" ? Number(value).toFixed(3) : String(value);
          tr.append(td);
        }
        body.append(tr);
      }
      table.tBodies[0].replaceWith(body);
      for (const th of table.tHead.rows[0].cells) {
        if (th.dataset.key === sort.key) th.dataset.sort = sort.dir > 0 ? "asc" : "desc";
        else delete th.dataset.sort;
      }
    },
  };
  for (const th of table.tHead.rows[0].cells) {
    th.addEventListener("click", () => {
      sort.dir = sort.key === th.dataset.key ? -sort.dir : 1;
      sort.key = th.dataset.key;
      sort.type = th.dataset.type;
      card.table.render();
    });
  }
}

// ------------------------------------------------------------------------------ controls

function debounce(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

function setupControls() {
  const input = $("#file-input");
  input.addEventListener("change", () => {
    addFiles([...input.files]);
    input.value = "";
  });
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    addFiles([...event.dataTransfer.files]);
  });
  const refresh = debounce(refreshResults, 120);
  const slider = $("#score");
  slider.addEventListener("input", () => {
    state.settings.score = Number(slider.value);
    $("#score-value").textContent = state.settings.score.toFixed(2);
    refresh();
  });
  for (const id of ["fill", "outline", "text"]) {
    $(`#${id}`).addEventListener("change", (event) => {
      state.settings[id] = event.target.checked;
      refresh();
    });
  }
  $("#tta").addEventListener("change", (event) => {
    state.tta = event.target.checked;
    state.generation += 1;                       // re-run every image with the new setting
    for (const item of state.items) {
      if (!item.error || item.result) {
        item.done = false;
        item.result = null;
      }
    }
    pump();
  });
}

document.addEventListener("DOMContentLoaded", async () => {
  setupControls();
  await loadInfo();
});
