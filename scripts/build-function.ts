/**
 * `npm run build`: bundles the function as `pulumi up` does and prints its size and cold import time.
 *
 *   bytes        index.js as deployed (minified)
 *   zipped       index.js deflated at level 9, as in the Lambda zip
 *   archive      the whole deployed directory deflated (index.js + the lazily loaded tokenizer ranks)
 *   cold import  median wall time of `require(index.js)` in fresh Node processes
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { deflateRawSync } from "node:zlib";
import { bundleFunction } from "../infra/bundle";

const root = path.resolve(__dirname, "..");
const { outdir, entry } = bundleFunction(path.join(root, "functions/ai-chat/index.ts"), path.join(root, ".build/ai-chat"));

const files = (dir: string): string[] =>
  fs.readdirSync(dir, { withFileTypes: true }).flatMap((d) => (d.isDirectory() ? files(path.join(dir, d.name)) : [path.join(dir, d.name)]));
const zipped = (file: string) => deflateRawSync(fs.readFileSync(file), { level: 9 }).length;

const runs = Number(process.env.IMPORT_RUNS ?? 15);
const times: number[] = [];
for (let i = 0; i < runs; i++) {
  const out = execFileSync(process.execPath, [
    "-e",
    `const t=process.hrtime.bigint();require(${JSON.stringify(entry)});console.log(Number(process.hrtime.bigint()-t)/1e6)`,
  ]);
  times.push(Number(out.toString().trim()));
}
times.sort((a, b) => a - b);

const kb = (n: number) => `${(n / 1024).toFixed(1)} kB`;
const all = files(outdir);
console.log(`bundle       ${path.relative(root, entry)}`);
console.log(`bytes        ${fs.statSync(entry).size} (${kb(fs.statSync(entry).size)})`);
console.log(`zipped       ${zipped(entry)} (${kb(zipped(entry))})`);
console.log(`archive      ${all.length} files, ${kb(all.reduce((s, f) => s + zipped(f), 0))} deflated (tokenizer ranks load only when usage is missing)`);
console.log(`cold import  median ${times[Math.floor(times.length / 2)].toFixed(1)} ms over ${runs} fresh processes (node ${process.version})`);
