import type { TemplateRecord } from "./types.js";

/** A template record for tests: 512 MiB, 4 GiB, the `user` account, built at the epoch; the rest as given. */
export function testTemplateRecord(templateId: string, fields: Partial<TemplateRecord> & Pick<TemplateRecord, "recipeHash" | "source" | "rootfsDir">): TemplateRecord {
  return {
    templateId,
    aliases: [],
    defaultUser: "user",
    defaultWorkdir: "/home/user",
    env: {},
    cpuCount: 2,
    memoryMB: 512,
    diskSizeMB: 4096,
    runtime: "container",
    builtAt: new Date(0).toISOString(),
    sizeBytes: 1,
    ...fields,
  };
}
