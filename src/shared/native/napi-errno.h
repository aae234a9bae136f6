/*
 * The Node-API addons' one way to report a failed system call: an Error whose `code` is the
 * errno name (ENOENT, EPERM, ...) and whose message names the call, like Node's own errors.
 * Included by each addon (they are built one file each, scripts/build.mjs).
 */
#ifndef CUBICLE_NAPI_ERRNO_H
#define CUBICLE_NAPI_ERRNO_H

#include <node_api.h>
#include <stdio.h>
#include <string.h>

static napi_value throw_errno(napi_env env, int error, const char *call) {
  const char *name = strerrorname_np(error);
  char message[128];
  snprintf(message, sizeof message, "%s: %s", call, strerror(error));
  napi_value code, text, exception;
  napi_create_string_utf8(env, name ? name : "EIO", NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &text);
  napi_create_error(env, code, text, &exception);
  napi_set_named_property(env, exception, "code", code);
  napi_throw(env, exception);
  return NULL;
}

#endif
