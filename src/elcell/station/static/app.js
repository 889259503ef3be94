// elcell inspection station: plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const API = "/api/v1";
const $ = (id) => document.getElementById(id);
const state = { model: null, labels: [], review: null, ticked: new Set(), busy: false };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// ------------------------------------------------------------------ talking to the service
function headers() {
  const token = sessionStorage.getItem("elcell-token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new Error("this station needs a token: enter it at the top");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
    if (response.status === 503) detail += " (the station is busy)";
    throw new Error(detail);
  }
  return response;
}

const json = async (path, options) => (await api(path, options)).json();

// Images come through fetch too, so that a token travels with them.
async function show(img, url) {
  if (!url) return;
  try {
    const blob = await (await api(url)).blob();
    if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
    img.dataset.url = URL.createObjectURL(blob);
    img.src = img.dataset.url;
    img.dataset.src = url;
  } catch (err) { img.alt = String(err.message || err); }
}

function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// ------------------------------------------------------------------ model and uploads
async function loadModel() {
  try {
    state.model = await json(`${API}/model`);
  } catch (err) {
    $("model-info").textContent = String(err.message || err);
    return;
  }
  const m = state.model;
  state.labels = m.labels;
  const bands = m.labels.map((l) => `${l} ≥ ${m.thresholds[l]} (review ≥ ${m.review_thresholds[l]})`).join(", ");
  $("model-info").textContent = `${m.model} · ${m.size} px · ${bands} · elcell ${m.version}`;
  $("review-panel").hidden = !m.review;
  if (m.review) nextReview();
}

function worst(decisions) {
  const values = Object.values(decisions || {});
  return values.includes("defect") ? "defect" : values.includes("review") ? "review" : "ok";
}

function labelRows(probs, decisions) {
  return state.labels.map((label) => el("div", { class: "label-row" },
    el("span", { class: "label" }, label),
    el("span", {}, (probs[label] ?? 0).toFixed(3)),
    el("span", { class: `decision ${decisions[label]}`, "data-label": label }, decisions[label]),
    el("span", { class: "bar" }, el("i", { style: `width:${(100 * (probs[label] || 0)).toFixed(1)}%` }))));
}

function cellCard(cell) {
  if (cell.error) {
    return el("div", { class: "card failed", "data-name": cell.name },
      el("div", { class: "name" }, cell.name), el("div", { class: "error-text" }, cell.error));
  }
  const flag = worst(cell.decisions);
  const img = el("img", { alt: cell.name });
  // the overlay of the label the model is surest about among the flagged ones, else the plain cell
  const flagged = state.labels.filter((l) => cell.decisions[l] !== "ok");
  const first = flagged.sort((a, b) => cell.probs[b] - cell.probs[a])[0];
  show(img, first ? cell.overlays[first] : cell.image);
  const tabs = el("div", { class: "tabs" });
  const views = [["cell", cell.image], ...state.labels.map((l) => [l, cell.overlays[l]])];
  for (const [name, url] of views) {
    const button = el("button", { type: "button", class: (first ? name === first : name === "cell") ? "on" : "",
      onclick: (event) => {
        event.stopPropagation();
        tabs.querySelectorAll("button").forEach((b) => b.classList.remove("on"));
        button.classList.add("on");
        show(img, url);
      } }, name);
    tabs.append(button);
  }
  return el("div", { class: `card flag-${flag}`, "data-name": cell.name, "data-flag": flag,
    onclick: () => enlarge(cell.name, cell) },
    img, el("div", { class: "name" }, cell.name), ...labelRows(cell.probs, cell.decisions), tabs);
}

async function upload(files) {
  if (!files.length || state.busy) return;
  const module = $("mode-module").checked;
  const form = new FormData();
  state.busy = true;
  try {
    if (module) {
      if (files.length > 1) throw new Error("a module is one photo: drop one file, or switch to Cells");
      form.append("file", files[0]);
      form.append("grid", $("grid").value);
      say(`inspecting ${files[0].name} (${$("grid").value})…`);
      const answer = await json(`${API}/modules`, { method: "POST", body: form });
      showModule(answer);
      say(`${answer.name}: grade ${answer.grade} in ${answer.seconds.toFixed(2)} s`);
    } else {
      for (const file of files) form.append("files", file);
      say(`scoring ${files.length} cell${files.length > 1 ? "s" : ""}…`);
      const answer = await json(`${API}/cells?heatmaps=all`, { method: "POST", body: form });
      const results = $("results");
      for (const cell of answer.cells.slice().reverse()) results.prepend(cellCard(cell));
      const failed = answer.cells.filter((c) => c.error).length;
      say(`scored ${answer.cells.length - failed} cell(s)` + (failed ? `, ${failed} could not be read` : ""), failed > 0);
    }
    if (state.model && state.model.review && !state.review) nextReview();
  } catch (err) {
    say(String(err.message || err), true);
  } finally {
    state.busy = false;
  }
}

// ------------------------------------------------------------------ modules
function showModule(module) {
  $("module-result").hidden = false;
  $("module-grade").textContent = module.grade;
  $("module-name").textContent = `${module.name} (${module.grid})`;
  $("module-rule").textContent = module.rule;
  const c = module.counts;
  $("module-counts").textContent = `defect cells ${c.defect_cells} · review cells ${c.review_cells} · ` +
    `dark area ${(100 * c.dark_area).toFixed(1)} %`;
  show($("module-map"), module.map);
  const [width, height] = module.map_size;
  const layer = $("map-cells");
  layer.replaceChildren();
  for (const cell of module.cells) {
    const [x0, y0, x1, y1] = cell.map_box;
    const name = `${module.name} r${cell.row} c${cell.col}`;
    layer.append(el("button", {
      class: "map-cell", type: "button", title: `${name}: ${worst(cell.decisions)}`,
      "data-row": cell.row, "data-col": cell.col, "data-flag": worst(cell.decisions),
      style: `left:${100 * x0 / width}%;top:${100 * y0 / height}%;width:${100 * (x1 - x0) / width}%;height:${100 * (y1 - y0) / height}%`,
      onclick: () => enlarge(name, { ...cell, overlays: overlaysOf(cell.id) }, cell.dark_area),
    }));
  }
  $("module-result").scrollIntoView({ behavior: "smooth", block: "start" });
}

function overlaysOf(id) {
  return Object.fromEntries(state.labels.map((l) => [l, `${API}/results/${id}/overlay/${l}.png`]));
}

// ------------------------------------------------------------------ enlarging a cell
function enlarge(title, cell, dark) {
  const figures = el("div", { class: "enlarged" });
  const views = [["cell", cell.image], ...state.labels.map((l) => [`${l}: ${cell.decisions[l]}`, cell.overlays[l]])];
  for (const [caption, url] of views) {
    const img = el("img", { alt: caption });
    show(img, url);
    figures.append(el("figure", {}, img, el("figcaption", {}, caption)));
  }
  const extra = dark === undefined ? [] : [el("div", { class: "muted" }, `dark area ${(100 * dark).toFixed(1)} %`)];
  $("modal-title").textContent = title;
  $("modal-body").replaceChildren(figures, ...labelRows(cell.probs, cell.decisions), ...extra);
  $("modal").hidden = false;
  $("modal-close").focus();
}

function closeModal() { $("modal").hidden = true; }

// ------------------------------------------------------------------ the review loop
async function nextReview() {
  try {
    const next = await json(`${API}/review/next`);
    state.review = next.item;
    state.ticked.clear();
    $("review-count").textContent = `${next.waiting} waiting · ${next.answered} answered`;
    $("review-item").hidden = !next.item;
    $("review-empty").hidden = !!next.item;
    if (!next.item) return;
    const item = next.item;
    const flagged = state.labels.filter((l) => item.decisions[l] !== "ok")
      .sort((a, b) => item.probs[b] - item.probs[a]);
    show($("review-image"), flagged.length ? item.overlays[flagged[0]] : item.image);
    $("review-name").textContent = item.name;
    $("review-probs").replaceChildren(...labelRows(item.probs, item.decisions));
    const buttons = state.labels.map((label, i) => el("button", {
      type: "button", "data-label": label, onclick: () => answer([label]) }, el("kbd", {}, String(i + 1)), label));
    buttons.push(el("button", { type: "button", class: "ok", "data-label": "ok", onclick: () => answer([]) },
      el("kbd", {}, "0"), "ok"));
    buttons.push(el("button", { type: "button", "data-label": "skip", onclick: skip }, el("kbd", {}, "S"), "skip"));
    $("review-buttons").replaceChildren(...buttons);
  } catch (err) {
    $("review-saved").textContent = String(err.message || err);
  }
}

async function answer(present) {
  const item = state.review;
  if (!item) return;
  state.review = null;
  const labels = Object.fromEntries(state.labels.map((l) => [l, present.includes(l) ? 1 : 0]));
  try {
    const saved = await json(`${API}/review/${item.id}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ labels }) });
    const said = present.length ? present.join(" + ") : "ok";
    $("review-saved").textContent = `${item.name}: ${said} → ${saved.path} (row ${saved.rows} of labels.csv)`;
  } catch (err) {
    $("review-saved").textContent = String(err.message || err);
  }
  nextReview();
}

async function skip() {
  const item = state.review;
  if (!item) return;
  state.review = null;
  try { await json(`${API}/review/${item.id}/skip`, { method: "POST" }); } catch (err) { /* gone already */ }
  nextReview();
}

function onKey(event) {
  if (!$("modal").hidden && event.key === "Escape") { closeModal(); return; }
  if (!state.review || event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  const digit = /^Digit([1-9])$/.exec(event.code);
  if (digit && Number(digit[1]) <= state.labels.length) {
    const label = state.labels[Number(digit[1]) - 1];
    if (event.shiftKey) {
      state.ticked.has(label) ? state.ticked.delete(label) : state.ticked.add(label);
      document.querySelector(`#review-buttons button[data-label="${label}"]`).classList.toggle("ticked");
    } else {
      answer([label]);
    }
  } else if (key === "0" || key === "o") {
    answer([]);
  } else if (key === "enter" && state.ticked.size) {
    answer([...state.ticked]);
  } else if (key === "s") {
    skip();
  } else {
    return;
  }
  event.preventDefault();
}

// ------------------------------------------------------------------ wiring
function init() {
  const drop = $("drop");
  $("files").addEventListener("change", (event) => { upload([...event.target.files]); event.target.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => upload([...event.dataTransfer.files]));
  $("modal-close").addEventListener("click", closeModal);
  $("modal").addEventListener("click", (event) => { if (event.target === $("modal")) closeModal(); });
  document.addEventListener("keydown", onKey);
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("elcell-token", $("token").value.trim());
    $("token-form").hidden = true;
    loadModel();
  });
  loadModel();
}

init();
