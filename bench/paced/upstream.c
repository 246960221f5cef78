/* A paced OpenAI Chat Completions SSE upstream, for bench/paced.py.
 *
 * HTTP/1.1 keep-alive on 127.0.0.1:PORT, one thread, epoll. Every request (any method and path)
 * is answered 200, text/event-stream, chunked: the head and the first delta at once, then one
 * delta every INTERVAL, each its own HTTP chunk and its own write, then one last chunk holding a
 * usage event and `data: [DONE]`, with the terminating chunk.
 *
 * The timer queue is a FIFO: every stream waits the same interval, so a stream appended with
 * "its last send + interval" is never due before one already queued. A stream keeps its schedule
 * (last due time + interval), so a late wake-up does not shift the rest of its events.
 *
 * usage: upstream -p PORT [-n EVENTS] [-i INTERVAL_MS]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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

#define MAX_HEAD (64 * 1024)
#define MAX_PENDING_OUT (4 * 1024 * 1024) /* a peer that stops reading past this is dropped */

typedef struct buf {
    char *data;
    size_t len, cap;
} buf;

enum { READ_HEAD, READ_BODY, STREAMING };

typedef struct conn {
    int fd;
    int state;
    int closing;      /* close once the current stream is written (Connection: close) */
    int dead;         /* closed; freed when it leaves the timer queue */
    int queued;       /* in the timer queue */
    int want_out;     /* EPOLLOUT registered */
    int sent;         /* deltas sent in the current stream */
    size_t body_left; /* request body bytes still to skip */
    int body_chunked; /* a chunked request body: skipped to its terminating chunk */
    int64_t due;      /* next send, ns */
    struct conn *next;
    buf in, out;
} conn;

static int events_per_stream = 64;
static int64_t interval_ns = 20 * 1000000LL;
static char **delta_chunks; /* framed: "len\r\ndata: {...}\n\n\r\n" */
static size_t *delta_lens;
static char *final_chunk; /* usage event + [DONE], framed, then the terminating chunk */
static size_t final_len;
static const char HEAD[] = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                           "transfer-encoding: chunked\r\n\r\n";
static conn *queue_head, *queue_tail;
static conn *graveyard; /* closed, not queued: freed after the current pass (an event may still name one) */
static int epfd;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void buf_append(buf *b, const char *data, size_t len) {
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len) cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data) die("realloc");
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void buf_consume(buf *b, size_t len) {
    memmove(b->data, b->data + len, b->len - len);
    b->len -= len;
}

static char *frame(const char *payload, size_t len, size_t *framed_len) {
    char *out = malloc(len + 32);
    int n = sprintf(out, "%zx\r\n", len);
    memcpy(out + n, payload, len);
    memcpy(out + n + len, "\r\n", 2);
    *framed_len = n + len + 2;
    return out;
}

static void build_bodies(void) {
    char event[512];
    delta_chunks = calloc(events_per_stream, sizeof(char *));
    delta_lens = calloc(events_per_stream, sizeof(size_t));
    for (int i = 0; i < events_per_stream; i++) {
        int n = snprintf(event, sizeof event,
                         "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1795400000,"
                         "\"model\":\"gpt-bench\",\"choices\":[{\"index\":0,\"delta\":{%s\"content\":\"token%d \"},"
                         "\"finish_reason\":null}]}\n\n",
                         i == 0 ? "\"role\":\"assistant\"," : "", i);
        delta_chunks[i] = frame(event, n, &delta_lens[i]);
    }
    int n = snprintf(event, sizeof event,
                     "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1795400000,"
                     "\"model\":\"gpt-bench\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],"
                     "\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n"
                     "data: [DONE]\n\n",
                     events_per_stream, events_per_stream + 9);
    size_t framed;
    char *last = frame(event, n, &framed);
    final_chunk = malloc(framed + 5);
    memcpy(final_chunk, last, framed);
    memcpy(final_chunk + framed, "0\r\n\r\n", 5);
    final_len = framed + 5;
    free(last);
}

static void set_out_interest(conn *c, int want) {
    if (c->want_out == want) return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want;
}

static void conn_close(conn *c) {
    if (c->dead) return;
    c->dead = 1;
    close(c->fd);
    if (!c->queued) {
        c->next = graveyard;
        graveyard = c;
    }
}

static void conn_free(conn *c) {
    free(c->in.data);
    free(c->out.data);
    free(c);
}

/* Write now if nothing is pending, else queue behind what is. 0, or -1 when the connection closed. */
static int send_bytes(conn *c, const char *data, size_t len) {
    if (c->out.len == 0) {
        ssize_t n = write(c->fd, data, len);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                conn_close(c);
                return -1;
            }
            n = 0;
        }
        if ((size_t)n == len) return 0;
        data += n;
        len -= n;
    }
    if (c->out.len + len > MAX_PENDING_OUT) {
        conn_close(c);
        return -1;
    }
    buf_append(&c->out, data, len);
    set_out_interest(c, 1);
    return 0;
}

static void enqueue(conn *c, int64_t due) {
    c->due = due;
    c->next = NULL;
    c->queued = 1;
    if (queue_tail)
        queue_tail->next = c;
    else
        queue_head = c;
    queue_tail = c;
}

static void handle_input(conn *c);

/* The stream's next event is due: send it (or the end), then requeue or finish. */
static void stream_step(conn *c) {
    if (c->sent < events_per_stream) {
        int i = c->sent++;
        if (send_bytes(c, delta_chunks[i], delta_lens[i]) < 0) return;
        enqueue(c, c->due + interval_ns);
        return;
    }
    if (send_bytes(c, final_chunk, final_len) < 0) return;
    c->state = READ_HEAD;
    if (c->closing) {
        conn_close(c); /* the pending bytes of a closing peer are lost; it asked to close anyway */
        return;
    }
    handle_input(c); /* a pipelined request may wait in the buffer */
}

static int header_has(const char *head, size_t len, const char *name, const char *value) {
    /* Whether a header line "name: ...value..." is present (case-insensitive); crude but enough here. */
    size_t name_len = strlen(name);
    const char *line = memchr(head, '\n', len);
    while (line && (size_t)(line - head) < len) {
        line++;
        const char *end = memchr(line, '\n', len - (line - head));
        if (!end) break;
        if ((size_t)(end - line) > name_len && strncasecmp(line, name, name_len) == 0 && line[name_len] == ':') {
            if (!value) return 1;
            for (const char *p = line + name_len + 1; p + strlen(value) <= end; p++)
                if (strncasecmp(p, value, strlen(value)) == 0) return 1;
        }
        line = end;
    }
    return 0;
}

static long content_length(const char *head, size_t len) {
    const char *line = memchr(head, '\n', len);
    while (line && (size_t)(line - head) < len) {
        line++;
        if ((size_t)(len - (line - head)) > 15 && strncasecmp(line, "content-length:", 15) == 0)
            return strtol(line + 15, NULL, 10);
        line = memchr(line, '\n', len - (line - head));
    }
    return 0;
}

static void start_stream(conn *c) {
    c->state = STREAMING;
    c->sent = 0;
    /* The head and the first delta in one write: the first token leaves at once. */
    char first[4096];
    memcpy(first, HEAD, sizeof HEAD - 1);
    memcpy(first + sizeof HEAD - 1, delta_chunks[0], delta_lens[0]);
    c->sent = 1;
    if (send_bytes(c, first, sizeof HEAD - 1 + delta_lens[0]) < 0) return;
    enqueue(c, now_ns() + interval_ns);
}

/* Parse what is buffered: a head, then skip its body, then start the stream. */
static void handle_input(conn *c) {
    while (!c->dead && c->state != STREAMING) {
        if (c->state == READ_HEAD) {
            char *end = c->in.len ? memmem(c->in.data, c->in.len, "\r\n\r\n", 4) : NULL;
            if (!end) {
                if (c->in.len > MAX_HEAD) conn_close(c);
                return;
            }
            size_t head_len = end + 4 - c->in.data;
            c->closing = header_has(c->in.data, head_len, "connection", "close");
            c->body_chunked = header_has(c->in.data, head_len, "transfer-encoding", "chunked");
            c->body_left = c->body_chunked ? 0 : (size_t)content_length(c->in.data, head_len);
            buf_consume(&c->in, head_len);
            c->state = READ_BODY;
        }
        if (c->state == READ_BODY) {
            if (c->body_chunked) {
                char *end = c->in.len ? memmem(c->in.data, c->in.len, "0\r\n\r\n", 5) : NULL;
                if (!end) return;
                buf_consume(&c->in, end + 5 - c->in.data);
            } else {
                size_t take = c->body_left < c->in.len ? c->body_left : c->in.len;
                buf_consume(&c->in, take);
                c->body_left -= take;
                if (c->body_left) return;
            }
            start_stream(c);
        }
    }
}

static void on_readable(conn *c) {
    char data[65536];
    for (;;) {
        ssize_t n = read(c->fd, data, sizeof data);
        if (n > 0) {
            buf_append(&c->in, data, n);
            if ((size_t)n < sizeof data) break;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        conn_close(c); /* EOF or error: a stream in progress is abandoned */
        return;
    }
    if (c->in.len > 2 * MAX_HEAD) { /* pipelining this deep is abuse, not a benchmark */
        conn_close(c);
        return;
    }
    handle_input(c);
}

static void on_writable(conn *c) {
    while (c->out.len) {
        ssize_t n = write(c->fd, c->out.data, c->out.len);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            conn_close(c);
            return;
        }
        buf_consume(&c->out, n);
    }
    set_out_interest(c, 0);
}

static void raise_nofile(void) {
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

int main(int argc, char **argv) {
    int port = 0, opt;
    double interval_ms = 20;
    while ((opt = getopt(argc, argv, "p:n:i:")) != -1) {
        if (opt == 'p')
            port = atoi(optarg);
        else if (opt == 'n')
            events_per_stream = atoi(optarg);
        else if (opt == 'i')
            interval_ms = atof(optarg);
        else {
            fprintf(stderr, "usage: %s -p PORT [-n EVENTS] [-i INTERVAL_MS]\n", argv[0]);
            return 2;
        }
    }
    if (port <= 0 || events_per_stream < 1 || interval_ms <= 0) {
        fprintf(stderr, "usage: %s -p PORT [-n EVENTS>=1] [-i INTERVAL_MS>0]\n", argv[0]);
        return 2;
    }
    interval_ns = (int64_t)(interval_ms * 1e6);
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    build_bodies();

    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(0x7f000001)};
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(listener, 65535) < 0) die("listen");
    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &ev);

    struct epoll_event events[1024];
    for (;;) {
        int timeout = -1;
        if (queue_head) {
            int64_t wait = queue_head->due - now_ns();
            timeout = wait <= 0 ? 0 : (int)((wait + 999999) / 1000000); /* at most 1 ms late */
        }
        int ready = epoll_wait(epfd, events, 1024, timeout);
        if (ready < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < ready; i++) {
            conn *c = events[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn *fresh = calloc(1, sizeof *fresh);
                    fresh->fd = fd;
                    fresh->state = READ_HEAD;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = fresh};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (c->dead) continue;
            if (events[i].events & EPOLLOUT) on_writable(c);
            if (!c->dead && events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
        }
        int64_t now = now_ns();
        /* Only the streams queued before this pass: one that is requeued waits for the next. */
        conn *stop = queue_tail;
        while (queue_head && queue_head->due <= now) {
            conn *c = queue_head;
            queue_head = c->next;
            if (!queue_head) queue_tail = NULL;
            c->queued = 0;
            int last = c == stop;
            if (c->dead)
                conn_free(c);
            else
                stream_step(c);
            if (last) break;
        }
        while (graveyard) {
            conn *c = graveyard;
            graveyard = c->next;
            conn_free(c);
        }
    }
}
