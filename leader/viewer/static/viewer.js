// The web viewer's only script: follow /events (server-sent events) and swap in the fresh
// HTML the leader renders: the live part whole ("update"), or only the rows and timelines that
// changed ("patch": [[element id, its HTML], ...]); open every timeline for printing. Without
// it the page still works (reload to see changes).
(function () {
  "use strict";
  var live = document.getElementById("live");
  var content = document.getElementById("content");
  var updated = document.getElementById("updated");
  if (!live || !content || !window.EventSource) {
    return;
  }
  function status(key) {
    live.textContent = live.getAttribute("data-" + key);
    live.className = "live " + key;
  }
  var events = new EventSource(live.getAttribute("data-events"));
  events.addEventListener("open", function () { status("on"); });
  function shown() {
    var now = new Date();
    updated.textContent = now.toLocaleString(document.documentElement.lang);
    updated.setAttribute("datetime", now.toISOString());
    status("on");
  }
  events.addEventListener("update", function (e) {
    var open = [];
    content.querySelectorAll("details[open]").forEach(function (d) { open.push(d.id); });
    content.innerHTML = e.data;
    open.forEach(function (id) {
      var d = document.getElementById(id);
      if (d) { d.open = true; }
    });
    shown();
  });
  events.addEventListener("patch", function (e) {
    var parts = JSON.parse(e.data);
    for (var i = 0; i < parts.length; i++) {
      var old = document.getElementById(parts[i][0]);
      var made = document.createElement("template");  // parses a lone <tr> as a row
      made.innerHTML = parts[i][1];
      var fresh = made.content.firstElementChild;
      if (!old || !fresh || !content.contains(old)) {
        // Not the page the leader drew on (never expected): load it whole.
        events.close();
        window.location.reload();
        return;
      }
      if (old.tagName === "DETAILS" && old.open) { fresh.open = true; }
      old.replaceWith(fresh);
    }
    shown();
  });
  // The session ended (expired or revoked): reload, and the leader shows why.
  events.addEventListener("unauthorized", function () {
    events.close();
    window.location.reload();
  });
  events.addEventListener("error", function () {
    if (events.readyState === EventSource.CLOSED) {
      window.setTimeout(function () { window.location.reload(); }, 3000);
    } else {
      status("off");
    }
  });
  var opened = [];
  window.addEventListener("beforeprint", function () {
    content.querySelectorAll("details:not([open])").forEach(function (d) {
      d.open = true;
      opened.push(d.id);  // by id: a patch may have put a fresh one in its place since
    });
  });
  window.addEventListener("afterprint", function () {
    opened.forEach(function (id) {
      var d = document.getElementById(id);
      if (d) { d.open = false; }
    });
    opened = [];
  });
}());
