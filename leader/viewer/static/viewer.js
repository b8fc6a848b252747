// The web viewer's only script: follow /events (server-sent events) and swap in the fresh
// HTML the leader renders; open every timeline for printing. Without it the page still works
// (reload to see changes).
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
  events.addEventListener("update", function (e) {
    var open = [];
    content.querySelectorAll("details[open]").forEach(function (d) { open.push(d.id); });
    content.innerHTML = e.data;
    open.forEach(function (id) {
      var d = document.getElementById(id);
      if (d) { d.open = true; }
    });
    var now = new Date();
    updated.textContent = now.toLocaleString(document.documentElement.lang);
    updated.setAttribute("datetime", now.toISOString());
    status("on");
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
      opened.push(d);
    });
  });
  window.addEventListener("afterprint", function () {
    opened.forEach(function (d) { d.open = false; });
    opened = [];
  });
}());
