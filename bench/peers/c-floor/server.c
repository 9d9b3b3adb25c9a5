// The C floor: node-floor (bench/peers/node-floor/server.js) in C, with no runtime under
// it. One thread, one epoll loop, non-blocking sockets with TCP_NODELAY. On every
// WebSocket upgrade (any path; ?session_key= is only read for FLOOR_ROOMS, every key is
// accepted) it sends {"authenticated":true}; for each inbound text frame it finds the
// "message" value once, builds the {"time","user":"floor","message"} frame once and
// write()s it to every open client of the sender's room, one write() per client. It keeps
// bytes only for a client whose socket is full (written when it drains, in order). No
// store, no checks, no history, no limits: what a server that speaks the legacy protocol
// pays at the least, with the same load client as wschat and the Node floor.
//
// Usage: cc -O2 -o server server.c && ./server [PORT]   (or PORT=…; default 56498)
// HOST (127.0.0.1) and FLOOR_ROOMS (0) as for node-floor: with FLOOR_ROOMS=R > 0 a client
// is in room (the last number in its session_key) % R; otherwise everyone is in one room.
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
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

// ---- SHA-1 (RFC 3174), for Sec-WebSocket-Accept only ----

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1(const uint8_t *msg, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    uint8_t *m = calloc(total, 1);
    if (!m) abort();
    memcpy(m, msg, len);
    m[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) m[total - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)m[off + 4 * i] << 24 | (uint32_t)m[off + 4 * i + 1] << 16 |
                   (uint32_t)m[off + 4 * i + 2] << 8 | m[off + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            else f = b ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rol(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    free(m);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = (uint8_t)(h[i] >> (24 - 8 * j));
}

static void base64(const uint8_t *in, size_t len, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? in[i + 1] << 8 : 0) |
                     (i + 2 < len ? in[i + 2] : 0);
        out[o++] = t[v >> 18 & 63];
        out[o++] = t[v >> 12 & 63];
        out[o++] = i + 1 < len ? t[v >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? t[v & 63] : '=';
    }
    out[o] = 0;
}

// ---- connections and rooms ----

typedef struct {
    char *data;
    size_t off, len, cap; // the bytes not yet taken are data[off..len]
} buf_t;

static void buf_put(buf_t *b, const void *p, size_t n) {
    if (b->off > 0 && b->len + n > b->cap) { // room at the front: move the rest there once
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off, b->off = 0;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) abort();
        b->data = d, b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

// Takes N bytes from the front: no copy (buf_put moves what is left when it needs room).
static void buf_drop(buf_t *b, size_t n) {
    b->off += n;
    if (b->off == b->len) b->off = b->len = 0;
}

static size_t buf_len(const buf_t *b) { return b->len - b->off; }
static char *buf_at(const buf_t *b) { return b->data + b->off; }

typedef struct conn {
    int fd;
    int open;   // upgraded (a member of its room)
    int dead;   // to be closed at the end of this batch of events
    int closing; // answered a close: closed once what is queued is written
    size_t room, slot; // its place in rooms[room]
    buf_t in, out;
    struct conn *next_dead;
} conn_t;

typedef struct {
    conn_t **members;
    size_t len, cap;
} room_t;

static int ep, listener, listener_paused;
static room_t *rooms;
static size_t nrooms = 1;
static conn_t *dead_list;

static void watch(conn_t *c, int out) {
    struct epoll_event e = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void leave_room(conn_t *c) {
    if (c->open) { // swap-remove from its room
        room_t *r = &rooms[c->room];
        conn_t *last = r->members[--r->len];
        r->members[c->slot] = last;
        last->slot = c->slot;
        c->open = 0;
    }
}

static void kill_conn(conn_t *c) {
    if (c->dead) return;
    c->dead = 1;
    c->next_dead = dead_list;
    dead_list = c;
    leave_room(c);
}

// Writes what is queued for c, then BYTES; keeps what the socket does not take.
static void send_bytes(conn_t *c, const void *bytes, size_t n) {
    if (c->dead) return;
    if (buf_len(&c->out) == 0) {
        ssize_t w = write(c->fd, bytes, n);
        if (w == (ssize_t)n) return;
        if (w < 0) {
            if (errno != EAGAIN) { kill_conn(c); return; }
            w = 0;
        }
        buf_put(&c->out, (const char *)bytes + w, n - (size_t)w);
        watch(c, 1);
    } else {
        buf_put(&c->out, bytes, n);
    }
}

static void flush_out(conn_t *c) {
    while (buf_len(&c->out)) {
        ssize_t w = write(c->fd, buf_at(&c->out), buf_len(&c->out));
        if (w < 0) {
            if (errno != EAGAIN) kill_conn(c);
            return;
        }
        buf_drop(&c->out, (size_t)w);
    }
    if (c->closing) kill_conn(c);
    else watch(c, 0);
}

// A server frame (FIN, OPCODE, unmasked) of PAYLOAD into OUT; returns its length.
static size_t frame(uint8_t opcode, const char *payload, size_t n, char *out) {
    size_t h = 0;
    out[h++] = (char)(0x80 | opcode);
    if (n < 126) {
        out[h++] = (char)n;
    } else if (n < 65536) {
        out[h++] = 126, out[h++] = (char)(n >> 8), out[h++] = (char)n;
    } else {
        out[h++] = 127;
        for (int i = 7; i >= 0; i--) out[h++] = (char)((uint64_t)n >> (8 * i));
    }
    memcpy(out + h, payload, n);
    return h + n;
}

// The "message" value of a JSON object, as its JSON text (a string literal with its
// quotes, or a number); NULL when there is none. A minimal scan, not a JSON parser: enough
// for the frames a legacy client sends ({"message": …}).
static const char *message_value(const char *s, size_t n, size_t *len, int *is_string) {
    static const char key[] = "\"message\"";
    const char *end = s + n;
    for (const char *p = memmem(s, n, key, sizeof key - 1); p;
         p = memmem(p + 1, (size_t)(end - p - 1), key, sizeof key - 1)) {
        const char *v = p + sizeof key - 1;
        while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r')) v++;
        if (v >= end || *v != ':') continue;
        v++;
        while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r')) v++;
        if (v >= end) return NULL;
        if (*v == '"') {
            const char *q = v + 1;
            while (q < end && *q != '"') q += *q == '\\' ? 2 : 1;
            if (q >= end) return NULL;
            *len = (size_t)(q + 1 - v), *is_string = 1;
            return v;
        }
        const char *q = v;
        while (q < end && (*q == '-' || *q == '+' || *q == '.' || *q == 'e' || *q == 'E' ||
                           (*q >= '0' && *q <= '9')))
            q++;
        if (q == v) return NULL;
        *len = (size_t)(q - v), *is_string = 0;
        return v;
    }
    return NULL;
}

static char *scratch; // one outgoing frame, built once per inbound message
static size_t scratch_cap;

static void on_text(conn_t *c, const char *text, size_t n) {
    size_t vlen;
    int is_string;
    const char *v = message_value(text, n, &vlen, &is_string);
    if (!v) return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[96];
    snprintf(when, sizeof when, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
    size_t need = vlen + 128;
    if (2 * need > scratch_cap) {
        scratch_cap = 2 * need;
        scratch = realloc(scratch, scratch_cap);
        if (!scratch) abort();
    }
    char *json = scratch + need; // the payload, then framed into scratch's start
    int k = snprintf(json, need, "{\"time\":\"%s\",\"user\":\"floor\",\"message\":%s", when,
                     is_string ? "" : "\"");
    memcpy(json + k, v, vlen);
    k += (int)vlen;
    k += snprintf(json + k, need - (size_t)k, "%s}", is_string ? "" : "\"");
    size_t len = frame(1, json, (size_t)k, scratch);
    // Backwards: a client that fails is swapped out for the last one, already written to.
    room_t *r = &rooms[c->room];
    for (size_t i = r->len; i-- > 0;) send_bytes(r->members[i], scratch, len);
}

// The handshake, once the request's head is in c->in; 0 when the connection must go.
static int upgrade(conn_t *c, size_t head_len) {
    char *req = buf_at(&c->in);
    req[head_len - 1] = 0; // the head ends with "\r\n\r\n": its last byte becomes the NUL
    char *key = NULL;
    for (char *line = strstr(req, "\r\n"); line && line[2]; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "Sec-WebSocket-Key:", 18) == 0) {
            key = line + 20;
            while (*key == ' ') key++;
            break;
        }
    }
    if (!key) return 0;
    size_t klen = strcspn(key, "\r\n ");
    char src[128];
    if (klen > 60) return 0;
    memcpy(src, key, klen);
    memcpy(src + klen, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
    uint8_t digest[20];
    sha1((uint8_t *)src, klen + 36, digest);
    char accept[32];
    base64(digest, 20, accept);
    c->room = 0;
    if (nrooms > 1) { // the last number in session_key, % FLOOR_ROOMS
        char *eol = strstr(req, "\r\n"), *q = strstr(req, "session_key=");
        if (q && q < eol) {
            size_t end = strcspn(q, "& \r"), last = 0;
            int seen = 0;
            for (size_t i = 12; i < end; i++) {
                if (q[i] >= '0' && q[i] <= '9') {
                    if (!seen) last = 0;
                    last = last * 10 + (size_t)(q[i] - '0');
                    seen = 1;
                } else {
                    seen = 0;
                }
            }
            c->room = last % nrooms;
        }
    }
    char resp[512];
    int n = snprintf(resp, sizeof resp,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                     accept);
    static const char hello[] = "{\"authenticated\":true}";
    n += (int)frame(1, hello, sizeof hello - 1, resp + n);
    buf_drop(&c->in, head_len);
    room_t *r = &rooms[c->room];
    if (r->len == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 16;
        r->members = realloc(r->members, r->cap * sizeof *r->members);
        if (!r->members) abort();
    }
    c->slot = r->len;
    r->members[r->len++] = c;
    c->open = 1;
    send_bytes(c, resp, (size_t)n);
    return 1;
}

// Handles every whole frame in c->in.
static void frames(conn_t *c) {
    while (!c->dead && !c->closing) {
        uint8_t *p = (uint8_t *)buf_at(&c->in);
        size_t have = buf_len(&c->in);
        if (have < 2) return;
        int fin = p[0] & 0x80, op = p[0] & 0x0f, masked = p[1] & 0x80;
        uint64_t n = p[1] & 0x7f;
        size_t h = 2;
        if (n == 126) {
            if (have < 4) return;
            n = (uint64_t)p[2] << 8 | p[3], h = 4;
        } else if (n == 127) {
            if (have < 10) return;
            n = 0;
            for (int i = 0; i < 8; i++) n = n << 8 | p[2 + i];
            h = 10;
        }
        if (!masked || n > (1u << 24)) { kill_conn(c); return; } // clients must mask
        if (have < h + 4 + n) return;
        uint8_t *mask = p + h, *data = p + h + 4;
        for (uint64_t i = 0; i < n; i++) data[i] ^= mask[i & 3];
        if (op == 8) { // close: answer it after what is queued, then go
            char out[8];
            size_t len = frame(8, (char *)data, n >= 2 ? 2 : 0, out);
            send_bytes(c, out, len);
            if (buf_len(&c->out) == 0) kill_conn(c);
            else c->closing = 1, leave_room(c);
            return;
        }
        if (op == 9 && n <= 125) { // ping
            char out[130];
            send_bytes(c, out, frame(10, (char *)data, n, out));
        } else if (op == 1 && fin) {
            on_text(c, (char *)data, n);
        } // binary, pong: ignored, as node-floor does; fragments too (ws would join them:
          // the load client sends none)
        buf_drop(&c->in, h + 4 + n);
    }
}

static void on_readable(conn_t *c) {
    char tmp[65536];
    ssize_t r = read(c->fd, tmp, sizeof tmp);
    if (r == 0 || (r < 0 && errno != EAGAIN)) {
        kill_conn(c);
        return;
    }
    if (r < 0 || c->closing) return; // after a close, what comes is read and dropped
    buf_put(&c->in, tmp, (size_t)r);
    if (!c->open) {
        char *end = memmem(buf_at(&c->in), buf_len(&c->in), "\r\n\r\n", 4);
        if (!end) {
            if (buf_len(&c->in) > 16384) kill_conn(c);
            return;
        }
        if (!upgrade(c, (size_t)(end + 4 - buf_at(&c->in)))) {
            static const char bad[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
            send_bytes(c, bad, sizeof bad - 1);
            kill_conn(c);
            return;
        }
    }
    frames(c);
}

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

int main(int argc, char **argv) {
    const char *port_s = argc > 1 ? argv[1] : getenv("PORT");
    int port = port_s ? atoi(port_s) : 56498;
    const char *host = getenv("HOST") ? getenv("HOST") : "127.0.0.1";
    const char *r = getenv("FLOOR_ROOMS");
    if (r && atol(r) > 0) nrooms = (size_t)atol(r);
    rooms = calloc(nrooms, sizeof *rooms);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_term);
    signal(SIGTERM, on_term);

    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (!rooms || inet_pton(AF_INET, host, &a.sin_addr) != 1 ||
        bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 4096) < 0) {
        perror("c-floor: listen");
        return 1;
    }
    listener = l;
    ep = epoll_create1(0);
    struct epoll_event le = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &le);
    fprintf(stderr, "c-floor listening on ws://%s:%d/\n", host, port);

    struct epoll_event ev[512];
    for (;;) {
        int k = epoll_wait(ep, ev, 512, -1);
        if (k < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int i = 0; i < k; i++) {
            conn_t *c = ev[i].data.ptr;
            if (!c) { // the listener: every connection waiting
                int fd;
                while ((fd = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0 || errno == EINTR) {
                    if (fd < 0) continue;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *n = calloc(1, sizeof *n);
                    if (!n) abort();
                    n->fd = fd;
                    struct epoll_event e = {.events = EPOLLIN, .data.ptr = n};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
                }
                if (errno == EMFILE || errno == ENFILE) { // out of descriptors: listen
                    struct epoll_event off = {.events = 0, .data.ptr = NULL}; // again
                    epoll_ctl(ep, EPOLL_CTL_MOD, l, &off); // once one is closed, not
                    listener_paused = 1;                    // in a busy loop meanwhile
                }
                continue;
            }
            if (c->dead) continue;
            if (ev[i].events & EPOLLOUT) flush_out(c);
            if (!c->dead && ev[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
        }
        while (dead_list) { // closed only now: this batch's events may still name them
            conn_t *c = dead_list;
            dead_list = c->next_dead;
            close(c->fd);
            free(c->in.data);
            free(c->out.data);
            free(c);
            if (listener_paused) {
                struct epoll_event on = {.events = EPOLLIN, .data.ptr = NULL};
                epoll_ctl(ep, EPOLL_CTL_MOD, listener, &on);
                listener_paused = 0;
            }
        }
    }
}
