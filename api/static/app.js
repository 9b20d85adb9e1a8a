// researchfarm dashboard: polls server-rendered fragments and posts forms to the REST API.
// Vendored, dependency-free. The HttpOnly cookie authenticates every fetch (same origin).
(function () {
  "use strict";
  var POLL_MS = 2000;
  var CHART_MS = 60000;
  var chartLoaded = Date.now();  // the page came with the current chart
  var selected = null;

  function toLogin() { location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search); }

  function refresh(el) {
    if (document.hidden || el.dataset.busy) return;
    el.dataset.busy = "1";
    fetch(el.dataset.live, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (r) {
        if (r.status === 401) { toLogin(); throw new Error("login"); }
        return r.ok ? r.text() : Promise.reject(new Error(r.status));
      })
      .then(function (html) {
        var before = {};
        el.querySelectorAll("tr[data-sig]").forEach(function (tr) { before[tr.dataset.exp] = tr.dataset.sig; });
        el.innerHTML = html;
        el.querySelectorAll("tr[data-sig]").forEach(function (tr) {
          if (Object.keys(before).length && before[tr.dataset.exp] !== tr.dataset.sig) tr.classList.add("fresh");
          if (tr.dataset.exp === selected) tr.classList.add("sel");
        });
        // the chart is one image per version, cached for good under its ?v=; reload it at most once a
        // minute (at 100k runs a render costs the server seconds): a newer version waits here until then
        var chart = el.dataset.chart && document.getElementById(el.dataset.chart);
        var marker = el.querySelector("[data-chart-v]");
        if (chart && marker && chart.dataset.v !== marker.dataset.chartV && Date.now() - chartLoaded >= CHART_MS) {
          chartLoaded = Date.now();
          chart.dataset.v = marker.dataset.chartV;
          chart.src = chart.dataset.base + "?v=" + encodeURIComponent(marker.dataset.chartV);
        }
        if (selected && document.querySelector("#detail [data-running]")) showExperiment(selected, true);
      })
      .catch(function () {})
      .finally(function () { delete el.dataset.busy; });
  }

  function showExperiment(id, quiet) {
    selected = String(id);
    document.querySelectorAll("tr.sel").forEach(function (tr) { tr.classList.remove("sel"); });
    document.querySelectorAll('tr[data-exp="' + selected + '"]').forEach(function (tr) { tr.classList.add("sel"); });
    var panel = document.getElementById("detail");
    if (!panel) return;
    fetch("/ui/experiments/" + selected, { credentials: "same-origin" })
      .then(function (r) { if (r.status === 401) { toLogin(); } return r.text(); })
      .then(function (html) { panel.innerHTML = html; if (!quiet) panel.scrollIntoView({ block: "nearest" }); });
  }

  document.addEventListener("click", function (ev) {
    var t = ev.target;
    if (t.closest("[data-close]")) {
      selected = null;
      document.getElementById("detail").innerHTML = '<div class="muted">Click an experiment to see its diff, metrics and log.</div>';
      document.querySelectorAll("tr.sel").forEach(function (tr) { tr.classList.remove("sel"); });
      return;
    }
    var exp = t.closest("[data-exp]");
    if (exp && !t.closest("a[href]:not([href='#'])")) { ev.preventDefault(); showExperiment(exp.dataset.exp); return; }
    var row = t.closest("tr[data-href]");
    if (row && !t.closest("a")) { location.href = row.dataset.href; return; }
    var post = t.closest("[data-post]");
    if (post) {
      if (post.dataset.confirm && !confirm(post.dataset.confirm)) return;
      fetch(post.dataset.post, { method: "POST", credentials: "same-origin" }).then(function (r) {
        if (r.status === 401) return toLogin();
        if (!r.ok) return r.json().then(function (b) { alert(b.detail || r.status); });
        location.reload();
      });
    }
  });

  function val(form, name) { var el = form.elements[name]; return el ? el.value.trim() : ""; }
  function num(form, name) { var v = val(form, name); return v === "" ? undefined : Number(v); }

  var builders = {
    program: function (f) {
      var body = { name: val(f, "name"), instructions: f.elements.instructions.value, profile: val(f, "profile"),
        editable_files: val(f, "editable_files").split(",").map(function (s) { return s.trim(); }).filter(Boolean),
        policy: { kind: val(f, "policy_kind") }, proposer: {}, stop_rules: {} };
      if (num(f, "time_budget") !== undefined) body.time_budget = num(f, "time_budget");
      if (val(f, "hw_class")) body.hw_class = val(f, "hw_class");
      if (num(f, "k_sigma") !== undefined) body.policy.k_sigma = num(f, "k_sigma");
      if (val(f, "model")) body.proposer.model = val(f, "model");
      if (num(f, "max_experiments") !== undefined) body.stop_rules.max_experiments = num(f, "max_experiments");
      if (num(f, "weight") !== undefined) body.weight = num(f, "weight");
      return body;
    },
    candidate: function (f) {
      var body = { description: val(f, "description") };
      body[val(f, "format")] = f.elements.patch.value;
      return body;
    }
  };
  var done = {
    program: function (b) { location.href = "/ui/programs/" + b.id; },
    candidate: function (b, f, msg) {
      msg.className = "form-msg ok"; msg.textContent = "Accepted as experiment #" + b.id + " (" + b.status + ").";
      f.reset();
      document.querySelectorAll("[data-live]").forEach(refresh);
    }
  };

  document.addEventListener("submit", function (ev) {
    var f = ev.target;
    if (!f.dataset.form) return;
    ev.preventDefault();
    var msg = f.querySelector(".form-msg");
    msg.className = "form-msg"; msg.textContent = "Submitting…";
    fetch(f.dataset.action, { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(builders[f.dataset.form](f)) })
      .then(function (r) { return r.json().then(function (b) { return { r: r, b: b }; }); })
      .then(function (x) {
        if (x.r.ok) return done[f.dataset.form](x.b, f, msg);
        msg.className = "form-msg error";
        msg.textContent = x.r.status === 401 ? "Log in to submit (read-only view)." : (x.b.detail || ("HTTP " + x.r.status));
      })
      .catch(function (e) { msg.className = "form-msg error"; msg.textContent = String(e); });
  });

  document.querySelectorAll("[data-live]").forEach(function (el) {
    setInterval(function () { refresh(el); }, POLL_MS);
  });
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) document.querySelectorAll("[data-live]").forEach(refresh);
  });
})();
