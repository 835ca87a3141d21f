// Faces: detect (boxes over the photo), verify 1:1 (both crops, distance against the threshold), enrol,
// identify 1:N (candidates or unknown) and the gallery (subjects, face counts, delete).

import { api, apiJson, busyForm, compact, el, faceCrop, fmt, loaded, ObjectUrls, showProblem, stage } from "./core.js";

function firstFile(data, field) {
  const f = data.get(field);
  return f instanceof File && (f.size > 0 || f.name) ? f : null;
}

function modelLine(out) {
  return el("span", {}, `${out.model} · `, el("span", { class: `badge ${out.weights}`, text: `${out.weights} weights` }));
}

async function imageOf(file, urls) {
  const img = el("img", { src: urls.make(file), alt: "" });
  try {
    return await loaded(img);
  } catch {
    return null;  // a format the browser cannot show: no crops, the numbers still are
  }
}

function initDetect() {
  const urls = new ObjectUrls();
  const panel = document.getElementById("panel-detect");
  const result = document.getElementById("detect-result");
  const meta = panel.querySelector(".meta");
  busyForm(document.getElementById("detect-form"), panel.querySelector(".problem"), async (data) => {
    const file = firstFile(data, "image");
    result.replaceChildren();
    meta.textContent = "Detecting…";
    let out;
    try {
      out = await apiJson("faces/embed", { method: "POST", body: compact(data) });
    } catch (err) {
      meta.textContent = "";
      throw err;
    }
    urls.clear();
    const r = out.results[0];
    meta.replaceChildren(modelLine(out), ` · ${r.faces_detected} face${r.faces_detected === 1 ? "" : "s"} detected` +
      (r.faces.length < r.faces_detected ? `, the ${r.faces.length} largest shown` : "") + ` · ${out.dim}-d embeddings`);
    const boxes = r.faces.map((f, i) => ({ box: f.box, label: `#${i + 1} ${f.score.toFixed(1)}` }));
    const rows = r.faces.map((f, i) => el("tr", {},
      el("td", { text: `#${i + 1}` }), el("td", { class: "num", text: fmt(f.score, 2) }),
      el("td", { text: `x ${f.box.x}, y ${f.box.y}, ${f.box.w}×${f.box.h}` }),
      el("td", { class: "muted", text: `[${f.embedding.slice(0, 4).map((v) => v.toFixed(3)).join(", ")}, …]` })));
    result.append(await stage(urls.make(file), boxes, `${r.filename} with ${r.faces.length} detected faces`));
    result.append(r.faces.length
      ? el("div", { class: "table-wrap" }, el("table", { class: "faces" },
        el("thead", {}, el("tr", {}, ...["face", "score", "box", "embedding"].map((h) => el("th", { scope: "col", text: h })))),
        el("tbody", {}, rows)))
      : el("p", { class: "no-face", text: "No face found in this photo." }));
  });
}

function gauge(distance, threshold) {
  const max = Math.max(4, distance, threshold);
  const g = el("div", { class: "gauge", role: "img",
    "aria-label": `distance ${fmt(distance)} against threshold ${fmt(threshold)}` });
  const d = el("span", { class: "mark distance", title: `distance ${fmt(distance)}` });
  const t = el("span", { class: "mark threshold", title: `threshold ${fmt(threshold)}` });
  d.style.left = `${(100 * distance) / max}%`;
  t.style.left = `${(100 * threshold) / max}%`;
  g.append(t, d);
  return g;
}

function initVerify() {
  const urls = new ObjectUrls();
  const panel = document.getElementById("panel-verify");
  const result = document.getElementById("verify-result");
  busyForm(document.getElementById("verify-form"), panel.querySelector(".problem"), async (data) => {
    result.replaceChildren(el("p", { class: "meta", text: "Comparing…" }));
    let out;
    try {
      out = await apiJson("faces/verify", { method: "POST", body: compact(data) });
    } catch (err) {
      result.replaceChildren();
      throw err;
    }
    urls.clear();
    const crops = el("div", { class: "crops" });
    for (const side of ["image_a", "image_b"]) {
      const img = await imageOf(firstFile(data, side), urls);
      const face = out.faces[side];
      const caption = `${side === "image_a" ? "A" : "B"}${face.faces_detected > 1 ? ` (largest of ${face.faces_detected})` : ""}`;
      crops.append(el("figure", {}, img ? faceCrop(img, face.box) : el("div", { text: "?" }),
        el("figcaption", { text: caption })));
    }
    const same = out.match;
    result.replaceChildren(el("div", { class: "verdict", "data-match": String(same) },
      crops,
      el("div", {},
        el("p", { class: `big ${same ? "match" : "nomatch"}`, text: same ? "Match: same person" : "No match" }),
        el("p", {}, `distance ${fmt(out.distance)} ${same ? "≤" : ">"} threshold ${fmt(out.threshold)} `,
          el("span", { class: "muted", text: `(${out.threshold_source}) · similarity ${fmt(out.similarity)}` })),
        gauge(out.distance, out.threshold),
        el("p", { class: "meta" }, modelLine(out)))));
  });
}

function initEnroll(refreshGallery) {
  const urls = new ObjectUrls();
  const panel = document.getElementById("panel-enroll");
  const result = document.getElementById("enroll-result");
  busyForm(document.getElementById("enroll-form"), panel.querySelector(".problem"), async (data) => {
    const files = data.getAll("image").filter((f) => f.size > 0 || f.name);
    result.replaceChildren(el("p", { class: "meta", text: `Enrolling ${files.length} photo${files.length === 1 ? "" : "s"}…` }));
    let out;
    try {
      out = await apiJson("faces/enroll", { method: "POST", body: compact(data) });
    } catch (err) {
      result.replaceChildren();
      throw err;
    }
    urls.clear();
    const figures = [];
    for (const [i, f] of out.faces.entries()) {
      const img = files[i] ? await imageOf(files[i], urls) : null;
      figures.push(el("figure", {}, img ? faceCrop(img, f.box) : el("div", { text: "?" }),
        el("figcaption", { text: f.image }), f.note ? el("small", { text: f.note }) : null,
        f.issues && f.issues.length ? el("span", { class: "badge warn", text: f.issues.join(", ") }) : null));
    }
    result.replaceChildren(el("div", { class: "verdict enrolled" },
      el("p", { class: "big match", text: `Enrolled ${out.faces.length} face${out.faces.length === 1 ? "" : "s"} of ${out.subject}` }),
      el("div", { class: "crops" }, figures),
      out.warning ? el("p", { class: "badge warn", text: out.warning }) : null,
      el("p", { class: "meta" }, modelLine(out))));
    refreshGallery();
  });
}

function initIdentify() {
  const urls = new ObjectUrls();
  const panel = document.getElementById("panel-identify");
  const result = document.getElementById("identify-result");
  const meta = panel.querySelector(".meta");
  busyForm(document.getElementById("identify-form"), panel.querySelector(".problem"), async (data) => {
    const file = firstFile(data, "image");
    result.replaceChildren();
    meta.textContent = "Searching the gallery…";
    let out;
    try {
      out = await apiJson("faces/identify", { method: "POST", body: compact(data) });
    } catch (err) {
      meta.textContent = "";
      throw err;
    }
    urls.clear();
    meta.replaceChildren(modelLine(out),
      ` · threshold ${fmt(out.threshold)} (${out.threshold_source}${out.fpir ? `, FPIR ${out.fpir}` : ""}` +
      `${out.threshold_clamped ? ", clamped" : ""}) · gallery of ${out.gallery_size} face${out.gallery_size === 1 ? "" : "s"}`,
      ...(out.warning ? [" ", el("span", { class: "badge warn", text: out.warning })] : []));
    const url = urls.make(file);
    const boxes = out.faces.map((f, i) => ({ box: f.box, known: !!f.subject, label: `#${i + 1} ${f.subject || "unknown"}` }));
    result.append(await stage(url, boxes, `the photo with ${out.faces.length} faces`));
    if (!out.faces.length) {
      result.append(el("p", { class: "no-face", text: "No face found in this photo." }));
      return;
    }
    const img = await imageOf(file, urls);
    const list = el("div", { class: "face-list" });
    for (const [i, f] of out.faces.entries()) {
      const verdict = f.subject
        ? el("p", { class: "big match identified", text: `#${i + 1}: ${f.subject}` })
        : el("p", { class: "big nomatch identified", text: `#${i + 1}: unknown` });
      const nearest = f.candidates[0];
      const why = nearest
        ? `nearest ${nearest.subject}: distance ${fmt(nearest.distance)} ${f.subject ? "≤" : ">"} threshold ${fmt(out.threshold)}`
        : "the gallery is empty";
      const table = f.candidates.length ? el("div", { class: "table-wrap" }, el("table", { class: "candidates" },
        el("caption", { class: "visually-hidden", text: `candidates for face ${i + 1}` }),
        el("thead", {}, el("tr", {}, ...["subject", "distance", "similarity", "within threshold"].map((h) =>
          el("th", { scope: "col", text: h })))),
        el("tbody", {}, f.candidates.map((c) => el("tr", {},
          el("td", { text: c.subject }), el("td", { class: "num", text: fmt(c.distance) }),
          el("td", { class: "num", text: fmt(c.similarity) }),
          el("td", {}, el("span", { class: `badge ${c.match ? "match" : "nomatch"}`, text: c.match ? "yes" : "no" }))))))) : null;
      list.append(el("div", { class: "verdict" },
        el("div", { class: "crops" }, img ? faceCrop(img, f.box) : null),
        el("div", {}, verdict, el("p", { class: "muted", text: why }), table)));
    }
    result.append(list);
  });
}

function initGallery() {
  const panel = document.getElementById("panel-gallery");
  const region = panel.querySelector(".problem");
  const tbody = panel.querySelector("tbody");
  const more = document.getElementById("gallery-more");
  const stats = document.getElementById("gallery-stats");
  let next = null;

  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");

  const subjectRow = (s) => {
    const row = el("tr", { "data-subject": s.subject });
    const facesRow = el("tr", { class: "sub", hidden: true }, el("td", { colspan: "4" }));
    const del = el("button", { type: "button", class: "danger", text: "Delete",
      "aria-label": `Delete ${s.subject}` });
    const show = el("button", { type: "button", text: "Faces", "aria-expanded": "false",
      "aria-label": `Show the faces of ${s.subject}` });
    const actions = el("td", {}, show, " ", del);
    row.append(el("th", { scope: "row", text: s.subject }), el("td", { class: "num count", text: String(s.face_count) }),
      el("td", { text: when(s.created_at) }), actions);

    show.addEventListener("click", async () => {
      const open = show.getAttribute("aria-expanded") === "true";
      show.setAttribute("aria-expanded", String(!open));
      facesRow.hidden = open;
      if (open) return;
      showProblem(region, null);
      try {
        const detail = await apiJson(`faces/subjects/${encodeURIComponent(s.subject)}`);
        facesRow.firstChild.replaceChildren(el("ul", {}, detail.faces.map((f) => {
          const rm = el("button", { type: "button", class: "danger", text: "Delete face",
            "aria-label": `Delete face ${f.face_id}` });
          rm.addEventListener("click", async () => {
            rm.disabled = true;
            try {
              await api(`faces/${encodeURIComponent(f.face_id)}`, { method: "DELETE" });
              await load(true);
            } catch (err) {
              rm.disabled = false;
              showProblem(region, err);
            }
          });
          return el("li", {}, el("code", { text: f.face_id }), ` ${f.image || ""} · ${f.model}`,
            f.current_model ? "" : " (other model)", " ", rm);
        })));
      } catch (err) {
        showProblem(region, err);
      }
    });

    del.addEventListener("click", () => {
      // an inline confirmation (no browser dialog): keyboard users stay in place
      const yes = el("button", { type: "button", class: "danger", text: `Yes, delete ${s.subject}` });
      const no = el("button", { type: "button", text: "Keep" });
      const restore = () => { actions.replaceChildren(show, " ", del); del.focus(); };
      actions.replaceChildren(el("span", { text: `Delete ${s.face_count} face${s.face_count === 1 ? "" : "s"}? ` }),
        yes, " ", no);
      yes.focus();
      no.addEventListener("click", restore);
      yes.addEventListener("click", async () => {
        yes.disabled = true;
        try {
          await api(`faces/subjects/${encodeURIComponent(s.subject)}`, { method: "DELETE" });
          await load(true);
        } catch (err) {
          showProblem(region, err);
          restore();
        }
      });
    });
    return [row, facesRow];
  };

  async function load(reset) {
    showProblem(region, null);
    try {
      const [g, page] = await Promise.all([
        apiJson("faces/gallery"),
        apiJson(reset || !next ? "faces/subjects?limit=50" : next.replace(/^\//, "")),
      ]);
      stats.textContent = `${g.subjects} subject${g.subjects === 1 ? "" : "s"}, ${g.faces} face${g.faces === 1 ? "" : "s"} ` +
        `(${g.indexed_faces} indexed, ${g.index} index${g.faces_from_other_models ? `, ${g.faces_from_other_models} from other models` : ""}) · model ${g.model}`;
      if (reset) tbody.replaceChildren();
      tbody.append(...page.subjects.flatMap(subjectRow));
      if (!tbody.children.length) {
        tbody.append(el("tr", {}, el("td", { colspan: "4", class: "muted",
          text: "Nobody is enrolled yet: use Enrol to add a subject." })));
      }
      next = page.next;
      more.hidden = !next;
    } catch (err) {
      showProblem(region, err);
    }
  }

  document.getElementById("gallery-refresh").addEventListener("click", () => load(true));
  more.addEventListener("click", () => load(false));
  document.addEventListener("gallery:show", () => load(true));
  return () => { if (!panel.hidden) load(true); };
}

export function initFaces() {
  initDetect();
  initVerify();
  const refreshGallery = initGallery();
  initEnroll(refreshGallery);
  initIdentify();
}
