/* Native CPU masked step: the math of reference.py in one pass over memory.
 *
 * Why C: inductor's CPU code computes a reduction in a loop of its own that recomputes its
 * inputs, so a torch.compile'd step that also sums |dw| either computes AdamW twice or stores
 * dw and reads it again (~1.7x of fused AdamW). Here one vectorised loop updates the moments,
 * forms u, selects, applies, writes the residual and bf16 copy, and reduces energy and count.
 *
 * Rounding follows the torch fallback op by op (built with -ffp-contract=off, no fast-math):
 * decisions equal the reference's except at last-ulp ties. Energy is summed per SUB elements
 * in float (SIMD lanes), then over the chunks in index order in double: the total does not
 * depend on the number of threads. Threads come from OpenMP; loaded after torch, this library
 * shares torch's libgomp (same soname), so it reuses torch's hot worker threads instead of
 * competing with them.
 *
 * hp: the float scalars in fallback._hp's layout. Built by native.py; loaded through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SUB 4096

enum { DENSE = 0, TOPK = 1, HARD = 2, SOFT = 3, RANDOM = 4, BLOCK = 5 };
enum { ADAMW = 0, SGD = 1 };

typedef struct {
    float *p;
    const float *g;
    float *m;              /* exp_avg or momentum buffer; NULL without momentum */
    float *v;              /* exp_avg_sq; adamw only */
    float *r;              /* residual; NULL without */
    uint16_t *pbf;         /* bf16 copy of the new params; NULL without */
    const float *hp;       /* 12 scalars, laid out as fallback._hp */
    const uint8_t *block_keep; /* block rule: keep flag per block of the whole buffer */
    int64_t block_size;
    float threshold;       /* topk: keep |u| > threshold */
    uint32_t hash_base;    /* random rule */
    int64_t random_threshold;
    float alpha;
    int32_t threads;       /* OpenMP threads for the element loops */
} Step;

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

static inline uint16_t to_bf16(float x) {  /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &x, 4);
    if (x != x) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* The buffers as restrict pointers held in locals: read through the struct, every store could
 * alias its fields and the loop would not vectorise. */
typedef struct {
    float *restrict p;
    const float *restrict g;
    float *restrict m;
    float *restrict v;
    float *restrict r;
} Bufs;

/* u_total and eta of element i; the new moments go to *mo / *vo. */
static inline __attribute__((always_inline)) float candidate(
        Bufs b, const float *hp, int64_t i, int kind, int has_m, int nesterov, int residual,
        float *mo, float *vo, float *eta) {
    float p = b.p[i], g = b.g[i], u;
    if (kind == ADAMW) {
        float m = b.m[i] * hp[9] + hp[2] * g;
        float v = b.v[i] * hp[3] + hp[4] * (g * g);
        float inv = 1.0f / (sqrtf(v) * hp[7] + hp[5]);
        u = (-hp[6]) * m * inv - (hp[0] * hp[1]) * p;
        *eta = hp[0] * inv;
        *mo = m;
        *vo = v;
    } else {
        float d = g + hp[1] * p;
        if (has_m) {
            float m = hp[2] * b.m[i] + hp[3] * d;
            d = nesterov ? d + hp[4] * m : m;
            *mo = m;
        }
        u = (-hp[0]) * d;
        *eta = hp[0];
    }
    if (residual) u = u + b.r[i];
    return u;
}

/* Chunks [k0, k1) of SUB elements: the step, and each chunk's energy and count. */
static inline __attribute__((always_inline)) void run(
        const Step *s, int64_t n, int64_t k0, int64_t k1, float *chunk_e, int32_t *chunk_c,
        int kind, int has_m, int nesterov, int residual, int rule, int pow_alpha) {
    float hp[12];
    memcpy(hp, s->hp, sizeof hp);
    const Bufs b = {s->p, s->g, s->m, s->v, s->r};
    uint16_t *restrict pbf = s->pbf;
    const uint8_t *restrict block_keep = s->block_keep;
    const int64_t block_size = s->block_size, random_threshold = s->random_threshold;
    const uint32_t base = s->hash_base;
    const float threshold = s->threshold;
    const float two_price = 2.0f * hp[8];
    const float two_count_price = 2.0f * hp[11];
    const float alpha = s->alpha;
    for (int64_t k = k0; k < k1; k++) {
        int64_t start = k * SUB, stop = start + SUB < n ? start + SUB : n;
        float e = 0.0f;
        int32_t c = 0;
        /* The block rule walks the chunk block segment by block segment, so its keep flag is
         * loop-invariant: an int64 division per element does not vectorise. */
        for (int64_t seg = start, seg_end; seg < stop; seg = seg_end) {
            int keep_block = 1;
            seg_end = stop;
            if (rule == BLOCK) {
                int64_t blk = seg / block_size;
                int64_t blk_end = (blk + 1) * block_size;
                seg_end = blk_end < stop ? blk_end : stop;
                keep_block = block_keep[blk];
            }
#pragma omp simd reduction(+ : e, c)
            for (int64_t i = seg; i < seg_end; i++) {
                float mo = 0.0f, vo = 0.0f, eta;
                float u = candidate(b, hp, i, kind, has_m, nesterov, residual, &mo, &vo, &eta);
                float dw;
                if (rule == DENSE) {
                    dw = u;
                } else if (rule == SOFT) {
                    float t = fabsf(u) - hp[8] * eta;
                    t = t < 0.0f ? 0.0f : t; /* clamp(min=0); fmaxf would not vectorise */
                    /* sign(u) * t (u = 0 gives t = 0), kept when its gain covers count_price */
                    dw = t * t >= two_count_price * eta ? copysignf(t, u) : 0.0f;
                } else {
                    int keep;
                    if (rule == HARD) keep = u * u > two_price * eta;
                    else if (rule == TOPK) keep = fabsf(u) > threshold;
                    else if (rule == RANDOM)
                        keep = (int64_t)(fmix32((uint32_t)i ^ base) >> 8) < random_threshold;
                    else keep = keep_block;
                    dw = keep ? u : 0.0f;
                }
                float p_new = b.p[i] + dw;
                float d = p_new - b.p[i];
                /* alpha 1 sums |d|; alpha 0 is the count (taken below); others need powf */
                e += pow_alpha ? (d != 0.0f ? powf(fabsf(d), alpha) : 0.0f) : fabsf(d);
                c += d != 0.0f;
                if (has_m) b.m[i] = mo;
                if (kind == ADAMW) b.v[i] = vo;
                if (residual) b.r[i] = hp[10] * (u - dw); /* residual_decay; 1 is exact */
                b.p[i] = p_new;
                if (pbf) pbf[i] = to_bf16(p_new);
            }
        }
        chunk_e[k] = e;
        chunk_c[k] = c;
    }
}

/* Block rule, pass 1: squared L2 norm of u_total for blocks [k0, k1); writes nothing. */
static inline __attribute__((always_inline)) void norms(
        const Step *s, int64_t n, int64_t k0, int64_t k1, float *out,
        int kind, int has_m, int nesterov, int residual) {
    float hp[10];
    memcpy(hp, s->hp, sizeof hp);
    const Bufs b = {s->p, s->g, s->m, s->v, s->r};
    const int64_t bs = s->block_size;
    for (int64_t blk = k0; blk < k1; blk++) {
        int64_t start = blk * bs, stop = start + bs < n ? start + bs : n;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = start; i < stop; i++) {
            float mo, vo, eta;
            float u = candidate(b, hp, i, kind, has_m, nesterov, residual, &mo, &vo, &eta);
            acc += u * u;
        }
        out[blk] = acc;
    }
}

/* One instantiation per (kind, momentum, nesterov, residual[, rule, alpha mode]): every loop
 * is free of branches on these, so it vectorises. CALL(K, M, N, R) returns. */
#define BY_OPTIMIZER(CALL)                                      \
    if (kind == ADAMW) {                                        \
        if (residual) { CALL(ADAMW, 1, 0, 1) } else { CALL(ADAMW, 1, 0, 0) } \
    }                                                           \
    if (!has_m) {                                               \
        if (residual) { CALL(SGD, 0, 0, 1) } else { CALL(SGD, 0, 0, 0) } \
    }                                                           \
    if (nesterov) {                                             \
        if (residual) { CALL(SGD, 1, 1, 1) } else { CALL(SGD, 1, 1, 0) } \
    }                                                           \
    if (residual) { CALL(SGD, 1, 0, 1) } else { CALL(SGD, 1, 0, 0) }

#define RUN(K, M, N, R, RULE)                                                  \
    if (pow_alpha) run(s, n, k0, k1, chunk_e, chunk_c, K, M, N, R, RULE, 1);   \
    else run(s, n, k0, k1, chunk_e, chunk_c, K, M, N, R, RULE, 0);             \
    return 0;

#define BY_RULE(K, M, N, R)                \
    switch (rule) {                        \
    case DENSE: RUN(K, M, N, R, DENSE)     \
    case TOPK: RUN(K, M, N, R, TOPK)       \
    case HARD: RUN(K, M, N, R, HARD)       \
    case SOFT: RUN(K, M, N, R, SOFT)       \
    case RANDOM: RUN(K, M, N, R, RANDOM)   \
    case BLOCK: RUN(K, M, N, R, BLOCK)     \
    }                                      \
    return 1;

#define NORMS(K, M, N, R) norms(s, n, k0, k1, out, K, M, N, R); return 0;

/* The dispatchers stay out of the OpenMP regions below: GCC outlines a region before inlining,
 * so a loop written inside one would lose its constant rule and flags and not vectorise. */
static __attribute__((noinline)) int step_chunks(
        const Step *s, int64_t n, int64_t k0, int64_t k1, float *chunk_e, int32_t *chunk_c,
        int kind, int has_m, int nesterov, int residual, int rule) {
    const int pow_alpha = s->alpha != 1.0f && s->alpha != 0.0f;
    BY_OPTIMIZER(BY_RULE)
}

static __attribute__((noinline)) int norm_blocks(
        const Step *s, int64_t n, int64_t k0, int64_t k1, float *out,
        int kind, int has_m, int nesterov, int residual) {
    BY_OPTIMIZER(NORMS)
}

/* Items [0, count) split into equal contiguous ranges, one per thread. */
#ifdef _OPENMP
#define FOR_THREAD_RANGES(count, threads, k0, k1, BODY)                         \
    _Pragma("omp parallel num_threads(threads) if (threads > 1)")              \
    {                                                                           \
        int64_t t_ = omp_get_thread_num(), nt_ = omp_get_num_threads();         \
        int64_t k0 = (count) * t_ / nt_, k1 = (count) * (t_ + 1) / nt_;         \
        BODY;                                                                   \
    }
#else
#define FOR_THREAD_RANGES(count, threads, k0, k1, BODY) \
    {                                                    \
        int64_t k0 = 0, k1 = (count);                    \
        BODY;                                            \
    }
#endif

/* Run fn over chunks [0, ceil(n / SUB)) split across threads, then sum the chunks' energy and
 * count in index order (independent of the thread count). */
typedef void (*ChunkFn)(const void *ctx, int64_t k0, int64_t k1, float *chunk_e, int32_t *chunk_c);

static int reduce_chunks(ChunkFn fn, const void *ctx, int64_t n, int threads, float alpha,
                         double *energy, int64_t *changed) {
    const int64_t nchunks = (n + SUB - 1) / SUB;
    float *chunk_e = malloc(sizeof(float) * (nchunks + 1));
    int32_t *chunk_c = malloc(sizeof(int32_t) * (nchunks + 1));
    if (!chunk_e || !chunk_c) {
        free(chunk_e);
        free(chunk_c);
        return 2;
    }
    FOR_THREAD_RANGES(nchunks, threads, k0, k1, fn(ctx, k0, k1, chunk_e, chunk_c))
    double e_total = 0.0;
    int64_t c_total = 0;
    for (int64_t k = 0; k < nchunks; k++) {
        e_total += (double)chunk_e[k];
        c_total += chunk_c[k];
    }
    free(chunk_e);
    free(chunk_c);
    *energy = alpha == 0.0f ? (double)c_total : e_total;  /* alpha 0: the count */
    *changed = c_total;
    return 0;
}

typedef struct {
    const Step *s;
    int64_t n;
    int kind, has_m, nesterov, residual, rule;
} StepCall;

static void step_call(const void *ctx, int64_t k0, int64_t k1, float *chunk_e, int32_t *chunk_c) {
    const StepCall *c = ctx;
    step_chunks(c->s, c->n, k0, k1, chunk_e, chunk_c, c->kind, c->has_m, c->nesterov,
                       c->residual, c->rule);
}

int masked_step(const Step *s, int64_t n, int kind, int has_m, int nesterov, int residual,
                int rule, double *energy, int64_t *changed) {
    if (rule < DENSE || rule > BLOCK) return 1;
    const StepCall call = {s, n, kind, has_m, nesterov, residual, rule};
    return reduce_chunks(step_call, &call, n, s->threads, s->alpha, energy, changed);
}

int block_sq_norms(const Step *s, int64_t n, int kind, int has_m, int nesterov, int residual,
                   float *out) {
    const int64_t nblocks = (n + s->block_size - 1) / s->block_size;
    const int threads = s->threads;
    FOR_THREAD_RANGES(nblocks, threads, k0, k1,
        norm_blocks(s, n, k0, k1, out, kind, has_m, nesterov, residual))
    return 0;
}

/* top-k rule: |u_total| at k sampled positions (idx ascending); writes nothing. One loop over
 * all buffers lets the CPU overlap the cache misses that five separate gathers would serialise. */
static inline __attribute__((always_inline)) void sample(
        const Step *s, const int64_t *idx, int64_t k, float *out,
        int kind, int has_m, int nesterov, int residual) {
    float hp[10];
    memcpy(hp, s->hp, sizeof hp);
    const Bufs b = {s->p, s->g, s->m, s->v, s->r};
    for (int64_t j = 0; j < k; j++) {
        float mo, vo, eta;
        out[j] = fabsf(candidate(b, hp, idx[j], kind, has_m, nesterov, residual, &mo, &vo, &eta));
    }
}

#define SAMPLE(K, M, N, R) sample(s, idx, k, out, K, M, N, R); return 0;

int sample_abs_u(const Step *s, const int64_t *idx, int64_t k, int kind, int has_m, int nesterov,
                 int residual, float *out) {
    BY_OPTIMIZER(SAMPLE)
}

/* The ledger's measure of a step it did not make: sum |a - b|^alpha and the count of a != b,
 * in one pass that writes nothing (a = weights after the step, b = the snapshot before). */
static __attribute__((noinline)) void diff_chunks(
        const float *restrict a, const float *restrict b, int64_t n, float alpha, int pow_alpha,
        int64_t k0, int64_t k1, float *chunk_e, int32_t *chunk_c) {
    for (int64_t k = k0; k < k1; k++) {
        int64_t start = k * SUB, stop = start + SUB < n ? start + SUB : n;
        float e = 0.0f;
        int32_t c = 0;
        if (pow_alpha) {
            for (int64_t i = start; i < stop; i++) {
                float d = a[i] - b[i];
                e += d != 0.0f ? powf(fabsf(d), alpha) : 0.0f;
                c += d != 0.0f;
            }
        } else {
#pragma omp simd reduction(+ : e, c)
            for (int64_t i = start; i < stop; i++) {
                float d = a[i] - b[i];
                e += fabsf(d);
                c += d != 0.0f;
            }
        }
        chunk_e[k] = e;
        chunk_c[k] = c;
    }
}

typedef struct {
    const float *a, *b;
    int64_t n;
    float alpha;
} DiffCall;

static void diff_call(const void *ctx, int64_t k0, int64_t k1, float *chunk_e, int32_t *chunk_c) {
    const DiffCall *c = ctx;
    diff_chunks(c->a, c->b, c->n, c->alpha, c->alpha != 1.0f && c->alpha != 0.0f, k0, k1,
                chunk_e, chunk_c);
}

int diff_energy(const float *a, const float *b, int64_t n, float alpha, int threads,
                double *energy, int64_t *changed) {
    const DiffCall call = {a, b, n, alpha};
    return reduce_chunks(diff_call, &call, n, threads, alpha, energy, changed);
}
