// layerlock console: progressive enhancement only. Every page works without this file.
"use strict";
// Forms marked data-confirm ask in a dialog; without JS the server shows a confirmation page.
document.addEventListener("submit", function (event) {
  var form = event.target;
  if (!form.dataset || !form.dataset.confirm || form.querySelector("input[name=confirmed]")) return;
  if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); return; }
  var yes = document.createElement("input");
  yes.type = "hidden"; yes.name = "confirmed"; yes.value = "yes";
  form.appendChild(yes);
});
// "Copy" next to a secret shown once.
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-copy]").forEach(function (button) {
    if (!navigator.clipboard) return;
    button.hidden = false;
    button.addEventListener("click", function () {
      var text = document.getElementById(button.dataset.copy).textContent;
      navigator.clipboard.writeText(text).then(function () { button.textContent = "Copied"; });
    });
  });
});
