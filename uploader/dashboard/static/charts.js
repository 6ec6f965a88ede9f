// Charts of the nodes' last day of health: the node page's small charts, with
// program restarts as marks on the same time axis, and the fleet page's
// sparklines.  Drawn with uPlot (static/vendor/uplot, MIT), served by the
// dashboard itself: labs are often offline.  The data comes from
// /api/nodes/<node>/history and /api/history (himbeere/history.py); a null is
// a bucket the node missed, drawn as a gap.  dashboard.js calls in here.
"use strict";

window.himbeereCharts = (function () {
  const FIGURES = [
    { key: "cpu_percent", title: "CPU", unit: " %", digits: 0, range: [0, 100] },
    { key: "memory_used_mb", title: "Memory used", unit: " MB", digits: 0 },
    { key: "temperature", title: "Temperature", unit: " °C", digits: 1 },
    { key: "load", title: "Load (1 min)", unit: "", digits: 2 },
    { key: "disk_free_mb", title: "Disk free", unit: " MB", digits: 0 },
  ];
  const LINE = "#2563eb";
  const FILL = "rgba(37, 99, 235, 0.12)";
  const MARK = "#dc2626";

  async function getJSON(path) {
    const response = await fetch(path, { credentials: "same-origin",
      headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(path + ": " + response.status + " " + response.statusText);
    return response.json();
  }

  function points(values) {
    return values.filter((v) => v !== null && v !== undefined).length;
  }

  // A uPlot plugin: a vertical line at each bucket with restarts.
  function restartMarks(times) {
    return {
      hooks: {
        draw: (u) => {
          const ctx = u.ctx;
          ctx.save();
          ctx.strokeStyle = MARK;
          ctx.lineWidth = 2 * devicePixelRatio;
          for (const t of times) {
            const x = Math.round(u.valToPos(t, "x", true));
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          }
          ctx.restore();
        },
      },
    };
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- the node page ------------------------------------------------------------------
  function nodeCharts(mac, programName) {
    const container = document.getElementById("charts");
    const plots = [];

    function draw(chart) {
      plots.splice(0).forEach((plot) => plot.destroy());
      container.replaceChildren();
      const marks = Array.from(new Set(chart.restarts.map((r) => r[0])));
      const empty = points(chart.time) === 0;
      document.getElementById("no-history").hidden = !empty;
      container.dataset.samples = String(FIGURES.reduce((n, f) => n + points(chart[f.key]), 0));
      if (empty) { showRestarts(chart); return; }
      // uPlot wants a range wider than one point; the current bucket is the right edge.
      const width = Math.max(240, Math.floor((container.clientWidth - 64) / 3));  // 2 gaps, a scrollbar
      for (const figure of FIGURES) {
        const values = chart[figure.key];
        const box = el("figure", "chart");
        box.dataset.figure = figure.key;
        box.dataset.points = String(points(values));
        box.dataset.restarts = String(marks.length);
        const last = values.filter((v) => v !== null).pop();
        box.append(el("figcaption", null, figure.title + (last === undefined ? ": not measured"
          : ": " + Number(last).toFixed(figure.digits) + figure.unit)));
        container.append(box);
        plots.push(new uPlot({
          width: width,
          height: 130,
          legend: { show: false },
          cursor: { y: false },
          scales: { x: { time: true }, y: figure.range ? { range: figure.range } : {} },
          axes: [{ size: 28, font: "11px sans-serif" },
            { size: 46, font: "11px sans-serif",
              values: (u, ticks) => ticks.map((v) => v.toFixed(figure.digits > 1 ? 1 : 0)) }],
          series: [{}, { label: figure.title, stroke: LINE, fill: FILL, width: 1.5,
            spanGaps: false, points: { show: false } }],
          plugins: [restartMarks(marks)],
        }, [chart.time, values], box));
      }
      showRestarts(chart);
    }

    function showRestarts(chart) {
      const list = document.getElementById("restarts");
      const total = {};
      for (const [, program, count] of chart.restarts) {
        total[program] = (total[program] || 0) + count;
      }
      const parts = Object.entries(total).map(([id, n]) => programName(id) + " ×" + n);
      list.textContent = parts.length ? "Restarts (red marks): " + parts.join(", ") : "No restarts.";
    }

    const load = async () => {
      try { draw(await getJSON("/api/nodes/" + mac + "/history")); }
      catch (err) { console.warn(err); }
    };
    load();
    return { reload: load };
  }

  // -- the fleet page -----------------------------------------------------------------
  function sparkline(cell, chart) {
    if (cell._plot) { cell._plot.destroy(); cell._plot = null; }
    cell.replaceChildren();
    const count = chart ? points(chart.values) : 0;
    cell.dataset.points = String(count);
    if (!count) { cell.append(el("span", "hint", "–")); return; }
    const last = chart.values.filter((v) => v !== null).pop();
    cell.title = "CPU over the last 24 hours; now " + Math.round(last) + " %";
    cell._plot = new uPlot({
      width: 120,
      height: 28,
      legend: { show: false },
      cursor: { show: false },
      select: { show: false },
      scales: { x: { time: false }, y: { range: [0, 100] } },
      axes: [{ show: false }, { show: false }],
      series: [{}, { stroke: LINE, fill: FILL, width: 1, points: { show: false } }],
    }, [chart.time, chart.values], cell);
  }

  // Sparklines of the fleet table's rows: all at once, then the nodes whose
  // history changed (each writes it once per 5 minutes), at most every 30 s.
  function fleetSparklines() {
    const cells = new Map();
    const charts = new Map();
    const due = new Set();
    let everything = true;
    let timer = null;

    function schedule(delay) {
      if (timer === null) timer = setTimeout(fetchDue, delay);
    }

    async function fetchDue() {
      const params = new URLSearchParams({ figure: "cpu_percent" });
      if (!everything) Array.from(due).forEach((mac) => params.append("node", String(mac)));
      const all = everything;
      everything = false;
      due.clear();
      try {
        const answer = await getJSON("/api/history?" + params);
        for (const [mac, chart] of Object.entries(answer.nodes)) charts.set(Number(mac), chart);
        for (const [mac, cell] of cells) {
          if (all || String(mac) in answer.nodes) sparkline(cell, charts.get(mac));
        }
      } catch (err) { console.warn(err); }
      timer = setTimeout(() => { timer = null; if (everything || due.size) fetchDue(); }, 30000);
    }

    return {
      attach: (mac, cell) => {
        cells.set(mac, cell);
        if (charts.has(mac)) sparkline(cell, charts.get(mac));
        else { everything = true; schedule(50); }
      },
      detach: (mac) => cells.delete(mac),
      changed: (ids) => {
        for (const id of ids) {
          if (id.startsWith("history:")) due.add(Number(id.slice("history:".length)));
        }
        if (due.size) schedule(1000);
      },
      reload: () => { everything = true; schedule(50); },
    };
  }

  return { FIGURES: FIGURES, nodeCharts: nodeCharts, fleetSparklines: fleetSparklines };
})();
