// Gallery filters: by status (kept / drop reason), by gallery group and by tag text.
(function () {
  "use strict";
  var status = document.getElementById("f-status");
  var group = document.getElementById("f-group");
  var tag = document.getElementById("f-tag");
  var shown = document.getElementById("shown");
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card"));

  function apply() {
    var s = status.value, g = group.value, t = tag.value.trim().toLowerCase();
    var n = 0;
    cards.forEach(function (card) {
      var ok = (s === "" || card.dataset.status === s) &&
               (g === "" || (" " + card.dataset.groups + " ").indexOf(" " + g + " ") >= 0) &&
               (t === "" || card.dataset.tags.indexOf(t) >= 0);
      card.classList.toggle("hidden", !ok);
      if (ok) { n += 1; }
    });
    shown.textContent = n + " of " + cards.length + " clips shown";
  }

  if (status && group && tag && shown) {
    status.addEventListener("change", apply);
    group.addEventListener("change", apply);
    tag.addEventListener("input", apply);
    apply();
  }
})();
