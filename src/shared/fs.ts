import { access } from "node:fs/promises";

/** Whether `file` exists (anything the process can see there; a dangling symlink counts as absent). */
export async function pathExists(file: string): Promise<boolean> {
  return access(file).then(
    () => true,
    () => false,
  );
}
