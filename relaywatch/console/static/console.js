// relaywatch console: live parts of a page.  An element with data-refresh="URL"
// is replaced every data-interval ms by the HTML fragment the server renders
// at URL (escaped there, like every page).  No framework, no build step; the
// Content-Security-Policy allows only this file.
"use strict";
document.querySelectorAll("[data-refresh]").forEach(function (el) {
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
});
