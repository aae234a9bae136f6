/*
 * tar-shim: the `tar` CRIU finds first in PATH when it archives or restores a sandbox's tmpfs
 * mounts. The same rewrite as the shell shim in src/runtime/container/criu.ts (TAR_SHIM_NOTE):
 * `--gzip` is dropped, and an extraction reads the archive through /proc/self/fd/0 so GNU tar
 * recognises a gzip archive (images made before the shim) by itself. Then it execs the real tar
 * (CUBICLE_REAL_TAR). A static binary: ~1 ms less than the shell shim per tmpfs mount, and a
 * dump or restore runs one per tmpfs mount (three in a sandbox).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
  const char *real = getenv("CUBICLE_REAL_TAR");
  if (!real || !*real) real = "/usr/bin/tar";
  char **args = calloc((size_t)argc + 2, sizeof *args);
  if (!args) return 2;
  int extract = 0;
  for (int i = 1; i < argc; i++)
    if (strcmp(argv[i], "--extract") == 0) extract = 1;
  int n = 0;
  args[n++] = (char *)real;
  if (extract) args[n++] = "--file=/proc/self/fd/0";
  for (int i = 1; i < argc; i++)
    if (strcmp(argv[i], "--gzip") != 0) args[n++] = argv[i];
  args[n] = NULL;
  execv(real, args);
  fprintf(stderr, "tar-shim: cannot execute %s: %s\n", real, strerror(errno));
  return 2;
}
