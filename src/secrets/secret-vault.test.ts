import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import Database from "better-sqlite3";
import { CubicleError } from "../shared/cubicle-error.js";
import { SqliteStore } from "../store/index.js";
import { parseNewSecret, parseSecretUpdate, SECRET_BOUNDS } from "./secret-input.js";
import { loadOrCreateSecretKey } from "./secret-key.js";
import { MAX_SECRETS, SecretVault } from "./secret-vault.js";

const VALUE = "sk-live-" + "7q".repeat(20);

function withDir(run: (dir: string) => Promise<void>): () => Promise<void> {
  return async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-secrets-"));
    try {
      await run(dir);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  };
}

function isCode(code: string, message?: RegExp) {
  return (err: unknown) => err instanceof CubicleError && err.code === code && (!message || message.test(err.message));
}

test(
  "create, read by id and by name in any case, update (version + 1, metadata kept or replaced), resolve, delete",
  withDir(async (dir) => {
    let clock = 1_000;
    const store = new SqliteStore(path.join(dir, "cubicle.db"));
    const vault = await SecretVault.open(store, loadOrCreateSecretKey(dir), { now: () => clock });
    const created = await vault.create(parseNewSecret({ name: "OpenAI-Key", value: VALUE, metadata: { team: "ml" } }));
    assert.match(created.secretId, /^sec_[0-9a-f]{24}$/);
    assert.deepEqual({ ...created, secretId: "" }, { secretId: "", name: "openai-key", currentVersion: 1, metadata: { team: "ml" }, createdAt: 1_000, updatedAt: 1_000 });
    assert.deepEqual(vault.info("OPENAI-KEY"), created);
    assert.deepEqual(vault.info(created.secretId), created);
    assert.equal(vault.resolveSecret("openai-key"), VALUE);
    assert.equal(vault.resolveSecret("OpenAI-Key"), VALUE, "placeholders match names lower-case too");
    assert.equal(vault.resolveSecret("nope"), undefined);
    await assert.rejects(vault.create(parseNewSecret({ name: "openai-KEY", value: "x" })), isCode("already_exists", /"openai-key"/));

    clock = 2_000;
    const updated = await vault.update("openai-key", parseSecretUpdate({ value: "second" }));
    assert.deepEqual([updated.currentVersion, updated.metadata, updated.createdAt, updated.updatedAt], [2, { team: "ml" }, 1_000, 2_000]);
    assert.equal(vault.resolveSecret("openai-key"), "second");
    const replaced = await vault.update(created.secretId, parseSecretUpdate({ value: "third", metadata: {} }));
    assert.deepEqual([replaced.currentVersion, replaced.metadata], [3, {}]);
    await assert.rejects(vault.update("missing", parseSecretUpdate({ value: "x" })), isCode("not_found"));
    assert.throws(() => vault.info("sec_000"), isCode("not_found"));

    const second = await vault.create(parseNewSecret({ name: "b", value: "bee" }));
    assert.deepEqual((await vault.list({ limit: 10 })).map((s) => s.name), ["openai-key", "b"]);
    assert.deepEqual((await vault.list({ limit: 10, after: { createdAt: created.createdAt, secretId: created.secretId } })).map((s) => s.name), ["b"]);
    assert.equal(await vault.delete("OPENAI-key"), true);
    assert.equal(await vault.delete("openai-key"), false);
    assert.equal(vault.resolveSecret("openai-key"), undefined);
    assert.equal(vault.size, 1);
    await store.close();

    // Reopened with the same key file: the values come back.
    const reopenedStore = new SqliteStore(path.join(dir, "cubicle.db"));
    const reopened = await SecretVault.open(reopenedStore, loadOrCreateSecretKey(dir));
    assert.equal(reopened.resolveSecret("b"), "bee");
    assert.equal(reopened.info(second.secretId).name, "b");
    await reopenedStore.close();
  }),
);

test(
  "the database file holds no value in clear, and a row's sealed value does not open under another secret's id",
  withDir(async (dir) => {
    const file = path.join(dir, "cubicle.db");
    const store = new SqliteStore(file);
    const vault = await SecretVault.open(store, loadOrCreateSecretKey(dir));
    await vault.create(parseNewSecret({ name: "one", value: VALUE }));
    await vault.create(parseNewSecret({ name: "two", value: VALUE + "-2" }));
    await vault.update("two", parseSecretUpdate({ value: VALUE + "-3" }));
    await store.close();
    for (const name of fs.readdirSync(dir)) {
      const bytes = fs.readFileSync(path.join(dir, name));
      assert.equal(bytes.includes(Buffer.from("7q7q7q7q")), false, `${name} holds the value in clear`);
    }

    // Someone with write access to the database moves one's sealed value into the other's row.
    const db = new Database(file);
    const one = db.prepare("SELECT iv, ciphertext, auth_tag FROM secrets WHERE name = 'one'").get() as Record<string, Buffer>;
    db.prepare("UPDATE secrets SET iv = ?, ciphertext = ?, auth_tag = ? WHERE name = 'two'").run(one.iv, one.ciphertext, one.auth_tag);
    db.close();
    const tamperedStore = new SqliteStore(file);
    const tampered = await SecretVault.open(tamperedStore, loadOrCreateSecretKey(dir));
    assert.equal(tampered.resolveSecret("one"), VALUE);
    assert.equal(tampered.resolveSecret("two"), undefined, "the secret id is the associated data");
    await tamperedStore.close();
  }),
);

test(
  "the key file: made once, 32 bytes, 0600; a wrong size or a key that does not open the stored secrets refuses to start",
  withDir(async (dir) => {
    const key = loadOrCreateSecretKey(dir);
    const file = path.join(dir, "secrets.key");
    assert.equal(key.length, 32);
    assert.equal(fs.statSync(file).mode & 0o777, 0o600);
    assert.deepEqual(loadOrCreateSecretKey(dir), key, "reused");
    assert.deepEqual(fs.readdirSync(dir), ["secrets.key"], "no temporary file left");
    fs.chmodSync(file, 0o644);
    loadOrCreateSecretKey(dir);
    assert.equal(fs.statSync(file).mode & 0o777, 0o600, "tightened");

    const store = new SqliteStore(path.join(dir, "cubicle.db"));
    await (await SecretVault.open(store, key)).create(parseNewSecret({ name: "a", value: "b" }));
    await assert.rejects(SecretVault.open(store, randomBytes(32)), isCode("failed_precondition", /does not decrypt the 1 stored secret/));
    await store.close();

    for (const bytes of [Buffer.alloc(0), Buffer.alloc(31), Buffer.from(key.toString("hex") + "\n")]) {
      fs.writeFileSync(file, bytes);
      assert.throws(() => loadOrCreateSecretKey(dir), isCode("failed_precondition", new RegExp(`holds ${bytes.length} bytes, not the 32`)));
    }
  }),
);

test(
  `at most ${MAX_SECRETS} secrets`,
  withDir(async (dir) => {
    const store = new SqliteStore(path.join(dir, "cubicle.db"));
    const vault = await SecretVault.open(store, randomBytes(32));
    for (let i = 0; i < MAX_SECRETS; i++) await vault.create({ name: `s${i}`, value: "v", metadata: {} });
    await assert.rejects(vault.create({ name: "one-more", value: "v", metadata: {} }), isCode("failed_precondition", /at most 1000 secrets/));
    await vault.delete("s0");
    await vault.create({ name: "one-more", value: "v", metadata: {} });
    await store.close();
  }),
);

test("bad inputs are 400s that say what is wrong and never quote the value", () => {
  const long = "v".repeat(SECRET_BOUNDS.valueBytes + 1);
  const cases: [unknown, RegExp][] = [
    [undefined, /JSON object/],
    [[], /JSON object/],
    ["name", /JSON object/],
    [{ value: "x" }, /name is required/],
    [{ name: "", value: "x" }, /name is required/],
    [{ name: 5, value: "x" }, /name is required/],
    [{ name: "a{b", value: "x" }, /not usable/],
    [{ name: "a}", value: "x" }, /not usable/],
    [{ name: "a\nb", value: "x" }, /not usable/],
    [{ name: "a\u0000", value: "x" }, /not usable/],
    [{ name: "a\u007f", value: "x" }, /not usable/],
    [{ name: "a\uD800", value: "x" }, /well-formed/],
    [{ name: "SEC_abc", value: "x" }, /reserved/],
    [{ name: "é".repeat(65), value: "x" }, /longer than 128 bytes/],
    [{ name: "..", value: "x" }, /cannot be a secret name/],
    [{ name: "a" }, /value is required/],
    [{ name: "a", value: "" }, /must not be empty/],
    [{ name: "a", value: 42 }, /value is required/],
    [{ name: "a", value: long }, /longer than 65536 bytes/],
    [{ name: "a", value: "ok\uDC00" }, /well-formed/],
    [{ name: "a", value: "x", metadata: [] }, /metadata must be an object/],
    [{ name: "a", value: "x", metadata: "k=v" }, /metadata must be an object/],
    [{ name: "a", value: "x", metadata: { k: 1 } }, /must be a string/],
    [{ name: "a", value: "x", metadata: { "": "v" } }, /1–128 bytes/],
    [{ name: "a", value: "x", metadata: { ["k".repeat(129)]: "v" } }, /1–128 bytes/],
    [{ name: "a", value: "x", metadata: { k: "v".repeat(1025) } }, /longer than 1024 bytes/],
    [{ name: "a", value: "x", metadata: Object.fromEntries(Array.from({ length: 33 }, (_, i) => [`k${i}`, "v"])) }, /at most 32 entries/],
    [{ name: "a", value: "x", metadata: Object.fromEntries(Array.from({ length: 9 }, (_, i) => [`k${i}`, "v".repeat(1000)])) }, /at most 8192/],
  ];
  for (const [body, message] of cases) {
    assert.throws(() => parseNewSecret(body), (err: unknown) => {
      assert.ok(err instanceof CubicleError && err.httpStatus === 400, String(err));
      assert.match(err.message, message);
      assert.ok(!err.message.includes("vvvvvvvv") || /metadata/.test(err.message), "no value quoted");
      return true;
    }, JSON.stringify(body)?.slice(0, 80));
  }
  assert.throws(() => parseSecretUpdate({ value: VALUE.slice(0, 3) + "\uD800" }), (err: Error) => !err.message.includes("sk-"));
  assert.deepEqual(parseNewSecret({ name: "Name With Spaces", value: "x", metadata: null }), { name: "name with spaces", value: "x", metadata: {} });
  assert.equal(parseNewSecret({ name: "é".repeat(64), value: "x" }).name.length, 64, "128 bytes is allowed");
  assert.deepEqual(Object.keys(parseSecretUpdate({ value: "x", metadata: JSON.parse('{"__proto__":"p"}') }).metadata!), ["__proto__"]);
  assert.equal(parseSecretUpdate({ value: "x" }).metadata, undefined);
});
