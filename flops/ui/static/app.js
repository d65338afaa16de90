// FLOps web view: renders the snapshots the server pushes (server-sent events). Plain DOM and SVG, no
// build step, nothing fetched from elsewhere. Every value is set as text, never parsed as HTML.
"use strict";

const STAGES = ["preparation", "start", "builder", "learners", "aggregation", "post_training", "finished"];

function el(tag, attrs, ...children) {
  const svg = ["svg", "g", "line", "polyline", "circle", "text", "rect", "title"].includes(tag);
  const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
}

function num(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function clock(ts) {
  return ts ? new Date(ts * 1000).toLocaleTimeString() : "";
}

function badge(stage, outcome) {
  const label = outcome ? `${stage} · ${outcome}` : stage;
  return el("span", { class: `badge ${outcome || "active"}`, "data-testid": "stage", text: label });
}

// --- projects list -------------------------------------------------------------------------------

function renderProjects(main, data) {
  const rows = data.projects;
  const table = el(
    "table",
    { id: "projects", class: "grid" },
    el("caption", { text: `${rows.length} project${rows.length === 1 ? "" : "s"}` }),
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        ...["Project", "Stage", "Round", "Accuracy", "Customer", "Submitted", "Age", "Reason"].map((h) =>
          el("th", { scope: "col", text: h }),
        ),
      ),
    ),
    el(
      "tbody",
      {},
      ...rows.map((p) =>
        el(
          "tr",
          { "data-project": p.project_id, "data-stage": p.stage, "data-outcome": p.outcome || "" },
          el("td", {}, el("a", { href: `/projects/${encodeURIComponent(p.project_id)}`, text: p.project_id })),
          el("td", {}, badge(p.stage, p.outcome)),
          el("td", { text: p.rounds ? `${p.round}/${p.rounds}` : "" }),
          el("td", { text: p.accuracy === null ? "" : num(p.accuracy) }),
          el("td", { text: p.customer || "" }),
          el("td", { text: clock(p.submitted_at) }),
          el("td", { text: seconds(p.age_s) }),
          el("td", { class: "reason", text: p.reason && p.outcome !== "completed" ? p.reason : "" }),
        ),
      ),
    ),
  );
  main.replaceChildren(el("h1", { text: "Projects" }), rows.length ? table : el("p", { text: "No projects yet." }));
}

// --- one project ---------------------------------------------------------------------------------

function renderProject(main, p, receivedAt) {
  if (!p) {
    main.replaceChildren(el("h1", { text: document.body.dataset.project }), el("p", { text: "No such project (yet)." }));
    return;
  }
  const parts = [
    el("h1", {}, `Project ${p.project_id} `, badge(p.stage, p.outcome)),
    facts(p),
    p.failure ? failure(p.failure) : null,
    el("h2", { text: "Stages" }),
    timeline(p, receivedAt),
    el("h2", { text: "Training" }),
    p.hierarchical ? clusterPlot(p) : plot(p),
    p.hierarchical ? clusterTable(p) : roundsTable(p),
    el("h2", { text: "Agents" }),
    agentsTable(p),
    el("h2", { text: "Events" }),
    eventsList(p),
  ];
  main.replaceChildren(...parts.filter(Boolean));
}

function facts(p) {
  const items = [
    ["Customer", p.customer || ""],
    ["Submitted", clock(p.submitted_at)],
    ["Duration", seconds(p.duration_s)],
    ["Round", p.rounds ? `${p.round} of ${p.rounds}` : "–"],
    ["Accuracy", num(p.accuracy)],
    ["Loss", num(p.loss)],
  ];
  const dl = el("dl", { class: "facts" });
  for (const [k, v] of items) dl.append(el("dt", { text: k }), el("dd", { text: v }));
  if (p.model_url) {
    dl.append(el("dt", { text: "Model" }), el("dd", {}, el("a", { id: "model-url", href: p.model_url, text: p.model_url })));
  }
  const t = p.tracking;
  if (t && (t.run_url || t.url)) {
    const href = t.run_url || t.experiment_url || t.url;
    const label = t.run_url ? `best run in MLflow${t.model_version ? ` (model version ${t.model_version})` : ""}` : t.experiment || "MLflow";
    dl.append(el("dt", { text: "MLflow" }), el("dd", {}, el("a", { id: "mlflow-link", href, text: label })));
    for (const w of t.warnings || []) dl.append(el("dt", { text: "Tracking" }), el("dd", { class: "warn", text: w }));
  }
  return dl;
}

function failure(f) {
  return el(
    "section",
    { id: "failure", class: "failure", role: "alert" },
    el("h2", { text: `Failed${f.stage ? ` in ${f.stage}` : ""}` }),
    el("p", { id: "failure-reason", text: f.reason || "" }),
    f.log_tail ? el("pre", { id: "log-tail", "aria-label": "log tail", text: f.log_tail }) : null,
  );
}

function timeline(p, receivedAt) {
  // A Gantt row per stage: where its bar starts is when the stage started, its width how long it took.
  const rows = p.timeline;
  const extra = Date.now() / 1000 - receivedAt;
  const secsOf = (r) => r.seconds + (r.current ? extra : 0);
  const t0 = rows.length ? rows[0].started_at : 0;
  const span = Math.max(1e-6, ...rows.map((r) => r.started_at + secsOf(r) - t0));
  const list = el("ol", { id: "timeline", class: "timeline", "aria-label": "stages, when each started and how long it took" });
  for (const r of rows) {
    const secs = secsOf(r);
    const bar = el("span", { class: "bar", "aria-hidden": "true" });
    if (r.stage !== "finished") {
      const fill = el("span", {});
      // Set through the CSS object model: the Content-Security-Policy forbids inline style attributes.
      fill.style.setProperty("margin-left", `${(100 * (r.started_at - t0)) / span}%`);
      fill.style.setProperty("width", `${Math.max(0.5, (100 * secs) / span)}%`);
      bar.append(fill);
    }
    list.append(
      el(
        "li",
        { "data-stage": r.stage, class: r.current ? "current" : "" },
        el("span", { class: "name", text: r.stage }),
        el("span", { class: "when", text: clock(r.started_at) }),
        bar,
        el("span", { class: "took", text: r.stage === "finished" ? "" : seconds(secs) + (r.current ? " so far" : "") }),
      ),
    );
  }
  const seen = new Set(rows.map((r) => r.stage));
  for (const stage of STAGES) {
    if (!seen.has(stage) && !p.outcome) {
      list.append(el("li", { class: "pending", "data-pending": stage }, el("span", { class: "name", text: stage })));
    }
  }
  return list;
}

function plot(p) {
  const rounds = p.rounds_seen;
  const W = 640, H = 260, L = 48, R = 48, T = 16, B = 36;
  const n = Math.max(p.rounds || 0, rounds.length ? rounds[rounds.length - 1].round : 0, 1);
  const losses = rounds.map((r) => r.loss).filter((x) => x !== null && x !== undefined);
  const maxLoss = Math.max(1e-9, ...losses) * 1.1;
  const x = (k) => L + ((W - L - R) * (n === 1 ? 0.5 : (k - 1) / (n - 1)));
  const yAcc = (a) => T + (H - T - B) * (1 - a);
  const yLoss = (l) => T + (H - T - B) * (1 - l / maxLoss);
  const svg = el("svg", {
    id: "plot", viewBox: `0 0 ${W} ${H}`, role: "img", class: "plot",
    "aria-label": `accuracy and loss per round, ${rounds.length} round(s) so far`,
  });
  const axes = el("g", { class: "axes" });
  axes.append(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B }), el("line", { x1: L, y1: T, x2: L, y2: H - B }),
    el("line", { x1: W - R, y1: T, x2: W - R, y2: H - B }));
  for (const a of [0, 0.5, 1]) axes.append(el("text", { x: L - 6, y: yAcc(a) + 4, class: "tick acc", "text-anchor": "end", text: a.toFixed(1) }));
  for (const f of [0, 0.5, 1]) axes.append(el("text", { x: W - R + 6, y: yLoss(f * maxLoss) + 4, class: "tick loss", text: (f * maxLoss).toFixed(2) }));
  for (let k = 1; k <= n; k++) axes.append(el("text", { x: x(k), y: H - B + 16, class: "tick", "text-anchor": "middle", text: k }));
  axes.append(el("text", { x: (L + W - R) / 2, y: H - 4, class: "label", "text-anchor": "middle", text: "round" }));
  svg.append(axes);
  const series = [
    ["acc", "accuracy", (r) => r.accuracy, yAcc],
    ["loss", "loss", (r) => r.loss, yLoss],
  ];
  for (const [cls, name, get, y] of series) {
    const pts = rounds.filter((r) => get(r) !== null && get(r) !== undefined);
    svg.append(el("polyline", { class: `line ${cls}`, points: pts.map((r) => `${x(r.round)},${y(get(r))}`).join(" ") }));
    for (const r of pts) {
      svg.append(el("circle", { class: `pt ${cls}`, cx: x(r.round), cy: y(get(r)), r: 4, "data-round": r.round },
        el("title", { text: `round ${r.round}: ${name} ${num(get(r))}` })));
    }
  }
  const legend = el("p", { class: "legend" }, el("span", { class: "key acc", text: "accuracy (left axis)" }), " ",
    el("span", { class: "key loss", text: "loss (right axis)" }));
  return el("figure", { class: "chart" }, svg, legend);
}

// Hierarchical mode: one colour per cluster (accuracy solid, loss dashed) and the root's global model per cycle.
const CLUSTER_COLOURS = ["#0b5cad", "#b35900", "#1a7f37", "#8250df", "#b42318", "#57606a"];

function clusterPlot(p) {
  const h = p.hierarchical;
  const names = Object.keys(h.clusters_seen).sort();
  const perCycle = Math.max(h.rounds_per_cycle || 0, 1);
  const all = names.flatMap((c) => h.clusters_seen[c]);
  const W = 640, H = 260, L = 48, R = 48, T = 16, B = 36;
  const n = Math.max((h.cycles || 0) * perCycle, ...all.map((r) => r.step), 1);
  const losses = [...all, ...h.cycles_seen].map((r) => r.loss).filter((x) => x !== null && x !== undefined);
  const maxLoss = Math.max(1e-9, ...losses) * 1.1;
  const x = (k) => L + ((W - L - R) * (n === 1 ? 0.5 : (k - 1) / (n - 1)));
  const yAcc = (a) => T + (H - T - B) * (1 - a);
  const yLoss = (l) => T + (H - T - B) * (1 - l / maxLoss);
  const svg = el("svg", {
    id: "plot", viewBox: `0 0 ${W} ${H}`, role: "img", class: "plot",
    "aria-label": `accuracy and loss per cluster round, ${names.length} cluster(s), ${h.cycles_seen.length} of ${h.cycles} cycle(s) done; the table below lists every point`,
  });
  const axes = el("g", { class: "axes" });
  axes.append(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B }), el("line", { x1: L, y1: T, x2: L, y2: H - B }),
    el("line", { x1: W - R, y1: T, x2: W - R, y2: H - B }));
  for (const a of [0, 0.5, 1]) axes.append(el("text", { x: L - 6, y: yAcc(a) + 4, class: "tick acc", "text-anchor": "end", text: a.toFixed(1) }));
  for (const f of [0, 0.5, 1]) axes.append(el("text", { x: W - R + 6, y: yLoss(f * maxLoss) + 4, class: "tick loss", text: (f * maxLoss).toFixed(2) }));
  for (let k = 1; k <= n; k++) {
    const cycle = Math.ceil(k / perCycle), rnd = k - (cycle - 1) * perCycle;
    axes.append(el("text", { x: x(k), y: H - B + 16, class: "tick", "text-anchor": "middle", text: `${cycle}.${rnd}` }));
  }
  axes.append(el("text", { x: (L + W - R) / 2, y: H - 4, class: "label", "text-anchor": "middle", text: "cycle.round" }));
  svg.append(axes);
  const legend = el("p", { class: "legend" });
  names.forEach((name, i) => {
    const colour = CLUSTER_COLOURS[i % CLUSTER_COLOURS.length];
    const pts = h.clusters_seen[name];
    const g = el("g", { class: "series", "data-cluster": name });
    for (const [get, y, what, dash] of [[(r) => r.accuracy, yAcc, "accuracy", null], [(r) => r.loss, yLoss, "loss", "5 3"]]) {
      const some = pts.filter((r) => get(r) !== null && get(r) !== undefined);
      g.append(el("polyline", { class: "line", stroke: colour, "stroke-dasharray": dash, points: some.map((r) => `${x(r.step)},${y(get(r))}`).join(" ") }));
      for (const r of some) {
        g.append(el("circle", { class: "pt", fill: colour, cx: x(r.step), cy: y(get(r)), r: 3.5, "data-cycle": r.cycle, "data-round": r.round },
          el("title", { text: `cluster ${name}, cycle ${r.cycle} round ${r.round}: ${what} ${num(get(r))}` })));
      }
    }
    svg.append(g);
    legend.append(el("span", { class: "key cluster", "data-cluster": name },
      el("svg", { width: 22, height: 8, "aria-hidden": "true" }, el("line", { x1: 0, y1: 4, x2: 22, y2: 4, stroke: colour, "stroke-width": 3 })),
      ` cluster ${name} `));
  });
  for (const c of h.cycles_seen) {
    if (c.accuracy === null || c.accuracy === undefined) continue;
    svg.append(el("rect", { class: "root", x: x(c.cycle * perCycle) - 4, y: yAcc(c.accuracy) - 4, width: 8, height: 8, "data-cycle": c.cycle },
      el("title", { text: `cycle ${c.cycle}: global model accuracy ${num(c.accuracy)}, loss ${num(c.loss)}` })));
  }
  legend.append(el("span", { class: "key plain" }, "— accuracy (left axis), - - loss (right axis), ",
    el("span", { class: "root-key", "aria-hidden": "true", text: "■" }), " global model after each cycle"));
  return el("figure", { class: "chart" }, svg, legend);
}

function clusterTable(p) {
  const h = p.hierarchical;
  const rows = [];
  for (const c of h.cycles_seen) rows.push({ who: "global model", ...c, round: "", step: c.cycle * h.rounds_per_cycle + 0.5 });
  for (const [name, pts] of Object.entries(h.clusters_seen)) for (const r of pts) rows.push({ who: `cluster ${name}`, ...r });
  if (!rows.length) return el("p", { id: "no-rounds", text: "No rounds yet." });
  rows.sort((a, b) => a.step - b.step || a.who.localeCompare(b.who));
  return el(
    "table",
    { id: "rounds", class: "grid" },
    el("caption", { text: "Cluster rounds and cycles seen by this view" }),
    el("thead", {}, el("tr", {}, ...["Cycle", "Round", "Series", "Accuracy", "Loss", "Examples", "At"].map((h2) => el("th", { scope: "col", text: h2 })))),
    el("tbody", {}, ...rows.map((r) =>
      el("tr", { "data-cycle": r.cycle, "data-round": r.round, "data-of": r.who },
        el("td", { text: r.cycle }), el("td", { text: r.round }), el("th", { scope: "row", text: r.who }),
        el("td", { text: num(r.accuracy) }), el("td", { text: num(r.loss) }), el("td", { text: r.examples ?? "" }), el("td", { text: clock(r.ts) })))),
  );
}

function roundsTable(p) {
  if (!p.rounds_seen.length) return el("p", { id: "no-rounds", text: "No rounds yet." });
  const t = p.tracking || {};
  const runs = t.run_ids || {};
  const runLink = (r) =>
    runs[r.round] && t.experiment_url
      ? el("a", { href: `${t.experiment_url}/runs/${encodeURIComponent(runs[r.round])}`, text: "MLflow run" })
      : "";
  return el(
    "table",
    { id: "rounds", class: "grid" },
    el("caption", { text: "Rounds seen by this view" }),
    el("thead", {}, el("tr", {}, ...["Round", "Accuracy", "Loss", "Examples", "Took", "At", p.tracking ? "Tracking" : null]
      .filter(Boolean).map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...p.rounds_seen.map((r) =>
      el("tr", { "data-round": r.round }, el("td", { text: r.round }), el("td", { text: num(r.accuracy) }), el("td", { text: num(r.loss) }),
        el("td", { text: r.examples ?? "" }), el("td", { text: seconds(r.duration_s) }), el("td", { text: clock(r.ts) }),
        p.tracking ? el("td", {}, runLink(r)) : null))),
  );
}

function agentsTable(p) {
  if (!p.agents.length) return el("p", { text: "No agents involved yet." });
  return el(
    "table",
    { id: "agents", class: "grid" },
    el("thead", {}, el("tr", {}, ...["Agent", "Roles", "Learner ready", "Examples", "Liveness"].map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...p.agents.map((a) => {
      const live = a.online === null ? "unknown" : a.online ? "online" : "offline";
      return el("tr", { "data-agent": a.agent_id },
        el("td", { text: a.agent_id }), el("td", { text: a.roles.join(", ") }), el("td", { text: a.ready ? "yes" : "" }),
        el("td", { text: a.examples ?? "" }),
        el("td", {}, el("span", { class: `dot ${live}`, "aria-hidden": "true" }), ` ${live}`));
    })),
  );
}

function eventsList(p) {
  const list = el("ol", { id: "events", class: "events", reversed: true });
  for (const e of [...p.events].reverse()) {
    list.append(el("li", { class: e.kind.replace(".", "-") }, el("time", { text: clock(e.ts) }), " ", el("span", { text: e.message })));
  }
  return list;
}

// --- live updates --------------------------------------------------------------------------------

function start() {
  const page = document.body.dataset.page;
  const project = document.body.dataset.project;
  const main = document.getElementById("main");
  const live = document.getElementById("live");
  const url = page === "project" ? `/api/stream?project=${encodeURIComponent(project)}` : "/api/stream";
  let last = null;
  let receivedAt = Date.now() / 1000;
  const render = () => {
    if (last === undefined) return;
    if (page === "project") renderProject(main, last, receivedAt);
    else if (last) renderProjects(main, last);
  };
  const source = new EventSource(url);
  source.addEventListener("snapshot", (ev) => {
    last = JSON.parse(ev.data);
    receivedAt = Date.now() / 1000;
    live.textContent = "live";
    live.className = "live on";
    render();
  });
  source.onerror = () => {
    live.textContent = "reconnecting…";
    live.className = "live off";
  };
  // The current stage's "so far" keeps counting between snapshots.
  setInterval(() => {
    if (page === "project" && last && !last.outcome) render();
  }, 1000);
}

document.addEventListener("DOMContentLoaded", start);
