import assert from "node:assert/strict";
import os from "node:os";
import { test } from "node:test";
import { defaultMaxMemoryMB, defaultRunDir, loadConfig, parseHttpsPort, parseTemplateRuntime } from "./config.js";

test("create limits default to the host: its cores, its memory less 1 GiB, 64 GiB of disk; secure sandboxes are required", () => {
  const config = loadConfig({});
  assert.equal(config.maxCpuCount, os.availableParallelism());
  assert.equal(config.maxMemoryMB, Math.floor(os.totalmem() / 1024 / 1024) - 1024);
  assert.equal(config.maxDiskMB, 65536);
  assert.equal(config.requireSecure, true);
  assert.equal(defaultMaxMemoryMB(1024 * 1024 * 1024), 512, "a small host still allows 512 MiB");
});

test("create limits and CUBICLE_REQUIRE_SECURE from the environment; nonsense is refused at start", () => {
  const config = loadConfig({ CUBICLE_MAX_CPU_COUNT: "4", CUBICLE_MAX_MEMORY_MB: "2048", CUBICLE_MAX_DISK_MB: "1024", CUBICLE_REQUIRE_SECURE: "false" });
  assert.deepEqual([config.maxCpuCount, config.maxMemoryMB, config.maxDiskMB, config.requireSecure], [4, 2048, 1024, false]);
  assert.equal(loadConfig({ CUBICLE_REQUIRE_SECURE: "0" }).requireSecure, false);
  assert.equal(loadConfig({ CUBICLE_REQUIRE_SECURE: "yes" }).requireSecure, true);
  assert.throws(() => loadConfig({ CUBICLE_MAX_CPU_COUNT: "0" }), /CUBICLE_MAX_CPU_COUNT/);
  assert.throws(() => loadConfig({ CUBICLE_MAX_MEMORY_MB: "64" }), /CUBICLE_MAX_MEMORY_MB/);
  assert.throws(() => loadConfig({ CUBICLE_MAX_DISK_MB: "lots" }), /CUBICLE_MAX_DISK_MB/);
  assert.throws(() => loadConfig({ CUBICLE_REQUIRE_SECURE: "maybe" }), /CUBICLE_REQUIRE_SECURE/);
});

test("storage, image budget and admission settings from the environment; nonsense is refused at start", () => {
  const defaults = loadConfig({ CUBICLE_STATE_DIR: "/srv/state" });
  assert.equal(defaults.runDir, defaultRunDir("/srv/state"));
  assert.match(defaults.runDir, /^\/run\/cubicle\/[0-9a-f]{12}$/);
  assert.notEqual(defaultRunDir("/srv/other"), defaults.runDir, "one run dir per state dir");
  assert.deepEqual([defaults.storageBytes, defaults.imageBudgetBytes], [undefined, undefined]);
  assert.equal(defaults.maxStarting, Math.max(2, os.availableParallelism() * 2));
  assert.deepEqual([defaults.maxWaitingCreates, defaults.minAvailableMB], [500, 256]);
  const set = loadConfig({ CUBICLE_STORAGE_GB: "2.5", CUBICLE_IMAGE_BUDGET_GB: "1", CUBICLE_RUN_DIR: "/run/mine", CUBICLE_MAX_STARTING: "3", CUBICLE_MAX_WAITING_CREATES: "0", CUBICLE_MIN_AVAILABLE_MB: "0" });
  assert.deepEqual([set.storageBytes, set.imageBudgetBytes, set.runDir, set.maxStarting, set.maxWaitingCreates, set.minAvailableMB], [2.5 * 1024 ** 3, 1024 ** 3, "/run/mine", 3, 0, 0]);
  for (const [name, value] of [
    ["CUBICLE_STORAGE_GB", "0"],
    ["CUBICLE_STORAGE_GB", "-1"],
    ["CUBICLE_STORAGE_GB", "big"],
    ["CUBICLE_IMAGE_BUDGET_GB", "Infinity"],
    ["CUBICLE_MAX_STARTING", "0"],
    ["CUBICLE_MAX_STARTING", "2.5"],
    ["CUBICLE_MAX_WAITING_CREATES", "-3"],
    ["CUBICLE_MIN_AVAILABLE_MB", "1e9"],
  ]) {
    assert.throws(() => loadConfig({ [name!]: value }), new RegExp(name!), `${name}=${value}`);
  }
});

test("CUBICLE_HTTPS_PORT: 443 for root by default, a port, or off; TLS files go in pairs", () => {
  assert.equal(parseHttpsPort(undefined, true), 443);
  assert.equal(parseHttpsPort(undefined, false), undefined);
  assert.equal(parseHttpsPort("", true), 443);
  assert.equal(parseHttpsPort("8443", false), 8443);
  assert.equal(parseHttpsPort("off", true), undefined);
  assert.equal(parseHttpsPort("OFF", true), undefined);
  assert.equal(parseHttpsPort("0", true), undefined);
  for (const bad of ["65536", "-1", "443x", "on", "1e3"]) assert.throws(() => parseHttpsPort(bad, true), /CUBICLE_HTTPS_PORT/, bad);
  assert.equal(loadConfig({ CUBICLE_HTTPS_PORT: "off" }).httpsPort, undefined);
  const own = loadConfig({ CUBICLE_TLS_CERT: "/etc/cubicle/tls.crt", CUBICLE_TLS_KEY: "/etc/cubicle/tls.key" });
  assert.equal(own.tlsCertFile, "/etc/cubicle/tls.crt");
  assert.equal(own.tlsKeyFile, "/etc/cubicle/tls.key");
  assert.equal(loadConfig({}).tlsCertFile, undefined);
  assert.throws(() => loadConfig({ CUBICLE_TLS_CERT: "/etc/cubicle/tls.crt" }), /CUBICLE_TLS_CERT and CUBICLE_TLS_KEY go together/);
});

test("CUBICLE_TEMPLATE_BANDWIDTH names egress/ingress Mbit/s per template; bad entries stop the start", async () => {
  const { parseTemplateBandwidth } = await import("./config.js");
  assert.deepEqual(parseTemplateBandwidth("base=20/50,code-interpreter-v1=/100"), { base: { egressMbps: 20, ingressMbps: 50 }, "code-interpreter-v1": { ingressMbps: 100 } });
  assert.deepEqual(parseTemplateBandwidth(""), {});
  for (const bad of ["base=/", "base=20", "base=0/1", "=1/1", "base=1/200000", "base=x/1"]) assert.throws(() => parseTemplateBandwidth(bad), /CUBICLE_TEMPLATE_BANDWIDTH/, bad);
});

test("CUBICLE_DNS_UPSTREAM, CUBICLE_EGRESS_PRIVATE_ALLOW and CUBICLE_EGRESS_CA_FILE are checked; bad values stop the start", async () => {
  const { parseDnsUpstreams, parsePrivateAllow, parseCaFiles } = await import("./config.js");
  assert.deepEqual(parseDnsUpstreams("192.0.2.53, 198.51.100.1:5353"), [{ address: "192.0.2.53", port: 53 }, { address: "198.51.100.1", port: 5353 }]);
  assert.equal(parseDnsUpstreams(""), undefined);
  for (const bad of ["dns.example", "1.2.3.4:0", "1.2.3.4:70000", "::1", "1.2.3.999"]) assert.throws(() => parseDnsUpstreams(bad), /CUBICLE_DNS_UPSTREAM/, bad);
  assert.deepEqual(parsePrivateAllow("192.168.10.0/24,10.1.0.0/16"), ["192.168.10.0/24", "10.1.0.0/16"]);
  assert.deepEqual(parsePrivateAllow(""), []);
  for (const bad of ["192.168.10.0", "10.0.0.0/33", "lan", "10.0.0.0/8;rm"]) assert.throws(() => parsePrivateAllow(bad), /CUBICLE_EGRESS_PRIVATE_ALLOW/, bad);
  assert.deepEqual(parseCaFiles(""), []);
  assert.throws(() => parseCaFiles("/nonexistent/ca.pem"), /cannot read \/nonexistent\/ca\.pem/);
  assert.throws(() => parseCaFiles("/etc/hostname"), /holds no PEM certificate/);
});

test("CUBICLE_IDLE_FREEZE_SECONDS and CUBICLE_IDLE_DISK_SECONDS: 300 and 1800 by default, 0 = off, nonsense refused at start", () => {
  const defaults = loadConfig({});
  assert.deepEqual([defaults.idleFreezeAfterSec, defaults.idleDiskAfterSec], [300, 1800]);
  const set = loadConfig({ CUBICLE_IDLE_FREEZE_SECONDS: "1", CUBICLE_IDLE_DISK_SECONDS: "0" });
  assert.deepEqual([set.idleFreezeAfterSec, set.idleDiskAfterSec], [1, 0]);
  for (const [name, value] of [
    ["CUBICLE_IDLE_FREEZE_SECONDS", "-1"],
    ["CUBICLE_IDLE_FREEZE_SECONDS", "1.5"],
    ["CUBICLE_IDLE_FREEZE_SECONDS", "soon"],
    ["CUBICLE_IDLE_DISK_SECONDS", "99999999"],
    ["CUBICLE_IDLE_DISK_SECONDS", "30m"],
  ]) {
    assert.throws(() => loadConfig({ [name!]: value }), new RegExp(name!), `${name}=${value}`);
  }
});

test("CUBICLE_KSM: off unless asked for (AGENT_MEMORY_MERGE_NOTE); nonsense is refused at start", () => {
  assert.equal(loadConfig({}).ksm, false);
  assert.equal(loadConfig({ CUBICLE_KSM: "on" }).ksm, true);
  assert.equal(loadConfig({ CUBICLE_KSM: "off" }).ksm, false);
  assert.throws(() => loadConfig({ CUBICLE_KSM: "sometimes" }), /CUBICLE_KSM: "sometimes" is not true or false/);
});

test("CUBICLE_MICROVM takes off, tcg or kvm and refuses anything else at start", () => {
  assert.equal(loadConfig({}).microvm, "off");
  assert.equal(loadConfig({ CUBICLE_MICROVM: "TCG" }).microvm, "tcg");
  assert.equal(loadConfig({ CUBICLE_MICROVM: "kvm" }).microvm, "kvm");
  assert.throws(() => loadConfig({ CUBICLE_MICROVM: "qemu" }), /CUBICLE_MICROVM/);
});

test("CUBICLE_TEMPLATE_RUNTIME names container or microvm per template; anything else stops the start", () => {
  assert.deepEqual(loadConfig({ CUBICLE_TEMPLATE_RUNTIME: "code-interpreter-v1=microvm, base=container" }).templateRuntime, { "code-interpreter-v1": "microvm", base: "container" });
  assert.deepEqual(loadConfig({}).templateRuntime, {});
  for (const bad of ["base", "base=kvm", "=microvm", "base=microvm,", "ba se=microvm"]) assert.throws(() => parseTemplateRuntime(bad), /CUBICLE_TEMPLATE_RUNTIME/, bad);
});

test("CUBICLE_MICROVM_SPARES: one per image by default, 0 for none; a non-number or more than 16 is refused", () => {
  assert.equal(loadConfig({}).microvmSpares, 1);
  assert.equal(loadConfig({ CUBICLE_MICROVM_SPARES: "0" }).microvmSpares, 0);
  assert.equal(loadConfig({ CUBICLE_MICROVM_SPARES: "16" }).microvmSpares, 16);
  assert.throws(() => loadConfig({ CUBICLE_MICROVM_SPARES: "17" }), /CUBICLE_MICROVM_SPARES: 17 is more than 16/);
  assert.throws(() => loadConfig({ CUBICLE_MICROVM_SPARES: "-1" }), /CUBICLE_MICROVM_SPARES: "-1" is not a whole number/);
  assert.throws(() => loadConfig({ CUBICLE_MICROVM_SPARES: "two" }), /not a whole number/);
});
