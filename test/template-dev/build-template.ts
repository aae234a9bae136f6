/**
 * Builds (or finds cached) built-in templates by hand and prints time and size:
 *
 *   node --import tsx test/template-dev/build-template.ts [base] [code-interpreter-v1] …
 *
 * Uses the server's configuration (CUBICLE_TEMPLATE_DIR, CUBICLE_STATE_DIR).
 */
import { loadConfig } from "../../src/shared/config.js";
import { SqliteStore, storeFile } from "../../src/store/index.js";
import { ensureTemplate } from "../../src/template/index.js";

const config = loadConfig();
const store = new SqliteStore(storeFile(config.stateDir));
const ids = process.argv.slice(2);
for (const id of ids.length > 0 ? ids : ["base"]) {
  const startedAt = Date.now();
  const record = await ensureTemplate(config, store, id);
  const seconds = ((Date.now() - startedAt) / 1000).toFixed(1);
  console.log(
    `${record.templateId}: ${record.rootfsDir} ${(record.sizeBytes / 2 ** 20).toFixed(0)} MiB, ` +
      `built ${record.builtAt}, ensureTemplate took ${seconds} s`,
  );
}
await store.close();
