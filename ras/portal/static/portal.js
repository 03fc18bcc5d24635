// The User Portal's only script: small additions to pages that work without it.

// The client IP detection service (the portal settings' client_ip_detection_url): ask it for
// this browser's public address and send that with the login form.
const login = document.getElementById("login-form");
if (login && login.dataset.ipUrl) {
  fetch(login.dataset.ipUrl, { credentials: "omit", cache: "no-store" })
    .then((answer) => (answer.ok ? answer.text() : ""))
    .then((text) => {
      const address = text.trim().slice(0, 64);
      if (/^[0-9A-Fa-f:.]+$/.test(address)) {
        document.getElementById("reported-ip").value = address;
      }
    })
    .catch(() => {});
}

// "Allow users to select a launch method": remember the choice in this browser and show the
// chosen method's button first on every resource.
const chooser = document.getElementById("launch-chooser");
if (chooser) {
  const apply = (method) => {
    for (const button of document.querySelectorAll(".actions button[data-method]")) {
      const chosen = button.dataset.method === method;
      button.classList.toggle("primary", chosen);
      button.closest("form").style.order = chosen ? "-1" : "0";
    }
  };
  const saved = localStorage.getItem("ras-launch-method");
  for (const radio of chooser.querySelectorAll("input[name=launch-method]")) {
    if (radio.value === saved) radio.checked = true;
    radio.addEventListener("change", () => {
      localStorage.setItem("ras-launch-method", radio.value);
      apply(radio.value);
    });
  }
  const checked = chooser.querySelector("input[name=launch-method]:checked");
  if (checked) apply(checked.value);
}
