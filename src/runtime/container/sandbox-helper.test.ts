import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import type { CubicleError } from "../../shared/cubicle-error.js";
import { ExitWatcher, SandboxHelper } from "./sandbox-helper.js";

// The static helper (`node scripts/build.mjs`, which compiles native/sandbox-helper.c).
const binary = path.join(import.meta.dirname, "..", "..", "..", "dist", "sandbox-helper");
const skip = existsSync(binary) ? false : "build the helper first (node scripts/build.mjs)";

function helper(...args: string[]): { status: number | null; stderr: string } {
  const result = spawnSync(binary, args, { encoding: "utf8" });
  return { status: result.status, stderr: result.stderr };
}

test("the helper refuses malformed calls with exit 2 and says why, before touching anything", { skip }, () => {
  const cases: [string[], RegExp][] = [
    [[], /usage/],
    [["mount-everything"], /unknown subcommand/],
    [["prepare", "--base"], /pairs/],
    [["prepare", "--base", "1073741824"], /needs --lower/],
    [["prepare", "--base", "0", "--lower", "/x", "--layer", "/y", "--rootfs", "/z", "--quota", "0"], /outside the sandbox id ranges/],
    [["prepare", "--base", "4294967295", "--lower", "/x", "--layer", "/y", "--rootfs", "/z", "--quota", "0"], /outside the sandbox id ranges/],
    [["prepare", "--base", "1073741824", "--lower", "/x", "--layer", "/y", "--rootfs", "/z", "--quota", "12x"], /--quota is not a number/],
    [["prepare", "--base", "1073741824", "--lower", "/x", "--layer", "/y", "--rootfs", "/z", "--quota", "0", "--criu-images", "/i"], /go together/],
    [["hostname", "--pid", "-1", "--name", "x"], /--pid is not a number/],
    [["prepare", "--base", "1073741824", "--lower", "/x", "--layer", "/tmp/not-made-layer", "--rootfs", "/z", "--quota", "0", "--volumes", "relative/dir"], /absolute paths/],
    [["prepare", "--base", "1073741824", "--lower", "/x", "--layer", "/tmp/not-made-layer", "--rootfs", "/z", "--quota", "0", "--volumes", ";"], /absolute paths/],
    [["bind-volumes", "--dir", "/tmp/x"], /needs --volumes/],
    [["bind-volumes", "--dir", "relative", "--volumes", "/a"], /--dir must be absolute/],
    [["bind-volumes", "--dir", "/tmp/x", "--volumes", "a;b"], /absolute paths/],
    [["flows", "--subnet", "10.0.0.0"], /A\.B\.C\.D\/N/],
    [["flows", "--subnet", "10.0.0.0/33"], /A\.B\.C\.D\/N/],
    [["flows", "--net", "10.0.0.0/8"], /does not take --net/],
    [["sparse-copy", "--from", "relative", "--to", "/tmp/x"], /absolute paths/],
    [["sparse-copy", "--from", "/tmp/x"], /needs --to/],
    [["sparse-copy", "--from", "/tmp/x", "--to", "/tmp/y", "--mode", "0"], /takes --from and --to/],
  ];
  for (const [args, message] of cases) {
    const result = helper(...args);
    assert.equal(result.status, 2, `${args.join(" ")}: ${result.stderr}`);
    assert.match(result.stderr, message, args.join(" "));
  }
});

test("a layer outside a btrfs pool is refused (exit 1, the step named) and nothing is mounted", { skip: process.getuid?.() !== 0 ? "needs root" : skip }, () => {
  const result = helper("prepare", "--base", "1073741824", "--lower", "/", "--layer", "/tmp/not-a-pool-layer", "--rootfs", "/tmp/not-a-pool-root", "--quota", "0");
  assert.equal(result.status, 1, result.stderr);
  assert.match(result.stderr, /sandbox-helper: layer: creating a layer subvolume/);
  assert.ok(!existsSync("/tmp/not-a-pool-layer"));
});

test("bind-volumes shows a volume's canonical owners as the guest's own (101000 as 1000) and back, nosuid and nodev", { skip: process.getuid?.() !== 0 ? "needs root" : skip }, () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), "cbm-bind-volumes-"));
  const volume = path.join(dir, "volume");
  const mounts = path.join(dir, "mounts");
  const bound = path.join(mounts, "volumes", "0");
  try {
    spawnSync("mkdir", ["-p", volume, mounts]);
    spawnSync("chmod", ["755", dir]); // uid 1000 must reach the bind
    spawnSync("sh", ["-c", `echo x > ${volume}/file && chown 101000:101000 ${volume} ${volume}/file`]);
    const result = helper("bind-volumes", "--dir", mounts, "--volumes", volume);
    assert.equal(result.status, 0, result.stderr);
    assert.equal(statSync(path.join(bound, "file")).uid, 1000);
    // A file made as uid 1000 through the bind is the volume's 101000 on disk.
    const made = spawnSync("setpriv", ["--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c", `echo y > ${bound}/made`], { encoding: "utf8" });
    assert.equal(made.status, 0, made.stderr);
    assert.equal(statSync(path.join(volume, "made")).uid, 101000);
    const options = readFileSync("/proc/self/mountinfo", "utf8").split("\n").find((line) => line.split(" ")[4] === bound)?.split(" ")[5] ?? "";
    assert.match(options, /nosuid/);
    assert.match(options, /nodev/);
  } finally {
    spawnSync("umount", [bound]);
    rmSync(dir, { recursive: true, force: true });
  }
});

/**
 * A microVM's RAM file into its image (MICROVM_RAM_NOTE), through the resident helper: the copy
 * holds the same bytes, keeps the size, and leaves the holes and the all-zero pages unallocated
 * (as `cp --sparse=always` does); a copy over an existing file or of a directory is refused.
 */
test("sparse-copy copies a file's bytes with its holes and zero pages left as holes, and refuses to overwrite", { skip }, async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), "cbs-sparse-"));
  const resident = new SandboxHelper(binary);
  try {
    const from = path.join(dir, "ram");
    const fd = openSync(from, "w");
    const random = (bytes: number) => Buffer.from(Array.from({ length: bytes }, () => Math.floor(Math.random() * 256)));
    writeSync(fd, random(40_960), 0, 40_960, 100 * 4096); // ten pages of data
    writeSync(fd, Buffer.alloc(800 * 1024), 0, 800 * 1024, 2000 * 4096); // 200 written, all-zero pages
    writeSync(fd, random(3 << 20), 0, 3 << 20, 20 << 20); // 3 MiB of data
    writeSync(fd, Buffer.from("x"), 0, 1, (64 << 20) - 1); // the last byte: 64 MiB in all
    closeSync(fd);
    const to = path.join(dir, "copy");
    assert.equal(await resident.call("sparse-copy", ["--from", from, "--to", to]), "");
    assert.equal(statSync(to).size, 64 << 20);
    assert.ok(readFileSync(to).equals(readFileSync(from)), "the same bytes");
    const allocated = statSync(to).blocks * 512;
    // The data (40 KiB + 3 MiB + the last page), not the zero pages nor the holes: under 3.2 MiB.
    assert.ok(allocated >= (3 << 20) && allocated < 3.2 * 1024 * 1024, `${allocated} bytes allocated`);
    assert.ok(allocated < statSync(from).blocks * 512, "fewer blocks than the source, which holds its zero pages");
    await assert.rejects(resident.call("sparse-copy", ["--from", from, "--to", to]), /File exists/);
    await assert.rejects(resident.call("sparse-copy", ["--from", dir, "--to", path.join(dir, "other")]), /not a regular file/);
  } finally {
    resident.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the exit watcher reports a watched process's end at once, and nothing for unwatched or malformed entries", { skip }, async () => {
  const ended: string[] = [];
  const watcher = new ExitWatcher(binary, (tag) => ended.push(tag));
  const sleepers = [0, 1, 2].map(() => spawn("sleep", ["30"], { stdio: "ignore" }));
  try {
    watcher.watch("first", sleepers[0]!.pid!);
    watcher.watch("second", sleepers[1]!.pid!);
    watcher.watch("bad tag with spaces", sleepers[2]!.pid!);
    watcher.watch("x".repeat(200), sleepers[2]!.pid!);
    watcher.watch("negative", -5);
    watcher.unwatch("second");
    watcher.watch("gone", 2 ** 22 + 12345);
    sleepers[0]!.kill("SIGKILL");
    sleepers[1]!.kill("SIGKILL");
    const deadline = Date.now() + 5000;
    while (ended.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(ended.sort(), ["first", "gone"], "the killed watched process and the pid that never existed");
  } finally {
    watcher.close();
    for (const sleeper of sleepers) sleeper.kill("SIGKILL");
  }
});

/** Waits until `pid` no longer exists (or fails after `timeoutMs`). */
async function waitGone(pid: number, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (existsSync(`/proc/${pid}`)) {
    if (Date.now() > deadline) throw new Error(`process ${pid} is still there`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The raw protocol: `serve` fed lines on stdin, its replies parsed (HELPER_PROTOCOL_NOTE). */
async function rawServe(input: string | Buffer): Promise<{ id: string; kind: string; value: number; stdout: string; stderr: string }[]> {
  const child = spawn(binary, ["serve"], { stdio: ["pipe", "pipe", "inherit"] });
  const chunks: Buffer[] = [];
  child.stdout.on("data", (chunk: Buffer) => chunks.push(chunk));
  // Tiny chunks, to shake out the line framing.
  const bytes = Buffer.from(input);
  for (let at = 0; at < bytes.length; at += 7) child.stdin.write(bytes.subarray(at, at + 7));
  child.stdin.end();
  const code = await new Promise<number | null>((resolve) => child.on("close", resolve));
  assert.equal(code, 0, "serve ends cleanly when its stdin closes");
  let data = Buffer.concat(chunks);
  const replies = [];
  while (data.length > 0) {
    const newline = data.indexOf(0x0a);
    const [id, kind, value, outBytes, errBytes] = data.subarray(0, newline).toString().split("\t");
    const body = data.subarray(newline + 1);
    replies.push({ id: id!, kind: kind!, value: Number(value), stdout: body.subarray(0, Number(outBytes)).toString(), stderr: body.subarray(Number(outBytes), Number(outBytes) + Number(errBytes)).toString() });
    data = body.subarray(Number(outBytes) + Number(errBytes));
  }
  return replies;
}

test("serve answers every request, refuses bad ones with an error reply and lives on", { skip }, async () => {
  const lines = [
    "1\t1000\tping",
    "bad id\t1000\tping",
    "2\t0\tping",
    "3\tsoon\tping",
    "4\t1000\tmount-everything",
    "5\t1000\thostname\t--pid",
    "6\t1000\thostname\t--pid\t-1\t--name\tx",
    "7\t1000\texec\t--stdio\tcapture",
    "8\t1000\texec\t--bogus\tx\t--\ttrue",
    "9\t1000\texec\t--env\tNOEQUALS\t--\ttrue",
    `10\t1000\tping\t${"x".repeat(300_000)}`,
    `11\t1000\tping${"\t".repeat(2000)}`,
    "12\t1000\tping\0",
    "13\t1000\tcancel\tnothing-in-flight",
    "14\t1000\texec\t--stdio\tcapture\t--\t/nonexistent/program",
    "15\t1000\texec\t--stdio\tcapture\t--\tsh\t-c\techo out; echo err >&2; exit 3",
    "16\t1000\tping",
  ];
  const replies = await rawServe(lines.join("\n") + "\n");
  const byId = new Map(replies.map((reply) => [reply.id, reply]));
  assert.equal(replies.length, lines.length, JSON.stringify(replies));
  const refused: [string, RegExp][] = [
    ["-", /starts with an id/],
    ["2", /timeout/],
    ["3", /timeout/],
    ["4", /unknown command/],
    ["5", /pairs/],
    ["7", /needs --/],
    ["8", /unknown exec option/],
    ["9", /NAME=VALUE/],
    ["10", /too long/],
    ["11", /too many fields/],
    ["12", /NUL/],
    ["13", /no such request/],
  ];
  for (const [id, message] of refused) {
    assert.equal(byId.get(id)?.kind, "error", `request ${id}: ${JSON.stringify(byId.get(id))}`);
    assert.match(byId.get(id)!.stderr, message, `request ${id}`);
  }
  assert.deepEqual(byId.get("6"), { id: "6", kind: "exit", value: 2, stdout: "", stderr: "sandbox-helper: --pid is not a number: -1\n" }, "a subcommand's own checks: exit 2 and its message");
  assert.equal(byId.get("14")?.value, 127);
  assert.match(byId.get("14")!.stderr, /nonexistent\/program: No such file/);
  assert.deepEqual(byId.get("15"), { id: "15", kind: "exit", value: 3, stdout: "out\n", stderr: "err\n" });
  assert.deepEqual([byId.get("1")?.kind, byId.get("16")?.kind], ["exit", "exit"], "still answering after the bad requests");
});

test("requests run concurrently, each with its own output", { skip }, async () => {
  const helper = new SandboxHelper(binary);
  try {
    const started = performance.now();
    const results = await Promise.all([0, 1, 2, 3, 4, 5].map((n) => helper.exec(["sh", "-c", `sleep 0.4; echo ${n}`])));
    const elapsedMs = performance.now() - started;
    assert.deepEqual(results.map((result) => result.stdout), ["0\n", "1\n", "2\n", "3\n", "4\n", "5\n"]);
    assert.ok(elapsedMs < 1500, `six 400 ms requests took ${Math.round(elapsedMs)} ms: they ran one after another`);
  } finally {
    helper.close();
  }
});

test("a request past its timeout is killed and fails with deadline_exceeded; a cancelled one with canceled", { skip }, async () => {
  const helper = new SandboxHelper(binary);
  const dir = mkdtempSync(path.join(os.tmpdir(), "t15b-helper-"));
  try {
    const pidFile = path.join(dir, "timeout.pid");
    const started = performance.now();
    await assert.rejects(helper.exec(["sh", "-c", `echo $$ > ${pidFile}; exec sleep 30`], { timeoutMs: 300 }), (err: CubicleError) => err.code === "deadline_exceeded" && /timed out after 300 ms/.test(err.message));
    assert.ok(performance.now() - started < 2000, "the timeout was enforced");
    await waitGone(Number(readFileSync(pidFile, "utf8")));

    const cancelFile = path.join(dir, "cancel.pid");
    const controller = new AbortController();
    const request = helper.exec(["sh", "-c", `echo $$ > ${cancelFile}; exec sleep 30`], { signal: controller.signal });
    while (!existsSync(cancelFile) || readFileSync(cancelFile, "utf8") === "") await new Promise((r) => setTimeout(r, 5));
    controller.abort();
    await assert.rejects(request, (err: CubicleError) => err.code === "canceled");
    await waitGone(Number(readFileSync(cancelFile, "utf8")));
    assert.equal((await helper.exec(["true"])).exitCode, 0, "the helper still serves");
  } finally {
    helper.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a helper that dies fails only the requests in flight (unavailable); the next request starts a new one", { skip }, async () => {
  const helper = new SandboxHelper(binary);
  try {
    assert.equal((await helper.exec(["true"])).exitCode, 0);
    const firstPid = helper.residentPid!;
    const inFlight = [helper.exec(["sleep", "30"]), helper.exec(["sleep", "30"], { stdio: "null" })];
    await new Promise((r) => setTimeout(r, 100));
    process.kill(firstPid, "SIGKILL");
    const settled = await Promise.allSettled(inFlight);
    for (const result of settled) {
      assert.equal(result.status, "rejected");
      assert.equal((result as PromiseRejectedResult).reason.code, "unavailable");
      assert.match((result as PromiseRejectedResult).reason.message, /sandbox helper ended \(SIGKILL\)/);
    }
    const after = await helper.exec(["sh", "-c", "echo again"]);
    assert.equal(after.stdout, "again\n");
    assert.notEqual(helper.residentPid, firstPid);
    await waitGone(firstPid);
  } finally {
    helper.close();
  }
});

test("call maps a subcommand's failure to a CubicleError with its message; bad arguments never reach the helper", { skip }, async () => {
  const helper = new SandboxHelper(binary);
  try {
    await assert.rejects(helper.call("hostname", ["--pid", "-1", "--name", "x"], { what: "renaming" }), (err: CubicleError) => err.code === "internal" && /renaming failed: sandbox-helper: --pid is not a number/.test(err.message));
    await assert.rejects(helper.call("mount-everything", []), /refused the request: unknown command/);
    await assert.rejects(helper.call("hostname", ["--pid", "1\t--name", "x"]), (err: CubicleError) => err.code === "invalid_argument");
    await assert.rejects(helper.exec(["echo", "a\nb"]), (err: CubicleError) => err.code === "invalid_argument");
    await assert.rejects(helper.exec(["true"], { env: { "BAD NAME": "x" } }), (err: CubicleError) => err.code === "internal");
    await assert.rejects(helper.exec(["echo", "x".repeat(300_000)]), /longer than/);
  } finally {
    helper.close();
  }
});

test("exec joins the network namespace, sets the environment and gives stdio on /dev/null when asked", { skip: process.getuid?.() !== 0 ? "needs root" : skip }, async () => {
  const helper = new SandboxHelper(binary);
  const netns = `t15b-helper-${process.pid}`;
  const dir = mkdtempSync(path.join(os.tmpdir(), "t15b-helper-"));
  spawnSync("ip", ["netns", "add", netns]);
  try {
    const netnsPath = `/run/netns/${netns}`;
    const inside = await helper.exec(["readlink", "/proc/self/ns/net"], { netnsPath });
    assert.equal(inside.stdout.trim(), `net:[${statSync(netnsPath).ino}]`);
    const outside = await helper.exec(["readlink", "/proc/self/ns/net"]);
    assert.notEqual(outside.stdout.trim(), inside.stdout.trim(), "a request without netnsPath stays in the host's");
    const report = path.join(dir, "report");
    const script = "import os, sys; open(sys.argv[1], 'w').write('\\n'.join([os.environ['CUBICLE_T15B_VALUE']] + [os.readlink(f'/proc/self/fd/{fd}') for fd in range(3)]) + '\\n')";
    const result = await helper.exec(["python3", "-c", script, report], { env: { CUBICLE_T15B_VALUE: "a value=with = signs" }, stdio: "null" });
    assert.equal(result.exitCode, 0);
    assert.equal(readFileSync(report, "utf8"), "a value=with = signs\n/dev/null\n/dev/null\n/dev/null\n");
    const missing = await helper.exec(["true"], { netnsPath: "/run/netns/t15b-no-such-netns" });
    assert.equal(missing.exitCode, 127);
    assert.match(missing.stderr, /entering the network namespace/);
  } finally {
    helper.close();
    spawnSync("ip", ["netns", "del", netns]);
    rmSync(dir, { recursive: true, force: true });
  }
});

test("exec --nice runs the program and what it starts at that nice value; only 0 to 19 are taken", { skip }, async () => {
  const helper = new SandboxHelper(binary);
  try {
    // Field 19 of /proc/PID/stat is the nice value: of the shell and of a child it forks.
    const niced = await helper.exec(["sh", "-c", "cut -d' ' -f19 /proc/$$/stat; sh -c 'cut -d\\  -f19 /proc/$$/stat'"], { nice: 7 });
    assert.equal(niced.stdout, "7\n7\n", niced.stderr);
    const normal = await helper.exec(["sh", "-c", "cut -d' ' -f19 /proc/$$/stat"]);
    assert.equal(normal.stdout, `${os.getPriority()}\n`, "a request without nice keeps the helper's (the server's)");
    const replies = await rawServe(["1\t1000\texec\t--nice\t20\t--\ttrue", "2\t1000\texec\t--nice\t-1\t--\ttrue", "3\t1000\texec\t--nice\t5x\t--\ttrue", "4\t1000\texec\t--nice\t19\t--\ttrue"].join("\n") + "\n");
    assert.deepEqual(
      replies.map((reply) => [reply.id, reply.kind, reply.kind === "error" ? /--nice is 0 to 19/.test(reply.stderr) : reply.value]).sort(),
      [["1", "error", true], ["2", "error", true], ["3", "error", true], ["4", "exit", 0]],
    );
    await assert.rejects(helper.exec(["true"], { nice: -5 }), /nice -5 is not 0 to 19/);
  } finally {
    helper.close();
  }
});

test("the resident helper does not keep a Node process alive", { skip }, () => {
  const module = path.join(import.meta.dirname, "sandbox-helper.ts");
  const script = `import { SandboxHelper } from ${JSON.stringify(module)}; const helper = new SandboxHelper(${JSON.stringify(binary)}); console.log((await helper.exec(["echo", "hi"])).stdout.trim());`;
  const result = spawnSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], { encoding: "utf8", timeout: 15_000 });
  assert.equal(result.error, undefined, "the process ended on its own");
  assert.equal(result.status, 0, result.stderr);
  assert.equal(result.stdout.trim(), "hi");
});
