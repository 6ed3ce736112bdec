// A composer: a textarea with Enter-to-send, Shift+Enter for a newline, typing pings and
// @-mention / #-channel autocomplete served by the server's ranking.
import { h, clear } from "./dom.js";

const TRIGGER = /(?:^|[\s(])([@#])([^\s@#]{0,80})$/;

export class Composer {
  /**
   * opts: onSend(text) -> bool (true: clear), onTyping(), channelId() -> id,
   * request(type, fields) -> Promise, testid for the list.
   */
  constructor(textarea, opts) {
    this.ta = textarea;
    this.opts = opts;
    this.items = [];
    this.active = -1;
    this.trigger = null; // {sigil, query, start}
    this.seq = 0;
    this.timer = null;
    this.list = h("ul", { class: "autocomplete", testid: opts.testid || "autocomplete", role: "listbox", hidden: true });
    textarea.parentElement.insertBefore(this.list, textarea);
    textarea.addEventListener("keydown", (e) => this.keydown(e));
    textarea.addEventListener("input", () => this.input());
    textarea.addEventListener("blur", () =>
      setTimeout(() => {
        if (document.activeElement !== this.ta) this.close();
      }, 150),
    );
    textarea.addEventListener("click", () => this.lookup());
  }

  get open() {
    return !this.list.hidden && this.items.length > 0;
  }

  keydown(e) {
    if (e.isComposing || e.keyCode === 229) return;
    if (this.open) {
      if (e.key === "ArrowDown") {
        e.preventDefault();
        this.select(Math.min(this.active + 1, this.items.length - 1));
        return;
      }
      if (e.key === "ArrowUp") {
        e.preventDefault();
        this.select(Math.max(this.active - 1, 0));
        return;
      }
      if ((e.key === "Enter" && !e.shiftKey) || e.key === "Tab") {
        e.preventDefault();
        this.accept(this.active >= 0 ? this.active : 0);
        return;
      }
      if (e.key === "Escape") {
        e.preventDefault();
        this.close();
        return;
      }
    }
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      this.send();
    }
  }

  send() {
    const text = this.ta.value.trim();
    if (!text) return;
    if (this.opts.onSend(text)) {
      this.ta.value = "";
      this.autosize();
      this.close();
    }
  }

  input() {
    this.autosize();
    if (this.ta.value.trim()) this.opts.onTyping();
    this.lookup();
  }

  autosize() {
    this.ta.style.height = "auto";
    this.ta.style.height = `${Math.min(this.ta.scrollHeight, 200)}px`;
  }

  lookup() {
    const caret = this.ta.selectionStart;
    const before = this.ta.value.slice(0, caret);
    const m = TRIGGER.exec(before);
    if (!m || this.ta.selectionEnd !== caret) {
      this.close();
      return;
    }
    const sigil = m[1];
    const query = m[2];
    this.trigger = { sigil, query, start: caret - query.length - 1 };
    clearTimeout(this.timer);
    const mySeq = ++this.seq;
    this.timer = setTimeout(() => this.fetch(sigil, query, mySeq), 60);
  }

  async fetch(sigil, query, mySeq) {
    let items;
    try {
      if (sigil === "@") {
        const fields = { query, limit: 8 };
        const cid = this.opts.channelId();
        if (cid) fields.channel_id = cid;
        const data = await this.opts.request("users.autocomplete", fields);
        items = data.users.map((u) => ({ value: `@${u.handle}`, label: u.display_name || u.handle, sub: `@${u.handle}`, user: u }));
      } else {
        const data = await this.opts.request("channels.autocomplete", { query, limit: 8 });
        items = data.channels.map((c) => ({ value: `#${c.name}`, label: `#${c.name}`, sub: c.archived ? "archived" : c.topic || "" }));
      }
    } catch {
      return;
    }
    if (mySeq !== this.seq) return; // a newer query is under way
    this.render(items);
  }

  render(items) {
    this.items = items;
    clear(this.list);
    if (items.length === 0) {
      this.close();
      return;
    }
    items.forEach((item, i) => {
      const li = h(
        "li",
        {
          class: "autocomplete-item",
          testid: "autocomplete-item",
          role: "option",
          dataset: { value: item.value },
          onmousedown: (e) => {
            e.preventDefault();
            this.accept(i);
          },
        },
        h("span", { class: "ac-label", text: item.label }),
        item.sub ? h("span", { class: "ac-sub", text: item.sub }) : null,
      );
      this.list.appendChild(li);
    });
    this.list.hidden = false;
    this.select(0);
  }

  select(i) {
    this.active = i;
    Array.from(this.list.children).forEach((li, j) => {
      li.setAttribute("aria-selected", j === i ? "true" : "false");
      if (j === i) li.scrollIntoView({ block: "nearest" });
    });
  }

  accept(i) {
    const item = this.items[i];
    if (!item || !this.trigger) return;
    const { start } = this.trigger;
    const caret = this.ta.selectionStart;
    const value = this.ta.value;
    const insert = `${item.value} `;
    this.ta.value = value.slice(0, start) + insert + value.slice(caret);
    const pos = start + insert.length;
    this.ta.setSelectionRange(pos, pos);
    this.close();
    this.ta.focus();
  }

  close() {
    this.seq++;
    clearTimeout(this.timer);
    this.items = [];
    this.active = -1;
    this.list.hidden = true;
    clear(this.list);
  }
}
