// Shared helpers of the playground: API calls with the tab's key, problem details, small DOM builders.

const KEY_STORE = "cnn-apps.api-key";
const listeners = new Set();

/** An error answer of the API, read from its RFC 9457 problem details (title, detail, status). */
export class Problem extends Error {
  constructor(status, title, detail, body) {
    super(`${title}: ${detail}`);
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.body = body;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

/** Call `fn(problem)` on every 401 (the page then asks for a key). */
export function onUnauthorized(fn) {
  listeners.add(fn);
}

/** fetch() against this service (relative URL), with the API key when one is set; throws Problem on errors. */
export async function api(path, { method = "GET", body, json } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, body, headers, cache: "no-store" });
  } catch (err) {
    throw new Problem(0, "The service did not answer", `${method} ${path}: ${err.message}`, null);
  }
  if (response.ok) return response;
  let problem = null;
  try {
    problem = await response.json();
  } catch {
    problem = null;
  }
  const title = (problem && problem.title) || response.statusText || "Error";
  const detail = (problem && typeof problem.detail === "string" && problem.detail) || `HTTP ${response.status}`;
  const err = new Problem(response.status, title, detail, problem);
  if (response.status === 401) listeners.forEach((fn) => fn(err));
  throw err;
}

export async function apiJson(path, options) {
  return (await api(path, options)).json();
}

/** Build an element: el("p", {class: "x", text: "hi"}, child, ...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Show an error in a panel's alert region: the problem's title and detail (or clear it with null). */
export function showProblem(region, err) {
  region.replaceChildren();
  if (!err) {
    region.hidden = true;
    return;
  }
  if (err instanceof Problem) {
    const status = err.status ? ` (${err.status})` : "";
    region.append(el("strong", { class: "problem-title", text: err.title + status }), " ",
      el("span", { class: "problem-detail", text: err.detail }));
  } else {
    region.append(el("strong", { class: "problem-title", text: "Error" }), " ",
      el("span", { class: "problem-detail", text: String(err && err.message ? err.message : err) }));
  }
  region.hidden = false;
}

/** Labelled probability bars for a top-k list [{label, probability}]. */
export function bars(predictions) {
  const list = el("ol", { class: "bars" });
  for (const p of predictions) {
    const pct = `${(100 * p.probability).toFixed(1)}%`;
    const fill = el("span", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(100, 100 * p.probability))}%`;
    list.append(el("li", { "aria-label": `${p.label}: ${pct}` },
      el("span", { class: "label", title: p.label, text: p.label }),
      el("span", { class: "track", "aria-hidden": "true" }, fill),
      el("span", { class: "pct", "aria-hidden": "true", text: pct })));
  }
  return list;
}

/** Run a submit handler with the button disabled and errors shown in the panel's alert region. */
export function busyForm(form, region, handler) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const buttons = form.querySelectorAll("button[type=submit]");
    buttons.forEach((b) => { b.disabled = true; });
    form.setAttribute("aria-busy", "true");
    showProblem(region, null);
    try {
      await handler(new FormData(form));
    } catch (err) {
      showProblem(region, err);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
      form.removeAttribute("aria-busy");
    }
  });
}

/** The form without its empty optional fields (the server applies its defaults to what is not sent). */
export function compact(data) {
  const out = new FormData();
  for (const [k, v] of data.entries()) {
    if (v instanceof File) {
      if (v.size > 0 || v.name) out.append(k, v, v.name);
    } else if (String(v).trim() !== "") {
      out.append(k, String(v).trim());
    }
  }
  return out;
}

/** Object URLs of a set of files, revoked when the next set replaces them. */
export class ObjectUrls {
  constructor() { this.urls = []; }
  make(blob) {
    const url = URL.createObjectURL(blob);
    this.urls.push(url);
    return url;
  }
  clear() {
    this.urls.forEach((u) => URL.revokeObjectURL(u));
    this.urls = [];
  }
}

/** Resolve when an <img> has decoded (so its natural size is known). */
export function loaded(img) {
  if (img.complete && img.naturalWidth) return Promise.resolve(img);
  return new Promise((resolve, reject) => {
    img.addEventListener("load", () => resolve(img), { once: true });
    img.addEventListener("error", () => reject(new Error("the browser cannot display this image")), { once: true });
  });
}

/** An <img> with boxes drawn over it (SVG in the image's own pixel coordinates, so it scales with the image). */
export async function stage(url, boxes, alt) {
  const img = el("img", { src: url, alt });
  const wrap = el("div", { class: "stage" }, img);
  try {
    await loaded(img);
  } catch {
    return wrap;  // the browser cannot show this format (e.g. TIFF): the results below still list the boxes
  }
  const w = img.naturalWidth;
  const h = img.naturalHeight;
  const layer = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", "aria-hidden": "true" });
  for (const b of boxes) {
    const { x, y, w: bw, h: bh } = b.box;
    layer.append(svg("rect", { x, y, width: bw, height: bh, class: b.known ? "known" : "" }));
    const size = Math.max(12, Math.round(Math.max(w, h) / 22));
    const label = svg("text", { x: x + 3, y: Math.max(size, y - 4) }, b.label);
    label.style.fontSize = `${size}px`;
    layer.append(label);
  }
  wrap.append(layer);
  return wrap;
}

/** A square crop around a detector box (with a margin), drawn on a canvas. */
export function faceCrop(img, box, size = 112, margin = 0.2) {
  const canvas = el("canvas", { width: size, height: size });
  const side = Math.max(box.w, box.h) * (1 + 2 * margin);
  const cx = box.x + box.w / 2;
  const cy = box.y + box.h / 2;
  canvas.getContext("2d").drawImage(img, cx - side / 2, cy - side / 2, side, side, 0, 0, size, size);
  return canvas;
}

export function fmt(x, digits = 3) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–";
}

/** Make a drop zone put dropped files into its file input, and show thumbnails of the chosen files. */
export function dropZone(zone) {
  const input = zone.querySelector("input[type=file]");
  const thumbs = zone.querySelector(".thumbs");
  const urls = new ObjectUrls();
  const refresh = () => {
    if (!thumbs) return;
    urls.clear();
    thumbs.replaceChildren(...[...input.files].slice(0, 16).map((f) => el("img", { src: urls.make(f), alt: "" })));
  };
  input.addEventListener("change", refresh);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const files = [...e.dataTransfer.files].filter((f) => f.type.startsWith("image/") || !f.type);
    if (!files.length) return;
    const dt = new DataTransfer();
    (input.multiple ? files : files.slice(0, 1)).forEach((f) => dt.items.add(f));
    input.files = dt.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });
}

/** Keyboard-operable tabs (WAI-ARIA tabs pattern): arrows, Home and End move between tabs. */
export function tabs(list, onSelect) {
  const all = [...list.querySelectorAll(':scope > [role="tab"]')];
  const select = (tab, focus) => {
    for (const t of all) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    if (onSelect) onSelect(tab);
  };
  list.addEventListener("click", (e) => {
    const tab = e.target.closest('[role="tab"]');
    if (tab && all.includes(tab)) select(tab, false);
  });
  list.addEventListener("keydown", (e) => {
    const i = all.indexOf(document.activeElement);
    if (i < 0) return;
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: all.length - 1 }[e.key];
    if (next === undefined) return;
    e.preventDefault();
    select(all[(next + all.length) % all.length], true);
  });
  return { select: (id) => { const t = all.find((x) => x.id === id); if (t) select(t, false); } };
}
