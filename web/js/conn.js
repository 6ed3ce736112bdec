// The websocket connection: one live connection kept up until stopped. It mirrors the
// Python client's ResilientClient (chat/client.py): reconnect with exponential backoff and
// full jitter, honour the server's hints (a `goodbye` before a close), resume where it left
// off (`auth` with `resume: {session_id, seq}`), de-duplicate durable events by `seq`, stop
// for good on a refused token, and drop a silent connection after a missed heartbeat.
//
// States (what the banner shows):
//   connecting    first connection of this page
//   live          authenticated and up to date
//   reconnecting  waiting to reconnect (retryAt says when), or reconnecting now
//   resumed       the reconnect resumed: missed events were replayed (shown briefly)
//   reloading     the reconnect could not resume: the app reloads its state
//   offline       stopped (signed out, or the token was refused)

export const FATAL_REASONS = new Set(["invalid_auth", "token_expired", "token_revoked", "account_inactive"]);
const OVERLOAD_MIN_ATTEMPT = 3;
const HINT_CAP_MS = 300_000;
const CONNECT_TIMEOUT_MS = 15_000;
const REQUEST_TIMEOUT_MS = 15_000;

export class RequestError extends Error {
  constructor(code, message, retryAfterMs = null) {
    super(message || code);
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }
}

export class Backoff {
  constructor(base = 0.5, cap = 20) {
    this.base = base;
    this.cap = cap;
    this.attempts = 0;
  }
  ceiling(attempt) {
    return Math.min(this.cap, this.base * 2 ** Math.min(attempt, 63));
  }
  /** Seconds before the next attempt, counted as attempt max(attempts, floor). */
  next(floor = 0) {
    const attempt = Math.max(this.attempts, floor);
    this.attempts = attempt + 1;
    return Math.random() * this.ceiling(attempt);
  }
  reset() {
    this.attempts = 0;
  }
}

export function goodbyeDelay(ms) {
  const base = Math.min(Math.max(ms, 0), HINT_CAP_MS) / 1000;
  return base + Math.random() * base;
}

export function socketUrl(workspaceId) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = workspaceId ? `?workspace=${encodeURIComponent(workspaceId)}` : "";
  return `${scheme}://${location.host}/${query}`;
}

/**
 * One short connection for a first frame that is not `auth`: `login`, `setup` or `signup`
 * (frame given), or none (frame null: read `hello` and leave). Resolves {hello, data};
 * rejects with a RequestError (the server's error, or code "network").
 */
export function oneShot(frame, workspaceId = null) {
  return new Promise((resolve, reject) => {
    let ws;
    try {
      ws = new WebSocket(socketUrl(workspaceId));
    } catch (err) {
      reject(new RequestError("network", String(err)));
      return;
    }
    let hello = null;
    let done = false;
    const timer = setTimeout(() => finish(new RequestError("network", "The server did not answer.")), CONNECT_TIMEOUT_MS);
    function finish(result) {
      if (done) return;
      done = true;
      clearTimeout(timer);
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
      if (result instanceof Error) reject(result);
      else resolve(result);
    }
    ws.onmessage = (ev) => {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (msg.type === "hello") {
        hello = msg;
        if (frame === null) finish({ hello, data: null });
        else ws.send(JSON.stringify({ ...frame, id: "1" }));
      } else if (msg.type === "reply" && msg.reply_to === "1") {
        finish({ hello, data: msg.data });
      } else if (msg.type === "error" && msg.reply_to === "1") {
        finish(new RequestError(msg.code, msg.message, msg.retry_after_ms));
      } else if (msg.type === "goodbye") {
        finish(new RequestError("unavailable", "The server is busy; try again in a moment.", msg.reconnect_after_ms));
      }
    };
    ws.onclose = () => finish(new RequestError("network", "Could not reach the server."));
    ws.onerror = () => {};
  });
}

export class Conn {
  /**
   * handlers: onState(state, conn), onSession(info, {resumed, reason}), onEvent(frame),
   * onFatal(reason). `token` and `resume` come from storage.
   */
  constructor({ token, workspaceId, session, handlers }) {
    this.token = token;
    this.workspaceId = workspaceId;
    this.session = session || null; // {session_id, seq}
    this.h = handlers;
    this.backoff = new Backoff();
    this.state = "connecting";
    this.retryAt = 0;
    this.hello = null;
    this.ws = null;
    this.live = false;
    this.stopped = false;
    this.position = session ? session.seq : 0;
    this.nextId = 1;
    this.pending = new Map(); // request id -> {resolve, reject, timer}
    this.everConnected = false;
    this._retryTimer = null;
    this._beat = null;
    this._resumedTimer = null;
    this.onlineHandler = () => this.retryNow();
    window.addEventListener("online", this.onlineHandler);
  }

  start() {
    this._attempt();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("online", this.onlineHandler);
    clearTimeout(this._retryTimer);
    clearTimeout(this._resumedTimer);
    this._teardown();
    this._setState("offline");
  }

  /** Skip the wait and reconnect at once (the banner's "Retry now"; the browser came online). */
  retryNow() {
    if (this.stopped || this.ws) return;
    clearTimeout(this._retryTimer);
    this._attempt();
  }

  /** The app finished loading its state after a fresh (not resumed) session. */
  markLive() {
    if (this.ws && this.authed) {
      this.live = true;
      this._setState("live");
    }
  }

  request(type, fields = {}, timeoutMs = REQUEST_TIMEOUT_MS) {
    if (!this.ws || !this.authed || this.ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new RequestError("disconnected", "Not connected."));
    }
    const id = String(this.nextId++);
    const frame = { type, id, ...fields };
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new RequestError("timeout", "The server did not answer in time."));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify(frame));
    });
  }

  // ------------------------------------------------------------------ internals

  _setState(state) {
    this.state = state;
    this.h.onState(state, this);
  }

  _attempt() {
    if (this.stopped) return;
    this.retryAt = 0;
    this._setState(this.everConnected ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new WebSocket(socketUrl(this.workspaceId));
    } catch {
      this._closed(null, "");
      return;
    }
    this.ws = ws;
    this.authed = false;
    this.live = false;
    this.goodbyeMs = null;
    this.lastFrameAt = Date.now();
    const authId = String(this.nextId++);
    let resuming = false;
    const connectTimer = setTimeout(() => {
      if (this.ws === ws && !this.authed) this._drop(ws);
    }, CONNECT_TIMEOUT_MS);

    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastFrameAt = Date.now();
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (msg.type === "hello") {
        this.hello = msg;
        const auth = { type: "auth", id: authId, token: this.token };
        if (this.session) {
          auth.resume = { session_id: this.session.session_id, seq: this.position };
          resuming = true;
        }
        ws.send(JSON.stringify(auth));
        return;
      }
      if (msg.type === "goodbye") {
        this.goodbyeMs = Math.max(0, msg.reconnect_after_ms || 0);
        return;
      }
      if (!this.authed) {
        if (msg.reply_to === authId && msg.type === "reply") {
          clearTimeout(connectTimer);
          this._authenticated(msg.data, resuming);
        } else if (msg.reply_to === authId && msg.type === "error") {
          clearTimeout(connectTimer);
          this.authError = msg.code;
          // The server closes next (1008 with the code, or 1013): decided in onclose.
        }
        return;
      }
      this._frame(msg);
    };
    ws.onclose = (ev) => {
      clearTimeout(connectTimer);
      if (this.ws !== ws) return;
      const code = ev.code;
      let reason = ev.reason || "";
      if (!reason && this.authError && !this.authed) reason = this.authError;
      this._closed(code, reason);
    };
    ws.onerror = () => {};
  }

  _authenticated(info, resuming) {
    this.authed = true;
    this.authError = null;
    this.everConnected = true;
    this.backoff.reset();
    this.session = { session_id: info.session_id, seq: info.seq };
    if (info.workspace_id) this.workspaceId = info.workspace_id;
    const interval = (this.hello && this.hello.heartbeat_interval_ms) || 0;
    if (interval > 0) this._startHeartbeat(interval);
    if (resuming && info.resumed) {
      // Missed events follow, then `resumed`.
      this.h.onSession(info, { resumed: true, reason: null });
      return;
    }
    this.position = info.seq;
    this._setState(resuming ? "reloading" : "connecting");
    this.h.onSession(info, { resumed: false, reason: info.resume_error || "fresh" });
  }

  _frame(msg) {
    if (msg.type === "reply" || msg.type === "error") {
      const p = this.pending.get(msg.reply_to);
      if (!p) return; // a pong, or a reply that timed out
      this.pending.delete(msg.reply_to);
      clearTimeout(p.timer);
      if (msg.type === "reply") p.resolve(msg.data);
      else p.reject(new RequestError(msg.code, msg.message, msg.retry_after_ms));
      return;
    }
    if (msg.type === "resumed") {
      this.position = Math.max(this.position, msg.seq);
      this.live = true;
      this._setState("resumed");
      clearTimeout(this._resumedTimer);
      this._resumedTimer = setTimeout(() => {
        if (this.state === "resumed") this._setState("live");
      }, 2500);
      this.h.onEvent(msg);
      return;
    }
    if (msg.seq !== null && msg.seq !== undefined) {
      if (msg.seq <= this.position) return; // seen already (replayed twice)
      this.position = msg.seq;
      this.session.seq = msg.seq;
    }
    this.h.onEvent(msg);
  }

  _startHeartbeat(interval) {
    clearInterval(this._beat);
    const ws = this.ws;
    let sentAt = 0;
    this._beat = setInterval(() => {
      if (this.ws !== ws) return;
      if (sentAt && this.lastFrameAt < sentAt) {
        // Nothing at all since the last ping: the connection is dead, whatever TCP thinks.
        this._drop(ws);
        return;
      }
      sentAt = Date.now();
      try {
        ws.send(JSON.stringify({ type: "ping", id: String(this.nextId++) }));
      } catch {
        this._drop(ws);
      }
    }, interval);
  }

  /** Give up on a connection now (its close may take long to come). */
  _drop(ws) {
    if (this.ws !== ws) return;
    try {
      ws.close(4000);
    } catch {
      /* ignore */
    }
    this._closed(null, "dropped");
  }

  _teardown() {
    clearInterval(this._beat);
    this._beat = null;
    const ws = this.ws;
    this.ws = null;
    this.authed = false;
    this.live = false;
    if (ws) {
      ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(1000);
      } catch {
        /* ignore */
      }
    }
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new RequestError("disconnected", "The connection was lost."));
    }
    this.pending.clear();
  }

  _closed(code, reason) {
    this._teardown();
    if (this.stopped) return;
    if (code === 1008 && FATAL_REASONS.has(reason)) {
      this.stopped = true;
      this._setState("offline");
      this.h.onFatal(reason);
      return;
    }
    let delay;
    if (this.goodbyeMs !== null && this.goodbyeMs !== undefined) delay = goodbyeDelay(this.goodbyeMs);
    else if (code === 1013) delay = this.backoff.next(OVERLOAD_MIN_ATTEMPT);
    else delay = this.backoff.next();
    this.retryAt = Date.now() + delay * 1000;
    this._setState("reconnecting");
    this._retryTimer = setTimeout(() => this._attempt(), delay * 1000);
  }
}
