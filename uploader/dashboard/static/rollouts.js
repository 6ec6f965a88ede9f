// The rollouts pages: draw the embedded data, then poll the JSON API every 2 s.
// Text from CouchDB only ever goes into the page as text (textContent).
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("config").textContent);
  let data = JSON.parse(document.getElementById("data").textContent);

  function cell(row, text, href) {
    const td = document.createElement("td");
    if (href) {
      const a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      td.appendChild(a);
    } else {
      td.textContent = text === null || text === undefined ? "-" : String(text);
    }
    row.appendChild(td);
  }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function drawList(answer) {
    const rows = answer.rollouts.map(function (r) {
      const tr = document.createElement("tr");
      cell(tr, r.id, "/rollouts/" + encodeURIComponent(r.id));
      cell(tr, r.name); cell(tr, r.release); cell(tr, r.state);
      cell(tr, r.wave + "/" + r.waves); cell(tr, r.ok + "/" + r.admitted);
      cell(tr, r.failed.join(", ") || "-"); cell(tr, r.nodes); cell(tr, r.updated);
      tr.className = "state-" + r.state;
      return tr;
    });
    fill(document.querySelector("#rollouts tbody"), rows);
    document.getElementById("no-rollouts").hidden = rows.length > 0;
  }

  function drawOne(r) {
    document.getElementById("rollout-summary").textContent =
      r.name + " release " + r.release + " (previous " + r.previous_release + "): " + r.state +
      ", wave " + r.wave + "/" + r.waves + ", " + r.ok + "/" + r.admitted +
      " admitted nodes healthy, healthy for " + r.healthy_for + " s";
    const failure = r.failure || {};
    const why = document.getElementById("rollout-failure");
    why.hidden = !failure.why;
    why.textContent = failure.why || "";
    const error = document.getElementById("rollout-error");
    error.hidden = !failure.error;
    error.textContent = failure.error || "";
    fill(document.querySelector("#waves tbody"), r.wave_list.map(function (w) {
      const tr = document.createElement("tr");
      cell(tr, w.wave); cell(tr, w.size); cell(tr, w.nodes); cell(tr, w.started);
      return tr;
    }));
    fill(document.querySelector("#rollout-nodes tbody"), r.node_list.map(function (n) {
      const tr = document.createElement("tr");
      cell(tr, String(n.node), "/nodes/" + n.node);
      cell(tr, n.admitted); cell(tr, n.release); cell(tr, n.program); cell(tr, n.restarts);
      cell(tr, n.health); cell(tr, n.healthy ? "yes" : "no");
      return tr;
    }));
  }

  const url = config.page === "rollouts" ? "/api/rollouts"
    : "/api/rollouts/" + encodeURIComponent(document.getElementById("rollout-title").textContent);
  const draw = config.page === "rollouts" ? drawList : drawOne;
  draw(data);
  setInterval(function () {
    fetch(url, {credentials: "same-origin"}).then(function (answer) {
      return answer.ok ? answer.json() : null;
    }).then(function (fresh) {
      if (fresh) { data = fresh; draw(data); }
    }).catch(function () {});
  }, 2000);
})();
