// Style: submit a job, follow it (progress bar and preview while it runs), cancel it, show and download the
// result; the recent jobs of this browser.

import { api, apiJson, busyForm, compact, el, fmt, Problem, showProblem } from "./core.js";

const MINE = "cnn-apps.style-jobs";  // ids of jobs started from this browser (localStorage: survives a reload)
const ACTIVE = new Set(["queued", "running"]);
const POLL_MS = 500;

function mine() {
  try {
    return JSON.parse(localStorage.getItem(MINE) || "[]");
  } catch {
    return [];
  }
}

function remember(id) {
  localStorage.setItem(MINE, JSON.stringify([id, ...mine().filter((x) => x !== id)].slice(0, 50)));
}

export function initStyle() {
  const panel = document.getElementById("panel-style");
  const region = panel.querySelector(".problem");
  const box = document.getElementById("style-job");
  const progress = document.getElementById("style-progress");
  const statusText = document.getElementById("style-status");
  const cancel = document.getElementById("style-cancel");
  const download = document.getElementById("style-download");
  const image = document.getElementById("style-image");
  const caption = box.querySelector("figcaption");
  const jobError = box.querySelector(".job-error");
  const tbody = document.querySelector("#style-jobs tbody");
  const onlyMine = document.getElementById("style-mine");
  let current = null;  // the job being followed
  let token = 0;  // bumps when another job is opened, so the previous poll loop stops
  let imageUrl = null;

  const setImage = (blob, text) => {
    if (imageUrl) URL.revokeObjectURL(imageUrl);
    imageUrl = URL.createObjectURL(blob);
    image.src = imageUrl;
    image.alt = text;
    image.hidden = false;
    caption.textContent = text;
    return imageUrl;
  };

  const describe = (job) => {
    const parts = [job.status];
    if (job.total_steps) parts.push(`step ${job.step} of ${job.total_steps}`);
    if (job.status === "queued" && job.queue_position !== null) parts.push(`position ${job.queue_position + 1} in the queue`);
    if (job.loss !== null && job.loss !== undefined) parts.push(`loss ${fmt(job.loss, 2)}`);
    if (job.eta_seconds) parts.push(`about ${Math.ceil(job.eta_seconds)} s left`);
    if (job.cancel_requested && ACTIVE.has(job.status)) parts.push("cancelling…");
    return parts.join(" · ");
  };

  const render = (job) => {
    current = job;
    box.hidden = false;
    box.dataset.status = job.status;
    box.querySelector(".job-id").textContent = job.id;
    progress.value = job.progress || 0;
    progress.setAttribute("aria-valuetext", `${Math.round(100 * (job.progress || 0))}%`);
    statusText.textContent = describe(job);
    cancel.hidden = !ACTIVE.has(job.status);
    cancel.disabled = job.cancel_requested;
    jobError.hidden = !job.error;
    jobError.textContent = job.error ? `The job failed: ${job.error}` : "";
  };

  async function follow(job) {
    const mineToken = ++token;
    download.hidden = true;
    image.hidden = true;
    caption.textContent = "";
    let previewStep = -1;
    render(job);
    while (mineToken === token) {
      if (job.status === "running" && job.step > 0 && job.step !== previewStep) {
        try {
          const r = await api(`style-transfer/${job.id}/preview`);
          if (mineToken !== token) return;
          setImage(await r.blob(), `preview at step ${job.step} of ${job.total_steps}`);
          previewStep = job.step;
        } catch (err) {
          if (!(err instanceof Problem && err.status === 409)) throw err;  // 409: no preview written yet
        }
      }
      if (!ACTIVE.has(job.status)) break;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      if (mineToken !== token) return;
      job = await apiJson(`style-transfer/${job.id}`);
      if (mineToken !== token) return;
      render(job);
    }
    if (mineToken !== token) return;
    if (job.status === "succeeded") {
      const r = await api(`style-transfer/${job.id}/result`);
      const url = setImage(await r.blob(), `result: ${job.parameters.size} px, ${job.total_steps} steps`);
      download.href = url;
      download.download = `style-${job.id}.png`;
      download.hidden = false;
    } else if (job.status === "canceled") {
      caption.textContent = "Canceled.";
    }
    loadJobs();
  }

  const followSafely = (job) => follow(job).catch((err) => showProblem(region, err));

  busyForm(document.getElementById("style-form"), region, async (data) => {
    const job = await apiJson("style-transfer", { method: "POST", body: compact(data) });
    remember(job.id);
    loadJobs();
    followSafely(job);
  });

  cancel.addEventListener("click", async () => {
    if (!current) return;
    cancel.disabled = true;
    showProblem(region, null);
    try {
      const r = await api(`style-transfer/${current.id}`, { method: "DELETE" });
      if (r.status === 200) render(await r.json());  // the poll loop sees it end
    } catch (err) {
      cancel.disabled = false;
      showProblem(region, err);
    }
  });

  async function loadJobs() {
    try {
      const page = await apiJson("style-transfer?limit=20");
      const ids = new Set(mine());
      const jobs = onlyMine.checked ? page.jobs.filter((j) => ids.has(j.id)) : page.jobs;
      tbody.replaceChildren(...jobs.map((j) => {
        const open = el("button", { type: "button", text: "Open", "aria-label": `Open job ${j.id}` });
        open.addEventListener("click", () => { showProblem(region, null); followSafely(j); });
        const del = ACTIVE.has(j.status) ? null : el("button", { type: "button", class: "danger", text: "Delete",
          "aria-label": `Delete job ${j.id}` });
        if (del) {
          del.addEventListener("click", async () => {
            del.disabled = true;
            try {
              await api(`style-transfer/${j.id}`, { method: "DELETE" });
              if (current && current.id === j.id) { token++; box.hidden = true; }
              loadJobs();
            } catch (err) {
              del.disabled = false;
              showProblem(region, err);
            }
          });
        }
        return el("tr", { "data-job": j.id, class: current && current.id === j.id ? "current" : "" },
          el("td", {}, el("code", { title: j.id, text: j.id.slice(0, 8) })),
          el("td", {}, el("span", { class: `badge ${j.status}`, text: j.status })),
          el("td", { class: "num", text: `${Math.round(100 * j.progress)}%` }),
          el("td", { text: `${j.parameters.size} px / ${j.parameters.steps}` }),
          el("td", { text: j.created_at ? new Date(j.created_at).toLocaleString() : "" }),
          el("td", {}, open, " ", del));
      }));
      if (!jobs.length) {
        tbody.append(el("tr", {}, el("td", { colspan: "6", class: "muted",
          text: onlyMine.checked ? "No job started from this browser yet." : "No jobs." })));
      }
    } catch (err) {
      showProblem(region, err);
    }
  }

  onlyMine.addEventListener("change", loadJobs);
  document.getElementById("style-jobs-refresh").addEventListener("click", loadJobs);
  if (!panel.hidden) loadJobs();
  const observer = new MutationObserver(() => { if (!panel.hidden) loadJobs(); });
  observer.observe(panel, { attributes: true, attributeFilter: ["hidden"] });
}
