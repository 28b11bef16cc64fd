/*
 * udemy-dl: the live status of one order, from the service's Server-Sent Events stream
 * (GET /tasks/<id>/events?token=...). No framework, no build step: copy this file as it is.
 *
 * It fills the element #udemy-dl-status (see status.html): a <progress>, an element whose
 * data-task-status attribute holds the task's status (pending, processing, completed, failed) with
 * readable text, the bytes and files so far, and the short reason when the order failed.
 *
 * Where the task id, the token and the service are:
 *   data-task-id   on #udemy-dl-status, else the <id> of a path ending /status/<id>
 *   data-token     on #udemy-dl-status, else the page's ?token=...
 *   data-base-url  on #udemy-dl-status: the service's address ending with "/" (default: this page's
 *                  service, the stream being ../tasks/<id>/events relative to /status/<id>)
 *
 * Reconnecting: EventSource reconnects by itself when a connection drops (a restart of the
 * service), sending the id of the last event it got, so nothing is repeated or lost. When it gives
 * up (the service, or a proxy in front of it, answered with an error), this script asks the stream
 * once what it answers: a link whose token has expired (401, 403) says so and stops; otherwise it
 * opens a new stream after a pause, growing to 30 s, passing that id as ?lastEventId=. After the
 * final event (completed or failed) the stream is closed for good.
 *
 * Text only: server data is set with textContent, never parsed as HTML.
 */
(function () {
  "use strict";

  var LABELS = {
    pending: "Waiting for payment",
    processing: "Downloading",
    completed: "Ready",
    failed: "Failed"
  };
  var FINAL = { completed: true, failed: true };
  var MIN_PAUSE = 1000;
  var MAX_PAUSE = 30000;

  var root = document.getElementById("udemy-dl-status");
  if (!root) {
    return;
  }

  function part(role) {
    return root.querySelector('[data-role="' + role + '"]');
  }

  var statusEl = part("status");
  var progressEl = part("progress");
  var detailEl = part("detail");
  var reasonEl = part("reason");
  var connectionEl = part("connection");

  var pathMatch = /\/status\/([1-9][0-9]*)\/?$/.exec(window.location.pathname);
  var taskId = root.getAttribute("data-task-id") || (pathMatch ? pathMatch[1] : "");
  var token = root.getAttribute("data-token") || new URLSearchParams(window.location.search).get("token") || "";
  var baseUrl = root.getAttribute("data-base-url");

  var source = null;
  var lastEventId = "";
  var finished = false;
  var pause = MIN_PAUSE;
  var timer = null;

  function showConnection(state, text) {
    if (connectionEl) {
      connectionEl.setAttribute("data-connection", state);
      connectionEl.textContent = text;
    }
  }

  function size(bytes) {
    var units = ["B", "kB", "MB", "GB", "TB"];
    var value = Number(bytes) || 0;
    var unit = 0;
    while (value >= 1000 && unit < units.length - 1) {
      value /= 1000;
      unit += 1;
    }
    return (unit === 0 ? String(value) : value.toFixed(1)) + " " + units[unit];
  }

  function render(data) {
    var status = Object.prototype.hasOwnProperty.call(LABELS, data.status) ? data.status : "";
    var progress = Math.max(0, Math.min(100, Number(data.progress) || 0));
    if (status === "completed") {
      progress = 100;
    }
    statusEl.setAttribute("data-task-status", status);
    statusEl.textContent = status ? LABELS[status] : "Unknown status";
    progressEl.value = progress;
    progressEl.textContent = progress + " %";

    var parts = [];
    if (status === "processing" || status === "completed") {
      parts.push(progress + " %");
    }
    if (data.bytes) {
      parts.push(data.total ? size(data.bytes) + " of " + size(data.total) : size(data.bytes));
    }
    if (data.filesTotal) {
      parts.push((data.files || 0) + " of " + data.filesTotal + " files");
    }
    detailEl.textContent = parts.join(" · ");

    if (status === "failed" && data.reason) {
      reasonEl.textContent = String(data.reason);
      reasonEl.hidden = false;
    } else {
      reasonEl.textContent = "";
      reasonEl.hidden = true;
    }
  }

  function eventsUrl() {
    var path = "tasks/" + encodeURIComponent(taskId) + "/events";
    var url = baseUrl ? new URL(path, baseUrl) : new URL("../" + path, window.location.href);
    url.searchParams.set("token", token);
    if (lastEventId) {
      url.searchParams.set("lastEventId", lastEventId);
    }
    return url.toString();
  }

  function onStatus(event) {
    var data;
    if (event.lastEventId) {
      lastEventId = event.lastEventId;
    }
    try {
      data = JSON.parse(event.data);
    } catch (err) {
      return;
    }
    pause = MIN_PAUSE;
    render(data);
    if (FINAL[data.status]) {
      finished = true;
      source.close();
      showConnection("closed", "");
    }
  }

  function reopenLater() {
    showConnection("reconnecting", "Connection lost, reconnecting…");
    clearTimeout(timer);
    timer = setTimeout(open, pause);
    pause = Math.min(pause * 2, MAX_PAUSE);
  }

  function stop(state, text) {
    finished = true;
    clearTimeout(timer);
    showConnection(state, text);
  }

  // EventSource gave up without saying why: ask the stream once what it answers now. A token that has
  // expired (401) or is for another order (403) ends the retries with a message; 204 means the stream
  // has nothing more to send; anything else (a proxy's 502 while the service restarts) is retried.
  function probe() {
    var answered = function (answer) {
      if (answer.body) {
        answer.body.cancel().catch(function () {});
      }
      if (answer.status === 401 || answer.status === 403) {
        stop("expired", "This link has expired. Open the order page again for a new one.");
      } else if (answer.status === 204) {
        stop("closed", "");
      } else {
        reopenLater();
      }
    };
    if (typeof window.fetch !== "function") {
      reopenLater();
      return;
    }
    var asked = { cache: "no-store", headers: { Accept: "text/event-stream" } };
    window.fetch(eventsUrl(), asked).then(answered, reopenLater);
  }

  function open() {
    timer = null;
    source = new EventSource(eventsUrl());
    source.addEventListener("status", onStatus);
    source.onopen = function () {
      showConnection("live", "Live");
    };
    source.onerror = function () {
      if (finished) {
        return;
      }
      if (source.readyState === EventSource.CLOSED) {
        probe(); // it gave up: find out why, then open a new stream from the last event we have
      } else {
        showConnection("reconnecting", "Connection lost, reconnecting…");
      }
    };
  }

  if (!taskId || !token) {
    statusEl.textContent = "This link is incomplete: it needs the order's task id and token.";
    showConnection("closed", "");
    return;
  }
  if (typeof window.EventSource !== "function") {
    statusEl.textContent = "This browser cannot show live status.";
    showConnection("closed", "");
    return;
  }
  open();
})();
