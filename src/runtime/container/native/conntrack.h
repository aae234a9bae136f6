/*
 * conntrack.h: the byte counts of sandboxes' UDP and ICMP flows, from the kernel's connection
 * tracking (FLOW_ACCOUNTING_NOTE in src/network/kernel-egress-log.ts). Included by
 * sandbox-helper.c after netlink.h (its fail(), usage(), option(), `step`, read_lines()).
 *
 *   flows --subnet A.B.C.D/N [--log-group N]
 *       Long-running, like watch. With --log-group, also the packets the nftables rules log to
 *       that NFLOG group (or the next free one), as nflog.h says. Turns on conntrack accounting (net.netfilter.nf_conntrack_acct
 *       in the host's namespace: flows that begin afterwards are counted) and prints one line
 *       per UDP or ICMP flow from the subnet that the kernel forgets (timed out, or deleted):
 *         udp SRC SPORT DST DPORT BYTES_OUT BYTES_IN
 *         icmp SRC ID DST TYPE BYTES_OUT BYTES_IN
 *       and `lost` when the kernel dropped events (the socket's buffer was full).
 *       Reads lines on stdin that end flows at once (a sandbox that is gone), so their counts
 *       come now, not after the kernel's timeout:
 *         del udp SRC SPORT DST DPORT
 *         del icmp SRC ID DST TYPE CODE
 *       A flow that is not there (gone already) is no error. Ends when stdin closes.
 */
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>

#define CT_ACCT_SYSCTL "/proc/sys/net/netfilter/nf_conntrack_acct"
/* Events arrive in bursts (a sandbox's flows time out together): room for many. */
#define CT_RCVBUF_BYTES (8 * 1024 * 1024)

struct ct_flow {
  uint8_t protocol;
  struct in_addr source, destination;
  /* UDP: ports; ICMP: the echo id, the type and code (host order). */
  uint16_t source_port, destination_port, icmp_id;
  uint8_t icmp_type, icmp_code;
  uint64_t bytes_out, bytes_in;
  int have_source, have_destination;
};

static int ct_socket(uint32_t group) {
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_NETFILTER);
  if (fd < 0) return -1;
  struct sockaddr_nl local = {.nl_family = AF_NETLINK};
  if (bind(fd, (struct sockaddr *)&local, sizeof local) != 0) return -1;
  if (group) {
    int size = CT_RCVBUF_BYTES;
    /* FORCE passes rmem_max (the helper runs as root); the plain option is the fallback. */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof group) != 0) return -1;
  }
  return fd;
}

/* The attributes of a nest, by type (NLA_F_NESTED and the byte-order flag masked off). */
static void ct_attrs(const struct rtattr *first, int length, const struct rtattr **table, int max) {
  for (int i = 0; i <= max; i++) table[i] = NULL;
  for (const struct rtattr *attr = first; RTA_OK(attr, length); attr = RTA_NEXT(attr, length)) {
    int type = attr->rta_type & NLA_TYPE_MASK;
    if (type <= max) table[type] = attr;
  }
}

#define CT_NEST(attr) ((const struct rtattr *)RTA_DATA(attr)), ((int)RTA_PAYLOAD(attr))

static uint8_t ct_u8(const struct rtattr *attr) { return attr && RTA_PAYLOAD(attr) >= 1 ? *(const uint8_t *)RTA_DATA(attr) : 0; }

static uint16_t ct_be16(const struct rtattr *attr) {
  uint16_t value = 0;
  if (attr && RTA_PAYLOAD(attr) >= 2) memcpy(&value, RTA_DATA(attr), 2);
  return ntohs(value);
}

static uint64_t ct_be64(const struct rtattr *attr) {
  uint64_t value = 0;
  if (attr && RTA_PAYLOAD(attr) >= 8) memcpy(&value, RTA_DATA(attr), 8);
  return be64toh(value);
}

static uint64_t ct_counter_bytes(const struct rtattr *counters) {
  if (!counters) return 0;
  const struct rtattr *table[CTA_COUNTERS_MAX + 1];
  ct_attrs(CT_NEST(counters), table, CTA_COUNTERS_MAX);
  return ct_be64(table[CTA_COUNTERS_BYTES]);
}

/* A destroy event's original tuple and counters; 0 when it is not an IPv4 flow we can name. */
static int ct_parse(const struct nlmsghdr *message, struct ct_flow *flow) {
  memset(flow, 0, sizeof *flow);
  size_t header = NLMSG_LENGTH(sizeof(struct nfgenmsg));
  if (message->nlmsg_len < header) return 0;
  const struct nfgenmsg *generic = NLMSG_DATA(message);
  if (generic->nfgen_family != AF_INET) return 0;
  const struct rtattr *top[CTA_MAX + 1];
  ct_attrs((const struct rtattr *)((const char *)message + NLMSG_ALIGN(header)), (int)(message->nlmsg_len - NLMSG_ALIGN(header)), top, CTA_MAX);
  if (!top[CTA_TUPLE_ORIG]) return 0;
  const struct rtattr *tuple[CTA_TUPLE_MAX + 1];
  ct_attrs(CT_NEST(top[CTA_TUPLE_ORIG]), tuple, CTA_TUPLE_MAX);
  if (!tuple[CTA_TUPLE_IP] || !tuple[CTA_TUPLE_PROTO]) return 0;
  const struct rtattr *ip[CTA_IP_MAX + 1];
  ct_attrs(CT_NEST(tuple[CTA_TUPLE_IP]), ip, CTA_IP_MAX);
  if (!ip[CTA_IP_V4_SRC] || !ip[CTA_IP_V4_DST] || RTA_PAYLOAD(ip[CTA_IP_V4_SRC]) < 4 || RTA_PAYLOAD(ip[CTA_IP_V4_DST]) < 4) return 0;
  memcpy(&flow->source, RTA_DATA(ip[CTA_IP_V4_SRC]), 4);
  memcpy(&flow->destination, RTA_DATA(ip[CTA_IP_V4_DST]), 4);
  const struct rtattr *proto[CTA_PROTO_MAX + 1];
  ct_attrs(CT_NEST(tuple[CTA_TUPLE_PROTO]), proto, CTA_PROTO_MAX);
  flow->protocol = ct_u8(proto[CTA_PROTO_NUM]);
  flow->source_port = ct_be16(proto[CTA_PROTO_SRC_PORT]);
  flow->destination_port = ct_be16(proto[CTA_PROTO_DST_PORT]);
  flow->icmp_id = ct_be16(proto[CTA_PROTO_ICMP_ID]);
  flow->icmp_type = ct_u8(proto[CTA_PROTO_ICMP_TYPE]);
  flow->bytes_out = ct_counter_bytes(top[CTA_COUNTERS_ORIG]);
  flow->bytes_in = ct_counter_bytes(top[CTA_COUNTERS_REPLY]);
  return flow->protocol == IPPROTO_UDP || flow->protocol == IPPROTO_ICMP;
}

static void ct_print(const struct ct_flow *flow) {
  char source[INET_ADDRSTRLEN], destination[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &flow->source, source, sizeof source);
  inet_ntop(AF_INET, &flow->destination, destination, sizeof destination);
  if (flow->protocol == IPPROTO_UDP)
    printf("udp %s %u %s %u %llu %llu\n", source, flow->source_port, destination, flow->destination_port, (unsigned long long)flow->bytes_out, (unsigned long long)flow->bytes_in);
  else
    printf("icmp %s %u %s %u %llu %llu\n", source, flow->icmp_id, destination, flow->icmp_type, (unsigned long long)flow->bytes_out, (unsigned long long)flow->bytes_in);
}

/* Sends a delete of one flow by its original tuple; the kernel's answer is read and dropped later. */
static void ct_delete(int fd, const char *line) {
  char protocol[8], source[INET_ADDRSTRLEN], destination[INET_ADDRSTRLEN];
  unsigned a, b, c = 0;
  int fields = sscanf(line, "del %7s %15s %u %15s %u %u", protocol, source, &a, destination, &b, &c);
  struct in_addr from, to;
  if (fields < 5 || inet_pton(AF_INET, source, &from) != 1 || inet_pton(AF_INET, destination, &to) != 1 || a > 65535 || b > 65535 || c > 255) return;
  int udp = strcmp(protocol, "udp") == 0;
  if (!udp && (strcmp(protocol, "icmp") != 0 || b > 255)) return;
  struct net_request request;
  struct nfgenmsg generic = {.nfgen_family = AF_INET, .version = NFNETLINK_V0};
  net_request_init(&request, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, NLM_F_ACK, &generic, sizeof generic);
  struct rtattr *tuple = net_nest(&request, CTA_TUPLE_ORIG | NLA_F_NESTED);
  struct rtattr *ip = net_nest(&request, CTA_TUPLE_IP | NLA_F_NESTED);
  net_attr(&request, CTA_IP_V4_SRC, &from, 4);
  net_attr(&request, CTA_IP_V4_DST, &to, 4);
  net_nest_end(&request, ip);
  struct rtattr *proto = net_nest(&request, CTA_TUPLE_PROTO | NLA_F_NESTED);
  uint8_t number = udp ? IPPROTO_UDP : IPPROTO_ICMP;
  net_attr(&request, CTA_PROTO_NUM, &number, 1);
  if (udp) {
    uint16_t ports[2] = {htons((uint16_t)a), htons((uint16_t)b)};
    net_attr(&request, CTA_PROTO_SRC_PORT, &ports[0], 2);
    net_attr(&request, CTA_PROTO_DST_PORT, &ports[1], 2);
  } else {
    uint16_t id = htons((uint16_t)a);
    uint8_t type = (uint8_t)b, code = (uint8_t)c;
    net_attr(&request, CTA_PROTO_ICMP_ID, &id, 2);
    net_attr(&request, CTA_PROTO_ICMP_TYPE, &type, 1);
    net_attr(&request, CTA_PROTO_ICMP_CODE, &code, 1);
  }
  net_nest_end(&request, proto);
  net_nest_end(&request, tuple);
  struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
  sendto(fd, &request, request.header.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel);
}

static void ct_delete_line(char *line, void *context) { ct_delete(*(int *)context, line); }

/* The NFLOG half of `flows` (uses ct_socket's buffer size and ct_attrs). */
#include "nflog.h"

static int cmd_flows(int argc, char **argv) {
  step = "flows";
  static const char *const known[] = {"--subnet", "--log-group", NULL};
  net_only_options(argc, argv, known);
  char subnet_text[32];
  snprintf(subnet_text, sizeof subnet_text, "%s", option(argc, argv, "--subnet", 1));
  char *slash = strchr(subnet_text, '/');
  struct in_addr subnet;
  int prefix = slash ? atoi(slash + 1) : -1;
  if (slash) *slash = 0;
  if (!slash || prefix < 0 || prefix > 32 || inet_pton(AF_INET, subnet_text, &subnet) != 1) usage("--subnet must be A.B.C.D/N");
  uint32_t mask = prefix == 0 ? 0 : htonl(~0u << (32 - prefix));

  /* Checked before anything is changed or opened. */
  const char *log_group = option(argc, argv, "--log-group", 0);
  unsigned long long first = log_group ? number(log_group, "--log-group") : 0;
  if (log_group && (first < 1 || first > 65535)) usage("--log-group must be 1-65535");
  if (net_write_sysctl(CT_ACCT_SYSCTL, "1") != 0) fail("turning on conntrack accounting");
  int events = ct_socket(NFNLGRP_CONNTRACK_DESTROY);
  if (events < 0) fail("subscribing to conntrack events");
  int control = ct_socket(0);
  if (control < 0) fail("opening a conntrack socket");
  setvbuf(stdout, NULL, _IOLBF, 0);
  int logged = -1;
  if (log_group) {
    uint16_t group;
    step = "binding an NFLOG group";
    logged = nflog_socket((uint16_t)first, &group);
    if (logged < 0) fail("binding an NFLOG group");
    printf("group %u\n", group);
  }
  long long window_end = nflog_now_ms() + NFLOG_WINDOW_MS;

  static struct line_reader lines;
  static char buffer[65536] __attribute__((aligned(NLMSG_ALIGNTO)));
  struct pollfd watched[4] = {{.fd = 0, .events = POLLIN}, {.fd = events, .events = POLLIN}, {.fd = control, .events = POLLIN}, {.fd = logged, .events = POLLIN}};
  for (;;) {
    long long left_ms = window_end - nflog_now_ms();
    int ready = poll(watched, logged >= 0 ? 4 : 3, logged >= 0 ? (int)(left_ms > 0 ? left_ms : 0) : -1);
    if (ready < 0) {
      if (errno == EINTR) continue;
      fail("poll");
    }
    if (logged >= 0 && watched[3].revents) nflog_read(logged, subnet.s_addr, mask);
    if (logged >= 0 && nflog_now_ms() >= window_end) {
      nflog_flush();
      window_end = nflog_now_ms() + NFLOG_WINDOW_MS;
    }
    if (watched[0].revents && !read_lines(0, &lines, ct_delete_line, &control)) return 0;
    if (watched[2].revents) {
      /* Answers to deletes: nothing to do with them (a flow gone already is fine). */
      while (recv(control, buffer, sizeof buffer, MSG_DONTWAIT) > 0) {
      }
    }
    if (watched[1].revents) {
      for (;;) {
        ssize_t got = recv(events, buffer, sizeof buffer, MSG_DONTWAIT);
        if (got < 0) {
          if (errno == ENOBUFS) {
            printf("lost\n");
            continue;
          }
          if (errno == EINTR) continue;
          break;
        }
        int left = (int)got;
        for (const struct nlmsghdr *message = (const struct nlmsghdr *)buffer; NLMSG_OK(message, left); message = NLMSG_NEXT(message, left)) {
          struct ct_flow flow;
          if (!ct_parse(message, &flow)) continue;
          if ((flow.source.s_addr & mask) != (subnet.s_addr & mask)) continue;
          ct_print(&flow);
        }
      }
    }
  }
}
