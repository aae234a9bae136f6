/*
 * What the agent does as a microVM guest's root that Node has no call for (GUEST_MACHINE_NOTE in
 * src/agent/guest-machine.ts): a Node-API addon, loaded only in guests.
 *
 *   reseed(Buffer)  -> undefined: the bytes (1-512, fresh randomness from the host) are mixed
 *                      into the kernel's input pool and credited (RNDADDENTROPY), and the CRNG is
 *                      reseeded from it at once (RNDRESEEDCRNG), so a guest restored from a
 *                      memory image stops producing the random numbers its image would.
 *   setTime(ms)     -> undefined: sets the guest's wall clock (CLOCK_REALTIME) to `ms` since the
 *                      epoch; a guest's clock stops while it is paused or saved.
 *   bindReadOnly(source, target)
 *                   -> undefined: `target` shows the file `source`, read-only (a bind mount,
 *                      then its read-only remount, as `mount --bind -o ro` makes it); whatever
 *                      was bound on `target` before (a fork of a fork) is detached first. The
 *                      syscalls themselves: under TCG a `mount` process, a fork of the agent and
 *                      an exec, took most of a restored guest's first /init (GUEST_MACHINE_NOTE).
 *
 * Errors are thrown as Error objects whose `code` is the errno name, like Node's own.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>
#include "../../shared/native/napi-errno.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <time.h>
#include <unistd.h>

#define MAX_BYTES 512

static napi_value reseed(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  bool is_buffer = false;
  if (argc >= 1) napi_is_buffer(env, argv[0], &is_buffer);
  void *data = NULL;
  size_t length = 0;
  if (!is_buffer || napi_get_buffer_info(env, argv[0], &data, &length) != napi_ok || length == 0 || length > MAX_BYTES) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "reseed takes a Buffer of 1 to 512 bytes");
    return NULL;
  }
  struct rand_pool_info *pool = malloc(sizeof *pool + length);
  if (!pool) return throw_errno(env, ENOMEM, "malloc");
  pool->entropy_count = (int)(length * 8);
  pool->buf_size = (int)length;
  memcpy(pool->buf, data, length);
  int error = 0;
  const char *call = "open /dev/urandom";
  int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    error = errno;
  } else {
    call = "RNDADDENTROPY";
    if (ioctl(fd, RNDADDENTROPY, pool) != 0) {
      error = errno;
    } else {
      call = "RNDRESEEDCRNG";
      if (ioctl(fd, RNDRESEEDCRNG) != 0) error = errno;
    }
    close(fd);
  }
  explicit_bzero(pool->buf, length);
  free(pool);
  if (error) return throw_errno(env, error, call);
  return NULL;
}

static napi_value set_time(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  double ms = 0;
  if (argc < 1 || napi_get_value_double(env, argv[0], &ms) != napi_ok || !(ms > 0) || ms > 253402300799000.0) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "setTime takes milliseconds since the epoch");
    return NULL;
  }
  struct timespec now;
  now.tv_sec = (time_t)(ms / 1000);
  now.tv_nsec = (long)((ms - (double)now.tv_sec * 1000) * 1000000);
  if (now.tv_nsec < 0) now.tv_nsec = 0;
  if (now.tv_nsec > 999999999) now.tv_nsec = 999999999;
  if (clock_settime(CLOCK_REALTIME, &now) != 0) return throw_errno(env, errno, "clock_settime");
  return NULL;
}

/* An absolute path argument, at most PATH_MAX - 1 bytes; false (a TypeError thrown) otherwise. */
static bool path_argument(napi_env env, napi_value value, char *out, const char *what) {
  size_t length = 0;
  if (napi_get_value_string_utf8(env, value, out, PATH_MAX, &length) != napi_ok || length == 0 || length >= PATH_MAX - 1 || out[0] != '/') {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", what);
    return false;
  }
  return true;
}

/* Bounds the detaching of earlier binds: each fork of a fork added at most one. */
#define MAX_STACKED_BINDS 64

static napi_value bind_read_only(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  static char source[PATH_MAX], target[PATH_MAX];
  if (argc < 2) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "bindReadOnly takes a source and a target path");
    return NULL;
  }
  if (!path_argument(env, argv[0], source, "bindReadOnly's source must be an absolute path")) return NULL;
  if (!path_argument(env, argv[1], target, "bindReadOnly's target must be an absolute path")) return NULL;
  /* EINVAL: nothing (more) is mounted there. */
  int detached = 0;
  while (umount2(target, MNT_DETACH | UMOUNT_NOFOLLOW) == 0) {
    if (++detached == MAX_STACKED_BINDS) return throw_errno(env, ELOOP, "umount2");
  }
  if (errno != EINVAL) return throw_errno(env, errno, "umount2");
  if (mount(source, target, NULL, MS_BIND, NULL) != 0) return throw_errno(env, errno, "mount");
  if (mount(NULL, target, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL) != 0) {
    int error = errno;
    umount2(target, MNT_DETACH);
    return throw_errno(env, error, "mount (read-only remount)");
  }
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
    {"reseed", NULL, reseed, NULL, NULL, NULL, napi_default, NULL},
    {"setTime", NULL, set_time, NULL, NULL, NULL, napi_default, NULL},
    {"bindReadOnly", NULL, bind_read_only, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions);
  return exports;
}

NAPI_MODULE(cubicle_guest, init)
