/*
 * edgelink._evalhook: a llama.cpp eval callback that captures and patches the residual stream.
 *
 * llama.cpp names the residual stream after layer N "l_out-N". A context created with
 * cb_eval = el_eval_cb and cb_eval_user_data = a Hook's state lets ggml's scheduler ask, for
 * every graph node, whether we want to see it (ask == true), and then hands us the computed
 * tensor (ask == false) before any later node reads it. An idle hook answers "no" to every
 * question after one integer test, so the scheduler computes the whole graph in one piece; an
 * active hook says "yes" only for l_out-N of active layers, reads the rows it captures with
 * ggml_backend_tensor_get and writes patched rows back with ggml_backend_tensor_set.
 *
 * No Python runs inside the callback (llama_decode is called through ctypes, which releases
 * the GIL): everything it touches is plain C state, set up by Python between decodes.
 *
 * ABI: llama.cpp's headers are not installed, so the few fields of struct ggml_tensor we need
 * are declared below from the pinned ggml.h (llama-cpp-python 0.3.36). The ggml functions
 * come as addresses from Python (ctypes already loaded libggml-base.so). The first tensor the
 * hook sees is checked against ggml_get_name / ggml_nelements: a layout that does not match
 * disables the hook and records an error instead of reading garbage.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- the pinned ggml ABI (ggml/include/ggml.h) ----------------------------------------- */

#define EL_GGML_MAX_DIMS 4
#define EL_GGML_MAX_OP_PARAMS 64
#define EL_GGML_MAX_SRC 10
#define EL_GGML_MAX_NAME 64
#define EL_GGML_TYPE_F32 0

struct el_ggml_tensor {
    int type; /* enum ggml_type */
    void *buffer;
    int64_t ne[EL_GGML_MAX_DIMS];
    size_t nb[EL_GGML_MAX_DIMS];
    int op; /* enum ggml_op */
    int32_t op_params[EL_GGML_MAX_OP_PARAMS / sizeof(int32_t)];
    int32_t flags;
    struct el_ggml_tensor *src[EL_GGML_MAX_SRC];
    struct el_ggml_tensor *view_src;
    size_t view_offs;
    void *data;
    char name[EL_GGML_MAX_NAME];
    void *extra;
    char padding[8];
};

typedef void (*tensor_io_fn)(struct el_ggml_tensor *, void *, size_t, size_t);
typedef const char *(*get_name_fn)(const struct el_ggml_tensor *);
typedef int64_t (*nelements_fn)(const struct el_ggml_tensor *);

/* ---- hook state -------------------------------------------------------------------------- */

enum { MODE_ADD = 1, MODE_OVERWRITE = 2 };

typedef struct {
    int32_t n;            /* positions */
    int32_t *pos;         /* [n] absolute positions */
    int32_t slot_len;     /* max position + 1 */
    int32_t *slot;        /* [slot_len]: index into pos, or -1 */
    float *buf;           /* capture: [n, n_embd] filled by the hook; patch: the patch rows */
    uint8_t *done;        /* [n]: rows captured / applied */
} el_rows;

typedef struct {
    int64_t n_layer, n_embd;
    tensor_io_fn tget, tset;
    get_name_fn get_name;
    nelements_fn nelements;
    int32_t n_active;     /* layers with a capture or a patch: 0 means idle */
    uint8_t *active;      /* [n_layer] */
    el_rows *capture;     /* [n_layer] */
    el_rows *patch;       /* [n_layer] */
    int32_t *patch_mode;  /* [n_layer] */
    float *patch_gain;    /* [n_layer] */
    /* the batch being decoded: row r of an l_out tensor with n_rows == n_tokens is token r,
       with n_rows == n_out (the last layer keeps only output rows) it is output r */
    int32_t n_tokens, n_out, cap_tokens;
    int32_t *tok_pos, *out_pos;
    float *row;           /* [n_embd] scratch for patching */
    int32_t stop_layer;   /* >= 0: end the graph right after this layer's l_out (capture only) */
    int checked;          /* ABI check: 0 not yet, 1 passed, -1 failed */
    int64_t n_seen, n_rows_captured, n_rows_patched, n_errors;
    char error[256];
} el_state;

static void
set_error(el_state *s, const char *msg, const char *name, long long a, long long b)
{
    s->n_errors++;
    if (!s->error[0])
        snprintf(s->error, sizeof(s->error), "%s (tensor %.64s: %lld vs %lld)", msg, name, a, b);
}

static int
parse_layer(const char *name, int64_t n_layer)
{
    /* "l_out-N" */
    if (name[0] != 'l' || strncmp(name, "l_out-", 6) != 0)
        return -1;
    const char *p = name + 6;
    if (*p < '0' || *p > '9')
        return -1;
    long v = 0;
    while (*p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        if (v >= n_layer)
            return -1;
        p++;
    }
    return *p == '\0' ? (int)v : -1;
}

static int
abi_check(el_state *s, struct el_ggml_tensor *t)
{
    if (s->checked == 0) {
        int64_t ne = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
        if (s->get_name(t) != t->name || s->nelements(t) != ne) {
            s->checked = -1;
            snprintf(s->error, sizeof(s->error),
                     "struct ggml_tensor layout differs from the pinned ggml.h: hook disabled");
            s->n_errors++;
        } else {
            s->checked = 1;
        }
    }
    return s->checked == 1;
}

static void
visit(el_state *s, struct el_ggml_tensor *t, int layer)
{
    if (t->type != EL_GGML_TYPE_F32) {
        set_error(s, "l_out is not f32", t->name, t->type, EL_GGML_TYPE_F32);
        return;
    }
    if (t->ne[0] != s->n_embd || t->ne[2] != 1 || t->ne[3] != 1 || t->nb[0] != sizeof(float)) {
        set_error(s, "unexpected l_out shape", t->name, t->ne[0], s->n_embd);
        return;
    }
    int64_t rows = t->ne[1];
    const int32_t *map;
    if (rows == s->n_tokens)
        map = s->tok_pos;
    else if (rows == s->n_out)
        map = s->out_pos;
    else {
        set_error(s, "l_out rows match neither the batch nor its outputs", t->name, rows, s->n_tokens);
        return;
    }
    size_t width = (size_t)s->n_embd * sizeof(float);
    el_rows *cap = &s->capture[layer];
    el_rows *pat = &s->patch[layer];
    for (int64_t r = 0; r < rows; r++) {
        int32_t pos = map[r];
        size_t off = (size_t)r * t->nb[1];
        if (pat->n && pos >= 0 && pos < pat->slot_len && pat->slot[pos] >= 0) {
            int32_t i = pat->slot[pos];
            const float *src = pat->buf + (size_t)i * s->n_embd;
            if (s->patch_mode[layer] == MODE_OVERWRITE) {
                s->tset(t, (void *)src, off, width);
            } else {
                float g = s->patch_gain[layer];
                s->tget(t, s->row, off, width);
                for (int64_t k = 0; k < s->n_embd; k++)
                    s->row[k] += g * src[k];
                s->tset(t, s->row, off, width);
            }
            pat->done[i] = 1;
            s->n_rows_patched++;
        }
        /* captured after patching: what the following layers read */
        if (cap->n && pos >= 0 && pos < cap->slot_len && cap->slot[pos] >= 0) {
            int32_t i = cap->slot[pos];
            s->tget(t, cap->buf + (size_t)i * s->n_embd, off, width);
            cap->done[i] = 1;
            s->n_rows_captured++;
        }
    }
}

/* The ggml_backend_sched_eval_callback. */
static bool
el_eval_cb(struct el_ggml_tensor *t, bool ask, void *user_data)
{
    el_state *s = (el_state *)user_data;
    if (s->n_active == 0)
        return false;
    int layer = parse_layer(t->name, s->n_layer);
    if (layer < 0 || !s->active[layer])
        return false;
    if (ask)
        return true;
    s->n_seen++;
    if (abi_check(s, t))
        visit(s, t, layer);
    /* false ends this graph here: the layers above are never computed, so their K/V cells
       and the logits of this decode are garbage, and the caller must drop the positions */
    return layer != s->stop_layer;
}

/* ---- Python type ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    el_state s;
} HookObject;

static void
rows_free(el_rows *r)
{
    free(r->pos);
    free(r->slot);
    free(r->buf);
    free(r->done);
    memset(r, 0, sizeof(*r));
}

static void
recount(el_state *s)
{
    s->n_active = 0;
    for (int64_t l = 0; l < s->n_layer; l++) {
        s->active[l] = s->capture[l].n > 0 || s->patch[l].n > 0;
        s->n_active += s->active[l];
    }
}

static void
hook_dealloc(HookObject *self)
{
    el_state *s = &self->s;
    for (int64_t l = 0; s->capture && l < s->n_layer; l++) {
        rows_free(&s->capture[l]);
        rows_free(&s->patch[l]);
    }
    free(s->capture);
    free(s->patch);
    free(s->active);
    free(s->patch_mode);
    free(s->patch_gain);
    free(s->tok_pos);
    free(s->out_pos);
    free(s->row);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
hook_init(HookObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"n_layer", "n_embd", "tensor_get", "tensor_set", "get_name", "nelements", NULL};
    long long n_layer, n_embd;
    unsigned long long tget, tset, gname, nel;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LLKKKK", kwlist, &n_layer, &n_embd, &tget, &tset,
                                     &gname, &nel))
        return -1;
    if (n_layer <= 0 || n_layer > 100000 || n_embd <= 0 || n_embd > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "n_layer / n_embd out of range");
        return -1;
    }
    if (!tget || !tset || !gname || !nel) {
        PyErr_SetString(PyExc_ValueError, "ggml function addresses must be non-null");
        return -1;
    }
    el_state *s = &self->s;
    if (s->capture) {
        PyErr_SetString(PyExc_RuntimeError, "Hook already initialised");
        return -1;
    }
    s->n_layer = n_layer;
    s->n_embd = n_embd;
    s->tget = (tensor_io_fn)(uintptr_t)tget;
    s->tset = (tensor_io_fn)(uintptr_t)tset;
    s->get_name = (get_name_fn)(uintptr_t)gname;
    s->nelements = (nelements_fn)(uintptr_t)nel;
    s->capture = calloc((size_t)n_layer, sizeof(el_rows));
    s->patch = calloc((size_t)n_layer, sizeof(el_rows));
    s->active = calloc((size_t)n_layer, 1);
    s->patch_mode = calloc((size_t)n_layer, sizeof(int32_t));
    s->patch_gain = calloc((size_t)n_layer, sizeof(float));
    s->row = calloc((size_t)n_embd, sizeof(float));
    s->stop_layer = -1;
    if (!s->capture || !s->patch || !s->active || !s->patch_mode || !s->patch_gain || !s->row) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int
check_layer(el_state *s, long long layer)
{
    if (layer < 0 || layer >= s->n_layer) {
        PyErr_Format(PyExc_ValueError, "layer %lld outside [0, %lld)", layer, (long long)s->n_layer);
        return -1;
    }
    return 0;
}

/* Fill `r` with positions from an int32 buffer (unique, non-negative) and a zeroed or copied
   float buffer. */
static int
rows_set(el_state *s, el_rows *r, Py_buffer *pos, const float *data)
{
    Py_ssize_t n = pos->len / (Py_ssize_t)sizeof(int32_t);
    if (n <= 0 || pos->len % (Py_ssize_t)sizeof(int32_t)) {
        PyErr_SetString(PyExc_ValueError, "positions must be a non-empty int32 buffer");
        return -1;
    }
    const int32_t *p = (const int32_t *)pos->buf;
    int32_t maxp = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "negative position");
            return -1;
        }
        if (p[i] > maxp)
            maxp = p[i];
    }
    el_rows nr = {0};
    nr.n = (int32_t)n;
    nr.slot_len = maxp + 1;
    nr.pos = malloc((size_t)n * sizeof(int32_t));
    nr.slot = malloc((size_t)nr.slot_len * sizeof(int32_t));
    nr.buf = data ? malloc((size_t)n * s->n_embd * sizeof(float)) : calloc((size_t)n * s->n_embd, sizeof(float));
    nr.done = calloc((size_t)n, 1);
    if (!nr.pos || !nr.slot || !nr.buf || !nr.done) {
        rows_free(&nr);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(nr.pos, p, (size_t)n * sizeof(int32_t));
    for (int32_t i = 0; i < nr.slot_len; i++)
        nr.slot[i] = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (nr.slot[p[i]] >= 0) {
            rows_free(&nr);
            PyErr_Format(PyExc_ValueError, "position %d appears twice", p[i]);
            return -1;
        }
        nr.slot[p[i]] = (int32_t)i;
    }
    if (data)
        memcpy(nr.buf, data, (size_t)n * s->n_embd * sizeof(float));
    rows_free(r);
    *r = nr;
    return 0;
}

static PyObject *
hook_set_capture(HookObject *self, PyObject *args)
{
    long long layer;
    Py_buffer pos;
    if (!PyArg_ParseTuple(args, "Ly*:set_capture", &layer, &pos))
        return NULL;
    el_state *s = &self->s;
    int rc = check_layer(s, layer) < 0 ? -1 : rows_set(s, &s->capture[layer], &pos, NULL);
    PyBuffer_Release(&pos);
    if (rc < 0)
        return NULL;
    recount(s);
    Py_RETURN_NONE;
}

static PyObject *
hook_set_patch(HookObject *self, PyObject *args)
{
    long long layer;
    Py_buffer pos, data;
    int mode;
    float gain;
    if (!PyArg_ParseTuple(args, "Ly*y*if:set_patch", &layer, &pos, &data, &mode, &gain))
        return NULL;
    el_state *s = &self->s;
    int rc = -1;
    Py_ssize_t n = pos.len / (Py_ssize_t)sizeof(int32_t);
    if (check_layer(s, layer) < 0)
        goto out;
    if (mode != MODE_ADD && mode != MODE_OVERWRITE) {
        PyErr_SetString(PyExc_ValueError, "mode must be 1 (add) or 2 (overwrite)");
        goto out;
    }
    if (data.len != n * s->n_embd * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "patch holds %zd bytes, %zd positions x %lld floats need %zd",
                     data.len, n, (long long)s->n_embd, n * s->n_embd * (Py_ssize_t)sizeof(float));
        goto out;
    }
    if (!isfinite(gain)) {
        PyErr_SetString(PyExc_ValueError, "gain must be finite");
        goto out;
    }
    rc = rows_set(s, &s->patch[layer], &pos, (const float *)data.buf);
    if (rc == 0) {
        s->patch_mode[layer] = mode;
        s->patch_gain[layer] = gain;
    }
out:
    PyBuffer_Release(&pos);
    PyBuffer_Release(&data);
    if (rc < 0)
        return NULL;
    recount(s);
    Py_RETURN_NONE;
}

static PyObject *
hook_set_batch(HookObject *self, PyObject *args)
{
    Py_buffer tok, out;
    if (!PyArg_ParseTuple(args, "y*y*:set_batch", &tok, &out))
        return NULL;
    el_state *s = &self->s;
    int32_t nt = (int32_t)(tok.len / (Py_ssize_t)sizeof(int32_t));
    int32_t no = (int32_t)(out.len / (Py_ssize_t)sizeof(int32_t));
    PyObject *ret = NULL;
    if (nt > s->cap_tokens) {
        int32_t *a = realloc(s->tok_pos, (size_t)nt * sizeof(int32_t));
        if (a)
            s->tok_pos = a;
        int32_t *b = realloc(s->out_pos, (size_t)nt * sizeof(int32_t));
        if (b)
            s->out_pos = b;
        if (!a || !b) {
            PyErr_NoMemory();
            goto done;
        }
        s->cap_tokens = nt;
    }
    if (no > nt) {
        PyErr_SetString(PyExc_ValueError, "more outputs than tokens");
        goto done;
    }
    memcpy(s->tok_pos, tok.buf, (size_t)nt * sizeof(int32_t));
    memcpy(s->out_pos, out.buf, (size_t)no * sizeof(int32_t));
    s->n_tokens = nt;
    s->n_out = no;
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&tok);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *
rows_result(el_state *s, el_rows *r, int with_data)
{
    PyObject *done = PyBytes_FromStringAndSize((const char *)r->done, r->n);
    if (!done)
        return NULL;
    if (!with_data)
        return done;
    PyObject *data = PyBytes_FromStringAndSize((const char *)r->buf, (Py_ssize_t)r->n * s->n_embd * sizeof(float));
    if (!data) {
        Py_DECREF(done);
        return NULL;
    }
    return Py_BuildValue("(NN)", data, done);
}

static PyObject *
hook_take_capture(HookObject *self, PyObject *args)
{
    long long layer;
    if (!PyArg_ParseTuple(args, "L:take_capture", &layer))
        return NULL;
    el_state *s = &self->s;
    if (check_layer(s, layer) < 0)
        return NULL;
    if (!s->capture[layer].n) {
        PyErr_Format(PyExc_ValueError, "no capture on layer %lld", layer);
        return NULL;
    }
    return rows_result(s, &s->capture[layer], 1);
}

static PyObject *
hook_patch_done(HookObject *self, PyObject *args)
{
    long long layer;
    if (!PyArg_ParseTuple(args, "L:patch_done", &layer))
        return NULL;
    el_state *s = &self->s;
    if (check_layer(s, layer) < 0)
        return NULL;
    return rows_result(s, &s->patch[layer], 0);
}

static PyObject *
hook_clear(HookObject *self, PyObject *noargs)
{
    el_state *s = &self->s;
    for (int64_t l = 0; l < s->n_layer; l++) {
        rows_free(&s->capture[l]);
        rows_free(&s->patch[l]);
    }
    recount(s);
    s->stop_layer = -1;
    s->error[0] = 0;
    s->n_errors = s->n_seen = s->n_rows_captured = s->n_rows_patched = 0;
    Py_RETURN_NONE;
}

static PyObject *
hook_set_stop(HookObject *self, PyObject *args)
{
    el_state *s = &self->s;
    int layer;
    if (!PyArg_ParseTuple(args, "i", &layer))
        return NULL;
    if (layer < -1 || layer >= s->n_layer) {
        PyErr_Format(PyExc_ValueError, "stop layer %d outside [-1, %lld)", layer, (long long)s->n_layer);
        return NULL;
    }
    if (layer >= 0 && s->capture[layer].n == 0) {
        PyErr_Format(PyExc_ValueError, "stop layer %d has no capture armed", layer);
        return NULL;
    }
    s->stop_layer = layer;
    Py_RETURN_NONE;
}

static PyObject *
hook_stats(HookObject *self, PyObject *noargs)
{
    el_state *s = &self->s;
    return Py_BuildValue("{s:i,s:L,s:L,s:L,s:L,s:s,s:i}", "active_layers", s->n_active, "seen",
                         (long long)s->n_seen, "rows_captured", (long long)s->n_rows_captured,
                         "rows_patched", (long long)s->n_rows_patched, "errors", (long long)s->n_errors,
                         "error", s->error, "abi_checked", s->checked);
}

static PyObject *
hook_user_data(HookObject *self, PyObject *noargs)
{
    return PyLong_FromVoidPtr(&self->s);
}

static PyMethodDef hook_methods[] = {
    {"set_capture", (PyCFunction)hook_set_capture, METH_VARARGS,
     "set_capture(layer, positions_i32): capture l_out-layer rows at these absolute positions."},
    {"set_patch", (PyCFunction)hook_set_patch, METH_VARARGS,
     "set_patch(layer, positions_i32, rows_f32, mode, gain): mode 1 adds gain*rows, 2 overwrites."},
    {"set_batch", (PyCFunction)hook_set_batch, METH_VARARGS,
     "set_batch(token_positions_i32, output_positions_i32): the batch the next decode runs."},
    {"take_capture", (PyCFunction)hook_take_capture, METH_VARARGS,
     "take_capture(layer) -> (f32 bytes [n, n_embd], done bytes [n])."},
    {"patch_done", (PyCFunction)hook_patch_done, METH_VARARGS, "patch_done(layer) -> done bytes [n]."},
    {"set_stop", (PyCFunction)hook_set_stop, METH_VARARGS,
     "set_stop(layer): end each decode's graph after that layer's l_out (-1: never)."},
    {"clear", (PyCFunction)hook_clear, METH_NOARGS, "Drop every capture and patch: the hook goes idle."},
    {"stats", (PyCFunction)hook_stats, METH_NOARGS, "Counters and the first error."},
    {"user_data", (PyCFunction)hook_user_data, METH_NOARGS, "Address to pass as cb_eval_user_data."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "edgelink._evalhook.Hook",
    .tp_basicsize = sizeof(HookObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Hook(n_layer, n_embd, tensor_get, tensor_set, get_name, nelements): eval-callback state.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hook_init,
    .tp_dealloc = (destructor)hook_dealloc,
    .tp_methods = hook_methods,
};

static PyObject *
callback_address(PyObject *self, PyObject *noargs)
{
    return PyLong_FromVoidPtr((void *)(uintptr_t)&el_eval_cb);
}

static PyMethodDef module_methods[] = {
    {"callback_address", callback_address, METH_NOARGS, "Address of the C eval callback (cb_eval)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "edgelink._evalhook",
    "llama.cpp eval callback: capture and patch l_out-N rows without Python per node.", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__evalhook(void)
{
    if (PyType_Ready(&HookType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&HookType);
    if (PyModule_AddObject(m, "Hook", (PyObject *)&HookType) < 0) {
        Py_DECREF(&HookType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MODE_ADD", MODE_ADD);
    PyModule_AddIntConstant(m, "MODE_OVERWRITE", MODE_OVERWRITE);
    PyModule_AddIntConstant(m, "TENSOR_STRUCT_BYTES", (long)sizeof(struct el_ggml_tensor));
    return m;
}
