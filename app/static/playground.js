// The playground's entry point: API key, status strip from /models, tabs, and each application's panel.

import { apiJson, apiKey, dropZone, el, onUnauthorized, Problem, setApiKey, showProblem, tabs } from "./core.js";
import { initClassify } from "./classify.js";
import { initFaces } from "./faces.js";
import { initStyle } from "./style.js";
import { initText } from "./text.js";

const $ = (sel) => document.querySelector(sel);
const modelsListeners = [];

/** Register a callback for every fresh /models answer (the panels fill their model choices from it). */
export function onModels(fn) {
  modelsListeners.push(fn);
}

function initKey() {
  const form = $("#key-form");
  const input = $("#api-key");
  if (apiKey()) {
    form.hidden = false;
    input.value = apiKey();
  }
  onUnauthorized(() => {
    form.hidden = false;
    form.classList.add("needed");
    if (document.activeElement === document.body) input.focus();
  });
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(input.value.trim());
    form.classList.remove("needed");
    loadStatus();
  });
  $("#api-key-forget").addEventListener("click", () => {
    setApiKey("");
    input.value = "";
    loadStatus();
  });
}

function appChip(name, app) {
  const label = app.status === "ready" ? "ready" : app.status;
  const chip = el("span", { class: `chip ${app.status}`, "data-app": name },
    el("span", { class: "dot", "aria-hidden": "true" }),
    el("strong", { text: name }), ` ${label}`,
    app.default_model ? el("span", { class: "muted", text: ` · default ${app.default_model}` }) : null);
  if (app.reason) chip.title = app.reason;
  return chip;
}

function metricsText(m) {
  const parts = [];
  for (const [k, v] of Object.entries(m.metrics || {})) {
    if (typeof v === "number" && parts.length < 2 && !/rows|images|pairs/.test(k)) {
      parts.push(`${k} ${v <= 1 ? (100 * v).toFixed(1) + "%" : v}`);
    }
  }
  return parts.join(", ");
}

function renderStatus(data) {
  const apps = $("#status-apps");
  apps.replaceChildren(...Object.entries(data.applications || {}).map(([n, a]) => appChip(n, a)));
  const models = data.models || [];
  const ready = models.filter((m) => m.status === "ready").length;
  const untrained = models.filter((m) => m.weights === "untrained").length;
  $("#status-models summary").textContent =
    `Models: ${ready} ready, ${models.length - ready} not ready` + (untrained ? `, ${untrained} untrained` : "") +
    (data.default_classifier ? ` · default classifier ${data.default_classifier}` : "") +
    (data.default_text_model ? ` · default text model ${data.default_text_model}` : "");
  $("#status-models tbody").replaceChildren(...models.map((m) => el("tr", { "data-model": m.name },
    el("td", {}, el("code", { text: m.name })),
    el("td", { text: m.task }),
    el("td", {}, el("span", { class: `badge ${m.status}`, text: m.status })),
    el("td", {}, m.weights ? el("span", { class: `badge ${m.weights}`, text: m.weights }) : "–",
      m.weights_source ? el("span", { class: "muted", text: ` ${m.weights_source}` }) : null),
    el("td", { text: metricsText(m) }),
    el("td", { class: "reason", text: m.reason || "" }))));
}

let statusTimer = null;

async function loadStatus() {
  const region = $("#status .problem");
  clearTimeout(statusTimer);
  try {
    const data = await apiJson("models");
    showProblem(region, null);
    renderStatus(data);
    modelsListeners.forEach((fn) => fn(data));
  } catch (err) {
    showProblem(region, err);
    if (err instanceof Problem && err.status === 503) statusTimer = setTimeout(loadStatus, 3000);  // still loading
    $("#status-apps").replaceChildren(el("span", { class: "muted", text: "Status unavailable" }));
  }
}

/** Fill a <select data-task=...> with the models of its task: ready ones selectable, the default first. */
function fillModelSelects(data) {
  for (const select of document.querySelectorAll("select[data-task]")) {
    const task = select.dataset.task;
    const previous = select.value;
    const def = task === "image-classification" ? data.default_classifier : data.default_text_model;
    const models = (data.models || []).filter((m) => m.task === task);
    models.sort((a, b) => (b.name === def) - (a.name === def) || (b.status === "ready") - (a.status === "ready"));
    select.replaceChildren(...models.map((m) => {
      const note = m.name === def ? " (default)" : m.status !== "ready" ? ` (${m.status})` :
        m.weights === "untrained" ? " (untrained)" : "";
      return el("option", { value: m.name, disabled: m.status !== "ready", text: m.name + note,
        title: m.reason || "" });
    }));
    if (previous && models.some((m) => m.name === previous && m.status === "ready")) select.value = previous;
  }
}

function initTabs() {
  const panels = { "tab-classify": "classify", "tab-faces": "faces", "tab-text": "text", "tab-style": "style" };
  const main = tabs($('.tabs[aria-label="Applications"]'), (tab) => {
    const name = panels[tab.id];
    if (location.hash.slice(1).split("/")[0] !== name) history.replaceState(null, "", `#${name}`);
  });
  const faces = tabs($('.tabs[aria-label="Face operations"]'), (tab) => {
    history.replaceState(null, "", `#faces/${tab.id.slice(4)}`);
    if (tab.id === "tab-gallery") document.dispatchEvent(new Event("gallery:show"));
  });
  const fromHash = () => {
    const [top, sub] = location.hash.slice(1).split("/");
    if (Object.values(panels).includes(top)) main.select(`tab-${top}`);
    if (top === "faces" && sub) faces.select(`tab-${sub}`);
  };
  window.addEventListener("hashchange", fromHash);
  fromHash();
}

initKey();
onModels(fillModelSelects);
initClassify();
initFaces();
initText();
initStyle();
initTabs();  // last: opening #faces/gallery or #style loads their lists, whose handlers exist by now
$("#status-refresh").addEventListener("click", loadStatus);
document.querySelectorAll(".drop").forEach(dropZone);
loadStatus().then(() => document.body.setAttribute("data-ready", "true"));
