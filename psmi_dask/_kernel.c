/* The inner loop of psmi_dask._numerics.score, fused and compiled.
 *
 * For each sample and direction: the log density of every class (up to a
 * shared constant), less their largest; that of the sample's own class; and
 * the sum over classes of their exponentials. The operations, their order
 * and the exponential are those of the numpy fallback in _numerics.py, in
 * plain IEEE double arithmetic (built with -ffp-contract=off), so both give
 * the same bits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

/* Adding and subtracting 1.5 * 2**52 rounds a double to the nearest integer. */
#define SHIFT 6755399441055744.0
/* The exponential's table holds exp(-j / STEPS) for j = 0 .. 50 * STEPS. */
#define STEPS 128.0
#define NEGLIGIBLE -50.0

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
 * polynomial of degree 5 (truncation error below 1e-17). */
CLONES static void
exp_row(double *restrict z, Py_ssize_t n, const double *restrict table)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        double x = z[k];
        /* NaN takes the table's first entry here and is put back below. */
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

CLONES static void
score_rows(const double *t, const int64_t *codes, const double *means,
           const double *scales, const double *log_coef, const double *table,
           Py_ssize_t last, Py_ssize_t rows, Py_ssize_t b, Py_ssize_t c,
           double *own, double *total, double *z)
{
    for (Py_ssize_t i = 0; i < rows; i++) {
        const double *ti = t + i * b;
        double *oi = own + i * b;
        double *si = total + i * b;
        for (Py_ssize_t q = 0; q < c; q++) {
            const double *mu = means + q * b, *sc = scales + q * b;
            const double *lc = log_coef + q * b;
            double *zq = z + q * b;
            for (Py_ssize_t k = 0; k < b; k++) {
                double d = ti[k] - mu[k];
                d = d * sc[k];
                d = d * d;
                zq[k] = lc[k] - d;
            }
        }
        /* si holds the peak first, then the sum. */
        for (Py_ssize_t k = 0; k < b; k++) si[k] = z[k];
        for (Py_ssize_t q = 1; q < c; q++) {
            const double *zq = z + q * b;
            for (Py_ssize_t k = 0; k < b; k++) {
                double v = zq[k];
                si[k] = (v > si[k] || v != v) ? v : si[k];
            }
        }
        for (Py_ssize_t q = 0; q < c; q++) {
            double *zq = z + q * b;
            for (Py_ssize_t k = 0; k < b; k++) zq[k] = zq[k] - si[k];
        }
        const double *zy = z + codes[i] * b;
        for (Py_ssize_t k = 0; k < b; k++) oi[k] = zy[k];
        for (Py_ssize_t q = 0; q < c; q++) exp_row(z + q * b, b, table);
        for (Py_ssize_t k = 0; k < b; k++) si[k] = z[k];
        for (Py_ssize_t q = 1; q < c; q++) {
            const double *zq = z + q * b;
            for (Py_ssize_t k = 0; k < b; k++) si[k] = si[k] + zq[k];
        }
    }
}

static PyObject *
log_terms(PyObject *self, PyObject *args)
{
    Py_buffer t, codes, means, scales, log_coef, table, own, total;
    Py_ssize_t rows, b, c;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*w*w*nnn", &t, &codes, &means,
                          &scales, &log_coef, &table, &own, &total, &rows, &b,
                          &c))
        return NULL;
    PyObject *result = NULL;
    double *z = NULL;
    Py_ssize_t cells = rows * b * (Py_ssize_t)sizeof(double);
    Py_ssize_t params = c * b * (Py_ssize_t)sizeof(double);
    if (t.len != cells || own.len != cells || total.len != cells ||
        codes.len != rows * (Py_ssize_t)sizeof(int64_t) || means.len != params ||
        scales.len != params || log_coef.len != params || table.len < 8) {
        PyErr_SetString(PyExc_ValueError, "log_terms: buffer sizes do not match");
        goto done;
    }
    const int64_t *code = (const int64_t *)codes.buf;
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (code[i] < 0 || code[i] >= c) {
            PyErr_SetString(PyExc_ValueError, "log_terms: class code out of range");
            goto done;
        }
    }
    z = malloc(params > 0 ? params : 1);
    if (z == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    score_rows(t.buf, code, means.buf, scales.buf, log_coef.buf, table.buf,
               table.len / (Py_ssize_t)sizeof(double) - 1, rows, b, c, own.buf,
               total.buf, z);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(z);
    PyBuffer_Release(&t);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&means);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&log_coef);
    PyBuffer_Release(&table);
    PyBuffer_Release(&own);
    PyBuffer_Release(&total);
    return result;
}

static PyMethodDef methods[] = {
    {"log_terms", log_terms, METH_VARARGS, "Fused per-tile terms of score."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernel", "Compiled inner loop of psmi_dask.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__kernel(void)
{
    return PyModule_Create(&module);
}
