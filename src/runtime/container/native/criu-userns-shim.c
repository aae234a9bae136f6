/*
 * criu-userns-shim: preloaded into CRIU (LD_PRELOAD, set by the container runtime for runc's
 * checkpoint and restore only) so that every sandbox's user namespace is owned by the
 * sandbox's own host uid, also when CRIU makes it. See USERNS_OWNER_NOTE in
 * src/runtime/container/sandbox-helper.ts.
 *
 * - clone3/clone with CLONE_NEWUSER from the initial user namespace (CRIU creating a restored
 *   sandbox's namespace): made with the effective uid CUBICLE_USERNS_OWNER, capabilities kept,
 *   so the kernel records that uid as the owner (per-user kernel counts are charged to it),
 *   then the caller's uid is restored. The child is made dumpable again so that it can still
 *   open its own /proc files (timens_offsets) before CRIU gives it its ids.
 * - prlimit64 on another process that fails with EPERM: retried with the effective uid of the
 *   owner of that process's user namespace. Reading another process's limits needs
 *   CAP_SYS_RESOURCE over its namespace, which root lacks on hosts that drop it from the
 *   bounding set (the owner of a namespace has every capability in it).
 *
 * Everything else goes straight to glibc. Only raw syscalls change credentials, so only the
 * calling thread is affected, and only around the one call.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/nsfs.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef long (*syscall_fn)(long, ...);
typedef int (*clone_fn)(int (*)(void *), void *, int, void *, ...);

static syscall_fn real_syscall(void) {
  static syscall_fn fn;
  if (!fn) fn = (syscall_fn)dlsym(RTLD_NEXT, "syscall");
  return fn;
}

static void raise_effective_caps(void) {
  struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2];
  if (real_syscall()(SYS_capget, &header, data) != 0) return;
  data[0].effective = data[0].permitted;
  data[1].effective = data[1].permitted;
  real_syscall()(SYS_capset, &header, data);
}

static int set_euid(uid_t uid) {
  if (real_syscall()(SYS_setresuid, -1, uid, -1) != 0) return -1;
  raise_effective_caps();
  return 0;
}

/* The owner for new top-level user namespaces, when this process is in the initial one. */
static int wanted_owner(uid_t *owner) {
  const char *text = getenv("CUBICLE_USERNS_OWNER");
  if (!text || !*text) return 0;
  char map[128] = {0};
  int fd = open("/proc/self/uid_map", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t got = read(fd, map, sizeof map - 1);
  close(fd);
  unsigned long inside, outside, count;
  if (got <= 0 || sscanf(map, "%lu %lu %lu", &inside, &outside, &count) != 3 || inside != 0 || outside != 0 || count != 4294967295UL) return 0;
  *owner = (uid_t)strtoul(text, NULL, 10);
  return *owner != 0;
}

struct clone_args_head {
  uint64_t flags;
};

long syscall(long number, ...) {
  va_list ap;
  va_start(ap, number);
  long a1 = va_arg(ap, long), a2 = va_arg(ap, long), a3 = va_arg(ap, long), a4 = va_arg(ap, long), a5 = va_arg(ap, long), a6 = va_arg(ap, long);
  va_end(ap);
  uid_t owner;
  if (number == SYS_clone3 && a1 && (((struct clone_args_head *)a1)->flags & CLONE_NEWUSER) && wanted_owner(&owner)) {
    uid_t previous = geteuid();
    if (set_euid(owner) != 0) return -1;
    long child = real_syscall()(number, a1, a2, a3, a4, a5, a6);
    int saved = errno;
    if (child == 0) {
      real_syscall()(SYS_prctl, PR_SET_DUMPABLE, 1, 0, 0, 0);
      return 0;
    }
    set_euid(previous);
    errno = saved;
    return child;
  }
  if (number == SYS_prlimit64) return prlimit64((pid_t)a1, (enum __rlimit_resource)a2, (const struct rlimit64 *)a3, (struct rlimit64 *)a4);
  return real_syscall()(number, a1, a2, a3, a4, a5, a6);
}

int clone(int (*fn)(void *), void *stack, int flags, void *arg, ...) {
  va_list ap;
  va_start(ap, arg);
  void *parent_tid = va_arg(ap, void *), *tls = va_arg(ap, void *), *child_tid = va_arg(ap, void *);
  va_end(ap);
  clone_fn real = (clone_fn)dlsym(RTLD_NEXT, "clone");
  uid_t owner;
  if (!(flags & CLONE_NEWUSER) || !wanted_owner(&owner)) return real(fn, stack, flags, arg, parent_tid, tls, child_tid);
  uid_t previous = geteuid();
  if (set_euid(owner) != 0) return -1;
  int child = real(fn, stack, flags, arg, parent_tid, tls, child_tid);
  int saved = errno;
  set_euid(previous);
  errno = saved;
  return child;
}

static int namespace_owner(pid_t pid, uid_t *owner) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/ns/user", (int)pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  int result = ioctl(fd, NS_GET_OWNER_UID, owner);
  close(fd);
  return result;
}

int prlimit64(pid_t pid, enum __rlimit_resource resource, const struct rlimit64 *new_limit, struct rlimit64 *old_limit) {
  long result = real_syscall()(SYS_prlimit64, pid, resource, new_limit, old_limit);
  if (result == 0 || errno != EPERM || pid == 0 || pid == getpid()) return (int)result;
  uid_t owner, previous = geteuid();
  if (namespace_owner(pid, &owner) != 0 || owner == 0 || owner == previous) {
    errno = EPERM;
    return -1;
  }
  if (set_euid(owner) != 0) return -1;
  result = real_syscall()(SYS_prlimit64, pid, resource, new_limit, old_limit);
  int saved = errno;
  set_euid(previous);
  errno = saved;
  return (int)result;
}

int prlimit(pid_t pid, enum __rlimit_resource resource, const struct rlimit *new_limit, struct rlimit *old_limit) __attribute__((alias("prlimit64")));
