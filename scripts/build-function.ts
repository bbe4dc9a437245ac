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

export interface BundleFigures {
  entry: string;
  outdir: string;
  bytes: number;
  zippedBytes: number;
  archiveFiles: number;
  archiveZippedBytes: number;
  coldImportMs: number;
  importRuns: number;
}

/** Builds the bundle and measures it: size, deflated size, and median cold `require` time in fresh processes. */
export function measureBundle(runs = Number(process.env.IMPORT_RUNS ?? 15)): BundleFigures {
  const root = path.resolve(__dirname, "..");
  const { outdir, entry } = bundleFunction(path.join(root, "functions/ai-chat/index.ts"), path.join(root, ".build/ai-chat"));
  const files = (dir: string): string[] =>
    fs.readdirSync(dir, { withFileTypes: true }).flatMap((d) => (d.isDirectory() ? files(path.join(dir, d.name)) : [path.join(dir, d.name)]));
  const zipped = (file: string) => deflateRawSync(fs.readFileSync(file), { level: 9 }).length;
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const out = execFileSync(process.execPath, [
      "-e",
      `const t=process.hrtime.bigint();require(${JSON.stringify(entry)});console.log(Number(process.hrtime.bigint()-t)/1e6)`,
    ]);
    times.push(Number(out.toString().trim()));
  }
  times.sort((a, b) => a - b);
  const all = files(outdir);
  return {
    entry,
    outdir,
    bytes: fs.statSync(entry).size,
    zippedBytes: zipped(entry),
    archiveFiles: all.length,
    archiveZippedBytes: all.reduce((sum, file) => sum + zipped(file), 0),
    coldImportMs: times[Math.floor(times.length / 2)],
    importRuns: runs,
  };
}

if (require.main === module) {
  const f = measureBundle();
  const kb = (n: number) => `${(n / 1024).toFixed(1)} kB`;
  console.log(`bundle       ${path.relative(process.cwd(), f.entry)}`);
  console.log(`bytes        ${f.bytes} (${kb(f.bytes)})`);
  console.log(`zipped       ${f.zippedBytes} (${kb(f.zippedBytes)})`);
  console.log(`archive      ${f.archiveFiles} files, ${kb(f.archiveZippedBytes)} deflated (tokenizer ranks load only when usage is missing)`);
  console.log(`cold import  median ${f.coldImportMs.toFixed(1)} ms over ${f.importRuns} fresh processes (node ${process.version})`);
}
