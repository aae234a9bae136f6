import { readFile, writeFile } from "node:fs/promises";
import { createLogger } from "../../shared/log.js";

const log = createLogger("container");

/** Where the kernel's samepage merging is controlled (Documentation/admin-guide/mm/ksm.rst). */
export const KSM_SYSFS_DIR = "/sys/kernel/mm/ksm";

/**
 * Turns ksmd on (`run` = 1) for the agents' merged memory (AGENT_MEMORY_MERGE_NOTE) and returns
 * whether it runs; false (with a warning) where the kernel has no KSM or the file is not writable.
 * It stays on when the server stops: ksmd scans only the memory of processes that asked for
 * merging and sleeps while there are none, and `run` = 0 would leave merged pages merged anyway.
 * The scan rate is the host's (`pages_to_scan` every `sleep_millisecs`, 100 per 20 ms by
 * default): ~1 % of a core with 60 idle sandboxes here.
 */
export async function enableKsm(dir = KSM_SYSFS_DIR): Promise<boolean> {
  const run = await readFile(`${dir}/run`, "utf8").then((text) => text.trim(), () => undefined);
  if (run === undefined) {
    log.warn("the kernel has no samepage merging (no /sys/kernel/mm/ksm): agents' memory is not merged");
    return false;
  }
  if (run === "1") return true;
  try {
    await writeFile(`${dir}/run`, "1");
  } catch (err) {
    log.warn("cannot turn samepage merging on: agents' memory is not merged", { run, error: (err as Error).message });
    return false;
  }
  log.info("samepage merging turned on for the agents' memory (CUBICLE_KSM=off turns this off)", { previousRun: run });
  return true;
}
