// The fedhub status page's live view.  Every text comes from the server and
// is untrusted: it is only ever put on the page as textContent.
"use strict";

(function () {
  var MAX_RECENT = 100;
  var OUTCOME_CLASS = {
    acked: "ok", confirmed: "ok",
    dropped: "warn", retried: "warn", requeued: "warn",
    dead_lettered: "bad", rejected: "bad", returned: "bad", nacked: "bad"
  };

  function element(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    if (className) {
      node.className = className;
    }
    return node;
  }

  function renderSection(section) {
    var panel = document.getElementById("section-" + section.id);
    if (!panel) {
      return;
    }
    var body = panel.querySelector("tbody");
    var rows = document.createDocumentFragment();
    section.rows.forEach(function (row) {
      var tr = document.createElement("tr");
      row.forEach(function (cell) {
        tr.appendChild(element("td", cell[0], cell[1]));
      });
      rows.appendChild(tr);
    });
    body.replaceChildren(rows);
    var empty = panel.querySelector(".empty");
    if (empty) {
      empty.hidden = section.rows.length > 0;
    }
  }

  function renderStatus(view) {
    var headline = document.getElementById("headline");
    headline.textContent = view.headline;
    headline.className = "headline " + (view.ready ? "ok" : "bad");
    document.getElementById("updated").textContent = view.updated;
    view.sections.forEach(renderSection);
  }

  function recentRow(entry) {
    var tr = document.createElement("tr");
    tr.dataset.id = String(entry.id);
    var time = element("td", String(entry.time).slice(11, 19), "time");
    time.title = entry.time;
    tr.appendChild(time);
    tr.appendChild(element("td", entry.domain));
    tr.appendChild(element("td", entry.source));
    tr.appendChild(element("td", entry.outcome, "outcome " + (OUTCOME_CLASS[entry.outcome] || "")));
    var known = entry.topic !== null && entry.topic !== undefined;
    tr.appendChild(element("td", known ? entry.topic : "–", known ? "topic" : "topic muted"));
    var summary = entry.summary || (known ? "" : "message " + entry.msg_id);
    if (entry.reason) {
      summary = summary ? summary + " (" + entry.reason + ")" : entry.reason;
    }
    tr.appendChild(element("td", summary, "summary"));
    return tr;
  }

  function addRecent(batch) {
    var body = document.getElementById("recent-rows");
    if (batch.epoch !== body.dataset.epoch) {
      // The hub restarted: its numbers start again, and so does the list.
      body.replaceChildren();
      body.dataset.epoch = batch.epoch;
      body.dataset.last = "0";
    }
    var last = Number(body.dataset.last || "0");
    batch.entries.forEach(function (entry) {
      if (entry.id <= last) {
        return;
      }
      var tr = recentRow(entry);
      tr.className = "fresh";
      body.insertBefore(tr, body.firstChild);
      last = entry.id;
    });
    body.dataset.last = String(last);
    while (body.rows.length > MAX_RECENT) {
      body.deleteRow(body.rows.length - 1);
    }
    document.getElementById("recent-empty").hidden = body.rows.length > 0;
  }

  function setFeed(live) {
    var feed = document.getElementById("feed");
    feed.textContent = live ? "live" : "reconnecting";
    feed.className = "feed " + (live ? "on" : "off");
  }

  function start() {
    if (!window.EventSource) {
      return;
    }
    var body = document.getElementById("recent-rows");
    var source = new EventSource(
      "events?after=" + encodeURIComponent(body.dataset.last || "0") +
      "&epoch=" + encodeURIComponent(body.dataset.epoch || "")
    );
    source.addEventListener("open", function () { setFeed(true); });
    source.addEventListener("error", function () { setFeed(false); });
    source.addEventListener("status", function (event) {
      renderStatus(JSON.parse(event.data));
    });
    source.addEventListener("recent", function (event) {
      addRecent(JSON.parse(event.data));
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
