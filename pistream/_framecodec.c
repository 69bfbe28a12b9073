/* Channel frames straight into columns: an optional accelerator for pistream.columns.
 *
 * parse(frames, received_us, ids) reads PI Web API streamset channel messages (JSON text) and returns
 * their values as packed column buffers, without a Python object per value. It understands exactly the
 * steady-state shape ({"Items":[{"WebId":..,"UnitsAbbreviation":..,"Items":[{"Timestamp":..,"Value":..,
 * "UnitsAbbreviation":..,"Good":..,...}]}]}, any key order, unknown keys skipped) and returns None for
 * anything else (a stream not in `ids`, "Errors", flags as text, "Value" instead of "Items", a timestamp
 * it cannot read, malformed JSON, a WebException): the caller then decodes with msgspec, value by value.
 * Values that are not plain numbers (text, states, bools, arrays, big integers) come back as raw JSON
 * slices for Python to classify.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64
#define MAX_UNITS 4096
#define UNIT_SLOTS 8192 /* open addressing, at most half full */

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

/* A string at the cursor: its raw content (between the quotes) and whether it has escapes. */
static int scan_string(Cur *c, const char **s, Py_ssize_t *len, int *escaped) {
    skip_ws(c);
    if (c->p >= c->end || *c->p != '"') return 0;
    const char *start = ++c->p;
    int esc = 0;
    while (c->p < c->end) {
        char ch = *c->p;
        if (ch == '"') {
            *s = start;
            *len = c->p - start;
            *escaped = esc;
            c->p++;
            return 1;
        }
        if (ch == '\\') {
            esc = 1;
            if (c->p + 1 >= c->end) return 0;
            char next = c->p[1];
            if (next == 'u') {
                if (c->end - c->p < 6) return 0;
                for (int i = 2; i < 6; i++)
                    if (!((c->p[i] >= '0' && c->p[i] <= '9') || (c->p[i] >= 'a' && c->p[i] <= 'f') ||
                          (c->p[i] >= 'A' && c->p[i] <= 'F')))
                        return 0;
                c->p += 6;
            } else if (next && strchr("\"\\/bfnrt", next)) {
                c->p += 2;
            } else {
                return 0;
            }
            continue;
        }
        if ((unsigned char)ch < 0x20) return 0;
        c->p++;
    }
    return 0;
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

typedef struct {
    Buf ids, ts, received, value, value_null, good, questionable, substituted, annotated, uom, stream_uom;
    PyObject *raw;        /* list of (row, bytes) for values Python must classify */
    PyObject *units;      /* list of distinct unit strings; uom columns hold indexes into it, -1 = none */
    const char *unit_ptr[MAX_UNITS]; /* into the frames, which live for the whole call */
    Py_ssize_t unit_len[MAX_UNITS];
    int unit_count;
    int16_t unit_slot[UNIT_SLOTS]; /* hash of the raw text -> index + 1, 0 = empty */
    Py_ssize_t rows;
    PyObject *ids_of;     /* dict: webid (bytes) -> int id */
} Out;

/* The index of a unit string in out->units, adding it (-1 for none; -2 on failure). */
static int unit_index(Out *out, const char *s, Py_ssize_t n, int escaped) {
    if (n == 0) return -1;
    uint32_t h = 2166136261u; /* FNV-1a */
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    for (uint32_t slot = h % UNIT_SLOTS;; slot = (slot + 1) % UNIT_SLOTS) {
        int k = out->unit_slot[slot] - 1;
        if (k < 0) {
            if (out->unit_count >= MAX_UNITS) return -2;
            PyObject *text = json_str(s, n, escaped);
            if (!text) return -2;
            int ok = PyList_Append(out->units, text) == 0;
            Py_DECREF(text);
            if (!ok) return -2;
            out->unit_ptr[out->unit_count] = s;
            out->unit_len[out->unit_count] = n;
            out->unit_slot[slot] = (int16_t)(out->unit_count + 1);
            return out->unit_count++;
        }
        if (out->unit_len[k] == n && memcmp(out->unit_ptr[k], s, n) == 0) return k;
    }
}

/* An optional string field: 1 = string (s, n, escaped set), 0 = null, -1 = something else. */
static int string_or_null(Cur *c, const char **s, Py_ssize_t *n, int *escaped) {
    skip_ws(c);
    if (c->p < c->end && *c->p == 'n') return skip_literal(c, "null") ? 0 : -1;
    return scan_string(c, s, n, escaped) ? 1 : -1;
}

/* A flag: 1/0, or -1 when null (the default applies); 0 on anything else (text flags: the slow path). */
static int read_flag(Cur *c, int8_t *flag) {
    skip_ws(c);
    if (skip_literal(c, "true")) { *flag = 1; return 1; }
    if (skip_literal(c, "false")) { *flag = 0; return 1; }
    if (skip_literal(c, "null")) { *flag = -1; return 1; }
    return 0;
}

enum { OK = 1, SLOW = 0, NOMEM = -1 };

static int parse_value_object(Cur *c, Out *out, int64_t received) {
    if (!eat(c, '{')) return SLOW;
    int have_ts = 0, uom = -1;
    int64_t ts = 0;
    double number = 0.0;
    uint8_t is_null = 1;
    int8_t flags[4] = {-1, -1, -1, -1};
    const char *raw_start = NULL, *raw_end = NULL;
    if (!eat(c, '}')) {
        for (;;) {
            const char *k, *s;
            Py_ssize_t kn, n;
            int ke, e;
            if (!scan_string(c, &k, &kn, &ke) || !eat(c, ':')) return SLOW;
            if (key_is(k, kn, ke, "Timestamp")) {
                if (!scan_string(c, &s, &n, &e) || e || !parse_timestamp(s, n, &ts)) return SLOW;
                have_ts = 1;
            } else if (key_is(k, kn, ke, "Value")) {
                skip_ws(c);
                if (c->p >= c->end) return SLOW;
                char ch = *c->p;
                if (ch == '-' || (ch >= '0' && ch <= '9')) {
                    const char *start = c->p;
                    if (!skip_number(c)) return SLOW;
                    int integral = 1, ndigits = 0;
                    for (const char *q = start; q < c->p; q++) {
                        if (*q == '.' || *q == 'e' || *q == 'E') integral = 0;
                        else if (*q >= '0' && *q <= '9') ndigits++;
                    }
                    if (integral && ndigits > 15) { /* may not be exact as a double: Python decides */
                        raw_start = start;
                        raw_end = c->p;
                        is_null = 1;
                    } else {
                        char *endp;
                        number = PyOS_string_to_double(start, &endp, NULL);
                        if (number == -1.0 && PyErr_Occurred()) { PyErr_Clear(); return SLOW; }
                        if (endp != c->p) return SLOW;
                        is_null = 0;
                        raw_start = NULL;
                    }
                } else if (ch == 'n') {
                    if (!skip_literal(c, "null")) return SLOW;
                    is_null = 1;
                    raw_start = NULL;
                } else {
                    const char *start = c->p;
                    if (!skip_value(c, 2)) return SLOW;
                    raw_start = start;
                    raw_end = c->p;
                    is_null = 1;
                }
            } else if (key_is(k, kn, ke, "UnitsAbbreviation")) {
                int kind = string_or_null(c, &s, &n, &e);
                if (kind < 0) return SLOW;
                if (kind == 1) {
                    uom = unit_index(out, s, n, e);
                    if (uom == -2) return PyErr_Occurred() ? NOMEM : SLOW;
                }
            } else if (key_is(k, kn, ke, "Good")) {
                if (!read_flag(c, &flags[0])) return SLOW;
            } else if (key_is(k, kn, ke, "Questionable")) {
                if (!read_flag(c, &flags[1])) return SLOW;
            } else if (key_is(k, kn, ke, "Substituted")) {
                if (!read_flag(c, &flags[2])) return SLOW;
            } else if (key_is(k, kn, ke, "Annotated")) {
                if (!read_flag(c, &flags[3])) return SLOW;
            } else if (key_is(k, kn, ke, "Errors")) {
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
    if (raw_start) {
        PyObject *slice = PyBytes_FromStringAndSize(raw_start, raw_end - raw_start);
        if (!slice) return NOMEM;
        PyObject *pair = Py_BuildValue("(nN)", out->rows, slice);
        if (!pair) return NOMEM;
        int failed = PyList_Append(out->raw, pair);
        Py_DECREF(pair);
        if (failed) return NOMEM;
    }
    PUSH(out->ts, int64_t, ts);
    PUSH(out->received, int64_t, received);
    PUSH(out->value, double, number);
    PUSH(out->value_null, uint8_t, is_null);
    PUSH(out->good, int8_t, flags[0]);
    PUSH(out->questionable, int8_t, flags[1]);
    PUSH(out->substituted, int8_t, flags[2]);
    PUSH(out->annotated, int8_t, flags[3]);
    PUSH(out->uom, int32_t, uom);
    out->rows++;
    return OK;
nomem:
    PyErr_NoMemory();
    return NOMEM;
}

static int parse_stream(Cur *c, Out *out, int64_t received) {
    if (!eat(c, '{')) return SLOW;
    Py_ssize_t first = out->rows;
    long id = -1;
    int stream_uom = -1, have_items = 0, r;
    if (!eat(c, '}')) {
        for (;;) {
            const char *k, *s;
            Py_ssize_t kn, n;
            int ke, e;
            if (!scan_string(c, &k, &kn, &ke) || !eat(c, ':')) return SLOW;
            if (key_is(k, kn, ke, "WebId")) {
                if (!scan_string(c, &s, &n, &e) || e) return SLOW;
                PyObject *key = PyBytes_FromStringAndSize(s, n);
                if (!key) return NOMEM;
                PyObject *found = PyDict_GetItemWithError(out->ids_of, key);
                Py_DECREF(key);
                if (!found) return PyErr_Occurred() ? NOMEM : SLOW;
                id = PyLong_AsLong(found);
                if (id == -1 && PyErr_Occurred()) return NOMEM;
            } else if (key_is(k, kn, ke, "UnitsAbbreviation")) {
                int kind = string_or_null(c, &s, &n, &e);
                if (kind < 0) return SLOW;
                if (kind == 1) {
                    stream_uom = unit_index(out, s, n, e);
                    if (stream_uom == -2) return PyErr_Occurred() ? NOMEM : SLOW;
                }
            } else if (key_is(k, kn, ke, "Items")) {
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
    for (Py_ssize_t row = first; row < out->rows; row++) {
        PUSH(out->ids, int32_t, id);
        PUSH(out->stream_uom, int32_t, stream_uom);
    }
    return OK;
nomem:
    PyErr_NoMemory();
    return NOMEM;
}

static int parse_frame(const char *text, Py_ssize_t size, Out *out, int64_t received) {
    Cur c = {text, text + size};
    int r;
    if (!eat(&c, '{')) return SLOW;
    if (!eat(&c, '}')) {
        for (;;) {
            const char *k;
            Py_ssize_t kn;
            int ke;
            if (!scan_string(&c, &k, &kn, &ke) || !eat(&c, ':')) return SLOW;
            if (key_is(k, kn, ke, "Items")) {
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
                   &out->questionable, &out->substituted, &out->annotated, &out->uom, &out->stream_uom};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]->data);
    Py_XDECREF(out->raw);
    Py_XDECREF(out->units);
}

static PyObject *parse(PyObject *self, PyObject *args) {
    PyObject *frames, *received, *ids_of;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &frames, &PyList_Type, &received, &PyDict_Type, &ids_of))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(frames);
    if (PyList_GET_SIZE(received) != count) {
        PyErr_SetString(PyExc_ValueError, "frames and received_us differ in length");
        return NULL;
    }
    Out out;
    memset(&out, 0, sizeof(out));
    out.ids_of = ids_of;
    out.raw = PyList_New(0);
    out.units = PyList_New(0);
    if (!out.raw || !out.units) goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *frame = PyList_GET_ITEM(frames, i);
        const char *text;
        Py_ssize_t size;
        if (PyUnicode_Check(frame)) {
            text = PyUnicode_AsUTF8AndSize(frame, &size);
            if (!text) goto fail;
        } else if (PyBytes_Check(frame)) {
            text = PyBytes_AS_STRING(frame);
            size = PyBytes_GET_SIZE(frame);
        } else {
            PyErr_SetString(PyExc_TypeError, "frames must be str or bytes");
            goto fail;
        }
        int64_t when = PyLong_AsLongLong(PyList_GET_ITEM(received, i));
        if (when == -1 && PyErr_Occurred()) goto fail;
        int r = parse_frame(text, size, &out, when);
        if (r == NOMEM) goto fail;
        if (r == SLOW) {
            free_out(&out);
            Py_RETURN_NONE;
        }
    }
    PyObject *result = Py_BuildValue(
        "(nNNNNNNNNNNNOO)", out.rows, take_bytes(&out.ids), take_bytes(&out.ts), take_bytes(&out.received),
        take_bytes(&out.value), take_bytes(&out.value_null), take_bytes(&out.good), take_bytes(&out.questionable),
        take_bytes(&out.substituted), take_bytes(&out.annotated), take_bytes(&out.uom), take_bytes(&out.stream_uom),
        out.units, out.raw);
    free_out(&out);
    return result;
fail:
    free_out(&out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_VARARGS,
     "parse(frames, received_us, ids) -> columns tuple, or None when the value-by-value path must decode"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_framecodec", NULL, -1, methods};

PyMODINIT_FUNC PyInit__framecodec(void) { return PyModule_Create(&module); }
