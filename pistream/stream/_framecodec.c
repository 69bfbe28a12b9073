/* Channel frames straight into columns: an optional accelerator for pistream.stream.columns.
 *
 * parse(frames, received_us, ids) reads PI Web API streamset channel messages (JSON text) and returns
 * their values as packed column buffers, without a Python object per value. It understands exactly the
 * steady-state shape ({"Items":[{"WebId":..,"UnitsAbbreviation":..,"Items":[{"Timestamp":..,"Value":..,
 * "UnitsAbbreviation":..,"Good":..,...}]}]}, any key order, unknown keys skipped) and returns None for
 * anything else ("Errors", flags as text, "Value" instead of "Items", a timestamp it cannot read, malformed
 * JSON, a WebException): the caller then decodes with msgspec, value by value. A stream whose WebId is not
 * in `ids` is read all the same (the frame must be one msgspec reads) and its rows get id -1, listed as
 * (webid, rows): the caller drops them (no channel of this process subscribed to it).
 * Values that are not plain numbers (text, states, bools, arrays, big integers) come back as raw JSON
 * slices for Python to classify. The last item lists every stream in order as int32 (id, rows), empty ones
 * too: a ``streamsets/recorded`` page has the same shape, and its reader must tell an empty stream from one
 * the server left out.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64
#define MAX_INTERNED 4096
#define INTERN_SLOTS 8192 /* open addressing, at most half full */
#define MAX_PROBES 32 /* a string whose probe runs longer is added without a slot (crafted collisions) */

typedef struct {
    char *data;
    size_t len, cap;
} Buf;

static int buf_grow(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return 1;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data) return 0;
    b->data = data;
    b->cap = cap;
    return 1;
}

#define PUSH(b, type, v)                                   \
    do {                                                   \
        if (!buf_grow(&(b), sizeof(type))) goto nomem;     \
        *(type *)((b).data + (b).len) = (type)(v);         \
        (b).len += sizeof(type);                           \
    } while (0)

typedef struct {
    const char *p, *end;
} Cur;

static inline void skip_ws(Cur *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static inline int eat(Cur *c, char ch) {
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return 1;
    }
    return 0;
}

static int hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char ch = s[i];
        v <<= 4;
        if (ch >= '0' && ch <= '9') v |= ch - '0';
        else if (ch >= 'a' && ch <= 'f') v |= ch - 'a' + 10;
        else if (ch >= 'A' && ch <= 'F') v |= ch - 'A' + 10;
        else return 0;
    }
    *out = v;
    return 1;
}

/* Escapes must be JSON's: \" \\ \/ \b \f \n \r \t \uXXXX. */
static int valid_escapes(const char *s, const char *end) {
    for (const char *p = memchr(s, '\\', end - s); p; p = memchr(p, '\\', end - p)) {
        char next = p + 1 < end ? p[1] : 0;
        if (next == 'u') {
            unsigned cp, lo;
            if (end - p < 6 || !hex4(p + 2, &cp)) return 0;
            p += 6;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return 0; /* a lone low surrogate (msgspec refuses it) */
            if (cp >= 0xD800 && cp <= 0xDBFF) {         /* a high one: its low one must follow */
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                    return 0;
                p += 6;
            }
        } else if (next == '"' || next == '\\' || next == '/' || next == 'b' || next == 'f' || next == 'n' ||
                   next == 'r' || next == 't') {
            p += 2;
        } else {
            return 0;
        }
    }
    return 1;
}

/* The length of the well-formed UTF-8 sequence at p (as Python and msgspec read it: no overlongs, no
 * surrogates, nothing past U+10FFFF), or 0. */
static int utf8_length(const unsigned char *p, const char *end) {
    Py_ssize_t room = (const unsigned char *)end - p;
#define CONT(i) (room > (i) && (p[i] & 0xC0) == 0x80)
    unsigned char b = p[0];
    if (b >= 0xC2 && b <= 0xDF) return CONT(1) ? 2 : 0;
    if (b >= 0xE0 && b <= 0xEF) {
        if (!CONT(1) || !CONT(2)) return 0;
        if ((b == 0xE0 && p[1] < 0xA0) || (b == 0xED && p[1] > 0x9F)) return 0;
        return 3;
    }
    if (b >= 0xF0 && b <= 0xF4) {
        if (!CONT(1) || !CONT(2) || !CONT(3)) return 0;
        if ((b == 0xF0 && p[1] < 0x90) || (b == 0xF4 && p[1] > 0x8F)) return 0;
        return 4;
    }
#undef CONT
    return 0;
}

/* Bytes a string scan stops at: the quote, the backslash, control characters, non-ASCII. */
static const unsigned char byte_class[256] = { /* 32 a row; portable C (MSVC too) */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
};

/* A string at the cursor: its raw content (between the quotes) and whether it has escapes. 0 for
 * anything msgspec would refuse: raw control characters, bad UTF-8, bad escapes, unpaired surrogates
 * (the decoding path then reports the frame). */
static int scan_string(Cur *c, const char **s, Py_ssize_t *len, int *escaped) {
    skip_ws(c);
    if (c->p >= c->end || *c->p != '"') return 0;
    /* One pass to the closing quote, eight bytes at a time where it can (keys and values are short: this
     * beats two memchr calls); an escape's next character is skipped here and the escapes are checked
     * below. */
    const char *start = c->p + 1, *q = start, *end = c->end;
    int esc = 0;
    for (;;) {
        /* Eight bytes at a time while none of them is a quote, a backslash, a control character or
         * non-ASCII (SWAR tests: zero byte, byte < 0x20, high bit). */
        while (end - q >= 8) {
            uint64_t w;
            memcpy(&w, q, 8);
            uint64_t quote = w ^ 0x2222222222222222ull, slash = w ^ 0x5C5C5C5C5C5C5C5Cull;
            if (((quote - 0x0101010101010101ull) & ~quote & 0x8080808080808080ull) |
                ((slash - 0x0101010101010101ull) & ~slash & 0x8080808080808080ull) |
                ((w - 0x2020202020202020ull) & ~w & 0x8080808080808080ull) | (w & 0x8080808080808080ull))
                break;
            q += 8;
        }
        /* Byte by byte through the word that has one (or the tail). */
        const char *stop = end - q >= 8 ? q + 8 : end;
        for (; q < stop; q++) {
            unsigned char b = (unsigned char)*q;
            if (!byte_class[b]) continue; /* the common case: printable ASCII, one load and one branch */
            if (b == '"') goto closed;
            if (b == '\\') {
                if (end - q < 2) return 0;
                esc = 1;
                q++; /* the escaped character (valid_escapes checks it is one of JSON's) */
            } else if (b < 0x20) {
                return 0;
            } else if (b >= 0x80) {
                int n = utf8_length((const unsigned char *)q, end);
                if (!n) return 0;
                q += n - 1;
            }
        }
        if (q >= end) return 0;
    }
closed:
    if (esc && !valid_escapes(start, q)) return 0;
    *s = start;
    *len = q - start;
    *escaped = esc;
    c->p = q + 1;
    return 1;
}

static int skip_value(Cur *c, int depth);

static int skip_container(Cur *c, int depth, char close, int keyed) {
    if (depth > MAX_DEPTH) return 0;
    if (eat(c, close)) return 1;
    for (;;) {
        if (keyed) {
            const char *s;
            Py_ssize_t n;
            int e;
            if (!scan_string(c, &s, &n, &e) || !eat(c, ':')) return 0;
        }
        if (!skip_value(c, depth + 1)) return 0;
        if (eat(c, ',')) continue;
        return eat(c, close);
    }
}

static int skip_literal(Cur *c, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return 0;
    c->p += n;
    return 1;
}

/* A JSON number, strictly: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static int skip_number(Cur *c) {
    const char *p = c->p, *end = c->end;
#define DIGIT (p < end && *p >= '0' && *p <= '9')
    if (p < end && *p == '-') p++;
    if (!DIGIT) return 0;
    if (*p == '0') p++;
    else while (DIGIT) p++;
    if (p < end && *p == '.') {
        p++;
        if (!DIGIT) return 0;
        while (DIGIT) p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (!DIGIT) return 0;
        while (DIGIT) p++;
    }
#undef DIGIT
    c->p = p;
    return 1;
}

static int skip_value(Cur *c, int depth) {
    skip_ws(c);
    if (c->p >= c->end) return 0;
    const char *s;
    Py_ssize_t n;
    int e;
    switch (*c->p) {
    case '{': c->p++; return skip_container(c, depth, '}', 1);
    case '[': c->p++; return skip_container(c, depth, ']', 0);
    case '"': return scan_string(c, &s, &n, &e);
    case 't': return skip_literal(c, "true");
    case 'f': return skip_literal(c, "false");
    case 'n': return skip_literal(c, "null");
    default: return skip_number(c);
    }
}

/* A key of an object this parser reads: 0 if it has an escape (``"Goo\u0064"`` is ``Good`` to msgspec;
 * declined rather than unescaped, as real servers never write one). */
static inline int scan_key(Cur *c, const char **s, Py_ssize_t *n) {
    int escaped;
    return scan_string(c, s, n, &escaped) && !escaped && eat(c, ':');
}

/* A field seen twice in one object: msgspec keeps the last, so such a frame is declined. */
#define ONCE(bit) do { if (seen & (bit)) return SLOW; seen |= (bit); } while (0)

static inline int key_is(const char *s, Py_ssize_t n, int escaped, const char *name) {
    return !escaped && (size_t)n == strlen(name) && memcmp(s, name, n) == 0;
}

/* -- timestamps ------------------------------------------------------------------------------------- */

static int digits(const char *s, int n, int *out) {
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 1;
}

static int64_t days_from_civil(int y, int m, int d) { /* H. Hinnant's algorithm */
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* YYYY-MM-DD[T ]HH:MM:SS[.f{1,9}][Z|+HH:MM|-HH:MM|+HHMM]; no zone means UTC; digits past 6 truncated. */
static int parse_timestamp(const char *s, Py_ssize_t n, int64_t *out) {
    int y, mo, d, h, mi, se;
    if (n < 19 || s[4] != '-' || s[7] != '-' || (s[10] != 'T' && s[10] != ' ' && s[10] != 't') || s[13] != ':' ||
        s[16] != ':')
        return 0;
    if (!digits(s, 4, &y) || !digits(s + 5, 2, &mo) || !digits(s + 8, 2, &d) || !digits(s + 11, 2, &h) ||
        !digits(s + 14, 2, &mi) || !digits(s + 17, 2, &se))
        return 0;
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] || h > 23 || mi > 59 || se > 59) return 0;
    if (mo == 2 && d == 29 && !((y % 4 == 0 && y % 100 != 0) || y % 400 == 0)) return 0;
    Py_ssize_t i = 19;
    int64_t micros = 0;
    if (i < n && s[i] == '.') {
        i++;
        int count = 0;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            if (count < 6) micros = micros * 10 + (s[i] - '0');
            count++;
            i++;
        }
        if (count == 0 || count > 9) return 0;
        for (int k = count; k < 6; k++) micros *= 10;
    }
    int64_t offset = 0;
    if (i < n) {
        if ((s[i] == 'Z' || s[i] == 'z') && i + 1 == n) {
            i++;
        } else if (s[i] == '+' || s[i] == '-') {
            int sign = s[i] == '-' ? -1 : 1, oh, om;
            Py_ssize_t rest = n - i - 1;
            const char *z = s + i + 1;
            if (rest == 5 && z[2] == ':' && digits(z, 2, &oh) && digits(z + 3, 2, &om)) {
            } else if (rest == 4 && digits(z, 2, &oh) && digits(z + 2, 2, &om)) {
            } else {
                return 0;
            }
            if (oh > 23 || om > 59) return 0;
            offset = sign * (oh * 3600 + om * 60);
            i = n;
        } else {
            return 0;
        }
    }
    if (i != n) return 0;
    int64_t seconds = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset;
    *out = seconds * 1000000 + micros;
    return 1;
}

/* -- strings ---------------------------------------------------------------------------------------- */


/* A JSON string's content as a Python str (NULL with no exception set if the escapes are bad). */
static PyObject *json_str(const char *s, Py_ssize_t n, int escaped) {
    if (!escaped) return PyUnicode_DecodeUTF8(s, n, "strict");
    char *out = malloc(n + 1), *o = out;
    if (!out) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        if (s[i] != '\\') {
            *o++ = s[i];
            continue;
        }
        if (++i >= n) goto bad;
        switch (s[i]) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (i + 4 >= n || !hex4(s + i + 1, &cp)) goto bad;
            i += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (i + 6 >= n || s[i + 1] != '\\' || s[i + 2] != 'u' || !hex4(s + i + 3, &lo) || lo < 0xDC00 ||
                    lo > 0xDFFF)
                    goto bad;
                i += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                goto bad;
            }
            if (cp < 0x80) *o++ = (char)cp;
            else if (cp < 0x800) { *o++ = (char)(0xC0 | (cp >> 6)); *o++ = (char)(0x80 | (cp & 0x3F)); }
            else if (cp < 0x10000) {
                *o++ = (char)(0xE0 | (cp >> 12)); *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                *o++ = (char)(0x80 | (cp & 0x3F));
            } else {
                *o++ = (char)(0xF0 | (cp >> 18)); *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
                *o++ = (char)(0x80 | ((cp >> 6) & 0x3F)); *o++ = (char)(0x80 | (cp & 0x3F));
            }
            break;
        }
        default: goto bad;
        }
    }
    PyObject *result = PyUnicode_DecodeUTF8(out, o - out, "strict");
    free(out);
    return result;
bad:
    free(out);
    return NULL;
}

/* -- the parser ------------------------------------------------------------------------------------- */

/* Distinct strings (units, state names, text values) become one Python str each; columns hold indexes.
 * Pointers point into the frames, which live for the whole call. Once the table is full, further
 * strings are still added, just without looking for an earlier copy. No Python objects here: they are
 * made after the scan, with the GIL (see parse). */
typedef struct {
    const char *ptr;
    Py_ssize_t len;
    int escaped;
} Span;

typedef struct {
    Buf spans; /* Span per index */
    int16_t slot[INTERN_SLOTS]; /* hash of the raw text -> index + 1 (first MAX_INTERNED), 0 = empty */
    int count;
} Interner;

typedef struct {
    Py_ssize_t row;
    const char *ptr;
    Py_ssize_t len;
} RawValue;

typedef struct {
    const char *ptr;
    Py_ssize_t len;
    Py_ssize_t first_row, end_row;
    Py_ssize_t stream; /* its index in `streams` */
} Miss;

typedef struct {
    Buf ids, ts, received, value, value_null, good, questionable, substituted, annotated, uom, stream_uom, text,
        code, code_null, system;
    Buf raw;    /* RawValue: values Python must classify */
    Buf misses; /* Miss: webids not in the id table yet, resolved with the GIL */
    Buf streams; /* int32 (id, rows) per stream in order, empty ones too: what a paged reader needs */
    Interner units, texts;
    Py_ssize_t rows;
} Out;

static inline Span *spans_of(Interner *in) { return (Span *)in->spans.data; }

/* The index of a string in the interner, adding it (-2 when out of memory). */
static Py_ssize_t intern(Interner *in, const char *s, Py_ssize_t n, int escaped) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    uint32_t slot = h % INTERN_SLOTS;
    int free_slot = 0;
    for (int probe = 0; probe < MAX_PROBES; probe++, slot = (slot + 1) % INTERN_SLOTS) {
        int k = in->slot[slot] - 1;
        if (k < 0) {
            free_slot = 1;
            break;
        }
        Span *known = &spans_of(in)[k];
        if (known->len == n && memcmp(known->ptr, s, n) == 0) return k;
    }
    Py_ssize_t index = (Py_ssize_t)(in->spans.len / sizeof(Span));
    if (!buf_grow(&in->spans, sizeof(Span))) return -2;
    spans_of(in)[index] = (Span){s, n, escaped};
    in->spans.len += sizeof(Span);
    if (free_slot && in->count < MAX_INTERNED) { /* else a second copy: columns hold indexes, either is right */
        in->slot[slot] = (int16_t)(in->count + 1);
        in->count++;
    }
    return index;
}

/* The Python list of an interner's strings (NULL with an exception set on failure). */
static PyObject *interned_list(Interner *in) {
    Py_ssize_t count = (Py_ssize_t)(in->spans.len / sizeof(Span));
    PyObject *list = PyList_New(count);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        Span *span = &spans_of(in)[i];
        PyObject *text = json_str(span->ptr, span->len, span->escaped);
        if (!text) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad escape in a JSON string");
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, text);
    }
    return list;
}

static Py_ssize_t unit_index(Out *out, const char *s, Py_ssize_t n, int escaped) {
    return n == 0 ? -1 : intern(&out->units, s, n, escaped);
}

/* An optional string field: 1 = string (s, n, escaped set), 0 = null, -1 = something else. */
static int string_or_null(Cur *c, const char **s, Py_ssize_t *n, int *escaped) {
    skip_ws(c);
    if (c->p < c->end && *c->p == 'n') return skip_literal(c, "null") ? 0 : -1;
    return scan_string(c, s, n, escaped) ? 1 : -1;
}

enum { OK = 1, SLOW = 0, NOMEM = -1, UNKNOWN = 2 };

/* A "UnitsAbbreviation" value: its interned index, or -1 for null or empty. */
static int read_units(Cur *c, Out *out, Py_ssize_t *index) {
    const char *s;
    Py_ssize_t n;
    int e, kind = string_or_null(c, &s, &n, &e);
    if (kind < 0) return SLOW;
    *index = kind == 1 ? unit_index(out, s, n, e) : -1;
    return *index == -2 ? NOMEM : OK;
}

/* A flag: 1/0, or -1 when null (the default applies); 0 on anything else (text flags: the slow path). */
static int read_flag(Cur *c, int8_t *flag) {
    skip_ws(c);
    if (skip_literal(c, "true")) { *flag = 1; return 1; }
    if (skip_literal(c, "false")) { *flag = 0; return 1; }
    if (skip_literal(c, "null")) { *flag = -1; return 1; }
    return 0;
}

/* An integer literal that fits int32 (state codes); 0 if it is anything else. */
static int read_int32(Cur *c, int32_t *out) {
    skip_ws(c);
    const char *start = c->p;
    if (!skip_number(c)) return 0;
    long long v = 0;
    int negative = *start == '-';
    for (const char *q = start + negative; q < c->p; q++) {
        if (*q < '0' || *q > '9') return 0;
        v = v * 10 + (*q - '0');
        if (v > 2147483648LL) return 0;
    }
    v = negative ? -v : v;
    if (v > 2147483647LL) return 0;
    *out = (int32_t)v;
    return 1;
}

/* A digital or system state {"Name": text, "Value": int, "IsSystem": bool}, in any order and nothing
 * else; 0 if the object is anything else (the caller hands it to Python whole). */
static int read_state(Cur *c, const char **name, Py_ssize_t *name_len, int *name_escaped, int32_t *code,
                      uint8_t *system) {
    int have_name = 0, have_code = 0, have_system = 0;
    *system = 0;
    if (!eat(c, '{')) return 0;
    if (eat(c, '}')) return 0;
    for (;;) {
        const char *k;
        Py_ssize_t kn;
        int ke = 0;
        if (!scan_key(c, &k, &kn)) return 0; /* escaped keys: Python reads the object */
        if (key_is(k, kn, ke, "Name")) {
            if (have_name || !scan_string(c, name, name_len, name_escaped)) return 0; /* repeated: Python's */
            have_name = 1;
        } else if (key_is(k, kn, ke, "Value")) {
            if (have_code || !read_int32(c, code)) return 0;
            have_code = 1;
        } else if (key_is(k, kn, ke, "IsSystem")) {
            int8_t flag;
            if (have_system || !read_flag(c, &flag)) return 0;
            have_system = 1;
            *system = flag == 1;
        } else {
            return 0;
        }
        if (eat(c, ',')) continue;
        if (eat(c, '}')) break;
        return 0;
    }
    return have_name && have_code;
}

/* Clinger's fast path: up to 15 significant digits and a power of ten within 10^22 are exact in double
 * arithmetic, so the result is the correctly rounded one strtod would give. 0 if it does not apply. */
static int fast_double(const char *p, const char *end, double *out) {
    static const double pow10[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
                                   1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    int negative = 0, digits = 0, scale = 0;
    uint64_t mantissa = 0;
    if (p < end && *p == '-') { negative = 1; p++; }
    for (; p < end && *p >= '0' && *p <= '9'; p++) {
        if (mantissa || *p != '0') digits++;
        mantissa = mantissa * 10 + (uint64_t)(*p - '0');
        if (digits > 15) return 0;
    }
    if (p < end && *p == '.') {
        for (p++; p < end && *p >= '0' && *p <= '9'; p++) {
            if (mantissa || *p != '0') digits++;
            mantissa = mantissa * 10 + (uint64_t)(*p - '0');
            scale++;
            if (digits > 15) return 0;
        }
    }
    if (p != end || scale > 22) return 0; /* exponents: the general path */
    double value = (double)mantissa / pow10[scale];
    *out = negative ? -value : value;
    return 1;
}

typedef struct {
    double number;
    uint8_t is_null, code_null, system;
    int32_t code;
    Py_ssize_t text;
    const char *raw_start, *raw_end;
} Value;

/* The "Value" field: a number, null, bool, text or state here; anything else as a raw slice. */
static int read_value(Cur *c, Out *out, Value *v) {
    v->number = 0.0;
    v->is_null = 1;
    v->code_null = 1;
    v->system = 0;
    v->code = 0;
    v->text = -1;
    v->raw_start = NULL;
    skip_ws(c);
    if (c->p >= c->end) return SLOW;
    const char *start = c->p, *s;
    Py_ssize_t n;
    int e;
    char ch = *c->p;
    if (ch == '-' || (ch >= '0' && ch <= '9')) {
        if (!skip_number(c)) return SLOW;
        int integral = 1, ndigits = 0;
        for (const char *q = start; q < c->p; q++) {
            if (*q == '.' || *q == 'e' || *q == 'E') integral = 0;
            else if (*q >= '0' && *q <= '9') ndigits++;
        }
        if (integral && ndigits > 15) { /* may not be exact as a double: Python decides */
            v->raw_start = start;
            v->raw_end = c->p;
            return OK;
        }
        if (fast_double(start, c->p, &v->number)) {
            if (integral && v->number == 0.0) v->number = 0.0; /* "-0" is the int 0 to msgspec: +0.0 */
            v->is_null = 0;
            return OK;
        }
        char copy[64], *endp;
        if (c->p - start >= (Py_ssize_t)sizeof(copy)) { /* an absurdly long number: Python decides */
            v->raw_start = start;
            v->raw_end = c->p;
            return OK;
        }
        memcpy(copy, start, (size_t)(c->p - start));
        copy[c->p - start] = 0;
        v->number = strtod(copy, &endp); /* numbers here are ASCII digits, '.', 'e': locale-proof */
        if (endp != copy + (c->p - start) || !isfinite(v->number)) return SLOW; /* 1e999: msgspec refuses */
        v->is_null = 0;
        return OK;
    }
    if (ch == 'n') return skip_literal(c, "null") ? OK : SLOW;
    if (ch == 't' || ch == 'f') {
        int truth = ch == 't';
        if (!skip_literal(c, truth ? "true" : "false")) return SLOW;
        v->number = truth;
        v->is_null = 0;
        v->text = intern(&out->texts, truth ? "true" : "false", truth ? 4 : 5, 0);
        return v->text == -2 ? NOMEM : OK;
    }
    if (ch == '"') {
        if (!scan_string(c, &s, &n, &e)) return SLOW;
        v->text = intern(&out->texts, s, n, e);
        return v->text == -2 ? NOMEM : OK;
    }
    if (ch == '{') {
        Cur probe = *c;
        if (read_state(&probe, &s, &n, &e, &v->code, &v->system)) {
            *c = probe;
            v->code_null = 0;
            v->text = intern(&out->texts, s, n, e);
            return v->text == -2 ? NOMEM : OK;
        }
    }
    if (!skip_value(c, 2)) return SLOW;
    v->raw_start = start;
    v->raw_end = c->p;
    return OK;
}

static int parse_value_object(Cur *c, Out *out, int64_t received) {
    if (!eat(c, '{')) return SLOW;
    int have_ts = 0, r;
    Py_ssize_t uom = -1;
    int64_t ts = 0;
    int8_t flags[4] = {-1, -1, -1, -1};
    unsigned seen = 0;
    Value v = {0.0, 1, 1, 0, 0, -1, NULL, NULL};
    if (!eat(c, '}')) {
        for (;;) {
            const char *k, *s;
            Py_ssize_t kn, n;
            int ke = 0, e;
            if (!scan_key(c, &k, &kn)) return SLOW;
            if (key_is(k, kn, ke, "Timestamp")) {
                ONCE(1);
                if (!scan_string(c, &s, &n, &e) || e || !parse_timestamp(s, n, &ts)) return SLOW;
                have_ts = 1;
            } else if (key_is(k, kn, ke, "Value")) {
                ONCE(2);
                if ((r = read_value(c, out, &v)) != OK) return r;
            } else if (key_is(k, kn, ke, "UnitsAbbreviation")) {
                ONCE(4);
                if ((r = read_units(c, out, &uom)) != OK) return r;
            } else if (key_is(k, kn, ke, "Good")) {
                ONCE(8);
                if (!read_flag(c, &flags[0])) return SLOW;
            } else if (key_is(k, kn, ke, "Questionable")) {
                ONCE(16);
                if (!read_flag(c, &flags[1])) return SLOW;
            } else if (key_is(k, kn, ke, "Substituted")) {
                ONCE(32);
                if (!read_flag(c, &flags[2])) return SLOW;
            } else if (key_is(k, kn, ke, "Annotated")) {
                ONCE(64);
                if (!read_flag(c, &flags[3])) return SLOW;
            } else if (key_is(k, kn, ke, "Errors")) {
                ONCE(128);
                skip_ws(c);
                if (!skip_literal(c, "null")) return SLOW;
            } else if (!skip_value(c, 2)) {
                return SLOW;
            }
            if (eat(c, ',')) continue;
            if (eat(c, '}')) break;
            return SLOW;
        }
    }
    if (!have_ts) return SLOW;
    if (v.raw_start) {
        if (!buf_grow(&out->raw, sizeof(RawValue))) return NOMEM;
        *(RawValue *)(out->raw.data + out->raw.len) = (RawValue){out->rows, v.raw_start, v.raw_end - v.raw_start};
        out->raw.len += sizeof(RawValue);
    }
    PUSH(out->ts, int64_t, ts);
    PUSH(out->received, int64_t, received);
    PUSH(out->value, double, v.number);
    PUSH(out->value_null, uint8_t, v.is_null);
    PUSH(out->text, int32_t, v.text);
    PUSH(out->code, int32_t, v.code);
    PUSH(out->code_null, uint8_t, v.code_null);
    PUSH(out->system, uint8_t, v.system);
    PUSH(out->good, int8_t, flags[0]);
    PUSH(out->questionable, int8_t, flags[1]);
    PUSH(out->substituted, int8_t, flags[2]);
    PUSH(out->annotated, int8_t, flags[3]);
    PUSH(out->uom, int32_t, uom);
    out->rows++;
    return OK;
nomem:
    return NOMEM;
}

/* webid -> id without a Python object per stream: an open-addressing table over the `ids` dict's own key
 * strings (a reference to each, no copy: 16 bytes per slot), filled from the whole dict whenever a
 * different dict (or one of another size) comes. Entries may be added to the dict (TagIds grows), never
 * changed or removed. Keys that are not compact ASCII strs (never webIds) are left out: a miss. */
typedef struct {
    PyObject *key; /* NULL = empty */
    uint32_t hash;
    int32_t id;
} IdSlot;

static IdSlot *id_slots;
static size_t id_capacity;
static PyObject *id_dict; /* a strong reference: its address cannot be reused while the table is for it */
static Py_ssize_t id_dict_size;

static uint64_t hash_bytes(const char *s, Py_ssize_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
        s += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, s, (size_t)n);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
    return h ^ (h >> 29);
}

/* With the GIL (it drops references). */
static void id_cache_clear(void) {
    for (size_t i = 0; i < id_capacity; i++) Py_XDECREF(id_slots[i].key);
    free(id_slots);
    id_slots = NULL;
    id_capacity = 0;
}

/* With the GIL: the table for every compact ASCII key of `ids_of` with an int id; 0 if out of memory. */
static int id_cache_fill(PyObject *ids_of) {
    size_t capacity = 1024;
    while (capacity < 2 * (size_t)PyDict_GET_SIZE(ids_of)) capacity *= 2; /* at most half full */
    IdSlot *slots = calloc(capacity, sizeof(IdSlot));
    if (!slots) return 0;
    id_slots = slots;
    id_capacity = capacity;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(ids_of, &pos, &key, &value)) {
        if (!PyUnicode_Check(key) || !PyUnicode_IS_COMPACT_ASCII(key) || !PyLong_Check(value)) continue;
        long id = PyLong_AsLong(value);
        if (id < 0 || id > INT32_MAX) {
            PyErr_Clear();
            continue;
        }
        uint32_t h = (uint32_t)hash_bytes((const char *)PyUnicode_DATA(key), PyUnicode_GET_LENGTH(key));
        size_t j = h & (capacity - 1);
        while (slots[j].key) j = (j + 1) & (capacity - 1);
        slots[j] = (IdSlot){Py_NewRef(key), h, (int32_t)id};
    }
    return 1;
}

/* The table's id for a webid, or -1 (no GIL needed: the table and its strings only change under the parse
 * lock, and a str's text never changes). */
static long cached_id(const char *s, Py_ssize_t n) {
    if (!id_capacity) return -1;
    uint32_t h = (uint32_t)hash_bytes(s, n);
    for (size_t j = h & (id_capacity - 1); id_slots[j].key; j = (j + 1) & (id_capacity - 1)) {
        PyObject *key = id_slots[j].key;
        if (id_slots[j].hash == h && PyUnicode_GET_LENGTH(key) == n && memcmp(PyUnicode_DATA(key), s, (size_t)n) == 0)
            return id_slots[j].id;
    }
    return -1;
}

/* With the GIL: a webid the table did not have, from the dict; UNKNOWN (its str in *unknown) if it is not
 * there either: a stream this process did not subscribe to, whose rows the caller drops. */
static int resolve_id(PyObject *ids_of, const char *s, Py_ssize_t n, long *id, PyObject **unknown) {
    PyObject *key = PyUnicode_DecodeUTF8(s, n, "strict");
    if (!key) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return NOMEM;
        PyErr_Clear(); /* not a webid of ours: the decoding path reports what it is */
        return SLOW;
    }
    PyObject *found = PyDict_GetItemWithError(ids_of, key);
    if (!found) {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            return NOMEM;
        }
        *unknown = key;
        return UNKNOWN;
    }
    Py_DECREF(key);
    *id = PyLong_AsLong(found);
    if (*id == -1 && PyErr_Occurred()) return NOMEM;
    return OK;
}

/* The id table belongs to one dict at a time; with the GIL. 0 if out of memory. */
static int use_ids(PyObject *ids_of) {
    if (ids_of != id_dict || PyDict_GET_SIZE(ids_of) != id_dict_size || !id_capacity) {
        id_cache_clear();
        Py_INCREF(ids_of);
        Py_XSETREF(id_dict, ids_of);
        id_dict_size = PyDict_GET_SIZE(ids_of);
        return id_cache_fill(ids_of);
    }
    return 1;
}

static int parse_stream(Cur *c, Out *out, int64_t received) {
    if (!eat(c, '{')) return SLOW;
    Py_ssize_t first = out->rows;
    long id = -1;
    const char *miss_ptr = NULL;
    Py_ssize_t miss_len = 0;
    Py_ssize_t stream_uom = -1;
    int have_items = 0, r;
    unsigned seen = 0;
    if (!eat(c, '}')) {
        for (;;) {
            const char *k, *s;
            Py_ssize_t kn, n;
            int ke = 0, e;
            if (!scan_key(c, &k, &kn)) return SLOW;
            if (key_is(k, kn, ke, "WebId")) {
                ONCE(1);
                if (!scan_string(c, &s, &n, &e) || e) return SLOW;
                id = cached_id(s, n);
                if (id < 0) { /* resolved after the scan */
                    miss_ptr = s;
                    miss_len = n;
                    id = 0;
                }
            } else if (key_is(k, kn, ke, "UnitsAbbreviation")) {
                ONCE(2);
                if ((r = read_units(c, out, &stream_uom)) != OK) return r;
            } else if (key_is(k, kn, ke, "Name") || key_is(k, kn, ke, "Path")) {
                ONCE(k[0] == 'N' ? 4 : 8); /* str | None to msgspec: anything else fails its decoding */
                if (string_or_null(c, &s, &n, &e) < 0) return SLOW;
            } else if (key_is(k, kn, ke, "Items")) {
                ONCE(16);
                if (!eat(c, '[')) return SLOW;
                have_items = 1;
                if (!eat(c, ']')) {
                    for (;;) {
                        if ((r = parse_value_object(c, out, received)) != OK) return r;
                        if (eat(c, ',')) continue;
                        if (eat(c, ']')) break;
                        return SLOW;
                    }
                }
            } else if (key_is(k, kn, ke, "Value")) {
                return SLOW; /* one Value object instead of Items: the slow path knows it */
            } else if (!skip_value(c, 2)) {
                return SLOW;
            }
            if (eat(c, ',')) continue;
            if (eat(c, '}')) break;
            return SLOW;
        }
    }
    if (id < 0 || !have_items) return SLOW;
    Py_ssize_t stream = (Py_ssize_t)(out->streams.len / (2 * sizeof(int32_t)));
    if (miss_ptr) {
        if (!buf_grow(&out->misses, sizeof(Miss))) return NOMEM;
        *(Miss *)(out->misses.data + out->misses.len) = (Miss){miss_ptr, miss_len, first, out->rows, stream};
        out->misses.len += sizeof(Miss);
    }
    if (out->rows - first > INT32_MAX) return SLOW;
    PUSH(out->streams, int32_t, id);
    PUSH(out->streams, int32_t, out->rows - first);
    for (Py_ssize_t row = first; row < out->rows; row++) {
        PUSH(out->ids, int32_t, id);
        PUSH(out->stream_uom, int32_t, stream_uom);
    }
    return OK;
nomem:
    return NOMEM;
}

static int parse_frame(const char *text, Py_ssize_t size, Out *out, int64_t received) {
    Cur c = {text, text + size};
    int r;
    unsigned seen = 0;
    if (!eat(&c, '{')) return SLOW;
    if (!eat(&c, '}')) {
        for (;;) {
            const char *k;
            Py_ssize_t kn;
            int ke = 0;
            if (!scan_key(&c, &k, &kn)) return SLOW;
            if (key_is(k, kn, ke, "Items")) {
                ONCE(1);
                skip_ws(&c);
                if (skip_literal(&c, "null")) {
                } else if (!eat(&c, '[')) {
                    return SLOW;
                } else if (!eat(&c, ']')) {
                    for (;;) {
                        if ((r = parse_stream(&c, out, received)) != OK) return r;
                        if (eat(&c, ',')) continue;
                        if (eat(&c, ']')) break;
                        return SLOW;
                    }
                }
            } else if (key_is(k, kn, ke, "WebException")) {
                ONCE(2);
                skip_ws(&c);
                if (!skip_literal(&c, "null")) return SLOW; /* logged by the slow path */
            } else if (!skip_value(&c, 1)) {
                return SLOW;
            }
            if (eat(&c, ',')) continue;
            if (eat(&c, '}')) break;
            return SLOW;
        }
    }
    skip_ws(&c);
    return c.p == c.end ? OK : SLOW;
}

static PyObject *take_bytes(Buf *b) {
    return PyBytes_FromStringAndSize(b->data ? b->data : "", (Py_ssize_t)b->len);
}

static void free_out(Out *out) {
    Buf *bufs[] = {&out->ids, &out->ts, &out->received, &out->value, &out->value_null, &out->good,
                   &out->questionable, &out->substituted, &out->annotated, &out->uom, &out->stream_uom,
                   &out->text, &out->code, &out->code_null, &out->system, &out->raw, &out->misses, &out->streams,
                   &out->units.spans, &out->texts.spans};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]->data);
    free(out);
}

/* With the GIL, after the scan: webids first seen, values for Python, the interned strings, the tuple.
 * Rows of webids not in `ids_of` get id -1, and each such stream is listed as (webid, rows) in `unknown`. */
static PyObject *finish(Out *out, PyObject *ids_of) {
    Miss *misses = (Miss *)out->misses.data;
    PyObject *unknown = PyList_New(0);
    if (!unknown) return NULL;
    for (size_t i = 0; i < out->misses.len / sizeof(Miss); i++) {
        long id = -1;
        PyObject *webid = NULL;
        int r = resolve_id(ids_of, misses[i].ptr, misses[i].len, &id, &webid);
        if (r == NOMEM) goto fail_unknown;
        if (r == SLOW) {
            Py_DECREF(unknown);
            Py_RETURN_NONE;
        }
        if (r == UNKNOWN) {
            PyObject *entry = Py_BuildValue("(Nn)", webid, misses[i].end_row - misses[i].first_row);
            if (!entry || PyList_Append(unknown, entry) < 0) {
                Py_XDECREF(entry);
                goto fail_unknown;
            }
            Py_DECREF(entry);
            id = -1;
        }
        for (Py_ssize_t row = misses[i].first_row; row < misses[i].end_row; row++)
            ((int32_t *)out->ids.data)[row] = (int32_t)id;
        ((int32_t *)out->streams.data)[2 * misses[i].stream] = (int32_t)id;
    }
    Py_ssize_t raw_count = (Py_ssize_t)(out->raw.len / sizeof(RawValue));
    PyObject *raw = PyList_New(raw_count);
    if (!raw) goto fail_unknown;
    for (Py_ssize_t i = 0; i < raw_count; i++) {
        RawValue *value = &((RawValue *)out->raw.data)[i];
        PyObject *pair = Py_BuildValue("(ny#)", value->row, value->ptr, value->len);
        if (!pair) {
            Py_DECREF(raw);
            goto fail_unknown;
        }
        PyList_SET_ITEM(raw, i, pair);
    }
    PyObject *units = interned_list(&out->units), *texts = units ? interned_list(&out->texts) : NULL;
    if (!texts) {
        Py_DECREF(raw);
        Py_XDECREF(units);
        Py_DECREF(unknown);
        if (PyErr_ExceptionMatches(PyExc_ValueError)) { /* bad UTF-8 or escapes: the decoding path reports it */
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        return NULL;
    }
    return Py_BuildValue(
        "(nNNNNNNNNNNNNNNNNNNNN)", out->rows, take_bytes(&out->ids), take_bytes(&out->ts), take_bytes(&out->received),
        take_bytes(&out->value), take_bytes(&out->value_null), take_bytes(&out->text), take_bytes(&out->code),
        take_bytes(&out->code_null), take_bytes(&out->system), take_bytes(&out->good),
        take_bytes(&out->questionable), take_bytes(&out->substituted), take_bytes(&out->annotated),
        take_bytes(&out->uom), take_bytes(&out->stream_uom), units, texts, raw, unknown, take_bytes(&out->streams));
fail_unknown:
    Py_DECREF(unknown);
    return NULL;
}

static PyThread_type_lock parse_lock; /* one parse at a time: the id table is shared */

static PyObject *parse(PyObject *self, PyObject *args) {
    PyObject *frames, *received, *ids_of, *result = NULL;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &frames, &PyList_Type, &received, &PyDict_Type, &ids_of))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(frames);
    if (PyList_GET_SIZE(received) != count) {
        PyErr_SetString(PyExc_ValueError, "frames and received_us differ in length");
        return NULL;
    }
    Out *out = calloc(1, sizeof(Out)); /* ~50 KB: not on the stack */
    PyObject **held = calloc((size_t)count + 1, sizeof(PyObject *));
    const char **texts = calloc((size_t)count + 1, sizeof(char *));
    Py_ssize_t *sizes = calloc((size_t)count + 1, sizeof(Py_ssize_t));
    int64_t *when = calloc((size_t)count + 1, sizeof(int64_t));
    if (!out || !held || !texts || !sizes || !when) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) { /* with the GIL: the frames' UTF-8 text, kept alive */
        /* Nothing below runs Python code (exact ints only: an __index__ could change the lists), and each
         * frame is held by a reference of our own from here on. */
        PyObject *frame = held[i] = Py_NewRef(PyList_GET_ITEM(frames, i));
        PyObject *stamp = PyList_GET_ITEM(received, i);
        if (!PyLong_CheckExact(stamp)) {
            PyErr_SetString(PyExc_TypeError, "received_us must be ints");
            goto done;
        }
        if (PyUnicode_Check(frame)) {
            texts[i] = PyUnicode_AsUTF8AndSize(frame, &sizes[i]);
            if (!texts[i]) {
                if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) goto done;
                PyErr_Clear(); /* a lone surrogate in a str frame: the decoding path reports it */
                result = Py_NewRef(Py_None);
                goto done;
            }
        } else if (PyBytes_Check(frame)) {
            texts[i] = PyBytes_AS_STRING(frame);
            sizes[i] = PyBytes_GET_SIZE(frame);
        } else {
            PyErr_SetString(PyExc_TypeError, "frames must be str or bytes");
            goto done;
        }
        when[i] = PyLong_AsLongLong(stamp);
        if (when[i] == -1 && PyErr_Occurred()) goto done;
    }
    int r = OK;
    {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(parse_lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    if (!use_ids(ids_of)) {
        PyThread_release_lock(parse_lock);
        PyErr_NoMemory();
        goto done;
    }
    {
        Py_BEGIN_ALLOW_THREADS /* the scan itself: other threads (the readers) run meanwhile */
        for (Py_ssize_t i = 0; i < count && r == OK; i++) r = parse_frame(texts[i], sizes[i], out, when[i]);
        Py_END_ALLOW_THREADS
    }
    if (r == OK) result = finish(out, ids_of);
    else if (r == SLOW) result = Py_NewRef(Py_None);
    else PyErr_NoMemory();
    PyThread_release_lock(parse_lock);
done:
    for (Py_ssize_t i = 0; held && i < count; i++) Py_XDECREF(held[i]);
    free(held);
    free(texts);
    free(sizes);
    free(when);
    if (out) free_out(out);
    return result;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_VARARGS,
     "parse(frames, received_us, ids) -> columns tuple, or None when the value-by-value path must decode"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_framecodec", NULL, -1, methods};

PyMODINIT_FUNC PyInit__framecodec(void) {
    parse_lock = PyThread_allocate_lock();
    if (!parse_lock) return PyErr_NoMemory();
    return PyModule_Create(&module);
}
