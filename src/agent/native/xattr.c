/*
 * Extended attributes for the agent (XATTR_NOTE in src/agent/filesystem/xattrs.ts): a Node-API
 * addon, because Node has no xattr call and a helper process per file would cost milliseconds
 * where a system call costs microseconds (a listing stats every entry).
 *
 * Every function takes a target that is either a file descriptor (a number: the f* calls) or a
 * path (a string: the l* calls, which never follow a final symlink). Errors are thrown as
 * Error objects whose `code` is the errno name (ENOENT, ENOTSUP, ...), like Node's own.
 *
 *   list(target, prefix)        -> [[name, Buffer], ...] for every attribute whose name starts with prefix
 *   set(target, name, Buffer)   -> undefined
 *   remove(target, name)        -> undefined (ENODATA when there was none)
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>
#include "../../shared/native/napi-errno.h"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>

/* Linux caps a name at 255 bytes and a value at 64 KiB. */
#define MAX_NAME 256
#define MAX_VALUE 65536
#define MAX_PATH 4096

struct target {
  int fd;                 /* >= 0: use the descriptor */
  char path[MAX_PATH];    /* otherwise this path, not following a final symlink */
};

static napi_value throw_type(napi_env env, const char *message) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
  return NULL;
}

/* Reads argument `value` as a target; false (with an exception pending) when it is neither. */
static int read_target(napi_env env, napi_value value, struct target *target) {
  napi_valuetype type;
  napi_typeof(env, value, &type);
  if (type == napi_number) {
    int32_t fd;
    napi_get_value_int32(env, value, &fd);
    if (fd < 0) {
      throw_type(env, "a file descriptor must not be negative");
      return 0;
    }
    target->fd = fd;
    return 1;
  }
  if (type == napi_string) {
    size_t length;
    napi_get_value_string_utf8(env, value, target->path, sizeof target->path, &length);
    if (length >= sizeof target->path - 1) {
      throw_errno(env, ENAMETOOLONG, "xattr");
      return 0;
    }
    if (memchr(target->path, '\0', length) != NULL) {
      throw_errno(env, EINVAL, "xattr: a NUL byte in the path");
      return 0;
    }
    target->fd = -1;
    return 1;
  }
  throw_type(env, "the target must be a file descriptor or a path");
  return 0;
}

/* A string argument into `buffer`; false (exception pending) when too long or not a string. */
static int read_name(napi_env env, napi_value value, char *buffer, size_t size) {
  size_t length;
  if (napi_get_value_string_utf8(env, value, buffer, size, &length) != napi_ok) {
    throw_type(env, "an attribute name must be a string");
    return 0;
  }
  if (length >= size - 1) {
    throw_errno(env, ERANGE, "xattr name");
    return 0;
  }
  return 1;
}

/*
 * The arguments every call starts with, (target, name), into `target` and `name`; `argv` gets
 * `count` arguments. False, with an exception pending, when they are missing or unusable.
 */
static int read_call(napi_env env, napi_callback_info info, size_t count, napi_value *argv, const char *usage, struct target *target, char *name, size_t name_size) {
  size_t argc = count;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < count) {
    throw_type(env, usage);
    return 0;
  }
  return read_target(env, argv[0], target) && read_name(env, argv[1], name, name_size);
}

static ssize_t do_list(const struct target *t, char *names, size_t size) {
  return t->fd >= 0 ? flistxattr(t->fd, names, size) : llistxattr(t->path, names, size);
}

static ssize_t do_get(const struct target *t, const char *name, void *value, size_t size) {
  return t->fd >= 0 ? fgetxattr(t->fd, name, value, size) : lgetxattr(t->path, name, value, size);
}

static napi_value list(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  struct target target;
  char prefix[MAX_NAME];
  if (!read_call(env, info, 2, argv, "list(target, prefix)", &target, prefix, sizeof prefix)) return NULL;
  size_t prefix_length = strlen(prefix);

  napi_value result;
  napi_create_array(env, &result);
  /* The list may grow between the size query and the read: retry on ERANGE. */
  char *names = NULL;
  ssize_t length = 0;
  for (int attempt = 0; attempt < 4; attempt++) {
    length = do_list(&target, NULL, 0);
    if (length < 0) {
      if (errno == ENOTSUP) return result; /* a filesystem without xattrs has none */
      return throw_errno(env, errno, "listxattr");
    }
    if (length == 0) return result;
    free(names);
    names = malloc((size_t)length);
    if (!names) return throw_errno(env, ENOMEM, "listxattr");
    length = do_list(&target, names, (size_t)length);
    if (length >= 0 || errno != ERANGE) break;
  }
  if (length < 0) {
    int error = errno;
    free(names);
    return throw_errno(env, error, "listxattr");
  }

  static char value[MAX_VALUE];
  uint32_t index = 0;
  for (char *name = names; name < names + length; name += strlen(name) + 1) {
    if (strncmp(name, prefix, prefix_length) != 0) continue;
    ssize_t size = do_get(&target, name, value, sizeof value);
    if (size < 0) {
      if (errno == ENODATA) continue; /* removed since the list was read */
      int error = errno;
      free(names);
      return throw_errno(env, error, "getxattr");
    }
    napi_value pair, key, data;
    void *copy;
    napi_create_array_with_length(env, 2, &pair);
    napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &key);
    napi_create_buffer_copy(env, (size_t)size, value, &copy, &data);
    napi_set_element(env, pair, 0, key);
    napi_set_element(env, pair, 1, data);
    napi_set_element(env, result, index++, pair);
  }
  free(names);
  return result;
}

static napi_value set(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  struct target target;
  char name[MAX_NAME];
  if (!read_call(env, info, 3, argv, "set(target, name, value)", &target, name, sizeof name)) return NULL;
  bool is_buffer = false;
  napi_is_buffer(env, argv[2], &is_buffer);
  if (!is_buffer) return throw_type(env, "an attribute value must be a Buffer");
  void *data;
  size_t size;
  napi_get_buffer_info(env, argv[2], &data, &size);
  int rc = target.fd >= 0 ? fsetxattr(target.fd, name, data, size, 0) : lsetxattr(target.path, name, data, size, 0);
  if (rc != 0) return throw_errno(env, errno, "setxattr");
  return NULL;
}

static napi_value remove_attribute(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  struct target target;
  char name[MAX_NAME];
  if (!read_call(env, info, 2, argv, "remove(target, name)", &target, name, sizeof name)) return NULL;
  int rc = target.fd >= 0 ? fremovexattr(target.fd, name) : lremovexattr(target.path, name);
  if (rc != 0) return throw_errno(env, errno, "removexattr");
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
    {"list", NULL, list, NULL, NULL, NULL, napi_default, NULL},
    {"set", NULL, set, NULL, NULL, NULL, napi_default, NULL},
    {"remove", NULL, remove_attribute, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions);
  return exports;
}

NAPI_MODULE(cubicle_xattr, init)
