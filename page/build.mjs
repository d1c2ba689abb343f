// Builds replserver/static/editor.js (CodeMirror 6 and src/editor.js, one minified file
// with no eval, as the page's Content-Security-Policy wants) and editor.LICENSES.txt (the
// licence of every package in the bundle, read from esbuild's list of its inputs).
// Run by `make page` after `npm ci`; the same lock file gives the same bytes.
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "replserver", "static");

const result = await build({
  entryPoints: [join(here, "src", "editor.js")],
  outfile: join(out, "editor.js"),
  absWorkingDir: here,
  bundle: true,
  format: "iife",
  minify: true,
  target: ["chrome105", "firefox110", "safari16"],
  legalComments: "none",
  charset: "utf8",
  metafile: true,
  banner: {
    js: "/* replserver's page editor: CodeMirror 6 (MIT) and page/src/editor.js, built by `make page`; licences in editor.LICENSES.txt */",
  },
});

// node_modules/<name> or node_modules/@scope/<name>: the packages the bundle holds.
const packages = new Set();
for (const input of Object.keys(result.metafile.inputs)) {
  const match = input.match(/node_modules\/((?:@[^/]+\/)?[^/]+)\//u);
  if (match) packages.add(match[1]);
}

const sections = [...packages].sort().map((name) => {
  const dir = join(here, "node_modules", name);
  const meta = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
  const file = readdirSync(dir).find((f) => /^licen[cs]e/iu.test(f));
  const text = file ? readFileSync(join(dir, file), "utf8").trim() : `License: ${meta.license}`;
  return `${name} ${meta.version} (${meta.license})\n\n${text}\n`;
});
writeFileSync(
  join(out, "editor.LICENSES.txt"),
  `Packages bundled in editor.js (built from page/package-lock.json by \`make page\`)\n\n${sections.join(`\n${"-".repeat(72)}\n\n`)}`,
);
console.log(`editor.js: ${packages.size} packages, ${Object.keys(result.metafile.inputs).length} modules`);
