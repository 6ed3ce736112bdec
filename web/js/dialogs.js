// Dialogs: create a channel, browse channels, start a DM, add people, invite links.
import { h, clear, icon } from "./dom.js";

let closeCurrent = null;

export function openDialog(title, body, { wide = false } = {}) {
  closeDialog();
  const layer = document.getElementById("dialog-layer");
  const close = () => {
    layer.hidden = true;
    clear(layer);
    document.removeEventListener("keydown", onKey, true);
    closeCurrent = null;
  };
  const onKey = (e) => {
    if (e.key === "Escape") {
      e.preventDefault();
      close();
    }
  };
  const box = h(
    "div",
    { class: "dialog" + (wide ? " wide" : ""), testid: "dialog", role: "dialog", "aria-modal": "true", "aria-label": title },
    h("header", { class: "dialog-head" }, h("h3", { text: title }), h("button", { type: "button", class: "icon", testid: "dialog-close", "aria-label": "Close", onclick: close }, "✕")),
    body,
  );
  clear(layer);
  layer.appendChild(box);
  layer.hidden = false;
  layer.onmousedown = (e) => {
    if (e.target === layer) close();
  };
  document.addEventListener("keydown", onKey, true);
  closeCurrent = close;
  const first = box.querySelector("input, select, textarea, button.primary");
  if (first) first.focus();
  return close;
}

export function closeDialog() {
  if (closeCurrent) closeCurrent();
}

function errorLine() {
  return h("p", { class: "form-error", testid: "dialog-error", role: "alert" });
}

export function newChannel(app) {
  const name = h("input", { testid: "channel-name-input", maxlength: "80", placeholder: "e.g. plan-budget", autocomplete: "off", autocapitalize: "none" });
  const topic = h("input", { testid: "channel-topic-input", maxlength: "250", placeholder: "What is it about? (optional)" });
  const priv = h("input", { type: "checkbox", testid: "channel-private-input" });
  const err = errorLine();
  name.addEventListener("input", () => {
    const v = name.value.toLowerCase().replace(/\s+/g, "-");
    if (v !== name.value) name.value = v;
  });
  const form = h(
    "form",
    { class: "dialog-form", novalidate: true },
    h("label", {}, "Name", name),
    h("p", { class: "hint", text: "Lowercase letters, digits, - and _." }),
    h("label", {}, "Topic", topic),
    h("label", { class: "check" }, priv, "Private: only invited people can see it"),
    err,
    h("div", { class: "dialog-actions" }, h("button", { type: "submit", class: "primary", testid: "channel-create-submit" }, "Create")),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    err.textContent = "";
    const value = name.value.trim().replace(/^#/, "");
    if (!/^[a-z0-9_-]{1,80}$/.test(value)) {
      err.textContent = "Channel names are 1-80 of a-z, 0-9, - and _.";
      return;
    }
    try {
      const data = await app.request("channels.create", { name: value, private: priv.checked, topic: topic.value.trim() });
      close();
      app.addChannel(data.channel);
      app.openChannel(data.channel.id, { force: true });
    } catch (ex) {
      err.textContent = ex.code === "name_taken" ? "A channel with that name exists already." : ex.message;
    }
  });
  const close = openDialog("Create a channel", form);
}

export async function browseChannels(app) {
  const filter = h("input", { testid: "browse-filter", placeholder: "Filter channels", autocomplete: "off" });
  const list = h("ul", { class: "browse-list", testid: "browse-list" });
  const err = errorLine();
  const body = h("div", { class: "dialog-form" }, filter, list, err);
  const close = openDialog("Browse channels", body, { wide: true });
  let all = [];
  try {
    let cursor = 0;
    for (let i = 0; i < 20; i++) {
      const data = await app.request("channels.list", { cursor, limit: 200 });
      all.push(...data.channels.filter((c) => c.kind === "public" || c.kind === "private"));
      if (data.next_cursor === null || data.next_cursor === undefined) break;
      cursor = data.next_cursor;
    }
  } catch (ex) {
    err.textContent = ex.message;
  }
  all.sort((a, b) => a.name.localeCompare(b.name));
  const render = () => {
    clear(list);
    const q = filter.value.trim().toLowerCase().replace(/^#/, "");
    const shown = all.filter((c) => !q || c.name.includes(q) || (c.topic || "").toLowerCase().includes(q));
    if (!shown.length) list.appendChild(h("li", { class: "muted", text: "No channels match." }));
    for (const c of shown) {
      const member = app.channels.has(c.id);
      list.appendChild(
        h(
          "li",
          { class: "browse-item", testid: "browse-channel-item", dataset: { name: c.name, channelId: c.id } },
          h(
            "button",
            {
              type: "button",
              class: "browse-open",
              onclick: () => {
                close();
                app.openChannel(c.id);
              },
            },
            h("span", { class: "browse-name" }, c.kind === "private" ? icon("lock") : "#", c.name),
            h("span", { class: "muted", text: `${c.member_count} member${c.member_count === 1 ? "" : "s"}${c.archived ? " · archived" : ""}${c.topic ? " · " + c.topic : ""}` }),
          ),
          member
            ? h("span", { class: "muted joined", text: "Joined" })
            : c.archived
              ? null
              : h(
                  "button",
                  {
                    type: "button",
                    class: "primary small",
                    testid: "join-button",
                    onclick: async () => {
                      close();
                      await app.joinChannel(c.id);
                    },
                  },
                  "Join",
                ),
        ),
      );
    }
  };
  filter.addEventListener("input", render);
  render();
}

/** A user search box (server-ranked autocomplete) calling onPick(user). */
function userPicker(app, onPick, { channelId = null, exclude = () => false } = {}) {
  const input = h("input", { testid: "user-search-input", placeholder: "Search people by name or handle", autocomplete: "off", autocapitalize: "none" });
  const list = h("ul", { class: "browse-list", testid: "user-search-results" });
  let seq = 0;
  let timer = null;
  const search = async () => {
    const mine = ++seq;
    const fields = { query: input.value.trim().replace(/^@/, ""), limit: 10 };
    if (channelId) fields.channel_id = channelId;
    let users = [];
    try {
      users = (await app.request("users.autocomplete", fields)).users;
    } catch {
      return;
    }
    if (mine !== seq) return;
    clear(list);
    for (const u of users) {
      app.users.set(u.id, app.users.get(u.id) || u);
      const excluded = exclude(u);
      list.appendChild(
        h(
          "li",
          { class: "browse-item", testid: "user-search-item", dataset: { userId: u.id, handle: u.handle } },
          h(
            "button",
            { type: "button", class: "browse-open", disabled: excluded, onclick: () => onPick(u) },
            h("span", { class: "browse-name", text: u.display_name || u.handle }),
            h("span", { class: "muted", text: `@${u.handle}${excluded ? " · already here" : ""}` }),
          ),
        ),
      );
    }
    if (!users.length) list.appendChild(h("li", { class: "muted", text: "Nobody found." }));
  };
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(search, 80);
  });
  search();
  return h("div", { class: "user-picker" }, input, list);
}

export function newDm(app) {
  const err = errorLine();
  const picker = userPicker(app, async (u) => {
    try {
      const data = await app.request("dms.open", { user_ids: [u.id] });
      close();
      const ch = data.channel;
      if (!app.channels.has(ch.id)) {
        ch.dm_user_ids = u.id === app.me.id ? [app.me.id] : [u.id];
        app.addChannel(ch);
        app.subscribePresence();
      }
      app.openChannel(ch.id);
    } catch (ex) {
      err.textContent = ex.message;
    }
  });
  const close = openDialog("New direct message", h("div", { class: "dialog-form" }, picker, err));
}

export async function addPeople(app) {
  const ch = app.currentChannel();
  if (!ch) return;
  const err = errorLine();
  const done = h("p", { class: "ok", testid: "dialog-ok", role: "status" });
  let members = new Set();
  try {
    let cursor = 0;
    for (let i = 0; i < 10; i++) {
      const data = await app.request("channels.members", { channel_id: ch.id, cursor, limit: 1000 });
      data.user_ids.forEach((id) => members.add(id));
      if (data.next_cursor === null || data.next_cursor === undefined) break;
      cursor = data.next_cursor;
    }
  } catch {
    members = new Set();
  }
  const picker = userPicker(
    app,
    async (u) => {
      err.textContent = "";
      try {
        await app.request("channels.invite", { channel_id: ch.id, user_ids: [u.id] });
        members.add(u.id);
        done.textContent = `Added ${u.display_name || u.handle} to #${ch.name}.`;
      } catch (ex) {
        err.textContent = ex.code === "already_in_channel" ? `${u.display_name || u.handle} is already here.` : ex.message;
      }
    },
    { channelId: ch.id, exclude: (u) => members.has(u.id) },
  );
  openDialog(`Add people to #${ch.name}`, h("div", { class: "dialog-form" }, picker, done, err));
}

export function invitePeople(app) {
  const role = h("select", { testid: "invite-role" }, h("option", { value: "member" }, "Member"), h("option", { value: "guest" }, "Guest"));
  const uses = h("select", { testid: "invite-uses" }, ["1", "5", "25", "100"].map((n) => h("option", { value: n }, n === "1" ? "1 person" : `${n} people`)));
  const expiry = h(
    "select",
    { testid: "invite-expiry" },
    h("option", { value: "86400" }, "1 day"),
    h("option", { value: "604800", selected: true }, "7 days"),
    h("option", { value: "2592000" }, "30 days"),
  );
  const err = errorLine();
  const result = h("div", { class: "invite-result" });
  const existing = h("ul", { class: "browse-list", testid: "invite-list" });
  const create = h("button", { type: "button", class: "primary", testid: "create-invite" }, "Create invite link");
  create.addEventListener("click", async () => {
    err.textContent = "";
    try {
      const data = await app.request("invites.create", { role: role.value, max_uses: Number(uses.value), expires_in_s: Number(expiry.value) });
      const link = `${location.origin}/#invite=${encodeURIComponent(data.invite.code)}`;
      clear(result);
      const linkEl = h("code", { class: "invite-link", testid: "invite-link", text: link });
      const copy = h("button", { type: "button", class: "ghost small", testid: "copy-invite" }, "Copy");
      copy.addEventListener("click", async () => {
        try {
          await navigator.clipboard.writeText(link);
          copy.textContent = "Copied";
        } catch {
          const range = document.createRange();
          range.selectNodeContents(linkEl);
          const sel = window.getSelection();
          sel.removeAllRanges();
          sel.addRange(range);
        }
      });
      result.append(
        h("p", { class: "hint", text: `Anyone with this link can join as ${data.invite.role} (${data.invite.max_uses} use${data.invite.max_uses === 1 ? "" : "s"}, until ${new Date(data.invite.expires_at).toLocaleString()}). It is shown once.` }),
        h("div", { class: "invite-row" }, linkEl, copy),
      );
      loadList();
    } catch (ex) {
      err.textContent = ex.code === "forbidden" ? "Only admins can create invite links." : ex.message;
    }
  });
  const loadList = async () => {
    try {
      const data = await app.request("invites.list", {});
      clear(existing);
      for (const inv of data.invites || []) {
        const id = inv.id ?? inv.invite_id;
        existing.appendChild(
          h(
            "li",
            { class: "browse-item" },
            h("span", { class: "muted", text: `${inv.prefix || inv.code || "#" + id} · ${inv.role} · ${inv.uses}/${inv.max_uses} used · until ${new Date(inv.expires_at).toLocaleDateString()}` }),
            id !== undefined
              ? h(
                  "button",
                  {
                    type: "button",
                    class: "ghost small",
                    testid: "revoke-invite",
                    onclick: async () => {
                      try {
                        await app.request("invites.revoke", { invite_id: id });
                        loadList();
                      } catch (ex) {
                        err.textContent = ex.message;
                      }
                    },
                  },
                  "Revoke",
                )
              : null,
          ),
        );
      }
    } catch {
      /* invites.list not available */
    }
  };
  const body = h(
    "div",
    { class: "dialog-form" },
    h("p", { class: "hint", text: "Create a link people can use to sign up to this workspace." }),
    h("div", { class: "row" }, h("label", {}, "Role", role), h("label", {}, "Uses", uses), h("label", {}, "Expires", expiry)),
    h("div", { class: "dialog-actions" }, create),
    result,
    err,
    h("h4", { text: "Active invites" }),
    existing,
  );
  openDialog("Invite people", body, { wide: true });
  loadList();
}

export function profile(app) {
  const me = app.me;
  const display = h("input", { testid: "profile-display-name", maxlength: "80" });
  const real = h("input", { testid: "profile-real-name", maxlength: "120" });
  display.value = me.display_name || "";
  real.value = me.real_name || "";
  const err = errorLine();
  const form = h(
    "form",
    { class: "dialog-form", novalidate: true },
    h("p", { class: "hint", text: `@${me.handle} · ${me.role}` }),
    h("label", {}, "Display name", display),
    h("label", {}, "Full name", real),
    err,
    h("div", { class: "dialog-actions" }, h("button", { type: "submit", class: "primary", testid: "profile-save" }, "Save")),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    err.textContent = "";
    const name = display.value.trim();
    if (!name) {
      err.textContent = "The display name cannot be empty.";
      return;
    }
    try {
      const data = await app.request("users.update_profile", { display_name: name, real_name: real.value.trim() });
      app.setUser(data.user);
      close();
    } catch (ex) {
      err.textContent = ex.message;
    }
  });
  const close = openDialog("Your profile", form);
}

export function channelDetails(app) {
  const ch = app.currentChannel();
  if (!ch || ch.kind === "dm" || ch.kind === "group_dm") return;
  const member = app.channels.has(ch.id);
  const admin = app.me.role === "owner" || app.me.role === "admin";
  const topic = h("input", { testid: "channel-topic-edit", maxlength: "250", placeholder: "Add a topic" });
  topic.value = ch.topic || "";
  const err = errorLine();
  const form = h(
    "form",
    { class: "dialog-form", novalidate: true },
    h("p", { class: "hint", text: `${ch.member_count || "?"} member${ch.member_count === 1 ? "" : "s"}${ch.archived ? " · archived" : ""}` }),
    h("label", {}, "Topic", topic),
    err,
    h(
      "div",
      { class: "dialog-actions" },
      admin
        ? h(
            "button",
            {
              type: "button",
              class: "ghost",
              testid: ch.archived ? "unarchive-button" : "archive-button",
              onclick: async () => {
                try {
                  const data = await app.request(ch.archived ? "channels.unarchive" : "channels.archive", { channel_id: ch.id });
                  app.onChannelChanged({ type: "channel.updated", channel: data.channel });
                  close();
                } catch (ex) {
                  err.textContent = ex.message;
                }
              },
            },
            ch.archived ? "Unarchive" : "Archive",
          )
        : null,
      member && !ch.archived ? h("button", { type: "submit", class: "primary", testid: "channel-save" }, "Save") : null,
    ),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    err.textContent = "";
    try {
      const data = await app.request("channels.update", { channel_id: ch.id, topic: topic.value.trim() });
      app.onChannelChanged({ type: "channel.updated", channel: data.channel });
      close();
    } catch (ex) {
      err.textContent = ex.message;
    }
  });
  const close = openDialog(`#${ch.name}`, form);
}
