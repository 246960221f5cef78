/* Paced-stream load generator, for bench/paced.py.
 *
 * Opens N keep-alive connections to HOST:PORT (at most MAX_CONNECTING handshakes at a time, all
 * before the clock starts), then starts one stream per connection, the N starts spread evenly over
 * one pacing interval (or SPREAD_MS), and runs streams back to back on each connection: a new one
 * starts as soon as the previous one ends, until the window is over (or K streams ran on it). Every
 * stream's de-chunked body is cut into SSE events at each blank line ("\n\n"; CRs are ignored, so
 * "\r\n\r\n" counts too, and an event split across reads is joined); each event's arrival is
 * stamped once per read. Also measured: each stream's length, request written to last event.
 *
 * A stream is complete when its response is 200, its body ends cleanly (terminating chunk, its
 * Content-Length, or the close of a response framed by it) and it carried `data: [DONE]`. Anything
 * else fails it: a status, a cut, no bytes for STALL seconds, or still running at the global
 * deadline. One JSON line on stdout: counts, time to first event (warm: streams after the first on
 * their TCP connection; cold: the first), inter-event gaps, events/s.
 *
 * usage: loadgen -p PORT -c N [-a 127.0.0.1] [-m POST] [-u PATH] [-H 'Name: value']... [-d BODY]
 *                [-i INTERVAL_MS] [-w WINDOW_S] [-k STREAMS_PER_CONN] [-s STALL_S] [-T DEADLINE_S]
 *                [-g GAP_LIMIT_MS] [-S SPREAD_MS]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNECTING 128
#define MAX_HEAD (64 * 1024)
#define EVENT_PREFIX 16 /* bytes of each event kept, to recognise "data: [DONE]" */
#define TICK_NS (20 * 1000000LL)

/* --- a log-linear histogram of microseconds: exact below 1024, then 512 steps per doubling --- */
#define HIST_BUCKETS (1024 + 54 * 512)
typedef struct hist {
    uint64_t count, max;
    uint32_t buckets[HIST_BUCKETS];
} hist;

static int hist_index(uint64_t v) {
    if (v < 1024) return (int)v;
    int e = 63 - __builtin_clzll(v);
    return 1024 + (e - 10) * 512 + (int)((v >> (e - 9)) - 512);
}

static double hist_value(int index) { /* the middle of a bucket */
    if (index < 1024) return index;
    int e = (index - 1024) / 512 + 10;
    uint64_t m = (index - 1024) % 512 + 512;
    return (double)(m << (e - 9)) + (double)(1ULL << (e - 9)) / 2;
}

static void hist_add(hist *h, uint64_t us) {
    h->count++;
    if (us > h->max) h->max = us;
    h->buckets[hist_index(us)]++;
}

static double hist_ms(const hist *h, double share) { /* the value at rank floor(count x share) */
    if (!h->count) return -1;
    uint64_t rank = (uint64_t)(h->count * share), seen = 0;
    if (rank >= h->count) rank = h->count - 1;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += h->buckets[i];
        if (seen > rank) {
            double v = hist_value(i);
            return (v > (double)h->max ? (double)h->max : v) / 1000.0;
        }
    }
    return h->max / 1000.0;
}

/* --- connections ------------------------------------------------------------------------------- */
enum { P_IDLE, P_CONNECTING, P_READY, P_SENDING, P_HEAD, P_BODY, P_FINISHED };
enum { F_CHUNKED, F_LENGTH, F_CLOSE };
enum { CS_SIZE, CS_EXT, CS_DATA, CS_DATA_END, CS_TRAILER_START, CS_TRAILER_LINE };

typedef struct conn {
    int fd, index, phase;
    uint32_t generation;     /* of the current socket: an epoll event for an earlier one is stale */
    int send_when_connected; /* a reconnect: send at once instead of waiting for the start */
    int on_this_tcp;         /* streams begun on the current TCP connection */
    int started;             /* streams begun by this slot */
    int64_t start_at, sent_at, last_event_at, active_at;
    size_t request_off;
    char *head;
    size_t head_len;
    int status, framing, close_after;
    long long body_left;
    int cstate;
    long long chunk_left;
    int prev_newline, prefix_len, events, done_seen;
    char prefix[EVENT_PREFIX];
} conn;

static conn *conns;
static int nconns, epfd;
static char *request;
static size_t request_len;
static struct sockaddr_in target;
static int64_t spread_ns = -1, interval_ns = 20 * 1000000LL, window_ns = 5000000000LL, stall_ns = 5000000000LL;
static int64_t deadline_ns, gap_limit_ns = 200 * 1000000LL, window_end, clock_start;
static int per_conn_limit;
static int connecting_now;

static struct {
    uint64_t completed, failed, connect_failed, bad_status, cut, incomplete, stalled, unfinished, events, gaps_over;
    uint64_t min_events, max_events;
    int64_t first_send, last_event, max_batch_ns;
    uint64_t batches, batch_events;
} stats = {.min_events = UINT64_MAX};
static hist ttft_warm, ttft_cold, gaps, durations; /* durations: request written to last event */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void watch(conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)c->generation << 32 | (uint32_t)c->index};
    epoll_ctl(epfd, op, c->fd, &ev);
}

static void drop_tcp(conn *c) {
    if (c->fd >= 0) {
        if (c->phase == P_CONNECTING) connecting_now--;
        close(c->fd);
        c->fd = -1;
    }
}

static void finish_slot(conn *c) {
    drop_tcp(c);
    c->phase = P_FINISHED;
    free(c->head);
    c->head = NULL;
}

static int begin_connect(conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    c->phase = P_CONNECTING;
    c->generation++;
    c->on_this_tcp = 0;
    c->active_at = now_ns();
    connecting_now++;
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
    return 0;
}

static int can_start_another(conn *c, int64_t now) {
    return now < window_end && (per_conn_limit == 0 || c->started < per_conn_limit);
}

static void send_request(conn *c, int64_t now);

/* Between streams: the next one on this slot, on a new connection if the server closes this one. */
static void next_stream(conn *c, int64_t now) {
    if (!can_start_another(c, now)) {
        finish_slot(c);
        return;
    }
    if (c->close_after || c->fd < 0) {
        drop_tcp(c);
        c->send_when_connected = 1;
        if (begin_connect(c) < 0) {
            stats.connect_failed++;
            stats.failed++;
            finish_slot(c);
        }
        return;
    }
    send_request(c, now);
}

/* A stream ended: count it, then the next one (a failure ends the slot). */
static void end_stream(conn *c, int ok, int64_t now) {
    free(c->head);
    c->head = NULL;
    if (!ok) {
        stats.failed++;
        finish_slot(c);
        return;
    }
    stats.completed++;
    hist_add(&durations, (uint64_t)(c->last_event_at - c->sent_at) / 1000);
    if ((uint64_t)c->events < stats.min_events) stats.min_events = c->events;
    if ((uint64_t)c->events > stats.max_events) stats.max_events = c->events;
    next_stream(c, now);
}

static void send_request(conn *c, int64_t now) {
    c->started++;
    c->on_this_tcp++;
    now = now_ns(); /* not the batch's time: the requests of one batch go out one after another */
    c->sent_at = now;
    c->active_at = now;
    c->last_event_at = 0;
    c->request_off = 0;
    c->head_len = 0;
    c->events = c->done_seen = c->prefix_len = c->prev_newline = 0;
    if (!stats.first_send || now < stats.first_send) stats.first_send = now;
    ssize_t n = write(c->fd, request, request_len);
    if (n < 0 && errno != EAGAIN) {
        stats.cut++;
        end_stream(c, 0, now);
        return;
    }
    c->request_off = n < 0 ? 0 : (size_t)n;
    if (c->request_off < request_len) {
        c->phase = P_SENDING;
        watch(c, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
    } else {
        c->phase = P_HEAD;
    }
}

/* SSE: bytes of the de-chunked body. */
static void sse_feed(conn *c, const char *data, size_t len, int64_t now) {
    for (size_t i = 0; i < len; i++) {
        char ch = data[i];
        if (ch == '\r') continue;
        if (ch == '\n') {
            if (c->prev_newline) {
                c->prev_newline = 0;
                if (c->prefix_len == 0) continue; /* blank lines between events */
                if (c->events == 0) {
                    uint64_t us = (uint64_t)(now - c->sent_at) / 1000;
                    hist_add(c->on_this_tcp > 1 ? &ttft_warm : &ttft_cold, us);
                } else {
                    int64_t gap = now - c->last_event_at;
                    hist_add(&gaps, (uint64_t)gap / 1000);
                    if (gap > gap_limit_ns) stats.gaps_over++;
                }
                c->events++;
                stats.events++;
                c->last_event_at = now;
                stats.last_event = now;
                if (c->prefix_len >= 12 && memcmp(c->prefix, "data: [DONE]", 12) == 0) c->done_seen = 1;
                c->prefix_len = 0;
                continue;
            }
            c->prev_newline = 1;
        } else {
            c->prev_newline = 0;
        }
        if (c->prefix_len < EVENT_PREFIX) c->prefix[c->prefix_len++] = ch;
    }
}

static void body_done(conn *c, int64_t now) {
    int ok = c->status == 200 && c->done_seen;
    if (!ok) {
        if (c->status != 200)
            stats.bad_status++;
        else
            stats.incomplete++;
    }
    c->phase = P_READY;
    end_stream(c, ok, now);
}

/* The de-chunking state machine; returns bytes used (all of them unless the body ended). */
static size_t chunked_feed(conn *c, const char *data, size_t len, int64_t now) {
    size_t i = 0;
    while (i < len) {
        char ch = data[i];
        switch (c->cstate) {
        case CS_SIZE:
            i++;
            if (ch == '\n') {
                c->cstate = c->chunk_left ? CS_DATA : CS_TRAILER_START;
            } else if (ch == ';') {
                c->cstate = CS_EXT;
            } else if (ch != '\r') {
                int digit = ch >= '0' && ch <= '9' ? ch - '0' : (ch | 32) >= 'a' && (ch | 32) <= 'f' ? (ch | 32) - 'a' + 10 : -1;
                if (digit < 0) return (size_t)-1;
                c->chunk_left = c->chunk_left * 16 + digit;
            }
            break;
        case CS_EXT:
            i++;
            if (ch == '\n') c->cstate = c->chunk_left ? CS_DATA : CS_TRAILER_START;
            break;
        case CS_DATA: {
            size_t take = len - i < (size_t)c->chunk_left ? len - i : (size_t)c->chunk_left;
            sse_feed(c, data + i, take, now);
            i += take;
            c->chunk_left -= take;
            if (!c->chunk_left) c->cstate = CS_DATA_END;
            break;
        }
        case CS_DATA_END:
            i++;
            if (ch == '\n') {
                c->cstate = CS_SIZE;
                c->chunk_left = 0;
            }
            break;
        case CS_TRAILER_START:
            i++;
            if (ch == '\n') {
                body_done(c, now);
                return i;
            }
            if (ch != '\r') c->cstate = CS_TRAILER_LINE;
            break;
        case CS_TRAILER_LINE:
            i++;
            if (ch == '\n') c->cstate = CS_TRAILER_START;
            break;
        }
    }
    return i;
}

static int header_value(const char *head, size_t len, const char *name, char *out, size_t out_size) {
    size_t name_len = strlen(name);
    const char *line = memchr(head, '\n', len), *end = head + len;
    while (line && line < end) {
        line++;
        const char *eol = memchr(line, '\n', end - line);
        if (!eol) break;
        if ((size_t)(eol - line) > name_len && strncasecmp(line, name, name_len) == 0 && line[name_len] == ':') {
            const char *v = line + name_len + 1;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            size_t n = eol - v;
            if (n && v[n - 1] == '\r') n--;
            if (n >= out_size) n = out_size - 1;
            memcpy(out, v, n);
            out[n] = 0;
            return 1;
        }
        line = eol;
    }
    return 0;
}

/* The head is complete in c->head[0..head_end): read its status and framing. */
static void parse_head(conn *c, size_t head_end) {
    char value[256];
    c->status = 0;
    if (head_end > 12 && memcmp(c->head, "HTTP/1.", 7) == 0) c->status = atoi(c->head + 9);
    c->close_after = memcmp(c->head, "HTTP/1.0", 8) == 0;
    if (header_value(c->head, head_end, "connection", value, sizeof value) && strcasestr(value, "close"))
        c->close_after = 1;
    if (header_value(c->head, head_end, "transfer-encoding", value, sizeof value) && strcasestr(value, "chunked")) {
        c->framing = F_CHUNKED;
        c->cstate = CS_SIZE;
        c->chunk_left = 0;
    } else if (header_value(c->head, head_end, "content-length", value, sizeof value)) {
        c->framing = F_LENGTH;
        c->body_left = atoll(value);
    } else {
        c->framing = F_CLOSE;
        c->close_after = 1;
    }
}

/* Response bytes; what follows the end of a response in the same read is ignored. */
static void feed(conn *c, const char *data, size_t len, int64_t now) {
    if (c->phase == P_HEAD) {
        if (!c->head) c->head = malloc(MAX_HEAD);
        size_t take = len < MAX_HEAD - c->head_len ? len : MAX_HEAD - c->head_len;
        memcpy(c->head + c->head_len, data, take);
        size_t scan_from = c->head_len > 3 ? c->head_len - 3 : 0;
        c->head_len += take;
        char *end = memmem(c->head + scan_from, c->head_len - scan_from, "\r\n\r\n", 4);
        if (!end) {
            if (c->head_len == MAX_HEAD) {
                stats.cut++;
                end_stream(c, 0, now);
            }
            return;
        }
        size_t head_end = end + 4 - c->head;
        parse_head(c, head_end);
        size_t used = head_end - (c->head_len - take); /* bytes of `data` that were head */
        c->phase = P_BODY;
        data += used;
        len -= used;
        if (c->framing == F_LENGTH && c->body_left == 0) {
            body_done(c, now);
            return;
        }
    }
    if (c->phase != P_BODY || len == 0) return;
    if (c->framing == F_CHUNKED) {
        size_t used = chunked_feed(c, data, len, now);
        if (used == (size_t)-1) {
            stats.cut++;
            end_stream(c, 0, now);
        }
    } else if (c->framing == F_LENGTH) {
        size_t take = len < (size_t)c->body_left ? len : (size_t)c->body_left;
        sse_feed(c, data, take, now);
        c->body_left -= take;
        if (!c->body_left) body_done(c, now);
    } else {
        sse_feed(c, data, len, now);
    }
}

static void on_event(conn *c, uint32_t events, int64_t now) {
    if (c->phase == P_CONNECTING) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int error = 0;
        socklen_t size = sizeof error;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &size);
        if (error) {
            stats.connect_failed++;
            stats.failed++;
            finish_slot(c);
            return;
        }
        connecting_now--;
        c->phase = P_READY;
        watch(c, EPOLLIN, EPOLL_CTL_MOD);
        if (c->send_when_connected) send_request(c, now);
        return;
    }
    if (c->phase == P_SENDING && (events & EPOLLOUT)) {
        ssize_t n = write(c->fd, request + c->request_off, request_len - c->request_off);
        if (n < 0 && errno != EAGAIN) {
            stats.cut++;
            end_stream(c, 0, now);
            return;
        }
        if (n > 0) c->request_off += n;
        if (c->request_off == request_len) {
            c->phase = P_HEAD;
            watch(c, EPOLLIN, EPOLL_CTL_MOD);
        }
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    static char data[256 * 1024];
    int fd = c->fd;
    for (;;) {
        ssize_t n = read(fd, data, sizeof data);
        if (n > 0) {
            if (c->phase == P_HEAD || c->phase == P_BODY) {
                c->active_at = now;
                feed(c, data, (size_t)n, now);
            }
            if ((size_t)n < sizeof data || c->fd != fd) return;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        /* EOF or error */
        if (c->phase == P_BODY && c->framing == F_CLOSE && n == 0) {
            drop_tcp(c);
            body_done(c, now);
        } else if (c->phase == P_HEAD || c->phase == P_BODY || c->phase == P_SENDING) {
            stats.cut++;
            drop_tcp(c);
            end_stream(c, 0, now);
        } else { /* an idle connection closed between streams: reconnect for the next */
            drop_tcp(c);
            c->phase = P_READY;
            next_stream(c, now);
        }
        return;
    }
}

/* Arrivals are stamped with the time epoll_wait returned (they were all there by then), not when
 * each is handled: handling a batch takes a while, and stamps would grow along it. Requests are
 * stamped when they are written (send_request). */
static void dispatch(const struct epoll_event *event, int64_t batch_time) {
    conn *c = &conns[(uint32_t)event->data.u64];
    if (c->phase != P_FINISHED && c->fd >= 0 && c->generation == (uint32_t)(event->data.u64 >> 32))
        on_event(c, event->events, batch_time);
}

static void raise_nofile(void) {
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

static void usage(const char *name) {
    fprintf(stderr,
            "usage: %s -p PORT -c N [-a HOST] [-m METHOD] [-u PATH] [-H 'Name: value']... [-d BODY]\n"
            "          [-i INTERVAL_MS] [-w WINDOW_S] [-k STREAMS_PER_CONN] [-s STALL_S] [-T DEADLINE_S] "
            "[-g GAP_LIMIT_MS] [-S SPREAD_MS]\n",
            name);
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *method = "POST", *path = "/v1/chat/completions", *body = "";
    char *headers = calloc(1, 1);
    size_t headers_len = 0;
    int port = 0, opt, has_type = 0;
    double deadline_s = 0;
    while ((opt = getopt(argc, argv, "a:p:c:m:u:H:d:i:w:k:s:T:g:S:")) != -1) {
        switch (opt) {
        case 'a': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': nconns = atoi(optarg); break;
        case 'm': method = optarg; break;
        case 'u': path = optarg; break;
        case 'H':
            headers = realloc(headers, headers_len + strlen(optarg) + 3);
            headers_len += sprintf(headers + headers_len, "%s\r\n", optarg);
            if (strncasecmp(optarg, "content-type:", 13) == 0) has_type = 1;
            break;
        case 'd': body = optarg; break;
        case 'i': interval_ns = (int64_t)(atof(optarg) * 1e6); break;
        case 'w': window_ns = (int64_t)(atof(optarg) * 1e9); break;
        case 'k': per_conn_limit = atoi(optarg); break;
        case 's': stall_ns = (int64_t)(atof(optarg) * 1e9); break;
        case 'T': deadline_s = atof(optarg); break;
        case 'g': gap_limit_ns = (int64_t)(atof(optarg) * 1e6); break;
        case 'S': spread_ns = (int64_t)(atof(optarg) * 1e6); break;
        default: usage(argv[0]);
        }
    }
    if (port <= 0 || nconns <= 0 || interval_ns <= 0) usage(argv[0]);
    if (deadline_s <= 0) deadline_s = window_ns / 1e9 + 30;
    if (spread_ns < 0) spread_ns = interval_ns;
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();

    target.sin_family = AF_INET;
    target.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &target.sin_addr) != 1) usage(argv[0]);
    size_t body_len = strlen(body);
    request = malloc(strlen(method) + strlen(path) + strlen(host) + headers_len + body_len + 256);
    request_len = sprintf(request, "%s %s HTTP/1.1\r\nHost: %s:%d\r\n%s%sContent-Length: %zu\r\n\r\n%s", method, path,
                          host, port, headers, has_type ? "" : "Content-Type: application/json\r\n", body_len, body);

    epfd = epoll_create1(0);
    conns = calloc(nconns, sizeof(conn));
    int64_t begun = now_ns();
    deadline_ns = begun + (int64_t)(deadline_s * 1e9);
    struct epoll_event events[1024];

    /* Every connection first, a bounded number of handshakes at a time. */
    int next_connect = 0, ready = 0;
    for (int i = 0; i < nconns; i++) {
        conns[i].index = i;
        conns[i].fd = -1;
    }
    while (ready < nconns) {
        while (next_connect < nconns && connecting_now < MAX_CONNECTING) {
            conn *c = &conns[next_connect++];
            if (begin_connect(c) < 0) {
                stats.connect_failed++;
                stats.failed++;
                c->phase = P_FINISHED;
            }
        }
        int64_t now = now_ns();
        if (now > deadline_ns) break;
        int n = epoll_wait(epfd, events, 1024, 100);
        now = now_ns();
        for (int i = 0; i < n; i++) dispatch(&events[i], now);
        ready = 0;
        for (int i = 0; i < nconns; i++) ready += conns[i].phase == P_READY || conns[i].phase == P_FINISHED;
    }

    /* The clock starts: slot i's first stream at i/N of one interval. */
    clock_start = now_ns();
    window_end = clock_start + window_ns;
    for (int i = 0; i < nconns; i++) conns[i].start_at = clock_start + spread_ns * i / nconns;
    int next_start = 0;
    int64_t next_tick = clock_start + TICK_NS;
    for (;;) {
        int64_t now = now_ns();
        while (next_start < nconns && conns[next_start].start_at <= now) {
            conn *c = &conns[next_start++];
            if (c->phase == P_READY) send_request(c, now);
            else if (c->phase == P_CONNECTING) c->send_when_connected = 1;
        }
        if (now >= next_tick) { /* stalls: no byte for stall_ns */
            next_tick = now + TICK_NS;
            int live = next_start < nconns;
            for (int i = 0; i < nconns; i++) {
                conn *c = &conns[i];
                if (c->phase == P_FINISHED) continue;
                live = 1;
                int active = c->phase >= P_SENDING && c->phase <= P_BODY;
                if ((active || c->phase == P_CONNECTING) && now - c->active_at > stall_ns) {
                    if (c->phase == P_CONNECTING) stats.connect_failed++;
                    stats.stalled++;
                    stats.failed++;
                    finish_slot(c);
                }
            }
            if (!live) break;
        }
        if (now >= deadline_ns) {
            for (int i = 0; i < nconns; i++) {
                conn *c = &conns[i];
                if (c->phase >= P_SENDING && c->phase <= P_BODY) {
                    stats.unfinished++;
                    stats.failed++;
                }
                if (c->phase != P_FINISHED) finish_slot(c);
            }
            break;
        }
        int64_t wake = next_tick;
        if (next_start < nconns && conns[next_start].start_at < wake) wake = conns[next_start].start_at;
        int timeout = wake <= now ? 0 : (int)((wake - now + 999999) / 1000000);
        int n = epoll_wait(epfd, events, 1024, timeout);
        now = now_ns();
        for (int i = 0; i < n; i++) dispatch(&events[i], now);
        if (n > 0) {
            int64_t spent = now_ns() - now;
            stats.batches++;
            stats.batch_events += n;
            if (spent > stats.max_batch_ns) stats.max_batch_ns = spent;
        }
    }

    double elapsed = (stats.last_event > stats.first_send ? stats.last_event - stats.first_send : 1) / 1e9;
    printf("{\"connections\":%d,\"window_s\":%.3f,\"completed\":%lu,\"failed\":%lu,\"connect_failed\":%lu,"
           "\"bad_status\":%lu,\"cut\":%lu,\"incomplete\":%lu,\"stalled\":%lu,\"unfinished\":%lu,"
           "\"events\":%lu,\"elapsed_s\":%.3f,\"events_per_s\":%.1f,\"events_per_stream_min\":%lu,"
           "\"events_per_stream_max\":%lu,"
           "\"ttft_samples\":%lu,\"ttft_p50_ms\":%.3f,\"ttft_p99_ms\":%.3f,\"ttft_max_ms\":%.3f,"
           "\"ttft_cold_samples\":%lu,\"ttft_cold_p50_ms\":%.3f,\"ttft_cold_p99_ms\":%.3f,"
           "\"gap_samples\":%lu,\"gap_p50_ms\":%.3f,\"gap_p99_ms\":%.3f,\"gap_max_ms\":%.3f,\"gaps_over\":%lu,"
           "\"stream_p50_ms\":%.1f,\"stream_p99_ms\":%.1f,\"stream_max_ms\":%.1f,"
           "\"batches\":%lu,\"mean_batch\":%.1f,\"max_batch_ms\":%.3f}\n",
           nconns, window_ns / 1e9, stats.completed, stats.failed, stats.connect_failed, stats.bad_status, stats.cut,
           stats.incomplete, stats.stalled, stats.unfinished, stats.events, elapsed, stats.events / elapsed,
           stats.completed ? stats.min_events : 0, stats.max_events, ttft_warm.count, hist_ms(&ttft_warm, 0.5),
           hist_ms(&ttft_warm, 0.99), ttft_warm.max / 1000.0, ttft_cold.count, hist_ms(&ttft_cold, 0.5),
           hist_ms(&ttft_cold, 0.99), gaps.count, hist_ms(&gaps, 0.5), hist_ms(&gaps, 0.99), gaps.max / 1000.0,
           stats.gaps_over, hist_ms(&durations, 0.5), hist_ms(&durations, 0.99), durations.max / 1000.0,
           stats.batches, stats.batches ? (double)stats.batch_events / stats.batches : 0,
           stats.max_batch_ns / 1e6);
    return 0;
}
