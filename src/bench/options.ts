import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";

/** How `create` treats the sandboxes it makes. */
export type CreateMode = "create-delete" | "create-only";

/** Parameters of one benchmark run; everything but the output settings lands in the JSON. */
export interface BenchOptions {
  scenario: string;
  /** Requests in flight at once (create, restore, exec …), batch size (density), fork count (fork). */
  concurrency: number;
  /** Measured iterations (or sandboxes for create and density). */
  total: number;
  /** Warm-up iterations, run first and discarded. */
  warmup: number;
  template: string;
  mode: CreateMode;
  /** Dirty sizes written to /dev/shm before `snapshot`, in MiB. */
  dirtyMiB: number[];
  /** Pause after each density batch so page cache and the agents settle. */
  settleMs: number;
  /** Density stops before MemAvailable falls below this. */
  memoryFloorMiB: number;
  /** Where result JSON files go. */
  outDir: string;
  /** Where `report` writes REPORT.md and charts/ (default: the parent of outDir). */
  reportDir: string;
  /** Live progress on stderr (a TTY and not CI). */
  progress: boolean;
  /**
   * create: before each create, wait (unmeasured) until the server's warm pool for the template
   * is full again, so every sample is a claim from a ready pool and none competes with the refill
   * of the one before.
   */
  waitForPool: boolean;
  /**
   * create: live idle sandboxes made before the measured creates (not measured) and kept until
   * the end, so creates run on a host that already holds them (the burst benchmark).
   */
  background: number;
  /** network: bytes of each bulk download (`GET /bytes/<n>`), in MiB. */
  downloadMiB: number;
  /** network: rounds, each measuring every path once (the path order rotates between rounds). */
  rounds: number;
  /** network: paired creates (one with a policy, one without) from a full warm pool. */
  createPairs: number;
  /** network: paired cold creates (no pool entry fits); 0 = none. */
  coldPairs: number;
  /** network: `PUT /sandboxes/{id}/network` round trips measured. */
  updates: number;
  /** template-build: templates built on one base for the disk-per-template figure. */
  templateCount: number;
  /** storage: 1 KiB files written, read and removed per path. */
  smallFiles: number;
  /** storage: size of the one big file per path, in MiB. */
  bigFileMiB: number;
}

export const SCENARIO_NAMES = ["create", "density", "density-idle", "exec", "files", "runcode", "snapshot", "restore", "restore-size", "rollback", "fork", "pause-resume", "baseline", "network", "template-build", "runtimes", "storage"] as const;

export const BENCH_USAGE = `usage: ./cubicle bench SCENARIO [options] | ./cubicle bench report [-o RESULTS_DIR] [-r REPORT_DIR]

scenarios: ${SCENARIO_NAMES.join(", ")}
  -c N        concurrency (create, restore, rollback, pause-resume, exec), batch size (density), forks per call (fork)
  -n N        measured iterations (sandboxes for create and density)
  -w N        warm-up iterations, discarded (default 2 for create, 1 otherwise)
  -m MODE     create: create-delete (default) or create-only (kill all at the end)
  --wait-pool create: wait until the warm pool is full again before each create (not measured)
  --background N  create: first make N idle sandboxes (not measured) and keep them to the end (the cost curve: create vs live sandboxes)
  -t NAME     template (default base; runcode uses code-interpreter-v1)
  density-idle needs a server with short CUBICLE_IDLE_FREEZE_SECONDS and CUBICLE_IDLE_DISK_SECONDS
  -s LIST     snapshot, restore-size: dirty sizes in MiB, comma-separated (default 0,10,100,500)
  --settle-ms N   density: wait after each batch (default 3000)
  --floor-mib N   density: stop when MemAvailable falls below this (default 2048)
  --download-mib N  network: size of each bulk download (default 128)
  --rounds N      network: rounds over every path, order rotating (default 3)
  --pairs N       network: paired warm-pool creates with and without a policy (default 20)
  --cold-pairs N  network: paired cold creates (default 6; 0 = none)
  --updates N     network: PUT /sandboxes/{id}/network round trips (default 100)
  --templates K   template-build: templates sharing one base for the disk figure (default 5)
  --small-files N storage: 1 KiB files per path (default 10000)
  --big-mib N     storage: the big file per path, in MiB (default 1024)
  template-build: -n cached rebuilds, changed-step rebuilds and creates per template; -w discarded create rounds
  network reads its fake hosts from CUBICLE_BENCH_NET_{HTTP,HTTPS,SOCKS,INTERFACE,CA_FILE}
  (see src/bench/scenarios/network.ts; bench/network.sh sets them)
  -o DIR      results directory (default bench/results)
  -r DIR      report directory (default: parent of the results directory)
  --quiet     no live progress
  runtimes needs a server with CUBICLE_MICROVM=tcg|kvm: containers and microVMs side by side (-n creates each, --background N idle of each for memory)
  storage needs a server with CUBICLE_CODEBASE_ROOTS (and the same variable for the client): -n creates of each kind`;

export function parseBenchArgs(args: string[], env: NodeJS.ProcessEnv = process.env, isTTY = process.stderr.isTTY === true): BenchOptions {
  const [scenario, ...rest] = args;
  if (!scenario || scenario === "help" || scenario === "--help") throw new CubicleError("invalid_argument", BENCH_USAGE);
  const options: BenchOptions = {
    scenario,
    concurrency: 1,
    total: scenario === "density" || scenario === "template-build" || scenario === "storage" ? 10 : scenario === "network" ? 300 : 20,
    warmup: -1,
    template: scenario === "runcode" ? "code-interpreter-v1" : "base",
    mode: "create-delete",
    dirtyMiB: [0, 10, 100, 500],
    settleMs: 3000,
    memoryFloorMiB: 2048,
    outDir: path.resolve("bench/results"),
    reportDir: "",
    progress: isTTY && env.CI !== "true",
    waitForPool: false,
    background: 0,
    downloadMiB: 128,
    rounds: 3,
    createPairs: 20,
    coldPairs: 6,
    updates: 100,
    templateCount: 5,
    smallFiles: 10_000,
    bigFileMiB: 1024,
  };
  for (let i = 0; i < rest.length; i++) {
    const flag = rest[i]!;
    const value = rest[i + 1];
    const text = () => {
      if (value === undefined) throw new CubicleError("invalid_argument", `${flag} needs a value`);
      i++;
      return value;
    };
    const int = () => {
      const n = Number(text());
      if (!Number.isInteger(n) || n < 0) throw new CubicleError("invalid_argument", `${flag} takes a whole number, not ${JSON.stringify(value)}`);
      return n;
    };
    switch (flag) {
      case "-c":
        options.concurrency = Math.max(1, int());
        break;
      case "-n":
        options.total = Math.max(1, int());
        break;
      case "-w":
        options.warmup = int();
        break;
      case "-t":
        options.template = text();
        break;
      case "-m": {
        const mode = text();
        if (mode !== "create-delete" && mode !== "create-only") throw new CubicleError("invalid_argument", `-m takes create-delete or create-only, not ${mode}`);
        options.mode = mode;
        break;
      }
      case "-s":
        options.dirtyMiB = text()
          .split(",")
          .map((s) => Number(s.trim()));
        if (options.dirtyMiB.some((n) => !Number.isInteger(n) || n < 0)) throw new CubicleError("invalid_argument", "-s takes whole MiB sizes such as 0,10,100");
        break;
      case "--settle-ms":
        options.settleMs = int();
        break;
      case "--floor-mib":
        options.memoryFloorMiB = int();
        break;
      case "-o":
        options.outDir = path.resolve(text());
        break;
      case "-r":
        options.reportDir = path.resolve(text());
        break;
      case "--quiet":
        options.progress = false;
        break;
      case "--wait-pool":
        options.waitForPool = true;
        break;
      case "--background":
        options.background = int();
        break;
      case "--download-mib":
        options.downloadMiB = Math.max(1, int());
        break;
      case "--rounds":
        options.rounds = Math.max(1, int());
        break;
      case "--pairs":
        options.createPairs = int();
        break;
      case "--cold-pairs":
        options.coldPairs = int();
        break;
      case "--updates":
        options.updates = int();
        break;
      case "--templates":
        options.templateCount = Math.max(1, int());
        break;
      case "--small-files":
        options.smallFiles = Math.max(1, int());
        break;
      case "--big-mib":
        options.bigFileMiB = Math.max(1, int());
        break;
      default:
        throw new CubicleError("invalid_argument", `unknown bench option ${flag}\n\n${BENCH_USAGE}`);
    }
  }
  if (options.warmup < 0) options.warmup = scenario === "create" ? 2 : scenario === "density" || scenario === "baseline" ? 0 : scenario === "network" ? 5 : 1;
  if (!options.reportDir) options.reportDir = path.dirname(options.outDir);
  return options;
}
