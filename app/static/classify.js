// Classify: one or more images, a model, the top-k of each image as labelled bars.

import { apiJson, bars, busyForm, compact, el, ObjectUrls } from "./core.js";

export function initClassify() {
  const panel = document.getElementById("panel-classify");
  const form = document.getElementById("classify-form");
  const results = document.getElementById("classify-results");
  const meta = panel.querySelector(".meta");
  const urls = new ObjectUrls();

  busyForm(form, panel.querySelector(".problem"), async (data) => {
    const files = data.getAll("image").filter((f) => f.size > 0 || f.name);
    meta.textContent = `Classifying ${files.length} image${files.length === 1 ? "" : "s"}…`;
    results.replaceChildren();
    const started = performance.now();
    let out;
    try {
      out = await apiJson("classify", { method: "POST", body: compact(data) });
    } catch (err) {
      meta.textContent = "";
      throw err;
    }
    const ms = Math.round(performance.now() - started);
    urls.clear();
    meta.replaceChildren(`${out.model} · `, el("span", { class: `badge ${out.weights}`, text: `${out.weights} weights` }),
      ` · ${out.results.length} image${out.results.length === 1 ? "" : "s"} in ${ms} ms`);
    results.replaceChildren(...out.results.map((r, i) => {
      const file = files[i];
      return el("article", { class: "card", "data-filename": r.filename },
        el("h3", { text: r.filename }),
        file ? el("img", { class: "thumb", src: urls.make(file), alt: r.filename }) : null,
        el("p", { class: "top-label", text: `${r.top_k[0].label} · ${(100 * r.top_k[0].probability).toFixed(1)}%` }),
        bars(r.top_k));
    }));
  });
}
