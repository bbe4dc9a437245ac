/**
 * JSON helpers that never recurse, so no input can overflow the stack.
 *
 * `JSON.parse` in V8 is iterative and accepts arrays nested 200,000 deep, but `JSON.stringify`, `String([...])`
 * and any recursive walk throw "Maximum call stack size exceeded" on the same value at a depth of about 10,000.
 * Everything that walks a parsed request or answer (token estimates, secret redaction, re-serialising a request)
 * goes through these helpers instead.
 */

type Frame =
  | { kind: "array"; value: unknown[]; index: number }
  | { kind: "object"; value: Record<string, unknown>; keys: string[]; index: number; wrote: boolean };

/**
 * `JSON.stringify(value)` (compact) for JSON data, without recursion. Object keys keep their order; `undefined`
 * and functions are skipped in objects and written as `null` in arrays, non-finite numbers as `null`, as
 * `JSON.stringify` does; a root JSON cannot hold is written as `null`. `toJSON` methods are not called (parsed JSON
 * has none).
 */
export function stringifyJson(value: unknown): string {
  const out: string[] = [];
  const stack: Frame[] = [];
  // Writes a scalar, or opens a container and pushes its frame. Returns false for values JSON cannot hold.
  const open = (v: unknown, inArray: boolean): boolean => {
    if (v === null) out.push("null");
    else if (typeof v === "string") out.push(JSON.stringify(v));
    else if (typeof v === "number") out.push(Number.isFinite(v) ? String(v) : "null");
    else if (typeof v === "boolean") out.push(v ? "true" : "false");
    else if (typeof v === "bigint") throw new TypeError("Do not know how to serialize a BigInt");
    else if (Array.isArray(v)) {
      out.push("[");
      stack.push({ kind: "array", value: v, index: 0 });
    } else if (typeof v === "object") {
      out.push("{");
      stack.push({ kind: "object", value: v as Record<string, unknown>, keys: Object.keys(v as object), index: 0, wrote: false });
    } else {
      if (inArray) out.push("null");
      return inArray;
    }
    return true;
  };
  open(value, true);
  while (stack.length > 0) {
    const frame = stack[stack.length - 1];
    if (frame.kind === "array") {
      if (frame.index >= frame.value.length) {
        out.push("]");
        stack.pop();
        continue;
      }
      if (frame.index > 0) out.push(",");
      open(frame.value[frame.index++], true);
    } else {
      if (frame.index >= frame.keys.length) {
        out.push("}");
        stack.pop();
        continue;
      }
      const key = frame.keys[frame.index++];
      const child = frame.value[key];
      if (child === undefined || typeof child === "function" || typeof child === "symbol") continue;
      out.push(`${frame.wrote ? "," : ""}${JSON.stringify(key)}:`);
      frame.wrote = true;
      open(child, false);
    }
  }
  return out.join("");
}

/** Calls `visit` with every string in `value` (object keys included), depth-first, without recursion. */
export function forEachJsonString(value: unknown, visit: (text: string) => void): void {
  const stack: unknown[] = [value];
  while (stack.length > 0) {
    const v = stack.pop();
    if (typeof v === "string") visit(v);
    else if (Array.isArray(v)) for (let i = v.length - 1; i >= 0; i--) stack.push(v[i]);
    else if (v !== null && typeof v === "object") {
      for (const [key, child] of Object.entries(v as Record<string, unknown>)) {
        visit(key);
        stack.push(child);
      }
    }
  }
}

/**
 * A copy of `value` with every string (object keys included) passed through `map`, without recursion. Objects are
 * rebuilt with `Object.defineProperty`, so a `__proto__` key stays an ordinary key as it was in the parsed JSON.
 */
export function mapJsonStrings(value: unknown, map: (text: string) => string): unknown {
  const copy = (v: unknown): unknown => (typeof v === "string" ? map(v) : Array.isArray(v) ? new Array(v.length) : v !== null && typeof v === "object" ? {} : v);
  const root = copy(value);
  const work: Array<{ source: unknown; target: unknown }> = [{ source: value, target: root }];
  while (work.length > 0) {
    const { source, target } = work.pop()!;
    if (Array.isArray(source)) {
      const out = target as unknown[];
      source.forEach((child, i) => {
        out[i] = copy(child);
        if (child !== null && typeof child === "object") work.push({ source: child, target: out[i] });
      });
    } else if (source !== null && typeof source === "object") {
      const out = target as Record<string, unknown>;
      for (const [key, child] of Object.entries(source as Record<string, unknown>)) {
        const mapped = copy(child);
        Object.defineProperty(out, map(key), { value: mapped, enumerable: true, writable: true, configurable: true });
        if (child !== null && typeof child === "object") work.push({ source: child, target: mapped });
      }
    }
  }
  return root;
}
