// The web client: IronRDP's <iron-remote-desktop> component with its RDP engine (both from
// npm, served by the gateway under /webclient/), connected through this gateway's WebSocket
// with the single-use launch token the portal put in the page. The desktop's password goes
// from the form to the engine (NLA runs here, in the browser) and nowhere else.
import "/webclient/iron-remote-desktop.js";
import { Backend, init } from "/webclient/iron-remote-desktop-rdp.js";

const page = document.getElementById("webclient");
const form = document.getElementById("rdp-login");
const status = document.getElementById("rdp-status");
const connectButton = document.getElementById("rdp-connect");

function show(state, text) {
  page.dataset.state = state;
  status.textContent = text;
}

// The component fires "ready" while it starts: listen before anything is awaited.
const ready = new Promise((resolve) => {
  const element = document.createElement("iron-remote-desktop");
  element.setAttribute("scale", "real");
  element.setAttribute("flexcenter", "true");
  element.setAttribute("verbose", "false");
  element.addEventListener("ready", (event) => resolve(event.detail.irgUserInteraction));
  element.module = Backend;
  document.getElementById("screen").appendChild(element);
});

function describe(error) {
  if (error && typeof error.kind === "function") {
    const details = typeof error.rdcleanpathDetails === "function" && error.rdcleanpathDetails();
    if (details && details.httpStatusCode === 403) {
      return "This launch has expired or was already used: launch the desktop again.";
    }
    if (details && details.httpStatusCode) {
      return `The gateway could not open the desktop (HTTP ${details.httpStatusCode}).`;
    }
    if (details && details.tlsAlertCode) {
      return "The desktop's certificate is not the one the farm knows: refused.";
    }
    return `The desktop refused the connection (${error.backtrace().split("\n")[0]}).`;
  }
  return `The connection failed: ${error}`;
}

async function connect(ui) {
  const password = document.getElementById("rdp-password");
  const config = ui
    .configBuilder()
    .withUsername(document.getElementById("rdp-user").value)
    .withPassword(password.value)
    .withDestination(page.dataset.destination)
    .withProxyAddress(`wss://${location.host}/webclient/connect`)
    .withAuthToken(page.dataset.token)
    .build();
  password.value = "";
  connectButton.disabled = true;
  show("connecting", "Connecting…");
  let session;
  try {
    session = await ui.connect(config);
  } catch (error) {
    show("failed", describe(error));
    return;
  }
  ui.setVisibility(true);
  show("connected", "Connected.");
  try {
    const end = await session.run();
    show("ended", `The session ended: ${end.reason()}`);
  } catch (error) {
    show("ended", describe(error));
  }
}

async function start() {
  await init("INFO");
  const ui = await ready;
  ui.setKeyboardUnicodeMode(false); // scancodes: RDP servers such as freerdp-shadow need them
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    connect(ui);
  });
  connectButton.disabled = false;
  show("ready", "Enter the desktop's password and connect.");
}

start().catch((error) => show("failed", `The web client did not start: ${error}`));
