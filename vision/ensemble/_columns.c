/* COCO results JSON straight into columns: vision.ensemble._columns.read_columns(buffer).

A results file is a JSON list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"} objects.
A general JSON parser makes a Python object of every number (seven per detection, a million per
file of 180,000 detections) only for them to be copied into arrays and freed; this reader writes the
numbers into the arrays' memory as it meets them.

Returns (n, image_id, category_id, bbox, score), the last four bytearrays of n int64, n int64, 4n and n
float64 values, or None for anything it does not read itself (an entry with a "segmentation", a value
of another type, a missing or repeated key, an id beyond 64 bits, a key with an escape, non-ASCII text,
malformed JSON): the caller then reads the file with a general parser, which words any error.  Keys
other than the four (and "segmentation") are skipped, their values checked as JSON.

Numbers follow JSON's grammar strictly.  Floats are rounded correctly, as Python's float() rounds
them: by the Eisel-Lemire algorithm (Lemire, "Number Parsing at a Gigabyte per Second", 2021) on up to
19 significant digits, and by Python's own PyOS_string_to_double for the rare inputs it cannot decide
(more digits, halfway cases, subnormals, overflow). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_pow10_table.h"

#define MAX_DEPTH 64 /* nesting of skipped values */

typedef struct {
    const unsigned char *p, *end;
} Cursor;

static inline void skip_ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t')) c->p++;
}

static inline int is_digit(unsigned char ch) { return ch >= '0' && ch <= '9'; }

static inline int count_leading_zeros(uint64_t x) { return __builtin_clzll(x); }

static inline void mul64(uint64_t a, uint64_t b, uint64_t *hi, uint64_t *lo) {
    unsigned __int128 r = (unsigned __int128)a * b;
    *hi = (uint64_t)(r >> 64);
    *lo = (uint64_t)r;
}

/* man * 10^exp10 rounded to the nearest double, or 0 where the algorithm cannot decide (the caller then
   falls back).  man != 0. */
static int eisel_lemire(uint64_t man, int64_t exp10, int negative, double *out) {
    if (exp10 < MIN_EXP10 || exp10 > MAX_EXP10) return 0;
    int clz = count_leading_zeros(man);
    man <<= clz;
    uint64_t ret_exp2 = (uint64_t)(((217706 * exp10) >> 16) + 64 + 1023) - (uint64_t)clz;
    const uint64_t *pow = POW10[exp10 - MIN_EXP10];
    uint64_t x_hi, x_lo;
    mul64(man, pow[0], &x_hi, &x_lo);
    if ((x_hi & 0x1FF) == 0x1FF && x_lo + man < man) { /* wider approximation */
        uint64_t y_hi, y_lo;
        mul64(man, pow[1], &y_hi, &y_lo);
        uint64_t merged_hi = x_hi, merged_lo = x_lo + y_hi;
        if (merged_lo < x_lo) merged_hi++;
        if ((merged_hi & 0x1FF) == 0x1FF && merged_lo + 1 == 0 && y_lo + man < man) return 0;
        x_hi = merged_hi;
        x_lo = merged_lo;
    }
    uint64_t msb = x_hi >> 63;
    uint64_t ret_man = x_hi >> (msb + 9);
    ret_exp2 -= 1 ^ msb;
    if (x_lo == 0 && (x_hi & 0x1FF) == 0 && (ret_man & 3) == 1) return 0; /* halfway */
    ret_man += ret_man & 1;
    ret_man >>= 1;
    if (ret_man >> 53) {
        ret_man >>= 1;
        ret_exp2 += 1;
    }
    if (ret_exp2 - 1 >= 0x7FF - 1) return 0; /* subnormal, zero or infinite */
    uint64_t bits = (ret_exp2 << 52) | (ret_man & 0x000FFFFFFFFFFFFFull);
    if (negative) bits |= 0x8000000000000000ull;
    memcpy(out, &bits, sizeof bits);
    return 1;
}

/* A JSON number at c->p.  Returns 1, setting *integer (whether the number is an integer literal that
   fits in int64) and *int_value, and *value (the double); 0 for a malformed number; -1 with a Python
   error set.  Any of the three may be NULL: what is not asked for is not computed. */
static int parse_number(Cursor *c, double *value, int *integer, int64_t *int_value) {
    const unsigned char *start = c->p, *p = c->p, *end = c->end;
    int negative = 0;
    if (p < end && *p == '-') {
        negative = 1;
        p++;
    }
    if (p >= end || !is_digit(*p)) return 0;
    uint64_t man = 0;
    int digits = 0;         /* significant digits in man */
    int64_t dropped = 0;    /* significant digits beyond the 19 that man holds */
    int64_t exp10 = 0;
    if (*p == '0') {
        p++;
        if (p < end && is_digit(*p)) return 0; /* leading zero */
    } else {
        while (p < end && is_digit(*p)) {
            if (digits < 19) {
                man = man * 10 + (uint64_t)(*p - '0');
                digits++;
            } else {
                dropped++;
            }
            p++;
        }
    }
    int is_int = 1;
    if (p < end && *p == '.') {
        is_int = 0;
        p++;
        if (p >= end || !is_digit(*p)) return 0;
        while (p < end && is_digit(*p)) {
            if (man == 0 && *p == '0') {
                exp10--; /* a leading zero of the fraction */
            } else if (digits < 19) {
                man = man * 10 + (uint64_t)(*p - '0');
                digits++;
                exp10--;
            } else {
                dropped++;
                exp10--;
            }
            p++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        is_int = 0;
        p++;
        int exp_negative = 0;
        if (p < end && (*p == '+' || *p == '-')) {
            exp_negative = *p == '-';
            p++;
        }
        if (p >= end || !is_digit(*p)) return 0;
        int64_t e = 0;
        while (p < end && is_digit(*p)) {
            if (e < 100000) e = e * 10 + (*p - '0');
            p++;
        }
        exp10 += exp_negative ? -e : e;
    }
    c->p = p;
    if (integer != NULL) {
        *integer = 0;
        if (is_int && dropped == 0) {
            if (!negative && man <= (uint64_t)INT64_MAX) {
                *integer = 1;
                *int_value = (int64_t)man;
            } else if (negative && man <= (uint64_t)INT64_MAX + 1) {
                *integer = 1;
                *int_value = man == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)man;
            }
        }
    }
    if (value == NULL) return 1;
    if (man == 0) { /* "-0" is the integer 0, as JSON readers (and msgspec) take it; "-0.0" is -0.0 */
        *value = negative && !is_int ? -0.0 : 0.0;
        return 1;
    }
    if (dropped == 0 && eisel_lemire(man, exp10, negative, value)) return 1;
    /* More than 19 significant digits, or a case the fast algorithm leaves open: Python's parser. */
    Py_ssize_t len = p - start;
    char small[64];
    char *text = len < (Py_ssize_t)sizeof small ? small : PyMem_Malloc((size_t)len + 1);
    if (text == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(text, start, (size_t)len);
    text[len] = '\0';
    *value = PyOS_string_to_double(text, NULL, NULL);
    if (text != small) PyMem_Free(text);
    if (*value == -1.0 && PyErr_Occurred()) return -1;
    return 1;
}

/* A string at c->p (the opening quote), ASCII without escapes: returns its length and start. */
static int plain_string(Cursor *c, const unsigned char **text, Py_ssize_t *len) {
    const unsigned char *p = c->p + 1;
    const unsigned char *close = memchr(p, '"', (size_t)(c->end - p));
    if (close == NULL) return 0;
    for (const unsigned char *q = p; q < close; q++)
        if (*q == '\\' || *q < 0x20 || *q >= 0x80) return 0;
    *text = p;
    *len = close - p;
    c->p = close + 1;
    return 1;
}

static int skip_value(Cursor *c, int depth);

static int skip_string(Cursor *c) {
    const unsigned char *p = c->p + 1, *end = c->end;
    while (p < end) {
        unsigned char ch = *p;
        if (ch == '"') {
            c->p = p + 1;
            return 1;
        }
        if (ch < 0x20 || ch >= 0x80) return 0;
        if (ch == '\\') {
            p++;
            if (p >= end) return 0;
            if (*p == 'u') {
                if (end - p < 5) return 0;
                for (int k = 1; k <= 4; k++) {
                    unsigned char h = p[k];
                    if (!(is_digit(h) || (h >= 'a' && h <= 'f') || (h >= 'A' && h <= 'F'))) return 0;
                }
                p += 4;
            } else if (!strchr("\"\\/bfnrt", *p) || *p == '\0') {
                return 0;
            }
        }
        p++;
    }
    return 0;
}

static int skip_literal(Cursor *c, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return 0;
    c->p += n;
    return 1;
}

/* Steps over any JSON value, checking it; 0 for malformed JSON, -1 with a Python error set. */
static int skip_value(Cursor *c, int depth) {
    if (depth > MAX_DEPTH || c->p >= c->end) return 0;
    unsigned char ch = *c->p;
    if (ch == '"') return skip_string(c);
    if (ch == 't') return skip_literal(c, "true");
    if (ch == 'f') return skip_literal(c, "false");
    if (ch == 'n') return skip_literal(c, "null");
    if (ch == '-' || is_digit(ch)) return parse_number(c, NULL, NULL, NULL);
    if (ch != '[' && ch != '{') return 0;
    unsigned char close = ch == '[' ? ']' : '}';
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 1;
    }
    for (;;) {
        if (close == '}') {
            if (c->p >= c->end || *c->p != '"' || !skip_string(c)) return 0;
            skip_ws(c);
            if (c->p >= c->end || *c->p != ':') return 0;
            c->p++;
            skip_ws(c);
        }
        int r = skip_value(c, depth + 1);
        if (r <= 0) return r;
        skip_ws(c);
        if (c->p >= c->end) return 0;
        if (*c->p == close) {
            c->p++;
            return 1;
        }
        if (*c->p != ',') return 0;
        c->p++;
        skip_ws(c);
    }
}

typedef struct {
    int64_t *image_id, *category_id;
    double *bbox, *score;
    Py_ssize_t n, capacity;
} Columns;

enum { KEY_IMAGE_ID = 1, KEY_CATEGORY_ID = 2, KEY_BBOX = 4, KEY_SCORE = 8, KEY_ALL = 15 };

static int key_of(const unsigned char *text, Py_ssize_t len) {
    if (len == 8 && memcmp(text, "image_id", 8) == 0) return KEY_IMAGE_ID;
    if (len == 11 && memcmp(text, "category_id", 11) == 0) return KEY_CATEGORY_ID;
    if (len == 4 && memcmp(text, "bbox", 4) == 0) return KEY_BBOX;
    if (len == 5 && memcmp(text, "score", 5) == 0) return KEY_SCORE;
    if (len == 12 && memcmp(text, "segmentation", 12) == 0) return -1;
    return 0;
}

/* A float where JSON has a number (integers included); 0 for anything else. */
static int parse_float(Cursor *c, double *out) {
    if (c->p >= c->end || !(*c->p == '-' || is_digit(*c->p))) return 0;
    return parse_number(c, out, NULL, NULL);
}

static int parse_int(Cursor *c, int64_t *out) {
    if (c->p >= c->end || !(*c->p == '-' || is_digit(*c->p))) return 0;
    int integer;
    int r = parse_number(c, NULL, &integer, out);
    return r <= 0 ? r : integer;
}

/* One entry ({...} at c->p) into row i of the columns. */
static int parse_entry(Cursor *c, Columns *cols, Py_ssize_t i) {
    if (c->p >= c->end || *c->p != '{') return 0;
    c->p++;
    skip_ws(c);
    int seen = 0;
    if (c->p < c->end && *c->p == '}') return 0;
    for (;;) {
        const unsigned char *key;
        Py_ssize_t key_len;
        if (c->p >= c->end || *c->p != '"' || !plain_string(c, &key, &key_len)) return 0;
        skip_ws(c);
        if (c->p >= c->end || *c->p != ':') return 0;
        c->p++;
        skip_ws(c);
        int which = key_of(key, key_len);
        int r;
        if (which < 0 || (which & seen)) return 0;
        seen |= which;
        switch (which) {
        case KEY_IMAGE_ID:
            r = parse_int(c, &cols->image_id[i]);
            break;
        case KEY_CATEGORY_ID:
            r = parse_int(c, &cols->category_id[i]);
            break;
        case KEY_SCORE:
            r = parse_float(c, &cols->score[i]);
            break;
        case KEY_BBOX: {
            double *box = &cols->bbox[4 * i];
            r = 0;
            if (c->p >= c->end || *c->p != '[') break;
            c->p++;
            for (int k = 0; k < 4; k++) {
                skip_ws(c);
                r = parse_float(c, &box[k]);
                if (r <= 0) break;
                skip_ws(c);
                if (c->p >= c->end || *c->p != (k < 3 ? ',' : ']')) {
                    r = 0;
                    break;
                }
                c->p++;
            }
            break;
        }
        default:
            r = skip_value(c, 0);
        }
        if (r <= 0) return r;
        skip_ws(c);
        if (c->p >= c->end) return 0;
        if (*c->p == '}') {
            c->p++;
            return seen == KEY_ALL;
        }
        if (*c->p != ',') return 0;
        c->p++;
        skip_ws(c);
    }
}

static PyObject *read_columns(PyObject *module, PyObject *arg) {
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Cursor c = {(const unsigned char *)view.buf, (const unsigned char *)view.buf + view.len};
    /* The shortest entry, {"image_id":0,"category_id":0,"bbox":[0,0,0,0],"score":0}, has 57 bytes. */
    Py_ssize_t capacity = view.len / 57 + 1;
    PyObject *arrays[4] = {NULL, NULL, NULL, NULL};
    Py_ssize_t widths[4] = {8, 8, 32, 8};
    PyObject *result = NULL;
    for (int k = 0; k < 4; k++) {
        arrays[k] = PyByteArray_FromStringAndSize(NULL, capacity * widths[k]);
        if (arrays[k] == NULL) goto done;
    }
    Columns cols = {(int64_t *)PyByteArray_AS_STRING(arrays[0]), (int64_t *)PyByteArray_AS_STRING(arrays[1]),
                    (double *)PyByteArray_AS_STRING(arrays[2]), (double *)PyByteArray_AS_STRING(arrays[3]), 0,
                    capacity};
    int ok = 0;
    skip_ws(&c);
    if (c.p < c.end && *c.p == '[') {
        c.p++;
        skip_ws(&c);
        if (c.p < c.end && *c.p == ']') {
            c.p++;
            ok = 1;
        } else {
            for (;;) {
                if (cols.n >= cols.capacity) break;
                int r = parse_entry(&c, &cols, cols.n);
                if (r < 0) goto done;
                if (r == 0) break;
                cols.n++;
                skip_ws(&c);
                if (c.p >= c.end) break;
                if (*c.p == ']') {
                    c.p++;
                    ok = 1;
                    break;
                }
                if (*c.p != ',') break;
                c.p++;
                skip_ws(&c);
            }
        }
        skip_ws(&c);
        if (c.p != c.end) ok = 0;
    }
    if (!ok) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    for (int k = 0; k < 4; k++)
        if (PyByteArray_Resize(arrays[k], cols.n * widths[k]) < 0) goto done;
    result = Py_BuildValue("(nOOOO)", cols.n, arrays[0], arrays[1], arrays[2], arrays[3]);
done:
    for (int k = 0; k < 4; k++) Py_XDECREF(arrays[k]);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"read_columns", read_columns, METH_O,
     "read_columns(buffer) -> (n, image_id, category_id, bbox, score) bytearrays, or None: a COCO results "
     "list without masks, as int64 / float64 columns."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_columns",
                                        "COCO results JSON straight into columns.", -1, methods};

PyMODINIT_FUNC PyInit__columns(void) { return PyModule_Create(&module_def); }
