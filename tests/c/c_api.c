/* The C test of include/prefix_attn.h (run by tests/c_api.rs): forward and backward on host
 * memory against the f64 oracle values the Rust side writes, then bad arguments, then a panic
 * inside the library. Usage: c_api CASE_FILE. Exit status 0 when every check passes. */
#include "prefix_attn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

static float *read_floats(FILE *f, long n) {
    float *x = (float *)malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    long i;
    for (i = 0; i < n; i++) {
        double d;
        if (fscanf(f, "%lf", &d) != 1) {
            fprintf(stderr, "case file: value %ld of %ld unreadable\n", i, n);
            exit(2);
        }
        x[i] = (float)d;
    }
    return x;
}

static double *read_doubles(FILE *f, long n) {
    double *x = (double *)malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    long i;
    for (i = 0; i < n; i++) {
        char tok[64];
        if (fscanf(f, "%63s", tok) != 1) {
            fprintf(stderr, "case file: expected value %ld of %ld unreadable\n", i, n);
            exit(2);
        }
        x[i] = strcmp(tok, "-inf") == 0 ? -HUGE_VAL : strtod(tok, NULL);
    }
    return x;
}

static void read_ints(FILE *f, int32_t *x, long n) {
    long i;
    for (i = 0; i < n; i++) {
        int v;
        if (fscanf(f, "%d", &v) != 1) {
            fprintf(stderr, "case file: int %ld unreadable\n", i);
            exit(2);
        }
        x[i] = (int32_t)v;
    }
}

/* A contiguous rank-4 (or rank-3 when d3 < 0) f32 tensor. */
static pa_tensor tensor(float *data, long d0, long d1, long d2, long d3) {
    pa_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = PA_F32;
    if (d3 < 0) {
        t.rank = 3;
        t.shape[0] = d0; t.shape[1] = d1; t.shape[2] = d2;
        t.strides[2] = 1; t.strides[1] = d2; t.strides[0] = d1 * d2;
    } else {
        t.rank = 4;
        t.shape[0] = d0; t.shape[1] = d1; t.shape[2] = d2; t.shape[3] = d3;
        t.strides[3] = 1; t.strides[2] = d3; t.strides[1] = d2 * d3; t.strides[0] = d1 * d2 * d3;
    }
    return t;
}

/* tol + |ref| * eps: f32 against the f64 oracle. */
static void compare(const char *name, const float *got, const double *want, long n) {
    long i, bad = 0;
    double worst = 0.0;
    for (i = 0; i < n; i++) {
        double g = got[i], w = want[i], err;
        if (isinf(w) || isinf(g)) {
            err = (isinf(w) && isinf(g) && (w < 0) == (g < 0)) ? 0.0 : HUGE_VAL;
        } else {
            err = fabs(g - w);
        }
        if (err > worst) worst = err;
        if (!(err <= 2e-4 + 2e-4 * fabs(w))) {
            if (bad < 10) fprintf(stderr, "%s[%ld]: got %.7g, expected %.7g\n", name, i, g, w);
            bad++;
        }
    }
    printf("%s: %ld values, max abs error %.3g, %ld bad\n", name, n, worst, bad);
    if (bad) failures++;
}

static void expect(const char *what, pa_status got, pa_status want, const char *needle) {
    const char *msg = pa_last_error();
    int ok = got == want && strstr(msg, needle) != NULL;
    printf("%s: status %d, message \"%s\" %s\n", what, (int)got, msg, ok ? "ok" : "WRONG");
    if (!ok) {
        fprintf(stderr, "%s: expected status %d and a message containing \"%s\"\n", what,
                (int)want, needle);
        failures++;
    }
}

int main(int argc, char **argv) {
    FILE *f;
    long B, Tq, Tk, H, D, P, causal, nq, nk, np, nl;
    float *q, *k, *v, *kp, *vp, *d_o, *o, *lse, *dq, *dk, *dv, *dkp, *dvp;
    double *eo, *elsev, *edq, *edk, *edv, *edkp, *edvp;
    int32_t *pidx, *sq, *sk;
    pa_tensor tq, tk, tv, tkp, tvp, tdo, to, tlse, tdq, tdk, tdv, tdkp, tdvp, bad;
    pa_attn_args args;
    pa_context *ctx = NULL;
    uint64_t ws = 1;
    pa_status s;

    if (argc != 2 || !(f = fopen(argv[1], "r"))) {
        fprintf(stderr, "usage: c_api CASE_FILE\n");
        return 2;
    }
    if (fscanf(f, "%ld %ld %ld %ld %ld %ld %ld", &B, &Tq, &Tk, &H, &D, &P, &causal) != 7) {
        fprintf(stderr, "case file: header unreadable\n");
        return 2;
    }
    nq = B * Tq * H * D; nk = B * Tk * H * D; np = P * H * D; nl = B * H * Tq;
    pidx = (int32_t *)malloc(sizeof(int32_t) * (size_t)B);
    sq = (int32_t *)malloc(sizeof(int32_t) * (size_t)B);
    sk = (int32_t *)malloc(sizeof(int32_t) * (size_t)B);
    read_ints(f, pidx, B); read_ints(f, sq, B); read_ints(f, sk, B);
    q = read_floats(f, nq); k = read_floats(f, nk); v = read_floats(f, nk);
    kp = read_floats(f, np); vp = read_floats(f, np); d_o = read_floats(f, nq);
    eo = read_doubles(f, nq); elsev = read_doubles(f, nl); edq = read_doubles(f, nq);
    edk = read_doubles(f, nk); edv = read_doubles(f, nk);
    edkp = read_doubles(f, np); edvp = read_doubles(f, np);
    fclose(f);
    o = (float *)calloc((size_t)nq, sizeof(float)); lse = (float *)calloc((size_t)nl, sizeof(float));
    dq = (float *)calloc((size_t)nq, sizeof(float)); dk = (float *)calloc((size_t)nk, sizeof(float));
    dv = (float *)calloc((size_t)nk, sizeof(float));
    dkp = (float *)calloc((size_t)np, sizeof(float)); dvp = (float *)calloc((size_t)np, sizeof(float));

    printf("prefix_attn %s\n", pa_version());
    s = pa_context_create(PA_DEVICE_CPU, 0, &ctx);
    if (s != PA_OK) {
        fprintf(stderr, "pa_context_create: %d %s\n", (int)s, pa_last_error());
        return 1;
    }
    tq = tensor(q, B, Tq, H, D); tk = tensor(k, B, Tk, H, D); tv = tensor(v, B, Tk, H, D);
    tkp = tensor(kp, 1, P, H, D); tvp = tensor(vp, 1, P, H, D); tdo = tensor(d_o, B, Tq, H, D);
    to = tensor(o, B, Tq, H, D); tlse = tensor(lse, B, H, Tq, -1);
    tdq = tensor(dq, B, Tq, H, D); tdk = tensor(dk, B, Tk, H, D); tdv = tensor(dv, B, Tk, H, D);
    tdkp = tensor(dkp, 1, P, H, D); tdvp = tensor(dvp, 1, P, H, D);
    memset(&args, 0, sizeof args);
    args.q = &tq; args.k = &tk; args.v = &tv; args.k_pre = &tkp; args.v_pre = &tvp;
    args.prefix_index = pidx; args.seqlen_q = sq; args.seqlen_k = sk; args.batch = B;
    args.causal = (int32_t)causal;

    s = pa_workspace_size(ctx, &args, 1, &ws);
    expect("workspace size", s, PA_OK, "");
    printf("workspace: %llu bytes\n", (unsigned long long)ws);
    s = pa_attn_fwd(ctx, &args, &to, &tlse, NULL);
    expect("forward", s, PA_OK, "");
    compare("o", o, eo, nq);
    compare("lse", lse, elsev, nl);
    s = pa_attn_bwd(ctx, &args, &to, &tlse, &tdo, &tdq, &tdk, &tdv, &tdkp, &tdvp, 0, NULL);
    expect("backward", s, PA_OK, "");
    compare("dq", dq, edq, nq); compare("dk", dk, edk, nk); compare("dv", dv, edv, nk);
    compare("dk_pre", dkp, edkp, np); compare("dv_pre", dvp, edvp, np);

    /* Bad arguments: each returns its status and names the argument; nothing is written. */
    args.q = NULL;
    expect("null q", pa_attn_fwd(ctx, &args, &to, &tlse, NULL), PA_ERR_NULL, "q: null pointer");
    args.q = &tq;
    bad = tq; bad.data = NULL; args.q = &bad;
    expect("null q data", pa_attn_fwd(ctx, &args, &to, &tlse, NULL), PA_ERR_NULL, "q: data is a null pointer");
    bad = tq; bad.strides[2] = -1; args.q = &bad;
    expect("negative stride", pa_attn_fwd(ctx, &args, &to, &tlse, NULL), PA_ERR_LAYOUT,
           "q: stride[2] = -1: expected >= 0");
    args.q = &tq;
    bad = tkp; bad.data = (char *)kp + 1; args.k_pre = &bad;
    expect("misaligned k_pre", pa_attn_fwd(ctx, &args, &to, &tlse, NULL), PA_ERR_LAYOUT,
           "is not aligned to 4 bytes for f32");
    args.k_pre = &tkp;
    bad = tk; bad.dtype = PA_F16; args.k = &bad;
    expect("wrong dtype", pa_attn_fwd(ctx, &args, &to, &tlse, NULL), PA_ERR_DTYPE, "k: dtype f16");
    bad = tk; bad.dtype = 9; args.k = &bad;
    expect("unknown dtype", pa_attn_fwd(ctx, &args, &to, &tlse, NULL), PA_ERR_DTYPE, "k: dtype code 9");
    args.k = &tk;
    bad = tv; bad.shape[1] = Tk + 1; args.v = &bad;
    expect("wrong shape", pa_attn_fwd(ctx, &args, &to, &tlse, NULL), PA_ERR_SHAPE, "v: shape");
    args.v = &tv;
    expect("null ctx", pa_attn_fwd(NULL, &args, &to, &tlse, NULL), PA_ERR_NULL, "ctx: null pointer");
    expect("bad device", pa_context_create(7, 0, &ctx), PA_ERR_DEVICE, "kind: 7");
    expect("panic", pa_test_panic(), PA_ERR_PANIC, "pa_test_panic: a deliberate panic");
    expect("after panic", pa_attn_fwd(ctx, &args, &to, &tlse, NULL), PA_OK, "");

    pa_context_destroy(ctx);
    pa_context_destroy(NULL);
    printf("%s\n", failures ? "FAILED" : "all C checks passed");
    return failures ? 1 : 0;
}
