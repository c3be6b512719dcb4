// healthd status page: reads status.json and history.json from this page's directory and
// redraws every 15 seconds. Plain JavaScript, no dependencies; every text goes through
// textContent, never innerHTML, because reasons come from the monitored systems.
"use strict";

(function () {
  var REFRESH_SECONDS = 15;
  // Tests may ask for a faster refresh (?refresh=2); never faster than once a second.
  var asked = Number(new URLSearchParams(window.location.search).get("refresh"));
  var refreshSeconds = asked >= 1 ? asked : REFRESH_SECONDS;
  var STALE_SECONDS = 120;
  var DAY_MS = 86400000;

  var LABELS = {
    healthy: { icon: "\u2714", text: "Healthy", banner: "All systems operational" },
    degraded: { icon: "\u26A0", text: "Degraded", banner: "Some systems are degraded" },
    unhealthy: { icon: "\u2716", text: "Unhealthy", banner: "Some systems are down" },
    unknown: { icon: "?", text: "Unknown", banner: "Status unknown" },
  };

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function label(status) { return LABELS[status] || LABELS.unknown; }

  function when(iso) {
    if (!iso) return "unknown";
    var d = new Date(iso);
    if (isNaN(d.getTime())) return "unknown";
    return d.toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    var s = Math.round(seconds);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " days";
  }

  function percent(share) {
    if (share === null || share === undefined) return "no data";
    var p = share * 100;
    return (p === 100 ? "100" : p >= 99.99 ? p.toFixed(3) : p.toFixed(2)) + "%";
  }

  async function fetchJson(name) {
    var response = await fetch(name, { cache: "no-store" });
    if (!response.ok) throw new Error(name + ": HTTP " + response.status);
    return response.json();
  }

  function badge(status) {
    var l = label(status);
    var node = el("span", "badge status-" + (LABELS[status] ? status : "unknown"));
    node.appendChild(el("span", "icon", l.icon)).setAttribute("aria-hidden", "true");
    node.appendChild(el("span", "", l.text));
    return node;
  }

  function renderBanner(status) {
    var banner = $("banner");
    var key = LABELS[status.status] ? status.status : "unknown";
    banner.className = "banner banner-" + key;
    banner.dataset.status = key;
    banner.querySelector(".icon").textContent = label(key).icon;
    var counts = status.summary || {};
    var parts = ["healthy", "degraded", "unhealthy"]
      .filter(function (s) { return counts[s]; })
      .map(function (s) { return counts[s] + " " + s; });
    $("verdict").textContent = label(key).banner + (parts.length ? " (" + parts.join(", ") + ")" : "");
    var age = (Date.now() - new Date(status.generated_at).getTime()) / 1000;
    var fresh = "Updated " + when(status.generated_at);
    if (age > STALE_SECONDS) fresh += " \u2014 this status is " + duration(age) + " old and may be out of date";
    $("freshness").textContent = fresh;
  }

  function incidentsOn(incidents, dayStart) {
    var dayEnd = dayStart + DAY_MS;
    return (incidents || []).filter(function (i) {
      var start = new Date(i.start).getTime();
      var end = i.end ? new Date(i.end).getTime() : Date.now();
      return start < dayEnd && end >= dayStart;
    });
  }

  function uptimeStrip(name, history) {
    var wrap = el("div", "uptime");
    var entry = history.components && history.components[name];
    if (!entry) return null;
    var first = new Date(history.first_day + "T00:00:00Z").getTime();
    var bars = el("div", "bars");
    bars.setAttribute("role", "list");
    bars.setAttribute("aria-label", name + ": daily uptime, last " + entry.daily_uptime.length + " days");
    var up = 0, counted = 0;
    entry.daily_uptime.forEach(function (share, i) {
      var day = first + i * DAY_MS;
      var found = incidentsOn(entry.incidents, day);
      var kind = share === null ? "nodata" : share < 0.9995 || found.some(function (f) { return f.status === "unhealthy"; })
        ? "down" : found.length ? "degraded" : "up";
      var bar = el("div", "bar bar-" + kind);
      bar.setAttribute("role", "listitem");
      bar.tabIndex = 0;
      var lines = [new Date(day).toISOString().slice(0, 10) + ": " + (share === null ? "no data" : percent(share) + " uptime")];
      if (found.length) {
        lines.push(found.length + (found.length === 1 ? " incident" : " incidents") + ":");
        found.slice(0, 3).forEach(function (f) {
          lines.push("\u2022 " + f.status + " (" + f.reason_code + "), " + duration(f.duration_seconds));
        });
      } else if (share !== null) {
        lines.push("no incidents");
      }
      bar.setAttribute("aria-label", lines.join(" "));
      if (i < 8) bar.classList.add("edge-left");
      if (i > entry.daily_uptime.length - 9) bar.classList.add("edge-right");
      var tip = el("span", "tip", lines.join("\n"));
      tip.setAttribute("aria-hidden", "true");
      bar.appendChild(tip);
      bars.appendChild(bar);
      if (share !== null) { up += share; counted += 1; }
    });
    wrap.appendChild(bars);
    var summary = counted ? percent(up / counted) + " uptime over the " +
      (counted === 1 ? "day" : counted + " days") + " with data"
      : "No uptime data yet";
    wrap.appendChild(el("p", "uptime-summary", summary));
    return wrap;
  }

  function renderComponents(status, history) {
    var list = $("components");
    var focused = document.activeElement && document.activeElement.closest
      ? document.activeElement.closest("[data-component]") : null;
    var focusedIndex = focused && document.activeElement.classList.contains("bar")
      ? Array.prototype.indexOf.call(document.activeElement.parentNode.children, document.activeElement) : -1;
    var focusedName = focused ? focused.dataset.component : null;
    list.textContent = "";
    Object.keys(status.components || {}).forEach(function (name) {
      var c = status.components[name];
      var key = LABELS[c.status] ? c.status : "unknown";
      var item = el("li", "component");
      item.dataset.component = name;
      item.dataset.status = key;
      var head = el("div", "component-head");
      head.appendChild(el("h3", "component-name", name));
      head.appendChild(badge(key));
      head.appendChild(el("span", "component-since", "since " + when(c.since)));
      item.appendChild(head);
      var reason = el("p", "reason");
      reason.appendChild(el("span", "reason-code", c.reason_code));
      if (c.reason) reason.appendChild(document.createTextNode(": " + c.reason));
      item.appendChild(reason);
      if (history) {
        var strip = uptimeStrip(name, history);
        if (strip) item.appendChild(strip);
      }
      list.appendChild(item);
    });
    // A redraw must not throw the keyboard user back to the top.
    if (focusedName !== null && focusedIndex >= 0) {
      var again = list.querySelector('[data-component="' + CSS.escape(focusedName) + '"] .bars');
      if (again && again.children[focusedIndex]) again.children[focusedIndex].focus();
    }
    $("no-history").hidden = Boolean(history);
  }

  function renderIncidents(history) {
    var list = $("incidents");
    list.textContent = "";
    var all = [];
    if (history && history.components) {
      Object.keys(history.components).forEach(function (name) {
        (history.components[name].incidents || []).forEach(function (i) {
          all.push(Object.assign({ component: name }, i));
        });
      });
    }
    all.sort(function (a, b) { return a.start < b.start ? 1 : a.start > b.start ? -1 : 0; });
    all.slice(0, 20).forEach(function (i) {
      var item = el("li", "incident");
      item.dataset.component = i.component;
      var title = el("strong", "", i.component + " ");
      item.appendChild(title);
      item.appendChild(badge(i.status));
      item.appendChild(el("span", "reason-code", " " + i.reason_code));
      var span = i.end ? when(i.start) + " \u2013 " + when(i.end) + " (" + duration(i.duration_seconds) + ")"
        : "since " + when(i.start) + " (ongoing, " + duration(i.duration_seconds) + ")";
      item.appendChild(el("span", "incident-when", span));
      if (i.reason) item.appendChild(el("span", "reason", i.reason));
      list.appendChild(item);
    });
    $("no-incidents").hidden = all.length > 0;
    $("no-incidents").textContent = history ? "No incidents recorded." : "Incident history is not available.";
  }

  async function refresh() {
    var problems = [];
    var history = null;
    try {
      history = await fetchJson("history.json");
    } catch (e) {
      history = null;  // no history.json: the page works without it
    }
    try {
      var status = await fetchJson("status.json");
      renderBanner(status);
      renderComponents(status, history);
      renderIncidents(history);
    } catch (e) {
      problems.push("Could not load the current status (" + e.message + "); retrying in " + refreshSeconds + " s.");
    }
    var problem = $("problem");
    problem.hidden = problems.length === 0;
    problem.textContent = problems.join(" ");
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  }

  window.healthdStatusPage = { refreshSeconds: refreshSeconds, defaultRefreshSeconds: REFRESH_SECONDS, refresh: refresh };
  $("refresh-seconds").textContent = String(refreshSeconds);
  refresh();
  setInterval(refresh, refreshSeconds * 1000);
})();
