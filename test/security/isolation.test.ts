/**
 * Escape battery, sandboxes and host: attempts as a sandbox's root (mounts, devices, kernel
 * interfaces, namespaces), from one sandbox at another, from a sandbox at the host, resource
 * exhaustion bounded so the host survives, the state files' permissions, and what happens when a
 * sandbox's agent dies. Each attempt asserts the contained outcome, through the real `e2b` SDK
 * against a real server and real sandboxes. A test here that finds nothing must be able to fail:
 * each asserts the positive control where one exists (the same action works where it should).
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { CommandExitError, Sandbox } from "e2b";
import { startTestServer, useServerForSdk, type TestServer } from "../e2e/harness.js";

let server: TestServer;
let a: Sandbox;
let b: Sandbox;

before(async () => {
  server = await startTestServer();
  useServerForSdk(server);
  [a, b] = await Promise.all([Sandbox.create({ timeoutMs: 900_000 }), Sandbox.create({ timeoutMs: 900_000 })]);
});

after(async () => {
  await Promise.all([a?.kill().catch(() => undefined), b?.kill().catch(() => undefined)]);
  await server?.stop();
});

interface Ran {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** Runs a shell command in a sandbox (as root unless told) and returns its outcome, failed or not. */
async function run(sandbox: Sandbox, cmd: string, options: { user?: "root" | "user"; timeoutMs?: number } = {}): Promise<Ran> {
  try {
    const result = await sandbox.commands.run(cmd, { user: options.user ?? "root", timeoutMs: options.timeoutMs ?? 60_000 });
    return { exitCode: result.exitCode, stdout: result.stdout, stderr: result.stderr };
  } catch (err) {
    if (err instanceof CommandExitError) return { exitCode: err.exitCode, stdout: err.stdout, stderr: err.stderr };
    throw err;
  }
}

/** A Python snippet run by the sandbox's python3, as root. */
const py = (sandbox: Sandbox, code: string, timeoutMs?: number) => run(sandbox, `/usr/bin/python3 -c ${shellQuote(code)}`, { timeoutMs });

function shellQuote(text: string): string {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

/** The errno a raw syscall gets inside the sandbox (0 = it worked), through ctypes. */
async function syscallErrno(sandbox: Sandbox, number: number, args: number[] = []): Promise<number> {
  const code = `import ctypes,os\nlibc=ctypes.CDLL(None,use_errno=True)\nr=libc.syscall(${[number, ...args].join(",")})\nprint(0 if r>=0 else ctypes.get_errno())`;
  const ran = await py(sandbox, code);
  assert.equal(ran.exitCode, 0, ran.stderr);
  return Number(ran.stdout.trim());
}

/** The sandbox's own address and its gateway (the host end of its veth), from /proc. */
async function addresses(sandbox: Sandbox): Promise<{ own: string; gateway: string }> {
  const code = [
    "import socket,struct",
    "gw=[l.split() for l in open('/proc/net/route') if l.split()[1]=='00000000'][0][2]",
    "print(socket.inet_ntoa(struct.pack('<L',int(gw,16))))",
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.connect((socket.inet_ntoa(struct.pack('<L',int(gw,16))),9)); print(s.getsockname()[0])",
  ].join("\n");
  const [gateway, own] = (await py(sandbox, code)).stdout.trim().split("\n");
  return { own: own!, gateway: gateway! };
}

/** Whether a TCP connection from inside the sandbox to host:port opens within two seconds. */
async function canConnect(sandbox: Sandbox, host: string, port: number): Promise<boolean> {
  const code = `import socket\ns=socket.socket()\ns.settimeout(2)\ntry:\n  s.connect((${JSON.stringify(host)},${port})); print("open")\nexcept Exception as e: print("closed", type(e).__name__)`;
  return (await py(sandbox, code)).stdout.startsWith("open");
}

/** The host pid of a sandbox's init (runtime id = sandbox id: the test server has no warm pool). */
function initPid(sandboxId: string): number {
  return (JSON.parse(execFileSync("runc", ["state", `cubicle-${sandboxId}`], { encoding: "utf8" })) as { pid: number }).pid;
}

function hostUid(pid: number): number {
  return Number(/^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"))![1]);
}

/** Runs `body` with a sandbox of its own, killed afterwards whatever happens. */
async function withSandbox(timeoutMs: number, body: (sandbox: Sandbox) => Promise<void>): Promise<void> {
  const sandbox = await Sandbox.create({ timeoutMs });
  try {
    await body(sandbox);
  } finally {
    await sandbox.kill().catch(() => undefined);
  }
}

async function assertAlive(sandbox: Sandbox): Promise<void> {
  assert.equal((await run(sandbox, "echo alive", { user: "user" })).stdout, "alive\n", "the sandbox's agent still answers");
}

describe("escapes as the sandbox's root", () => {
  test("mounting a filesystem is refused", async () => {
    const ran = await run(a, "mkdir -p /mnt/x && mount -t tmpfs none /mnt/x");
    assert.notEqual(ran.exitCode, 0);
    assert.ok(!fs.readFileSync("/proc/mounts", "utf8").includes(" /mnt/x "), "nothing was mounted on the host");
  });

  test("a device node for the host's disk cannot be made or opened", async () => {
    const disk = fs.readFileSync("/proc/self/mountinfo", "utf8").split("\n").find((line) => line.split(" ")[4] === "/")!.split(" ")[2]!;
    const [major, minor] = disk.split(":");
    const ran = await run(a, `mknod /tmp/disk b ${major} ${minor} 2>&1; head -c 512 /tmp/disk >/dev/null 2>&1 && echo READ || echo refused`);
    assert.match(ran.stdout, /refused/);
  });

  test("host sysctls, /proc/sysrq-trigger and /sys are read-only", async () => {
    const ran = await run(a, "echo 1 > /proc/sys/vm/drop_caches || echo denied1; echo h > /proc/sysrq-trigger || echo denied2; touch /sys/x || echo denied3; ls /sys | wc -l");
    assert.match(ran.stdout, /denied1[\s\S]*denied2[\s\S]*denied3/);
    assert.equal(ran.stdout.trim().split("\n").pop(), "0", "/sys shows nothing of the host");
  });

  test("kernel modules cannot be loaded (init_module, finit_module)", async () => {
    assert.notEqual(await syscallErrno(a, 313, [-1, 0, 0]), 0);
    assert.notEqual(await syscallErrno(a, 175, [0, 0, 0]), 0);
  });

  test("the kernel keyring, bpf, perf events, userfaultfd, io_uring and open_by_handle_at are refused", async () => {
    const EPERM = 1;
    // keyctl(KEYCTL_GET_KEYRING_ID), bpf, perf_event_open, userfaultfd, io_uring_setup, open_by_handle_at
    for (const [name, number, args] of [
      ["keyctl", 250, [0, -3, 0]],
      ["add_key", 248, [0, 0, 0, 0, 0]],
      ["bpf", 321, [0, 0, 0]],
      ["perf_event_open", 298, [0, 0, -1, -1, 0]],
      ["userfaultfd", 323, [0]],
      ["io_uring_setup", 425, [1, 0]],
      ["open_by_handle_at", 304, [-1, 0, 0]],
    ] as const) {
      assert.equal(await syscallErrno(a, number, [...args]), EPERM, name);
    }
  });

  test("the clock and the kernel log are the host's: not settable, not readable", async () => {
    assert.notEqual((await run(a, "date -s 2000-01-01")).exitCode, 0);
    assert.notEqual((await run(a, "dmesg")).exitCode, 0);
  });

  test("raw sockets (packet forging) are refused", async () => {
    const ran = await py(a, "import socket\ntry:\n  socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP); print('raw')\nexcept OSError as e: print('refused', e.errno)");
    assert.match(ran.stdout, /refused/);
  });

  test("a cgroup cannot be mounted, so release_agent cannot be reached", async () => {
    const ran = await run(a, "mkdir -p /tmp/cg && mount -t cgroup -o memory cgroup /tmp/cg 2>&1 || echo refused; test -e /tmp/cg/release_agent && echo FOUND || echo absent");
    assert.match(ran.stdout, /refused/);
    assert.match(ran.stdout, /absent/);
  });

  test("a nested user namespace gives root in it, and nothing on the host", async () => {
    const ran = await run(a, "unshare -r -m sh -c 'mount -t tmpfs nested /mnt && echo mounted-inside && id -u'");
    // Whether unshare is allowed or not, the host is untouched.
    assert.ok(!fs.readFileSync("/proc/mounts", "utf8").includes("nested "), "a nested mount reached the host");
    if (ran.exitCode === 0) assert.match(ran.stdout, /mounted-inside\n0/);
  });

  test("only the sandbox's own processes and files are visible: /proc/1/root is the sandbox's root", async () => {
    const ran = await run(a, "echo mine > /tmp/marker; ls /proc | grep -c '^[0-9]'; cat /proc/1/root/tmp/marker; hostname");
    const [count, marker, hostname] = ran.stdout.trim().split("\n");
    assert.ok(Number(count) < 40, `the sandbox sees ${count} processes`);
    assert.equal(marker, "mine");
    assert.equal(hostname, a.sandboxId);
    assert.notEqual((await run(a, `kill -0 ${server.pid()}`)).exitCode, 0, "the server's pid is not a process in the sandbox");
  });

  test("/proc/kcore, /proc/keys and /proc/timer_list are masked", async () => {
    const ran = await run(a, "for f in /proc/kcore /proc/keys /proc/timer_list; do cat $f 2>/dev/null | wc -c; done");
    assert.deepEqual(ran.stdout.trim().split("\n").map(Number), [0, 0, 0]);
    assert.ok(fs.statSync("/proc/keys").size === 0 && fs.readFileSync("/proc/timer_list", "utf8").length > 0, "positive control: the host's /proc/timer_list has content");
  });

  test("root inside is an unprivileged uid of the sandbox's own range on the host; a setuid file it writes is not root's", async () => {
    const uid = hostUid(initPid(a.sandboxId));
    assert.ok(uid >= 2 ** 30, `root of the sandbox is host uid ${uid}`);
    assert.equal((await run(a, "cp /bin/sh /root/rootsh && chmod 4755 /root/rootsh && stat -c %u /root/rootsh")).stdout, "0\n");
    const onDisk = fs.statSync(path.join(server.runDir, "pool", "layers", a.sandboxId, "upper", "root", "rootsh"));
    assert.notEqual(onDisk.uid, 0, "the setuid file is owned by host root on disk");
    assert.equal(onDisk.uid, 100000, "stored with the canonical id");
  });
});

describe("from one sandbox at another", () => {
  test("each sandbox has its own host uid range, and owns its user namespace", async () => {
    const [uidA, uidB] = [hostUid(initPid(a.sandboxId)), hostUid(initPid(b.sandboxId))];
    assert.ok(Math.abs(uidA - uidB) >= 65536, `${uidA} and ${uidB} overlap`);
  });

  test("a sandbox cannot connect to another sandbox's agent or ports", async () => {
    const target = await addresses(b);
    await b.commands.run("/usr/bin/python3 -m http.server 8080 --bind 0.0.0.0 >/dev/null 2>&1", { background: true });
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(await canConnect(b, "127.0.0.1", 8080), true, "positive control: the server in B listens");
    assert.equal(await canConnect(a, target.own, 8080), false);
    assert.equal(await canConnect(a, target.own, 49983), false);
  });

  test("a sandbox cannot see or signal another's processes", async () => {
    await b.commands.run("sleep 600", { background: true, user: "user" });
    const ran = await run(a, "ps -eo args | grep -c '^sleep 600' || true");
    assert.equal(ran.stdout.trim(), "0");
  });

  test("one sandbox holding every inotify instance it may have leaves watchDir working in another, and inotify on the host", async () => {
    const hog = "import ctypes,time\nlibc=ctypes.CDLL(None)\nfds=[]\nwhile len(fds)<100000:\n  fd=libc.inotify_init()\n  if fd<0: break\n  fds.append(fd)\nopen('/tmp/held','w').write(str(len(fds)))\ntime.sleep(600)";
    await a.commands.run(`/usr/bin/python3 -c ${shellQuote(hog)}`, { background: true, user: "user" });
    let held = 0;
    for (let i = 0; i < 100 && !held; i++) {
      held = Number((await run(a, "cat /tmp/held 2>/dev/null || true")).stdout) || 0;
      if (!held) await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(held >= 100, `the hog holds ${held} inotify instances`);
    assert.equal((await py(a, "import ctypes; print(ctypes.CDLL(None).inotify_init())")).stdout.trim(), "-1", "positive control: the hog's user is out of instances");
    const events: string[] = [];
    const watcher = await b.files.watchDir("/tmp", (event) => void events.push(event.name), { timeoutMs: 0 });
    await b.files.write("/tmp/seen.txt", "x");
    for (let i = 0; i < 50 && !events.includes("seen.txt"); i++) await new Promise((r) => setTimeout(r, 100));
    await watcher.stop();
    assert.ok(events.includes("seen.txt"), `watchDir in B saw ${JSON.stringify(events)}`);
    assert.ok(Number(execFileSync("/usr/bin/python3", ["-c", "import ctypes; print(ctypes.CDLL(None).inotify_init())"], { encoding: "utf8" })) >= 0, "host root has inotify");
  });

  test("files of one sandbox are not in another", async () => {
    await a.files.write("/tmp/secret-of-a", "a's secret");
    assert.equal(await b.files.exists("/tmp/secret-of-a"), false);
  });
});

describe("from a sandbox at the host", () => {
  test("the host's end of the sandbox's link answers nothing: not the API port, not ssh, not the agent port", async () => {
    const { gateway } = await addresses(a);
    const apiPort = Number(new URL(server.url).port);
    for (const port of [apiPort, 22, 49983, 3000]) assert.equal(await canConnect(a, gateway, port), false, `gateway ${gateway}:${port}`);
  });

  test("the link-local metadata address is unreachable", async () => {
    assert.equal(await canConnect(a, "169.254.169.254", 80), false);
  });

  test("the sandbox cannot change its address or routes (no CAP_NET_ADMIN over its netns)", async () => {
    assert.notEqual((await run(a, "ip addr add 10.99.99.99/32 dev eth0")).exitCode, 0);
    assert.notEqual((await run(a, "ip route add 1.2.3.4 dev eth0")).exitCode, 0);
  });
});

describe("resource exhaustion stays inside the sandbox", () => {
  test("a fork bomb stops at the sandbox's process limit; the agent and other sandboxes go on", async () => {
    await withSandbox(120_000, async (bomb) => {
      await bomb.commands.run("for i in $(seq 6000); do sleep 30 & done 2>/dev/null; true", { user: "user", timeoutMs: 60_000, background: true });
      await new Promise((r) => setTimeout(r, 3000));
      await assertAlive(bomb);
      await assertAlive(b);
      const processes = Number((await run(bomb, "ls /proc | grep -c '^[0-9]'")).stdout);
      assert.ok(processes <= 4096 + 10, `${processes} processes`);
    });
  });

  test("a memory hog is killed inside its own cgroup and the agent survives", async () => {
    await withSandbox(120_000, async (hog) => {
      const ran = await run(hog, "/usr/bin/python3 -c 'b=[]\nwhile True: b.append(bytearray(64*1024*1024))'", { user: "user", timeoutMs: 60_000 });
      assert.notEqual(ran.exitCode, 0, "the hog ended");
      await assertAlive(hog);
    });
  });

  test("filling the disk stops at the sandbox's quota; other sandboxes still write", async () => {
    await withSandbox(120_000, async (filler) => {
      const total = (await server.api("GET", `/sandboxes/${filler.sandboxId}`)).json.diskSizeMB as number;
      const ran = await run(filler, `dd if=/dev/zero of=/home/user/fill bs=1M count=${total + 512} 2>&1`, { user: "user", timeoutMs: 120_000 });
      assert.notEqual(ran.exitCode, 0);
      assert.match(ran.stdout + ran.stderr, /Disk quota exceeded|No space left/);
      const size = Number((await run(filler, "stat -c %s /home/user/fill")).stdout);
      assert.ok(size <= total * 1024 * 1024, `wrote ${size} bytes into a ${total} MiB disk`);
      assert.equal((await run(b, "head -c 10000000 /dev/zero > /tmp/ten && echo ok", { user: "user" })).stdout, "ok\n");
      const metrics = (await server.api("GET", `/sandboxes/${filler.sandboxId}/metrics`)).json as { diskUsed: number; diskTotal: number }[];
      const newest = metrics.at(-1)!;
      assert.equal(newest.diskTotal, total * 1024 * 1024);
      assert.ok(newest.diskUsed > (total - 64) * 1024 * 1024, `metrics show ${newest.diskUsed} bytes used`);
    });
  });

  test("a CPU spin on every core is held to the sandbox's CPU share", async () => {
    await withSandbox(120_000, async (spin) => {
      const cpus = (await server.api("GET", `/sandboxes/${spin.sandboxId}`)).json.cpuCount as number;
      await spin.commands.run("for i in 1 2 3 4; do (while :; do :; done) & done; wait", { background: true, user: "user" });
      // CPU seconds the sandbox's cgroup used: cgroup v1 cpuacct (ns) or v2 cpu.stat (µs).
      const v1 = `/sys/fs/cgroup/cpuacct/cubicle/${spin.sandboxId}/cpuacct.usage`;
      const v2 = `/sys/fs/cgroup/cubicle/${spin.sandboxId}/cpu.stat`;
      assert.ok(fs.existsSync(v1) || fs.existsSync(v2), "the sandbox's CPU accounting is found");
      const seconds = () => (fs.existsSync(v1) ? Number(fs.readFileSync(v1, "utf8")) / 1e9 : Number(/^usage_usec (\d+)/m.exec(fs.readFileSync(v2, "utf8"))![1]) / 1e6);
      const before = seconds();
      await new Promise((r) => setTimeout(r, 2000));
      const used = (seconds() - before) / 2;
      assert.ok(used <= cpus * 1.15, `the sandbox used ${used.toFixed(2)} CPUs with a share of ${cpus}`);
    });
  });

  test("300,000 files in a sandbox do not blow up the server's memory when its metrics are read five times at once", async () => {
    await withSandbox(300_000, async (many) => {
      const made = await py(many, "import os\nos.makedirs('/tmp/m',exist_ok=True)\nfor i in range(300000): open('/tmp/m/%d'%i,'w').close()\nprint('done')", 240_000);
      assert.equal(made.stdout.trim(), "done", made.stderr);
      const rss = () => Number(/^VmRSS:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${server.pid()}/status`, "utf8"))![1]) * 1024;
      const before = rss();
      const started = performance.now();
      const answers = await Promise.all(Array.from({ length: 5 }, () => server.api("GET", `/sandboxes/${many.sandboxId}/metrics`)));
      const elapsed = performance.now() - started;
      for (const answer of answers) assert.equal(answer.status, 200);
      assert.ok(rss() - before < 64 * 1024 ** 2, `the server grew by ${Math.round((rss() - before) / 1024 ** 2)} MiB`);
      assert.ok(elapsed < 2000, `five metrics reads took ${Math.round(elapsed)} ms`);
    });
  });
});

describe("state and lifecycle", () => {
  test("the state directory is 0700 and the files holding tokens and keys are 0600", () => {
    const mode = (file: string) => fs.statSync(file).mode & 0o777;
    assert.equal(mode(server.stateDir), 0o700);
    for (const name of ["cubicle.db", "cubicle.db-wal", "cubicle.db-shm", "storage.btrfs"]) {
      const file = path.join(server.stateDir, name);
      if (fs.existsSync(file)) assert.equal(mode(file), 0o600, name);
    }
    // An unprivileged local user reads none of it.
    const reader = execFileSync("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", `cat ${path.join(server.stateDir, "cubicle.db")} >/dev/null 2>&1 && echo READ || echo denied`], { encoding: "utf8" });
    assert.equal(reader.trim(), "denied");
  });

  test("a local user cannot reach a sandbox's files through the host's paths", () => {
    const reader = execFileSync(
      "setpriv",
      ["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", `cat ${path.join(server.runDir, "pool", "sandboxes", a.sandboxId, "rootfs", "etc", "hostname")} 2>&1 || echo denied`],
      { encoding: "utf8" },
    );
    assert.match(reader, /denied/);
  });

  test("a sandbox whose agent dies is gone at once: getInfo 404, not listed, its stream ended, its container and network released", async () => {
    const victim = await Sandbox.create({ timeoutMs: 120_000 });
    const handle = await victim.commands.run("sleep 600", { background: true });
    const ended = handle.wait().then(
      () => "finished",
      () => "ended with an error",
    );
    process.kill(initPid(victim.sandboxId), "SIGKILL");
    const deadline = Date.now() + 5000;
    let status = 0;
    while (Date.now() < deadline) {
      status = (await server.api("GET", `/sandboxes/${victim.sandboxId}`)).status;
      if (status === 404) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(status, 404, "the dead sandbox is still reported");
    const listed = (await server.api("GET", "/v2/sandboxes")).json as { sandboxID: string }[];
    assert.ok(!listed.some((s) => s.sandboxID === victim.sandboxId));
    assert.equal(await Promise.race([ended, new Promise((r) => setTimeout(() => r("still open"), 5000))]), "ended with an error");
    const netnsGone = () => !execFileSync("ip", ["netns", "list"], { encoding: "utf8" }).includes(`cubicle-${victim.sandboxId}`);
    for (let i = 0; i < 50 && !netnsGone(); i++) await new Promise((r) => setTimeout(r, 100));
    assert.ok(netnsGone(), "its netns is released");
    assert.equal(execFileSync("runc", ["list", "-q"], { encoding: "utf8" }).split("\n").includes(`cubicle-${victim.sandboxId}`), false, "its container is removed");
  });
});
