"""The report's HTML: one page with inline CSS and JS; summary tables and histograms are rendered here, cards
(gallery, per-filter samples, near-duplicates, flagged captions) by the page's script from embedded or chunked rows.
"""

from __future__ import annotations

import html
import json
from typing import Any

from pipeline.report.plan import Plan, StageCost, format_bytes, format_duration

_CSS = """
:root { --ok: #2e7d32; --rej: #b23c17; --mut: #667; --line: #dde; font-family: system-ui, sans-serif; }
body { margin: 0; color: #1c1c28; background: #f6f6f9; }
header { padding: 14px 24px; background: #1c1c28; color: #fff; }
header h1 { margin: 0 0 4px; font-size: 20px; } header .sub { color: #bbc; font-size: 13px; }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line); padding: 6px 24px; }
nav a { margin-right: 14px; color: #334; text-decoration: none; font-size: 14px; }
main { padding: 8px 24px 40px; max-width: 1500px; }
section { margin: 18px 0; } h2 { font-size: 17px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; background: #fff; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; height: 10px; background: #7a8fd6; vertical-align: middle; }
.chips span { display: inline-block; margin: 2px 4px 2px 0; padding: 1px 8px; border-radius: 10px; font-size: 12px; }
.st-done { background: #d9f0da; } .st-notrun { background: #eee; color: var(--mut); }
.st-interrupted, .st-stale { background: #fde2c8; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
svg.hist { background: #fff; border: 1px solid var(--line); }
svg .t { font-size: 11px; font-weight: 600; } svg .xl, svg .yl, svg .thl { font-size: 9px; fill: #556; }
svg .yl, svg .end { text-anchor: end; } svg .axis { stroke: #99a; } svg .pass { fill: #6fae73; }
svg .rej { fill: #d9937a; } svg .thr { stroke: #c00; stroke-width: 1.5; stroke-dasharray: 3 2; } svg .thl { fill: #c00; }
.legend span { margin-right: 12px; font-size: 12px; } .sw { display: inline-block; width: 10px; height: 10px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 10px; }
.card { background: #fff; border: 1px solid var(--line); border-left: 4px solid var(--ok); padding: 6px; font-size: 12px; }
.card.rej { border-left-color: var(--rej); }
.card img, .card .noimg { display: block; width: 100%; height: 72px; object-fit: cover; background: #223; }
.card .noimg { color: #99a; text-align: center; line-height: 72px; }
.card .head { display: flex; justify-content: space-between; gap: 6px; margin-top: 4px; } .card code { font-size: 11px; }
.badge { padding: 0 6px; border-radius: 8px; color: #fff; white-space: nowrap; }
.badge.ok { background: var(--ok); } .badge.rej { background: var(--rej); }
.src, .fr, .dup { color: var(--mut); } .cap { margin: 4px 0; }
.flag { display: inline-block; background: #fde2c8; padding: 0 6px; border-radius: 8px; margin-right: 4px; }
dl.scores { display: grid; grid-template-columns: repeat(3, auto auto); gap: 0 6px; margin: 4px 0 0; color: #445; }
dl.scores dt { color: var(--mut); } dl.scores dd { margin: 0; font-variant-numeric: tabular-nums; }
.controls { display: flex; gap: 8px; align-items: center; margin: 6px 0 10px; flex-wrap: wrap; font-size: 13px; }
.group { display: flex; gap: 8px; overflow-x: auto; padding: 6px; background: #ecebf3; margin-bottom: 8px; }
.group .card { min-width: 300px; max-width: 300px; }
.note { color: var(--mut); font-size: 13px; } .error { color: #c00; }
pre { background: #fff; border: 1px solid var(--line); padding: 8px; font-size: 12px; max-height: 480px; overflow: auto; }
"""

_JS = r"""
(function () {
"use strict";
const M = JSON.parse(document.getElementById("report-meta").textContent);
const store = {}, waiting = {};
// Data files call recapData(name, payload): <script> loading works from file:// where fetch() is refused.
window.recapData = function (name, payload) {
  store[name] = payload;
  (waiting[name] || []).forEach((w) => w.resolve(payload));
  delete waiting[name];
};
function load(name) {
  if (name in store) return Promise.resolve(store[name]);
  return new Promise((resolve, reject) => {
    if (waiting[name]) { waiting[name].push({ resolve, reject }); return; }
    waiting[name] = [{ resolve, reject }];
    const s = document.createElement("script");
    s.src = "data/" + encodeURIComponent(name) + ".js";
    s.onerror = () => {
      (waiting[name] || []).forEach((w) => w.reject(new Error("cannot load data/" + name + ".js")));
      delete waiting[name];
    };
    document.head.appendChild(s);
  });
}
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null) continue;
    if (k === "text") e.textContent = v; else if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}
function fmt(x) { return x == null ? "-" : (Math.abs(x) >= 1000 ? x.toFixed(0) : String(+Number(x).toPrecision(3))); }
function card(row) {
  const c = el("article", { class: "card " + (row.p ? "ok" : "rej"), "data-clip": row.id });
  c.append(row.img ? el("img", { src: row.img, alt: "frames of " + row.id, loading: "lazy" })
                   : el("div", { class: "noimg", text: "no preview" }));
  c.append(el("div", { class: "head" }, el("code", { text: row.id }),
    el("span", { class: "badge " + (row.p ? "ok" : "rej"), text: row.p ? "passed" : (row.r || "rejected") })));
  c.append(el("div", { class: "src", text: row.v + " · " + fmt(row.t[0]) + "-" + fmt(row.t[1]) + " s" +
    (row.cm ? " · " + row.cm : "") }));
  if (row.fr && row.fr.length > 1) c.append(el("div", { class: "fr", text: "fails: " + row.fr.join(", ") }));
  if (row.d) c.append(el("div", { class: "dup", text: "near-duplicate of " + row.d }));
  if (row.c) c.append(el("p", { class: "cap", text: row.c }));
  if (row.f) c.append(el("div", { class: "flags" }, ...row.f.map((f) => el("span", { class: "flag", text: f }))));
  const sc = el("dl", { class: "scores" });
  for (const n of M.scores) if (row.s[n] != null) sc.append(el("dt", { text: n }), el("dd", { text: fmt(row.s[n]) }));
  c.append(sc);
  return c;
}

// Gallery: the natural order reads one chunk per page; a filter or sort first loads the small key columns.
const G = { filter: "all", sort: "", page: 0, key: null, order: null, token: 0 };
const gallery = document.getElementById("gallery"), info = document.getElementById("gallery-info");
const prev = document.getElementById("prev"), next = document.getElementById("next");
const chunkName = (k) => "clips-" + String(k).padStart(4, "0");
async function viewOrder() {
  if (G.filter === "all" && !G.sort) return null;
  const key = G.filter + "|" + G.sort;
  if (G.key === key) return G.order;
  let idx = Array.from({ length: M.total }, (_, i) => i);
  if (G.filter !== "all") {
    const st = await load("col-status");
    const code = M.reasons.indexOf(G.filter.slice("reason:".length)) + 1;
    const keep = G.filter === "passed" ? (c) => c === 0 : G.filter === "rejected" ? (c) => c !== 0 : (c) => c === code;
    idx = idx.filter((i) => keep(st[i]));
  }
  if (G.sort) {
    const [name, dir] = G.sort.split(":");
    const v = await load("col-" + name), sign = dir === "desc" ? -1 : 1;
    idx.sort((a, b) => {
      const x = v[a], y = v[b];
      if (x == null) return y == null ? a - b : 1;
      if (y == null) return -1;
      return (x - y) * sign || a - b;
    });
  }
  G.key = key; G.order = idx;
  return idx;
}
async function showPage() {
  const token = ++G.token;
  try {
    const idx = await viewOrder();
    const n = idx ? idx.length : M.total, pages = Math.max(1, Math.ceil(n / M.page_size));
    G.page = Math.max(0, Math.min(G.page, pages - 1));
    let rows;
    if (!idx) {
      rows = await load(chunkName(G.page));
    } else {
      const want = idx.slice(G.page * M.page_size, (G.page + 1) * M.page_size);
      const ks = [...new Set(want.map((i) => Math.floor(i / M.page_size)))];
      const byIdx = new Map();
      (await Promise.all(ks.map((k) => load(chunkName(k))))).forEach((rs) => rs.forEach((r) => byIdx.set(r.i, r)));
      rows = want.map((i) => byIdx.get(i));
    }
    if (token !== G.token) return;
    gallery.replaceChildren(...(rows.length ? rows.map(card) : [el("p", { class: "note", text: "no clips" })]));
    info.textContent = "page " + (G.page + 1) + " of " + pages + " · " + n + " clips";
    prev.disabled = G.page === 0; next.disabled = G.page >= pages - 1;
    gallery.dataset.ready = "1";
  } catch (err) {
    gallery.replaceChildren(el("p", { class: "error", text: String(err && err.message || err) }));
  }
}
const filterSel = document.getElementById("filter"), sortSel = document.getElementById("sort");
filterSel.append(el("option", { value: "all", text: "all clips (" + M.total + ")" }),
  el("option", { value: "passed", text: "passed (" + M.passed + ")" }),
  el("option", { value: "rejected", text: "rejected (" + (M.total - M.passed) + ")" }),
  ...M.reasons.map((r) => el("option", { value: "reason:" + r, text: r + " (" + M.reason_counts[r] + ")" })));
sortSel.append(el("option", { value: "", text: "clip order" }),
  ...M.scores.flatMap((n) => [el("option", { value: n + ":asc", text: n + " ascending" }),
                              el("option", { value: n + ":desc", text: n + " descending" })]));
filterSel.onchange = () => { G.filter = filterSel.value; G.page = 0; showPage(); };
sortSel.onchange = () => { G.sort = sortSel.value; G.page = 0; showPage(); };
prev.onclick = () => { G.page -= 1; showPage(); };
next.onclick = () => { G.page += 1; showPage(); };
showPage();

// Bounded samples embedded in the page.
const filters = document.getElementById("filters");
for (const f of M.filters) {
  filters.append(el("h3", { text: f.reason + ": " + f.dropped + " dropped (first failure), " + f.failing +
    " failing it in all" }), el("div", { class: "cards" }, ...f.sample.map(card)));
}
if (!M.filters.length) filters.append(el("p", { class: "note", text: "no clip was rejected" }));
const dups = document.getElementById("duplicates");
for (const g of M.duplicate_groups) {
  dups.append(el("div", { class: "group", "data-group": g.kept },
    g.kept_row ? card(g.kept_row) : el("div", { class: "note", text: "kept: " + g.kept }), ...g.duplicates.map(card)));
}
if (!M.duplicate_groups.length) dups.append(el("p", { class: "note", text: "no near-duplicates" }));
const flagged = document.getElementById("flagged");
if (M.flagged.length) flagged.append(el("div", { class: "cards" }, ...M.flagged.map(card)));
})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset(), attrs: str = "") -> str:
    head = "".join(f"<th{' class=n' if i in numeric else ''}>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i in numeric else ''}>{cell}</td>" for i, cell in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _hours(h: float | None) -> str:
    return "" if h is None else f"{h:,.2f} h" if h >= 1 else f"{h * 60:,.1f} min"


def _funnel_html(funnel: list[dict[str, Any]]) -> str:
    top = max((f["count"] for f in funnel), default=1) or 1
    rows = []
    for f in funnel:
        width = round(160 * f["count"] / top)
        rows.append(
            f'<tr data-key="{_e(f["key"])}"><td>{_e(f["label"])}</td>'
            f'<td class="n count" data-key="{_e(f["key"])}">{f["count"]:,}</td><td class="n">{_hours(f["hours"])}</td>'
            f'<td><span class="bar" style="width:{width}px"></span></td></tr>'
        )
    return (
        '<table id="funnel"><thead><tr><th>stage</th><th class=n>count</th><th class=n>duration</th><th></th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _stages_html(stages: list[dict[str, Any]], costs: list[StageCost]) -> str:
    chips = "".join(
        f'<span class="st-{s["status"].replace(" ", "")}" data-stage="{s["stage"]}" data-status="{_e(s["status"])}">'
        f"{s['stage']}: {_e(s['status'])}</span>"
        for s in stages
    )
    by_stage = {c.stage: c for c in costs}
    rows = []
    for s in stages:
        cost = by_stage.get(s["stage"])
        rows.append(
            [
                _e(s["stage"]),
                _e(s["status"]),
                "" if s["seconds"] is None else f"{s['seconds']:,.1f}",
                _e(", ".join(f"{k} {v:,}" for k, v in s["counts"].items())),
                "" if cost is None else f"{cost.cpus:g} CPU" + (f" + {cost.gpus:g} GPU" if cost.gpus else ""),
                "" if cost is None else f"{cost.cpu_s_per_video_hour / 3600:,.2f}",
                "" if cost is None or not cost.gpus else f"{cost.gpu_s_per_video_hour / 3600:,.2f}",
            ]
        )
    table = _table(
        ["stage", "status", "seconds", "counts", "held", "CPU-h per video-h", "GPU-h per video-h"],
        rows,
        numeric={2, 5, 6},
        attrs='id="stage-timings"',
    )
    return f'<div class="chips" id="stages-ran">{chips}</div>{table}'


def _plan_html(plan: Plan | None, video_hours: float) -> str:
    if plan is None:
        return (
            '<p class="note">No projection requested: <code>recap report OUT --plan HOURS_OF_VIDEO --gpus N --cpus M'
            f"</code> projects from this run's measured throughput ({video_hours * 60:,.1f} min of video measured).</p>"
        )
    rows = [
        [_e(s.stage), format_duration(s.wall_s), f"{s.cpu_hours:,.1f}", f"{s.gpu_hours:,.1f}", s.bound_by]
        for s in plan.stages
    ]
    rows.append(["<b>total</b>", f"<b>{format_duration(plan.wall_s)}</b>", "", "", ""])
    parts = [
        f"<p>{plan.video_hours:,.1f} h of video on <b>{plan.gpus}</b> GPU(s) and <b>{plan.cpus}</b> CPU(s): "
        f'<b id="plan-total">{format_duration(plan.wall_s)}</b>, bounded by <b id="plan-bound">'
        f"{_e(plan.bounding_stage or '-')}</b>. Held for that time: {plan.wall_s / 3600 * plan.gpus:,.1f} GPU-h and "
        f"{plan.wall_s / 3600 * plan.cpus:,.1f} CPU-h.</p>",
        _table(["stage", "wall time", "CPU-h", "GPU-h", "bound by"], rows, numeric={1, 2, 3}, attrs='id="plan"'),
    ]
    parts += [f'<p class="error">cannot run: {_e(t)}</p>' for t in plan.infeasible]
    if plan.missing_stages:
        parts.append(f'<p class="note">not measured (did not run): {_e(", ".join(plan.missing_stages))}</p>')
    if plan.storage:
        parts.append(
            f"<p>Latent shards: <b id=plan-storage>{format_bytes(plan.storage_bytes)}</b> for "
            f"{plan.expected_samples or 0:,.0f} samples, by bucket:</p>"
        )
        parts.append(
            _table(
                ["bucket (latent shape)", "samples", "bytes per sample", "storage"],
                [
                    [
                        _e(b["bucket"]),
                        f"{b['samples']:,.0f}",
                        format_bytes(b["bytes_per_sample"]),
                        format_bytes(b["bytes"]),
                    ]
                    for b in plan.storage
                ],
                numeric={1, 2, 3},
            )
        )
    elif plan.expected_samples is not None:
        parts.append(
            f"<p>Expected samples: {plan.expected_samples:,.0f}; latent storage not estimated: encode has not run.</p>"
        )
    parts += [f'<p class="note">{_e(n)}</p>' for n in plan.notes]
    return "".join(parts)


def _json_for_script(data: Any) -> str:
    # "</" would end the <script> element early; "\u003c/" is the same string to JSON.parse
    return json.dumps(data, separators=(",", ":")).replace("</", "\\u003c/")


def render_page(
    meta: dict[str, Any],
    funnel: list[dict[str, Any]],
    stages: list[dict[str, Any]],
    rejects: list[dict[str, Any]],
    histograms: list[str],
    empty_scores: list[str],
    buckets: list[dict[str, Any]],
    costs: list[StageCost],
    plan: Plan | None,
    run: dict[str, Any],
    video_hours: float,
) -> str:
    ran = [s["stage"] for s in stages if s["status"] != "not run"]
    partial = len(ran) < len(stages)
    rejects_html = (
        _table(
            ["stage", "reason", "count"],
            [[_e(r["stage"]), _e(r["reason"]), f"{r['count']:,}"] for r in rejects],
            numeric={2},
            attrs='id="rejects"',
        )
        if rejects
        else '<p class="note">no rejects recorded</p>'
    )
    buckets_html = (
        _table(
            ["bucket (latent shape)", "samples", "bytes per sample", "total"],
            [[_e(b["bucket"]), f"{b['samples']:,}", format_bytes(b["bytes_per_sample"]), b["size"]] for b in buckets],
            numeric={1, 2, 3},
            attrs='id="buckets"',
        )
        if buckets
        else '<p class="note">no samples: encode has not run</p>'
    )
    flag_html = (
        _table(["flag", "captions"], [[_e(k), f"{v:,}"] for k, v in meta["flag_counts"].items()], numeric={1})
        if meta["flag_counts"]
        else '<p class="note">no flagged captions</p>'
    )
    config = json.dumps(run.get("config") or {}, indent=2, sort_keys=True)
    versions = _table(["package", "version"], [[_e(k), _e(v)] for k, v in (run.get("versions") or {}).items()])
    partial_note = (
        f'<p class="note" id="partial">Partial corpus: stages run so far: {_e(", ".join(ran) or "none")}.</p>'
        if partial
        else ""
    )
    fallback = ((run.get("stages") or {}).get("encode") or {}).get("vae_fallback_note")
    if fallback:
        partial_note += f'<p class="note warn" id="vae-fallback">Warning: {_e(fallback)}.</p>'
    stale = [s["stage"] for s in stages if s["status"] == "stale"]
    if stale:
        from pipeline.manifest import stale_note

        partial_note += f'<p class="note" id="stale">{_e(stale_note(stale))}.</p>'

    empty_html = (
        f'<p class="note" id="empty-scores">No values (scorer off in this run): {_e(", ".join(empty_scores))}</p>'
        if empty_scores
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>recap report: {_e(meta["corpus"])}</title>
<link rel="icon" href="data:,">
<style>{_CSS}</style></head>
<body>
<header><h1>recap corpus report</h1>
<div class="sub">{_e(meta["corpus"])} · generated {_e(meta["generated_at"])} · {meta["total"]:,} clips</div></header>
<nav><a href="#summary">Summary</a><a href="#distributions">Distributions</a><a href="#gallery-section">Gallery</a>
<a href="#filters-section">Filters</a><a href="#duplicates-section">Near-duplicates</a><a href="#captions">Captions</a>
<a href="#projection">Projection</a><a href="#run">Run</a></nav>
<main>
<section id="summary"><h2>Summary</h2>{partial_note}
<h3>Funnel</h3>{_funnel_html(funnel)}
<h3>Stages</h3>{_stages_html(stages, costs)}
<h3>Rejects by stage and reason</h3>{rejects_html}</section>
<section id="distributions"><h2>Distributions</h2>
<div class="legend"><span><i class="sw" style="background:#6fae73"></i> passed</span>
<span><i class="sw" style="background:#d9937a"></i> rejected</span><span style="color:#c00">- - threshold</span></div>
<div class="grid">{"".join(histograms)}</div>{empty_html}
<h3>Latent shapes (buckets)</h3>{buckets_html}</section>
<section id="gallery-section"><h2>Gallery</h2>
<div class="controls"><label>show <select id="filter"></select></label><label>sort by <select id="sort"></select></label>
<button id="prev">&larr; previous</button><button id="next">next &rarr;</button><span id="gallery-info"></span></div>
<div id="gallery" class="cards"></div></section>
<section id="filters-section"><h2>Filters: what each one dropped</h2><div id="filters"></div></section>
<section id="duplicates-section"><h2>Near-duplicate groups</h2>
<p class="note">{meta["duplicate_group_count"]:,} group(s); the kept clip first, then the clips dropped as its duplicates.</p>
<div id="duplicates"></div></section>
<section id="captions"><h2>Flagged captions</h2>{flag_html}<div id="flagged"></div></section>
<section id="projection"><h2>Projection</h2>{_plan_html(plan, video_hours)}</section>
<section id="run"><h2>Run</h2><h3>Versions</h3>{versions}
<details><summary>Resolved config</summary><pre>{_e(config)}</pre></details></section>
</main>
<script type="application/json" id="report-meta">{_json_for_script(meta)}</script>
<script>{_JS}</script>
</body></html>
"""
