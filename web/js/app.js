// The chat screen: state (channels, users, messages), events, rendering.
import { h, byTestId, clear, richText, formatTime, formatDay, uuid, emojiGlyph, icon, PICKER } from "./dom.js";
import { Composer } from "./composer.js";
import { RequestError } from "./conn.js";
import * as dialogs from "./dialogs.js";

const RETRYABLE = new Set(["rate_limited", "internal_error", "unavailable", "outcome_unknown", "timeout"]);
const PENDING_FAIL_MS = 30_000;
const HISTORY_PAGE = 50;
const TYPING_SHOW_MS = 6000;
const TYPING_SEND_MS = 3000;
const GROUP_GAP_MS = 5 * 60_000;

function isDm(ch) {
  return ch.kind === "dm" || ch.kind === "group_dm";
}

export class ChatApp {
  constructor({ onSignOut, toast }) {
    this.onSignOut = onSignOut;
    this.toast = toast;
    this.conn = null;
    this.me = null;
    this.workspace = null;
    this.users = new Map();
    this.channels = new Map(); // my channels and DMs
    this.views = new Map(); // channel id -> {byId, loaded, loading, hasMoreBefore, buffer}
    this.pending = new Map(); // client_msg_id -> pending post, in the order written
    this.sending = new Set(); // channel ids whose sender is running
    this.presence = new Map();
    this.typing = new Map(); // "cid:root" -> Map(user_id -> expires)
    this.current = null; // channel id shown
    this.viewing = null; // a channel shown that I am not a member of (from Browse)
    this.thread = null; // {root, channelId, byId}
    this.buffer = null; // events held while bootstrapping
    this.userWaiters = new Set();
    this.lastTypingSent = 0;
    this.markTimer = null;
    this.els = new Map(); // message id -> element, main list
    this.threadEls = new Map();
    this.$list = document.getElementById("message-list");
    this.$pane = document.getElementById("message-pane");
    this.$threadList = document.getElementById("thread-list");
    this.$threadPane = document.getElementById("thread-pane");
    this.bindUi();
    setInterval(() => this.renderTyping(), 1000);
  }

  // ------------------------------------------------------------------ wiring

  request(type, fields) {
    if (!this.conn) return Promise.reject(new RequestError("disconnected", "Not connected."));
    return this.conn.request(type, fields);
  }

  bindUi() {
    this.composer = new Composer(document.getElementById("composer"), {
      onSend: (text) => this.send(text, null),
      onTyping: () => this.sendTyping(null),
      channelId: () => this.current,
      request: (t, f) => this.request(t, f),
    });
    this.threadComposer = new Composer(document.getElementById("thread-composer"), {
      onSend: (text) => (this.thread ? this.send(text, this.thread.root.id) : false),
      onTyping: () => this.thread && this.sendTyping(this.thread.root.id),
      testid: "thread-autocomplete",
      channelId: () => this.current,
      request: (t, f) => this.request(t, f),
    });
    document.getElementById("send").addEventListener("click", () => this.composer.send());
    document.getElementById("thread-send").addEventListener("click", () => this.threadComposer.send());
    byTestId("thread-close").addEventListener("click", () => this.closeThread());
    byTestId("sidebar-toggle").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
    document.getElementById("scrim").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
    byTestId("new-channel-button").addEventListener("click", () => dialogs.newChannel(this));
    byTestId("browse-channels-button").addEventListener("click", () => dialogs.browseChannels(this));
    byTestId("invite-people-button").addEventListener("click", () => dialogs.invitePeople(this));
    document.getElementById("new-dm-button").addEventListener("click", () => dialogs.newDm(this));
    document.getElementById("me").addEventListener("click", () => this.me && dialogs.profile(this));
    document.querySelector(".channel-head-text").addEventListener("click", () => this.me && dialogs.channelDetails(this));
    document.getElementById("add-people").addEventListener("click", () => dialogs.addPeople(this));
    document.getElementById("leave-channel").addEventListener("click", () => this.leaveChannel());
    document.getElementById("join-channel").addEventListener("click", () => this.joinChannel(this.current));
    document.getElementById("join-bar-button").addEventListener("click", () => this.joinChannel(this.current));
    document.getElementById("sign-out").addEventListener("click", () => this.onSignOut(true));
    this.$pane.addEventListener("scroll", () => {
      if (this.$pane.scrollTop < 300) this.loadOlder();
      if (this.nearBottom()) {
        document.getElementById("jump").hidden = true;
        this.scheduleMark();
      }
    });
    document.getElementById("jump").addEventListener("click", () => {
      this.scrollToBottom();
      document.getElementById("jump").hidden = true;
    });
    // ArrowUp in an empty composer edits your last message.
    document.getElementById("composer").addEventListener("keydown", (e) => {
      if (e.key !== "ArrowUp" || e.target.value || this.composer.open) return;
      const mine = Array.from(this.view(this.current).byId.values()).filter((m) => this.me && m.user_id === this.me.id && !m.deleted);
      if (!mine.length) return;
      e.preventDefault();
      this.startEdit(mine.reduce((a, b) => (a.seq > b.seq ? a : b)));
    });
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.scheduleMark();
    });
    window.addEventListener("focus", () => this.scheduleMark());
    window.addEventListener("hashchange", () => this.routeFromHash());
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && !document.getElementById("dialog-layer").hidden) return;
      if (e.key === "Escape" && this.thread && document.activeElement !== document.getElementById("composer")) this.closeThread();
    });
  }

  // ------------------------------------------------------------------ connection handlers

  onState(state, conn) {
    this.connState = state;
    if (state === "live" || state === "resumed") this.flushOutbox();
  }

  async onSession(info, { resumed }) {
    this.me = info.user;
    this.users.set(info.user.id, info.user);
    this.workspace = { id: info.workspace_id, name: info.workspace_name };
    this.renderMe();
    if (resumed) return; // replayed events follow, then `resumed`
    this.buffer = [];
    try {
      await this.reload();
    } catch (err) {
      // The connection dropped while loading: the next session reloads again.
      this.buffer = null;
      return;
    }
    const held = this.buffer;
    this.buffer = null;
    for (const ev of held) if (ev.seq === null || ev.seq === undefined || ev.seq > this.bootSeq) this.apply(ev);
    this.conn.markLive();
  }

  onEvent(ev) {
    if (this.buffer) {
      this.buffer.push(ev);
      return;
    }
    this.apply(ev);
  }

  onFatal(reason) {
    this.onSignOut(false, reason);
  }

  // ------------------------------------------------------------------ state loading

  async reload() {
    const data = await this.request("bootstrap", {});
    this.bootSeq = data.seq;
    this.me = data.user || this.me;
    this.users.set(this.me.id, this.me);
    if (data.workspace) this.workspace = data.workspace;
    for (const u of data.users || []) this.users.set(u.id, u);
    this.channels.clear();
    for (const c of data.channels || []) this.channels.set(c.id, this.normChannel(c));
    this.views.clear();
    this.renderMe();
    this.renderSidebar();
    this.subscribePresence();
    // Open the channel from the URL, the one shown before, or #general / the first one.
    const want = this.hashChannel() || this.current;
    let target = want && (this.channels.has(want) || want === this.viewing) ? want : null;
    if (!target) {
      const list = this.sortedChannels(false);
      const general = list.find((c) => c.name === "general");
      target = (general || list[0] || this.sortedChannels(true)[0] || {}).id || null;
    }
    await this.openChannel(target, { force: true });
    if (this.thread) this.openThread(this.thread.root, true);
  }

  normChannel(c) {
    return {
      id: c.id,
      kind: c.kind,
      name: c.name,
      topic: c.topic || "",
      archived: !!c.archived,
      member_count: c.member_count || 0,
      last_seq: c.last_seq || 0,
      last_ts: c.last_ts || null,
      last_read_seq: c.last_read_seq || 0,
      unread: c.unread || 0,
      mentions: c.mentions || 0,
      dm_user_ids: c.dm_user_ids || [],
      created_by: c.created_by,
    };
  }

  hashChannel() {
    const m = /^#c=(\d+)$/.exec(location.hash);
    return m ? Number(m[1]) : null;
  }

  routeFromHash() {
    const id = this.hashChannel();
    if (id && id !== this.current) this.openChannel(id);
  }

  // ------------------------------------------------------------------ users

  user(id) {
    const u = this.users.get(id);
    if (!u) this.needUser(id);
    return u;
  }

  userName(id) {
    const u = this.user(id);
    return u ? u.display_name || u.handle : "…";
  }

  needUser(id) {
    if (this.userWaiters.has(id)) return;
    this.userWaiters.add(id);
    clearTimeout(this.userTimer);
    this.userTimer = setTimeout(() => this.fetchUsers(), 20);
  }

  async fetchUsers() {
    const ids = Array.from(this.userWaiters).slice(0, 1000);
    if (!ids.length) return;
    try {
      const data = await this.request("users.info", { user_ids: ids });
      for (const u of data.users) this.setUser(u);
      for (const id of ids) this.userWaiters.delete(id);
    } catch {
      // Not connected: asked again after the next (re)load.
      setTimeout(() => {
        for (const id of ids) this.userWaiters.delete(id);
      }, 3000);
    }
  }

  setUser(u) {
    this.users.set(u.id, u);
    if (this.me && u.id === this.me.id) {
      this.me = u;
      this.renderMe();
    }
    for (const el of document.querySelectorAll(`[data-author-id="${u.id}"]`)) el.textContent = u.display_name || u.handle;
    for (const el of document.querySelectorAll(`[data-avatar-id="${u.id}"]`)) el.textContent = initials(u.display_name || u.handle);
    for (const c of this.channels.values()) if (isDm(c) && c.dm_user_ids.includes(u.id)) this.renderChannelItem(c);
    if (this.current && isDm(this.channels.get(this.current) || {})) this.renderHeader();
  }

  // ------------------------------------------------------------------ sidebar

  renderMe() {
    if (!this.me) return;
    document.getElementById("workspace-name").textContent = this.workspace ? this.workspace.name : "";
    const me = document.getElementById("me");
    clear(me);
    me.appendChild(h("span", { class: "presence-dot", dataset: { presence: "active" } }));
    me.appendChild(document.createTextNode(this.me.display_name || this.me.handle));
    const admin = this.me.role === "owner" || this.me.role === "admin";
    byTestId("invite-people-button").hidden = !admin;
    const guest = this.me.role === "guest";
    byTestId("browse-channels-button").hidden = guest;
    byTestId("new-channel-button").hidden = guest;
  }

  channelLabel(ch) {
    if (!isDm(ch)) return ch.name;
    const others = ch.dm_user_ids.filter((id) => !this.me || id !== this.me.id);
    if (others.length === 0) return this.me ? `${this.me.display_name || this.me.handle} (you)` : ch.name;
    return others.map((id) => this.userName(id)).join(", ");
  }

  sortedChannels(dms) {
    const list = Array.from(this.channels.values()).filter((c) => isDm(c) === dms);
    if (dms) list.sort((a, b) => (b.last_ts || 0) - (a.last_ts || 0) || a.id - b.id);
    else list.sort((a, b) => a.name.localeCompare(b.name));
    return list;
  }

  renderSidebar() {
    for (const dms of [false, true]) {
      const ul = byTestId(dms ? "dm-list" : "channel-list");
      clear(ul);
      for (const ch of this.sortedChannels(dms)) ul.appendChild(this.channelItem(ch));
    }
  }

  channelItem(ch) {
    const dm = isDm(ch);
    const label = this.channelLabel(ch);
    const attrs = {
      class: "channel-item" + (ch.id === this.current ? " active" : "") + (ch.unread > 0 ? " unread" : "") + (ch.archived ? " archived" : ""),
      testid: dm ? "dm-item" : "channel-item",
      dataset: { channelId: ch.id, name: ch.name },
      onclick: () => {
        document.body.classList.remove("sidebar-open");
        this.openChannel(ch.id);
      },
    };
    let mark;
    if (dm) {
      const other = ch.dm_user_ids.find((id) => !this.me || id !== this.me.id) || (this.me && this.me.id);
      const status = ch.kind === "dm" ? this.presence.get(other) || (other === this.me.id ? "active" : "away") : null;
      mark = status
        ? h("span", { class: "presence-dot", testid: "presence-dot", dataset: { presence: status, presenceUser: other } })
        : h("span", { class: "ch-icon", text: String(ch.dm_user_ids.length) });
    } else {
      mark = ch.kind === "private" ? h("span", { class: "ch-icon" }, icon("lock")) : h("span", { class: "ch-icon", text: "#" });
    }
    return h(
      "li",
      attrs,
      h(
        "button",
        { type: "button", class: "channel-link" },
        mark,
        h("span", { class: "ch-name", text: label }),
        ch.unread > 0 ? h("span", { class: dm ? "badge unread dm" : "badge unread", testid: "unread-badge", title: `${ch.unread} unread`, text: String(ch.unread) }) : null,
        ch.mentions > 0 ? h("span", { class: "badge mention", testid: "mention-badge", title: `${ch.mentions} mention${ch.mentions === 1 ? "" : "s"}`, text: String(ch.mentions) }) : null,
      ),
    );
  }

  renderChannelItem(ch) {
    const ul = byTestId(isDm(ch) ? "dm-list" : "channel-list");
    const old = ul.querySelector(`[data-channel-id="${ch.id}"]`);
    if (!old) {
      this.renderSidebar();
      return;
    }
    old.replaceWith(this.channelItem(ch));
    this.updateTitle();
  }

  updateTitle() {
    let total = 0;
    for (const c of this.channels.values()) total += isDm(c) ? c.unread : c.mentions;
    document.title = (total ? `(${total}) ` : "") + (this.workspace ? `${this.workspace.name} · Chat` : "Chat");
  }

  subscribePresence() {
    const ids = new Set();
    for (const c of this.channels.values()) if (isDm(c)) for (const id of c.dm_user_ids) ids.add(id);
    if (this.me) ids.delete(this.me.id);
    const watched = Array.from(ids).slice(0, 500);
    this.request("presence.subscribe", { user_ids: watched })
      .then((data) => {
        // The reply names the watched users active right now (the others are away).
        if (!data || !Array.isArray(data.active)) return;
        const active = new Set(data.active);
        for (const id of watched) this.onPresence({ user_id: id, status: active.has(id) ? "active" : "away" });
      })
      .catch(() => {});
  }

  // ------------------------------------------------------------------ channel view

  view(cid) {
    let v = this.views.get(cid);
    if (!v) {
      v = { byId: new Map(), loaded: false, loading: null, hasMoreBefore: true, loadingOlder: false, buffer: [] };
      this.views.set(cid, v);
    }
    return v;
  }

  async openChannel(cid, { force = false } = {}) {
    if (!cid) {
      this.current = null;
      this.renderHeader();
      clear(this.$list);
      this.els.clear();
      this.showEmpty("You are not in any channel yet. Browse channels or create one.");
      return;
    }
    const changed = cid !== this.current;
    if (changed) {
      const known = this.channels.get(cid);
      // Where "New" goes: after what was read before this visit.
      this.newAfter = known && known.unread > 0 ? known.last_read_seq : null;
    }
    if (changed && this.thread && this.thread.channelId !== cid) this.closeThread();
    this.current = cid;
    if (!this.channels.has(cid)) this.viewing = cid;
    if (location.hash !== `#c=${cid}` && !location.hash.startsWith("#invite=")) history.replaceState(null, "", `#c=${cid}`);
    if (!this.channels.has(cid) && (!this.viewInfo || this.viewInfo.id !== cid)) await this.fetchViewInfo(cid);
    this.renderHeader();
    this.renderSidebar();
    if (changed || force) {
      document.getElementById("jump").hidden = true;
      clear(this.$list);
      this.els.clear();
      this.showEmpty(null);
    }
    const v = this.view(cid);
    if (!v.loaded) this.setHistoryStatus("Loading messages…");
    if (!v.loaded || force) await this.loadLatest(cid);
    if (this.current !== cid) return;
    if (changed || force) {
      this.renderAll();
      this.scrollToBottom();
      // A first page that does not fill the pane gives nothing to scroll: walk back now.
      if (this.$pane.scrollTop < 300) this.loadOlder();
    }
    this.renderTyping();
    this.scheduleMark();
    if (changed && this.mayFocus()) document.getElementById("composer").focus();
  }

  /** Move the focus to a composer only on a wide screen, and not out of a dialog or a field. */
  mayFocus() {
    const active = document.activeElement;
    const busy = active && active !== document.body && active.matches("input, textarea, select");
    return window.matchMedia("(min-width: 701px)").matches && document.getElementById("dialog-layer").hidden && !busy;
  }

  async fetchViewInfo(cid) {
    try {
      const data = await this.request("channels.info", { channel_id: cid });
      this.viewInfo = this.normChannel(data.channel);
    } catch {
      this.viewInfo = null;
    }
  }

  currentChannel() {
    if (!this.current) return null;
    return this.channels.get(this.current) || (this.viewInfo && this.viewInfo.id === this.current ? this.viewInfo : null);
  }

  renderHeader() {
    const ch = this.currentChannel();
    const title = byTestId("channel-title");
    const topic = document.getElementById("channel-topic");
    const member = ch && this.channels.has(ch.id);
    title.textContent = ch ? (isDm(ch) ? this.channelLabel(ch) : `${ch.kind === "private" ? "" : "#"}${ch.name}`) : "";
    if (ch && ch.kind === "private") title.prepend(icon("lock", "svg-icon title-icon"));
    topic.textContent = ch ? (ch.archived ? "Archived: read only. " : "") + (ch.topic || "") : "";
    byTestId("message-pane").dataset.channelId = ch ? ch.id : "";
    const channelish = ch && !isDm(ch);
    document.getElementById("join-channel").hidden = !(ch && !member && ch.kind === "public");
    document.getElementById("leave-channel").hidden = !(channelish && member);
    document.getElementById("add-people").hidden = !(channelish && member && !ch.archived);
    document.getElementById("join-bar").hidden = !(ch && !member);
    document.getElementById("composer").closest(".composer-box").hidden = !(ch && member) || (ch && ch.archived);
    document.getElementById("composer").placeholder = ch ? `Message ${isDm(ch) ? this.channelLabel(ch) : "#" + ch.name}` : "Message";
  }

  showEmpty(text) {
    const el = document.getElementById("empty-state");
    el.hidden = !text;
    el.textContent = text || "";
  }

  async loadLatest(cid) {
    const v = this.view(cid);
    v.loading = true;
    v.buffer = [];
    try {
      const data = await this.request("messages.history", { channel_id: cid, limit: HISTORY_PAGE });
      if (!v.loaded) v.byId.clear();
      for (const m of data.messages) v.byId.set(m.id, m);
      v.hasMoreBefore = data.has_more_before;
      v.loaded = true;
    } catch (err) {
      if (cid === this.current) this.setHistoryStatus(err.code === "disconnected" ? "" : "Could not load messages.");
      v.loading = false;
      return;
    }
    v.loading = false;
    const held = v.buffer;
    v.buffer = [];
    for (const ev of held) this.apply(ev);
    if (cid === this.current) this.setHistoryStatus(v.hasMoreBefore ? "" : "This is the very beginning.");
  }

  setHistoryStatus(text) {
    document.getElementById("history-status").textContent = text;
  }

  async loadOlder() {
    const cid = this.current;
    if (!cid) return;
    const v = this.view(cid);
    if (!v.loaded || v.loadingOlder || !v.hasMoreBefore) return;
    const oldest = Math.min(...Array.from(v.byId.values(), (m) => m.seq));
    if (!Number.isFinite(oldest)) return;
    v.loadingOlder = true;
    this.setHistoryStatus("Loading older messages…");
    try {
      const data = await this.request("messages.history", { channel_id: cid, before: oldest, limit: HISTORY_PAGE });
      v.hasMoreBefore = data.has_more_before;
      if (cid !== this.current) return;
      const before = this.$pane.scrollHeight - this.$pane.scrollTop;
      for (const m of data.messages) {
        if (v.byId.has(m.id)) continue;
        v.byId.set(m.id, m);
        this.placeMessage(m);
      }
      this.$pane.scrollTop = this.$pane.scrollHeight - before;
      this.setHistoryStatus(v.hasMoreBefore ? "" : "This is the very beginning.");
    } catch {
      this.setHistoryStatus("");
    } finally {
      v.loadingOlder = false;
    }
    // A short page may not fill the pane: keep walking.
    if (cid === this.current && this.$pane.scrollTop < 300 && v.hasMoreBefore) setTimeout(() => this.loadOlder(), 50);
  }

  renderAll() {
    clear(this.$list);
    this.els.clear();
    const v = this.view(this.current);
    const msgs = Array.from(v.byId.values()).filter((m) => !m.deleted || m.reply_count > 0).sort((a, b) => a.seq - b.seq);
    for (const m of msgs) this.placeMessage(m);
    if (this.newAfter !== null && this.newAfter !== undefined) {
      const first = msgs.find((m) => m.seq > this.newAfter && (!this.me || m.user_id !== this.me.id));
      if (first && this.els.has(first.id)) this.els.get(first.id).classList.add("first-unread");
    }
    for (const p of this.pending.values()) if (p.channel_id === this.current && !p.thread_root_id) this.placePending(p);
    const ch = this.currentChannel();
    this.showEmpty(msgs.length === 0 && v.loaded ? `This is the start of ${ch ? (isDm(ch) ? "your conversation" : "#" + ch.name) : "the channel"}.` : null);
    if (v.loaded) this.setHistoryStatus(v.hasMoreBefore ? "" : msgs.length ? "This is the very beginning." : "");
  }

  nearBottom() {
    return this.$pane.scrollHeight - this.$pane.scrollTop - this.$pane.clientHeight < 120;
  }

  scrollToBottom() {
    this.$pane.scrollTop = this.$pane.scrollHeight;
  }

  // ------------------------------------------------------------------ message elements

  /** Insert or update a server message in the main list (sorted by seq, pending ones last). */
  placeMessage(m) {
    if (m.deleted && !m.reply_count) {
      this.removeMessageEl(m.id, this.els);
      return;
    }
    this.showEmpty(null);
    const existing = this.els.get(m.id);
    const el = this.messageEl(m, false);
    if (existing) {
      existing.replaceWith(el);
      this.els.set(m.id, el);
      this.groupAround(el);
      return;
    }
    const pendingEl = m.client_msg_id && this.me && m.user_id === this.me.id
      ? this.$list.querySelector(`.message[data-status][data-client-msg-id="${CSS.escape(m.client_msg_id)}"]:not([data-ts])`)
      : null;
    if (pendingEl) pendingEl.remove();
    insertSorted(this.$list, el, m.seq);
    this.els.set(m.id, el);
    this.groupAround(el);
  }

  placePending(p) {
    const list = p.thread_root_id ? this.$threadList : this.$list;
    const sel = `.message[data-client-msg-id="${CSS.escape(p.cmid)}"]:not([data-ts])`;
    const old = list.querySelector(sel);
    const el = this.messageEl(
      { id: null, user_id: this.me.id, text: p.text, ts: p.ts, client_msg_id: p.cmid, reactions: [], reply_count: 0, thread_root_id: p.thread_root_id },
      !!p.thread_root_id,
      p,
    );
    if (old) old.replaceWith(el);
    else list.appendChild(el);
    this.groupAround(el);
  }

  removeMessageEl(id, map) {
    const el = map.get(id);
    if (!el) return;
    const next = el.nextElementSibling;
    el.remove();
    map.delete(id);
    if (next) this.groupAround(next);
  }

  groupAround(el) {
    for (const node of [el, el.nextElementSibling]) {
      if (!node || !node.classList.contains("message")) continue;
      const prev = node.previousElementSibling;
      const day = formatDay(Number(node.dataset.time));
      const newDay = !prev || !prev.classList.contains("message") || formatDay(Number(prev.dataset.time)) !== day;
      const same = !newDay && prev.dataset.userId === node.dataset.userId
        && Number(node.dataset.time) - Number(prev.dataset.time) < GROUP_GAP_MS;
      node.classList.toggle("cont", !!same);
      node.classList.toggle("day-start", newDay && !node.classList.contains("root"));
      node.dataset.day = day;
    }
  }

  messageEl(m, inThread, pend = null) {
    const mine = this.me && m.user_id === this.me.id;
    const dataset = { userId: m.user_id, time: m.ts };
    if (m.id) {
      dataset.id = m.id;
      dataset.ts = m.ts;
      dataset.seq = m.seq;
      dataset.status = "sent";
    }
    if (m.client_msg_id) dataset.clientMsgId = m.client_msg_id;
    if (pend) dataset.status = pend.status;
    const name = this.userName(m.user_id);
    const u = this.users.get(m.user_id);
    const isMe = (handle) => this.me && handle.toLowerCase() === this.me.handle.toLowerCase();
    const isUser = (handle) =>
      ["here", "channel", "everyone"].includes(handle) ||
      (m.mentions || []).some((id) => (this.users.get(id) || {}).handle === handle);
    const isChannel = (name) => [...this.channels.values()].some((c) => c.name === name);
    const text = m.deleted
      ? h("div", { class: "text deleted", testid: "message-text", text: "This message was deleted." })
      : h("div", { class: "text", testid: "message-text" }, richText(m.text, isMe, isUser, isChannel));
    const mentioned = !m.deleted && this.me && ((m.mentions || []).includes(this.me.id) || m.mention_channel || m.mention_here);
    const el = h(
      "div",
      {
        class: "message" + (mentioned ? " mentioned" : "") + (pend ? ` ${pend.status}` : ""),
        testid: "message",
        dataset,
        onclick: (e) => {
          if (e.target.closest("button,a")) return;
          for (const o of document.querySelectorAll(".message.touch")) if (o !== el) o.classList.remove("touch");
          el.classList.toggle("touch");
        },
      },
      h("div", { class: "avatar", dataset: { avatarId: m.user_id }, text: initials(name), "aria-hidden": "true" }),
      h(
        "div",
        { class: "body" },
        h(
          "div",
          { class: "meta" },
          h("span", { class: "author", testid: "message-author", dataset: { authorId: m.user_id }, text: name }),
          u && u.role === "guest" ? h("span", { class: "tag", text: "guest" }) : null,
          h("time", { class: "time", datetime: new Date(m.ts).toISOString(), title: new Date(m.ts).toLocaleString(), text: formatTime(m.ts) }),
        ),
        text,
        m.edited_ts && !m.deleted ? h("span", { class: "edited", testid: "message-edited", text: "(edited)" }) : null,
        this.reactionsEl(m),
        !inThread && m.reply_count > 0
          ? h(
              "div",
              { class: "thread-summary" },
              h("button", { type: "button", class: "reply-count", testid: "reply-count", onclick: () => this.openThread(m) }, `${m.reply_count} ${m.reply_count === 1 ? "reply" : "replies"}`),
              m.latest_reply_ts ? h("span", { class: "muted", text: `Last reply ${formatTime(m.latest_reply_ts)}` }) : null,
            )
          : null,
        pend && pend.status === "failed"
          ? h(
              "div",
              { class: "failed-bar" },
              h("span", { text: pend.error ? `Not sent: ${pend.error}` : "Not sent." }),
              h("button", { type: "button", class: "link", testid: "retry-button", onclick: () => this.retry(pend.cmid) }, "Retry"),
              h("button", { type: "button", class: "link", testid: "discard-button", onclick: () => this.discard(pend.cmid) }, "Discard"),
            )
          : null,
        pend && pend.status === "pending" ? h("div", { class: "sending", text: "Sending…" }) : null,
      ),
      m.id && !m.deleted ? this.actionsEl(m, inThread, mine) : null,
    );
    return el;
  }

  reactionsEl(m) {
    const list = (m.reactions || []).filter((r) => r.count > 0);
    if (!list.length || m.deleted) return null;
    return h(
      "div",
      { class: "reactions" },
      list.map((r) => {
        const mine = this.me && r.user_ids.includes(this.me.id);
        const who = r.user_ids.map((id) => this.userName(id)).join(", ");
        return h(
          "button",
          {
            type: "button",
            class: "reaction" + (mine ? " mine" : ""),
            testid: "reaction",
            dataset: { emoji: r.emoji },
            title: `${who} reacted with :${r.emoji}:`,
            "aria-pressed": mine ? "true" : "false",
            onclick: () => this.toggleReaction(m, r.emoji),
          },
          h("span", { class: "glyph", text: emojiGlyph(r.emoji) }),
          h("span", { class: "count", text: String(r.count) }),
        );
      }),
    );
  }

  actionsEl(m, inThread, mine) {
    const admin = this.me && (this.me.role === "owner" || this.me.role === "admin");
    return h(
      "div",
      { class: "actions" },
      h("button", { type: "button", class: "icon", testid: "react-button", title: "Add reaction", "aria-label": "Add reaction", onclick: (e) => this.pickEmoji(m, e.currentTarget) }, "☺"),
      inThread || m.thread_root_id ? null : h("button", { type: "button", class: "icon", testid: "reply-button", title: "Reply in thread", "aria-label": "Reply in thread", onclick: () => this.openThread(m) }, "↩"),
      mine ? h("button", { type: "button", class: "icon", testid: "edit-button", title: "Edit", "aria-label": "Edit", onclick: () => this.startEdit(m) }, "✎") : null,
      mine || admin ? h("button", { type: "button", class: "icon danger", testid: "delete-button", title: "Delete", "aria-label": "Delete", onclick: () => this.deleteMessage(m) }, "✕") : null,
    );
  }

  pickEmoji(m, anchor) {
    document.querySelectorAll(".emoji-picker").forEach((p) => p.remove());
    const picker = h(
      "div",
      { class: "emoji-picker", testid: "emoji-picker", role: "menu" },
      PICKER.map((name) =>
        h(
          "button",
          {
            type: "button",
            class: "emoji-option",
            testid: "emoji-option",
            dataset: { emoji: name },
            title: `:${name}:`,
            onclick: () => {
              picker.remove();
              this.react(m, name, true);
            },
          },
          emojiGlyph(name),
        ),
      ),
    );
    anchor.closest(".message").appendChild(picker);
    const close = (e) => {
      if (!picker.contains(e.target) && e.target !== anchor) {
        picker.remove();
        document.removeEventListener("mousedown", close, true);
      }
    };
    document.addEventListener("mousedown", close, true);
  }

  findMessage(id) {
    if (this.thread) {
      if (this.thread.root.id === id) return this.thread.root;
      if (this.thread.byId.has(id)) return this.thread.byId.get(id);
    }
    for (const v of this.views.values()) if (v.byId.has(id)) return v.byId.get(id);
    return null;
  }

  toggleReaction(m, emoji) {
    const cur = this.findMessage(m.id) || m;
    const r = (cur.reactions || []).find((x) => x.emoji === emoji);
    const mine = r && this.me && r.user_ids.includes(this.me.id);
    this.react(cur, emoji, !mine);
  }

  async react(m, emoji, add) {
    try {
      const data = await this.request(add ? "reactions.add" : "reactions.remove", { message_id: m.id, emoji });
      this.setReactions(m.id, data.reactions);
    } catch (err) {
      this.toast(`Could not ${add ? "add" : "remove"} the reaction: ${err.message}`);
    }
  }

  setReactions(id, reactions) {
    this.updateMessage(id, (m) => ({ ...m, reactions }));
  }

  /** Apply a change to a message wherever it is held, and redraw it. */
  updateMessage(id, fn) {
    for (const v of this.views.values()) {
      const m = v.byId.get(id);
      if (m) {
        const next = fn(m);
        v.byId.set(id, next);
        if (next.channel_id === this.current && this.els.has(id)) this.placeMessage(next);
      }
    }
    if (this.thread) {
      if (this.thread.root.id === id) {
        this.thread.root = fn(this.thread.root);
        this.renderThreadRoot();
      }
      const r = this.thread.byId.get(id);
      if (r) {
        const next = fn(r);
        this.thread.byId.set(id, next);
        this.placeThreadMessage(next);
      }
    }
  }

  startEdit(m) {
    const cur = this.findMessage(m.id) || m;
    const el = (this.els.get(m.id) && this.els.get(m.id).isConnected ? this.els.get(m.id) : null) || this.threadEls.get(m.id);
    if (!el) return;
    const textEl = el.querySelector('[data-testid="message-text"]');
    const ta = h("textarea", { class: "edit-box", testid: "edit-input", rows: "2" });
    ta.value = cur.text;
    const save = async () => {
      const text = ta.value.trim();
      if (!text || text === cur.text) {
        cancel();
        return;
      }
      try {
        const data = await this.request("messages.edit", { message_id: m.id, text });
        this.updateMessage(m.id, () => data.message);
      } catch (err) {
        this.toast(`Could not edit: ${err.message}`);
        cancel();
      }
    };
    const cancel = () => this.updateMessage(m.id, (x) => ({ ...x }));
    ta.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        save();
      } else if (e.key === "Escape") {
        e.preventDefault();
        cancel();
      }
    });
    const box = h(
      "div",
      { class: "edit-wrap" },
      ta,
      h(
        "div",
        { class: "edit-actions" },
        h("span", { class: "muted", text: "Enter to save · Esc to cancel" }),
        h("button", { type: "button", class: "ghost", onclick: cancel }, "Cancel"),
        h("button", { type: "button", class: "primary small", testid: "edit-save", onclick: save }, "Save"),
      ),
    );
    textEl.replaceWith(box);
    ta.focus();
    ta.setSelectionRange(ta.value.length, ta.value.length);
  }

  async deleteMessage(m) {
    try {
      const data = await this.request("messages.delete", { message_id: m.id });
      this.applyDeleted(data.message.channel_id, m.id, data.message.thread_root_id);
    } catch (err) {
      this.toast(`Could not delete: ${err.message}`);
    }
  }

  // ------------------------------------------------------------------ posting

  send(text, threadRootId) {
    const ch = this.currentChannel();
    if (!ch || !this.channels.has(ch.id)) return false;
    const max = (this.conn && this.conn.hello && this.conn.hello.limits.max_text_chars) || 4000;
    if (text.length > max) {
      this.toast(`That message is too long (${text.length} of ${max} characters).`);
      return false;
    }
    const p = { cmid: uuid(), channel_id: ch.id, thread_root_id: threadRootId, text, status: "pending", ts: Date.now(), error: null, attempt: 0 };
    this.pending.set(p.cmid, p);
    if (threadRootId) {
      this.placePending(p);
      this.threadScrollBottom();
    } else {
      this.placePending(p);
      this.showEmpty(null);
      this.scrollToBottom();
    }
    p.failTimer = setTimeout(() => this.failIfPending(p.cmid), PENDING_FAIL_MS);
    this.trySend(p);
    return true;
  }

  failIfPending(cmid) {
    const p = this.pending.get(cmid);
    if (!p || p.status !== "pending") return;
    // One on the wire is decided by its answer (it may be stored); the others give up now.
    if (p.inflight) p.expired = true;
    else this.setPendingStatus(p, "failed", p.error || (this.conn && this.conn.live ? "no answer from the server" : "not connected to the server"));
  }

  setPendingStatus(p, status, error = null) {
    p.status = status;
    p.error = error;
    if (p.channel_id === this.current || (this.thread && p.thread_root_id === this.thread.root.id)) {
      if (!p.thread_root_id || (this.thread && p.thread_root_id === this.thread.root.id)) this.placePending(p);
    }
  }

  trySend(p) {
    this.sendQueued(p.channel_id);
  }

  /** A channel's pending posts leave one at a time, in the order they were written, so
   *  they are stored in that order; a refusal to retry (rate_limited with its hint) holds
   *  back the ones behind it instead of sending them all again at the same moment. */
  async sendQueued(channelId) {
    if (this.sending.has(channelId)) return;
    this.sending.add(channelId);
    try {
      for (;;) {
        if (!this.conn || !this.conn.live) return;
        let next = null;
        for (const q of this.pending.values()) {
          if (q.channel_id === channelId && q.status === "pending") {
            next = q;
            break;
          }
        }
        if (!next || (await this.sendOne(next)) === "stop") return;
      }
    } finally {
      this.sending.delete(channelId);
    }
  }

  /** "done" (stored, or failed for good) or "stop" (the connection went: the sender starts
   *  again once live). */
  async sendOne(p) {
    const fields = { channel_id: p.channel_id, client_msg_id: p.cmid, text: p.text };
    if (p.thread_root_id) fields.thread_root_id = p.thread_root_id;
    for (;;) {
      p.attempt++;
      p.inflight = true;
      try {
        const data = await this.request("messages.post", fields);
        this.acked(data.message);
        return "done";
      } catch (err) {
        if (!this.pending.has(p.cmid)) return "done"; // acked through the event meanwhile
        if (err.code === "disconnected") return "stop"; // sent again once live
        if (RETRYABLE.has(err.code) && p.attempt < 5 && !p.expired && p.status === "pending") {
          p.inflight = false;
          await new Promise((resolve) => setTimeout(resolve, err.retryAfterMs || 1000 * p.attempt));
          if (p.status !== "pending" || p.expired) {
            if (p.status === "pending") this.setPendingStatus(p, "failed", err.message);
            return "done";
          }
          continue;
        }
        this.setPendingStatus(p, "failed", err.message);
        return "done";
      } finally {
        p.inflight = false;
      }
    }
  }

  acked(m) {
    const p = this.pending.get(m.client_msg_id);
    if (p && this.me && m.user_id === this.me.id && p.channel_id === m.channel_id) {
      clearTimeout(p.failTimer);
      this.pending.delete(m.client_msg_id);
    }
    this.upsertMessage(m);
  }

  retry(cmid) {
    const p = this.pending.get(cmid);
    if (!p) return;
    p.attempt = 0;
    p.expired = false;
    this.setPendingStatus(p, "pending");
    clearTimeout(p.failTimer);
    p.failTimer = setTimeout(() => this.failIfPending(p.cmid), PENDING_FAIL_MS);
    this.trySend(p);
  }

  discard(cmid) {
    const p = this.pending.get(cmid);
    if (!p) return;
    clearTimeout(p.failTimer);
    this.pending.delete(cmid);
    document.querySelectorAll(`.message[data-client-msg-id="${CSS.escape(cmid)}"]:not([data-ts])`).forEach((el) => el.remove());
  }

  flushOutbox() {
    const channels = new Set();
    for (const p of this.pending.values()) if (p.status === "pending") channels.add(p.channel_id);
    for (const id of channels) this.sendQueued(id);
  }

  sendTyping(threadRootId) {
    const now = Date.now();
    const key = `${this.current}:${threadRootId || 0}`;
    if ((key === this.lastTypingKey && now - this.lastTypingSent < TYPING_SEND_MS) || !this.current || !this.channels.has(this.current)) return;
    this.lastTypingSent = now;
    this.lastTypingKey = key;
    const fields = { channel_id: this.current };
    if (threadRootId) fields.thread_root_id = threadRootId;
    this.request("typing", fields).catch(() => {});
  }

  // ------------------------------------------------------------------ reads

  scheduleMark() {
    clearTimeout(this.markTimer);
    this.markTimer = setTimeout(() => this.markRead(), 300);
  }

  markRead() {
    const ch = this.current && this.channels.get(this.current);
    if (!ch || document.visibilityState !== "visible") return;
    if (ch.unread || ch.mentions) {
      ch.unread = 0;
      ch.mentions = 0;
      this.renderChannelItem(ch);
    }
    if (ch.last_seq > ch.last_read_seq) {
      const seq = ch.last_seq;
      ch.last_read_seq = seq;
      this.request("reads.mark", { channel_id: ch.id, seq }).catch(() => {});
    }
  }

  async refreshCounts() {
    try {
      const data = await this.request("reads.counts", {});
      for (const c of data.channels) {
        const ch = this.channels.get(c.channel_id);
        if (!ch) continue;
        ch.last_read_seq = c.last_read_seq;
        ch.unread = c.unread;
        ch.mentions = c.mentions;
      }
      this.renderSidebar();
      if (this.current && this.channels.has(this.current)) this.scheduleMark();
    } catch {
      /* next time */
    }
  }

  // ------------------------------------------------------------------ threads

  async openThread(root, refresh = false) {
    const fresh = this.findMessage(root.id) || root;
    if (!this.thread || this.thread.root.id !== root.id) {
      this.thread = { root: fresh, channelId: fresh.channel_id, byId: new Map(), loaded: false, buffer: [] };
      clear(this.$threadList);
      this.threadEls.clear();
    } else if (refresh) {
      this.thread.loaded = false;
    }
    this.$threadPane.hidden = false;
    document.body.classList.add("thread-open");
    this.renderThreadRoot();
    for (const p of this.pending.values()) if (p.thread_root_id === root.id) this.placePending(p);
    const t = this.thread;
    let after = 0;
    try {
      for (;;) {
        const data = await this.request("messages.replies", { message_id: root.id, after, limit: 200 });
        for (const m of data.messages) {
          t.byId.set(m.id, m);
          if (this.thread === t) this.placeThreadMessage(m);
          after = Math.max(after, m.seq);
        }
        if (!data.has_more_after || !data.messages.length) break;
      }
      t.loaded = true;
      const held = t.buffer;
      t.buffer = [];
      for (const ev of held) this.apply(ev);
    } catch (err) {
      if (err.code === "message_not_found") this.toast("That thread is gone.");
    }
    this.threadScrollBottom();
    if (this.mayFocus()) document.getElementById("thread-composer").focus();
  }

  renderThreadRoot() {
    if (!this.thread) return;
    const box = document.getElementById("thread-root");
    clear(box);
    const el = this.messageEl(this.thread.root, true);
    el.classList.add("root");
    box.appendChild(el);
    const n = this.thread.root.reply_count || 0;
    document.getElementById("thread-divider").textContent = n ? `${n} ${n === 1 ? "reply" : "replies"}` : "No replies yet";
  }

  placeThreadMessage(m) {
    if (m.deleted) {
      this.removeMessageEl(m.id, this.threadEls);
      return;
    }
    const el = this.messageEl(m, true);
    const existing = this.threadEls.get(m.id);
    if (existing) {
      existing.replaceWith(el);
    } else {
      const pendingEl = m.client_msg_id && this.me && m.user_id === this.me.id
        ? this.$threadList.querySelector(`.message[data-client-msg-id="${CSS.escape(m.client_msg_id)}"]:not([data-ts])`)
        : null;
      if (pendingEl) pendingEl.remove();
      insertSorted(this.$threadList, el, m.seq);
    }
    this.threadEls.set(m.id, el);
    this.groupAround(el);
  }

  threadScrollBottom() {
    const s = document.getElementById("thread-scroll");
    s.scrollTop = s.scrollHeight;
  }

  closeThread() {
    this.thread = null;
    this.$threadPane.hidden = true;
    document.body.classList.remove("thread-open");
    clear(this.$threadList);
    this.threadEls.clear();
  }

  // ------------------------------------------------------------------ channels

  async joinChannel(cid) {
    try {
      const data = await this.request("channels.join", { channel_id: cid });
      this.addChannel(data.channel);
      this.viewInfo = null;
      await this.openChannel(data.channel.id, { force: true });
    } catch (err) {
      this.toast(`Could not join: ${err.message}`);
    }
  }

  async leaveChannel() {
    const ch = this.currentChannel();
    if (!ch) return;
    try {
      await this.request("channels.leave", { channel_id: ch.id });
      this.removeChannel(ch.id);
    } catch (err) {
      this.toast(`Could not leave: ${err.message}`);
    }
  }

  addChannel(c) {
    const had = this.channels.get(c.id);
    const ch = this.normChannel({ ...(had || {}), ...c });
    if (had) {
      ch.unread = had.unread;
      ch.mentions = had.mentions;
      ch.last_read_seq = had.last_read_seq;
      ch.last_ts = had.last_ts;
      ch.dm_user_ids = c.dm_user_ids || had.dm_user_ids;
    } else {
      ch.last_read_seq = ch.last_seq;
    }
    this.channels.set(c.id, ch);
    this.renderSidebar();
    if (this.current === c.id) this.renderHeader();
    return ch;
  }

  async addChannelById(cid) {
    if (this.channels.has(cid)) return;
    try {
      const data = await this.request("channels.info", { channel_id: cid });
      const ch = data.channel;
      if (isDm(ch)) {
        const members = await this.request("channels.members", { channel_id: cid, limit: 10 });
        ch.dm_user_ids = members.user_ids.filter((id) => id !== this.me.id);
        if (!ch.dm_user_ids.length) ch.dm_user_ids = [this.me.id];
      }
      this.addChannel(ch);
      if (isDm(ch)) this.subscribePresence();
      // Messages may have come before the channel was known here: ask for its true counts.
      clearTimeout(this.countsTimer);
      this.countsTimer = setTimeout(() => this.refreshCounts(), 300);
    } catch {
      /* not visible after all */
    }
  }

  removeChannel(cid) {
    this.channels.delete(cid);
    this.views.delete(cid);
    this.renderSidebar();
    if (this.current === cid) {
      const ch = this.sortedChannels(false).find((c) => c.name === "general") || this.sortedChannels(false)[0];
      this.openChannel(ch ? ch.id : null);
    }
  }

  // ------------------------------------------------------------------ events

  apply(ev) {
    const handler = HANDLERS[ev.type];
    if (handler) handler.call(this, ev);
  }

  /** Buffer a channel event while its history is loading; true when held. */
  held(cid, ev) {
    const v = this.views.get(cid);
    if (v && v.loading) {
      v.buffer.push(ev);
      return true;
    }
    return false;
  }

  upsertMessage(m) {
    if (m.thread_root_id) {
      const t = this.thread;
      if (t && t.root.id === m.thread_root_id) {
        t.byId.set(m.id, m);
        this.placeThreadMessage(m);
      }
      return;
    }
    const v = this.views.get(m.channel_id);
    if (v && v.loaded) {
      const had = v.byId.get(m.id);
      if (had && m.reactions === undefined) m.reactions = had.reactions;
      v.byId.set(m.id, m);
      if (m.channel_id === this.current) this.placeMessage(m);
    }
    if (this.thread && this.thread.root.id === m.id) {
      this.thread.root = m;
      this.renderThreadRoot();
    }
  }

  onPosted(ev) {
    const m = ev.message;
    if (!m.thread_root_id && this.held(m.channel_id, ev)) return;
    if (m.thread_root_id && this.thread && this.thread.root.id === m.thread_root_id && !this.thread.loaded) {
      this.thread.buffer.push(ev);
      return;
    }
    const atBottom = this.nearBottom();
    const mine = this.me && m.user_id === this.me.id;
    const p = mine ? this.pending.get(m.client_msg_id) : null;
    if (p && p.channel_id === m.channel_id) {
      clearTimeout(p.failTimer);
      this.pending.delete(m.client_msg_id);
    }
    this.clearTyping(m.channel_id, m.thread_root_id, m.user_id);
    this.upsertMessage(m);
    if (m.thread_root_id) {
      const s = document.getElementById("thread-scroll");
      if (mine || s.scrollHeight - s.scrollTop - s.clientHeight < 120) this.threadScrollBottom();
      return;
    }
    const ch = this.channels.get(m.channel_id);
    if (ch) {
      const newer = m.seq > ch.last_seq;
      ch.last_seq = Math.max(ch.last_seq, m.seq);
      ch.last_ts = m.ts;
      const seen = m.channel_id === this.current && document.visibilityState === "visible";
      if (mine) {
        ch.last_read_seq = Math.max(ch.last_read_seq, m.seq);
      } else if (!seen && newer && m.seq > ch.last_read_seq) {
        ch.unread += 1;
      }
      this.renderChannelItem(ch);
      if (isDm(ch)) this.renderSidebar();
    }
    if (m.channel_id === this.current) {
      if (mine || atBottom) this.scrollToBottom();
      else document.getElementById("jump").hidden = false;
      this.scheduleMark();
    }
  }

  onEdited(ev) {
    const m = ev.message;
    if (!m.thread_root_id && this.held(m.channel_id, ev)) return;
    this.updateMessage(m.id, () => m);
    if (m.thread_root_id && this.thread && this.thread.root.id === m.thread_root_id && !this.thread.byId.has(m.id)) this.upsertMessage(m);
  }

  onDeleted(ev) {
    if (this.held(ev.channel_id, ev)) return;
    this.applyDeleted(ev.channel_id, ev.message_id, ev.thread_root_id);
  }

  applyDeleted(cid, id, rootId) {
    const v = this.views.get(cid);
    if (v && v.byId.has(id)) {
      const m = v.byId.get(id);
      if (m.reply_count > 0) {
        const gone = { ...m, deleted: true, text: "" };
        v.byId.set(id, gone);
        if (cid === this.current) this.placeMessage(gone);
      } else {
        v.byId.delete(id);
        this.removeMessageEl(id, this.els);
      }
    }
    if (this.thread) {
      if (this.thread.root.id === id) {
        this.thread.root = { ...this.thread.root, deleted: true, text: "" };
        this.renderThreadRoot();
      } else if (this.thread.byId.has(id)) {
        this.thread.byId.delete(id);
        this.removeMessageEl(id, this.threadEls);
      }
    }
  }

  onThreadUpdated(ev) {
    if (this.held(ev.channel_id, ev)) return;
    this.updateMessage(ev.message_id, (m) => ({ ...m, reply_count: ev.reply_count, latest_reply_ts: ev.latest_reply_ts }));
  }

  onMention(ev) {
    const ch = this.channels.get(ev.channel_id);
    if (!ch) return;
    const seen = ev.channel_id === this.current && document.visibilityState === "visible";
    if (!seen) {
      ch.mentions += 1;
      this.renderChannelItem(ch);
    }
  }

  onReaction(ev) {
    if (this.held(ev.channel_id, ev)) return;
    this.updateMessage(ev.message_id, (m) => {
      const reactions = (m.reactions || []).map((r) => ({ ...r, user_ids: [...r.user_ids] }));
      let r = reactions.find((x) => x.emoji === ev.emoji);
      if (!r) {
        r = { emoji: ev.emoji, count: 0, user_ids: [] };
        reactions.push(r);
      }
      r.count = ev.count;
      if (ev.type === "reaction.added") {
        if (!r.user_ids.includes(ev.user_id)) r.user_ids.push(ev.user_id);
      } else {
        r.user_ids = r.user_ids.filter((id) => id !== ev.user_id);
      }
      return { ...m, reactions: reactions.filter((x) => x.count > 0) };
    });
  }

  onChannelChanged(ev) {
    const c = ev.channel;
    if (this.channels.has(c.id)) {
      this.addChannel(c);
    } else if (ev.type === "channel.created" && (c.kind !== "public" || (this.me && c.created_by === this.me.id))) {
      this.addChannelById(c.id);
    }
    if (this.viewInfo && this.viewInfo.id === c.id) {
      this.viewInfo = this.normChannel(c);
      this.renderHeader();
    }
  }

  onMemberJoined(ev) {
    if (this.me && ev.user_id === this.me.id) {
      this.addChannelById(ev.channel_id);
      return;
    }
    const ch = this.channels.get(ev.channel_id);
    if (ch) ch.member_count += 1;
  }

  onMemberLeft(ev) {
    if (this.me && ev.user_id === this.me.id) {
      if (this.channels.has(ev.channel_id)) this.removeChannel(ev.channel_id);
      if (ev.by_user_id !== ev.user_id) this.toast("You were removed from a channel.");
      return;
    }
    const ch = this.channels.get(ev.channel_id);
    if (ch) ch.member_count = Math.max(0, ch.member_count - 1);
  }

  onUser(ev) {
    this.setUser(ev.user);
  }

  onReadMarker(ev) {
    const ch = this.channels.get(ev.channel_id);
    if (!ch) return;
    ch.last_read_seq = ev.last_read_seq;
    if (ev.last_read_seq >= ch.last_seq) {
      if (ch.unread || ch.mentions) {
        ch.unread = 0;
        ch.mentions = 0;
        this.renderChannelItem(ch);
      }
    } else {
      clearTimeout(this.countsTimer);
      this.countsTimer = setTimeout(() => this.refreshCounts(), 300);
    }
  }

  onTyping(ev) {
    if (this.me && ev.user_id === this.me.id) return;
    const key = `${ev.channel_id}:${ev.thread_root_id || 0}`;
    if (!this.typing.has(key)) this.typing.set(key, new Map());
    this.typing.get(key).set(ev.user_id, Date.now() + TYPING_SHOW_MS);
    this.renderTyping();
  }

  clearTyping(cid, rootId, uid) {
    const t = this.typing.get(`${cid}:${rootId || 0}`);
    if (t && t.delete(uid)) this.renderTyping();
  }

  renderTyping() {
    const now = Date.now();
    const who = (key) => {
      const t = this.typing.get(key);
      if (!t) return [];
      for (const [uid, until] of t) if (until < now) t.delete(uid);
      return Array.from(t.keys()).map((id) => this.userName(id));
    };
    const line = (names) => {
      if (!names.length) return "";
      if (names.length === 1) return `${names[0]} is typing…`;
      if (names.length === 2) return `${names[0]} and ${names[1]} are typing…`;
      return "Several people are typing…";
    };
    const main = byTestId("typing-indicator");
    const text = this.current ? line(who(`${this.current}:0`)) : "";
    if (main.textContent !== text) main.textContent = text;
    const th = document.getElementById("thread-typing");
    const ttext = this.thread ? line(who(`${this.thread.channelId}:${this.thread.root.id}`)) : "";
    if (th.textContent !== ttext) th.textContent = ttext;
  }

  onPresence(ev) {
    this.presence.set(ev.user_id, ev.status);
    for (const el of document.querySelectorAll(`[data-presence-user="${ev.user_id}"]`)) el.dataset.presence = ev.status;
  }

  onSessionRevoked() {
    /* the close that follows (1008 token_revoked) signs out */
  }
}

const HANDLERS = {
  "message.posted": ChatApp.prototype.onPosted,
  "message.edited": ChatApp.prototype.onEdited,
  "message.deleted": ChatApp.prototype.onDeleted,
  "thread.updated": ChatApp.prototype.onThreadUpdated,
  mention: ChatApp.prototype.onMention,
  "reaction.added": ChatApp.prototype.onReaction,
  "reaction.removed": ChatApp.prototype.onReaction,
  "channel.created": ChatApp.prototype.onChannelChanged,
  "channel.updated": ChatApp.prototype.onChannelChanged,
  "channel.archived": ChatApp.prototype.onChannelChanged,
  "channel.unarchived": ChatApp.prototype.onChannelChanged,
  "channel.member_joined": ChatApp.prototype.onMemberJoined,
  "channel.member_left": ChatApp.prototype.onMemberLeft,
  "user.created": ChatApp.prototype.onUser,
  "user.updated": ChatApp.prototype.onUser,
  "read_marker.updated": ChatApp.prototype.onReadMarker,
  "session.revoked": ChatApp.prototype.onSessionRevoked,
  typing: ChatApp.prototype.onTyping,
  presence: ChatApp.prototype.onPresence,
};

function initials(name) {
  const parts = String(name).trim().split(/\s+/).filter(Boolean);
  if (!parts.length) return "?";
  const first = Array.from(parts[0])[0] || "?";
  const second = parts.length > 1 ? Array.from(parts[parts.length - 1])[0] || "" : "";
  return (first + second).toUpperCase();
}

/** Insert a message element by seq among the sent ones (pending ones stay at the end). */
function insertSorted(list, el, seq) {
  let node = list.lastElementChild;
  while (node && (!node.dataset.seq || Number(node.dataset.seq) > seq)) node = node.previousElementSibling;
  if (node) node.after(el);
  else list.prepend(el);
}
