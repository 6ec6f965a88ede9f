// The dashboard's pages, drawn from the JSON the server embedded and kept
// current from /api/events (CouchDB _changes of the status database) and
// the JSON API.  Plain JavaScript, no build step, nothing from elsewhere.
// Text from CouchDB only ever goes into the page as text (textContent),
// never as HTML.
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("config").textContent);
  const CRASHED = config.crashed_states;  // ops.CRASHED_STATES, from the page

  // -- small helpers ---------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") el.textContent = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "className") el.className = value;
      else el.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function $(id) { return document.getElementById(id); }

  function replaceRows(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function seconds(value) {
    if (value === null || value === undefined) return "–";
    if (value < 1) return Math.round(value * 1000) + " ms";
    if (value < 60) return value.toFixed(value < 10 ? 1 : 0) + " s";
    if (value < 3600) return Math.floor(value / 60) + " min";
    if (value < 86400) return (value / 3600).toFixed(1) + " h";
    return (value / 86400).toFixed(1) + " d";
  }

  function megabytes(value) {
    if (value === null || value === undefined) return "–";
    return value >= 1024 ? (value / 1024).toFixed(1) + " GB" : Math.round(value) + " MB";
  }

  function figure(value, unit, digits) {
    if (value === null || value === undefined) return "–";
    return Number(value).toFixed(digits === undefined ? 1 : digits) + (unit || "");
  }

  function when(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    return isNaN(date) ? String(iso) : date.toLocaleString();
  }

  function firstLine(text) {
    return String(text || "").split("\n").find((line) => line.trim()) || "";
  }

  function argv(cmd) {
    if (!Array.isArray(cmd)) return String(cmd || "");
    return cmd.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : "'" + a.replace(/'/g, "'\\''") + "'"))
      .join(" ");
  }

  function nodeLabel(node, name) {
    return name ? name + " (" + node + ")" : String(node);
  }

  // The program page of a program entry of a node's status.
  function programHref(id, p) {
    return "/programs/" + encodeURIComponent(p.name || id.split(":").pop());
  }

  function badge(state, text) {
    return h("span", { className: "badge state-" + (state || "unknown"), text: text || state || "unknown" });
  }

  // Calls fn at most once per `delay` ms, and once more after the last request.
  function throttled(fn, delay) {
    let timer = null;
    let again = false;
    return function () {
      if (timer) { again = true; return; }
      fn();
      timer = setTimeout(function tick() {
        if (again) { again = false; fn(); timer = setTimeout(tick, delay); } else { timer = null; }
      }, delay);
    };
  }

  async function api(path, options) {
    const response = await fetch(path, Object.assign({ credentials: "same-origin",
      headers: { Accept: "application/json" } }, options || {}));
    if (response.status === 401) {
      location.href = "/login?next=" + encodeURIComponent(location.pathname);
      throw new Error("sign in first");
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || response.status + " " + response.statusText);
    return body;
  }

  function post(path, body) {
    return api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json",
                 "X-CSRF-Token": config.csrf },
      body: JSON.stringify(body),
    });
  }

  function showError(message) {
    const el = $("run-error");
    if (!el) return;
    el.textContent = message || "";
    el.hidden = !message;
  }

  // The state of a node now: the age the server saw, plus the time since.
  function nodeState(node, fetchedAt) {
    if (node.heartbeat_age === null || node.heartbeat_age === undefined) {
      return { state: node.state, age: null };
    }
    const age = node.heartbeat_age + (Date.now() - fetchedAt) / 1000;
    // "unreachable": its site's relay went silent (uploader/sites.py), not the node.
    if (node.state === "stopped" || node.state === "unknown" || node.state === "unreachable") {
      return { state: node.state, age: age };
    }
    const interval = node.heartbeat_interval || 10;
    const t = config.thresholds;
    const state = age <= t.suspect_after * interval ? "alive"
      : age <= t.dead_after * interval ? "suspect" : "dead";
    return { state: state, age: age };
  }

  // -- live feed -------------------------------------------------------------------
  function connect(handlers) {
    const indicator = $("live");
    const source = new EventSource("/api/events");
    function show(text, cls) {
      if (!indicator) return;
      indicator.textContent = text;
      indicator.className = "live " + cls;
    }
    source.onopen = () => show("live", "on");
    source.onerror = () => show("reconnecting…", "off");
    source.onmessage = (message) => {
      let event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      if (event.type === "changes") {
        show("live", "on");
        handlers.changes(event.ids);
      } else if (event.type === "resync") {
        show("live", "on");
        handlers.resync();
      } else if (event.type === "offline") {
        show("CouchDB unreachable", "off");
      } else if (event.type === "unauthorized") {
        source.close();
        location.href = "/login?next=" + encodeURIComponent(location.pathname);
      }
    };
    window.addEventListener("beforeunload", () => source.close());
    return source;
  }

  function runForm(targetsOf) {
    const form = $("run");
    if (!form) return;
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      showError("");
      const button = $("run-button");
      button.disabled = true;
      try {
        const body = Object.assign({ cmd: $("cmd").value }, targetsOf());
        const timeout = $("timeout").value;
        if (timeout) body.timeout = Number(timeout);
        const answer = await post("/api/commands", body);
        location.href = answer.url;
      } catch (err) {
        showError(err.message);
        button.disabled = false;
      }
    });
  }

  // -- the fleet -------------------------------------------------------------------
  function fleetPage(data) {
    const selected = new Set();
    let nodes = data.nodes;
    let fetchedAt = Date.now();
    const rows = new Map();
    const sparks = window.himbeereCharts ? window.himbeereCharts.fleetSparklines() : null;

    function programBadges(node) {
      const programs = Object.entries(node.programs || {});
      if (!programs.length) return [h("span", { className: "hint", text: "none" })];
      return programs.map(([id, p]) => h("a", { className: "program", title: id, href: programHref(id, p) },
        badge(CRASHED.includes(p.state) ? "crashed" : p.state, (p.name || id) + " " + (p.state || "?"))));
    }

    // A figure as the server formatted it (payloads.formatted: one unit per
    // column, fixed decimals), kept on one line.
    function shown(node, key) {
      return [h("span", { className: "figure", text: (node.formatted || {})[key] || "–" })];
    }

    // The data columns of a node's row, each a list of children.
    function columns(node) {
      return [
        [h("a", { href: "/nodes/" + node.node, className: "node-link" }, nodeLabel(node.node, node.name)),
          ...Object.entries(node.labels || {}).map(([k, v]) => h("span", { className: "label", text: k + "=" + v }))],
        [node.ip || "–", ...(node.daemon_version
          ? [h("span", { className: "hint version", title: "daemon version", text: " himbeere " + node.daemon_version })]
          : [])],
        shown(node, "load"),
        shown(node, "cpu"),
        shown(node, "temperature"),
        shown(node, "memory"),
        shown(node, "disk_free"),
        programBadges(node),
      ];
    }
    // Where each data column sits among the row's cells.
    const SLOTS = [1, 3, 5, 6, 7, 8, 9, 10];

    // Rows are made once per node and updated in place: a checkbox being
    // clicked or a link being hovered is never swapped under the pointer.
    function render() {
      const body = $("nodes").tBodies[0];
      const seen = new Set();
      nodes.forEach((node, index) => {
        seen.add(node.node);
        let entry = rows.get(node.node);
        if (!entry) {
          const box = h("input", { type: "checkbox", className: "select", value: String(node.node),
            "aria-label": "select node " + node.node,
            onchange: (e) => { if (e.target.checked) selected.add(node.node); else selected.delete(node.node); counts(); } });
          const cells = Array.from({ length: 12 }, () => h("td"));
          cells[0].append(box);
          cells[2].className = "state-cell";
          cells[4].className = "age";
          cells[10].className = "programs-cell";
          cells[11].className = "spark-cell";
          entry = { row: h("tr", { "data-node": String(node.node) }, cells), cells: cells, box: box, sigs: [] };
          rows.set(node.node, entry);
          if (sparks) sparks.attach(node.node, cells[11]);
        }
        entry.node = node;
        entry.stateCell = entry.cells[2];
        entry.ageCell = entry.cells[4];
        entry.box.checked = selected.has(node.node);
        columns(node).forEach((children, i) => {
          const cell = entry.cells[SLOTS[i]];
          const sig = children.map((c) => (c instanceof Node ? c.outerHTML : String(c))).join("");
          if (entry.sigs[i] !== sig) { cell.replaceChildren(...children); entry.sigs[i] = sig; }
        });
        if (body.children[index] !== entry.row) {  // a new row, or the order changed
          body.insertBefore(entry.row, body.children[index] || null);
        }
      });
      for (const [mac, entry] of Array.from(rows)) {
        if (!seen.has(mac)) {
          entry.row.remove(); rows.delete(mac); selected.delete(mac);
          if (sparks) sparks.detach(mac);
        }
      }
      $("no-nodes").hidden = nodes.length > 0;
      tick();
      counts();
    }

    function tick() {
      const tally = {};
      for (const entry of rows.values()) {
        const now = nodeState(entry.node, fetchedAt);
        tally[now.state] = (tally[now.state] || 0) + 1;
        if (entry.stateCell.dataset.state !== now.state) {
          entry.stateCell.replaceChildren(badge(now.state));
          entry.stateCell.dataset.state = now.state;
          entry.row.className = "node state-row-" + now.state;
        }
        entry.ageCell.textContent = now.age === null || now.age === undefined ? "never" : seconds(now.age) + " ago";
      }
      const parts = Object.entries(tally).map(([state, n]) => n + " " + state);
      $("summary").textContent = nodes.length + (nodes.length === 1 ? " node" : " nodes") +
        (parts.length ? ": " + parts.join(", ") : "");
    }

    function counts() {
      const count = $("selected-count");  // no Run form for a node signed in
      if (count) count.textContent = String(selected.size);
      const all = $("select-all");
      all.checked = nodes.length > 0 && selected.size === nodes.length;
    }

    $("select-all").addEventListener("change", (e) => {
      selected.clear();
      if (e.target.checked) nodes.forEach((n) => selected.add(n.node));
      for (const [mac, entry] of rows) entry.box.checked = selected.has(mac);
      counts();
    });

    const refresh = throttled(async () => {
      try {
        const answer = await api("/api/nodes");
        nodes = answer.nodes;
        fetchedAt = Date.now();
        render();
      } catch (err) { console.warn(err); }
    }, 1000);

    runForm(() => {
      const where = document.querySelector("input[name=where]:checked").value;
      if (where === "all") return { targets: "all" };
      if (!selected.size) throw new Error("select at least one node, or choose all nodes");
      return { targets: Array.from(selected) };
    });
    render();
    setInterval(tick, 1000);
    connect({
      resync: () => { refresh(); if (sparks) sparks.reload(); },
      changes: (ids) => {
        if (ids.some((id) => id.startsWith("status:") || id.startsWith("node:"))) refresh();
        if (sparks) sparks.changed(ids);
      },
    });
  }

  // -- one node --------------------------------------------------------------------
  function nodePage(data) {
    const mac = data.node;
    let detail = data;
    let fetchedAt = Date.now();
    let lastLine = null;
    const logEl = $("log");
    const MAX_LINES = 2000;

    function dl(pairs) {
      return pairs.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]);
    }

    function renderHealth() {
      const now = nodeState(detail, fetchedAt);
      $("node-state").replaceChildren(badge(now.state));
      const memory = detail.memory || {};
      const throttled = detail.throttled;
      $("health").replaceChildren(...dl([
        ["MAC id", String(detail.node)],
        ["IP", detail.ip || "–"],
        ["Host", detail.hostname || "–"],
        ["Server", detail.server || "–"],
        ["Heartbeat", now.age === null || now.age === undefined ? "never" : seconds(now.age) + " ago"],
        ["Uptime", seconds(detail.uptime)],
        ["Load", detail.load ? detail.load.map((x) => x.toFixed(2)).join(" ") : "–"],
        ["CPU", figure(detail.cpu_percent, " %", 0)],
        ["Temperature", figure(detail.temperature, " °C")],
        ["Memory", megabytes(memory.used_mb) + " / " + megabytes(memory.total_mb)],
        ["Disk free", megabytes((detail.disk || {}).free_mb)],
        ["Throttling", throttled ? (throttled.flags.length ? throttled.flags.join(", ") : "none") : "–"],
        ["Clock offset", detail.clock_offset === null || detail.clock_offset === undefined ? "–" : detail.clock_offset + " s"],
        ["Versions", "himbeere " + (detail.daemon_version || "?") + ", Python " + (detail.python || "?")],
        ["Labels", Object.entries(detail.labels || {}).map(([k, v]) => k + "=" + v).join(", ") || "–"],
      ]));
    }

    // A placed program (a program for many nodes) has one document for all
    // its nodes: its buttons act on every node that runs it, and say so.
    function control(id, action, p) {
      const shared = p.placed ? " wherever it is placed" : p.targets ? " on every node it targets (" + targetsText(p.targets) + ")" : "";
      return h("button", { type: "button", className: "small", text: action,
        title: shared ? action + shared : null,
        onclick: async (e) => {
          e.target.disabled = true;
          try { await post("/api/nodes/" + mac + "/programs", { program: id, action: action }); }
          catch (err) { alert(err.message); }
          e.target.disabled = false;
        } });
    }

    // Where a program for many nodes runs, as `himbeere status` says it (schema.targets_text).
    function targetsText(targets) {
      if (targets === "all") return "all";
      if (Array.isArray(targets)) return targets.join(", ");
      const labels = (targets && targets.labels) || {};
      return Object.keys(labels).sort().map((k) => k + "=" + labels[k]).join(", ") || "all";
    }

    function renderPrograms() {
      const programs = Object.entries(detail.programs || {});
      replaceRows($("programs").tBodies[0], programs.map(([id, p]) => {
        const crashed = CRASHED.includes(p.state);
        const error = p.last_error
          ? h("details", { className: "error-details", open: crashed },
            h("summary", { text: firstLine(p.last_error.split("\n").filter((l) => l.trim()).pop()) }),
            h("pre", { className: "traceback", text: p.last_error }))
          : h("span", { className: "hint", text: "–" });
        const enabled = p.enabled !== false;
        return h("tr", { "data-program": id },
          h("td", { title: id }, h("a", { href: programHref(id, p), text: p.name || id }),
            p.release ? h("span", { className: "hint", text: " r" + p.release }) : null),
          h("td", {}, badge(crashed ? "crashed" : p.state, p.state || (enabled ? "not started" : "disabled")),
            enabled ? null : h("span", { className: "hint", text: " disabled" }),
            p.placed ? h("span", { className: "hint", title: "placed by the scheduler (himbeere placements)", text: " placed" }) : null,
            p.targets ? h("span", { className: "hint", title: "one document for many nodes (" + id + ")", text: " targets " + targetsText(p.targets) }) : null),
          h("td", { text: p.restarts === undefined ? "–" : String(p.restarts) }),
          h("td", { className: "rev", title: p.rev || "", text: p.rev ? String(p.rev).split("-")[0] : "–" }),
          h("td", { text: p.pid || "–" }),
          h("td", { text: when(p.started) }),
          h("td", { className: "error-cell" }, error),
          h("td", { className: "controls" }, p.in_database && config.may_act
            ? [control(id, "restart", p), control(id, enabled ? "stop" : "start", p)] : null));
      }));
      $("no-programs").hidden = programs.length > 0;
    }

    function renderHistory() {
      replaceRows($("history").tBodies[0], (detail.commands || []).map((c) => {
        const r = c.result || {};
        const ret = Array.isArray(r.ret) ? r.ret : ["", ""];
        const output = firstLine(ret[0]) || firstLine(ret[1]) || r.error || "";
        return h("tr", {},
          h("td", {}, h("a", { href: "/commands/" + c.command }, h("code", { text: argv(c.cmd) }))),
          h("td", { text: when(c.created) }),
          h("td", {}, c.result ? badge(r.state === "done" && r.returncode === 0 ? "done" : r.state === "running" ? "running" : "failed", r.state)
            : c.joined_later ? badge("stopped", "not targeted (joined later)") : badge("waiting", "waiting")),
          h("td", { text: r.returncode === undefined || r.returncode === null ? "–" : String(r.returncode) }),
          h("td", { text: r.duration === undefined ? "–" : seconds(r.duration) }),
          h("td", {}, h("code", { className: "output", text: output })));
      }));
    }

    function render() {
      $("node-title").textContent = nodeLabel(detail.node, detail.name);
      renderHealth();
      renderPrograms();
      renderHistory();
    }

    // One load at a time: a second one (the live feed's resync) that started
    // before the first had set lastLine asked for every line again, and the
    // page showed the first lines twice.
    let logQueue = Promise.resolve();
    function loadLog(reset) {
      logQueue = logQueue.then(() => loadLogNow(reset));
      return logQueue;
    }

    async function loadLogNow(reset) {
      const program = $("log-program").value;
      const params = new URLSearchParams();
      if (program) params.set("program", program);
      if (!reset && lastLine !== null) params.set("after", String(lastLine));
      try {
        const answer = await api("/api/nodes/" + mac + "/logs?" + params);
        const select = $("log-program");
        const known = new Set(Array.from(select.options).map((o) => o.value));
        for (const p of answer.programs) {
          if (p.program && !known.has(p.program)) {
            select.append(h("option", { value: p.program, text: p.name || p.program }));
          }
        }
        if (reset) { logEl.textContent = ""; lastLine = null; }
        if (answer.lines.length) {
          const text = answer.lines.map(([ts, name, line]) =>
            new Date(ts * 1000).toLocaleTimeString() + " [" + name + "] " + line).join("\n") + "\n";
          logEl.append(document.createTextNode(text));
          lastLine = answer.lines[answer.lines.length - 1][0];
          while (logEl.childNodes.length > 1 && logEl.textContent.split("\n").length > MAX_LINES) {
            logEl.removeChild(logEl.firstChild);
          }
          if ($("log-follow").checked) logEl.scrollTop = logEl.scrollHeight;
        }
      } catch (err) { console.warn(err); }
    }

    const refresh = throttled(async () => {
      try {
        detail = await api("/api/nodes/" + mac);
        fetchedAt = Date.now();
        render();
      } catch (err) { console.warn(err); }
    }, 1000);
    const moreLog = throttled(() => loadLog(false), 500);

    $("log-program").addEventListener("change", () => loadLog(true));
    runForm(() => ({ targets: [mac] }));
    render();
    loadLog(true);
    const charts = window.himbeereCharts ? window.himbeereCharts.nodeCharts(mac,
      (id) => ((detail.programs || {})[id] || {}).name || id) : null;
    setInterval(renderHealth, 1000);
    connect({
      resync: () => { refresh(); moreLog(); if (charts) charts.reload(); },
      changes: (ids) => {
        if (charts && ids.includes("history:" + mac)) charts.reload();
        if (ids.some((id) => id === "status:" + mac || id === "node:" + mac ||
          (id.startsWith("result:") && id.endsWith(":" + mac)))) refresh();
        if (ids.some((id) => id.startsWith("log:" + mac + ":"))) moreLog();
      },
    });
  }

  // -- commands --------------------------------------------------------------------
  function commandsPage(data) {
    let commands = data.commands;

    function render() {
      replaceRows($("commands").tBodies[0], commands.map((c) => h("tr", { "data-command": c.id },
        h("td", {}, h("a", { href: "/commands/" + c.id }, h("code", { text: argv(c.cmd) }))),
        h("td", { text: Array.isArray(c.targets) ? c.targets.join(", ") : String(c.targets) }),
        h("td", { text: when(c.created) }),
        h("td", { text: c.created_by || "–" }),
        h("td", { text: c.answered + "/" + c.expected }),
        h("td", {}, c.failed ? badge("failed", String(c.failed)) : "0"))));
      $("no-commands").hidden = commands.length > 0;
    }

    const refresh = throttled(async () => {
      try { commands = (await api("/api/commands?limit=50")).commands; render(); }
      catch (err) { console.warn(err); }
    }, 1000);

    runForm(() => {
      const text = $("targets").value.trim();
      const labels = $("labels").value.split(/[\s,]+/).filter(Boolean);
      const body = {};
      if (labels.length) body.labels = labels;
      if (text === "all" && !labels.length) body.targets = "all";
      else if (text && text !== "all") body.targets = text.split(/[\s,]+/).filter(Boolean);
      return body;
    });
    render();
    connect({
      resync: refresh,
      changes: (ids) => { if (ids.some((id) => id.startsWith("result:"))) refresh(); },
    });
  }

  function commandPage(data) {
    let answer = data;
    const id = data.command._id;

    function render() {
      const c = answer.command;
      $("argv").textContent = argv(c.cmd);
      const total = answer.expected.length;
      $("progress").replaceChildren(badge(answer.done ? "done" : "running",
        answer.answered + "/" + total + " answered"));
      $("meta").textContent = "created " + when(c.created) + (c.created_by ? " by " + c.created_by : "") +
        (c.timeout ? ", timeout " + c.timeout + " s" : "") + ", targets " +
        (Array.isArray(c.targets) ? c.targets.length + (c.targets.length === 1 ? " node" : " nodes") : c.targets);
      replaceRows($("results").tBodies[0], answer.nodes.map((n) => {
        const r = answer.results[String(n.node)];
        if (!r) {
          return h("tr", { "data-node": String(n.node), className: n.not_targeted ? "not-targeted" : "pending" },
            h("td", {}, h("a", { href: "/nodes/" + n.node, text: nodeLabel(n.node, n.name) })),
            h("td", {}, n.not_targeted ? badge("stopped", "not targeted (joined later)") : badge("waiting", "waiting")),
            h("td", { text: "–" }), h("td", { text: "–" }),
            h("td", {}));
        }
        const ret = Array.isArray(r.ret) ? r.ret : ["", ""];
        const ok = r.state === "done" && r.returncode === 0;
        return h("tr", { "data-node": String(n.node), className: "answered" },
          h("td", {}, h("a", { href: "/nodes/" + n.node, text: nodeLabel(n.node, n.name) })),
          h("td", {}, badge(ok ? "done" : r.state === "running" ? "running" : "failed", r.state)),
          h("td", { className: "returncode", text: r.returncode === null || r.returncode === undefined ? "–" : String(r.returncode) }),
          h("td", { text: r.duration === undefined ? "–" : seconds(r.duration) }),
          h("td", { className: "output-cell" },
            ret[0] ? h("pre", { className: "stdout", text: ret[0] }) : null,
            ret[1] ? h("pre", { className: "stderr", text: ret[1] }) : null,
            r.error ? h("p", { className: "error", text: r.error }) : null,
            r.truncated ? h("p", { className: "hint", text: "output cut: " + JSON.stringify(r.truncated) }) : null));
      }));
    }

    const refresh = throttled(async () => {
      try { answer = await api("/api/commands/" + encodeURIComponent(id)); render(); }
      catch (err) { console.warn(err); }
    }, 500);

    render();
    connect({
      resync: refresh,
      changes: (ids) => { if (ids.some((x) => x.startsWith("result:" + id + ":"))) refresh(); },
    });
  }

  // -- one program: where it runs, releases, rollouts -------------------------------
  function programPage(data) {
    let detail = data;

    function render() {
      $("program-release").textContent = detail.latest ? "release " + detail.latest : "";
      replaceRows($("documents").tBodies[0], detail.docs.map((d) => h("tr", { "data-doc": d.id },
        h("td", {}, h("code", { text: d.id })), h("td", { text: d.where }),
        h("td", { text: d.release === null || d.release === undefined ? "–" : String(d.release) }),
        h("td", { text: d.enabled === false ? "no" : "yes" }))));
      replaceRows($("program-nodes").tBodies[0], detail.nodes.map((n) => {
        const old = detail.latest && n.release !== detail.latest;
        return h("tr", { "data-node": String(n.node), "data-doc": n.id },
          h("td", {}, h("a", { href: "/nodes/" + n.node, text: nodeLabel(n.node, n.node_name) })),
          h("td", {}, h("code", { text: n.id })),
          h("td", {}, badge(CRASHED.includes(n.state) ? "crashed" : n.state, n.state || "?")),
          h("td", { className: old ? "release old" : "release",
            title: old ? "not the newest release (" + detail.latest + ")" : null,
            text: n.release === null || n.release === undefined ? "–" : String(n.release) }),
          h("td", { text: n.restarts === null || n.restarts === undefined ? "–" : String(n.restarts) }));
      }));
      $("no-nodes").hidden = detail.nodes.length > 0;
      replaceRows($("releases").tBodies[0], detail.releases.map((r) => h("tr", { "data-release": String(r.release) },
        h("td", { text: String(r.release) }), h("td", { text: when(r.pushed_at) }),
        h("td", { text: r.pushed_by || "–" }), h("td", {}, h("code", { text: r.key || "–" })),
        h("td", { text: r.docs.join(", ") }), h("td", { text: r.what }),
        h("td", { text: r.outcome || r.rollout || "–" }))));
      $("no-releases").hidden = detail.releases.length > 0;
      replaceRows($("rollouts").tBodies[0], detail.rollouts.map((r) => h("tr", { "data-rollout": r.id },
        h("td", {}, h("code", { text: r.id })), h("td", {}, badge(r.state, r.state || "?")),
        h("td", { text: Array.isArray(r.waves) ? r.waves.map((w) => typeof w === "object" ? JSON.stringify(w) : String(w)).join(", ")
          : r.waves === undefined || r.waves === null ? "–" : String(r.waves) }))));
      $("no-rollouts").hidden = detail.rollouts.length > 0;
    }

    const refresh = throttled(async () => {
      try { detail = await api("/api/programs/" + encodeURIComponent(detail.name)); render(); }
      catch (err) { console.warn(err); }
    }, 1000);

    render();
    connect({
      resync: refresh,
      changes: (ids) => {
        if (ids.some((id) => id.startsWith("status:") || id.startsWith("rollout:" + detail.name + ":"))) refresh();
      },
    });
  }

  const pages = { fleet: fleetPage, node: nodePage, commands: commandsPage, command: commandPage,
    program: programPage };
  const data = JSON.parse($("data").textContent);
  const page = pages[config.page];
  if (page) page(data);
})();
