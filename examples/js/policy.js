// The cache policy's logic, free of any WebAssembly binding so `node --test`
// can check it: which requests may be answered from the cache, whether an
// answer is shared by the tenant or private to one user, and which answers
// may be stored at all.
//
// Personal data decides the scope. A request carrying an email address, a
// phone number, a payment card (Luhn-checked), an IBAN (mod-97-checked), a
// national id, an IP address or an order/account reference — or speaking
// about the user ("my invoice") — gets an answer private to that user.
// Secrets (API keys, passwords) are never cached at all, nor are requests
// about the present ("today", "latest") or agent steps. An answer that itself
// carries personal data is never stored for the whole tenant.

export const DEFAULTS = {
  ttl_seconds: 3600,
  ttl_by_feature: {},
  max_temperature: 0.5,
  personal_features: [],
  dynamic_features: [],
  dynamic_markers: ['today', 'tonight', 'now', 'right now', 'currently', 'current',
    'latest', 'yesterday', 'tomorrow', 'this week', 'status'],
  // "How do I ..." asks for the same answer whoever asks; "my plan" may not.
  personal_markers: ['me', 'my', 'mine', 'myself', 'our', 'ours'],
  refusal_markers: ["i'm sorry, but", 'i cannot help', "i can't help", 'as an ai'],
};

const EMAIL = /[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}/i;
const PHONE = /(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}\b/;
const CARD = /\b\d(?:[ -]?\d){12,18}\b/g;
const IBAN = /\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b/g;
const NATIONAL_ID = /\b\d{3}-\d{2}-\d{4}\b/;
const IPV4 = /\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b/;
const REFERENCE = /\b(?:order|account|invoice|ticket|customer|case|booking)\s*(?:#|no\.?|number|id)\s*:?\s*[a-z0-9-]*\d[a-z0-9-]{3,}/i;
const SECRET = /\b(?:sk-[a-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abprs]-[a-z0-9-]{10,})|\b(?:password|passwd|api[_ -]?key|secret)\s*[:=]\s*\S+/i;

function luhn(digits) {
  let sum = 0;
  for (let i = 0; i < digits.length; i++) {
    let d = digits.charCodeAt(digits.length - 1 - i) - 48;
    if (i % 2 === 1) {
      d *= 2;
      if (d > 9) d -= 9;
    }
    sum += d;
  }
  return sum % 10 === 0;
}

function ibanValid(raw) {
  const s = raw.replace(/ /g, '');
  const moved = s.slice(4) + s.slice(0, 4);
  let rem = 0;
  for (const ch of moved) {
    const v = ch >= 'A' ? (ch.charCodeAt(0) - 55).toString() : ch;
    for (const d of v) rem = (rem * 10 + (d.charCodeAt(0) - 48)) % 97;
  }
  return rem === 1;
}

/** The kinds of personal data in `text` (empty when none). */
export function personalData(text) {
  const found = [];
  // The engine interprets regular expressions: skip the ones that cannot
  // match, which matters on a pasted document of thousands of words.
  if (text.includes('@') && EMAIL.test(text)) found.push('email');
  if (!/\d/.test(text)) return found; // every other kind has digits
  let card = false;
  for (const m of text.matchAll(CARD)) {
    const digits = m[0].replace(/[ -]/g, '');
    if (digits.length >= 13 && luhn(digits)) {
      card = true;
      break;
    }
  }
  // A long digit run (a card number, valid or not) is not a phone number,
  // though its groups would read as one.
  if (PHONE.test(text.replace(CARD, (m) => (m.replace(/[ -]/g, '').length >= 13 ? ' ' : m)))) {
    found.push('phone');
  }
  if (card) found.push('payment card');
  for (const m of text.matchAll(IBAN)) {
    if (ibanValid(m[0])) {
      found.push('iban');
      break;
    }
  }
  if (NATIONAL_ID.test(text)) found.push('national id');
  if (IPV4.test(text)) found.push('ip address');
  if (REFERENCE.test(text)) found.push('reference');
  return found;
}

export function hasSecret(text) {
  return SECRET.test(text);
}

// What a long message asks sits in its first or last paragraph, around a
// pasted document whose own words ("current", "my") say nothing about
// whether the answer is personal or live; at most ASK characters of each.
const ASK = 300;

function ask(text) {
  if (text.length <= 2 * ASK) return text;
  const paragraphs = text.split(/\n\s*\n/);
  const first = paragraphs[0].slice(0, ASK);
  const last = paragraphs.length > 1 ? paragraphs[paragraphs.length - 1].slice(-ASK) : text.slice(-ASK);
  return `${first}\n${last}`;
}

function words(text) {
  // Letters of the Latin scripts and digits (the engine has no Unicode
  // property classes).
  return text.toLowerCase().replace(/\u2019/g, "'").split(/[^a-z0-9\u00c0-\u024f']+/).filter(Boolean);
}

/**
 * True when one of `phrases` (one word, or several in a row) occurs in the
 * words `ws`. One native substring search per phrase over the words joined
 * by spaces: a loop in JavaScript over every word of a long document would
 * cost tens of millions of instructions in the interpreter.
 */
function hasPhrase(ws, phrases) {
  const joined = ` ${ws.join(' ')} `;
  return phrases.some((p) => joined.includes(` ${p} `));
}

export function settings(json) {
  const cfg = json ? JSON.parse(json) : {};
  if (cfg === null || typeof cfg !== 'object' || Array.isArray(cfg)) {
    throw new Error('config must be a JSON object');
  }
  const unknown = Object.keys(cfg).filter((k) => !(k in DEFAULTS));
  if (unknown.length) {
    throw new Error(`unknown config keys: ${unknown.join(', ')} (known: ${Object.keys(DEFAULTS).join(', ')})`);
  }
  const s = { ...DEFAULTS, ...cfg };
  const ttls = [s.ttl_seconds, ...Object.values(s.ttl_by_feature)];
  if (!ttls.every((t) => Number.isInteger(t) && t >= 1 && t <= 0xffffffff)) {
    throw new Error('ttl_seconds and ttl_by_feature values must be whole seconds, at least 1');
  }
  if (typeof s.max_temperature !== 'number') throw new Error('max_temperature must be a number');
  for (const k of ['personal_features', 'dynamic_features', 'dynamic_markers', 'personal_markers', 'refusal_markers']) {
    if (!Array.isArray(s[k]) || !s[k].every((w) => typeof w === 'string')) {
      throw new Error(`${k} must be a list of strings`);
    }
  }
  const phrase = (m) => m.toLowerCase().split(/\s+/).filter(Boolean).join(' ');
  s.dynamic_markers = s.dynamic_markers.map(phrase).filter(Boolean);
  s.personal_markers = s.personal_markers.map(phrase).filter(Boolean);
  s.refusal_markers = s.refusal_markers.map((m) => m.toLowerCase());
  return s;
}

/**
 * The decision for a request: `{ bypass: reason }` or
 * `{ scope: 'tenant' | 'tenant-user', ttl, why }`. `req` has the WIT
 * request-view's fields in camelCase (messages of {role, content}).
 */
export function decide(req, s) {
  const msgs = req.messages;
  const last = msgs.length ? msgs[msgs.length - 1] : null;
  if (req.hasTools || (last && last.role === 'tool')) return { bypass: 'agent step (tools)' };
  if (req.temperature != null && req.temperature > s.max_temperature) {
    return { bypass: `temperature ${req.temperature} above ${s.max_temperature}` };
  }
  if (s.dynamic_features.includes(req.feature)) return { bypass: `feature ${req.feature} is dynamic` };
  // What the user wrote, and context injected after the application's own
  // system prompt (account data, a status snapshot).
  const systems = msgs.filter((m) => m.role === 'system');
  const said = msgs.filter((m) => m.role === 'user').map((m) => m.content).join('\n');
  const injected = systems.slice(1).map((m) => m.content).join('\n');
  if (hasSecret(said) || hasSecret(injected)) return { bypass: 'a secret in the prompt' };
  const lastUser = [...msgs].reverse().find((m) => m.role === 'user');
  const ws = words(ask(lastUser ? lastUser.content : ''));
  if (hasPhrase(ws, s.dynamic_markers)) return { bypass: 'question about the present' };

  const ttl = s.ttl_by_feature[req.feature] ?? s.ttl_seconds;
  const pii = personalData(`${said}\n${injected}`);
  if (pii.length) return { scope: 'tenant-user', ttl, why: `personal data: ${pii.join(', ')}` };
  if (systems.length > 1) return { scope: 'tenant-user', ttl, why: 'injected context' };
  if (s.personal_features.includes(req.feature)) return { scope: 'tenant-user', ttl, why: 'personal feature' };
  if (req.tags.some((t) => t.key === 'personal')) return { scope: 'tenant-user', ttl, why: 'personal tag' };
  if (hasPhrase(ws, s.personal_markers)) return { scope: 'tenant-user', ttl, why: 'speaks about the user' };
  return { scope: 'tenant', ttl, why: 'general question' };
}

/** Whether an upstream answer may be stored, and why not when it may not. */
export function admitAnswer(req, resp, s) {
  if (resp.finishReason !== 'stop') return { admit: false, why: `finished by ${resp.finishReason}` };
  const text = resp.content.trim();
  if (!text) return { admit: false, why: 'empty answer' };
  // Decided again rather than remembered from lookup: admit may run on
  // another instance of the plugin than the lookup did.
  const d = decide(req, s);
  if (d.bypass) return { admit: false, why: d.bypass };
  if (hasSecret(text)) return { admit: false, why: 'a secret in the answer' };
  const lower = text.slice(0, 200).toLowerCase();
  if (s.refusal_markers.some((m) => lower.includes(m))) return { admit: false, why: 'a refusal' };
  if (d.scope === 'tenant') {
    const pii = personalData(text);
    if (pii.length) return { admit: false, why: `shared answer carries personal data: ${pii.join(', ')}` };
  }
  return { admit: true, why: d.why };
}
