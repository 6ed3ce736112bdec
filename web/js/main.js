// Entry point: which screen to show (sign-in, first-run setup, sign-up through an invite,
// or the chat), the connection banner, and the token in localStorage.
import { Conn, oneShot } from "./conn.js";
import { ChatApp } from "./app.js";
import { byTestId } from "./dom.js";

const KEY = { token: "chat.token", workspaceId: "chat.workspace_id", workspace: "chat.workspace", handle: "chat.handle" };
const store = {
  get: (k) => {
    try {
      return localStorage.getItem(k);
    } catch {
      return null;
    }
  },
  set: (k, v) => {
    try {
      if (v === null || v === undefined) localStorage.removeItem(k);
      else localStorage.setItem(k, String(v));
    } catch {
      /* private mode: the session lasts as long as the page */
    }
  },
};

let conn = null;
let app = null;
let bannerTimer = null;

// ---------------------------------------------------------------------- banner

function setBanner(state, c) {
  const el = byTestId("conn-state");
  const banner = document.getElementById("banner");
  el.dataset.state = state;
  banner.dataset.state = state;
  document.body.dataset.conn = state;
  clearInterval(bannerTimer);
  const retry = document.getElementById("retry-now");
  const paint = () => {
    let text = state;
    if (state === "reconnecting" && c && c.retryAt > Date.now()) {
      text = `reconnecting in ${((c.retryAt - Date.now()) / 1000).toFixed(1)}s`;
    }
    if (el.textContent !== text) el.textContent = text;
    retry.hidden = !(state === "reconnecting" && c && c.retryAt > Date.now());
  };
  paint();
  if (state === "reconnecting") bannerTimer = setInterval(paint, 100);
}

document.getElementById("retry-now").addEventListener("click", () => conn && conn.retryNow());

function toast(text) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => {
    el.hidden = true;
  }, 5000);
}

// ---------------------------------------------------------------------- screens

function showScreen(which) {
  document.getElementById("auth-screen").hidden = which === "app";
  document.getElementById("app").hidden = which !== "app";
  document.body.dataset.screen = which === "app" ? "app" : "auth";
  for (const id of ["login-form", "setup-form", "signup-form"]) document.getElementById(id).hidden = id !== `${which}-form`;
  const form = document.getElementById(`${which}-form`);
  if (form) {
    const first = Array.from(form.querySelectorAll("input")).find((i) => !i.value);
    (first || form.querySelector("input")).focus();
  }
}

function inviteCode() {
  const m = /^#invite=([^&]+)/.exec(location.hash);
  return m ? decodeURIComponent(m[1]) : null;
}

function loginMessage(err) {
  switch (err.code) {
    case "invalid_auth":
      return "Wrong handle or password.";
    case "account_inactive":
      return "This account is deactivated.";
    case "rate_limited":
      return `Too many attempts. Try again in ${Math.ceil((err.retryAfterMs || 10000) / 1000)} s.`;
    case "network":
      return "Could not reach the server. Check the connection and try again.";
    case "invalid_frame":
    case "invalid_argument":
      return err.message;
    default:
      return err.message || "Something went wrong.";
  }
}

function busy(form, on) {
  for (const el of form.querySelectorAll("input, button")) el.disabled = on;
  form.classList.toggle("busy", on);
}

async function submitFirstFrame(form, errorId, frame, messages = {}) {
  const error = byTestId(errorId);
  error.textContent = "";
  busy(form, true);
  try {
    const { data } = await oneShot(frame, null);
    store.set(KEY.token, data.token);
    store.set(KEY.workspaceId, data.workspace_id);
    store.set(KEY.workspace, data.workspace_name);
    store.set(KEY.handle, data.user.handle);
    form.reset();
    if (location.hash.startsWith("#invite=")) history.replaceState(null, "", location.pathname);
    startChat();
  } catch (err) {
    error.textContent = messages[err.code] || loginMessage(err);
    if (err.code === "forbidden" && frame.type === "setup") setTimeout(() => showScreen("login"), 1500);
  } finally {
    busy(form, false);
  }
}

function value(form, name) {
  return form.elements[name].value.trim();
}

function bindForms() {
  const login = document.getElementById("login-form");
  login.addEventListener("submit", (e) => {
    e.preventDefault();
    const workspace = value(login, "workspace");
    const handle = value(login, "handle").replace(/^@/, "");
    const password = login.elements.password.value;
    if (!workspace || !handle || !password) {
      byTestId("login-error").textContent = "Enter the workspace, your handle and your password.";
      return;
    }
    submitFirstFrame(login, "login-error", { type: "login", workspace, handle, password });
  });

  const setup = document.getElementById("setup-form");
  setup.addEventListener("submit", (e) => {
    e.preventDefault();
    const frame = { type: "setup", workspace: value(setup, "workspace"), handle: value(setup, "handle").replace(/^@/, ""), password: setup.elements.password.value };
    const display = value(setup, "display_name");
    if (display) frame.display_name = display;
    if (!frame.workspace || !frame.handle) {
      byTestId("setup-error").textContent = "Name the workspace and pick a handle.";
      return;
    }
    if (frame.password.length < 8) {
      byTestId("setup-error").textContent = "The password needs at least 8 characters.";
      return;
    }
    submitFirstFrame(setup, "setup-error", frame, {
      forbidden: "This server has a workspace already: sign in instead.",
      name_taken: "That name is taken.",
    });
  });

  const signup = document.getElementById("signup-form");
  signup.addEventListener("submit", (e) => {
    e.preventDefault();
    const frame = { type: "signup", invite: inviteCode() || "", handle: value(signup, "handle").replace(/^@/, ""), password: signup.elements.password.value };
    const display = value(signup, "display_name");
    if (display) frame.display_name = display;
    if (!frame.handle) {
      byTestId("signup-error").textContent = "Pick a handle.";
      return;
    }
    if (frame.password.length < 8) {
      byTestId("signup-error").textContent = "The password needs at least 8 characters.";
      return;
    }
    submitFirstFrame(signup, "signup-error", frame, {
      invalid_invite: "This invite link is not valid any more (expired, revoked or used up). Ask for a new one.",
      name_taken: "That handle is taken. Pick another one.",
    });
  });

  document.getElementById("to-login").addEventListener("click", (e) => {
    e.preventDefault();
    history.replaceState(null, "", location.pathname);
    showScreen("login");
  });
}

async function showAuth(notice = "") {
  setBanner("offline", null);
  const ws = store.get(KEY.workspace);
  const login = document.getElementById("login-form");
  if (ws && !login.elements.workspace.value) login.elements.workspace.value = ws;
  const handle = store.get(KEY.handle);
  if (handle && !login.elements.handle.value) login.elements.handle.value = handle;
  document.getElementById("app").hidden = true;
  document.getElementById("auth-screen").hidden = false;
  document.body.dataset.screen = "auth";
  let hello = null;
  try {
    hello = (await oneShot(null)).hello;
  } catch {
    hello = null;
  }
  if (hello && hello.setup_required) showScreen("setup");
  else if (inviteCode()) showScreen("signup");
  else showScreen("login");
  if (notice) byTestId("login-error").textContent = notice;
}

// ---------------------------------------------------------------------- chat

function startChat() {
  const token = store.get(KEY.token);
  if (!token) {
    showAuth();
    return;
  }
  showScreen("app");
  if (!app) {
    app = new ChatApp({ onSignOut: signOut, toast });
  }
  const c = new Conn({
    token,
    workspaceId: store.get(KEY.workspaceId),
    session: null,
    handlers: {
      onState: (state, c) => {
        setBanner(state, c);
        app.onState(state, c);
      },
      onSession: (info, how) => {
        store.set(KEY.workspaceId, info.workspace_id);
        store.set(KEY.workspace, info.workspace_name);
        app.onSession(info, how);
      },
      onEvent: (ev) => app.onEvent(ev),
      onFatal: (reason) => {
        if (conn === c) app.onFatal(reason); // not after a sign-out of our own
      },
    },
  });
  conn = c;
  app.conn = c;
  c.start();
}

async function signOut(byUser, reason = null) {
  const c = conn;
  conn = null;
  if (c) {
    if (byUser) {
      try {
        await c.request("sessions.revoke", {});
      } catch {
        /* the token is dropped here anyway */
      }
    }
    c.stop();
  }
  store.set(KEY.token, null);
  location.hash = "";
  // A fresh page: no state of the old session survives.
  if (byUser) {
    location.reload();
    return;
  }
  const notice = {
    token_revoked: "Your session has ended. Sign in again.",
    token_expired: "Your session has expired. Sign in again.",
    account_inactive: "This account is deactivated.",
    invalid_auth: "Sign in again.",
  }[reason] || "Sign in again.";
  document.getElementById("app").hidden = true;
  showAuth(notice);
}

bindForms();
window.addEventListener("hashchange", () => {
  if (inviteCode() && !conn) showScreen("signup");
});
if (inviteCode()) {
  // An invite link opens the sign-up form, even for someone signed in elsewhere.
  showAuth();
} else {
  startChat();
}
