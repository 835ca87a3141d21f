// Text: one text per line, the topics of each as bars, and whether the model only read its start.

import { apiJson, bars, busyForm, el } from "./core.js";

const EXAMPLES = [
  "Federer Wins Wimbledon Title. LONDON (Reuters) - Roger Federer beat Andy Roddick in four sets on Sunday.",
  "Oil prices climb as OPEC agrees to cut output; airline shares fall on fuel costs",
  "NASA probe sends back the first close-up images of a comet's icy nucleus",
  "UN Security Council meets as talks on the ceasefire stall; envoys fly to the region",
  "Chip maker posts record quarter. SAN FRANCISCO - The company said on Tuesday that revenue rose 40 percent "
    + "from a year earlier on strong demand for data-centre processors, and it raised its forecast for the rest "
    + "of the year. Shares climbed 6 percent in after-hours trading. Analysts had expected slower growth after "
    + "two quarters of falling prices for memory, and the results lifted other semiconductor stocks as well.",
];

export function initText() {
  const panel = document.getElementById("panel-text");
  const form = document.getElementById("text-form");
  const input = document.getElementById("text-input");
  const results = document.getElementById("text-results");
  const meta = panel.querySelector(".meta");

  document.getElementById("text-example").addEventListener("click", () => {
    input.value = EXAMPLES.join("\n");
    input.focus();
  });

  busyForm(form, panel.querySelector(".problem"), async (data) => {
    const texts = String(data.get("texts")).split(/\r?\n/).map((t) => t.trim()).filter((t) => t);
    const body = { texts, top_k: Number(data.get("top_k")) || 4 };
    if (data.get("model")) body.model = data.get("model");
    results.replaceChildren();
    meta.textContent = `Classifying ${texts.length} text${texts.length === 1 ? "" : "s"}…`;
    let out;
    try {
      out = await apiJson("text/classify", { method: "POST", json: body });
    } catch (err) {
      meta.textContent = "";
      throw err;
    }
    meta.replaceChildren(`${out.model} · `, el("span", { class: `badge ${out.weights}`, text: `${out.weights} weights` }),
      ` · reads the first ${out.window} characters of each text`);
    results.replaceChildren(...out.results.map((r, i) => {
      const text = texts[i] || "";
      const shown = text.length > 220 ? `${text.slice(0, 220)}…` : text;
      return el("article", { class: "card", "data-index": String(i) },
        el("blockquote", { text: shown }),
        el("p", { class: "top-label" }, el("strong", { text: r.top_k[0].label }),
          ` · ${(100 * r.top_k[0].probability).toFixed(1)}%`,
          r.truncated ? el("span", { class: "badge warn truncated",
            text: `truncated: only the first ${out.window} of ${text.length} characters were read` }) : null),
        bars(r.top_k));
    }));
  });
}
