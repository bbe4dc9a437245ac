import { expect } from "chai";
import { forEachJsonString, mapJsonStrings, stringifyJson } from "../../functions/shared/json";

describe("iterative JSON helpers", () => {
  const deepText = (depth: number) => "[".repeat(depth) + '{"k":"v"}' + "]".repeat(depth);

  it("serialises exactly as JSON.stringify does", () => {
    const samples = ['{"a":1,"b":[1,2,{"c":null}],"d":"x\\u0000\\"y","e":true,"f":-0,"g":1e21,"h":{}}', "[]", '"s"', "0", '{"__proto__":{"x":1}}', '[1,"é",[[]]]'];
    for (const text of samples) {
      const value = JSON.parse(text) as unknown;
      expect(stringifyJson(value)).to.equal(JSON.stringify(value));
    }
    expect(stringifyJson({ a: undefined, b: () => 1, c: [undefined, Number.NaN] })).to.equal(JSON.stringify({ a: undefined, b: () => 1, c: [undefined, Number.NaN] }));
  });

  it("serialises, walks and maps values nested 100,000 deep", () => {
    const text = deepText(100_000);
    const value = JSON.parse(text) as unknown;
    expect(() => JSON.stringify(value)).to.throw(RangeError);
    expect(stringifyJson(value)).to.equal(text);
    const seen: string[] = [];
    forEachJsonString(value, (s) => seen.push(s));
    expect(seen).to.deep.equal(["k", "v"]);
    expect(stringifyJson(mapJsonStrings(value, (s) => s.toUpperCase()))).to.equal(text.replace('"k":"v"', '"K":"V"'));
  });

  it("keeps a __proto__ key an ordinary key when mapping", () => {
    const value = JSON.parse('{"__proto__":{"polluted":"yes"}}') as unknown;
    const mapped = mapJsonStrings(value, (s) => s) as Record<string, unknown>;
    expect(Object.keys(mapped)).to.deep.equal(["__proto__"]);
    expect(({} as Record<string, unknown>).polluted).to.equal(undefined);
  });
});
