"""Markdown summary of a bench/gpu_check.sh run: steps, tests, issue 14's goals, every benchmark's key rows.

    python -m bench.gpu_summary OUT_DIR [--budget-seconds 480] [--elapsed-seconds N]

Reads what gpu_check.sh left in OUT_DIR (steps.tsv, env.json, pytest-cuda.xml, forward.json, classify.json,
profile-classify.json, classify-fronts.json, classify-before.json, classify16.json, classify16-fronts.json,
text.json, style.json, faces-gallery.json, faces-e2e.json, abuse.json; any may be missing) and writes
OUT_DIR/summary.md, OUT_DIR/steps.json and OUT_DIR/results.json (all the JSON merged into one file).
Only the standard library is used, so it also runs where the project's packages did not install.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import style_job_lines

# issue 14's goals on one H200
GOAL_IMAGES_PER_S_16 = 10_000
GOAL_REQUESTS_PER_S_1 = 2_500
GOAL_E2E_RAW_RATIO = 0.6
GOAL_STYLE_SECONDS = 3.0

JSON_FILES = ("env", "forward", "classify", "profile-classify", "classify-fronts", "classify-before", "classify16",
              "classify16-fronts", "text", "style", "faces-gallery", "faces-e2e", "abuse")


def fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, float)):
        return f"{v:,.{digits}f}" if abs(v) < 1e15 else str(v)
    return str(v)


def load(out: Path, name: str) -> Any:
    path = out / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"_unreadable": f"{type(exc).__name__}: {exc}"}


def read_steps(out: Path) -> list[dict[str, Any]]:
    steps = []
    path = out / "steps.tsv"
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = (line.split("\t") + [""] * 5)[:5]
            name, rc, seconds, budget, status = parts
            steps.append({"step": name, "rc": int(rc) if rc.strip() else None, "seconds": int(seconds or 0),
                          "budget_seconds": int(budget or 0), "status": status})
    return steps


def read_junit(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": str(exc)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals: dict[str, Any] = {k: sum(int(s.get(k, 0)) for s in suites)
                              for k in ("tests", "failures", "errors", "skipped")}
    totals["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    bad: list[dict[str, str]] = []
    skipped_reasons: dict[str, int] = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                bad.append({"test": name, "kind": tag, "message": (el.get("message") or "")[:300]})
        sk = case.find("skipped")
        if sk is not None:
            reason = (sk.get("message") or "")[:120]
            skipped_reasons[reason] = skipped_reasons.get(reason, 0) + 1
    return {**totals, "passed": totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"],
            "not_passed": bad, "skipped_reasons": skipped_reasons}


def raw_rate_at(raw_rows: list[dict[str, Any]], batch: float | None) -> float | None:
    """The raw forward's images/s at a (mean) batch size: log-log interpolation between measured sizes, linear in
    the batch below the smallest, the largest size's rate above it."""
    pts = sorted((r["batch_size"], r["items_per_s"]) for r in raw_rows if r.get("items_per_s"))
    if not pts or batch is None or not math.isfinite(batch) or batch <= 0:
        return None
    if batch <= pts[0][0]:
        return pts[0][1] * batch / pts[0][0]
    for (b0, r0), (b1, r1) in itertools.pairwise(pts):
        if b0 <= batch <= b1:
            t = (math.log(batch) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
    return pts[-1][1]


# --------------------------------------------------------------------------------------------- sections

def section_header(env: dict[str, Any] | None, args: argparse.Namespace) -> list[str]:
    lines = ["# GPU check (`bench/gpu_check.sh`)", ""]
    if not env:
        return [*lines, "- no env.json: the set-up did not finish (see logs/setup.log)"]
    pk = env.get("packages", {})
    gpu = env.get("gpu") or {}
    lines.append(f"- GPU: {gpu.get('name', 'none')} ({fmt(gpu.get('memory_gib'))} GiB, {gpu.get('sms', '?')} SMs, "
                 f"capability {gpu.get('capability', '?')}, cuDNN {gpu.get('cudnn', '?')}); "
                 f"torch.cuda.is_available() = {env.get('cuda_available')}")
    origin = "reinstalled in the venv!" if env.get("torch_from_venv") else "the machine's own"
    lines.append(f"- Python {env.get('python')}, torch {pk.get('torch')} (CUDA {env.get('torch_cuda')}; "
                 f"{origin}), torchvision "
                 f"{pk.get('torchvision')}, {env.get('cpus')} CPUs, {env.get('platform')}")
    faiss = env.get("faiss", {})
    lines.append(f"- fastapi {pk.get('fastapi')}, uvicorn {pk.get('uvicorn')}, pydantic {pk.get('pydantic')}, numpy "
                 f"{pk.get('numpy')}, pillow {pk.get('pillow')}; faiss {pk.get('faiss-gpu') or pk.get('faiss-cpu')} "
                 f"(GPUs seen by FAISS: {faiss.get('gpus', faiss.get('error'))}); "
                 f"OpenCV {env.get('cv2', {}).get('version')} "
                 f"(CascadeClassifier: {env.get('cv2', {}).get('CascadeClassifier')}); onnxruntime providers "
                 f"{env.get('onnxruntime', {}).get('providers')}")
    if env.get("missing_modules"):
        lines.append(f"- **missing modules: {', '.join(env['missing_modules'])}**")
    if args.elapsed_seconds is not None:
        lines.append(f"- whole run: {args.elapsed_seconds} s of a {args.budget_seconds} s budget")
    return lines


def section_steps(steps: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Steps", "", "| step | status | seconds | budget s |", "|---|---|---:|---:|"]
    for s in steps:
        if s["status"] == "not selected":
            continue
        status = s["status"] + (f" (rc {s['rc']})" if s["rc"] not in (None, 0) and "ok" not in s["status"] else "")
        lines.append(f"| {s['step']} | {status} | {s['seconds']} | {s['budget_seconds'] or '-'} |")
    if skipped := [s["step"] for s in steps if s["status"] == "not selected"]:
        lines.append(f"\nNot selected (--only / --skip): {', '.join(skipped)}")
    return lines


def section_tests(junit: dict[str, Any] | None) -> list[str]:
    lines = ["", "## `pytest -m cuda`", ""]
    if junit is None:
        return [*lines, "- no pytest-cuda.xml (the step did not run or did not finish)"]
    if "error" in junit:
        return [*lines, f"- pytest-cuda.xml unreadable: {junit['error']}"]
    lines.append(f"- {junit['passed']} passed, {junit['failures']} failed, {junit['errors']} errors, "
                 f"{junit['skipped']} skipped of {junit['tests']} selected ({junit['time_s']} s)")
    for reason, n in list(junit["skipped_reasons"].items())[:5]:
        lines.append(f"- skipped {n}: {reason}")
    for b in junit["not_passed"][:25]:
        lines.append(f"- {b['kind']}: `{b['test']}`: {b['message']}")
    return lines


def classify_rows(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((data or {}).get("results") or [])


def serving(r: dict[str, Any]) -> str:
    """How the row's server ran: one process, or front workers in front of a model process."""
    extra = r.get("extra") or {}
    fronts, clients = extra.get("front_workers") or 0, extra.get("client_processes") or 1
    return (f"{fronts} front workers" if fronts else "one process") + (f", {clients} client processes"
                                                                        if clients > 1 else "")


def section_goals(d: dict[str, Any]) -> list[str]:
    lines = ["", "## Issue 14 goals, this run", ""]
    on_gpu = bool((d.get("env") or {}).get("cuda_available"))
    if not on_gpu:
        lines += ["The goals are H200 targets and this run had no GPU: nothing is judged.", ""]
    lines += ["| goal | target | measured | met |", "|---|---:|---|---|"]

    def row(goal: str, target: str, measured: str, met: bool | None) -> None:
        met = met if on_gpu else None
        lines.append(f"| {goal} | {target} | {measured} | {'-' if met is None else ('yes' if met else '**no**')} |")

    raw = ((d.get("forward") or {}).get("raw") or {}).get("rows") or []
    one = classify_rows(d.get("classify")) + classify_rows(d.get("classify-fronts"))
    best1 = max(one, key=lambda r: r.get("requests_per_s") or 0, default=None)
    hi = [r for r in one if r.get("concurrency", 0) >= 128]
    best_hi = max(hi, key=lambda r: r.get("requests_per_s") or 0, default=None)
    if best_hi:
        row("/classify resnet50, 1 JPEG per request, concurrency >= 128", f"{GOAL_REQUESTS_PER_S_1:,} req/s",
            f"{fmt(best_hi['requests_per_s'])} req/s at c={best_hi['concurrency']} (p99 {fmt(best_hi['p99_ms'])} ms; "
            f"{serving(best_hi)})", best_hi["requests_per_s"] >= GOAL_REQUESTS_PER_S_1)
    elif best1:
        row("/classify resnet50, 1 JPEG per request", f"{GOAL_REQUESTS_PER_S_1:,} req/s at c >= 128",
            f"{fmt(best1['requests_per_s'])} req/s at c={best1['concurrency']} (no c >= 128 row)", None)
    else:
        row("/classify resnet50, 1 JPEG per request", f"{GOAL_REQUESTS_PER_S_1:,} req/s", "not measured", None)
    sixteen = classify_rows(d.get("classify16")) + classify_rows(d.get("classify16-fronts"))
    best16 = max(sixteen, key=lambda r: r.get("images_per_s") or 0, default=None)
    if best16:
        row("/classify resnet50, 16 JPEGs per request", f"{GOAL_IMAGES_PER_S_16:,} images/s",
            f"{fmt(best16['images_per_s'], 0)} images/s at c={best16['concurrency']} "
            f"(mean batch {fmt(best16.get('mean_batch_size'))}; {serving(best16)})",
            best16["images_per_s"] >= GOAL_IMAGES_PER_S_16)
    else:
        row("/classify resnet50, 16 JPEGs per request", f"{GOAL_IMAGES_PER_S_16:,} images/s", "not measured", None)
    ratios = []
    for r in one + sixteen:
        ref = raw_rate_at(raw, r.get("mean_batch_size"))
        if ref:
            ratios.append((r["images_per_s"] / ref, r, ref))
    if ratios:
        best = max(ratios, key=lambda t: t[0])
        ratio, r, ref = best
        row("end to end / raw forward at the same batch size", f">= {GOAL_E2E_RAW_RATIO}",
            f"best {ratio:.3f}: {fmt(r['images_per_s'], 0)} images/s at mean batch {fmt(r['mean_batch_size'])} vs raw "
            f"{fmt(ref, 0)} ({r['images_per_request']} per request, c={r['concurrency']})",
            ratio >= GOAL_E2E_RAW_RATIO)
    else:
        row("end to end / raw forward at the same batch size", f">= {GOAL_E2E_RAW_RATIO}", "not measured", None)
    style = ((d.get("style") or {}).get("results") or {}).get("ours")
    meta = (d.get("style") or {}).get("meta") or {}
    full = meta.get("size") == 512 and meta.get("steps") == 300
    if style and "error" not in style:
        row(f"style {meta.get('size')} px, {meta.get('steps')} steps, one job", f"<= {GOAL_STYLE_SECONDS} s",
            f"{fmt(style['seconds'], 2)} s in a fresh process (cold: CUDA state and network not warm)",
            style["seconds"] <= GOAL_STYLE_SECONDS if full else None)
        if c := style.get("concurrent_jobs"):
            row(f"{c['jobs']} style jobs at once on one GPU", "<= the sum of their times alone",
                f"{fmt(c['together_seconds'], 2)} s vs {c['jobs']} x {fmt(c['one_alone_seconds'], 2)} s "
                f"({fmt(c['together_over_sum_alone'], 2)} of the sum)", c["together_over_sum_alone"] <= 1.0)
        if warm := style.get("warm_job_seconds"):
            row(f"style {meta.get('size')} px, {meta.get('steps')} steps, a later job of the same worker",
                f"<= {GOAL_STYLE_SECONDS} s", f"{fmt(min(warm), 2)} s (best of {len(warm)} warm jobs; all: "
                + ", ".join(fmt(v, 2) for v in warm) + ")", min(warm) <= GOAL_STYLE_SECONDS if full else None)
    else:
        row("style 512 px, 300 steps", f"<= {GOAL_STYLE_SECONDS} s",
            f"error: {style['error']}" if style else "not measured", None)
    e2e = ((d.get("faces-e2e") or {}).get("results")) or []
    if e2e:
        b = max(e2e, key=lambda r: r.get("requests_per_s") or 0)
        row("/faces/identify end to end on the GPU, 100k gallery", "in the table",
            f"{fmt(b['requests_per_s'])} req/s at c={b['concurrency']}, gallery {b.get('gallery_size')}", None)
    text = (d.get("text") or {}).get("load") or []
    if text:
        b = max(text, key=lambda r: r.get("texts_per_s") or 0)
        row("/text/classify end to end on the GPU", "in the table",
            f"{fmt(b['texts_per_s'])} texts/s (batching {b['batching']}, c={b['concurrency']})", None)
    return lines


def section_forward(f: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Raw forward and decode (`forward.json`)", ""]
    if not f:
        return [*lines, "- not measured"]
    raw, svc = f.get("raw") or {}, f.get("service") or {}
    srows = {r["batch_size"]: r for r in svc.get("rows", [])}
    if raw.get("rows"):
        lines += [f"{f.get('model')}, autocast {raw.get('autocast')}, channels_last, cudnn.benchmark "
                  f"{f.get('cudnn_benchmark')}; service = `LoadedClassifier.forward` from CPU tensors", "",
                  "| batch | raw img/s | raw p50 ms | service img/s | service p50 ms | service / raw |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in raw["rows"]:
            s = srows.get(r["batch_size"])
            svc_cells = (f"{fmt(s['items_per_s'], 0)} | {fmt(s['p50_ms'], 2)} | "
                         f"{fmt(s['items_per_s'] / r['items_per_s'], 2)}" if s else "- | - | -")
            lines.append(f"| {r['batch_size']} | {fmt(r['items_per_s'], 0)} | {fmt(r['p50_ms'], 2)} | {svc_cells} |")
    for part in ("raw", "service", "decode"):
        if err := (f.get(part) or {}).get("error"):
            lines.append(f"- {part}: error: {err}")
    dec = f.get("decode") or {}
    cpu_rows, gpu_rows = (dec.get("cpu") or {}).get("rows") or [], (dec.get("gpu") or {}).get("rows") or []
    if cpu_rows or gpu_rows:
        lines += ["", "| decode + preprocess | img/s | p50 ms | note |", "|---|---:|---:|---|"]
        for r in cpu_rows:
            lines.append(f"| CPU, one thread, {r['image']} | {fmt(r['items_per_s'], 0)} | {fmt(r['p50_ms'], 2)} | "
                         f"x {dec['cpu'].get('usable_cores')} cores = {fmt(r['all_cores_ceiling_per_s'], 0)} |")
        for r in gpu_rows:
            lines.append(f"| GPU decode_jpeg, batch {r['batch_size']}, {r['image']} | {fmt(r['items_per_s'], 0)} | "
                         f"{fmt(r['p50_ms'], 2)} | per batch |")
    return lines


def section_classify(name: str, data: dict[str, Any] | None, raw: list[dict[str, Any]]) -> list[str]:
    lines = ["", f"## /classify end to end (`{name}.json`)", ""]
    rows = classify_rows(data)
    if not rows:
        return [*lines, "- not measured" + (f" ({data['_unreadable']})" if data and "_unreadable" in data else "")]
    data = data or {}
    st = data.get("settings") or {}
    lines.append(f"- {st.get('duration')} s per row after {st.get('warmup')} s warm-up, device {st.get('device')}, "
                 f"max batch {st.get('batch_size')}, wait {st.get('batch_wait_ms')} ms; weights: "
                 + ", ".join(f"{m}: {i.get('weights')}" for m, i in (data.get("models") or {}).items() if i))
    lines += ["", "| model | serving | img/req | c | req/s | img/s | p50 ms | p99 ms | errors | mean batch | raw img/s "
              "at that batch | e2e / raw |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        ref = raw_rate_at(raw, r.get("mean_batch_size"))
        errors = ", ".join(f"{k}: {v}" for k, v in (r.get("errors_by_status") or {}).items()) or "0"
        lines.append(f"| {r.get('model')} | {serving(r)} | {r.get('images_per_request')} | {r['concurrency']} | "
                     f"{fmt(r['requests_per_s'])} | {fmt(r['images_per_s'], 0)} | {fmt(r['p50_ms'])} | "
                     f"{fmt(r['p99_ms'])} | {errors} | {fmt(r.get('mean_batch_size'), 2)} | {fmt(ref, 0)} | "
                     f"{fmt(r['images_per_s'] / ref if ref else None, 3)} |")
    stages = [(f"{r.get('model')}, c={r['concurrency']}", (r.get("extra") or {}).get("stages_ms")) for r in rows]
    if any(st for _, st in stages):
        from bench.classify_load import stage_table

        lines += ["", "Where the time went (means, from the server's histograms):", "", *stage_table(stages)]
    return lines


def section_profile(p: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Where the time went: /classify under torch.profiler (`profile-classify.json`)", ""]
    if not p:
        return [*lines, "- not run"]
    prof, load = p.get("profile") or {}, (p.get("load") or [{}])[0]
    lines += [f"- device {p.get('device')}, concurrency {(p.get('settings') or {}).get('concurrency')}: "
              f"{fmt(load.get('requests_per_s'))} req/s over the load's run, mean batch "
              f"{fmt(load.get('mean_batch_size'), 2)}; profiled window {prof.get('window_s')} s",
              f"- GPU kernels busy {fmt(100 * (prof.get('device_busy_fraction') or 0))}% of the window; torch "
              f"operators' own CPU time {fmt(prof.get('torch_cpu_cores_busy'), 2)} cores on average", "",
              "| operator | calls | self CPU ms | self device ms |", "|---|---:|---:|---:|"]
    rows = (prof.get("top_self_device") or [])[:8] + (prof.get("top_self_cpu") or [])[:8]
    seen = set()
    for r in rows:
        if r["name"] in seen:
            continue
        seen.add(r["name"])
        lines.append(f"| `{r['name'][:60]}` | {r['calls']} | {fmt(r['self_cpu_ms'])} | {fmt(r['self_device_ms'])} |")
    return lines


def section_text(t: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Text (`text.json`)", ""]
    if not t or "_unreadable" in t:
        return [*lines, "- not measured"]
    info = t.get("model_info") or t.get("server_model") or {}
    lines.append(f"- {t.get('model')} ({info.get('weights')}), texts: {(t.get('texts') or {}).get('source')}")
    if t.get("forward"):
        lines += ["", "| forward batch | texts/s | p50 ms | encode ms |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['batch_size']} | {fmt(r['texts_per_s'], 0)} | {fmt(r['p50_ms'], 2)} | "
                  f"{fmt(r['encode_ms'], 2)} |" for r in t["forward"]]
    if t.get("load"):
        lines += ["", "| batching | c | texts/s | p50 ms | p99 ms | errors | mean batch |",
                  "|---|---:|---:|---:|---:|---|---:|"]
        for r in t["load"]:
            errors = ", ".join(f"{k}: {v}" for k, v in (r.get("errors_by_status") or {}).items()) or "0"
            lines.append(f"| {r['batching']} | {r['concurrency']} | {fmt(r['texts_per_s'])} | {fmt(r['p50_ms'])} | "
                         f"{fmt(r['p99_ms'])} | {errors} | {fmt(r.get('mean_batch_size'), 2)} |")
    return lines


def section_style(s: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Style transfer (`style.json`)", ""]
    if not s or "_unreadable" in s:
        return [*lines, "- not measured"]
    m = s.get("meta", {})
    lines += [f"- {m.get('size')} px, {m.get('steps')} steps, device {m.get('device')}, torch {m.get('torch')}; each "
              "variant in a fresh process (time to result includes target set-up, not process start)", "",
              "| variant | time to result s | set-up s | s/step | peak MiB | final loss |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, r in (s.get("results") or {}).items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | |")
            continue
        t = r.get("times") or [0.0]
        per_step = (t[-1] - t[0]) / max(1, len(t) - 1)
        setup = r.get("setup_seconds") if r.get("setup_seconds") is not None else t[0] - per_step
        lines.append(f"| {name} | {fmt(r['seconds'], 2)} | {fmt(setup, 2)} | {fmt(per_step, 4)} | "
                     f"{fmt(r['peak_bytes'] / 2**20, 0)} | {fmt(r['losses'][-1], 4) if r.get('losses') else '-'} |")
    lines += style_job_lines(s.get("results") or {})
    for name, row in (s.get("summary") or {}).items():
        lines.append(f"- {name}: {fmt(row.get('speedup_at_equal_loss'), 2)}x at equal loss")
    return lines


def section_faces(g: dict[str, Any] | None, e: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Faces (`faces-gallery.json`, `faces-e2e.json`)", ""]
    if g and "results" in g:
        lines.append(f"- faiss {g.get('faiss')}, GPUs seen by FAISS {g.get('faiss_gpus')}, GPU search asked: "
                     f"{(g.get('settings') or {}).get('gpu')}")
        lines += ["", "| engine | size | dim | kind | single p50 ms | single p99 ms | batch p50 ms | queries/s | "
                  "recall@1 |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in g["results"].get("search", []):
            lines.append(f"| {r['engine']} | {r['size']} | {r['dim']} | {r['kind']} | {fmt(r['single_p50_ms'], 3)} | "
                         f"{fmt(r['single_p99_ms'], 3)} | {fmt(r['batch_p50_ms'], 2)} | "
                         f"{fmt(r['batch_queries_per_s'], 0)} | {fmt(r['recall_at_1'], 3)} |")
        lines += ["", "| add | size | kind | vectors/s | single enrol p50 ms |", "|---|---:|---|---:|---:|"]
        for r in g["results"].get("add", []):
            lines.append(f"| {r['what']} | {r['size']} | {r['kind']} | {fmt(r['add_per_s'], 0)} | "
                         f"{fmt(r.get('single_enroll_p50_ms'), 2)} |")
    else:
        lines.append("- gallery: not measured")
    if e and e.get("results"):
        lines += ["", "| /faces/identify, gallery | c | req/s | p50 ms | p99 ms | errors |",
                  "|---:|---:|---:|---:|---:|---|"]
        for r in e["results"]:
            errors = ", ".join(f"{k}: {v}" for k, v in (r.get("errors_by_status") or {}).items()) or "0"
            lines.append(f"| {r.get('gallery_size')} | {r['concurrency']} | {fmt(r['requests_per_s'])} | "
                         f"{fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {errors} |")
    else:
        lines.append("- /faces/identify end to end: not measured")
    return lines


def section_abuse(a: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Abuse (`abuse.json`)", ""]
    if not a or "_unreadable" in a:
        return [*lines, "- not measured"]
    if c := a.get("crafted"):
        lines.append(f"- crafted corpus: {c.get('cases')} cases, statuses {c.get('statuses')}, 5xx {c.get('five_xx')}, "
                     f"failures vs expectations {len(c.get('failures') or [])}")
        for f in (c.get("failures") or [])[:5]:
            lines.append(f"  - {json.dumps(f)[:300]}")
    if o := a.get("overload"):
        l503 = o.get("latency_503_ms") or {}
        lines.append(f"- overload ({o.get('clients')} clients, bound {o.get('limit')}, {fmt(o.get('seconds'))} s): "
                     f"{fmt(o.get('ok_per_s'))} accepted/s, {fmt(o.get('shed_per_s'))} shed/s, 503 p50/p99 "
                     f"{fmt(l503.get('p50'))} / {fmt(l503.get('p99'))} ms, right after: "
                     f"{(o.get('right_after') or {}).get('status')}")
    for name, mem in (a.get("memory") or {}).items():
        lines.append(f"- {name}: peak RSS {fmt(mem.get('hwm_mib'), 0)} MiB, alive at end {mem.get('alive_at_end')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--budget-seconds", type=int, default=None)
    p.add_argument("--elapsed-seconds", type=int, default=None)
    args = p.parse_args(argv)
    out: Path = args.out
    d = {name: load(out, name) for name in JSON_FILES}
    steps = read_steps(out)
    junit = read_junit(out / "pytest-cuda.xml")
    raw = ((d.get("forward") or {}).get("raw") or {}).get("rows") or []
    sections: list[tuple[str, Callable[[], list[str]]]] = [
        ("header", lambda: section_header(d["env"], args)),
        ("steps", lambda: section_steps(steps)),
        ("tests", lambda: section_tests(junit)),
        ("goals", lambda: section_goals(d)),
        ("forward", lambda: section_forward(d["forward"])),
        ("classify", lambda: section_classify("classify", d["classify"], raw)),
        ("profile", lambda: section_profile(d["profile-classify"])),
        ("classify-fronts", lambda: section_classify("classify-fronts", d["classify-fronts"], raw)),
        ("classify-before", lambda: section_classify("classify-before", d["classify-before"], raw)),
        ("classify16", lambda: section_classify("classify16", d["classify16"], raw)),
        ("classify16-fronts", lambda: section_classify("classify16-fronts", d["classify16-fronts"], raw)),
        ("text", lambda: section_text(d["text"])),
        ("style", lambda: section_style(d["style"])),
        ("faces", lambda: section_faces(d["faces-gallery"], d["faces-e2e"])),
        ("abuse", lambda: section_abuse(d["abuse"])),
    ]
    lines: list[str] = []
    for name, make in sections:
        try:
            lines += make()
        except Exception as exc:  # a changed JSON layout must not lose the other sections
            lines += ["", f"- ({name}: could not summarise: {type(exc).__name__}: {exc})"]
    lines += ["", "Raw data: the JSON files next to this summary (merged in results.json), logs in logs/. Compare "
              "rows of the same run only."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "steps.json").write_text(json.dumps(steps, indent=2) + "\n")
    merged = {"steps": steps, "pytest_cuda": junit, **{k: v for k, v in d.items() if v is not None}}
    (out / "results.json").write_text(json.dumps(merged, indent=1, default=str) + "\n")
    print(f"wrote {out / 'summary.md'}, {out / 'steps.json'}, {out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
