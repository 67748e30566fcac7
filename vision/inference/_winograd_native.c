/* Winograd F(4x4, 3x3) transforms in one pass each, and the product between them: vision.inference._winograd_native.

``vision/inference/winograd.py`` computes a 3x3 convolution as input transform, batched product,
output transform.  In tensor operations each transform is several passes over memory: the tiles are
copied out of the padded map, multiplied by a 36 x 36 matrix, and the result is multiplied back,
copied into the output's layout, and the bias and ReLU added in two more passes.  The products are
near the machine's peak; these passes are not.  Here each transform is one pass: every 6 x 6 input
tile is read (zeros outside the map, so no padded copy either) and its 36 transformed values written
where the batched product reads them; every 36 products become the 4 x 4 output tile with its bias,
residual and ReLU, written into the NHWC output, edge tiles clipped.

On CPUs with AVX-512 the batched product is here too (see batched_product below).

The functions take raw pointers (tensors' ``data_ptr()``) with element strides, release the GIL, and
split the tiles over the machine's cores with OpenMP (torch's own OpenMP runtime once torch is loaded,
so the two share one thread pool).  The Python side owns the memory and checks shapes and strides. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>

#define CHUNK 64 /* channels per step: a tile's 36 values of 64 channels stay in L1 */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* One input tile: v[p * plane + c] for p = 6 i + j, c < cb, from the 6 x 6 pixels at (y0, x0). */
VECTOR_CLONES
static void input_tile(const float *restrict x, ptrdiff_t sy, ptrdiff_t sx, int y0, int x0, int h, int w, int cb,
                       float *restrict v, ptrdiff_t plane) {
    float d[6][6][CHUNK];
    float m[6][6][CHUNK];
    for (int j = 0; j < 6; j++) {
        int y = y0 + j;
        for (int k = 0; k < 6; k++) {
            int xx = x0 + k;
            if (y >= 0 && y < h && xx >= 0 && xx < w)
                memcpy(d[j][k], x + y * sy + xx * sx, (size_t)cb * sizeof(float));
            else
                memset(d[j][k], 0, (size_t)cb * sizeof(float));
        }
    }
    /* B^T d: rows */
    for (int k = 0; k < 6; k++) {
        for (int c = 0; c < cb; c++) {
            float d0 = d[0][k][c], d1 = d[1][k][c], d2 = d[2][k][c], d3 = d[3][k][c], d4 = d[4][k][c],
                  d5 = d[5][k][c];
            m[0][k][c] = 4 * d0 - 5 * d2 + d4;
            m[1][k][c] = -4 * d1 - 4 * d2 + d3 + d4;
            m[2][k][c] = 4 * d1 - 4 * d2 - d3 + d4;
            m[3][k][c] = -2 * d1 - d2 + 2 * d3 + d4;
            m[4][k][c] = 2 * d1 - d2 - 2 * d3 + d4;
            m[5][k][c] = 4 * d1 - 5 * d3 + d5;
        }
    }
    /* (B^T d) B: columns */
    for (int i = 0; i < 6; i++) {
        float *restrict o = v + (ptrdiff_t)(6 * i) * plane;
        for (int c = 0; c < cb; c++) {
            float e0 = m[i][0][c], e1 = m[i][1][c], e2 = m[i][2][c], e3 = m[i][3][c], e4 = m[i][4][c],
                  e5 = m[i][5][c];
            o[c] = 4 * e0 - 5 * e2 + e4;
            o[plane + c] = -4 * e1 - 4 * e2 + e3 + e4;
            o[2 * plane + c] = 4 * e1 - 4 * e2 - e3 + e4;
            o[3 * plane + c] = -2 * e1 - e2 + 2 * e3 + e4;
            o[4 * plane + c] = 2 * e1 - e2 - 2 * e3 + e4;
            o[5 * plane + c] = 4 * e1 - 5 * e3 + e5;
        }
    }
}

/* One output tile from m[p * plane + k], p = 6 i + j: A^T M A (+ bias, + residual, ReLU) into the
   rows x cols pixels of the tile that lie in the map. */
VECTOR_CLONES
static void output_tile(const float *restrict mp, ptrdiff_t plane, int kb, const float *restrict bias,
                        const float *restrict res, ptrdiff_t rsy, ptrdiff_t rsx, int relu, float *restrict out,
                        ptrdiff_t osy, ptrdiff_t osx, int rows, int cols) {
    float s[4][6][CHUNK];
    float y[4][4][CHUNK];
    /* A^T M: rows */
    for (int j = 0; j < 6; j++) {
        for (int c = 0; c < kb; c++) {
            float m0 = mp[(0 + j) * plane + c], m1 = mp[(6 + j) * plane + c], m2 = mp[(12 + j) * plane + c],
                  m3 = mp[(18 + j) * plane + c], m4 = mp[(24 + j) * plane + c], m5 = mp[(30 + j) * plane + c];
            s[0][j][c] = m0 + m1 + m2 + m3 + m4;
            s[1][j][c] = m1 - m2 + 2 * m3 - 2 * m4;
            s[2][j][c] = m1 + m2 + 4 * m3 + 4 * m4;
            s[3][j][c] = m1 - m2 + 8 * m3 - 8 * m4 + m5;
        }
    }
    /* (A^T M) A: columns, then the bias */
    for (int a = 0; a < 4; a++) {
        for (int c = 0; c < kb; c++) {
            float e0 = s[a][0][c], e1 = s[a][1][c], e2 = s[a][2][c], e3 = s[a][3][c], e4 = s[a][4][c],
                  e5 = s[a][5][c];
            float b = bias ? bias[c] : 0.0f;
            y[a][0][c] = e0 + e1 + e2 + e3 + e4 + b;
            y[a][1][c] = e1 - e2 + 2 * e3 - 2 * e4 + b;
            y[a][2][c] = e1 + e2 + 4 * e3 + 4 * e4 + b;
            y[a][3][c] = e1 - e2 + 8 * e3 - 8 * e4 + e5 + b;
        }
    }
    for (int a = 0; a < rows; a++) {
        for (int q = 0; q < cols; q++) {
            float *restrict o = out + a * osy + q * osx;
            const float *restrict r = res ? res + a * rsy + q * rsx : NULL;
            if (r && relu) {
                for (int c = 0; c < kb; c++) {
                    float t = y[a][q][c] + r[c];
                    o[c] = t > 0 ? t : 0;
                }
            } else if (r) {
                for (int c = 0; c < kb; c++) o[c] = y[a][q][c] + r[c];
            } else if (relu) {
                for (int c = 0; c < kb; c++) o[c] = y[a][q][c] > 0 ? y[a][q][c] : 0;
            } else {
                memcpy(o, y[a][q], (size_t)kb * sizeof(float));
            }
        }
    }
}

/* Tile t of a strip of `rows` tile rows from tile row row0, tiles_w tiles each, image after image: its
   image and the top-left output pixel it covers (the input tile starts one pixel up and left of it). */
static inline void tile_origin(ptrdiff_t t, ptrdiff_t rows, ptrdiff_t tiles_w, ptrdiff_t row0, ptrdiff_t *img,
                               ptrdiff_t *y0, ptrdiff_t *x0) {
    ptrdiff_t per_image = rows * tiles_w, rem = t % per_image;
    *img = t / per_image;
    *y0 = 4 * (row0 + rem / tiles_w);
    *x0 = 4 * (rem % tiles_w);
}

/* input_transform(x, (n, h, w, c), (sn, sh, sw), row0, row1, tiles_w, v)
   x: NHWC float32 map (channel stride 1); tiles of rows [row0, row1) of tiles_w tiles each, for all n
   images, into v = [36, n * (row1 - row0) * tiles_w, c] (contiguous). */
static PyObject *input_transform(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t xp, vp, n, h, w, c, sn, sh, sw, row0, row1, tiles_w;
    if (!PyArg_ParseTuple(args, "n(nnnn)(nnn)nnnn", &xp, &n, &h, &w, &c, &sn, &sh, &sw, &row0, &row1, &tiles_w,
                          &vp))
        return NULL;
    const float *x = (const float *)xp;
    float *v = (float *)vp;
    ptrdiff_t rows = row1 - row0, tiles = n * rows * tiles_w, plane = tiles * c;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static)
    for (ptrdiff_t t = 0; t < tiles; t++) {
        ptrdiff_t img, y0, x0;
        tile_origin(t, rows, tiles_w, row0, &img, &y0, &x0);
        for (ptrdiff_t c0 = 0; c0 < c; c0 += CHUNK) {
            int cb = (int)(c - c0 < CHUNK ? c - c0 : CHUNK);
            input_tile(x + img * sn + c0, sh, sw, (int)y0 - 1, (int)x0 - 1, (int)h, (int)w, cb, v + t * c + c0,
                       plane);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* output_transform(m, (n, h, w, k), row0, row1, tiles_w, bias, residual, (rsn, rsh, rsw), relu, out, (osn, osh, osw))
   m = [36, n * (row1 - row0) * tiles_w, k] (contiguous) -> the output rows of those tiles, in the NHWC
   map out (channel stride 1); bias (k values) and residual (NHWC like out) are 0 for none. */
static PyObject *output_transform(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t mp, n, h, w, k, row0, row1, tiles_w, bp, rp, rsn, rsh, rsw, op, osn, osh, osw;
    int relu;
    if (!PyArg_ParseTuple(args, "n(nnnn)nnnnn(nnn)pn(nnn)", &mp, &n, &h, &w, &k, &row0, &row1, &tiles_w, &bp, &rp,
                          &rsn, &rsh, &rsw, &relu, &op, &osn, &osh, &osw))
        return NULL;
    const float *m = (const float *)mp, *bias = (const float *)bp, *res = (const float *)rp;
    float *out = (float *)op;
    ptrdiff_t rows = row1 - row0, tiles = n * rows * tiles_w, plane = tiles * k;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static)
    for (ptrdiff_t t = 0; t < tiles; t++) {
        ptrdiff_t img, y0, x0;
        tile_origin(t, rows, tiles_w, row0, &img, &y0, &x0);
        int tile_rows = (int)(h - y0 < 4 ? h - y0 : 4), tile_cols = (int)(w - x0 < 4 ? w - x0 : 4);
        for (ptrdiff_t k0 = 0; k0 < k; k0 += CHUNK) {
            int kb = (int)(k - k0 < CHUNK ? k - k0 : CHUNK);
            output_tile(m + t * k + k0, plane, kb, bias ? bias + k0 : NULL,
                        res ? res + img * rsn + y0 * rsh + x0 * rsw + k0 : NULL, rsh, rsw, relu,
                        out + img * osn + y0 * osh + x0 * osw + k0, osh, osw, tile_rows, tile_cols);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The batched product between the transforms: for each of the 36 tile positions s, the strip's
   transformed tiles [count, c] times that position's filters [c, k].  torch.bmm gives it to the BLAS,
   which on some x86 CPUs runs it well below what the cores can do at these shapes (a few dozen to a few
   hundred tiles per strip: the BLAS repacks a position's whole filter matrix for a handful of rows).
   Here the filters are packed once, when the model is prepared ([36][k / 32][c][32], zeros past k),
   and an AVX-512 kernel keeps a 12 x 32 block of products in registers while it runs over the c
   channels; where the CPU has no AVX-512 the Python side calls torch.bmm instead. */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define PRODUCT_ROWS 12 /* tiles per register block: 24 accumulators of 16 floats */
#define PRODUCT_COLS 32 /* output channels per register block (two vectors) */

__attribute__((target("avx512f"), always_inline)) static inline void product_block(
    const float *restrict a, ptrdiff_t lda, const float *restrict panel, ptrdiff_t c, float *restrict out,
    ptrdiff_t ldo, int rows, __mmask16 mask_lo, __mmask16 mask_hi) {
    __m512 acc[PRODUCT_ROWS][2];
#pragma GCC unroll 12
    for (int r = 0; r < PRODUCT_ROWS; r++) {
        if (r < rows) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    }
    for (ptrdiff_t p = 0; p < c; p++) {
        __m512 b0 = _mm512_loadu_ps(panel + p * PRODUCT_COLS), b1 = _mm512_loadu_ps(panel + p * PRODUCT_COLS + 16);
#pragma GCC unroll 12
        for (int r = 0; r < PRODUCT_ROWS; r++) {
            if (r < rows) {
                __m512 ar = _mm512_set1_ps(a[r * lda + p]);
                acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
            }
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < PRODUCT_ROWS; r++) {
        if (r < rows) {
            _mm512_mask_storeu_ps(out + r * ldo, mask_lo, acc[r][0]);
            _mm512_mask_storeu_ps(out + r * ldo + 16, mask_hi, acc[r][1]);
        }
    }
}

/* One block of `rows` tiles (rows a compile-time constant in each case, so the accumulators stay in
   registers) against every packed column block of one position's filters. */
__attribute__((target("avx512f"))) static void product_rows(const float *restrict a, ptrdiff_t lda,
                                                             const float *restrict packed, ptrdiff_t c,
                                                             ptrdiff_t k, float *restrict out, int rows) {
    for (ptrdiff_t n0 = 0; n0 < k; n0 += PRODUCT_COLS) {
        ptrdiff_t left = k - n0;
        __mmask16 lo = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __mmask16 hi = left >= 32 ? (__mmask16)0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
        const float *panel = packed + (n0 / PRODUCT_COLS) * c * PRODUCT_COLS;
        switch (rows) {
#define PRODUCT_CASE(R) \
    case R: product_block(a, lda, panel, c, out + n0, k, R, lo, hi); break;
            PRODUCT_CASE(1) PRODUCT_CASE(2) PRODUCT_CASE(3) PRODUCT_CASE(4) PRODUCT_CASE(5) PRODUCT_CASE(6)
            PRODUCT_CASE(7) PRODUCT_CASE(8) PRODUCT_CASE(9) PRODUCT_CASE(10) PRODUCT_CASE(11) PRODUCT_CASE(12)
#undef PRODUCT_CASE
        }
    }
}

static int product_supported(void) { return __builtin_cpu_supports("avx512f"); }
#else
#define PRODUCT_ROWS 12
#define PRODUCT_COLS 32
static void product_rows(const float *a, ptrdiff_t lda, const float *packed, ptrdiff_t c, ptrdiff_t k, float *out,
                         int rows) {
    (void)a, (void)lda, (void)packed, (void)c, (void)k, (void)out, (void)rows;
}
static int product_supported(void) { return 0; }
#endif

/* batched_product(v, (count, c), packed, k, m)
   v = [36, count, c] (contiguous) times the packed filters -> m = [36, count, k] (contiguous). */
static PyObject *batched_product(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t vp, count, c, pp, k, mp;
    if (!PyArg_ParseTuple(args, "n(nn)nnn", &vp, &count, &c, &pp, &k, &mp)) return NULL;
    if (!product_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "the batched product needs AVX-512");
        return NULL;
    }
    const float *v = (const float *)vp, *packed = (const float *)pp;
    float *m = (float *)mp;
    ptrdiff_t blocks = (count + PRODUCT_ROWS - 1) / PRODUCT_ROWS, kp = (k + PRODUCT_COLS - 1) / PRODUCT_COLS * PRODUCT_COLS;
    Py_BEGIN_ALLOW_THREADS
    /* position-major: a thread's consecutive blocks share one position's filters, which stay in its cache */
#pragma omp parallel for schedule(static)
    for (ptrdiff_t job = 0; job < 36 * blocks; job++) {
        ptrdiff_t s = job / blocks, r0 = (job % blocks) * PRODUCT_ROWS;
        int rows = (int)(count - r0 < PRODUCT_ROWS ? count - r0 : PRODUCT_ROWS);
        product_rows(v + (s * count + r0) * c, c, packed + s * c * kp, c, k, m + (s * count + r0) * k, rows);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *has_batched_product(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyBool_FromLong(product_supported());
}

static PyMethodDef methods[] = {
    {"input_transform", input_transform, METH_VARARGS, "Winograd F(4x4, 3x3) input transform of a strip of tiles."},
    {"output_transform", output_transform, METH_VARARGS,
     "Winograd F(4x4, 3x3) output transform of a strip of tiles, with bias, residual and ReLU."},
    {"batched_product", batched_product, METH_VARARGS,
     "The 36 products of a strip's transformed tiles with packed filters (AVX-512)."},
    {"has_batched_product", has_batched_product, METH_NOARGS, "Whether this CPU runs batched_product."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_winograd_native",
                                        "Winograd F(4x4, 3x3) transforms in one pass each.", -1, methods,
                                        NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__winograd_native(void) {
    PyObject *module = PyModule_Create(&module_def);
    /* the packed filters' block width, which the Python side packs to */
    if (module && PyModule_AddIntConstant(module, "PACKED_COLUMNS", PRODUCT_COLS) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
