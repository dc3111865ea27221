/*
 * edgelink._native: the few primitives Python cannot express for a shared-memory ring.
 *
 * Two processes share an mmap'd segment. Python has no atomics with memory ordering and no
 * futex, so the ring indices would otherwise need a lock or polling. Everything here works on
 * a writable buffer (an mmap or a memoryview of one) plus a byte offset, so the Python side
 * never holds raw pointers: the buffer export is held for the duration of each call, which also
 * keeps the mapping alive while the GIL is released.
 *
 * Waiting: Linux uses futexes on the shared page. Everywhere else (macOS, the BSDs), and on
 * Linux when built with EDGELINK_PORTABLE_WAIT defined (setup.py does so when the environment
 * sets EDGELINK_NATIVE_PORTABLE=1), a waiter polls the word with a bounded back-off instead:
 * POSIX has no cross-process wait on an address, and polling can miss no wake-up. poll_u32 is
 * compiled in every build so a Linux build can run the portable path too (shm.wait = poll).
 * Built by setup.py as the extension "edgelink._native".
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: pyconfig.h defines _GNU_SOURCE, which syscall() needs */

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__) && !defined(EDGELINK_PORTABLE_WAIT)
#define EDGELINK_HAVE_FUTEX 1
#include <linux/futex.h>
#include <sys/syscall.h>
#define WAIT_BACKEND "futex"
#else
#define EDGELINK_HAVE_FUTEX 0
#define WAIT_BACKEND "poll"
#endif

/* Below this size a copy is cheaper than dropping and re-taking the GIL. */
#define COPY_NOGIL_MIN ((Py_ssize_t)65536)

/*
 * Acquire `obj`'s buffer and return a pointer to [off, off + len). Every word operation is
 * checked for 8-byte alignment of the final address, not just of `off`: a misaligned atomic is
 * not atomic on every CPU and a misaligned futex word is rejected by the kernel.
 * On success the caller owns `view` and must PyBuffer_Release it.
 */
static char *
span(PyObject *obj, Py_ssize_t off, Py_ssize_t len, int writable, int aligned, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return NULL;
    if (off < 0 || len < 0 || off > view->len || len > view->len - off) {
        PyErr_Format(PyExc_ValueError,
                     "range [%zd, %zd + %zd) is outside a buffer of %zd bytes",
                     off, off, len, view->len);
        PyBuffer_Release(view);
        return NULL;
    }
    char *p = (char *)view->buf + off;
    if (aligned && ((uintptr_t)p & 7u) != 0) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not 8-byte aligned", off);
        PyBuffer_Release(view);
        return NULL;
    }
    return p;
}

static PyObject *
load_acquire_u64(PyObject *self, PyObject *args)
{
    PyObject *buf;
    Py_ssize_t off;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "On:load_acquire_u64", &buf, &off))
        return NULL;
    char *p = span(buf, off, 8, 1, 1, &v);
    if (!p)
        return NULL;
    /* Acquire pairs with the peer's store_release: bytes published before the index are
       visible once the index is. */
    uint64_t value = __atomic_load_n((uint64_t *)p, __ATOMIC_ACQUIRE);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(value);
}

static PyObject *
load_acquire_u32(PyObject *self, PyObject *args)
{
    PyObject *buf;
    Py_ssize_t off;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "On:load_acquire_u32", &buf, &off))
        return NULL;
    char *p = span(buf, off, 4, 1, 1, &v);
    if (!p)
        return NULL;
    /* Futex words are 32-bit; a waiter must sample one before re-checking its condition. */
    uint32_t value = __atomic_load_n((uint32_t *)p, __ATOMIC_ACQUIRE);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong(value);
}

static PyObject *
store_release_u64(PyObject *self, PyObject *args)
{
    PyObject *buf, *obj;
    Py_ssize_t off;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnO:store_release_u64", &buf, &off, &obj))
        return NULL;
    /* PyLong_AsUnsignedLongLong rejects negatives and values >= 2**64 (the "K" format
       would silently truncate). */
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    char *p = span(buf, off, 8, 1, 1, &v);
    if (!p)
        return NULL;
    /* Release: every copy into the ring before this store is visible to whoever
       load_acquires the new index. */
    __atomic_store_n((uint64_t *)p, (uint64_t)value, __ATOMIC_RELEASE);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *
cas_u64(PyObject *self, PyObject *args)
{
    PyObject *buf, *eobj, *dobj;
    Py_ssize_t off;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OnOO:cas_u64", &buf, &off, &eobj, &dobj))
        return NULL;
    unsigned long long expected = PyLong_AsUnsignedLongLong(eobj);
    if (expected == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long desired = PyLong_AsUnsignedLongLong(dobj);
    if (desired == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    char *p = span(buf, off, 8, 1, 1, &v);
    if (!p)
        return NULL;
    uint64_t exp = (uint64_t)expected;
    /* seq_cst: two clients racing for the one slot must agree on a single winner, and the
       winner's later stores must not be reordered before its claim. */
    int ok = __atomic_compare_exchange_n((uint64_t *)p, &exp, (uint64_t)desired, 0,
                                         __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyBool_FromLong(ok);
}

static PyObject *
fetch_add_u32(PyObject *self, PyObject *args)
{
    PyObject *buf;
    Py_ssize_t off;
    long delta;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "Onl:fetch_add_u32", &buf, &off, &delta))
        return NULL;
    char *p = span(buf, off, 4, 1, 1, &v);
    if (!p)
        return NULL;
    /* Sequence words wrap modulo 2**32 by design; only "changed since I looked" matters.
       seq_cst so the bump cannot be reordered before the index store it announces. */
    uint32_t old = __atomic_fetch_add((uint32_t *)p, (uint32_t)delta, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong(old);
}

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Parses (buf, off, expected[, timeout_s]) for both waits; timeout < 0 means no limit. */
static char *
wait_args(PyObject *args, const char *fmt, Py_buffer *v, uint32_t *expected, double *timeout)
{
    PyObject *buf, *tobj = Py_None;
    Py_ssize_t off;
    unsigned long exp;
    if (!PyArg_ParseTuple(args, fmt, &buf, &off, &exp, &tobj))
        return NULL;
    if (exp > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "expected value does not fit in 32 bits");
        return NULL;
    }
    *expected = (uint32_t)exp;
    *timeout = -1.0;
    if (tobj != Py_None) {
        *timeout = PyFloat_AsDouble(tobj);
        if (*timeout == -1.0 && PyErr_Occurred())
            return NULL;
        if (*timeout < 0.0)
            *timeout = 0.0;
    }
    return span(buf, off, 4, 1, 1, v);
}

/* Longest sleep between two looks at the word, and how long one stretch without the GIL lasts
   before signals are checked: a wake is seen within POLL_MAX_SLEEP_NS plus a scheduling slice. */
#define POLL_MAX_SLEEP_NS 200000L
#define POLL_SLICE_S 0.02

/*
 * The portable wait: look at the word, yield, then sleep with a doubling back-off capped at
 * POLL_MAX_SLEEP_NS. Nothing can be missed (the word is re-read after every sleep), only
 * noticed late; the ring spins before it waits, so a streaming transfer rarely sleeps at all.
 */
static PyObject *
poll_u32(PyObject *self, PyObject *args)
{
    Py_buffer v;
    uint32_t expected;
    double timeout;
    char *p = wait_args(args, "Onk|O:poll_u32", &v, &expected, &timeout);
    if (!p)
        return NULL;
    const double start = monotonic_now();
    long sleep_ns = 1000;
    int woke = 0;
    for (;;) {
        double slice_end = monotonic_now() + POLL_SLICE_S;
        Py_BEGIN_ALLOW_THREADS
        for (;;) {
            if (__atomic_load_n((uint32_t *)p, __ATOMIC_ACQUIRE) != expected) {
                woke = 1;
                break;
            }
            double now = monotonic_now();
            if ((timeout >= 0.0 && now - start >= timeout) || now >= slice_end)
                break;
            if (sleep_ns < 4000) {
                sched_yield();
            } else {
                struct timespec ts = {0, sleep_ns};
                nanosleep(&ts, NULL);
            }
            sleep_ns = sleep_ns * 2 < POLL_MAX_SLEEP_NS ? sleep_ns * 2 : POLL_MAX_SLEEP_NS;
        }
        Py_END_ALLOW_THREADS
        if (woke || (timeout >= 0.0 && monotonic_now() - start >= timeout))
            break;
        /* Run Python signal handlers between slices so Ctrl-C / SIGTERM take effect. */
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&v);
            return NULL;
        }
    }
    PyBuffer_Release(&v);
    return PyBool_FromLong(woke);
}

#if EDGELINK_HAVE_FUTEX
static PyObject *
wait_u32(PyObject *self, PyObject *args)
{
    Py_buffer v;
    uint32_t expected;
    double timeout;
    char *p = wait_args(args, "Onk|O:wait_u32", &v, &expected, &timeout);
    if (!p)
        return NULL;

    double deadline = timeout >= 0.0 ? monotonic_now() + timeout : 0.0;
    int woke = 1;
    for (;;) {
        struct timespec ts, *tsp = NULL;
        if (timeout >= 0.0) {
            double left = deadline - monotonic_now();
            if (left <= 0.0) {
                woke = 0;
                break;
            }
            ts.tv_sec = (time_t)left;
            ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
            tsp = &ts;
        }
        long rc;
        int err;
        /* Plain FUTEX_WAIT, not the _PRIVATE variant: the word lives in a MAP_SHARED mapping
           and the waker is another process, so the kernel must key it by the shared page. */
        Py_BEGIN_ALLOW_THREADS
        rc = syscall(SYS_futex, (uint32_t *)p, FUTEX_WAIT, expected, tsp, NULL, 0);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc == 0 || err == EAGAIN) /* woken, or the word already moved on: re-check */
            break;
        if (err == ETIMEDOUT) {
            woke = 0;
            break;
        }
        if (err == EINTR) {
            /* Run Python signal handlers now so Ctrl-C / SIGTERM take effect mid-wait. */
            if (PyErr_CheckSignals() < 0) {
                PyBuffer_Release(&v);
                return NULL;
            }
            continue;
        }
        PyBuffer_Release(&v);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyBuffer_Release(&v);
    return PyBool_FromLong(woke);
}

static PyObject *
wake_u32(PyObject *self, PyObject *args)
{
    PyObject *buf;
    Py_ssize_t off;
    int n;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "Oni:wake_u32", &buf, &off, &n))
        return NULL;
    char *p = span(buf, off, 4, 1, 1, &v);
    if (!p)
        return NULL;
    /* Waking is cheap when nobody waits (no context switch), so callers wake unconditionally
       after every publish rather than tracking waiters. */
    long rc = syscall(SYS_futex, (uint32_t *)p, FUTEX_WAKE, n, NULL, NULL, 0);
    int err = errno;
    PyBuffer_Release(&v);
    if (rc < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(rc);
}
#else
/* No kernel wait on an address: waiting is polling, and a waker has nothing to do. */
static PyObject *
wait_u32(PyObject *self, PyObject *args)
{
    return poll_u32(self, args);
}

static PyObject *
wake_u32(PyObject *self, PyObject *args)
{
    PyObject *buf;
    Py_ssize_t off;
    int n;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "Oni:wake_u32", &buf, &off, &n))
        return NULL;
    if (!span(buf, off, 4, 1, 1, &v))
        return NULL;
    PyBuffer_Release(&v);
    return PyLong_FromLong(0);
}
#endif

static PyObject *
copy(PyObject *self, PyObject *args)
{
    PyObject *dst, *src;
    Py_ssize_t doff, soff, n;
    Py_buffer dv, sv;
    if (!PyArg_ParseTuple(args, "OnOnn:copy", &dst, &doff, &src, &soff, &n))
        return NULL;
    char *d = span(dst, doff, n, 1, 0, &dv);
    if (!d)
        return NULL;
    char *s = span(src, soff, n, 0, 0, &sv);
    if (!s) {
        PyBuffer_Release(&dv);
        return NULL;
    }
    /* Both exports stay held while the GIL is dropped, so neither buffer can be closed or
       resized under the copy. Dropping the GIL lets the other side of an in-process pair
       (or any other thread) run during multi-megabyte copies. */
    int overlap = d < s + n && s < d + n;
    if (n >= COPY_NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS
        if (overlap)
            memmove(d, s, (size_t)n);
        else
            memcpy(d, s, (size_t)n);
        Py_END_ALLOW_THREADS
    } else if (overlap) {
        memmove(d, s, (size_t)n);
    } else {
        memcpy(d, s, (size_t)n);
    }
    PyBuffer_Release(&sv);
    PyBuffer_Release(&dv);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"load_acquire_u64", load_acquire_u64, METH_VARARGS,
     "load_acquire_u64(buf, off) -> int: atomic 64-bit load with acquire ordering."},
    {"load_acquire_u32", load_acquire_u32, METH_VARARGS,
     "load_acquire_u32(buf, off) -> int: atomic 32-bit load with acquire ordering."},
    {"store_release_u64", store_release_u64, METH_VARARGS,
     "store_release_u64(buf, off, value): atomic 64-bit store with release ordering."},
    {"cas_u64", cas_u64, METH_VARARGS,
     "cas_u64(buf, off, expected, desired) -> bool: seq_cst compare-and-swap."},
    {"fetch_add_u32", fetch_add_u32, METH_VARARGS,
     "fetch_add_u32(buf, off, delta) -> int: seq_cst add, returns the previous value."},
    {"wait_u32", wait_u32, METH_VARARGS,
     "wait_u32(buf, off, expected, timeout_s=None) -> bool: sleep while the u32 at off equals\n"
     "expected (futex where the build has one, else poll_u32). False on timeout, True when\n"
     "woken or the value differs. GIL released."},
    {"poll_u32", poll_u32, METH_VARARGS,
     "poll_u32(buf, off, expected, timeout_s=None) -> bool: wait_u32 by polling with back-off\n"
     "(the portable path, in every build)."},
    {"wake_u32", wake_u32, METH_VARARGS,
     "wake_u32(buf, off, n) -> int: wake up to n wait_u32 waiters (any process); 0 where\n"
     "waiting polls."},
    {"copy", copy, METH_VARARGS,
     "copy(dst, dst_off, src, src_off, n): bounds-checked memcpy, GIL released for big copies."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "edgelink._native",
    "Atomics, cross-process waits and GIL-free copies over shared-memory buffers.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "WAIT_BACKEND", WAIT_BACKEND) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
