// SPDX-License-Identifier: GPL-2.0
/* consolegate's sockmap data path: each socket's ingress goes straight to
 * its peer socket's egress inside the kernel.
 *
 * Two SOCKHASH maps, both keyed by the cookie of the socket whose bytes
 * arrive:
 * - PEER: cookie of a socket -> the socket its bytes go to. No program is
 *   attached to this map, so being in it changes nothing for a socket.
 * - FORWARD: cookie of a socket -> that socket. The stream parser and
 *   verdict are attached here: a socket in FORWARD has its ingress run
 *   through them.
 * The proxy fills PEER for both sockets of a session before it puts
 * either into FORWARD, so no byte ever meets a missing peer. If the peer
 * is gone anyway (it closed and the kernel removed it), the bytes are
 * passed to the socket itself, where the proxy reads them, instead of
 * being dropped. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "sockmap.h"

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SOCK_MAX_ENTRIES);
	__type(key, struct sock_key);
	__type(value, __u32);
} PEER SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SOCK_MAX_ENTRIES);
	__type(key, struct sock_key);
	__type(value, __u32);
} FORWARD SEC(".maps");

/* Every skb is one message: no framing, just hand it on. */
SEC("sk_skb/stream_parser")
int sockmap_parser(struct __sk_buff *skb)
{
	return skb->len;
}

SEC("sk_skb/stream_verdict")
int sockmap_verdict(struct __sk_buff *skb)
{
	struct sock_key key = {};
	key.cookie = bpf_get_socket_cookie(skb);
	/* SK_PASS with a redirect set sends the skb to the peer; without one
	 * (no peer: the helper returned SK_DROP and set nothing) it keeps the
	 * bytes on this socket for userspace to read. */
	bpf_sk_redirect_hash(skb, &PEER, &key, 0);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
