// Small DOM helpers. Every piece of user text goes in through textContent or a text node:
// nothing here ever parses HTML.

/** h("div", {class: "x", testid: "y", onclick: fn}, child, "text", ...) */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "testid") el.dataset.testid = value;
      else if (key === "text") el.textContent = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(el.dataset, value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

export function byTestId(id, root = document) {
  return root.querySelector(`[data-testid="${id}"]`);
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
}

export function show(el, visible) {
  el.hidden = !visible;
}

const EMOJI = {
  "+1": "👍", "-1": "👎", heart: "❤️", joy: "😂", tada: "🎉", eyes: "👀",
  white_check_mark: "✅", rocket: "🚀", pray: "🙏", fire: "🔥", smile: "😄", thinking: "🤔",
  wave: "👋", ok_hand: "👌", clap: "👏", 100: "💯",
};
export const PICKER = ["+1", "heart", "joy", "tada", "eyes", "white_check_mark", "rocket", "pray"];

export function emojiGlyph(name) {
  return EMOJI[name] || `:${name}:`;
}

// Message text: mentions of people the message mentions, references to channels the
// reader knows, and http(s) links get their own elements; everything stays text ("#1" or
// "@nobody" stay plain).
const TOKEN = /(@[A-Za-z0-9_.\-]+|#[a-z0-9_\-]+|https?:\/\/[^\s<>"']+)/g;

export function richText(text, isMe, isUser = () => true, isChannel = () => true) {
  const frag = document.createDocumentFragment();
  let last = 0;
  for (const match of text.matchAll(TOKEN)) {
    const token = match[0];
    const start = match.index;
    if (start > 0 && /[A-Za-z0-9_]/.test(text[start - 1]) && token[0] !== "h") continue;
    if (token[0] === "@" && !isUser(token.slice(1))) continue;
    if (token[0] === "#" && !isChannel(token.slice(1))) continue;
    if (start > last) frag.appendChild(document.createTextNode(text.slice(last, start)));
    if (token[0] === "@") {
      const handle = token.slice(1);
      frag.appendChild(h("span", { class: isMe(handle) ? "mention mention-me" : "mention", text: token }));
    } else if (token[0] === "#") {
      frag.appendChild(h("span", { class: "chanref", text: token }));
    } else {
      frag.appendChild(h("a", { href: token, target: "_blank", rel: "noopener noreferrer", text: token }));
    }
    last = start + token.length;
  }
  if (last < text.length) frag.appendChild(document.createTextNode(text.slice(last)));
  return frag;
}

export function formatTime(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

export function formatDay(ms) {
  const d = new Date(ms);
  const today = new Date();
  if (d.toDateString() === today.toDateString()) return "Today";
  const y = new Date(today);
  y.setDate(today.getDate() - 1);
  if (d.toDateString() === y.toDateString()) return "Yesterday";
  return d.toLocaleDateString([], { weekday: "long", month: "long", day: "numeric" });
}

export function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

const SVG_NS = "http://www.w3.org/2000/svg";
const ICONS = {
  lock: "M5 7V5a3 3 0 0 1 6 0v2h1a1 1 0 0 1 1 1v6a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V8a1 1 0 0 1 1-1h1zm2 0h2V5a1 1 0 0 0-2 0v2z",
};

/** A small inline SVG icon (built with DOM calls: no markup parsing, fine under the CSP). */
export function icon(name, cls = "svg-icon") {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 16 16");
  svg.setAttribute("class", cls);
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(SVG_NS, "path");
  path.setAttribute("d", ICONS[name]);
  path.setAttribute("fill", "currentColor");
  svg.appendChild(path);
  return svg;
}
