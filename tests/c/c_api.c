/* The C test of include/prefix_attn.h (run by tests/c_api.rs): forward and backward on host
 * memory against the f64 oracle values the Rust side writes, then bad arguments, then a panic
 * inside the library; then plan/run on an emu context (bf16, the kernels on the emulator):
 * a run gives the one-shot call's bits and the oracle's values, and bad runs return their
 * status and message. Usage: c_api CASE_FILE. Exit status 0 when every check passes. */
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

/* A contiguous rank-4 (or rank-3 when d3 < 0) tensor of a dtype. */
static pa_tensor tensor_of(void *data, int32_t dtype, long d0, long d1, long d2, long d3) {
    pa_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dtype;
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

/* A contiguous f32 tensor. */
static pa_tensor tensor(float *data, long d0, long d1, long d2, long d3) {
    return tensor_of(data, PA_F32, d0, d1, d2, d3);
}

/* |got - want| <= tol + tol * |want|, inf only where the oracle has the same inf. */
static void compare_tol(const char *name, const float *got, const double *want, long n,
                        double tol) {
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
        if (!(err <= tol + tol * fabs(w))) {
            if (bad < 10) fprintf(stderr, "%s[%ld]: got %.7g, expected %.7g\n", name, i, g, w);
            bad++;
        }
    }
    printf("%s: %ld values, max abs error %.3g, %ld bad\n", name, n, worst, bad);
    if (bad) failures++;
}

/* f32 against the f64 oracle. */
static void compare(const char *name, const float *got, const double *want, long n) {
    compare_tol(name, got, want, n, 2e-4);
}

static void same_bits(const char *name, const void *got, const void *want, size_t bytes) {
    int same = memcmp(got, want, bytes) == 0;
    printf("%s: %s\n", name, same ? "same bits as the one-shot call" : "DIFFERENT bits");
    if (!same) failures++;
}

/* bf16 is the top half of an f32's bits; the case's values are bf16 values. */
static uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static uint16_t *read_bf16(FILE *f, long n) {
    float *x = read_floats(f, n);
    uint16_t *h = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n > 0 ? n : 1));
    long i;
    for (i = 0; i < n; i++) h[i] = to_bf16(x[i]);
    free(x);
    return h;
}

static void *poisoned(size_t bytes) {
    void *p = malloc(bytes > 0 ? bytes : 1);
    memset(p, 0xFF, bytes); /* NaN in f32 and bf16 */
    return p;
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

/* Plan/run on an emu context: the case file's second section (bf16, D = 64, two prefixes,
 * per-sequence prefix indices with one sequence without a prefix, right padding, causal). */
static void emu_plan_run(FILE *f) {
    long B, Tq, Tk, H, D, P, NP, causal, nq, nk, np, nl, i;
    int32_t *pidx, *sq, *sk;
    uint16_t *q, *k, *v, *kp, *vp, *d_o, *o1, *o2, *dq1, *dq2, *dk1, *dk2, *dv1, *dv2;
    float *lse1, *lse2, *dkp1, *dkp2, *dvp1, *dvp2, *of;
    double *eo, *el;
    pa_tensor tq, tk, tv, tkp, tvp, tdo, to1, to2, tl1, tl2, tdq1, tdq2, tdk1, tdk2, tdv1, tdv2;
    pa_tensor tdkp1, tdkp2, tdvp1, tdvp2, sq_, sk_, sv_, skp_, svp_, bq, bo, bl, hq, hk, hv, hkp;
    pa_tensor hvp, ho;
    pa_attn_args args, shapes, run, bad;
    pa_context *ctx = NULL;
    pa_attn_plan *pf = NULL, *pb = NULL, *p32 = NULL;
    uint64_t wf = 0, wb = 0;
    unsigned char *raw, *ws;
    int not_a_stream = 0;

    if (fscanf(f, "%ld %ld %ld %ld %ld %ld %ld %ld", &B, &Tq, &Tk, &H, &D, &P, &NP, &causal) != 8) {
        fprintf(stderr, "case file: emu header unreadable\n");
        exit(2);
    }
    nq = B * Tq * H * D; nk = B * Tk * H * D; np = NP * P * H * D; nl = B * H * Tq;
    pidx = (int32_t *)malloc(sizeof(int32_t) * (size_t)B);
    sq = (int32_t *)malloc(sizeof(int32_t) * (size_t)B);
    sk = (int32_t *)malloc(sizeof(int32_t) * (size_t)B);
    read_ints(f, pidx, B); read_ints(f, sq, B); read_ints(f, sk, B);
    q = read_bf16(f, nq); k = read_bf16(f, nk); v = read_bf16(f, nk);
    kp = read_bf16(f, np); vp = read_bf16(f, np); d_o = read_bf16(f, nq);
    eo = read_doubles(f, nq); el = read_doubles(f, nl);
    o1 = (uint16_t *)poisoned(2 * (size_t)nq); o2 = (uint16_t *)poisoned(2 * (size_t)nq);
    lse1 = (float *)poisoned(4 * (size_t)nl); lse2 = (float *)poisoned(4 * (size_t)nl);
    dq1 = (uint16_t *)poisoned(2 * (size_t)nq); dq2 = (uint16_t *)poisoned(2 * (size_t)nq);
    dk1 = (uint16_t *)poisoned(2 * (size_t)nk); dk2 = (uint16_t *)poisoned(2 * (size_t)nk);
    dv1 = (uint16_t *)poisoned(2 * (size_t)nk); dv2 = (uint16_t *)poisoned(2 * (size_t)nk);
    dkp1 = (float *)poisoned(4 * (size_t)np); dkp2 = (float *)poisoned(4 * (size_t)np);
    dvp1 = (float *)poisoned(4 * (size_t)np); dvp2 = (float *)poisoned(4 * (size_t)np);
    of = (float *)malloc(sizeof(float) * (size_t)nq);

    if (pa_context_create(PA_DEVICE_EMU, 0, &ctx) != PA_OK) {
        fprintf(stderr, "emu context: %s\n", pa_last_error());
        failures++;
        return;
    }
    tq = tensor_of(q, PA_BF16, B, Tq, H, D); tk = tensor_of(k, PA_BF16, B, Tk, H, D);
    tv = tensor_of(v, PA_BF16, B, Tk, H, D); tkp = tensor_of(kp, PA_BF16, NP, P, H, D);
    tvp = tensor_of(vp, PA_BF16, NP, P, H, D); tdo = tensor_of(d_o, PA_BF16, B, Tq, H, D);
    to1 = tensor_of(o1, PA_BF16, B, Tq, H, D); to2 = tensor_of(o2, PA_BF16, B, Tq, H, D);
    tl1 = tensor(lse1, B, H, Tq, -1); tl2 = tensor(lse2, B, H, Tq, -1);
    tdq1 = tensor_of(dq1, PA_BF16, B, Tq, H, D); tdq2 = tensor_of(dq2, PA_BF16, B, Tq, H, D);
    tdk1 = tensor_of(dk1, PA_BF16, B, Tk, H, D); tdk2 = tensor_of(dk2, PA_BF16, B, Tk, H, D);
    tdv1 = tensor_of(dv1, PA_BF16, B, Tk, H, D); tdv2 = tensor_of(dv2, PA_BF16, B, Tk, H, D);
    tdkp1 = tensor(dkp1, NP, P, H, D); tdkp2 = tensor(dkp2, NP, P, H, D);
    tdvp1 = tensor(dvp1, NP, P, H, D); tdvp2 = tensor(dvp2, NP, P, H, D);
    memset(&args, 0, sizeof args);
    args.q = &tq; args.k = &tk; args.v = &tv; args.k_pre = &tkp; args.v_pre = &tvp;
    args.prefix_index = pidx; args.seqlen_q = sq; args.seqlen_k = sk; args.batch = B;
    args.causal = (int32_t)causal;

    /* The one-shot calls with host metadata. */
    expect("emu forward", pa_attn_fwd(ctx, &args, &to1, &tl1, NULL), PA_OK, "");
    expect("emu backward", pa_attn_bwd(ctx, &args, &to1, &tl1, &tdo, &tdq1, &tdk1, &tdv1, &tdkp1,
                                       &tdvp1, 0, NULL), PA_OK, "");

    /* Plans from a shapes-only description: no data, no metadata. */
    sq_ = tq; sk_ = tk; sv_ = tv; skp_ = tkp; svp_ = tvp;
    sq_.data = NULL; sk_.data = NULL; sv_.data = NULL; skp_.data = NULL; svp_.data = NULL;
    shapes = args;
    shapes.q = &sq_; shapes.k = &sk_; shapes.v = &sv_; shapes.k_pre = &skp_; shapes.v_pre = &svp_;
    shapes.prefix_index = NULL; shapes.seqlen_q = NULL; shapes.seqlen_k = NULL; shapes.batch = 0;
    expect("plan forward", pa_attn_plan_create(ctx, &shapes, 0, &pf), PA_OK, "");
    expect("plan backward", pa_attn_plan_create(ctx, &shapes, 1, &pb), PA_OK, "");
    expect("forward workspace", pa_attn_plan_workspace_size(pf, &wf), PA_OK, "");
    expect("backward workspace", pa_attn_plan_workspace_size(pb, &wb), PA_OK, "");
    printf("plan workspaces: forward %llu bytes, backward %llu bytes\n", (unsigned long long)wf,
           (unsigned long long)wb);
    if (wf == 0 || wb < wf) {
        fprintf(stderr, "workspace sizes %llu, %llu: expected 0 < forward <= backward\n",
                (unsigned long long)wf, (unsigned long long)wb);
        failures++;
    }
    /* The workspace: 16-byte aligned, poisoned (a run must not depend on its contents). */
    raw = (unsigned char *)malloc((size_t)wb + 32);
    ws = raw + (16 - (size_t)((uintptr_t)raw % 16)) % 16;
    memset(ws, 0xFF, (size_t)wb);

    /* Runs with the metadata as "device" arrays (host memory on the emulator). */
    run = args;
    run.prefix_index = NULL; run.seqlen_q = NULL; run.seqlen_k = NULL; run.batch = 0;
    expect("run forward", pa_attn_plan_run_fwd(pf, &run, &to2, &tl2, pidx, sq, sk, ws, wf, NULL),
           PA_OK, "");
    same_bits("run o", o2, o1, 2 * (size_t)nq);
    same_bits("run lse", lse2, lse1, 4 * (size_t)nl);
    for (i = 0; i < nq; i++) of[i] = from_bf16(o2[i]);
    compare_tol("run o vs oracle", of, eo, nq, 3e-2);
    compare_tol("run lse vs oracle", lse2, el, nl, 1e-3);
    memset(ws, 0xFF, (size_t)wb);
    expect("run backward", pa_attn_plan_run_bwd(pb, &run, &to2, &tl2, &tdo, &tdq2, &tdk2, &tdv2,
                                                &tdkp2, &tdvp2, 0, pidx, sq, sk, ws, wb, NULL),
           PA_OK, "");
    same_bits("run dq", dq2, dq1, 2 * (size_t)nq);
    same_bits("run dk", dk2, dk1, 2 * (size_t)nk);
    same_bits("run dv", dv2, dv1, 2 * (size_t)nk);
    same_bits("run dk_pre", dkp2, dkp1, 4 * (size_t)np);
    same_bits("run dv_pre", dvp2, dvp1, 4 * (size_t)np);

    /* Bad runs: each returns its status and names the argument. */
    expect("workspace too small",
           pa_attn_plan_run_fwd(pf, &run, &to2, &tl2, pidx, sq, sk, ws, wf - 1, NULL),
           PA_ERR_LAYOUT, "workspace: ");
    expect("misaligned workspace",
           pa_attn_plan_run_fwd(pf, &run, &to2, &tl2, pidx, sq, sk, ws + 4, wf, NULL),
           PA_ERR_LAYOUT, "is not 16-byte aligned");
    expect("null workspace",
           pa_attn_plan_run_fwd(pf, &run, &to2, &tl2, pidx, sq, sk, NULL, wf, NULL),
           PA_ERR_NULL, "workspace: null pointer");
    /* A consistent problem of another shape (Tq - 1) than the plan's. */
    bq = tensor_of(q, PA_BF16, B, Tq - 1, H, D); bo = tensor_of(o2, PA_BF16, B, Tq - 1, H, D);
    bl = tensor(lse2, B, H, Tq - 1, -1);
    bad = run; bad.q = &bq;
    expect("wrong shape", pa_attn_plan_run_fwd(pf, &bad, &bo, &bl, pidx, sq, sk, ws, wf, NULL),
           PA_ERR_SHAPE, "q: shape");
    /* A consistent problem of another dtype (the same bytes read as f16). */
    hq = tq; hk = tk; hv = tv; hkp = tkp; hvp = tvp; ho = to2;
    hq.dtype = PA_F16; hk.dtype = PA_F16; hv.dtype = PA_F16; hkp.dtype = PA_F16;
    hvp.dtype = PA_F16; ho.dtype = PA_F16;
    bad = run; bad.q = &hq; bad.k = &hk; bad.v = &hv; bad.k_pre = &hkp; bad.v_pre = &hvp;
    expect("wrong dtype", pa_attn_plan_run_fwd(pf, &bad, &ho, &tl2, pidx, sq, sk, ws, wf, NULL),
           PA_ERR_DTYPE, "q: dtype f16, expected bf16");
    expect("host metadata in a run",
           pa_attn_plan_run_fwd(pf, &args, &to2, &tl2, pidx, sq, sk, ws, wf, NULL),
           PA_ERR_UNSUPPORTED, "args.prefix_index: must be NULL");
    expect("stream on emu (run)",
           pa_attn_plan_run_fwd(pf, &run, &to2, &tl2, pidx, sq, sk, ws, wf, &not_a_stream),
           PA_ERR_UNSUPPORTED, "stream: the emu device has no CUDA streams");
    expect("stream on emu (one-shot)", pa_attn_fwd(ctx, &args, &to2, &tl2, &not_a_stream),
           PA_ERR_UNSUPPORTED, "stream: the emu device has no CUDA streams");
    expect("forward plan run backward",
           pa_attn_plan_run_bwd(pf, &run, &to2, &tl2, &tdo, &tdq2, &tdk2, &tdv2, &tdkp2, &tdvp2,
                                0, pidx, sq, sk, ws, wb, NULL),
           PA_ERR_UNSUPPORTED, "plan: planned for the forward");
    expect("null plan", pa_attn_plan_run_fwd(NULL, &run, &to2, &tl2, pidx, sq, sk, ws, wf, NULL),
           PA_ERR_NULL, "plan: null pointer");
    sq_.dtype = PA_F32; sk_.dtype = PA_F32; sv_.dtype = PA_F32; skp_.dtype = PA_F32;
    svp_.dtype = PA_F32;
    expect("f32 plan", pa_attn_plan_create(ctx, &shapes, 0, &p32), PA_ERR_DTYPE, "q: dtype f32");
    /* The plans outlive the context. */
    pa_context_destroy(ctx);
    expect("run after the context is gone",
           pa_attn_plan_run_fwd(pf, &run, &to2, &tl2, pidx, sq, sk, ws, wf, NULL), PA_OK, "");
    same_bits("o of the last run", o2, o1, 2 * (size_t)nq);
    pa_attn_plan_destroy(pf);
    pa_attn_plan_destroy(pb);
    pa_attn_plan_destroy(NULL);
    free(raw); free(pidx); free(sq); free(sk); free(q); free(k); free(v); free(kp); free(vp);
    free(d_o); free(eo); free(el); free(o1); free(o2); free(lse1); free(lse2); free(dq1);
    free(dq2); free(dk1); free(dk2); free(dv1); free(dv2); free(dkp1); free(dkp2); free(dvp1);
    free(dvp2); free(of);
}

/* The paged decode (the case file's third section): f32 on a cpu context and bf16 on an emu
 * context against the f64 oracle; GQA, pages in scattered order, two prefixes of different
 * valid lengths and one sequence without a prefix. Then its bad arguments. */
static void decode_case(FILE *f) {
    long B, Tq, Hq, Hkv, D, PS, NPG, MP, NP, P, nq, nc, np, nl, i;
    int32_t *table, *sk, *pidx, *plen;
    float *q, *kc, *vc, *kp, *vp, *o, *lse, *of;
    uint16_t *hq, *hkc, *hvc, *hkp, *hvp, *ho;
    double *eo, *el;
    pa_tensor tq, tkc, tvc, tkp, tvp, to, tl, bad;
    pa_decode_args a;
    pa_context *cpu = NULL, *emu = NULL;

    if (fscanf(f, "%ld %ld %ld %ld %ld %ld %ld %ld %ld %ld", &B, &Tq, &Hq, &Hkv, &D, &PS, &NPG,
               &MP, &NP, &P) != 10) {
        fprintf(stderr, "case file: decode header unreadable\n");
        failures++;
        return;
    }
    nq = B * Tq * Hq * D; nc = NPG * PS * Hkv * D; np = NP * P * Hkv * D; nl = B * Hq * Tq;
    table = (int32_t *)malloc(sizeof(int32_t) * (size_t)(B * MP));
    sk = (int32_t *)malloc(sizeof(int32_t) * (size_t)B);
    pidx = (int32_t *)malloc(sizeof(int32_t) * (size_t)B);
    plen = (int32_t *)malloc(sizeof(int32_t) * (size_t)NP);
    read_ints(f, table, B * MP); read_ints(f, sk, B); read_ints(f, pidx, B); read_ints(f, plen, NP);
    q = read_floats(f, nq); kc = read_floats(f, nc); vc = read_floats(f, nc);
    kp = read_floats(f, np); vp = read_floats(f, np);
    eo = read_doubles(f, nq); el = read_doubles(f, nl);
    o = (float *)poisoned(sizeof(float) * (size_t)nq);
    lse = (float *)poisoned(sizeof(float) * (size_t)nl);

    memset(&a, 0, sizeof a);
    tq = tensor(q, B, Tq, Hq, D); tkc = tensor(kc, NPG, PS, Hkv, D); tvc = tensor(vc, NPG, PS, Hkv, D);
    tkp = tensor(kp, NP, P, Hkv, D); tvp = tensor(vp, NP, P, Hkv, D);
    to = tensor(o, B, Tq, Hq, D); tl = tensor(lse, B, Hq, Tq, -1);
    a.q = &tq; a.k_cache = &tkc; a.v_cache = &tvc; a.k_pre = &tkp; a.v_pre = &tvp;
    a.block_table = table; a.max_pages = MP; a.seqlen_k = sk; a.prefix_index = pidx;
    a.prefix_len = plen; a.batch = B;
    expect("decode cpu context", pa_context_create(PA_DEVICE_CPU, 0, &cpu), PA_OK, "");
    expect("decode on cpu", pa_attn_decode(cpu, &a, &to, &tl, NULL), PA_OK, "");
    compare("decode o (cpu)", o, eo, nq);
    compare("decode lse (cpu)", lse, el, nl);

    /* The same problem in bf16 on the emulated kernels. */
    hq = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)nq);
    hkc = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)nc);
    hvc = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)nc);
    hkp = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)np);
    hvp = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)np);
    ho = (uint16_t *)poisoned(sizeof(uint16_t) * (size_t)nq);
    of = (float *)malloc(sizeof(float) * (size_t)nq);
    for (i = 0; i < nq; i++) hq[i] = to_bf16(q[i]);
    for (i = 0; i < nc; i++) { hkc[i] = to_bf16(kc[i]); hvc[i] = to_bf16(vc[i]); }
    for (i = 0; i < np; i++) { hkp[i] = to_bf16(kp[i]); hvp[i] = to_bf16(vp[i]); }
    tq = tensor_of(hq, PA_BF16, B, Tq, Hq, D);
    tkc = tensor_of(hkc, PA_BF16, NPG, PS, Hkv, D); tvc = tensor_of(hvc, PA_BF16, NPG, PS, Hkv, D);
    tkp = tensor_of(hkp, PA_BF16, NP, P, Hkv, D); tvp = tensor_of(hvp, PA_BF16, NP, P, Hkv, D);
    to = tensor_of(ho, PA_BF16, B, Tq, Hq, D);
    memset(lse, 0xFF, sizeof(float) * (size_t)nl);
    expect("decode emu context", pa_context_create(PA_DEVICE_EMU, 0, &emu), PA_OK, "");
    expect("decode on emu", pa_attn_decode(emu, &a, &to, &tl, NULL), PA_OK, "");
    for (i = 0; i < nq; i++) of[i] = from_bf16(ho[i]);
    /* bf16 output: 8 bits of mantissa. */
    compare_tol("decode o (emu, bf16)", of, eo, nq, 1e-2);
    compare_tol("decode lse (emu)", lse, el, nl, 1e-3);

    /* Planned once, run with the metadata as arrays in the context's memory (host memory on
     * emu): the one-shot call's bits; then the defaults (NULL prefix_index / prefix_len) on a
     * problem whose values are the defaults, and bad runs. */
    {
        pa_decode_plan *dp = NULL;
        uint64_t wbytes = 7;
        void *ws;
        uint16_t *ho2 = (uint16_t *)poisoned(sizeof(uint16_t) * (size_t)nq);
        uint16_t *ho3 = (uint16_t *)poisoned(sizeof(uint16_t) * (size_t)nq);
        int32_t zeros[3] = {0, 0, 0}, full[2];
        pa_tensor to2 = tensor_of(ho2, PA_BF16, B, Tq, Hq, D);
        pa_tensor to3 = tensor_of(ho3, PA_BF16, B, Tq, Hq, D);
        pa_decode_args run = a;
        full[0] = (int32_t)P; full[1] = (int32_t)P;
        expect("decode plan on cpu", pa_decode_plan_create(cpu, &a, &dp), PA_ERR_UNSUPPORTED,
               "ctx: plan/run needs a kernel device");
        expect("decode plan", pa_decode_plan_create(emu, &a, &dp), PA_OK, "");
        expect("decode plan workspace", pa_decode_plan_workspace_size(dp, &wbytes), PA_OK, "");
        ws = poisoned(wbytes > 0 ? (size_t)wbytes : 16);
        run.block_table = NULL; run.seqlen_k = NULL; run.prefix_index = NULL; run.prefix_len = NULL;
        expect("decode plan run", pa_decode_plan_run(dp, &run, &to2, NULL, table, sk, pidx, plen,
                                                     ws, wbytes, NULL), PA_OK, "");
        same_bits("decode plan run o", ho2, ho, 2 * (size_t)nq);
        /* Prefix 0 for every sequence, P rows: the one-shot call with those values against
         * the run with NULLs. */
        a.prefix_index = zeros; a.prefix_len = full;
        memset(ho, 0xFF, sizeof(uint16_t) * (size_t)nq);
        expect("decode default values", pa_attn_decode(emu, &a, &to, NULL, NULL), PA_OK, "");
        expect("decode plan run, defaults",
               pa_decode_plan_run(dp, &run, &to3, NULL, table, sk, NULL, NULL, ws, wbytes, NULL),
               PA_OK, "");
        same_bits("decode plan run o, defaults", ho3, ho, 2 * (size_t)nq);
        a.prefix_index = pidx; a.prefix_len = plen;
        expect("decode run null block_table",
               pa_decode_plan_run(dp, &run, &to2, NULL, NULL, sk, pidx, plen, ws, wbytes, NULL),
               PA_ERR_NULL, "block_table: null pointer");
        expect("decode run host metadata in args",
               pa_decode_plan_run(dp, &a, &to2, NULL, table, sk, pidx, plen, ws, wbytes, NULL),
               PA_ERR_UNSUPPORTED, "args.block_table: must be NULL in a plan's run");
        run.max_pages = MP - 1;
        expect("decode run narrower block table",
               pa_decode_plan_run(dp, &run, &to2, NULL, table, sk, pidx, plen, ws, wbytes, NULL),
               PA_ERR_SHAPE, "the plan's [B, max_pages]");
        run.max_pages = MP;
        expect("decode run misaligned seqlen_k",
               pa_decode_plan_run(dp, &run, &to2, NULL, table,
                                  (const int32_t *)((const char *)sk + 1), pidx, plen, ws,
                                  wbytes, NULL),
               PA_ERR_LAYOUT, "seqlen_k: address");
        expect("decode run on a stream (emu)",
               pa_decode_plan_run(dp, &run, &to2, NULL, table, sk, pidx, plen, ws, wbytes, &run),
               PA_ERR_UNSUPPORTED, "stream");
        expect("decode workspace size of NULL", pa_decode_plan_workspace_size(NULL, &wbytes),
               PA_ERR_NULL, "plan: null pointer");
        pa_decode_plan_destroy(dp);
        pa_decode_plan_destroy(NULL);
        free(ws); free(ho2); free(ho3);
    }

    /* Bad arguments name themselves. */
    a.block_table = NULL;
    expect("decode null block_table", pa_attn_decode(cpu, &a, &to, &tl, NULL), PA_ERR_NULL,
           "block_table: null pointer");
    a.block_table = table;
    a.max_pages = -1;
    expect("decode negative max_pages", pa_attn_decode(cpu, &a, &to, &tl, NULL), PA_ERR_SHAPE,
           "max_pages = -1");
    a.max_pages = MP;
    a.k_pre = NULL;
    expect("decode v_pre alone", pa_attn_decode(cpu, &a, &to, &tl, NULL), PA_ERR_NULL,
           "k_pre (v_pre is given)");
    a.v_pre = NULL;
    expect("decode prefix_len without a table", pa_attn_decode(cpu, &a, &to, &tl, NULL),
           PA_ERR_INDEX, "without a prefix table");
    a.k_pre = &tkp; a.v_pre = &tvp;
    bad = tq; bad.dtype = PA_F16; a.q = &bad;
    expect("decode q dtype", pa_attn_decode(emu, &a, &to, &tl, NULL), PA_ERR_DTYPE, "f16");
    a.q = &tq;
    expect("decode stream on emu", pa_attn_decode(emu, &a, &to, &tl, &a), PA_ERR_UNSUPPORTED,
           "stream");
    pa_context_destroy(cpu);
    pa_context_destroy(emu);
    free(table); free(sk); free(pidx); free(plen); free(q); free(kc); free(vc); free(kp);
    free(vp); free(eo); free(el); free(o); free(lse); free(hq); free(hkc); free(hvc); free(hkp);
    free(hvp); free(ho); free(of);
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
    expect("stream on cpu", pa_attn_fwd(ctx, &args, &to, &tlse, &ws), PA_ERR_UNSUPPORTED,
           "stream: the cpu device has no CUDA streams");
    {
        pa_attn_plan *plan = NULL;
        expect("plan on cpu", pa_attn_plan_create(ctx, &args, 0, &plan), PA_ERR_UNSUPPORTED,
               "plan/run needs a kernel device");
    }

    pa_context_destroy(ctx);
    pa_context_destroy(NULL);

    emu_plan_run(f);
    decode_case(f);
    fclose(f);
    printf("%s\n", failures ? "FAILED" : "all C checks passed");
    return failures ? 1 : 0;
}
