/*
 * wsblast: a single-threaded epoll WebSocket load client for fan-out benchmarks.
 *
 * Opens N connections to ws://HOST:PORT/PATH (no extensions requested, so no compression),
 * paced: at most --batch handshakes in flight. After the upgrade, connection i sends line i of
 * --auth-file as a masked text frame (an empty line sends nothing). A connection is "ready"
 * once it has received --ready-frames text frames containing --ready-match (any frame when the
 * match is empty). A pre-ready frame containing --fail-match aborts the run. When every
 * connection is ready, prints "READY {json}".
 *
 * Measurement phases are driven by commands on stdin (one per line):
 *   RUN <expected_total_frames> <timeout_ms>   arm a phase; prints "ARMED" at once, then
 *                                             "RESULT {json}" when the expected number of
 *                                             counted frames arrived or the timeout passed
 *   QUIT (or EOF)                             close every connection and exit
 * With --expect-per-conn M, one phase (N*M frames, --phase-timeout-ms) runs right after READY
 * and the program exits after printing its RESULT: no stdin needed.
 *
 * A frame is "counted" when it is a text/binary message containing --count-match (any when
 * empty). In a counted frame, the first "t=<digits>;" is read as a CLOCK_MONOTONIC timestamp in
 * ns written by the poster; now - t is a latency sample (on connections idx % --lat-every == 0).
 * Server pings are answered with masked pongs; a server close is answered and the connection is
 * counted as closed. The process always exits by itself after --max-seconds.
 *
 * Storm mode (--storm, for bench/storm.py): every connection counts, nothing is fatal, and
 * connections follow the chat protocol's reconnect rules (docs/protocol.md, issue 7):
 *   - an attempt not live within --conn-timeout-ms of its connect() is abandoned (socket
 *     closed) and counted as a timeout; an upgrade refused (non-101 status), a pre-ready frame
 *     containing --fail-match, a server close before ready and a socket error are counted by
 *     kind (close codes and HTTP statuses by value). Each of these uses up one of --attempts
 *     (default 3; storm.py's cold storm passes 1: no retries) and is retried after exponential
 *     backoff with full jitter, uniform(0, min(--backoff-cap-ms, --backoff-ms * 2^k)) (k
 *     failures so far; at least 3 after a 1013 without goodbye), as chat.client.Backoff;
 *   - retry hints: an HTTP 503 whose body carries "reconnect_after_ms" (a goodbye frame) or,
 *     failing that, a Retry-After header; a goodbye frame followed by the close (1013
 *     overloaded, or 1012 when a node drains). The connection waits the hint plus full jitter
 *     of up to the same amount (chat.client.goodbye_delay), then reconnects. Hints are counted
 *     apart from failures: a hint uses no attempt and does not grow the backoff;
 *   - --resume: the session_id of the auth reply and the highest durable "seq" received
 *     (events carry "seq":N, ephemeral ones "seq":null) are kept per connection, and a
 *     reconnect sends the auth line with "resume":{"session_id":S,"seq":Q}. A connection is
 *     live once its auth reply (a frame containing --ready-match) arrived and, if the reply
 *     says "resumed":true, the "resumed" frame arrived;
 *   - a live connection that is lost is reconnected: after uniform(0, --jitter-ms) ms, or after
 *     its goodbye hint. With --failover-port P2, once the node on --port is gone (a live
 *     connection dropped without a close frame, or a connect() refused), that connection
 *     reconnects to P2 from then on (the switch uses no attempt);
 *   - delivery check: per connection, "message.posted" events are counted, and durable events
 *     whose seq is <= the last one seen on that connection (across reconnects) are counted as
 *     duplicates instead; "COUNTS <expected>" on stdin prints "COUNTS {json}" (sums, per-conn
 *     min/max over live connections, connections short of / over <expected>).
 * Rounds: round 0 starts with the first connect() (--go: wait for "GO" on stdin first, after
 * printing "WAITING"; --batch limits only these first connects, 0 = no limit); "MARK <ns>" on
 * stdin starts the next round at CLOCK_MONOTONIC <ns> (prints "MARKED <round>"). A round is
 * settled when every connection is live in it (for round >= 1: was lost and is live again) or
 * gave up (out of attempts), or at --storm-max-ms after its start (connections not live then
 * are abandoned, "unfinished"); then "STORM {json}" is printed: time to live per connection
 * (round 0: from its first connect(); later rounds: from the MARK) as p50/p90/p99/max and as
 * a list (ready_ms, for merging processes), time to the 101, hints, failures by kind, close
 * codes, HTTP statuses, resumes and resume errors, failover switches. Live connections stay
 * open (pings answered; an application ping every --heartbeat-ms, the first after a random
 * part of it, so connections do not ping in step) until QUIT on stdin.
 *
 * Build: gcc -O2 -o bench/.build/wsblast bench/wsblast.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define STDIN_TAG UINT64_MAX
#define MAX_FRAME (16u << 20)
#define MAX_ATTEMPTS 3 /* default of --attempts */
#define READ_CHUNK 16384
#define MAX_SAMPLES (20u << 20)

enum cstate { C_IDLE, C_CONNECTING, C_HANDSHAKE, C_OPEN, C_CLOSED, C_WAIT };
/* --storm: why an attempt failed */
enum fkind { F_CONN_ERROR, F_TIMEOUT, F_REFUSED, F_ERROR_FRAME, F_SERVER_CLOSE, F_NKINDS };
static const char *fkind_name[F_NKINDS] = {"conn_errors", "timeouts", "refused", "error_frames",
                                           "server_closed"};
/* --storm: where a retry hint came from */
enum hkind { H_HTTP, H_CLOSE, H_LIVE, H_NKINDS };
static const char *hkind_name[H_NKINDS] = {"http_503", "goodbye_before_live", "goodbye_when_live"};
#define N_RESUME_ERR 4
static const char *resume_err_name[N_RESUME_ERR] = {"session_mismatch", "too_old", "future_seq",
                                                    "other"};
#define SESSION_MAX 80

typedef struct {
    unsigned char *p;
    size_t len, cap;
} buf_t;

typedef struct {
    int fd, idx, attempts, ready_seen, ready, want_out;
    enum cstate st;
    buf_t rd, wr, msg; /* read buffer, pending writes (wr.len bytes from woff), fragments */
    size_t woff, need;
    int msg_op;
    long long count; /* counted frames in the current phase */
    int64_t start_ns, hs_ns, ready_ns; /* --storm: first connect(), 101 received, live */
    int fail_kind;                     /* --storm: enum fkind of the pending conn_fail */
    /* --storm */
    int64_t attempt_ns, wake_ns;   /* this attempt's connect(); C_WAIT: when to reconnect */
    int64_t hb_ns;                 /* next application ping (live connections) */
    int fails, backoff_k;          /* failed attempts this round (vs --attempts); backoff step */
    int hint_ms, hint_kind;        /* a retry hint for the pending close (-1: none) */
    int close_code, refused_conn;  /* the server's close code; connect() refused */
    int port_idx;                  /* 0: --port, 1: --failover-port */
    int live_round, gave_up_round; /* the round it became live in / gave up in (-1: never) */
    int wait_resumed, sent_resume; /* reply said resumed:true; this attempt asked to resume */
    long long last_seq, posted, dups; /* highest durable seq; message.posted; duplicates */
    char session[SESSION_MAX];
} conn_t;

static struct {
    const char *host, *path, *auth_file, *ready_match, *fail_match, *count_match, *hb_text;
    int port, conns, batch, ready_frames, lat_every;
    long long connect_timeout_ms, heartbeat_ms, max_seconds, expect_per_conn, phase_timeout_ms;
    int storm, attempts;
    long long conn_timeout_ms;
    int failover_port, resume, go;
    long long jitter_ms, backoff_ms, backoff_cap_ms, storm_max_ms;
} opt = {"127.0.0.1", "/", NULL, "", "", "", "", 0, 1000, 200, 0, 1, 120000, 0, 900, -1, 60000,
         0, MAX_ATTEMPTS, 10000, 0, 0, 0, 0, 0, 20000, 0};

static conn_t *conns;
static char **auth_lines;
static int ep;
static int *todo, todo_len; /* connections waiting for (re)connect */
static int inflight, nready, nclosed, retries;
static struct sockaddr_in addr, addr2; /* --port, --failover-port */
static uint64_t rng_state;

/* --storm bookkeeping, per round (reset by MARK) */
#define MAX_CODE 5000
static int nfailed, max_inflight, round_no;
static int64_t round_t0;
static struct {
    int fails[F_NKINDS], hints[H_NKINDS], close_codes[MAX_CODE], http_status[600];
    int resumed, resume_errors[N_RESUME_ERR], switched, lost, goodbyes, connects;
    long long replayed, hint_wait_ms;
} rs;

static struct {
    int armed, num;
    long long expected, frames, bytes, other, stray;
    int64_t armed_ns, first_ns, last_ns, deadline_ns;
    struct rusage ru0;
    int64_t *lat;
    size_t nlat, caplat, lat_dropped;
} ph;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "wsblast: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    printf("FAILED\n");
    fflush(stdout);
    exit(1);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) die("out of memory (%zu bytes)", n);
    return q;
}

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static void buf_append(buf_t *b, const void *data, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static uint32_t rnd32(void) { /* xorshift64*: masking keys and handshake nonces */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 2685821657736338717ULL) >> 32);
}

static void base64(const unsigned char *in, size_t n, char *out) {
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i, o = 0;
    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = tbl[v >> 18 & 63], out[o++] = tbl[v >> 12 & 63];
        out[o++] = tbl[v >> 6 & 63], out[o++] = tbl[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        out[o++] = tbl[v >> 18 & 63], out[o++] = tbl[v >> 12 & 63];
        out[o++] = i + 1 < n ? tbl[v >> 6 & 63] : '=';
        out[o++] = '=';
    }
    out[o] = 0;
}

static int contains(const unsigned char *p, size_t n, const char *needle) {
    size_t k = strlen(needle);
    return k == 0 || memmem(p, n, needle, k) != NULL;
}

/* ------------------------------------------------------------------------------ writing */

static void set_out(conn_t *c, int want) {
    if (c->want_out == want) return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.u64 = c->idx};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl MOD: %s", strerror(errno));
    c->want_out = want;
}

static void conn_fail(conn_t *c, const char *why);

/* Write as much pending output as the socket takes; returns -1 if the connection failed. */
static int flush(conn_t *c) {
    while (c->woff < c->wr.len) {
        ssize_t k = send(c->fd, c->wr.p + c->woff, c->wr.len - c->woff, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            conn_fail(c, strerror(errno));
            return -1;
        }
        c->woff += (size_t)k;
    }
    if (c->woff == c->wr.len) c->woff = c->wr.len = 0;
    set_out(c, c->wr.len > 0);
    return 0;
}

/* Queue one masked client frame (FIN set) and try to send it. */
static int send_frame(conn_t *c, int op, const void *payload, size_t n) {
    unsigned char hdr[14];
    size_t h = 0;
    hdr[h++] = (unsigned char)(0x80 | op);
    if (n < 126) {
        hdr[h++] = (unsigned char)(0x80 | n);
    } else if (n < 65536) {
        hdr[h++] = 0x80 | 126, hdr[h++] = (unsigned char)(n >> 8), hdr[h++] = (unsigned char)n;
    } else {
        hdr[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) hdr[h++] = (unsigned char)((uint64_t)n >> (8 * i));
    }
    uint32_t key = rnd32();
    memcpy(hdr + h, &key, 4);
    const unsigned char *mk = hdr + h;
    h += 4;
    buf_reserve(&c->wr, h + n);
    memcpy(c->wr.p + c->wr.len, hdr, h);
    unsigned char *dst = c->wr.p + c->wr.len + h;
    const unsigned char *src = payload;
    for (size_t i = 0; i < n; i++) dst[i] = src[i] ^ mk[i & 3];
    c->wr.len += h + n;
    return flush(c);
}

/* ------------------------------------------------------------------------ connection life */

static double rnd01(void) { return (double)rnd32() / 4294967296.0; }

static void start_connect(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket: %s (raise ulimit -n?)", strerror(errno));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->rd.len = c->wr.len = c->msg.len = c->woff = c->need = 0;
    c->ready_seen = c->ready = c->msg_op = 0;
    c->attempt_ns = now_ns();
    if (c->attempts == 0) c->start_ns = c->attempt_ns;
    c->attempts++;
    c->fail_kind = F_CONN_ERROR;
    c->hint_ms = -1;
    c->close_code = c->refused_conn = c->wait_resumed = c->sent_resume = 0;
    c->hs_ns = 0;
    c->st = C_CONNECTING;
    c->want_out = 1;
    rs.connects++;
    inflight++;
    if (inflight > max_inflight) max_inflight = inflight;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = c->idx};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl ADD: %s", strerror(errno));
    const struct sockaddr_in *to = c->port_idx ? &addr2 : &addr;
    if (connect(c->fd, (const struct sockaddr *)to, sizeof *to) < 0 && errno != EINPROGRESS) {
        if (errno == ECONNREFUSED) c->refused_conn = 1;
        conn_fail(c, strerror(errno));
    }
}

static int need_scan; /* --storm: a connection is waiting to reconnect: scan at once */

/* --storm: the wait before the next attempt after k failures, as chat.client.Backoff. */
static int64_t backoff_ns(conn_t *c, int floor) {
    int k = c->backoff_k > floor ? c->backoff_k : floor;
    c->backoff_k = k + 1;
    double ceil_ms = (double)opt.backoff_ms * (k >= 40 ? 1e12 : (double)(1ULL << k));
    if (ceil_ms > (double)opt.backoff_cap_ms) ceil_ms = (double)opt.backoff_cap_ms;
    return (int64_t)(rnd01() * ceil_ms * 1e6);
}

/* --storm: a retry hint of ms, plus full jitter of up to the same (chat.client.goodbye_delay). */
static int64_t hint_ns(int ms) {
    int64_t d = (int64_t)((double)ms * (1.0 + rnd01()) * 1e6);
    rs.hint_wait_ms += d / 1000000;
    return d;
}

/* --storm: after a connection ended (socket already closed): wait for a hint, fail over,
 * back off and retry, or give up. */
static void storm_after(conn_t *c, int64_t now) {
    int64_t delay;
    int hint = c->hint_ms;
    c->hint_ms = -1;
    if (c->ready) { /* a live connection was lost: reconnect (and resume) */
        c->ready = 0;
        nready--;
        rs.lost++;
        c->fails = 0;
        if (hint >= 0) {
            rs.hints[H_LIVE]++;
            delay = hint_ns(hint);
        } else {
            /* dropped without a close frame: the node is gone */
            if (c->fail_kind != F_SERVER_CLOSE && opt.failover_port && c->port_idx == 0) {
                c->port_idx = 1;
                rs.switched++;
            }
            delay = opt.jitter_ms > 0 ? (int64_t)(rnd01() * (double)opt.jitter_ms * 1e6) : 0;
        }
    } else {
        inflight--;
        if (hint >= 0) { /* not a failure: no attempt used, no backoff growth */
            rs.hints[c->hint_kind]++;
            delay = hint_ns(hint);
        } else if (c->refused_conn && opt.failover_port && c->port_idx == 0) {
            c->port_idx = 1; /* nothing listens on --port any more */
            rs.switched++;
            delay = opt.jitter_ms > 0 ? (int64_t)(rnd01() * (double)opt.jitter_ms * 1e6) : 0;
        } else {
            rs.fails[c->fail_kind]++;
            if (++c->fails >= opt.attempts) { /* counted, not fatal; never retried */
                c->st = C_CLOSED;
                c->gave_up_round = round_no;
                nfailed++;
                return;
            }
            retries++;
            delay = backoff_ns(c, c->close_code == 1013 ? 3 : 0);
        }
    }
    c->st = C_WAIT;
    c->wake_ns = now + delay;
    if (delay <= 0) need_scan = 1;
}

static void conn_fail(conn_t *c, const char *why) {
    if (c->st == C_CLOSED || c->st == C_IDLE || c->st == C_WAIT) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    if (opt.storm) {
        storm_after(c, now_ns());
        return;
    }
    if (c->ready) { /* lost during measurement: never reconnect, just report */
        c->st = C_CLOSED;
        nclosed++;
        fprintf(stderr, "wsblast: connection %d closed: %s\n", c->idx, why);
        return;
    }
    inflight--;
    c->st = C_IDLE;
    if (c->attempts >= opt.attempts) die("connection %d failed %d times: %s", c->idx, c->attempts, why);
    retries++;
    todo[todo_len++] = c->idx;
}

/* conn_fail, recording why (the --storm report counts failures by kind). */
static void conn_fail_kind(conn_t *c, int kind, const char *why) {
    c->fail_kind = kind;
    conn_fail(c, why);
}

static void set_ready(conn_t *c) {
    c->ready = 1;
    c->ready_ns = now_ns();
    inflight--;
    nready++;
    if (opt.storm) {
        c->live_round = round_no;
        c->fails = c->backoff_k = c->wait_resumed = 0;
        /* the first ping after interval * random(), as chat.client: a herd does not ping in step */
        c->hb_ns = c->ready_ns + (int64_t)(rnd01() * (double)opt.heartbeat_ms * 1e6);
    }
}

static void on_open(conn_t *c) {
    char key[32], req[1024];
    unsigned char nonce[16];
    for (int i = 0; i < 16; i += 4) {
        uint32_t r = rnd32();
        memcpy(nonce + i, &r, 4);
    }
    base64(nonce, 16, key);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\nUser-Agent: wsblast\r\n\r\n",
                     opt.path, opt.host, opt.port, key);
    c->st = C_HANDSHAKE;
    buf_append(&c->wr, req, (size_t)n);
    flush(c);
}

/* ------------------------------------------------------------------------------ reading */

static void record_latency(const unsigned char *p, size_t n, int64_t now) {
    const unsigned char *end = p + n, *q = p;
    while ((q = memmem(q, (size_t)(end - q), "t=", 2)) != NULL) {
        q += 2;
        int64_t t = 0;
        const unsigned char *d = q;
        while (d < end && *d >= '0' && *d <= '9' && d - q < 19) t = t * 10 + (*d++ - '0');
        if (d > q && d < end && *d == ';') {
            if (ph.nlat == ph.caplat) {
                if (ph.caplat >= MAX_SAMPLES) {
                    ph.lat_dropped++;
                    return;
                }
                ph.caplat = ph.caplat ? ph.caplat * 2 : 65536;
                ph.lat = xrealloc(ph.lat, ph.caplat * sizeof *ph.lat);
            }
            ph.lat[ph.nlat++] = now > t ? now - t : 0;
            return;
        }
    }
}

/* The integer after the first occurrence of key in p; 0 if absent or not a number (null). */
static int find_int(const unsigned char *p, size_t n, const char *key, long long *out) {
    size_t k = strlen(key);
    const unsigned char *q = memmem(p, n, key, k), *end = p + n;
    if (!q) return 0;
    q += k;
    while (q < end && *q == ' ') q++;
    if (q >= end || *q < '0' || *q > '9') return 0;
    long long v = 0;
    while (q < end && *q >= '0' && *q <= '9') v = v * 10 + (*q++ - '0');
    *out = v;
    return 1;
}

/* --storm: the top-level "seq" of an event frame ({"seq":N,...}: the first "seq" key, before
 * any nested object); 0 for frames without one or with "seq":null. */
static int event_seq(const unsigned char *p, size_t n, long long *seq) {
    if (n < 8 || p[0] != '{') return 0;
    const unsigned char *q = memmem(p, n, "\"seq\":", 6);
    if (!q || memchr(p + 1, '{', (size_t)(q - p) - 1)) return 0;
    return find_int(q, n - (size_t)(q - p), "\"seq\":", seq);
}

/* --storm: count a frame received after the auth reply (live, or replayed before "resumed"). */
static void storm_event(conn_t *c, const unsigned char *p, size_t n) {
    long long seq;
    if (!event_seq(p, n, &seq)) return;
    int posted = contains(p, n, "\"type\":\"message.posted\"");
    if (seq <= c->last_seq) {
        c->dups++;
        return;
    }
    c->last_seq = seq;
    if (posted) c->posted++;
}

/* --storm: the auth reply; returns 1 if the connection is live now. */
static int storm_auth_reply(conn_t *c, const unsigned char *p, size_t n) {
    const unsigned char *s = memmem(p, n, "\"session_id\":\"", 14);
    if (s) {
        s += 14;
        size_t k = 0;
        while (s + k < p + n && s[k] != '"' && k < SESSION_MAX - 1) k++;
        memcpy(c->session, s, k);
        c->session[k] = 0;
    }
    if (contains(p, n, "\"resumed\":true")) {
        rs.resumed++;
        c->wait_resumed = 1; /* the missed events follow, then "resumed" */
        return 0;
    }
    if (c->sent_resume) {
        int k = N_RESUME_ERR - 1;
        for (int i = 0; i < N_RESUME_ERR - 1; i++) {
            char want[64];
            snprintf(want, sizeof want, "\"resume_error\":\"%s\"", resume_err_name[i]);
            if (contains(p, n, want)) k = i;
        }
        rs.resume_errors[k]++;
    }
    long long seq;
    if (find_int(p, n, "\"seq\":", &seq)) c->last_seq = seq; /* the stream starts here */
    return 1;
}

static void storm_message(conn_t *c, const unsigned char *p, size_t n) {
    if (contains(p, n, "\"type\":\"goodbye\"")) {
        long long ms = 0;
        find_int(p, n, "\"reconnect_after_ms\":", &ms);
        c->hint_ms = ms > 86400000LL ? 86400000 : (int)ms;
        c->hint_kind = c->ready ? H_LIVE : H_CLOSE;
        rs.goodbyes++;
        return;
    }
    if (c->ready) {
        storm_event(c, p, n);
        return;
    }
    if (c->wait_resumed) {
        if (contains(p, n, "\"type\":\"resumed\"")) {
            long long seq, replayed;
            if (find_int(p, n, "\"seq\":", &seq) && seq > c->last_seq) c->last_seq = seq;
            if (find_int(p, n, "\"replayed\":", &replayed)) rs.replayed += replayed;
            set_ready(c);
        } else {
            storm_event(c, p, n);
        }
        return;
    }
    if (opt.fail_match[0] && contains(p, n, opt.fail_match)) {
        conn_fail_kind(c, F_ERROR_FRAME, "failure frame before ready");
        return;
    }
    if (contains(p, n, opt.ready_match) && storm_auth_reply(c, p, n)) set_ready(c);
}

static void on_message(conn_t *c, const unsigned char *p, size_t n, int64_t now) {
    if (opt.storm) {
        storm_message(c, p, n);
        return;
    }
    if (!c->ready) {
        if (opt.fail_match[0] && contains(p, n, opt.fail_match))
            die("connection %d got a failure frame before ready: %.*s", c->idx,
                (int)(n > 400 ? 400 : n), (const char *)p);
        if (contains(p, n, opt.ready_match) && ++c->ready_seen >= opt.ready_frames) set_ready(c);
        return;
    }
    if (!contains(p, n, opt.count_match)) {
        ph.other++;
        return;
    }
    if (!ph.armed) {
        ph.stray++;
        return;
    }
    c->count++;
    ph.frames++;
    ph.bytes += (long long)n;
    if (!ph.first_ns) ph.first_ns = now;
    ph.last_ns = now;
    if (c->idx % opt.lat_every == 0) record_latency(p, n, now);
}

/* Handle one complete frame; returns -1 if the connection is gone. */
static int on_frame(conn_t *c, int fin, int op, unsigned char *p, size_t n, int64_t now) {
    switch (op) {
    case 0x1:
    case 0x2:
        if (c->msg_op) return conn_fail(c, "new message inside a fragmented one"), -1;
        if (fin) {
            on_message(c, p, n, now);
            if (c->st != C_OPEN) return -1; /* --storm: failed on this frame */
        } else {
            c->msg_op = op;
            c->msg.len = 0;
            buf_append(&c->msg, p, n);
        }
        return 0;
    case 0x0:
        if (!c->msg_op) return conn_fail(c, "unexpected continuation frame"), -1;
        buf_append(&c->msg, p, n);
        if (fin) {
            c->msg_op = 0;
            on_message(c, c->msg.p, c->msg.len, now);
            if (c->st != C_OPEN) return -1;
        }
        return 0;
    case 0x8: /* close: echo the status code, then drop the connection */
        if (n >= 2) {
            int code = p[0] << 8 | p[1];
            c->close_code = code;
            if (!c->ready && code >= 0 && code < MAX_CODE) rs.close_codes[code]++;
        }
        c->fail_kind = F_SERVER_CLOSE;
        send_frame(c, 0x8, p, n >= 2 ? 2 : 0);
        conn_fail(c, "server sent close");
        return -1;
    case 0x9:
        return send_frame(c, 0xA, p, n);
    case 0xA:
        return 0;
    default:
        return conn_fail(c, "unknown opcode"), -1;
    }
}

/* Parse as many whole frames as the read buffer holds; keep the partial tail. */
static int parse_frames(conn_t *c, int64_t now) {
    size_t off = 0;
    c->need = 0;
    while (c->rd.len - off >= 2) {
        unsigned char *b = c->rd.p + off;
        size_t avail = c->rd.len - off, h = 2;
        uint64_t len = b[1] & 0x7f;
        int masked = b[1] & 0x80;
        if (len == 126) {
            if (avail < 4) break;
            len = (uint64_t)b[2] << 8 | b[3];
            h = 4;
        } else if (len == 127) {
            if (avail < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | b[2 + i];
            h = 10;
        }
        if (len > MAX_FRAME) return conn_fail(c, "frame too large"), -1;
        if (masked) h += 4;
        if (avail < h + len) {
            c->need = h + (size_t)len;
            break;
        }
        unsigned char *payload = b + h;
        if (masked)
            for (uint64_t i = 0; i < len; i++) payload[i] ^= b[h - 4 + (i & 3)];
        if (on_frame(c, b[0] & 0x80, b[0] & 0x0f, payload, (size_t)len, now) < 0) return -1;
        off += h + (size_t)len;
    }
    if (off) {
        memmove(c->rd.p, c->rd.p + off, c->rd.len - off);
        c->rd.len -= off;
    }
    return 0;
}

/* Case-insensitive search for an HTTP header name ("name:") in the head; returns its value. */
static const unsigned char *header_value(const unsigned char *p, size_t n, const char *name) {
    size_t k = strlen(name);
    for (size_t i = 0; i + k <= n; i++)
        if ((i == 0 || p[i - 1] == '\n') && strncasecmp((const char *)p + i, name, k) == 0) {
            const unsigned char *v = p + i + k;
            while (v < p + n && *v == ' ') v++;
            return v;
        }
    return NULL;
}

/* --storm: an upgrade refused. A 503 with a retry hint (the body's "reconnect_after_ms", else
 * Retry-After in seconds) becomes a hint; anything else is a failure. Returns 0 while the
 * body is still incomplete (eof: it never will be). */
static int storm_refused(conn_t *c, size_t hl, int eof) {
    const unsigned char *p = c->rd.p;
    int status = c->rd.len >= 12 ? atoi((const char *)p + 9) : 0;
    const unsigned char *cl = header_value(p, hl, "content-length:");
    size_t body = cl ? (size_t)strtoul((const char *)cl, NULL, 10) : 0;
    if (!eof && cl && c->rd.len < hl + body && body <= 65536) return 0;
    if (status >= 0 && status < 600) rs.http_status[status]++;
    long long ms = -1;
    if (status == 503) {
        size_t got = c->rd.len - hl < body ? c->rd.len - hl : body;
        if (!find_int(p + hl, got, "\"reconnect_after_ms\":", &ms)) {
            const unsigned char *ra = header_value(p, hl, "retry-after:");
            ms = ra && *ra >= '0' && *ra <= '9' ? 1000LL * strtol((const char *)ra, NULL, 10) : -1;
        }
    }
    if (ms >= 0) {
        c->hint_ms = ms > 86400000LL ? 86400000 : (int)ms;
        c->hint_kind = H_HTTP;
    }
    conn_fail_kind(c, F_REFUSED, "upgrade refused");
    return -1;
}

/* --storm --resume: the auth line, with "resume" once the connection has a session. */
static void send_auth(conn_t *c, const char *line) {
    size_t n = strlen(line);
    if (!opt.storm || !opt.resume || !c->session[0] || n < 2 || line[n - 1] != '}') {
        send_frame(c, 0x1, line, n);
        return;
    }
    char buf[8192];
    int k = snprintf(buf, sizeof buf, "%.*s,\"resume\":{\"session_id\":\"%s\",\"seq\":%lld}}",
                     (int)(n - 1), line, c->session, c->last_seq);
    if (k <= 0 || (size_t)k >= sizeof buf) die("auth line too long");
    c->sent_resume = 1;
    send_frame(c, 0x1, buf, (size_t)k);
}

static int parse_handshake(conn_t *c, int64_t now, int eof) {
    unsigned char *end = memmem(c->rd.p, c->rd.len, "\r\n\r\n", 4);
    if (!end) {
        if (c->rd.len > 16384) conn_fail(c, "handshake response too large");
        if (eof) conn_fail(c, "EOF");
        return 0;
    }
    size_t hl = (size_t)(end - c->rd.p) + 4;
    if (opt.storm && (c->rd.len < 12 || memcmp(c->rd.p, "HTTP/1.1 101", 12) != 0))
        return storm_refused(c, hl, eof);
    if (c->rd.len < 12 || memcmp(c->rd.p, "HTTP/1.1 101", 12) != 0)
        die("connection %d: upgrade refused: %.*s", c->idx, (int)(hl > 300 ? 300 : hl),
            (const char *)c->rd.p);
    if (memmem(c->rd.p, hl, "Sec-WebSocket-Extensions", 24) ||
        memmem(c->rd.p, hl, "sec-websocket-extensions", 24))
        die("connection %d: server negotiated an extension we did not ask for", c->idx);
    memmove(c->rd.p, c->rd.p + hl, c->rd.len - hl);
    c->rd.len -= hl;
    c->st = C_OPEN;
    c->hs_ns = now;
    const char *line = auth_lines ? auth_lines[c->idx] : "";
    if (line[0]) {
        send_auth(c, line);
        if (c->st != C_OPEN) return -1;
    }
    if (opt.ready_frames == 0 && !(opt.storm && line[0])) set_ready(c); /* storm: the reply */
    if (parse_frames(c, now) < 0) return -1;
    if (eof) return conn_fail(c, "EOF"), -1;
    return 0;
}

static void on_readable(conn_t *c) {
    size_t want = c->need > c->rd.len ? c->need - c->rd.len : 0;
    buf_reserve(&c->rd, want > READ_CHUNK ? want : READ_CHUNK);
    ssize_t k = recv(c->fd, c->rd.p + c->rd.len, c->rd.cap - c->rd.len, 0);
    if (k < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) conn_fail(c, strerror(errno));
        return;
    }
    if (k == 0) {
        if (c->st == C_HANDSHAKE && c->rd.len) /* a refusal, then the server closed */
            parse_handshake(c, now_ns(), 1);
        else
            conn_fail(c, "EOF");
        return;
    }
    c->rd.len += (size_t)k;
    int64_t now = now_ns();
    if (c->st == C_HANDSHAKE)
        parse_handshake(c, now, 0);
    else if (c->st == C_OPEN && c->need <= c->rd.len)
        parse_frames(c, now);
}

static void on_event(conn_t *c, uint32_t ev) {
    if (c->st == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (err) {
            if (err == ECONNREFUSED) c->refused_conn = 1;
            conn_fail(c, strerror(err));
        }
        else if (ev & EPOLLOUT)
            on_open(c);
        return;
    }
    if ((ev & EPOLLOUT) && flush(c) < 0) return;
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
}

/* ------------------------------------------------------------------------------- phases */

static double cpu_s(const struct timeval *tv) { return (double)tv->tv_sec + tv->tv_usec / 1e6; }

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct_us(double q) {
    if (!ph.nlat) return 0;
    size_t i = (size_t)(q * (double)ph.nlat + 0.999999);
    i = i ? i - 1 : 0;
    if (i >= ph.nlat) i = ph.nlat - 1;
    return (double)ph.lat[i] / 1000.0;
}

static void phase_arm(long long expected, long long timeout_ms) {
    for (int i = 0; i < opt.conns; i++) conns[i].count = 0;
    ph.num++;
    ph.expected = expected;
    ph.frames = ph.bytes = ph.other = ph.stray = 0;
    ph.first_ns = ph.last_ns = 0;
    ph.nlat = ph.lat_dropped = 0;
    getrusage(RUSAGE_SELF, &ph.ru0);
    ph.armed_ns = now_ns();
    ph.deadline_ns = ph.armed_ns + timeout_ms * 1000000LL;
    ph.armed = 1;
    printf("ARMED %d\n", ph.num);
    fflush(stdout);
}

static void phase_report(int64_t now) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    long long mn = -1, mx = 0;
    int open = 0;
    for (int i = 0; i < opt.conns; i++) {
        conn_t *c = &conns[i];
        if (c->st == C_OPEN) open++;
        if (mn < 0 || c->count < mn) mn = c->count;
        if (c->count > mx) mx = c->count;
    }
    qsort(ph.lat, ph.nlat, sizeof *ph.lat, cmp_i64);
    printf("RESULT {\"phase\":%d,\"expected\":%lld,\"frames\":%lld,\"complete\":%s,"
           "\"bytes\":%lld,\"armed_ns\":%lld,\"first_ns\":%lld,\"last_ns\":%lld,\"end_ns\":%lld,"
           "\"min_per_conn\":%lld,\"max_per_conn\":%lld,\"open_conns\":%d,\"closed_conns\":%d,"
           "\"other_frames\":%lld,\"stray_frames\":%lld,\"cpu_user_s\":%.6f,\"cpu_sys_s\":%.6f,"
           "\"lat_n\":%zu,\"lat_dropped\":%zu,\"lat_p50_us\":%.1f,\"lat_p90_us\":%.1f,"
           "\"lat_p99_us\":%.1f,\"lat_max_us\":%.1f}\n",
           ph.num, ph.expected, ph.frames, ph.frames >= ph.expected ? "true" : "false", ph.bytes,
           (long long)ph.armed_ns, (long long)ph.first_ns, (long long)ph.last_ns, (long long)now,
           mn, mx, open, nclosed, ph.other, ph.stray,
           cpu_s(&ru.ru_utime) - cpu_s(&ph.ru0.ru_utime),
           cpu_s(&ru.ru_stime) - cpu_s(&ph.ru0.ru_stime), ph.nlat, ph.lat_dropped, pct_us(0.50),
           pct_us(0.90), pct_us(0.99), pct_us(1.0));
    fflush(stdout);
    ph.armed = 0;
}

static double ms_pct(int64_t *v, size_t n, double q) { /* v sorted, ns -> ms */
    if (!n) return 0;
    size_t i = (size_t)(q * (double)n + 0.999999);
    i = i ? i - 1 : 0;
    if (i >= n) i = n - 1;
    return (double)v[i] / 1e6;
}

/* --storm: is connection c done for the current round (live in it, or out for good)? */
static int settled(const conn_t *c) {
    return c->st == C_CLOSED || (c->ready && c->live_round == round_no);
}

static int64_t storm_ref(const conn_t *c) { return round_no == 0 ? c->start_ns : round_t0; }

static void storm_report(int64_t now, int unfinished, int not_lost) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    int64_t *rd = xrealloc(NULL, sizeof(int64_t) * (size_t)opt.conns);
    int64_t *hs = xrealloc(NULL, sizeof(int64_t) * (size_t)opt.conns);
    size_t nrd = 0, nhs = 0;
    int64_t last = 0, first = -1, last_ns = 0;
    int failed = 0, out_before = 0;
    for (int i = 0; i < opt.conns; i++) {
        conn_t *c = &conns[i];
        if (c->ready && c->live_round == round_no) {
            rd[nrd++] = c->ready_ns - storm_ref(c);
            if (c->ready_ns - round_t0 > last) last = c->ready_ns - round_t0;
            if (first < 0 || c->ready_ns - round_t0 < first) first = c->ready_ns - round_t0;
            if (c->ready_ns > last_ns) last_ns = c->ready_ns;
        }
        if (c->hs_ns && c->hs_ns >= round_t0) hs[nhs++] = c->hs_ns - storm_ref(c);
        if (c->st == C_CLOSED && c->gave_up_round == round_no) failed++;
        if (c->st == C_CLOSED && c->gave_up_round < round_no) out_before++;
    }
    failed -= unfinished;
    qsort(rd, nrd, sizeof *rd, cmp_i64);
    qsort(hs, nhs, sizeof *hs, cmp_i64);
    int hints = 0;
    for (int k = 0; k < H_NKINDS; k++) hints += rs.hints[k];
    printf("STORM {\"round\":%d,\"conns\":%d,\"ok\":%zu,\"failed\":%d,\"unfinished\":%d,"
           "\"not_lost\":%d,\"out_before\":%d,\"live_now\":%d,\"attempts\":%d,\"connects\":%d,"
           "\"retries\":%d,\"max_inflight\":%d,\"t0_ns\":%lld,\"last_ready_ns\":%lld,"
           "\"first_ready_ms\":%.1f,\"last_ready_ms\":%.1f,"
           "\"settled_ms\":%.1f,\"ready_p50_ms\":%.1f,\"ready_p90_ms\":%.1f,"
           "\"ready_p99_ms\":%.1f,\"ready_max_ms\":%.1f,\"upgraded\":%zu,"
           "\"handshake_p50_ms\":%.1f,\"handshake_p99_ms\":%.1f,\"handshake_max_ms\":%.1f",
           round_no, opt.conns, nrd, failed, unfinished, not_lost, out_before, nready,
           opt.attempts, rs.connects, retries, max_inflight, (long long)round_t0,
           (long long)last_ns, first < 0 ? 0.0 : (double)first / 1e6, (double)last / 1e6,
           (double)(now - round_t0) / 1e6, ms_pct(rd, nrd, 0.5), ms_pct(rd, nrd, 0.9),
           ms_pct(rd, nrd, 0.99), ms_pct(rd, nrd, 1.0), nhs, ms_pct(hs, nhs, 0.5),
           ms_pct(hs, nhs, 0.99), ms_pct(hs, nhs, 1.0));
    for (int k = 0; k < F_NKINDS; k++) printf(",\"%s\":%d", fkind_name[k], rs.fails[k]);
    printf(",\"hints\":%d,\"hint_kinds\":{", hints);
    for (int k = 0; k < H_NKINDS; k++) printf("%s\"%s\":%d", k ? "," : "", hkind_name[k], rs.hints[k]);
    printf("},\"hint_wait_ms\":%lld,\"goodbyes\":%d,\"resumed\":%d,\"resume_errors\":{",
           rs.hint_wait_ms, rs.goodbyes, rs.resumed);
    for (int k = 0; k < N_RESUME_ERR; k++)
        printf("%s\"%s\":%d", k ? "," : "", resume_err_name[k], rs.resume_errors[k]);
    printf("},\"replayed\":%lld,\"switched\":%d,\"lost\":%d", rs.replayed, rs.switched, rs.lost);
    printf(",\"close_codes\":{");
    for (int k = 0, sep = 0; k < MAX_CODE; k++)
        if (rs.close_codes[k]) printf("%s\"%d\":%d", sep++ ? "," : "", k, rs.close_codes[k]);
    printf("},\"http_status\":{");
    for (int k = 0, sep = 0; k < 600; k++)
        if (rs.http_status[k]) printf("%s\"%d\":%d", sep++ ? "," : "", k, rs.http_status[k]);
    printf("},\"cpu_user_s\":%.3f,\"cpu_sys_s\":%.3f,\"ready_ms\":[", cpu_s(&ru.ru_utime),
           cpu_s(&ru.ru_stime));
    for (size_t i = 0; i < nrd; i++) printf("%s%.1f", i ? "," : "", (double)rd[i] / 1e6);
    printf("],\"handshake_ms\":[");
    for (size_t i = 0; i < nhs; i++) printf("%s%.1f", i ? "," : "", (double)hs[i] / 1e6);
    printf("]}\n");
    fflush(stdout);
    free(rd);
    free(hs);
}

/* --storm, every few ms: per-attempt timeouts (counted, one attempt used), reconnects whose
 * wait is over, and the round's end (settled, or --storm-max-ms). Returns 1 while some
 * connection is neither live nor out (so the next scan should come soon). */
static int round_reported; /* --storm: the current round's STORM line is out */

static int storm_scan(int64_t now) {
    int pending = 0, all_settled = 1;
    for (int i = 0; i < opt.conns; i++) {
        conn_t *c = &conns[i];
        if (!c->ready && (c->st == C_CONNECTING || c->st == C_HANDSHAKE || c->st == C_OPEN) &&
            now - c->attempt_ns > opt.conn_timeout_ms * 1000000LL)
            conn_fail_kind(c, F_TIMEOUT, "timeout");
        if (c->st == C_WAIT && now >= c->wake_ns) start_connect(c);
        if (opt.heartbeat_ms > 0 && c->ready && c->st == C_OPEN && now >= c->hb_ns) {
            c->hb_ns = now + opt.heartbeat_ms * 1000000LL;
            send_frame(c, 0x1, opt.hb_text, strlen(opt.hb_text));
        }
        if (!c->ready && c->st != C_CLOSED && c->st != C_IDLE) pending = 1;
        if (!settled(c)) all_settled = 0;
    }
    if (round_reported || todo_len) return pending;
    int over = opt.storm_max_ms > 0 && now - round_t0 > opt.storm_max_ms * 1000000LL;
    if (!all_settled && !over) return pending;
    int unfinished = 0, not_lost = 0;
    for (int i = 0; i < opt.conns && !all_settled; i++) {
        conn_t *c = &conns[i];
        if (settled(c)) continue;
        if (c->ready) { /* never lost in this round */
            not_lost++;
            continue;
        }
        if (c->st != C_WAIT && c->st != C_IDLE) { /* an attempt in flight: abandon it */
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            inflight--;
        }
        c->st = C_CLOSED;
        c->gave_up_round = round_no;
        nfailed++;
        unfinished++;
    }
    storm_report(now, unfinished, not_lost);
    round_reported = 1;
    return 0;
}

/* "COUNTS <expected>": the delivery check over live connections (and the others apart). */
static void storm_counts(long long expected) {
    long long posted = 0, dups = 0, mn = -1, mx = 0, short_sum = 0, over_sum = 0;
    long long other_posted = 0, other_dups = 0;
    int live = 0, exact = 0, nshort = 0, nover = 0, with_dups = 0;
    for (int i = 0; i < opt.conns; i++) {
        conn_t *c = &conns[i];
        if (!c->ready) {
            other_posted += c->posted;
            other_dups += c->dups;
            continue;
        }
        live++;
        posted += c->posted;
        dups += c->dups;
        if (c->dups) with_dups++;
        if (mn < 0 || c->posted < mn) mn = c->posted;
        if (c->posted > mx) mx = c->posted;
        if (c->posted == expected) exact++;
        if (c->posted < expected) nshort++, short_sum += expected - c->posted;
        if (c->posted > expected) nover++, over_sum += c->posted - expected;
    }
    printf("COUNTS {\"conns\":%d,\"live\":%d,\"expected\":%lld,\"posted\":%lld,\"dups\":%lld,"
           "\"min_posted\":%lld,\"max_posted\":%lld,\"conns_exact\":%d,\"conns_short\":%d,"
           "\"short_sum\":%lld,\"conns_over\":%d,\"over_sum\":%lld,\"conns_with_dups\":%d,"
           "\"not_live\":%d,\"not_live_posted\":%lld,\"not_live_dups\":%lld}\n",
           opt.conns, live, expected, posted, dups, mn < 0 ? 0 : mn, mx, exact, nshort, short_sum,
           nover, over_sum, with_dups, opt.conns - live, other_posted, other_dups);
    fflush(stdout);
}

static void quit(int code) {
    for (int i = 0; i < opt.conns; i++) { /* best effort close frame (1000), then drop */
        conn_t *c = &conns[i];
        if (c->st == C_OPEN) {
            unsigned char code1000[2] = {0x03, 0xe8};
            send_frame(c, 0x8, code1000, 2);
        }
        if (c->fd >= 0 && c->st != C_CLOSED && c->st != C_IDLE) close(c->fd);
    }
    exit(code);
}

/* Returns 1 when the program should quit. */
static int on_stdin(void) {
    static char line[256];
    static size_t len;
    ssize_t k = read(0, line + len, sizeof line - 1 - len);
    if (k <= 0) return 1;
    len += (size_t)k;
    char *nl;
    while ((nl = memchr(line, '\n', len)) != NULL) {
        *nl = 0;
        long long expected, timeout_ms;
        if (strncmp(line, "QUIT", 4) == 0) return 1;
        long long mark_ns;
        if (sscanf(line, "RUN %lld %lld", &expected, &timeout_ms) == 2) {
            if (ph.armed) die("RUN while a phase is armed");
            phase_arm(expected, timeout_ms);
        } else if (opt.storm && sscanf(line, "MARK %lld", &mark_ns) == 1) {
            round_no++; /* the next round starts: its counters start from zero */
            round_t0 = mark_ns;
            round_reported = 0;
            memset(&rs, 0, sizeof rs);
            retries = max_inflight = 0;
            printf("MARKED %d\n", round_no);
            fflush(stdout);
        } else if (opt.storm && sscanf(line, "COUNTS %lld", &expected) == 1) {
            storm_counts(expected);
        } else {
            fprintf(stderr, "wsblast: unknown command: %s\n", line);
        }
        size_t used = (size_t)(nl - line) + 1;
        memmove(line, line + used, len - used);
        len -= used;
    }
    if (len == sizeof line - 1) len = 0; /* absurd line: drop it */
    return 0;
}

/* -------------------------------------------------------------------------------- setup */

static void load_auth(void) {
    if (!opt.auth_file) return;
    FILE *f = fopen(opt.auth_file, "r");
    if (!f) die("cannot open %s: %s", opt.auth_file, strerror(errno));
    auth_lines = xrealloc(NULL, sizeof(char *) * (size_t)opt.conns);
    char *line = NULL;
    size_t cap = 0;
    int i = 0;
    ssize_t n;
    while (i < opt.conns && (n = getline(&line, &cap, f)) >= 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        auth_lines[i++] = strdup(line);
    }
    free(line);
    fclose(f);
    if (i < opt.conns) die("%s has %d lines, need %d", opt.auth_file, i, opt.conns);
}

static void usage(void) {
    fprintf(stderr,
            "usage: wsblast --port P [--host H] [--path /] [--conns N] [--batch B]\n"
            "  [--auth-file F] [--ready-frames K] [--ready-match S] [--fail-match S]\n"
            "  [--count-match S] [--lat-every K] [--heartbeat-ms MS --heartbeat-text S]\n"
            "  [--connect-timeout-ms MS] [--max-seconds S]\n"
            "  [--expect-per-conn M [--phase-timeout-ms MS]] [--attempts K]\n"
            "  [--storm [--conn-timeout-ms MS] [--storm-max-ms MS] [--go] [--resume]\n"
            "    [--failover-port P2] [--jitter-ms J] [--backoff-ms B] [--backoff-cap-ms C]]\n"
            "  (--batch 0: no limit)\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    static const struct option lo[] = {
        {"host", 1, 0, 'h'},          {"port", 1, 0, 'p'},         {"path", 1, 0, 'P'},
        {"conns", 1, 0, 'n'},         {"batch", 1, 0, 'b'},        {"auth-file", 1, 0, 'a'},
        {"ready-frames", 1, 0, 'k'},  {"ready-match", 1, 0, 'r'},  {"fail-match", 1, 0, 'f'},
        {"count-match", 1, 0, 'c'},   {"lat-every", 1, 0, 'l'},    {"heartbeat-ms", 1, 0, 'H'},
        {"heartbeat-text", 1, 0, 'T'}, {"connect-timeout-ms", 1, 0, 'C'},
        {"max-seconds", 1, 0, 'm'},   {"expect-per-conn", 1, 0, 'e'},
        {"phase-timeout-ms", 1, 0, 't'}, {"storm", 0, 0, 'S'},
        {"attempts", 1, 0, 'A'},      {"conn-timeout-ms", 1, 0, 'O'},
        {"failover-port", 1, 0, 'F'}, {"resume", 0, 0, 'R'},       {"go", 0, 0, 'G'},
        {"jitter-ms", 1, 0, 'J'},     {"backoff-ms", 1, 0, 'B'},   {"backoff-cap-ms", 1, 0, 'X'},
        {"storm-max-ms", 1, 0, 'M'},  {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'P': opt.path = optarg; break;
        case 'n': opt.conns = atoi(optarg); break;
        case 'b': opt.batch = atoi(optarg); break;
        case 'a': opt.auth_file = optarg; break;
        case 'k': opt.ready_frames = atoi(optarg); break;
        case 'r': opt.ready_match = optarg; break;
        case 'f': opt.fail_match = optarg; break;
        case 'c': opt.count_match = optarg; break;
        case 'l': opt.lat_every = atoi(optarg); break;
        case 'H': opt.heartbeat_ms = atoll(optarg); break;
        case 'T': opt.hb_text = optarg; break;
        case 'C': opt.connect_timeout_ms = atoll(optarg); break;
        case 'm': opt.max_seconds = atoll(optarg); break;
        case 'e': opt.expect_per_conn = atoll(optarg); break;
        case 't': opt.phase_timeout_ms = atoll(optarg); break;
        case 'S': opt.storm = 1; break;
        case 'A': opt.attempts = atoi(optarg); break;
        case 'O': opt.conn_timeout_ms = atoll(optarg); break;
        case 'F': opt.failover_port = atoi(optarg); break;
        case 'R': opt.resume = 1; break;
        case 'G': opt.go = 1; break;
        case 'J': opt.jitter_ms = atoll(optarg); break;
        case 'B': opt.backoff_ms = atoll(optarg); break;
        case 'X': opt.backoff_cap_ms = atoll(optarg); break;
        case 'M': opt.storm_max_ms = atoll(optarg); break;
        default: usage();
        }
    }
    if (opt.port <= 0 || opt.conns <= 0 || opt.batch < 0 || opt.lat_every <= 0) usage();
    if (opt.batch == 0) opt.batch = opt.conns; /* no limit */
    if (opt.attempts <= 0 || opt.conn_timeout_ms <= 0) usage();
    if (opt.storm && opt.expect_per_conn >= 0) usage(); /* a storm reports, then waits for QUIT */
    if (opt.heartbeat_ms > 0 && !opt.hb_text[0]) usage();
    if (opt.jitter_ms < 0 || opt.backoff_ms < 0 || opt.backoff_cap_ms < opt.backoff_ms) usage();
    if (!opt.storm && (opt.failover_port || opt.resume || opt.go || opt.storm_max_ms)) usage();
}

/* --go: print WAITING, then block until a "GO" line on stdin (several processes start their
 * storms together). Reads byte by byte: what follows GO stays for on_stdin. */
static void wait_go(void) {
    printf("WAITING\n");
    fflush(stdout);
    char line[64];
    size_t len = 0;
    for (;;) {
        char ch;
        ssize_t k = read(0, &ch, 1);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) die("stdin closed before GO");
        if (ch != '\n') {
            if (len < sizeof line - 1) line[len++] = ch;
            continue;
        }
        line[len] = 0;
        if (strcmp(line, "GO") == 0) return;
        if (strcmp(line, "QUIT") == 0) exit(0);
        len = 0;
    }
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    rng_state = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32) ^ 0x9E3779B97F4A7C15ULL;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &addr.sin_addr) != 1) die("bad IPv4 address %s", opt.host);
    addr2 = addr;
    addr2.sin_port = htons((uint16_t)opt.failover_port);
    load_auth();

    conns = calloc((size_t)opt.conns, sizeof *conns);
    todo = malloc(sizeof(int) * (size_t)opt.conns);
    if (!conns || !todo) die("out of memory");
    for (int i = 0; i < opt.conns; i++) {
        conns[i].idx = i, conns[i].fd = -1;
        conns[i].hint_ms = conns[i].live_round = conns[i].gave_up_round = -1;
        todo[todo_len++] = opt.conns - 1 - i; /* popped from the end: 0 first */
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1: %s", strerror(errno));
    int use_stdin = opt.expect_per_conn < 0;
    if (use_stdin) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = STDIN_TAG};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) < 0) die("stdin must be a pipe (or use --expect-per-conn)");
    }

    if (opt.go) wait_go();
    int64_t start = now_ns(), ready_ns = 0, next_hb = 0, next_scan = 0;
    round_t0 = start;
    int64_t hard_end = start + opt.max_seconds * 1000000000LL;
    struct epoll_event evs[512];
    for (;;) {
        while (todo_len && inflight < opt.batch) start_connect(&conns[todo[--todo_len]]);
        int64_t now = now_ns();
        if (opt.storm && (need_scan || now >= next_scan)) {
            need_scan = 0;
            int busy = storm_scan(now);
            /* timeouts and reconnects every 2 ms while connections are on their way */
            next_scan = now + (busy || !round_reported ? 2000000LL : 100000000LL);
        }
        if (!opt.storm && !ready_ns && nready == opt.conns) {
            ready_ns = now;
            struct rusage ru;
            getrusage(RUSAGE_SELF, &ru);
            printf("READY {\"conns\":%d,\"connect_ms\":%.1f,\"retries\":%d,\"cpu_s\":%.3f}\n",
                   opt.conns, (double)(now - start) / 1e6, retries,
                   cpu_s(&ru.ru_utime) + cpu_s(&ru.ru_stime));
            fflush(stdout);
            next_hb = now + opt.heartbeat_ms * 1000000LL;
            if (!use_stdin) phase_arm(opt.expect_per_conn * opt.conns, opt.phase_timeout_ms);
        }
        if (!opt.storm && !ready_ns && now - start > opt.connect_timeout_ms * 1000000LL)
            die("only %d of %d connections ready after %lld ms", nready, opt.conns,
                opt.connect_timeout_ms);
        if (ph.armed && (ph.frames >= ph.expected || now >= ph.deadline_ns)) {
            phase_report(now);
            if (!use_stdin) quit(0);
        }
        if (now >= hard_end) {
            fprintf(stderr, "wsblast: --max-seconds reached, exiting\n");
            quit(3);
        }
        if (!opt.storm && ready_ns && opt.heartbeat_ms > 0 && now >= next_hb) {
            for (int i = 0; i < opt.conns; i++)
                if (conns[i].st == C_OPEN && conns[i].ready) send_frame(&conns[i], 0x1, opt.hb_text, strlen(opt.hb_text));
            next_hb = now + opt.heartbeat_ms * 1000000LL;
        }

        int64_t wake = hard_end;
        if (!ready_ns) wake = now + 100000000LL; /* re-check connect progress every 100 ms */
        if (opt.storm && next_scan < wake) wake = next_scan;
        if (ph.armed && ph.deadline_ns < wake) wake = ph.deadline_ns;
        if (!opt.storm && ready_ns && opt.heartbeat_ms > 0 && next_hb < wake) wake = next_hb;
        int64_t wait_ms = wake > now ? (wake - now + 999999LL) / 1000000LL : 0;
        if (need_scan) wait_ms = 0;
        int timeout = wait_ms > 1000000 ? 1000000 : (int)wait_ms;
        int n = epoll_wait(ep, evs, 512, timeout);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == STDIN_TAG) {
                if (on_stdin()) quit(0);
                continue;
            }
            conn_t *c = &conns[evs[i].data.u64];
            if (c->st != C_IDLE && c->st != C_CLOSED && c->st != C_WAIT) on_event(c, evs[i].events);
        }
    }
}
