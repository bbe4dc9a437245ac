import { expect } from "chai";
import { REDACTED, SecretRedactor, spellingsOf } from "../../functions/shared/secret-redactor";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const KEY = "sk-proj-Redactor/Test+Key-0123456789";
registerSecret(KEY);

describe("SecretRedactor", () => {
  const redactor = new SecretRedactor([KEY, undefined, "short"]);

  it("finds the secret in every spelling an upstream may use", () => {
    const base64At = (offset: number) => Buffer.from(`${"x".repeat(offset)}${KEY}tail`).toString("base64");
    const spellings = [
      KEY,
      KEY.replace(/-/g, "\\u002d"),
      KEY.replace(/\//g, "\\/"),
      KEY.replace(/[a-z]/g, (c) => `\\u00${c.charCodeAt(0).toString(16)}`),
      encodeURIComponent(KEY),
      encodeURIComponent(KEY).replace(/%[0-9A-F]{2}/g, (hex) => hex.toLowerCase()),
      base64At(0),
      base64At(1),
      base64At(2),
      base64At(1).replace(/\+/g, "-").replace(/\//g, "_"),
    ];
    for (const text of spellings) expect(redactor.containsSecret(`before ${text} after`), text).to.equal(true);
    expect(redactor.containsSecret("nothing to see")).to.equal(false);
  });

  it("redacts JSON string by string, whatever the escapes, and re-serialises only then", () => {
    const text = `{"id":"chatcmpl-1","model":"${KEY.replace(/-/g, "\\u002d")}","list":[{"${KEY}":1}],"n":1}`;
    const { text: redacted, json, changed } = redactor.redactBody(text);
    recordForScan("redactor unit test", [redacted]);
    expect(changed).to.equal(true);
    expect(redacted).to.not.include("sk-proj");
    expect(JSON.parse(redacted)).to.deep.equal({ id: "chatcmpl-1", model: REDACTED, list: [{ [REDACTED]: 1 }], n: 1 });
    expect(json).to.deep.equal(JSON.parse(redacted));
    const clean = '{"id":"x",  "n": 1.50}';
    expect(redactor.redactBody(clean)).to.deep.include({ text: clean, changed: false });
  });

  it("redacts a JSON body nested 50,000 deep", () => {
    const text = "[".repeat(50_000) + JSON.stringify(KEY) + "]".repeat(50_000);
    const { text: redacted } = redactor.redactBody(text);
    expect(redacted).to.equal("[".repeat(50_000) + JSON.stringify(REDACTED) + "]".repeat(50_000));
  });

  it("redacts text that is not JSON, and headers", () => {
    expect(redactor.redactBody(`oops ${KEY} and ${encodeURIComponent(KEY)}`).text).to.equal(`oops ${REDACTED} and ${REDACTED}`);
    const { headers, changed } = redactor.redactHeaders({ "retry-after": KEY, "x-echo": `k=${KEY.replace(/-/g, "\\u002d")}`, [KEY]: "1", "content-type": "application/json" });
    expect(changed).to.equal(true);
    // A spelling that mixes escapes cannot be cut out of a header value, so the whole value goes.
    expect(headers).to.deep.equal({ "retry-after": REDACTED, "x-echo": REDACTED, "content-type": "application/json" });
  });

  it("ignores secrets too short to look for", () => {
    expect(new SecretRedactor(["short"]).redactText("a short text")).to.equal("a short text");
    expect(spellingsOf(KEY).every((s) => s.length >= 8)).to.equal(true);
  });
});
