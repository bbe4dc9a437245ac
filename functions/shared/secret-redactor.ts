/**
 * Removes the service's own secrets (the upstream key, the Moesif application id) from text that came from
 * somewhere the service does not control — an upstream's body or headers — and from log lines.
 *
 * An echoed secret need not be spelled the way it was sent: JSON may escape any character (`sk\u002d…`, `\/`), a URL
 * percent-encodes it, base64 shifts it by its offset. So text is checked for every one of those spellings, and JSON
 * is decoded first and checked string by string (object keys too), then re-serialised only when something was
 * replaced.
 */
import { forEachJsonString, mapJsonStrings, stringifyJson } from "./json";

/** What replaces a secret. */
export const REDACTED = "[REDACTED]";

/** Secrets shorter than this are not looked for: they would match ordinary text. */
export const MIN_SECRET_LENGTH = 8;

export class SecretRedactor {
  /** Every spelling of every secret, longest first, so a longer spelling is replaced before a shorter part of it. */
  private readonly spellings: string[];
  private readonly secrets: string[];

  constructor(secrets: ReadonlyArray<string | undefined>) {
    this.secrets = [...new Set(secrets.filter((s): s is string => typeof s === "string" && s.length >= MIN_SECRET_LENGTH))];
    const spellings = new Set<string>();
    for (const secret of this.secrets) for (const spelling of spellingsOf(secret)) spellings.add(spelling);
    this.spellings = [...spellings].sort((a, b) => b.length - a.length);
  }

  /** Length of the longest secret: a window this long minus one is enough to see a secret split across pieces. */
  get longestSecret(): number {
    return this.secrets.reduce((max, s) => Math.max(max, s.length), 0);
  }

  /**
   * True when `text` ends with the first `minLength` or more characters of a secret: the next piece of a stream
   * could complete it, so what ends here must not go out yet.
   */
  endsWithSecretPrefix(text: string, minLength = 4): boolean {
    for (const secret of this.secrets) {
      for (let n = Math.min(secret.length - 1, text.length); n >= minLength; n--) {
        if (text.endsWith(secret.slice(0, n))) return true;
      }
    }
    return false;
  }

  /** True when there is nothing to look for. */
  get empty(): boolean {
    return this.secrets.length === 0;
  }

  /** Replaces every known spelling of every secret in `text`. */
  redactText(text: string): string {
    let out = text;
    for (const spelling of this.spellings) if (out.includes(spelling)) out = out.split(spelling).join(REDACTED);
    return out;
  }

  /**
   * True when `text` holds a secret in any spelling: raw, JSON-escaped, percent-encoded or base64 — including
   * spellings that mix escapes, which are decoded before looking.
   */
  containsSecret(text: string): boolean {
    if (this.empty) return false;
    if (this.spellings.some((s) => text.includes(s))) return true;
    // Line-wrapped base64 (MIME, PEM) breaks a spelling with newlines: look again without them.
    if (/[\r\n]/.test(text)) {
      const unwrapped = text.replace(/[\r\n]+/g, "");
      if (this.spellings.some((s) => unwrapped.includes(s))) return true;
    }
    const decoded = [unescapeJsonLike(text), safeDecodeUri(text)];
    return decoded.some((d) => d !== text && this.secrets.some((s) => d.includes(s)));
  }

  /**
   * Redacts a body. JSON is parsed and every string checked, so escapes cannot hide a secret; when one is found
   * the JSON is re-serialised from the redacted value (`json` is that value). Text that is not JSON is redacted
   * spelling by spelling, and replaced whole if a mixed spelling survives.
   */
  redactBody(text: string): { text: string; json: unknown; changed: boolean } {
    let json: unknown;
    try {
      json = JSON.parse(text) as unknown;
    } catch {
      if (!this.containsSecret(text)) return { text, json: undefined, changed: false };
      const redacted = this.redactText(text);
      return { text: this.containsSecret(redacted) ? REDACTED : redacted, json: undefined, changed: true };
    }
    if (this.empty) return { text, json, changed: false };
    let found = false;
    forEachJsonString(json, (s) => {
      if (!found && this.containsSecret(s)) found = true;
    });
    if (!found) {
      // JSON.parse keeps only the last of duplicate keys, so a secret in an earlier duplicate is in the text but in
      // no parsed string: answer the parsed value (which has no secret), never the raw text.
      if (!this.containsSecret(text)) return { text, json, changed: false };
      return { text: stringifyJson(json), json, changed: true };
    }
    const redacted = mapJsonStrings(json, (s) => this.redactString(s));
    return { text: stringifyJson(redacted), json: redacted, changed: true };
  }

  /** Redacts header values (a value a mixed spelling survives in is replaced whole) and drops names holding one. */
  redactHeaders(headers: Record<string, string>): { headers: Record<string, string>; changed: boolean } {
    if (this.empty) return { headers, changed: false };
    const out: Record<string, string> = {};
    let changed = false;
    for (const [name, value] of Object.entries(headers)) {
      if (this.containsSecret(name)) {
        changed = true;
        continue;
      }
      const redacted = this.redactString(value);
      if (redacted !== value) changed = true;
      out[name] = redacted;
    }
    return { headers: out, changed };
  }

  /** Redacts one string: spelling by spelling, or whole when a mixed spelling survives that. */
  redactString(value: string): string {
    if (!this.containsSecret(value)) return value;
    const redacted = this.redactText(value);
    return this.containsSecret(redacted) ? REDACTED : redacted;
  }
}

/**
 * The spellings a secret can take in text: raw; JSON-escaped (quotes, backslashes, control characters, and `\/`);
 * percent-encoded (upper- and lower-case hex, `+` for spaces); hex; and base64 / base64url at each of the three byte
 * offsets it can start at inside a longer encoded value (the characters that depend only on the secret).
 */
export function spellingsOf(secret: string): string[] {
  const out = new Set<string>([secret]);
  const json = JSON.stringify(secret).slice(1, -1);
  out.add(json);
  out.add(json.replace(/\//g, "\\/"));
  const uri = encodeURIComponent(secret);
  out.add(uri);
  out.add(uri.replace(/%[0-9A-F]{2}/g, (m) => m.toLowerCase()));
  out.add(uri.replace(/%20/g, "+"));
  const bytes = Buffer.from(secret, "utf8");
  out.add(bytes.toString("hex"));
  out.add(bytes.toString("hex").toUpperCase());
  for (let offset = 0; offset < 3; offset++) {
    const encoded = Buffer.concat([Buffer.alloc(offset), bytes]).toString("base64").replace(/=+$/, "");
    // Characters before `start` mix in the bytes before the secret; characters after `end` the bytes after it.
    const start = Math.ceil(offset / 3) * 4;
    const end = Math.floor((offset + bytes.length) / 3) * 4;
    const core = encoded.slice(start, end);
    if (core.length >= MIN_SECRET_LENGTH) {
      out.add(core);
      out.add(core.replace(/\+/g, "-").replace(/\//g, "_"));
    }
  }
  return [...out].filter((s) => s.length >= MIN_SECRET_LENGTH || s === secret);
}

/** Decodes JSON-style escapes (`\uXXXX`, `\/`, `\n`…) anywhere in text, for looking, not for output. */
function unescapeJsonLike(text: string): string {
  if (!text.includes("\\")) return text;
  return text.replace(/\\u([0-9a-fA-F]{4})|\\(.)/g, (_, hex: string | undefined, ch: string | undefined) => {
    if (hex) return String.fromCharCode(parseInt(hex, 16));
    return ch === "n" ? "\n" : ch === "t" ? "\t" : ch === "r" ? "\r" : ch === "b" ? "\b" : ch === "f" ? "\f" : (ch ?? "");
  });
}

function safeDecodeUri(text: string): string {
  if (!text.includes("%") && !text.includes("+")) return text;
  try {
    return decodeURIComponent(text.replace(/\+/g, " "));
  } catch {
    // A stray "%" makes the whole string invalid: decode the valid escapes one by one.
    return text.replace(/(%[0-9a-fA-F]{2})+/g, (run) => {
      try {
        return decodeURIComponent(run);
      } catch {
        return run;
      }
    });
  }
}
