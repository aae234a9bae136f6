import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { defaultDistDir } from "../../shared/config.js";
import { criuDumpArgs, externalMounts } from "./criu-dump.js";
import { MASKED_PATHS } from "./oci-spec.js";

const run = promisify(execFile);
const helper = path.join(defaultDistDir(), "sandbox-helper");

test("the external mounts are runc's: bind mounts, masked files (not directories, not missing) from /dev/null, device nodes", async () => {
  const mounts = await externalMounts({
    pid: process.pid,
    oci: {
      mounts: [
        { destination: "/proc", type: "proc" },
        { destination: "/dev", type: "tmpfs" },
        { destination: "/sys", type: "bind", options: ["bind", "ro"] },
        { destination: "/data", type: "none", options: ["rbind"] },
      ],
      linux: { maskedPaths: ["/proc/interrupts", "/proc/acpi", "/proc/no-such-file"], devices: [{ path: "/dev/fuse" }, { path: "/dev/null" }] },
    },
  });
  assert.deepEqual(mounts, [
    ["/sys", "/sys"],
    ["/data", "/data"],
    ["/proc/interrupts", "/dev/null"],
    ...["/dev/null", "/dev/random", "/dev/full", "/dev/tty", "/dev/zero", "/dev/urandom", "/dev/fuse"].map((device) => [device, device]),
  ]);
  assert.ok(MASKED_PATHS.includes("/proc/interrupts"), "the sandbox's config masks what this test assumes");
  const input = { criu: "/c", netnsPath: "/n", pid: process.pid, imagesDir: "/i", workDir: "/w", root: "/r", freezerCgroup: "/f", configFile: "/cf", leaveRunning: true, env: {} };
  await assert.rejects(criuDumpArgs({ ...input, oci: { mounts: [{ destination: "/a;b", type: "bind" }] } }), /cannot carry/);
  await assert.rejects(criuDumpArgs({ ...input, oci: { mounts: [{ destination: "/a=b", type: "bind" }] } }), /cannot carry/);
});

/** Minimal protobuf reading: field → values (varints as numbers, bytes as Buffers). */
function fields(data: Buffer): Map<number, (number | Buffer)[]> {
  const out = new Map<number, (number | Buffer)[]>();
  let at = 0;
  const varint = () => {
    let value = 0;
    for (let shift = 0; ; shift += 7) {
      const byte = data[at++]!;
      value += (byte & 0x7f) * 2 ** shift;
      if (!(byte & 0x80)) return value;
    }
  };
  while (at < data.length) {
    const key = varint();
    let value: number | Buffer;
    if ((key & 7) === 0) {
      value = varint();
    } else {
      const length = varint();
      value = data.subarray(at, at + length);
      at += length;
    }
    out.set(key >> 3, [...(out.get(key >> 3) ?? []), value]);
  }
  return out;
}

/**
 * The helper's `criu-dump` against a stand-in for `criu swrk` (a Python script on the socket it
 * is given): the request it reads is runc's DUMP request field for field (CRIU_RPC_NOTE), its
 * variables are set, and its answers decide the exit: a dump is success, a refusal is CRIU's
 * errno and message on stderr.
 */
test("criu-dump sends runc's DUMP request over CRIU's RPC and reports CRIU's answer", { skip: process.getuid?.() !== 0 && "needs root (setns)" }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbs-criu-dump-"));
  try {
    const fakeCriu = path.join(dir, "criu");
    fs.writeFileSync(
      fakeCriu,
      `#!/usr/bin/python3
import os, socket, sys
sock = socket.socket(fileno=int(sys.argv[2]))
request = sock.recv(65536)
open(os.environ["REQUEST_OUT"], "wb").write(request)
open(os.environ["REQUEST_OUT"] + ".env", "w").write(os.environ.get("CUBICLE_TEST_VAR", ""))
if os.environ.get("ANSWER") == "refuse":
    # criu_resp { type: DUMP, success: false, cr_errno: 13, cr_errmsg: "Permission denied" }
    sock.send(bytes([0x08, 0x01, 0x10, 0x00, 0x38, 0x0d, 0x4a, 17]) + b"Permission denied")
else:
    sock.send(bytes([0x08, 0x01, 0x10, 0x01, 0x1a, 0x00]))
`,
      { mode: 0o755 },
    );
    fs.mkdirSync(path.join(dir, "images"));
    fs.mkdirSync(path.join(dir, "work"));
    const out = path.join(dir, "request.bin");
    const args = await criuDumpArgs({
      criu: fakeCriu,
      netnsPath: "/proc/self/ns/net",
      pid: process.pid,
      imagesDir: path.join(dir, "images"),
      workDir: path.join(dir, "work"),
      root: "/bundle/rootfs",
      freezerCgroup: "/sys/fs/cgroup/freezer/cubicle/x",
      configFile: "/state/criu-runc.conf",
      leaveRunning: true,
      oci: { mounts: [{ destination: "/sys", type: "bind" }], linux: { maskedPaths: [] } },
      env: { CUBICLE_TEST_VAR: "seen", REQUEST_OUT: out },
    });
    await run(helper, ["criu-dump", ...args]);
    const request = fields(fs.readFileSync(out));
    assert.deepEqual(request.get(1), [1], "a DUMP request");
    const opts = fields(request.get(2)![0] as Buffer);
    const number = (field: number) => opts.get(field)?.[0];
    const text = (field: number) => (opts.get(field)?.[0] as Buffer | undefined)?.toString();
    assert.equal(number(2), process.pid);
    assert.equal(number(3), 1, "leave running");
    assert.equal(number(8), 1, "file locks");
    assert.equal(number(9), 4, "log level");
    assert.equal(text(10), "dump.log");
    assert.equal(text(13), "/bundle/rootfs");
    assert.equal(number(24), 1, "manage cgroups");
    assert.equal(number(38), 0x40000000, "the netns is external (CLONE_NEWNET)");
    assert.equal(text(44), "/sys/fs/cgroup/freezer/cubicle/x");
    assert.equal(number(50), 1, "orphan pts master");
    assert.equal(text(51), "/state/criu-runc.conf");
    assert.equal(opts.get(12), undefined, "no notify scripts");
    assert.ok(typeof number(1) === "number" && typeof number(17) === "number", "image and work directory descriptors");
    const mounts = (opts.get(23) as Buffer[]).map((map) => {
      const entry = fields(map);
      return `${(entry.get(1)![0] as Buffer).toString()}=${(entry.get(2)![0] as Buffer).toString()}`;
    });
    assert.deepEqual(mounts, ["/sys=/sys", "/dev/null=/dev/null", "/dev/random=/dev/random", "/dev/full=/dev/full", "/dev/tty=/dev/tty", "/dev/zero=/dev/zero", "/dev/urandom=/dev/urandom"]);
    assert.equal(fs.readFileSync(`${out}.env`, "utf8"), "seen", "the variables reach CRIU");

    const refused = await run(helper, ["criu-dump", ...args, "--env", "ANSWER=refuse"]).then(
      () => undefined,
      (err: { code: number; stderr: string }) => err,
    );
    assert.equal(refused?.code, 1);
    assert.match(refused!.stderr, /CRIU did not dump \(errno 13: Permission denied\)/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("criu-dump refuses malformed options with exit 2 before it starts anything", async () => {
  const good = ["--criu", "/bin/false", "--netns", "/proc/self/ns/net", "--pid", "1", "--images", "/tmp", "--work", "/tmp", "--root", "/r", "--freeze-cgroup", "/f", "--config", "/c", "--ext-mnts", "/sys=/sys", "--leave-running", "1"];
  const replace = (name: string, value: string) => good.map((word, index) => (good[index - 1] === name ? value : word));
  const cases: [string[], RegExp][] = [
    [replace("--pid", "0"), /--pid must be a process id/],
    [replace("--pid", "99999999"), /--pid must be a process id/],
    [replace("--leave-running", "yes"), /--leave-running must be 0 or 1/],
    [replace("--ext-mnts", "/sys"), /--ext-mnts entries are KEY=VAL/],
    [replace("--ext-mnts", "=/sys"), /--ext-mnts entries are KEY=VAL/],
    [[...good, "--unknown", "x"], /does not take --unknown/],
    [good.slice(0, -2), /--leave-running/],
  ];
  for (const [args, expected] of cases) {
    const failed = await run(helper, ["criu-dump", ...args]).then(
      () => undefined,
      (err: { code: number; stderr: string }) => err,
    );
    assert.equal(failed?.code, 2, args.join(" "));
    assert.match(failed!.stderr, expected);
  }
});
