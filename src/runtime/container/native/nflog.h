/*
 * nflog.h: the first packets of sandboxes' UDP, ICMP and floor-dropped flows as the nftables
 * rules log them to an NFLOG group (KERNEL_LOG_NOTE in src/network/nft-ruleset.ts), for the
 * egress audit. Included by sandbox-helper.c after conntrack.h (its ct_socket(), ct_attrs()),
 * and used by `flows --log-group N`:
 *
 *   Binds the first free group from N on (another server on this host may hold N) and prints
 *   `group G` once. Then, for each logged packet from the subnet, a line:
 *     log L udp SRC SPORT DST DPORT BYTES COUNT
 *     log L tcp SRC SPORT DST DPORT BYTES COUNT
 *     log L icmp SRC ID DST TYPE CODE BYTES COUNT
 *   L is the rule's prefix letter (its verdict; lowercase: the first packet past the log's rate
 *   limit in a second, KERNEL_LOG_NOTE); BYTES the IP length. A denied packet (L not A)
 *   to the same destination, protocol and port (ICMP: type) as one already seen in the same
 *   second is folded into that line: COUNT packets, BYTES their sum, printed when the second
 *   ends, so a flood against one destination is one line a second, not one a packet. Allowed
 *   packets are each a new flow (their conntrack entry is new) and are printed at once.
 *   `lost-log` when the kernel dropped log messages (the socket's buffer was full).
 */
#include <linux/netfilter/nfnetlink_log.h>
#include <netinet/ip.h>
#include <time.h>

/* An IPv4 header with options (60) and the first 8 bytes of UDP, TCP or ICMP are all we read. */
#define NFLOG_COPY_BYTES 68
/* Groups tried from the first one asked for. */
#define NFLOG_GROUP_TRIES 256
#define NFLOG_FOLD_SLOTS 4096
#define NFLOG_WINDOW_MS 1000

struct nflog_packet {
  char letter;
  uint8_t protocol;
  struct in_addr source, destination;
  /* UDP/TCP: ports; ICMP: the echo id as `source_port`, type and code. */
  uint16_t source_port, destination_port;
  uint8_t icmp_type, icmp_code;
  uint64_t bytes, count;
};

static struct nflog_packet nflog_folded[NFLOG_FOLD_SLOTS];
static int nflog_folded_used[NFLOG_FOLD_SLOTS];
static int nflog_folded_count;

static long long nflog_now_ms(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

/* Sends one NFULNL_MSG_CONFIG for `group` and waits for its ack; -1 with errno on a refusal. */
static int nflog_config(int fd, uint16_t group, int attribute, const void *data, size_t length) {
  struct net_request request;
  struct nfgenmsg generic = {.nfgen_family = AF_UNSPEC, .version = NFNETLINK_V0, .res_id = htons(group)};
  net_request_init(&request, (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, 0, &generic, sizeof generic);
  net_attr(&request, attribute, data, length);
  return net_talk(fd, &request, NULL, NULL);
}

/* A socket bound to the first free group from `first`; its number in *bound. -1 when none. */
static int nflog_socket(uint16_t first, uint16_t *bound) {
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
  if (fd < 0) return -1;
  struct sockaddr_nl local = {.nl_family = AF_NETLINK};
  struct timeval timeout = {.tv_sec = NET_TIMEOUT_SEC};
  int size = CT_RCVBUF_BYTES;
  if (bind(fd, (struct sockaddr *)&local, sizeof local) != 0 || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) != 0) return -1;
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  struct nfulnl_msg_config_cmd bind_command = {.command = NFULNL_CFG_CMD_BIND};
  for (int i = 0; i < NFLOG_GROUP_TRIES; i++) {
    uint16_t group = (uint16_t)(first + i);
    if (group == 0) continue;
    if (nflog_config(fd, group, NFULA_CFG_CMD, &bind_command, sizeof bind_command) != 0) {
      /* EPERM: another socket holds the group (also what a caller without CAP_NET_ADMIN gets). */
      if (errno == EBUSY || errno == EPERM) continue;
      return -1;
    }
    struct nfulnl_msg_config_mode mode = {.copy_range = htonl(NFLOG_COPY_BYTES), .copy_mode = NFULNL_COPY_PACKET};
    /* Messages are sent in batches of up to 32 or after 10 ms, not one datagram per packet. */
    uint32_t threshold = htonl(32), wait = htonl(1);
    if (nflog_config(fd, group, NFULA_CFG_MODE, &mode, sizeof mode) != 0 || nflog_config(fd, group, NFULA_CFG_QTHRESH, &threshold, sizeof threshold) != 0 ||
        nflog_config(fd, group, NFULA_CFG_TIMEOUT, &wait, sizeof wait) != 0)
      return -1;
    *bound = group;
    return fd;
  }
  return -1;
}

/* A logged packet's prefix letter and headers; 0 when it is not an IPv4 packet we can name. */
static int nflog_parse(const struct nlmsghdr *message, struct nflog_packet *packet) {
  memset(packet, 0, sizeof *packet);
  if (message->nlmsg_type != ((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)) return 0;
  size_t header = NLMSG_LENGTH(sizeof(struct nfgenmsg));
  if (message->nlmsg_len < header) return 0;
  const struct rtattr *attrs[NFULA_MAX + 1];
  ct_attrs((const struct rtattr *)((const char *)message + NLMSG_ALIGN(header)), (int)(message->nlmsg_len - NLMSG_ALIGN(header)), attrs, NFULA_MAX);
  const struct rtattr *prefix = attrs[NFULA_PREFIX], *payload = attrs[NFULA_PAYLOAD];
  if (!prefix || !payload || RTA_PAYLOAD(prefix) < 1) return 0;
  packet->letter = *(const char *)RTA_DATA(prefix);
  if (!isalpha((unsigned char)packet->letter)) return 0;
  const uint8_t *bytes = RTA_DATA(payload);
  size_t length = RTA_PAYLOAD(payload);
  if (length < sizeof(struct iphdr)) return 0;
  struct iphdr ip;
  memcpy(&ip, bytes, sizeof ip);
  size_t ip_length = (size_t)ip.ihl * 4;
  if (ip.version != 4 || ip_length < sizeof ip) return 0;
  packet->protocol = ip.protocol;
  packet->source.s_addr = ip.saddr;
  packet->destination.s_addr = ip.daddr;
  packet->bytes = ntohs(ip.tot_len);
  packet->count = 1;
  /* Conntrack reassembles before the rules see a packet; a fragment here is not a flow's first. */
  if ((ntohs(ip.frag_off) & IP_OFFMASK) != 0 || length < ip_length + 8) return 0;
  const uint8_t *transport = bytes + ip_length;
  if (packet->protocol == IPPROTO_UDP || packet->protocol == IPPROTO_TCP) {
    packet->source_port = (uint16_t)(transport[0] << 8 | transport[1]);
    packet->destination_port = (uint16_t)(transport[2] << 8 | transport[3]);
    return 1;
  }
  if (packet->protocol == IPPROTO_ICMP) {
    packet->icmp_type = transport[0];
    packet->icmp_code = transport[1];
    packet->source_port = (uint16_t)(transport[4] << 8 | transport[5]);
    return 1;
  }
  return 0;
}

static void nflog_print(const struct nflog_packet *packet) {
  char source[INET_ADDRSTRLEN], destination[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &packet->source, source, sizeof source);
  inet_ntop(AF_INET, &packet->destination, destination, sizeof destination);
  if (packet->protocol == IPPROTO_ICMP)
    printf("log %c icmp %s %u %s %u %u %llu %llu\n", packet->letter, source, packet->source_port, destination, packet->icmp_type, packet->icmp_code, (unsigned long long)packet->bytes, (unsigned long long)packet->count);
  else
    printf("log %c %s %s %u %s %u %llu %llu\n", packet->letter, packet->protocol == IPPROTO_UDP ? "udp" : "tcp", source, packet->source_port, destination, packet->destination_port, (unsigned long long)packet->bytes,
           (unsigned long long)packet->count);
}

static int nflog_same_target(const struct nflog_packet *a, const struct nflog_packet *b) {
  return a->letter == b->letter && a->protocol == b->protocol && a->source.s_addr == b->source.s_addr && a->destination.s_addr == b->destination.s_addr &&
         (a->protocol == IPPROTO_ICMP ? a->icmp_type == b->icmp_type && a->icmp_code == b->icmp_code : a->destination_port == b->destination_port);
}

/* Folds a denied packet into this second's line for its target, or prints it when the table is full. */
static void nflog_fold(const struct nflog_packet *packet) {
  uint32_t hash = packet->source.s_addr * 2654435761u ^ packet->destination.s_addr * 40503u ^ (uint32_t)packet->destination_port * 97u ^ (uint32_t)packet->icmp_type ^ (uint32_t)packet->letter << 24 ^ packet->protocol;
  for (int probe = 0; probe < 8; probe++) {
    int slot = (int)((hash + (uint32_t)probe) % NFLOG_FOLD_SLOTS);
    if (!nflog_folded_used[slot]) {
      nflog_folded[slot] = *packet;
      nflog_folded_used[slot] = 1;
      nflog_folded_count++;
      return;
    }
    if (nflog_same_target(&nflog_folded[slot], packet)) {
      nflog_folded[slot].bytes += packet->bytes;
      nflog_folded[slot].count++;
      return;
    }
  }
  nflog_print(packet);
}

/* Prints and forgets this second's folded lines. */
static void nflog_flush(void) {
  if (nflog_folded_count == 0) return;
  for (int slot = 0; slot < NFLOG_FOLD_SLOTS; slot++) {
    if (!nflog_folded_used[slot]) continue;
    nflog_print(&nflog_folded[slot]);
    nflog_folded_used[slot] = 0;
  }
  nflog_folded_count = 0;
}

/* Reads what the socket holds (non-blocking) and prints or folds each packet of the subnet. */
static void nflog_read(int fd, uint32_t subnet, uint32_t mask) {
  static char buffer[65536] __attribute__((aligned(NLMSG_ALIGNTO)));
  for (;;) {
    ssize_t got = recv(fd, buffer, sizeof buffer, MSG_DONTWAIT);
    if (got < 0) {
      if (errno == ENOBUFS) {
        printf("lost-log\n");
        continue;
      }
      if (errno == EINTR) continue;
      return;
    }
    int left = (int)got;
    for (const struct nlmsghdr *message = (const struct nlmsghdr *)buffer; NLMSG_OK(message, left); message = NLMSG_NEXT(message, left)) {
      struct nflog_packet packet;
      if (!nflog_parse(message, &packet)) continue;
      if ((packet.source.s_addr & mask) != (subnet & mask)) continue;
      if (packet.letter == 'A') nflog_print(&packet);
      else nflog_fold(&packet);
    }
  }
}
