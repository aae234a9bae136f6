/*
 * nftables.h: per-sandbox nftables changes as one nf_tables netlink batch from the helper,
 * instead of a transaction through `nft` (NFT_NETLINK_NOTE in src/network/nft-netlink.ts).
 * Included by sandbox-helper.c after netlink.h (its fail(), usage(), option(), `step`).
 *
 *   nft-batch --family inet|ip --table TABLE --ops OPS
 *       Applies OPS, `;`-separated, as one atomic transaction: all of it or nothing.
 *         chain NAME                      add a regular chain (no error if it exists)
 *         set NAME interval|timeout       add an ipv4_addr set with that flag (idem)
 *         flush-chain NAME                delete the chain's rules
 *         rule CHAIN SET TARGET           append `ip daddr @SET goto TARGET`
 *         rule CHAIN - TARGET             append `goto TARGET`
 *         rule-jump CHAIN SET TARGET      append `ip daddr @SET jump TARGET` (TARGET returns)
 *         map-add MAP ADDR TARGET         add `ADDR : goto TARGET` to an ipv4_addr : verdict map
 *         map-del MAP ADDR                delete ADDR from the map
 *         del-chain NAME | del-set NAME   delete the chain or set
 *         flush-set NAME                  delete every element of the set
 *         add SET ELEM[,ELEM...]          add elements; ELEM is a.b.c.d, then `!` for an
 *                                         interval end and/or `@MS` for a timeout in ms
 *   Names are 1-64 letters, digits or _. At most NFT_OPS_MAX operations and NFT_ELEMENTS_MAX
 *   elements per call. On a refusal the kernel's error (and its extended-ack text) is printed
 *   and nothing of the batch is applied. `serve` runs it in its own process, not in a child
 *   (INLINE_NOTE): it keeps only its netlink socket (NFT_SOCKET_NOTE), prints nothing on
 *   stdout, and only waits for the kernel.
 */
#include <endian.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>

#define NFT_NAME_MAX 64
#define NFT_OPS_MAX 256
#define NFT_ELEMENTS_MAX 8192
/* ipv4_addr's nftables datatype number (TYPE_IPADDR in nft's datatype.h). */
#define NFT_TYPE_IPADDR 7

struct nft_batch {
  char *data;
  size_t length, capacity;
  uint32_t first_sequence, next_sequence;
  int family;
  const char *table;
  uint32_t set_ids;
};

static void *nft_put(struct nft_batch *batch, size_t length) {
  size_t aligned = NLMSG_ALIGN(length);
  if (batch->length + aligned > batch->capacity) usage("nft-batch: the operations do not fit in one batch");
  void *at = batch->data + batch->length;
  memset(at, 0, aligned);
  batch->length += aligned;
  return at;
}

/* Starts a message; its length is fixed by nft_end(). Returns its offset. */
static size_t nft_begin(struct nft_batch *batch, uint16_t type, uint16_t flags, int family, uint16_t resource) {
  size_t offset = batch->length;
  struct nlmsghdr *header = nft_put(batch, NLMSG_HDRLEN);
  header->nlmsg_type = type;
  header->nlmsg_flags = (uint16_t)(NLM_F_REQUEST | flags);
  header->nlmsg_seq = batch->next_sequence++;
  struct nfgenmsg *body = nft_put(batch, sizeof(struct nfgenmsg));
  body->nfgen_family = (uint8_t)family;
  body->version = NFNETLINK_V0;
  body->res_id = htons(resource);
  return offset;
}

static void nft_end(struct nft_batch *batch, size_t offset) {
  ((struct nlmsghdr *)(batch->data + offset))->nlmsg_len = (uint32_t)(batch->length - offset);
}

static size_t nft_attr(struct nft_batch *batch, uint16_t type, const void *data, size_t length) {
  size_t offset = batch->length;
  struct nlattr *attr = nft_put(batch, NLA_HDRLEN + length);
  attr->nla_type = type;
  attr->nla_len = (uint16_t)(NLA_HDRLEN + length);
  if (length) memcpy((char *)attr + NLA_HDRLEN, data, length);
  return offset;
}

static void nft_string(struct nft_batch *batch, uint16_t type, const char *text) { nft_attr(batch, type, text, strlen(text) + 1); }

static void nft_u32(struct nft_batch *batch, uint16_t type, uint32_t value) {
  uint32_t big = htonl(value);
  nft_attr(batch, type, &big, sizeof big);
}

static size_t nft_nest(struct nft_batch *batch, uint16_t type) { return nft_attr(batch, (uint16_t)(type | NLA_F_NESTED), NULL, 0); }

static void nft_nest_end(struct nft_batch *batch, size_t offset) {
  size_t length = batch->length - offset;
  if (length > 0xffff) usage("nft-batch: too many elements in one operation");
  ((struct nlattr *)(batch->data + offset))->nla_len = (uint16_t)length;
}

/* A message about `table` in the batch's family, with the table attribute already in. */
static size_t nft_message(struct nft_batch *batch, int type, uint16_t flags, uint16_t table_attr) {
  size_t offset = nft_begin(batch, (uint16_t)((NFNL_SUBSYS_NFTABLES << 8) | type), (uint16_t)(flags | NLM_F_ACK), batch->family, 0);
  nft_string(batch, table_attr, batch->table);
  return offset;
}

static const char *nft_name(const char *text, const char *what) {
  size_t length = strlen(text);
  int ok = length > 0 && length <= NFT_NAME_MAX;
  for (size_t i = 0; ok && i < length; i++) ok = isalnum((unsigned char)text[i]) || text[i] == '_';
  if (!ok) {
    fprintf(stderr, "sandbox-helper: nft-batch: %s must be 1-%d letters, digits or _\n", what, NFT_NAME_MAX);
    leave(2);
  }
  return text;
}

static uint32_t nft_ipv4(const char *text) {
  struct in_addr address;
  if (inet_pton(AF_INET, text, &address) != 1) {
    fprintf(stderr, "sandbox-helper: nft-batch: %s is not an IPv4 address\n", text);
    leave(2);
  }
  return address.s_addr;
}

/* NFTA_DATA_VALUE (a key) or NFTA_DATA_VERDICT (a goto) inside a nest of type `type`. */
static void nft_key(struct nft_batch *batch, uint16_t type, uint32_t address) {
  size_t nest = nft_nest(batch, type);
  nft_attr(batch, NFTA_DATA_VALUE, &address, sizeof address);
  nft_nest_end(batch, nest);
}

/* A verdict to `chain`: NFT_GOTO, or NFT_JUMP (the chain returns to the rule after it). */
static void nft_to_chain(struct nft_batch *batch, uint16_t type, int code, const char *chain) {
  size_t nest = nft_nest(batch, type);
  size_t verdict = nft_nest(batch, NFTA_DATA_VERDICT);
  nft_u32(batch, NFTA_VERDICT_CODE, (uint32_t)code);
  nft_string(batch, NFTA_VERDICT_CHAIN, chain);
  nft_nest_end(batch, verdict);
  nft_nest_end(batch, nest);
}

/* One expression of a rule: NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { ... } }. */
struct nft_expr {
  size_t element, data;
};

static struct nft_expr nft_expr_begin(struct nft_batch *batch, const char *name) {
  struct nft_expr expr = {.element = nft_nest(batch, NFTA_LIST_ELEM)};
  nft_string(batch, NFTA_EXPR_NAME, name);
  expr.data = nft_nest(batch, NFTA_EXPR_DATA);
  return expr;
}

static void nft_expr_end(struct nft_batch *batch, struct nft_expr expr) {
  nft_nest_end(batch, expr.data);
  nft_nest_end(batch, expr.element);
}

static void nft_goto(struct nft_batch *batch, uint16_t type, const char *chain) { nft_to_chain(batch, type, NFT_GOTO, chain); }

/* `ip daddr @set goto|jump target` as nft writes it for an inet table: nfproto check first. */
static void nft_rule(struct nft_batch *batch, const char *chain, const char *set, const char *target, int code) {
  size_t message = nft_message(batch, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, NFTA_RULE_TABLE);
  nft_string(batch, NFTA_RULE_CHAIN, chain);
  size_t expressions = nft_nest(batch, NFTA_RULE_EXPRESSIONS);
  if (set) {
    struct nft_expr expr;
    if (batch->family == NFPROTO_INET) {
      expr = nft_expr_begin(batch, "meta");
      nft_u32(batch, NFTA_META_KEY, NFT_META_NFPROTO);
      nft_u32(batch, NFTA_META_DREG, NFT_REG_1);
      nft_expr_end(batch, expr);
      expr = nft_expr_begin(batch, "cmp");
      nft_u32(batch, NFTA_CMP_SREG, NFT_REG_1);
      nft_u32(batch, NFTA_CMP_OP, NFT_CMP_EQ);
      uint8_t ipv4 = NFPROTO_IPV4;
      size_t value = nft_nest(batch, NFTA_CMP_DATA);
      nft_attr(batch, NFTA_DATA_VALUE, &ipv4, sizeof ipv4);
      nft_nest_end(batch, value);
      nft_expr_end(batch, expr);
    }
    expr = nft_expr_begin(batch, "payload");
    nft_u32(batch, NFTA_PAYLOAD_DREG, NFT_REG_1);
    nft_u32(batch, NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
    nft_u32(batch, NFTA_PAYLOAD_OFFSET, 16); /* struct iphdr's daddr */
    nft_u32(batch, NFTA_PAYLOAD_LEN, 4);
    nft_expr_end(batch, expr);
    expr = nft_expr_begin(batch, "lookup");
    nft_string(batch, NFTA_LOOKUP_SET, set);
    nft_u32(batch, NFTA_LOOKUP_SREG, NFT_REG_1);
    nft_expr_end(batch, expr);
  }
  struct nft_expr verdict = nft_expr_begin(batch, "immediate");
  nft_u32(batch, NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
  nft_to_chain(batch, NFTA_IMMEDIATE_DATA, code, target);
  nft_expr_end(batch, verdict);
  nft_nest_end(batch, expressions);
  nft_end(batch, message);
}

/* `add SET a.b.c.d[!][@MS],...`: the elements, each with its flags and timeout. */
static void nft_elements(struct nft_batch *batch, const char *set, char *list, unsigned *element_count) {
  size_t message = nft_message(batch, NFT_MSG_NEWSETELEM, NLM_F_CREATE, NFTA_SET_ELEM_LIST_TABLE);
  nft_string(batch, NFTA_SET_ELEM_LIST_SET, set);
  size_t elements = nft_nest(batch, NFTA_SET_ELEM_LIST_ELEMENTS);
  char *saved = NULL;
  for (char *item = strtok_r(list, ",", &saved); item; item = strtok_r(NULL, ",", &saved)) {
    if (++*element_count > NFT_ELEMENTS_MAX) usage("nft-batch: too many elements");
    unsigned long long timeout = 0;
    char *at = strchr(item, '@');
    if (at) {
      *at = 0;
      timeout = number(at + 1, "an element's timeout");
      if (timeout == 0 || timeout > 86400000ull) usage("nft-batch: an element's timeout must be 1-86400000 ms");
    }
    int end = 0;
    size_t length = strlen(item);
    if (length > 0 && item[length - 1] == '!') {
      item[length - 1] = 0;
      end = 1;
    }
    size_t element = nft_nest(batch, NFTA_LIST_ELEM);
    nft_key(batch, NFTA_SET_ELEM_KEY, nft_ipv4(item));
    if (end) nft_u32(batch, NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
    if (timeout) {
      uint64_t big = htobe64(timeout);
      nft_attr(batch, NFTA_SET_ELEM_TIMEOUT, &big, sizeof big);
    }
    nft_nest_end(batch, element);
  }
  nft_nest_end(batch, elements);
  nft_end(batch, message);
}

/*
 * NFT_SOCKET_NOTE: `serve` keeps its nf_tables socket open from batch to batch. Closing a
 * NETLINK_NETFILTER socket makes nf_tables (its NETLINK_URELEASE notifier, for tables a socket
 * owns) wait for the transaction cleanup the last commit queued, and a commit that deleted
 * anything (a flushed set, a removed chain) queues one behind an RCU grace period: the close of
 * an updateNetwork's or a release's batch took 10-17 ms on this project's machines, against
 * ~0.4 ms for the batch itself. Replies are matched by sequence number (one counter for the
 * process, so a stale reply never matches a later batch); a socket that failed or reported an
 * error is closed and the next batch opens another.
 */
static int nft_fd = -1;
static uint32_t nft_sequence;

static void nft_drop_socket(void) {
  if (nft_fd < 0) return;
  int saved = errno;
  close(nft_fd);
  nft_fd = -1;
  errno = saved;
}

static int nft_socket(void) {
  if (nft_fd >= 0) return nft_fd;
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
  if (fd < 0) return -1;
  nft_fd = fd;
  struct timeval timeout = {.tv_sec = NET_TIMEOUT_SEC};
  int one = 1, size = (4 << 20) + 4096;
  struct sockaddr_nl local = {.nl_family = AF_NETLINK};
  if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) != 0 || bind(fd, (struct sockaddr *)&local, sizeof local) != 0) {
    nft_drop_socket();
    return -1;
  }
  setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size);
  setsockopt(fd, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);
  setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
  return fd;
}

/* Sends the batch and reads one answer per message; returns 0 or the first error (errno). */
static int nft_send(struct nft_batch *batch) {
  int fd = nft_socket();
  if (fd < 0) return -1;
  struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
  if (sendto(fd, batch->data, batch->length, 0, (struct sockaddr *)&kernel, sizeof kernel) != (ssize_t)batch->length) goto failed;
  /* Messages first_sequence+1 .. next_sequence-2 asked for an ack (not the batch's begin and end). */
  uint32_t last = batch->next_sequence - 2;
  int error = 0;
  static char buffer[65536] __attribute__((aligned(NLMSG_ALIGNTO)));
  for (;;) {
    ssize_t got = net_receive(fd, buffer, sizeof buffer);
    if (got < 0) goto failed;
    int left = (int)got;
    for (struct nlmsghdr *message = (struct nlmsghdr *)buffer; NLMSG_OK(message, left); message = NLMSG_NEXT(message, left)) {
      if (message->nlmsg_type != NLMSG_ERROR) continue;
      /* Not this batch's (the sequence counter only grows): an answer left over from before. */
      if (message->nlmsg_seq - batch->first_sequence > last - batch->first_sequence) continue;
      if (message->nlmsg_len < NLMSG_LENGTH(sizeof(struct nlmsgerr))) {
        errno = EPROTO;
        goto failed;
      }
      const struct nlmsgerr *answer = NLMSG_DATA(message);
      if (answer->error != 0) {
        net_report_ext_ack(message);
        if (!error) error = -answer->error;
      }
      /* An error about the batch as a whole (its begin) is the last word. */
      if (message->nlmsg_seq == last || message->nlmsg_seq == batch->first_sequence) {
        /* After a refusal, answers of the rest of the batch may still come: start afresh. */
        if (error) nft_drop_socket();
        errno = error;
        return error ? -1 : 0;
      }
    }
  }
failed:
  nft_drop_socket();
  return -1;
}

static int cmd_nft_batch(int argc, char **argv) {
  static const char *const known[] = {"--family", "--table", "--ops", NULL};
  step = "nft-batch";
  net_only_options(argc, argv, known);
  const char *family_name = option(argc, argv, "--family", 1);
  int family = strcmp(family_name, "inet") == 0 ? NFPROTO_INET : strcmp(family_name, "ip") == 0 ? NFPROTO_IPV4 : -1;
  if (family < 0) usage("nft-batch: --family must be inet or ip");
  const char *table = nft_name(option(argc, argv, "--table", 1), "--table");
  /* Split in place: the argument is this call's own (argv, or the serve loop's request line). */
  char *ops = (char *)option(argc, argv, "--ops", 1);
  static char data[4u << 20] __attribute__((aligned(NLMSG_ALIGNTO)));
  if (nft_sequence == 0) nft_sequence = (uint32_t)time(NULL);
  struct nft_batch batch = {.data = data, .capacity = sizeof data, .family = family, .table = table, .next_sequence = nft_sequence};
  batch.first_sequence = batch.next_sequence;
  size_t begin = nft_begin(&batch, NFNL_MSG_BATCH_BEGIN, 0, AF_UNSPEC, NFNL_SUBSYS_NFTABLES);
  nft_end(&batch, begin);

  unsigned op_count = 0, element_count = 0;
  char *saved_op = NULL;
  for (char *op = strtok_r(ops, ";", &saved_op); op; op = strtok_r(NULL, ";", &saved_op)) {
    char *words[5] = {0};
    int count = 0;
    char *saved_word = NULL;
    for (char *word = strtok_r(op, " ", &saved_word); word; word = strtok_r(NULL, " ", &saved_word)) {
      if (count == 5) usage("nft-batch: an operation has too many words");
      words[count++] = word;
    }
    if (count == 0) continue;
    if (++op_count > NFT_OPS_MAX) usage("nft-batch: too many operations");
    const char *verb = words[0];
#define NFT_WORDS(n) \
  if (count != (n)) usage("nft-batch: wrong number of words in an operation")
    if (strcmp(verb, "chain") == 0 || strcmp(verb, "del-chain") == 0 || strcmp(verb, "flush-chain") == 0) {
      NFT_WORDS(2);
      int type = verb[0] == 'c' ? NFT_MSG_NEWCHAIN : verb[0] == 'd' ? NFT_MSG_DELCHAIN : NFT_MSG_DELRULE;
      size_t message = nft_message(&batch, type, type == NFT_MSG_NEWCHAIN ? NLM_F_CREATE : 0, type == NFT_MSG_DELRULE ? NFTA_RULE_TABLE : NFTA_CHAIN_TABLE);
      nft_string(&batch, type == NFT_MSG_DELRULE ? NFTA_RULE_CHAIN : NFTA_CHAIN_NAME, nft_name(words[1], "a chain name"));
      nft_end(&batch, message);
    } else if (strcmp(verb, "set") == 0) {
      NFT_WORDS(3);
      uint32_t flags = strcmp(words[2], "interval") == 0 ? NFT_SET_INTERVAL : strcmp(words[2], "timeout") == 0 ? NFT_SET_TIMEOUT : 0;
      if (!flags) usage("nft-batch: a set is interval or timeout");
      size_t message = nft_message(&batch, NFT_MSG_NEWSET, NLM_F_CREATE, NFTA_SET_TABLE);
      nft_string(&batch, NFTA_SET_NAME, nft_name(words[1], "a set name"));
      nft_u32(&batch, NFTA_SET_FLAGS, flags);
      nft_u32(&batch, NFTA_SET_KEY_TYPE, NFT_TYPE_IPADDR);
      nft_u32(&batch, NFTA_SET_KEY_LEN, 4);
      nft_u32(&batch, NFTA_SET_ID, ++batch.set_ids);
      nft_end(&batch, message);
    } else if (strcmp(verb, "del-set") == 0 || strcmp(verb, "flush-set") == 0) {
      NFT_WORDS(2);
      int whole = verb[0] == 'd' && verb[4] == 's';
      size_t message = nft_message(&batch, whole ? NFT_MSG_DELSET : NFT_MSG_DELSETELEM, 0, whole ? NFTA_SET_TABLE : NFTA_SET_ELEM_LIST_TABLE);
      nft_string(&batch, whole ? NFTA_SET_NAME : NFTA_SET_ELEM_LIST_SET, nft_name(words[1], "a set name"));
      nft_end(&batch, message);
    } else if (strcmp(verb, "rule") == 0 || strcmp(verb, "rule-jump") == 0) {
      NFT_WORDS(4);
      int jump = verb[4] == '-';
      const char *set = strcmp(words[2], "-") == 0 && !jump ? NULL : nft_name(words[2], "a set name");
      nft_rule(&batch, nft_name(words[1], "a chain name"), set, nft_name(words[3], "a chain name"), jump ? NFT_JUMP : NFT_GOTO);
    } else if (strcmp(verb, "map-add") == 0 || strcmp(verb, "map-del") == 0) {
      int add = verb[4] == 'a';
      NFT_WORDS(add ? 4 : 3);
      size_t message = nft_message(&batch, add ? NFT_MSG_NEWSETELEM : NFT_MSG_DELSETELEM, add ? NLM_F_CREATE : 0, NFTA_SET_ELEM_LIST_TABLE);
      nft_string(&batch, NFTA_SET_ELEM_LIST_SET, nft_name(words[1], "a map name"));
      size_t elements = nft_nest(&batch, NFTA_SET_ELEM_LIST_ELEMENTS);
      size_t element = nft_nest(&batch, NFTA_LIST_ELEM);
      nft_key(&batch, NFTA_SET_ELEM_KEY, nft_ipv4(words[2]));
      if (add) nft_goto(&batch, NFTA_SET_ELEM_DATA, nft_name(words[3], "a chain name"));
      nft_nest_end(&batch, element);
      nft_nest_end(&batch, elements);
      nft_end(&batch, message);
    } else if (strcmp(verb, "add") == 0) {
      NFT_WORDS(3);
      nft_elements(&batch, nft_name(words[1], "a set name"), words[2], &element_count);
    } else {
      usage("nft-batch: unknown operation");
    }
#undef NFT_WORDS
  }
  if (op_count == 0) usage("nft-batch: no operations");
  size_t end = nft_begin(&batch, NFNL_MSG_BATCH_END, 0, AF_UNSPEC, NFNL_SUBSYS_NFTABLES);
  nft_end(&batch, end);
  step = "nft-batch";
  nft_sequence = batch.next_sequence;
  if (nft_sequence == 0) nft_sequence = 1;
  if (nft_send(&batch) != 0) fail("the nftables transaction");
  return 0;
}
