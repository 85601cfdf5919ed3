// relaywatch console: live parts of a page.  An element with data-events="URL"
// is replaced by each server-sent event's HTML from URL (the server sends the
// fragment whenever it changed); without EventSource, or once the stream is
// closed for good (logged out, the relay gone), an element with
// data-refresh="URL" is replaced every data-interval ms by the fragment at URL.
// The HTML is rendered and escaped by the server, like every page.  No
// framework, no build step; the Content-Security-Policy allows only this file.
"use strict";
function poll(el) {
  var every = parseInt(el.dataset.interval, 10) || 5000;
  var busy = false;
  setInterval(function () {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(el.dataset.refresh, { credentials: "same-origin", redirect: "follow" })
      .then(function (r) {
        if (r.redirected) { window.location.reload(); return null; }   // logged out
        return r.ok ? r.text() : null;
      })
      .then(function (html) { if (html !== null) { el.innerHTML = html; el.dataset.updated = Date.now(); } })
      .catch(function () { /* the relay is restarting: the next tick tries again */ })
      .finally(function () { busy = false; });
  }, every);
}
document.querySelectorAll("[data-events], [data-refresh]").forEach(function (el) {
  if (!el.dataset.events || !window.EventSource) {
    if (el.dataset.refresh) { poll(el); }
    return;
  }
  var source = new EventSource(el.dataset.events);
  source.onmessage = function (e) { el.innerHTML = e.data; el.dataset.updated = Date.now(); };
  source.onerror = function () {
    // The stream's planned end is an error that EventSource retries itself; a refusal
    // (a login page instead of the stream) closes it for good.
    if (source.readyState === EventSource.CLOSED && el.dataset.refresh) { poll(el); }
  };
});
