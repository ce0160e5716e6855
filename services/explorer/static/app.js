// Refreshes the page's <main> from /fragment every update period and says how old it is.
// The fragment is rendered and escaped by the server (render.py); nothing here builds HTML
// from data.
(function () {
  "use strict";
  var main = document.getElementById("swarm");
  var status = document.getElementById("status");
  if (!main || !status) return;
  var failed = null;

  function meta() {
    var m = document.getElementById("meta");
    return {
      updated: m ? Number(m.getAttribute("data-updated")) : 0,
      period: Math.max(1, m ? Number(m.getAttribute("data-period")) || 5 : 5),
    };
  }

  function tick() {
    var m = meta();
    if (failed) {
      status.textContent = "cannot reach the explorer (" + failed + "); showing the last view";
      status.className = "status stale";
    } else if (m.updated > 0) {
      var age = Math.max(0, Math.round(Date.now() / 1000 - m.updated));
      status.textContent = "updated " + age + " s ago, every " + m.period + " s";
      status.className = age > 3 * m.period ? "status stale" : "status";
    } else {
      status.textContent = "looking at the swarm…";
      status.className = "status";
    }
  }

  function refresh() {
    fetch("/fragment", { cache: "no-store" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (html) {
        main.innerHTML = html;
        failed = null;
      })
      .catch(function (e) {
        failed = String(e.message || e);
      })
      .then(function () {
        tick();
        setTimeout(refresh, meta().period * 1000);
      });
  }

  tick();
  setInterval(tick, 1000);
  setTimeout(refresh, meta().period * 1000);
})();
