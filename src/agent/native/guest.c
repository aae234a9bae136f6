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
#include <sys/ioctl.h>
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

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
    {"reseed", NULL, reseed, NULL, NULL, NULL, napi_default, NULL},
    {"setTime", NULL, set_time, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions);
  return exports;
}

NAPI_MODULE(cubicle_guest, init)
