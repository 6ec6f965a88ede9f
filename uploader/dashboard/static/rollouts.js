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
    drawControls(r);
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

  // Pause, Resume, Abort (deployers only: the page has no buttons for a node).
  // Each is enabled only where `himbeere rollout ID --pause` etc. would be.
  const STEERABLE = { pause: ["running"], resume: ["paused"], abort: ["running", "paused"] };

  function drawControls(r) {
    document.querySelectorAll("#rollout-controls button").forEach(function (button) {
      button.disabled = !STEERABLE[button.dataset.action].includes(r.state);
    });
  }

  function steer(action) {
    const shown = document.getElementById("rollout-steer-error");
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json",
                 "X-CSRF-Token": config.csrf },
      body: JSON.stringify({ action: action }),
    }).then(function (answer) {
      return answer.json().catch(function () { return {}; }).then(function (body) {
        if (!answer.ok) throw new Error(body.error || answer.status + " " + answer.statusText);
        return body;
      });
    }).then(function (summary) {
      shown.hidden = true;
      data = Object.assign({}, data, summary);
      draw(data);
    }).catch(function (err) {
      shown.textContent = err.message;
      shown.hidden = false;
    });
  }

  document.querySelectorAll("#rollout-controls button").forEach(function (button) {
    button.addEventListener("click", function () {
      const action = button.dataset.action;
      if (action === "abort" && !window.confirm("Abort " + data.id + "? Every node goes back to release " + data.previous_release + ".")) return;
      button.disabled = true;
      steer(action);
    });
  });

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
