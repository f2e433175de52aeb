/* One pass over a chunk of HANDLE.NET access-log lines, without the GIL.
 *
 * scan(data, max_line_bytes, k1, salted, salt, shifts..., bounds, replay_below) counts the lines that have the strict common shape
 * (a shape sufficient for the reference parser, handle_log.parse_line, to accept the line with the same fields)
 * and hands every other line back by index, so that the reference parser judges it. The strict shape, the 64-bit
 * hashes and the stage-1 sample choice mirror protocol/sampling.py exactly; tests hold the two to the same
 * numbers. See connectors/resolution/native.py for the layout of what comes back.
 *
 * Written in C (not numpy) so that each line is read once, in cache, and so that two threads can scan two chunks
 * at the same time in one process (the GIL is released for the whole pass).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* qsort_r */
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <pthread.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif
#include <string.h>

#include <openssl/evp.h>

#define SEED 0x9E3779B97F4A7C15ULL
#define K_LEN 0xC2B2AE3D27D4EB4FULL
#define K_WORD 0x87C37B91114253D5ULL
#define F1 0xFF51AFD7ED558CCDULL
#define F2 0xC4CEB9FE1A85EC53ULL
#define STAGE1 (1ULL << 58)
#define MAX_TRANSPORTS 64
#define MAX_TRANSPORT_LEN 32
#define MAX_HANDLE 4096

static const uint64_t M[8] = {
    0x9E3779B97F4A7C15ULL, 0xBF58476D1CE4E5B9ULL, 0x94D049BB133111EBULL, 0xD6E8FEB86659FD93ULL,
    0xA0761D6478BD642FULL, 0xE7037ED1A0B428DBULL, 0x8EBC6AF09C88C6E3ULL, 0x589965CC75374CC3ULL,
};

static inline uint64_t fmix64(uint64_t h) {
    h ^= h >> 33;
    h *= F1;
    h ^= h >> 33;
    h *= F2;
    h ^= h >> 33;
    return h;
}

static uint64_t h64(const uint8_t *p, size_t n) {
    uint64_t acc = 0;
    size_t j = 0, i = 0;
    for (; i + 8 <= n; i += 8, j++) {
        uint64_t w;
        memcpy(&w, p + i, 8); /* little-endian machine (checked at import) */
        uint64_t x = w * (M[j & 7] + 2 * (uint64_t)(j >> 3));
        acc += (x ^ (x >> 31)) * K_WORD;
    }
    if (i < n) {
        uint64_t w = 0;
        memcpy(&w, p + i, n - i);
        uint64_t x = w * (M[j & 7] + 2 * (uint64_t)(j >> 3));
        acc += (x ^ (x >> 31)) * K_WORD;
    }
    return fmix64(SEED ^ ((uint64_t)n * K_LEN) ^ acc);
}

/* --- growable int64 rows --------------------------------------------------------------------------------- */

typedef struct {
    int64_t *a;
    size_t n, cap;
    int failed;
} vec;

static int vgrow(vec *v, size_t extra) {
    if (v->n + extra <= v->cap) return 1;
    size_t cap = v->cap ? v->cap : 256;
    while (cap < v->n + extra) cap *= 2;
    int64_t *a = realloc(v->a, cap * sizeof(int64_t));
    if (!a) {
        v->failed = 1;
        return 0;
    }
    v->a = a;
    v->cap = cap;
    return 1;
}

#define VPUSH(v, ...)                                                           \
    do {                                                                        \
        int64_t row_[] = {__VA_ARGS__};                                         \
        size_t k_ = sizeof(row_) / sizeof(row_[0]);                             \
        if (vgrow(&(v), k_)) {                                                  \
            memcpy((v).a + (v).n, row_, sizeof(row_));                          \
            (v).n += k_;                                                        \
        }                                                                       \
    } while (0)

typedef struct {
    uint8_t *a;
    size_t n, cap;
    int failed;
} blob;

static void bpush(blob *b, const uint8_t *p, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) cap *= 2;
        uint8_t *a = realloc(b->a, cap);
        if (!a) {
            b->failed = 1;
            return;
        }
        b->a = a;
        b->cap = cap;
    }
    memcpy(b->a + b->n, p, n);
    b->n += n;
}

/* --- open-addressing tables keyed by (day, 64-bit value) ------------------------------------------------- */

typedef struct {
    uint64_t *key;
    int32_t *day;  /* -1: empty */
    int64_t *val;  /* row index in the output */
    size_t mask;
} table;

static void tfree(table *t) {
    free(t->key);
    free(t->day);
    free(t->val);
    t->key = NULL;
    t->day = NULL;
    t->val = NULL;
    t->mask = 0;
}

/* Empty the table, with at least twice ``want`` slots. The memory is kept from call to call (fresh pages cost
 * more than the scan: the kernel zeroes them) unless it is too small or much too big. */
static int treset(table *t, size_t want) {
    size_t cap = 1024;
    while (cap < 2 * want) cap *= 2;
    size_t have = t->key ? t->mask + 1 : 0;
    if (have < cap || have > 8 * cap) {
        tfree(t);
        t->key = malloc(cap * sizeof(uint64_t));
        t->day = malloc(cap * sizeof(int32_t));
        t->val = malloc(cap * sizeof(int64_t));
        t->mask = cap - 1;
        if (!t->key || !t->day || !t->val) {
            tfree(t);
            return 0;
        }
    }
    memset(t->day, 0xff, (t->mask + 1) * sizeof(int32_t));
    return 1;
}

/* Slot of (day, key): found (returns 1) or the empty slot where it belongs (returns 0). Never full: the table
 * has at least twice as many slots as the chunk has lines. */
static inline int tfind(const table *t, int32_t day, uint64_t key, size_t *slot) {
    size_t i = (size_t)fmix64(key ^ ((uint64_t)day * 0x9E3779B97F4A7C15ULL)) & t->mask;
    for (;;) {
        if (t->day[i] < 0) {
            *slot = i;
            return 0;
        }
        if (t->key[i] == key && t->day[i] == day) {
            *slot = i;
            return 1;
        }
        i = (i + 1) & t->mask;
    }
}

/* --- the strict line shape ------------------------------------------------------------------------------- */

typedef struct {
    int64_t utc_min, utc_ms;
    int32_t off_min, op, resp;
    size_t t_len;  /* transport: line[ip_len + 1 : ip_len + 1 + t_len] */
    uint64_t elapsed;
    size_t ip_len, net_len;
    const uint8_t *handle;  /* unescaped (points into the line or into the scratch buffer) */
    size_t handle_len;
} fields;

static inline int dig(uint8_t c) { return c >= '0' && c <= '9'; }
static inline int d2(const uint8_t *p) { return (p[0] - '0') * 10 + (p[1] - '0'); }
static inline int hexv(uint8_t c) {
    if (c >= '0' && c <= '9') return c - '0';
    c |= 32;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static int64_t days_from_civil(int64_t y, int m, int d) {
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const int64_t yoe = y - era * 400;
    const int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int days_in_month(int y, int m) {
    static const int dm[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (m == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0)) return 29;
    return dm[m - 1];
}

/* Well-formed UTF-8 exactly as Python's strict decoder takes it (Unicode Table 3-7). */
static int utf8_ok(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) k = 1;
        else if (c == 0xE0) { k = 2; lo = 0xA0; }
        else if (c >= 0xE1 && c <= 0xEC) k = 2;
        else if (c == 0xED) { k = 2; hi = 0x9F; }
        else if (c >= 0xEE && c <= 0xEF) k = 2;
        else if (c == 0xF0) { k = 3; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) k = 3;
        else if (c == 0xF4) { k = 3; hi = 0x8F; }
        else return 0;
        if (i + k >= n) return 0;
        if (s[i + 1] < lo || s[i + 1] > hi) return 0;
        for (size_t j = 2; j <= k; j++)
            if (s[i + j] < 0x80 || s[i + j] > 0xBF) return 0;
        i += k + 1;
    }
    return 1;
}

static inline int code_ok(const uint8_t *p, size_t n, int32_t *out) {
    if (n < 1 || n > 6) return 0;
    if (n > 1 && p[0] == '0') return 0;
    int32_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (!dig(p[i])) return 0;
        v = v * 10 + (p[i] - '0');
    }
    *out = v;
    return 1;
}

/* 1 when the line (without its newline) has the strict shape; its fields in *f. */
static int parse(const uint8_t *l, size_t len, size_t max_line, fields *f, uint8_t *scratch) {
    if (len == 0 || len > max_line) return 0;
    size_t sp[8];
    int nsp = 0;
    size_t i = 0;
#ifdef __SSE2__
    /* 16 bytes at a time: every byte printable ASCII or a space, and where the spaces are */
    const __m128i space = _mm_set1_epi8(' '), bias = _mm_set1_epi8((char)(0x80 + 32)),
                  top = _mm_set1_epi8((char)(126 - 32 - 128));
    for (; i + 16 <= len; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(l + i));
        /* (c - 32) as unsigned above 94: not in ' '..'~'; signed compare after flipping the top bit */
        __m128i out = _mm_cmpgt_epi8(_mm_sub_epi8(v, bias), top);
        if (_mm_movemask_epi8(out) != 0) return 0;
        unsigned m = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, space));
        while (m != 0) {
            if (nsp == 8) return 0;
            sp[nsp++] = i + (size_t)__builtin_ctz(m);
            m &= m - 1;
        }
    }
#endif
    for (; i < len; i++) {
        uint8_t c = l[i];
        if (c == ' ') {
            if (nsp == 8) return 0;
            sp[nsp++] = i;
        } else if (c < 33 || c > 126) {
            return 0;
        }
    }
    if (nsp != 8) return 0;
    /* client */
    f->ip_len = sp[0];
    if (f->ip_len == 0) return 0;
    f->net_len = f->ip_len;
    for (size_t i = f->ip_len; i-- > 0;) {
        if (l[i] == '.') {
            f->net_len = i;
            break;
        }
    }
    /* interface: TRANSPORT:rest */
    const uint8_t *iface = l + sp[0] + 1;
    size_t if_len = sp[1] - sp[0] - 1, t = 0;
    while (t < if_len && iface[t] != ':') {
        uint8_t c = iface[t];
        if (!((c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'))) return 0;
        t++;
    }
    if (t == 0 || t > MAX_TRANSPORT_LEN || t + 1 >= if_len) return 0; /* TRANSPORT ':' rest (not empty) */
    f->t_len = t;
    /* "yyyy-MM-dd HH:mm:ss.SSS±hhmm" */
    if (sp[2] - sp[1] - 1 != 11 || sp[3] - sp[2] - 1 != 18) return 0;
    const uint8_t *d = l + sp[1] + 1, *h = l + sp[2] + 1;
    if (d[0] != '"' || d[5] != '-' || d[8] != '-') return 0;
    if (!(dig(d[1]) && dig(d[2]) && dig(d[3]) && dig(d[4]) && dig(d[6]) && dig(d[7]) && dig(d[9]) && dig(d[10])))
        return 0;
    if (h[2] != ':' || h[5] != ':' || h[8] != '.' || (h[12] != '+' && h[12] != '-') || h[17] != '"') return 0;
    static const int hd[] = {0, 1, 3, 4, 6, 7, 9, 10, 11, 13, 14, 15, 16};
    for (size_t i = 0; i < sizeof(hd) / sizeof(hd[0]); i++)
        if (!dig(h[hd[i]])) return 0;
    int year = d2(d + 1) * 100 + d2(d + 3), month = d2(d + 6), day = d2(d + 9);
    int hour = d2(h), minute = d2(h + 3), second = d2(h + 6);
    int milli = (h[9] - '0') * 100 + d2(h + 10);
    int off_h = d2(h + 13), off_m = d2(h + 15);
    if (year < 1970 || month < 1 || month > 12 || day < 1 || day > days_in_month(year, month)) return 0;
    if (hour > 23 || minute > 59 || second > 59 || off_h > 23 || off_m > 59) return 0;
    int32_t off = (off_h * 60 + off_m) * (h[12] == '-' ? -1 : 1);
    int64_t local = days_from_civil(year, month, day) * 1440 + hour * 60 + minute;
    f->off_min = off;
    f->utc_min = local - off;
    f->utc_ms = f->utc_min * 60000 + second * 1000 + milli;
    /* opCode, respCode */
    if (!code_ok(l + sp[3] + 1, sp[4] - sp[3] - 1, &f->op)) return 0;
    if (!code_ok(l + sp[4] + 1, sp[5] - sp[4] - 1, &f->resp)) return 0;
    /* <1-8 digits>ms */
    const uint8_t *e = l + sp[5] + 1;
    size_t e_len = sp[6] - sp[5] - 1;
    if (e_len < 3 || e_len > 10 || e[e_len - 2] != 'm' || e[e_len - 1] != 's') return 0;
    uint64_t ek = 0;
    for (size_t i = 0; i < e_len - 2; i++) {
        if (!dig(e[i])) return 0;
        ek |= (uint64_t)e[i] << (8 * i);
    }
    f->elapsed = ek;
    /* empty or adm=... */
    size_t a_len = sp[7] - sp[6] - 1;
    if (a_len != 0 && (a_len < 4 || memcmp(l + sp[6] + 1, "adm=", 4) != 0)) return 0;
    /* handle: <prefix>/<suffix>, %XX escapes, UTF-8 once unescaped */
    const uint8_t *raw = l + sp[7] + 1;
    size_t r_len = len - sp[7] - 1;
    if (r_len < 1) return 0;
    const uint8_t *slash = memchr(raw, '/', r_len);
    if (slash == NULL || slash == raw) return 0;
    if (memchr(raw, '%', r_len) == NULL) {
        f->handle = raw;
        f->handle_len = r_len;
        return 1;
    }
    if (r_len > MAX_HANDLE) return 0;
    size_t o = 0;
    int high = 0;
    for (size_t i = 0; i < r_len; i++) {
        if (raw[i] == '%') {
            if (i + 2 >= r_len) return 0;
            int a = hexv(raw[i + 1]), b = hexv(raw[i + 2]);
            if (a < 0 || b < 0) return 0;
            scratch[o] = (uint8_t)(a * 16 + b);
            high |= scratch[o] >= 0x80;
            o++;
            i += 2;
        } else {
            scratch[o++] = raw[i];
        }
    }
    if (high && !utf8_ok(scratch, o)) return 0;
    f->handle = scratch;
    f->handle_len = o;
    return 1;
}

/* --- scan ------------------------------------------------------------------------------------------------ */

typedef struct {
    /* rows, all int64 */
    vec slow;      /* line_no, start, end */
    vec buckets;   /* utc_min, off_min, op, resp, transport, count */
    vec ids;       /* day, handle hash (distinct per day) */
    vec clients;   /* day, ip hash, count, start, ip_len, net_len, net hash (distinct per day) */
    vec records;   /* day, record hash (those below replay_below) */
    vec cands;     /* day, line start, line end, op (lines sampled: both stages) */
    vec creates;   /* line_no, utc_min, off_min, handle hash, day, blob offset, blob length */
    blob handles;  /* unescaped handles of the creates */
    int64_t *day_lines;
    char transports[MAX_TRANSPORTS][MAX_TRANSPORT_LEN + 1];
    size_t n_transports;
    int64_t n_lines;
    int64_t out_of_window;
    int failed;
} result;

#define ALL_VECS(r) {&(r)->slow, &(r)->buckets, &(r)->ids, &(r)->clients, &(r)->records, &(r)->cands, &(r)->creates}
#define KEEP_BYTES (8u << 20) /* memory kept per thread between calls, per vector */

/* Empty the result for another chunk, keeping its memory (up to KEEP_BYTES a vector). */
static void rreset(result *r, int trim) {
    vec *vs[] = ALL_VECS(r);
    for (size_t i = 0; i < sizeof(vs) / sizeof(vs[0]); i++) {
        if (trim && vs[i]->cap * sizeof(int64_t) > KEEP_BYTES) {
            free(vs[i]->a);
            vs[i]->a = NULL;
            vs[i]->cap = 0;
        }
        vs[i]->n = 0;
        vs[i]->failed = 0;
    }
    if (trim && r->handles.cap > KEEP_BYTES) {
        free(r->handles.a);
        r->handles.a = NULL;
        r->handles.cap = 0;
    }
    r->handles.n = 0;
    r->handles.failed = 0;
    r->n_transports = 0;
    r->n_lines = 0;
    r->out_of_window = 0;
    r->failed = 0;
}

static void rfree(result *r) {
    vec *vs[] = ALL_VECS(r);
    for (size_t i = 0; i < sizeof(vs) / sizeof(vs[0]); i++) free(vs[i]->a);
    free(r->handles.a);
    free(r->day_lines);
}

/* What one thread reuses from call to call (freed when the thread ends). */
typedef struct {
    table ids, clients, buckets;
    result r;
    uint8_t handle[MAX_HANDLE + 8];
} scratch_t;

static pthread_key_t scratch_key;

static void scratch_free(void *p) {
    scratch_t *s = (scratch_t *)p;
    tfree(&s->ids);
    tfree(&s->clients);
    tfree(&s->buckets);
    rfree(&s->r);
    free(s);
}

static scratch_t *scratch_get(void) {
    scratch_t *s = (scratch_t *)pthread_getspecific(scratch_key);
    if (s == NULL) {
        s = calloc(1, sizeof(*s));
        if (s != NULL && pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            s = NULL;
        }
    }
    return s;
}

static int transport_id(result *r, const uint8_t *t, size_t n) {
    for (size_t i = 0; i < r->n_transports; i++)
        if (strlen(r->transports[i]) == n && memcmp(r->transports[i], t, n) == 0) return (int)i;
    if (r->n_transports == MAX_TRANSPORTS) return -1;
    memcpy(r->transports[r->n_transports], t, n);
    r->transports[r->n_transports][n] = 0;
    return (int)r->n_transports++;
}

/* SHA-256 once fetched (OpenSSL 3 looks the algorithm up on every EVP_sha256() use otherwise). */
static const EVP_MD *sha256_md(void) {
    static const EVP_MD *md = NULL;
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    if (md == NULL) md = EVP_MD_fetch(NULL, "SHA256", NULL); /* first use holds the GIL: no race */
#else
    if (md == NULL) md = EVP_sha256();
#endif
    return md;
}

/* Contexts with a prefix already absorbed, copied for each hash (cheaper than starting over). */
typedef struct {
    EVP_MD_CTX *pre[2], *work;
} prefixed;

static int prefixed_init(prefixed *p, const uint8_t *a, size_t na, const uint8_t *b, size_t nb) {
    const EVP_MD *md = sha256_md();
    p->pre[0] = EVP_MD_CTX_new();
    p->pre[1] = EVP_MD_CTX_new();
    p->work = EVP_MD_CTX_new();
    return md != NULL && p->pre[0] && p->pre[1] && p->work && EVP_DigestInit_ex(p->pre[0], md, NULL) == 1 &&
           EVP_DigestUpdate(p->pre[0], a, na) == 1 && EVP_DigestInit_ex(p->pre[1], md, NULL) == 1 &&
           EVP_DigestUpdate(p->pre[1], b, nb) == 1;
}

static void prefixed_free(prefixed *p) {
    EVP_MD_CTX_free(p->pre[0]);
    EVP_MD_CTX_free(p->pre[1]);
    EVP_MD_CTX_free(p->work);
}

/* SHA-256(prefix k || a || b) */
static int prefixed_hash(prefixed *p, int k, const uint8_t *a, size_t na, const uint8_t *b, size_t nb,
                         uint8_t out[32]) {
    unsigned int n = 0;
    return EVP_MD_CTX_copy_ex(p->work, p->pre[k]) == 1 && EVP_DigestUpdate(p->work, a, na) == 1 &&
           (nb == 0 || EVP_DigestUpdate(p->work, b, nb) == 1) && EVP_DigestFinal_ex(p->work, out, &n) == 1 &&
           n == 32;
}

typedef struct {
    const uint8_t *salt; /* NULL: no samples */
    size_t salt_len;
    uint64_t k1;
    int shift_resolution, shift_registration; /* stage 2 keeps 1 line in 2**shift */
} sampling;

/* HMAC-SHA256 keyed with the salt (RFC 2104): SHA-256 with the key's inner and outer pads already absorbed. */
static int hmac_init(prefixed *p, const sampling *s) {
    uint8_t k0[64] = {0}, ipad[64], opad[64];
    if (s->salt_len > 64) {
        unsigned int n = 0;
        if (EVP_Digest(s->salt, s->salt_len, k0, &n, sha256_md(), NULL) != 1) return 0;
    } else {
        memcpy(k0, s->salt, s->salt_len);
    }
    for (int i = 0; i < 64; i++) {
        ipad[i] = k0[i] ^ 0x36;
        opad[i] = k0[i] ^ 0x5c;
    }
    return prefixed_init(p, ipad, 64, opad, 64);
}

/* Stage 2 of protocol/sampling.py: the first 8 bytes (big-endian) of HMAC-SHA256(salt, line) below
 * 2**(64 - shift). */
static int stage2(prefixed *hm, const uint8_t *line, size_t len, int shift) {
    uint8_t inner[32], mac[32];
    if (shift == 0) return 1;
    if (!prefixed_hash(hm, 0, line, len, NULL, 0, inner) || !prefixed_hash(hm, 1, inner, 32, NULL, 0, mac)) return -1;
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | mac[i];
    return v < (1ULL << (64 - shift));
}

static inline uint64_t bucket_hash(int64_t utc_min, int64_t off_min, int64_t op, int64_t resp, int64_t t) {
    return fmix64(((uint64_t)utc_min << 20) ^ ((uint64_t)(uint32_t)off_min << 40) ^ ((uint64_t)op * 0x9E3779B1ULL) ^
                  ((uint64_t)resp << 7) ^ ((uint64_t)t << 56));
}

/* Twice the slots, the rows (utc, off, op, resp, transport, count) so far placed again. */
static int bucket_grow(table *t, const vec *rows) {
    size_t n = rows->n / 6;
    if (!treset(t, 2 * (n + 1))) return 0;
    for (size_t k = 0; k < n; k++) {
        const int64_t *row = rows->a + 6 * k;
        uint64_t bk = bucket_hash(row[0], row[1], row[2], row[3], row[4]);
        size_t i = (size_t)bk & t->mask;
        while (t->day[i] >= 0) i = (i + 1) & t->mask;
        t->day[i] = 0;
        t->key[i] = bk;
        t->val[i] = (int64_t)k;
    }
    return 1;
}

static void scan_chunk(const uint8_t *data, size_t size, size_t max_line, const sampling *smp,
                       const int64_t *bounds, size_t n_bounds, uint64_t replay_below, scratch_t *S) {
    result *r = &S->r;
    table *ids = &S->ids, *clients = &S->clients, *buckets_t = &S->buckets;
    uint8_t *scratch = S->handle;
    size_t n_est = 0;
    for (const uint8_t *p = data; (p = memchr(p, '\n', (size_t)(data + size - p))) != NULL; p++) n_est++;
    int ok = treset(ids, n_est);
    ok &= treset(clients, n_est);
    ok &= treset(buckets_t, 256); /* grows with the distinct buckets, usually a few hundred */
    prefixed hm = {{NULL, NULL}, NULL};
    ok &= smp->salt == NULL || hmac_init(&hm, smp);
    size_t n_days = n_bounds > 0 ? n_bounds - 1 : 0;
    int64_t *day_lines = realloc(r->day_lines, (n_days + 1) * sizeof(int64_t));
    if (day_lines != NULL) {
        r->day_lines = day_lines;
        memset(day_lines, 0, (n_days + 1) * sizeof(int64_t));
    }
    if (!ok || day_lines == NULL) {
        r->failed = 1;
        goto done;
    }
    const int64_t lo = n_bounds ? bounds[0] : 0, hi = n_bounds ? bounds[n_bounds - 1] : 0;
    int32_t last_day = 0;
    int64_t last_lo = 1, last_hi = 0; /* the last day's bounds (empty at first) */
    size_t start = 0;
    int64_t line_no = 0;
    while (start < size) {
        const uint8_t *nl = memchr(data + start, '\n', size - start);
        if (nl == NULL) break; /* the caller passes complete lines */
        size_t end = (size_t)(nl - data);
        fields f;
        int32_t day = -1;
        int good = parse(data + start, end - start, max_line, &f, scratch);
        if (good) {
            if (f.utc_min >= last_lo && f.utc_min < last_hi) {
                day = last_day;
            } else if (f.utc_min >= lo && f.utc_min < hi) {
                for (size_t k = 0; k < n_days; k++) {
                    if (f.utc_min >= bounds[k] && f.utc_min < bounds[k + 1]) {
                        day = (int32_t)k;
                        last_day = day;
                        last_lo = bounds[k];
                        last_hi = bounds[k + 1];
                        break;
                    }
                }
            }
            if (day < 0) {
                r->out_of_window++;
                good = 0;
            }
        }
        int t = -1;
        if (good) {
            t = transport_id(r, data + start + f.ip_len + 1, f.t_len);
            if (t < 0) good = 0;
        }
        if (!good) {
            VPUSH(r->slow, line_no, (int64_t)start, (int64_t)end);
        } else {
            const uint8_t *l = data + start;
            r->day_lines[day]++;
            /* bucket */
            size_t slot;
            int found = 0;
            if (2 * (r->buckets.n / 6 + 1) > buckets_t->mask + 1 && !bucket_grow(buckets_t, &r->buckets)) {
                r->failed = 1;
                break;
            }
            uint64_t bk = bucket_hash(f.utc_min, f.off_min, f.op, f.resp, t);
            size_t i = (size_t)bk & buckets_t->mask;
            for (;;) {
                if (buckets_t->day[i] < 0) break;
                int64_t *row = r->buckets.a + buckets_t->val[i] * 6;
                if (row[0] == f.utc_min && row[1] == f.off_min && row[2] == f.op && row[3] == f.resp &&
                    row[4] == t) {
                    row[5]++;
                    found = 1;
                    break;
                }
                i = (i + 1) & buckets_t->mask;
            }
            if (!found) {
                buckets_t->day[i] = 0;
                buckets_t->key[i] = bk;
                buckets_t->val[i] = (int64_t)(r->buckets.n / 6);
                VPUSH(r->buckets, f.utc_min, f.off_min, f.op, f.resp, t, 1);
            }
            uint64_t hh = h64(f.handle, f.handle_len);
            uint64_t ih = h64(l, f.ip_len);
            if (f.op == 1 && f.resp == 1) {
                if (!tfind(ids, day, hh, &slot)) {
                    ids->day[slot] = day;
                    ids->key[slot] = hh;
                    VPUSH(r->ids, day, (int64_t)hh);
                }
            } else if (f.op == 100 && f.resp == 1) {
                VPUSH(r->creates, line_no, f.utc_min, f.off_min, (int64_t)hh, day, (int64_t)r->handles.n,
                      (int64_t)f.handle_len);
                bpush(&r->handles, f.handle, f.handle_len);
            }
            if (tfind(clients, day, ih, &slot)) {
                r->clients.a[clients->val[slot] * 7 + 2]++;
            } else {
                clients->day[slot] = day;
                clients->key[slot] = ih;
                clients->val[slot] = (int64_t)(r->clients.n / 7);
                VPUSH(r->clients, day, (int64_t)ih, 1, (int64_t)start, (int64_t)f.ip_len, (int64_t)f.net_len,
                      (int64_t)h64(l, f.net_len));
            }
            uint64_t codes = ((uint64_t)(uint32_t)f.op << 32) | (uint64_t)(uint32_t)f.resp;
            uint64_t inner = fmix64(codes ^ fmix64(f.elapsed));
            inner = fmix64((uint64_t)f.utc_ms ^ inner);
            uint64_t rec = fmix64(ih ^ fmix64(hh ^ inner));
            if (rec < replay_below) VPUSH(r->records, day, (int64_t)rec);
            if (smp->salt != NULL && (f.op == 1 || f.op == 100) && fmix64(rec ^ smp->k1) < STAGE1) {
                int keep = stage2(&hm, l, end - start, f.op == 1 ? smp->shift_resolution : smp->shift_registration);
                if (keep < 0) r->failed = 1;
                if (keep > 0) VPUSH(r->cands, day, (int64_t)start, (int64_t)end, f.op);
            }
        }
        line_no++;
        start = end + 1;
    }
    r->n_lines = line_no;
done:
    if (r->slow.failed || r->buckets.failed || r->ids.failed || r->clients.failed || r->records.failed ||
        r->cands.failed || r->creates.failed || r->handles.failed)
        r->failed = 1;
    if (smp->salt != NULL) prefixed_free(&hm);
}

static PyObject *vec_bytes(const vec *v) {
    return PyBytes_FromStringAndSize((const char *)v->a, (Py_ssize_t)(v->n * sizeof(int64_t)));
}

static PyObject *py_scan(PyObject *self, PyObject *args) {
    Py_buffer data, bounds, salt;
    Py_ssize_t max_line;
    unsigned long long k1, replay_below;
    int salted, shift_res, shift_reg;
    if (!PyArg_ParseTuple(args, "y*nKpy*iiy*K", &data, &max_line, &k1, &salted, &salt, &shift_res, &shift_reg,
                          &bounds, &replay_below))
        return NULL;
    if (bounds.len % (Py_ssize_t)sizeof(int64_t) != 0 || max_line < 1 || shift_res < 0 || shift_res > 63 ||
        shift_reg < 0 || shift_reg > 63) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&salt);
        PyBuffer_Release(&bounds);
        PyErr_SetString(PyExc_ValueError,
                        "scan: expected int64 bounds, a positive max_line_bytes and stage-2 shifts from 0 to 63");
        return NULL;
    }
    sampling smp = {salted ? (const uint8_t *)salt.buf : NULL, (size_t)salt.len, (uint64_t)k1, shift_res, shift_reg};
    if (sha256_md() == NULL) { /* fetched here, holding the GIL, before threads use it */
        PyBuffer_Release(&data);
        PyBuffer_Release(&salt);
        PyBuffer_Release(&bounds);
        PyErr_SetString(PyExc_RuntimeError, "scan: OpenSSL has no SHA-256");
        return NULL;
    }
    scratch_t *S = scratch_get();
    if (S == NULL) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&salt);
        PyBuffer_Release(&bounds);
        return PyErr_NoMemory();
    }
    rreset(&S->r, 0);
    size_t n_bounds = (size_t)bounds.len / sizeof(int64_t);
    Py_BEGIN_ALLOW_THREADS
    scan_chunk((const uint8_t *)data.buf, (size_t)data.len, (size_t)max_line, &smp, (const int64_t *)bounds.buf,
               n_bounds, (uint64_t)replay_below, S);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&salt);
    PyBuffer_Release(&bounds);
    result r = S->r; /* a shallow copy: the memory stays the thread's */
    if (r.failed) {
        rreset(&S->r, 1);
        return PyErr_NoMemory();
    }
    PyObject *transports = PyList_New((Py_ssize_t)r.n_transports);
    for (size_t i = 0; transports && i < r.n_transports; i++)
        PyList_SET_ITEM(transports, (Py_ssize_t)i, PyUnicode_FromString(r.transports[i]));
    size_t n_days = n_bounds > 0 ? n_bounds - 1 : 0;
    PyObject *out = Py_BuildValue(
        "(LLNNNNNNNNNN)", (long long)r.n_lines, (long long)r.out_of_window, vec_bytes(&r.slow),
        vec_bytes(&r.buckets), transports, vec_bytes(&r.ids), vec_bytes(&r.clients), vec_bytes(&r.records),
        vec_bytes(&r.cands), vec_bytes(&r.creates),
        PyBytes_FromStringAndSize((const char *)r.handles.a, (Py_ssize_t)r.handles.n),
        PyBytes_FromStringAndSize((const char *)r.day_lines, (Py_ssize_t)(n_days * sizeof(int64_t))));
    rreset(&S->r, 1);
    return out;
}

/* seen_add(table, values, count) -> (fresh, n_added): the values (uint64) not yet in the open-addressing table (a
 * writable buffer of uint64 slots, a power of two, 0 = empty, ``count`` of them used), which are added to it while
 * it stays at most 3/4 full (a value not added is still fresh: the caller feeds it again, harmlessly, to an
 * idempotent sketch); 0 is never stored (it is always fresh). */
static PyObject *py_seen_add(PyObject *self, PyObject *args) {
    Py_buffer table, values;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "w*y*n", &table, &values, &count)) return NULL;
    size_t cap = (size_t)table.len / sizeof(uint64_t), n = (size_t)values.len / sizeof(uint64_t);
    if (cap == 0 || (cap & (cap - 1)) != 0 || (size_t)values.len % sizeof(uint64_t) != 0 || count < 0) {
        PyBuffer_Release(&table);
        PyBuffer_Release(&values);
        PyErr_SetString(PyExc_ValueError, "seen_add: expected a table of 2**k uint64 slots and uint64 values");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * sizeof(uint64_t)));
    if (out == NULL) {
        PyBuffer_Release(&table);
        PyBuffer_Release(&values);
        return NULL;
    }
    uint64_t *slots = (uint64_t *)table.buf, *fresh = (uint64_t *)PyBytes_AS_STRING(out);
    const uint64_t *v = (const uint64_t *)values.buf;
    size_t k = 0, added = 0, mask = cap - 1;
    Py_BEGIN_ALLOW_THREADS
    for (size_t j = 0; j < n; j++) {
        uint64_t x = v[j];
        if (x == 0) {
            fresh[k++] = x;
            continue;
        }
        size_t i = (size_t)fmix64(x) & mask;
        while (slots[i] != 0 && slots[i] != x) i = (i + 1) & mask;
        if (slots[i] == 0) {
            if (4 * ((size_t)count + added + 1) <= 3 * cap) { /* at most 3/4 full: lookups always end */
                slots[i] = x;
                added++;
            }
            fresh[k++] = x;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&table);
    PyBuffer_Release(&values);
    if (_PyBytes_Resize(&out, (Py_ssize_t)(k * sizeof(uint64_t))) < 0) return NULL;
    return Py_BuildValue("(Nn)", out, (Py_ssize_t)added);
}

/* --- Merkle root over new identifiers (protocol/merkle.py: RFC 9162, leaves sorted and distinct) ---------- */

typedef struct {
    const uint8_t *blob;
    const int64_t *starts, *lens;
} handles_ref;

static int cmp_handles(const void *a, const void *b, void *arg) {
    const handles_ref *h = (const handles_ref *)arg;
    int64_t i = *(const int64_t *)a, j = *(const int64_t *)b;
    size_t li = (size_t)h->lens[i], lj = (size_t)h->lens[j];
    int c = memcmp(h->blob + h->starts[i], h->blob + h->starts[j], li < lj ? li : lj);
    if (c != 0) return c;
    return li < lj ? -1 : li > lj;
}

/* merkle_root(blob, starts, lengths, idx) -> 32 bytes: the root over the handles blob[starts[i]:+lengths[i]] for
 * i in idx, sorted bytewise (UTF-8 byte order is code point order, as Python sorts str) and distinct. */
static PyObject *py_merkle_root(PyObject *self, PyObject *args) {
    Py_buffer blob, starts, lens, idx;
    if (!PyArg_ParseTuple(args, "y*y*y*y*", &blob, &starts, &lens, &idx)) return NULL;
    size_t n = (size_t)idx.len / sizeof(int64_t), m = (size_t)starts.len / sizeof(int64_t);
    int ok = starts.len == lens.len && (size_t)idx.len % sizeof(int64_t) == 0;
    const int64_t *st = (const int64_t *)starts.buf, *ln = (const int64_t *)lens.buf, *ix = (const int64_t *)idx.buf;
    for (size_t k = 0; ok && k < n; k++)
        ok = ix[k] >= 0 && (size_t)ix[k] < m && st[ix[k]] >= 0 && ln[ix[k]] >= 0 &&
             st[ix[k]] + ln[ix[k]] <= (int64_t)blob.len;
    int64_t *order = ok ? malloc((n + 1) * sizeof(int64_t)) : NULL;
    uint8_t(*stack)[32] = malloc(65 * 32);
    int heights[65];
    uint8_t root[32];
    static const uint8_t leaf_tag = 0, node_tag = 1;
    prefixed ctx;
    int failed = !ok || order == NULL || stack == NULL || !prefixed_init(&ctx, &leaf_tag, 1, &node_tag, 1);
    if (!failed) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(order, ix, n * sizeof(int64_t));
        handles_ref ref = {(const uint8_t *)blob.buf, st, ln};
        qsort_r(order, n, sizeof(int64_t), cmp_handles, &ref);
        int top = 0;
        for (size_t k = 0; k < n && !failed; k++) {
            if (k > 0 && cmp_handles(&order[k - 1], &order[k], &ref) == 0) continue; /* distinct */
            uint8_t h[32];
            failed |= !prefixed_hash(&ctx, 0, ref.blob + st[order[k]], (size_t)ln[order[k]], NULL, 0, h);
            int height = 0;
            while (!failed && top > 0 && heights[top - 1] == height) {
                failed |= !prefixed_hash(&ctx, 1, stack[top - 1], 32, h, 32, h);
                top--;
                height++;
            }
            memcpy(stack[top], h, 32);
            heights[top++] = height;
        }
        if (!failed && top == 0) {
            unsigned int len = 0;
            failed |= !(EVP_DigestInit_ex(ctx.work, sha256_md(), NULL) == 1 &&
                        EVP_DigestFinal_ex(ctx.work, root, &len) == 1);
        } else if (!failed) {
            memcpy(root, stack[--top], 32);
            while (!failed && top > 0) failed |= !prefixed_hash(&ctx, 1, stack[--top], 32, root, 32, root);
        }
        Py_END_ALLOW_THREADS
    }
    if (ok && order != NULL && stack != NULL) prefixed_free(&ctx);
    free(order);
    free(stack);
    PyBuffer_Release(&blob);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&lens);
    PyBuffer_Release(&idx);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "merkle_root: expected int64 starts, lengths and indices within the blob");
        return NULL;
    }
    if (failed) return PyErr_NoMemory();
    return PyBytes_FromStringAndSize((const char *)root, 32);
}

static PyObject *py_h64(PyObject *self, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    uint64_t h = h64((const uint8_t *)data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_VARARGS,
     "scan(data, max_line_bytes, k1, salted, salt, shift_resolution, shift_registration, bounds, replay_below) -> tuple"},
    {"h64", py_h64, METH_VARARGS, "h64(data) -> int, as protocol.sampling.h64"},
    {"merkle_root", py_merkle_root, METH_VARARGS, "merkle_root(blob, starts, lengths, idx) -> RFC 9162 root"},
    {"seen_add", py_seen_add, METH_VARARGS, "seen_add(table, values, count) -> (fresh values, how many were added)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_scan", .m_doc = "HANDLE.NET log chunk scanner", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__scan(void) {
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "_scan: expected a little-endian machine");
        return NULL;
    }
    if (pthread_key_create(&scratch_key, scratch_free) != 0) {
        PyErr_SetString(PyExc_ImportError, "_scan: cannot create the per-thread scratch key");
        return NULL;
    }
    return PyModule_Create(&module);
}
