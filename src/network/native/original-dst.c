/*
 * The destination a redirected TCP connection was meant for (ORIGINAL_DST_NOTE in
 * src/network/egress/original-destination.ts): nftables' `redirect` rewrites the destination to
 * the egress proxy, and conntrack keeps the original, which getsockopt(SO_ORIGINAL_DST) reads
 * back. Node has no such call, hence this Node-API addon.
 *
 *   originalDestination(fd) -> { address: "198.51.100.7", port: 443 }
 *
 * Errors are thrown as Error objects whose `code` is the errno name (ENOENT: no conntrack entry,
 * EBADF, ...), like Node's own.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>
#include "../../shared/native/napi-errno.h"
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6/ip6_tables.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

static napi_value original_destination(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  napi_valuetype type = napi_undefined;
  if (argc >= 1) napi_typeof(env, argv[0], &type);
  if (type != napi_number) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "originalDestination(fd): fd must be a number");
    return NULL;
  }
  int32_t fd;
  napi_get_value_int32(env, argv[0], &fd);
  if (fd < 0) return throw_errno(env, EBADF, "originalDestination");

  struct sockaddr_storage local;
  socklen_t local_length = sizeof local;
  if (getsockname(fd, (struct sockaddr *)&local, &local_length) != 0) return throw_errno(env, errno, "getsockname");

  struct sockaddr_storage original;
  socklen_t length = sizeof original;
  memset(&original, 0, sizeof original);
  int rc = -1;
  if (local.ss_family == AF_INET6) {
    rc = getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, &original, &length);
    /* A dual-stack socket carrying IPv4 (::ffff:a.b.c.d) keeps its conntrack entry as IPv4. */
    if (rc != 0) {
      length = sizeof original;
      rc = getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &original, &length);
    }
  } else if (local.ss_family == AF_INET) {
    rc = getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &original, &length);
  } else {
    return throw_errno(env, EAFNOSUPPORT, "originalDestination");
  }
  if (rc != 0) return throw_errno(env, errno, "getsockopt(SO_ORIGINAL_DST)");

  char text[INET6_ADDRSTRLEN];
  uint16_t port;
  if (original.ss_family == AF_INET) {
    struct sockaddr_in *in = (struct sockaddr_in *)&original;
    inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
    port = ntohs(in->sin_port);
  } else if (original.ss_family == AF_INET6) {
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&original;
    inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
    port = ntohs(in6->sin6_port);
  } else {
    return throw_errno(env, EAFNOSUPPORT, "getsockopt(SO_ORIGINAL_DST)");
  }

  napi_value result, address, port_value;
  napi_create_object(env, &result);
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &address);
  napi_create_uint32(env, port, &port_value);
  napi_set_named_property(env, result, "address", address);
  napi_set_named_property(env, result, "port", port_value);
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
    {"originalDestination", NULL, original_destination, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions);
  return exports;
}

NAPI_MODULE(cubicle_original_dst, init)
