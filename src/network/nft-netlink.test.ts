import assert from "node:assert/strict";
import { readdirSync, readFileSync, readlinkSync } from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { defaultDistDir } from "../shared/config.js";
import { runCommand } from "../shared/exec.js";
import { SandboxHelper } from "../runtime/container/sandbox-helper.js";
import { buildEgressPolicy, EGRESS_BOUNDS } from "./egress-policy.js";
import { oneShotNetworkHelper } from "./netns-manager.js";
import { intervalElements, nftBatchArgs, pinOps, policyOps, removePolicyOps } from "./nft-netlink.js";
import { buildRuleset, policyChainName } from "./nft-ruleset.js";

// The helper's nf_tables batches against tables of this test's own (two: one the helper fills,
// one nft fills from the same policy, to compare). Needs root; `after` deletes both.
const isRoot = process.getuid?.() === 0;
const tag = `${process.pid.toString(36)}${Date.now().toString(36).slice(-4)}`;
const helperTable = `cubicle_nftnl_${tag}`;
const nftTable = `cubicle_nftref_${tag}`;
const helper = oneShotNetworkHelper(path.join(defaultDistDir(), "sandbox-helper"));
const address = "10.232.0.2";
const chain = policyChainName(address);

function ruleset(tableName: string): string {
  return buildRuleset({ tableName, subnet: "10.232.0.0/24", interfacePrefix: "cbq", dnsPort: 9, proxyPort: 9, privateAllowed: [] });
}

before(async () => {
  if (!isRoot) return;
  for (const table of [helperTable, nftTable]) await runCommand(["nft", "-f", "-"], { input: ruleset(table) });
});

after(async () => {
  if (!isRoot) return;
  for (const table of [helperTable, nftTable]) await runCommand(["nft", "delete", "table", "inet", table], { allowFailure: true });
});

async function batch(ops: string): Promise<void> {
  await helper(nftBatchArgs(helperTable, ops));
}

/** A set's or chain's listing with the table's name taken out, for comparing the two tables. */
async function listing(table: string, kind: "set" | "chain" | "map", name: string): Promise<string> {
  const { stdout } = await runCommand(["nft", "list", kind, "inet", table, name], { allowFailure: true });
  return stdout.replaceAll(table, "T").replace(/expires [0-9a-z]+/g, "expires X").replace(/\s+/g, " ").trim();
}

test("interval elements: ranges merged, an end after each, a leading end at 0.0.0.0 when needed", () => {
  assert.equal(intervalElements([]), "");
  assert.equal(intervalElements(["1.2.3.4/32"]), "0.0.0.0!,1.2.3.4,1.2.3.5!");
  assert.equal(intervalElements(["0.0.0.0/0"]), "0.0.0.0");
  assert.equal(intervalElements(["0.0.0.0/8"]), "0.0.0.0,1.0.0.0!");
  assert.equal(intervalElements(["255.255.255.0/24"]), "0.0.0.0!,255.255.255.0");
  // Overlapping and adjacent entries become one range; order does not matter.
  assert.equal(intervalElements(["10.0.0.1/32", "0.0.0.0/0"]), "0.0.0.0");
  assert.equal(intervalElements(["1.2.4.0/24", "1.2.3.0/24", "1.2.3.7/32"]), "0.0.0.0!,1.2.3.0,1.2.5.0!");
  assert.equal(intervalElements(["9.9.9.9/32", "1.2.3.0/24"]), "0.0.0.0!,1.2.3.0,1.2.4.0!,9.9.9.9,9.9.9.10!");
  assert.throws(() => intervalElements(["1.2.3/24"]), /not an IPv4 CIDR/);
  assert.throws(() => intervalElements(["1.2.3.4/33"]), /not an IPv4 CIDR/);
});

test("a policy made by the helper's batch is what nft makes of the same policy", { skip: !isRoot && "needs root" }, async () => {
  const policies = [
    buildEgressPolicy(true, { allowOut: ["1.2.3.0/24", "9.9.9.9"], denyOut: ["0.0.0.0/0"] }),
    buildEgressPolicy(true, { denyOut: ["8.8.8.8", "100.100.0.0/16"] }),
    buildEgressPolicy(false, undefined),
    buildEgressPolicy(true, undefined),
  ];
  for (const [index, policy] of policies.entries()) {
    await batch(policyOps(address, policy, { fresh: index === 0 }));
    const t = `inet ${nftTable}`;
    const allow = policy.allowInternet ? policy.allowCidrs : [];
    const deny = policy.allowInternet ? policy.denyCidrs : ["0.0.0.0/0"];
    await runCommand(["nft", "-f", "-"], {
      input: [
        `add chain ${t} ${chain}`,
        `add set ${t} ${chain}_a { type ipv4_addr; flags interval; }`,
        `add set ${t} ${chain}_d { type ipv4_addr; flags interval; }`,
        `add set ${t} ${chain}_n { type ipv4_addr; flags timeout; }`,
        `add set ${t} ${chain}_h { type ipv4_addr; flags timeout; }`,
        `flush chain ${t} ${chain}`,
        `add rule ${t} ${chain} ip daddr @${chain}_h jump header_hosts`,
        `add rule ${t} ${chain} ip daddr @${chain}_a goto egress_allowed`,
        `add rule ${t} ${chain} ip daddr @${chain}_n goto egress_allowed`,
        `add rule ${t} ${chain} ip daddr @${chain}_d goto egress_denied`,
        `add rule ${t} ${chain} goto egress_allowed`,
        `add element ${t} sandbox_policy { ${address} : goto ${chain} }`,
        `flush set ${t} ${chain}_a`,
        `flush set ${t} ${chain}_d`,
        allow.length ? `add element ${t} ${chain}_a { ${allow.join(", ")} }` : "",
        deny.length ? `add element ${t} ${chain}_d { ${deny.join(", ")} }` : "",
        "",
      ].join("\n"),
    });
    for (const [kind, name] of [["chain", chain], ["set", `${chain}_a`], ["set", `${chain}_d`], ["map", "sandbox_policy"]] as const) {
      assert.equal(await listing(helperTable, kind, name), await listing(nftTable, kind, name), `${kind} ${name} after policy ${index}`);
    }
  }
});

test("pins carry their timeout and go where the policy needs them; a policy change re-pins by the new policy; removal is idempotent", { skip: !isRoot && "needs root" }, async () => {
  const allowlist = buildEgressPolicy(true, { allowOut: ["example.com", "*.api.test"], denyOut: ["0.0.0.0/0"], rules: { "x.api.test": [{ transform: { headers: { A: "b" } } }] } });
  await batch(policyOps(address, allowlist, { fresh: true }));
  await batch(pinOps(address, allowlist, "example.com", ["5.6.7.8", "5.6.7.9"], 30));
  assert.equal(pinOps(address, allowlist, "other.test", ["5.6.7.1"], 30), "", "a name the policy does not allow is not pinned");
  await batch(pinOps(address, allowlist, "x.api.test", ["5.6.7.10"], 60));
  const pinned = await listing(helperTable, "set", `${chain}_n`);
  assert.match(pinned, /elements = \{ 5\.6\.7\.8 timeout 30s expires X, 5\.6\.7\.9 timeout 30s expires X, 5\.6\.7\.10 timeout 1m expires X \}/);
  assert.match(await listing(helperTable, "set", `${chain}_h`), /elements = \{ 5\.6\.7\.10 timeout 1m expires X \}/, "a name with header rules: its addresses refuse QUIC");
  // An open policy needs no allowlist pins, but a name with header rules still gets its QUIC refusal.
  const open = buildEgressPolicy(true, { rules: { "x.api.test": [{ transform: { headers: { A: "b" } } }] } });
  assert.equal(pinOps(address, open, "example.com", ["5.6.7.8"], 30), "");
  assert.match(pinOps(address, open, "x.api.test", ["5.6.7.10"], 30), new RegExp(`^add ${chain}_h 5\\.6\\.7\\.10@30000$`));
  // A change keeps only what the new policy allows of the answers still valid, in the same batch.
  const narrower = buildEgressPolicy(true, { allowOut: ["example.com"], denyOut: ["0.0.0.0/0"] });
  const live = [
    { name: "example.com", address: "5.6.7.8", secondsLeft: 20 },
    { name: "x.api.test", address: "5.6.7.10", secondsLeft: 50 },
  ];
  await batch(policyOps(address, narrower, { fresh: false, pins: live }));
  assert.match(await listing(helperTable, "set", `${chain}_n`), /elements = \{ 5\.6\.7\.8 timeout 20s expires X \}/);
  assert.doesNotMatch(await listing(helperTable, "set", `${chain}_h`), /elements/, "no header rules any more: QUIC passes by the policy");
  await batch(policyOps(address, buildEgressPolicy(false, undefined), { fresh: false, pins: live }));
  assert.doesNotMatch(await listing(helperTable, "set", `${chain}_n`), /elements/);
  await batch(removePolicyOps(address));
  await batch(removePolicyOps(address));
  assert.equal(await listing(helperTable, "chain", chain), "");
  assert.doesNotMatch(await listing(helperTable, "map", "sandbox_policy"), new RegExp(address.replaceAll(".", "\\.")));
});

test("a batch that the kernel refuses changes nothing", { skip: !isRoot && "needs root" }, async () => {
  await batch(policyOps(address, buildEgressPolicy(true, { denyOut: ["8.8.8.8"] }), { fresh: true }));
  const before = await listing(helperTable, "set", `${chain}_d`);
  // The flush and the add are fine; the rule names a set that does not exist, so all of it fails.
  await assert.rejects(batch(`flush-set ${chain}_d; add ${chain}_d 0.0.0.0; rule ${chain} nosuchset egress_allowed`), /nftables transaction: No such file or directory/);
  assert.equal(await listing(helperTable, "set", `${chain}_d`), before);
  // So does one on a table that is not there.
  await assert.rejects(helper(nftBatchArgs(`cubicle_none_${tag}`, `flush-set ${chain}_d`)), /No such file or directory/);
  await batch(removePolicyOps(address));
});

test("nft-batch refuses malformed operations before it sends anything", { skip: !isRoot && "needs root" }, async () => {
  const cases: [string[], RegExp][] = [
    [nftBatchArgs("bad;table", "flush-set x"), /--table must be/],
    [nftBatchArgs(helperTable, ""), /no operations/],
    [nftBatchArgs(helperTable, "explode x"), /unknown operation/],
    [nftBatchArgs(helperTable, "flush-set a b"), /wrong number of words/],
    [nftBatchArgs(helperTable, "flush-set a b c d e f"), /too many words/],
    [nftBatchArgs(helperTable, "flush-set ../x"), /a set name must be/],
    [nftBatchArgs(helperTable, `flush-set ${"x".repeat(65)}`), /a set name must be/],
    [nftBatchArgs(helperTable, "add s 1.2.3"), /not an IPv4 address/],
    [nftBatchArgs(helperTable, "add s 1.2.3.4@0"), /timeout must be/],
    [nftBatchArgs(helperTable, "add s 1.2.3.4@-5"), /timeout/],
    [nftBatchArgs(helperTable, "add s 1.2.3.4@99999999999"), /timeout must be/],
    [nftBatchArgs(helperTable, "set s hash"), /interval or timeout/],
    [nftBatchArgs(helperTable, "map-add m 1.2.3.4"), /wrong number of words/],
    [nftBatchArgs(helperTable, Array.from({ length: 257 }, () => "flush-set s").join(";")), /too many operations/],
    [nftBatchArgs(helperTable, `add s ${Array.from({ length: 8193 }, () => "1.1.1.1").join(",")}`), /too many elements/],
    [["nft-batch", "--family", "ip6", "--table", helperTable, "--ops", "flush-set s"], /--family must be/],
    [["nft-batch", "--table", helperTable, "--ops", "flush-set s", "--family", "inet", "--extra", "x"], /does not take --extra/],
  ];
  for (const [args, expected] of cases) {
    await assert.rejects(helper(args), (err: Error) => {
      assert.match(err.message, expected, args.join(" ").slice(0, 80));
      return true;
    });
  }
});

test("the largest policy the API takes fits one request to the resident helper; bad batches there are errors, not its end", { skip: !isRoot && "needs root" }, async () => {
  const resident = new SandboxHelper(path.join(defaultDistDir(), "sandbox-helper"));
  try {
    // 1000 allowOut and 1000 denyOut entries (EGRESS_BOUNDS), none adjacent: the most elements.
    const spread = (first: number) => Array.from({ length: EGRESS_BOUNDS.listEntries }, (_, i) => `${first}.${i >> 6}.${(i & 63) * 4}.1`);
    const policy = buildEgressPolicy(true, { allowOut: spread(11), denyOut: spread(12) });
    const [command, ...args] = nftBatchArgs(helperTable, policyOps(address, policy, { fresh: true }));
    await resident.call(command!, args, { what: "the largest policy" });
    const allowed = await listing(helperTable, "set", `${chain}_a`);
    assert.equal(allowed.match(/\b11\.\d+\.\d+\.1\b/g)?.length, EGRESS_BOUNDS.listEntries);
    const [removeCommand, ...removeArgs] = nftBatchArgs(helperTable, removePolicyOps(address));
    await resident.call(removeCommand!, removeArgs, { what: "removal" });
    // The resident helper runs nft-batch in its own process (INLINE_NOTE): a malformed batch, a
    // kernel refusal and a table that is not there come back as errors, and it serves on.
    const refusals: [string, RegExp][] = [
      ["explode x", /unknown operation/],
      [`add ${chain}_a 1.2.3`, /not an IPv4 address/],
      [`rule ${chain} nosuchset egress_allowed`, /nftables transaction: No such file or directory/],
    ];
    const residentPid = resident.residentPid;
    assert.ok(residentPid);
    for (const [ops, expected] of refusals) {
      const [c, ...a] = nftBatchArgs(helperTable, ops);
      await assert.rejects(resident.call(c!, a, { what: "a bad batch" }), expected);
    }
    const [c, ...a] = nftBatchArgs(helperTable, policyOps(address, policy, { fresh: true }));
    await resident.call(c!, a, { what: "a good batch after bad ones" });
    assert.equal(resident.residentPid, residentPid, "the same resident helper served them all");
    await resident.call(removeCommand!, removeArgs, { what: "removal" });
  } finally {
    resident.close();
  }
});

test("overlapping allowOut and denyOut entries are one range each, not a conflict the kernel refuses", { skip: !isRoot && "needs root" }, async () => {
  const policy = buildEgressPolicy(true, { allowOut: ["1.2.3.0/24", "1.2.3.4", "1.2.4.0/24"], denyOut: ["8.8.8.8", "0.0.0.0/0"] });
  await batch(policyOps(address, policy, { fresh: true }));
  assert.match(await listing(helperTable, "set", `${chain}_a`), /elements = \{ 1\.2\.3\.0-1\.2\.4\.255 \}/);
  assert.match(await listing(helperTable, "set", `${chain}_d`), /elements = \{ 0\.0\.0\.0\/0 \}/);
  await batch(removePolicyOps(address));
});

/** The nf_tables (NETLINK_NETFILTER) sockets process `pid` holds open, by inode. */
function netfilterSockets(pid: number): string[] {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    const target = (() => {
      try {
        return readlinkSync(`/proc/${pid}/fd/${fd}`);
      } catch {
        return "";
      }
    })();
    const inode = /^socket:\[(\d+)\]$/.exec(target)?.[1];
    if (inode) inodes.add(inode);
  }
  // Columns: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode; Eth 12 is NETLINK_NETFILTER.
  const rows = readFileSync(`/proc/${pid}/net/netlink`, "utf8").split("\n").slice(1).map((line) => line.trim().split(/\s+/));
  return rows.filter((row) => row[1] === "12" && inodes.has(row[9]!)).map((row) => row[9]!).sort();
}

test("the resident helper keeps one nf_tables socket from batch to batch, and opens another after a refusal (NFT_SOCKET_NOTE)", { skip: !isRoot && "needs root" }, async () => {
  const resident = new SandboxHelper(path.join(defaultDistDir(), "sandbox-helper"));
  const run = (ops: string) => {
    const [command, ...args] = nftBatchArgs(helperTable, ops);
    return resident.call(command!, args, { what: "a batch" });
  };
  try {
    await run(policyOps(address, buildEgressPolicy(true, { denyOut: ["8.8.8.0/24"] }), { fresh: true }));
    const pid = resident.residentPid!;
    const first = netfilterSockets(pid);
    assert.equal(first.length, 1, "its socket stays open after the batch");
    // Batches that delete (a policy change flushes sets, a removal drops the chain) are the ones
    // whose socket's close would wait for the kernel's cleanup.
    await run(policyOps(address, buildEgressPolicy(true, { denyOut: ["9.9.9.0/24"] }), { fresh: false }));
    assert.match(await listing(helperTable, "set", `${chain}_d`), /9\.9\.9\.0\/24/);
    await run(removePolicyOps(address));
    assert.deepEqual(netfilterSockets(pid), first, "the same socket served every batch");
    await assert.rejects(run(`rule ${chain} nosuchset egress_allowed`), /nftables transaction: No such file or directory/);
    assert.deepEqual(netfilterSockets(pid), [], "a refusal's socket is closed (answers of the rest of its batch may still come)");
    await run(policyOps(address, buildEgressPolicy(true, { denyOut: ["8.8.8.0/24"] }), { fresh: true }));
    const second = netfilterSockets(pid);
    assert.equal(second.length, 1);
    assert.notDeepEqual(second, first, "a new socket after the refusal");
    assert.match(await listing(helperTable, "set", `${chain}_d`), /8\.8\.8\.0\/24/, "and its batch applied");
    await run(removePolicyOps(address));
    assert.equal(resident.residentPid, pid, "one resident helper throughout");
  } finally {
    resident.close();
  }
});
