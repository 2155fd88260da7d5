/* The inner loop of psmi_dask._numerics.score, fused and compiled.
 *
 * For each sample and direction: the log density of every class (up to a
 * shared constant), less their largest; the sum over classes of their
 * exponentials; and pmi, the own class's term less the log of that sum and
 * of the class prior. The operations, their order, exp and log are those of
 * the numpy fallback in _numerics.py, in plain IEEE double arithmetic (built
 * with -ffp-contract=off), so both give the same bits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Adding and subtracting 1.5 * 2**52 rounds a double to the nearest integer. */
#define SHIFT 6755399441055744.0
/* The exponential's table holds exp(-j / STEPS) for j = 0 .. 50 * STEPS. */
#define STEPS 128.0
#define NEGLIGIBLE -50.0
#define EXP_ENTRIES 6401
/* The logarithm's table: 1 / c_j, then log(c_j), c_j = 1 + (j + 1/2) / 128. */
#define LOG_CELLS 128
#define LN2 0x1.62e42fefa39efp-1

#if defined(_MSC_VER)
#define restrict __restrict
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* exp(x) for x in [NEGLIGIBLE, 0], clamped there: table[j] * exp(r) with
 * x = -j / STEPS + r, |r| <= 1 / (2 STEPS), and exp(r) as its Taylor
 * polynomial of degree 5 (truncation error below 1e-17). NaN stays NaN. */
CLONES static void
exp_row(double *restrict z, Py_ssize_t n, const double *restrict table)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        double x = z[k];
        double v = x >= NEGLIGIBLE ? x : NEGLIGIBLE;
        v = v <= 0.0 ? v : 0.0;
        double w = v * -STEPS;
        double j = (w + SHIFT) - SHIFT;
        double l = (j - w) * (1.0 / STEPS);
        double p = l * (1.0 / 120.0);
        p = p + (1.0 / 24.0);
        p = p * l;
        p = p + (1.0 / 6.0);
        p = p * l;
        p = p + 0.5;
        p = p * l;
        p = p + 1.0;
        p = p * l;
        p = p + 1.0;
        double e = table[(int)j] * p;
        z[k] = (x == x) ? e : x;
    }
}

/* log(x) for finite x >= 1 (a sum of exponentials whose largest is 1):
 * x = 2^e m with m in [1, 2), m = c_j (1 + r), |r| < 1 / 256, and log1p(r)
 * as its Taylor polynomial of degree 6 (truncation error below 1e-17).
 * log(1) is 0 and NaN stays NaN. */
CLONES static void
log_row(double *restrict x, Py_ssize_t n, const double *restrict table)
{
    const double *inverse = table, *logs = table + LOG_CELLS;
    for (Py_ssize_t k = 0; k < n; k++) {
        double v = x[k];
        uint64_t bits;
        memcpy(&bits, &v, sizeof bits);
        int e = (int)(bits >> 52) - 1023;
        int j = (int)((bits >> 45) & (LOG_CELLS - 1));
        uint64_t mantissa = (bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;
        double m;
        memcpy(&m, &mantissa, sizeof m);
        double centre = (double)j * (1.0 / LOG_CELLS) + (1.0 + 0.5 / LOG_CELLS);
        double r = (m - centre) * inverse[j];
        double p = r * (-1.0 / 6.0);
        p = p + 0.2;
        p = p * r;
        p = p + -0.25;
        p = p * r;
        p = p + (1.0 / 3.0);
        p = p * r;
        p = p + -0.5;
        p = p * r;
        p = p + 1.0;
        p = p * r;
        double result = (double)e * LN2;
        result = result + (logs[j] + p);
        /* log(1) is exactly 0, as one class or identical classes need. */
        result = (v == 1.0) ? 0.0 : result;
        x[k] = (v == v) ? result : v;
    }
}

/* One row of samples: z (c x b) and sum (b) are scratch. */
CLONES static void
pmi_row(const double *restrict t, int64_t code, const double *restrict means,
        const double *restrict scales, const double *restrict log_coef,
        double log_prior, const double *restrict exp_table,
        const double *restrict log_table, Py_ssize_t b, Py_ssize_t c,
        double *restrict pmi, double *restrict z, double *restrict sum)
{
    for (Py_ssize_t q = 0; q < c; q++) {
        const double *mu = means + q * b, *sc = scales + q * b;
        const double *lc = log_coef + q * b;
        double *zq = z + q * b;
        for (Py_ssize_t k = 0; k < b; k++) {
            double d = t[k] - mu[k];
            d = d * sc[k];
            d = d * d;
            zq[k] = lc[k] - d;
        }
    }
    /* The peak over classes, as numpy's max: NaN wins. */
    for (Py_ssize_t k = 0; k < b; k++) sum[k] = z[k];
    for (Py_ssize_t q = 1; q < c; q++) {
        const double *zq = z + q * b;
        for (Py_ssize_t k = 0; k < b; k++) {
            double v = zq[k];
            sum[k] = (v > sum[k] || v != v) ? v : sum[k];
        }
    }
    for (Py_ssize_t q = 0; q < c; q++) {
        double *zq = z + q * b;
        for (Py_ssize_t k = 0; k < b; k++) zq[k] = zq[k] - sum[k];
    }
    const double *zy = z + code * b;
    for (Py_ssize_t k = 0; k < b; k++) pmi[k] = zy[k];
    for (Py_ssize_t q = 0; q < c; q++) exp_row(z + q * b, b, exp_table);
    for (Py_ssize_t k = 0; k < b; k++) sum[k] = z[k];
    for (Py_ssize_t q = 1; q < c; q++) {
        const double *zq = z + q * b;
        for (Py_ssize_t k = 0; k < b; k++) sum[k] = sum[k] + zq[k];
    }
    log_row(sum, b, log_table);
    for (Py_ssize_t k = 0; k < b; k++) {
        double v = pmi[k] - sum[k];
        pmi[k] = v - log_prior;
    }
}

static int
check_size(Py_buffer *view, Py_ssize_t items, const char *name)
{
    if (view->len == items * (Py_ssize_t)sizeof(double))
        return 0;
    PyErr_Format(PyExc_ValueError, "pmi_rows: %s holds %zd bytes, expected %zd",
                 name, view->len, items * (Py_ssize_t)sizeof(double));
    return -1;
}

static PyObject *
pmi_rows(PyObject *self, PyObject *args)
{
    Py_buffer t, codes, means, scales, log_coef, log_prior, exp_table, log_table,
        pmi;
    Py_ssize_t rows, b, c;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*w*nnn", &t, &codes, &means,
                          &scales, &log_coef, &log_prior, &exp_table,
                          &log_table, &pmi, &rows, &b, &c))
        return NULL;
    PyObject *result = NULL;
    double *scratch = NULL;
    /* Sizes first, so that the products below cannot overflow. */
    Py_ssize_t most = PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(double) / 2;
    if (rows < 0 || b < 0 || c < 1 || rows > most || b > most || c > most ||
        (b > 0 && (rows > most / b || c + 1 > most / b))) {
        PyErr_Format(PyExc_ValueError,
                     "pmi_rows: needs rows >= 0, n_directions >= 0 and n_classes "
                     ">= 1 of sizes that fit in memory, got %zd, %zd and %zd",
                     rows, b, c);
        goto done;
    }
    if (check_size(&t, rows * b, "projections") ||
        check_size(&pmi, rows * b, "pmi") || check_size(&codes, rows, "codes") ||
        check_size(&means, c * b, "means") || check_size(&scales, c * b, "scales") ||
        check_size(&log_coef, c * b, "log_coef") ||
        check_size(&log_prior, c, "log_prior") ||
        check_size(&exp_table, EXP_ENTRIES, "exp_table") ||
        check_size(&log_table, 2 * LOG_CELLS, "log_table"))
        goto done;
    const int64_t *code = (const int64_t *)codes.buf;
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (code[i] < 0 || code[i] >= c) {
            PyErr_SetString(PyExc_ValueError, "pmi_rows: class code out of range");
            goto done;
        }
    }
    scratch = malloc((size_t)((c + 1) * b + 1) * sizeof(double));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const double *tv = t.buf, *prior = log_prior.buf;
    double *out = pmi.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++)
        pmi_row(tv + i * b, code[i], means.buf, scales.buf, log_coef.buf,
                prior[code[i]], exp_table.buf, log_table.buf, b, c, out + i * b,
                scratch, scratch + c * b);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(scratch);
    PyBuffer_Release(&t);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&means);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&log_coef);
    PyBuffer_Release(&log_prior);
    PyBuffer_Release(&exp_table);
    PyBuffer_Release(&log_table);
    PyBuffer_Release(&pmi);
    return result;
}

static PyMethodDef methods[] = {
    {"pmi_rows", pmi_rows, METH_VARARGS,
     "pmi_rows(projections, codes, means, scales, log_coef, log_prior, "
     "exp_table, log_table, pmi, rows, n_directions, n_classes)\n\n"
     "pmi of each row of projections along each direction, into pmi."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernel", "The compiled scoring loop of psmi_dask.",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__kernel(void)
{
    return PyModule_Create(&module);
}
