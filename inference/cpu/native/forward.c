/* A forward pass of a Llama model over any mix of tokens, from the GGUF's own blocks, in one call.
 *
 * Used by inference/cpu/native_forward.py (see there for why, and docs/cpu-paths.md for what was measured). A pass carries
 * tokens of several "segments": a segment is one row of a KV cache (a decoding row of the running batch, or a prompt
 * being prefilled into a cache of its own). Each token writes its key and value at its column of its segment and
 * attends to the columns [start, column] of that segment, so decoding rows (one token each) and prompt chunks (many
 * consecutive tokens, causal among themselves) ride the same matmuls. Every token's arithmetic is the same whatever
 * else the pass carries (integer dot products, float32 sums in a fixed order): a row gets the same bits alone, in a
 * batch, or with its prompt split into chunks.
 *
 * The linear layers and the head are matmul.h's integer kernels over the Q4_1 / Q8_0 blocks; norms, rotary
 * embedding, attention and the residual stream are float32; keys and values are read from and written to the
 * caller's cache, bf16 or float32 (the model's dtype). The whole pass is one OpenMP parallel region: matrix products,
 * attention and the per-token vector work are split across the threads, which meet at spin barriers (sync_threads).
 *
 * Built by native_forward.py with the system C compiler (-O3 -march=<the CPU_ISA in force> -fopenmp): AVX2, FMA and
 * F16C, and AVX-512 VNNI's dot product where the CPU has it.
 */
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "matmul.h"

#define TILE 64 /* tokens per tile of a matrix product: their activations stay in L2 while a group's weights are in L1 */

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, inter, threads;
    float rope_scaling, attn_scale;
    const float *inv_freq; /* head_dim / 2 */
    const void *embedding; /* (vocab, hidden), bf16 or float32 (embedding_f32) */
    const float *final_norm;
    float final_eps;
    const float **norm1, **norm2; /* (hidden) per layer */
    const float *eps1, *eps2;
    const uint8_t **qkv, **o, **gate_up, **down; /* Q4_1 blocks in groups of 8 rows (see gemv_q4_1) */
    const uint8_t *head; /* the output head's Q8_0 blocks in groups of 8 rows (see gemv_q8_0), or NULL */
    int vocab;
    int embedding_f32, cache_f32;
} native_model;

typedef struct {
    native_model m;
    int capacity; /* tokens the scratch below has room for */
    float *x, *xn, *qkv, *att, *act, *cos_, *sin_; /* per token */
    block_q8_1 *xq;
} native_ctx;

static void split(int n, int ith, int nth, int *first, int *last) {
    const int per = (n + nth - 1) / nth;
    *first = ith * per < n ? ith * per : n;
    *last = *first + per < n ? *first + per : n;
}

static void rms_norm(const float *x, const float *weight, float eps, float *out, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    const float scale = 1.0f / sqrtf(sum / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

/* transformers' rotate_half form: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves */
static void rotate(float *v, const float *cos_, const float *sin_, int half) {
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_[i] - b * sin_[i];
        v[i + half] = b * cos_[i] + a * sin_[i];
    }
}

/* A barrier that spins (then yields): OpenMP's own barriers sleep on a futex once the process holds more OpenMP
 * threads than CPUs (libgomp's throttled spinning; e.g. a second thread that ran torch code), and a pass has ~300
 * of them: measured ~7 ms a step that way. Only the pass's own threads wait here, for each other. */
typedef struct {
    atomic_int count, generation;
} spin_barrier;

static void sync_threads(spin_barrier *b, int nth) {
    if (nth == 1) return;
    const int generation = atomic_load_explicit(&b->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->generation, 1, memory_order_acq_rel);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&b->generation, memory_order_acquire) == generation; spins++) {
        if (spins < 20000) {
            _mm_pause();
        } else {
            sched_yield();
        }
    }
}

static void free_scratch(native_ctx *ctx) {
    free(ctx->x); free(ctx->xn); free(ctx->qkv); free(ctx->att); free(ctx->act); free(ctx->xq);
    free(ctx->cos_); free(ctx->sin_);
    ctx->x = ctx->xn = ctx->qkv = ctx->att = ctx->act = ctx->cos_ = ctx->sin_ = NULL;
    ctx->xq = NULL;
    ctx->capacity = 0;
}

/* Room for `tokens` tokens in the scratch buffers (grown, never shrunk); 0, or -1 without memory. */
static int reserve_scratch(native_ctx *ctx, int tokens) {
    if (tokens <= ctx->capacity) return 0;
    free_scratch(ctx);
    const native_model *m = &ctx->m;
    const size_t n = (size_t)tokens, h = m->hidden, qkv = (size_t)(m->heads + 2 * m->kv_heads) * m->head_dim;
    const size_t widest = 2 * (size_t)m->inter > qkv ? 2 * (size_t)m->inter : qkv;
    const size_t longest = (size_t)m->inter > h ? (size_t)m->inter : h;
    ctx->x = malloc(sizeof(float) * n * h);
    ctx->xn = malloc(sizeof(float) * n * h);
    ctx->qkv = malloc(sizeof(float) * n * widest);
    ctx->att = malloc(sizeof(float) * n * m->heads * m->head_dim);
    ctx->act = malloc(sizeof(float) * n * m->inter);
    ctx->cos_ = malloc(sizeof(float) * n * m->head_dim);
    ctx->sin_ = malloc(sizeof(float) * n * m->head_dim);
    ctx->xq = malloc(sizeof(block_q8_1) * n * (longest / QK));
    if (!ctx->x || !ctx->xn || !ctx->qkv || !ctx->att || !ctx->act || !ctx->xq || !ctx->cos_ || !ctx->sin_) {
        free_scratch(ctx);
        return -1;
    }
    ctx->capacity = tokens;
    return 0;
}

void native_free(native_ctx *ctx) {
    if (!ctx) return;
    free_scratch(ctx);
    free(ctx);
}

native_ctx *native_new(const native_model *model) {
    native_ctx *ctx = calloc(1, sizeof(native_ctx));
    if (!ctx) return NULL;
    ctx->m = *model;
    if (reserve_scratch(ctx, 32)) {
        native_free(ctx);
        return NULL;
    }
    return ctx;
}

static inline void store_kv(void *base, size_t i, float v, const int f32) {
    if (f32) {
        ((float *)base)[i] = v;
    } else {
        ((uint16_t *)base)[i] = f32_to_bf16(v);
    }
}

static inline __m256 load8(const void *base, size_t i, const int f32) { /* 8 keys or values as float32 */
    if (f32) return _mm256_loadu_ps((const float *)base + i);
    const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static inline float sum8(__m256 v) { /* in a fixed order: the same bits on every build */
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* `heads` (1-3) query heads q[h * hd] against keys [first, last]: score[h * ld + t] = q_h . k_t * scale. One load
 * of each key serves every query head of its group (grouped-query attention); four keys at a time, so twelve
 * independent sums hide the multiply-add latency. */
static inline __attribute__((always_inline)) void group_scores(const float *q, const void *kb, int first, int last,
                                                               int hd, float scale, float *score, int ld,
                                                               const int heads, const int f32) {
    int t = first;
    for (; t + 3 <= last; t += 4) {
        __m256 acc[3][4];
        for (int h = 0; h < heads; h++)
            for (int j = 0; j < 4; j++) acc[h][j] = _mm256_setzero_ps();
        for (int c = 0; c < hd; c += 8) {
            __m256 k[4];
            for (int j = 0; j < 4; j++) k[j] = load8(kb, (size_t)(t + j) * hd + c, f32);
            for (int h = 0; h < heads; h++) {
                const __m256 qh = _mm256_loadu_ps(q + h * hd + c);
                for (int j = 0; j < 4; j++) acc[h][j] = _mm256_fmadd_ps(qh, k[j], acc[h][j]);
            }
        }
        for (int h = 0; h < heads; h++)
            for (int j = 0; j < 4; j++) score[h * ld + t + j] = sum8(acc[h][j]) * scale;
    }
    for (; t <= last; t++) {
        __m256 acc[3];
        for (int h = 0; h < heads; h++) acc[h] = _mm256_setzero_ps();
        for (int c = 0; c < hd; c += 8) {
            const __m256 k = load8(kb, (size_t)t * hd + c, f32);
            for (int h = 0; h < heads; h++) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * hd + c), k, acc[h]);
        }
        for (int h = 0; h < heads; h++) score[h * ld + t] = sum8(acc[h]) * scale;
    }
}

/* o[h * hd] = sum_t p[h * ld + t] v_t for `heads` (1-3) heads: one load of each value serves them all; 32 dimensions
 * at a time (twelve independent sums). */
static inline __attribute__((always_inline)) void group_values(const float *p, const void *vb, int first, int last,
                                                               int hd, int ld, float *o, const int heads,
                                                               const int f32) {
    int c = 0;
    for (; c + 32 <= hd; c += 32) {
        __m256 acc[3][4];
        for (int h = 0; h < heads; h++)
            for (int j = 0; j < 4; j++) acc[h][j] = _mm256_setzero_ps();
        for (int t = first; t <= last; t++) {
            __m256 v[4];
            for (int j = 0; j < 4; j++) v[j] = load8(vb, (size_t)t * hd + c + 8 * j, f32);
            for (int h = 0; h < heads; h++) {
                const __m256 ph = _mm256_broadcast_ss(p + h * ld + t);
                for (int j = 0; j < 4; j++) acc[h][j] = _mm256_fmadd_ps(ph, v[j], acc[h][j]);
            }
        }
        for (int h = 0; h < heads; h++)
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(o + h * hd + c + 8 * j, acc[h][j]);
    }
    for (; c < hd; c += 8) {
        __m256 acc[3];
        for (int h = 0; h < heads; h++) acc[h] = _mm256_setzero_ps();
        for (int t = first; t <= last; t++) {
            const __m256 v = load8(vb, (size_t)t * hd + c, f32);
            for (int h = 0; h < heads; h++) acc[h] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + h * ld + t), v, acc[h]);
        }
        for (int h = 0; h < heads; h++) _mm256_storeu_ps(o + h * hd + c, acc[h]);
    }
}

#define FOR_HEADS(call, count)  \
    switch (count) {            \
        case 1: call(1); break; \
        case 2: call(2); break; \
        default: call(3); break; \
    }

/* The `groups` query heads that share one key/value head, over the columns [first, last] of that head's cache:
 * softmax(q k / sqrt(d)) v into o (head h at o + h * hd). score: (groups, ld) scratch, ld > last. hd: a multiple of
 * 8 (native_forward.py checks). */
static void attend(const float *q, const void *kb, const void *vb, int first, int last, int hd, int groups,
                   float scale, float *score, int ld, float *o, const int f32) {
    for (int h0 = 0; h0 < groups; h0 += 3) {
        const int heads = groups - h0 < 3 ? groups - h0 : 3;
#define SCORES(n)                                                                                         \
    if (f32) group_scores(q + h0 * hd, kb, first, last, hd, scale, score + h0 * ld, ld, n, 1);          \
    else group_scores(q + h0 * hd, kb, first, last, hd, scale, score + h0 * ld, ld, n, 0)
        FOR_HEADS(SCORES, heads)
#undef SCORES
    }
    for (int h = 0; h < groups; h++) { /* softmax, each head's row */
        float *row = score + h * ld, top = -INFINITY, total = 0.0f;
        for (int t = first; t <= last; t++) top = fmaxf(top, row[t]);
#pragma omp simd reduction(+ : total)
        for (int t = first; t <= last; t++) {
            row[t] = fast_expf(row[t] - top);
            total += row[t];
        }
        const float inverse = 1.0f / total;
#pragma omp simd
        for (int t = first; t <= last; t++) row[t] *= inverse;
    }
    for (int h0 = 0; h0 < groups; h0 += 3) {
        const int heads = groups - h0 < 3 ? groups - h0 : 3;
#define VALUES(n)                                                                                   \
    if (f32) group_values(score + h0 * ld, vb, first, last, hd, ld, o + h0 * hd, n, 1);           \
    else group_values(score + h0 * ld, vb, first, last, hd, ld, o + h0 * hd, n, 0)
        FOR_HEADS(VALUES, heads)
#undef VALUES
    }
}

/* y (n, outputs) = x (n, blocks of 32) by a Q4_1 matrix (or the head's Q8_0 one), the work split over the threads by
 * groups of 8 outputs, tile by tile of tokens. */
static void matmul(const uint8_t *w, int outputs, int blocks, const block_q8_1 *x, int n, float *y, int ith, int nth,
                   int q8_0) {
    int first, last;
    split(outputs / GROUP, ith, nth, &first, &last);
    for (int t0 = 0; t0 < n; t0 += TILE) {
        const int rows = n - t0 < TILE ? n - t0 : TILE;
        if (q8_0) {
            gemv_q8_0(w, outputs, blocks, x + (size_t)t0 * blocks, rows, y + (size_t)t0 * outputs, first, last);
        } else {
            gemv_q4_1(w, outputs, blocks, x + (size_t)t0 * blocks, rows, y + (size_t)t0 * outputs, first, last);
        }
    }
}

/* One pass over `n` tokens.
 * tokens, positions, segment, column, start: (n). Token t belongs to segment s = segment[t]: it writes its key and
 * value at column[t] and attends to the columns [start[t], column[t]] of that segment (the columns before it are
 * left padding, or another segment's). Segment s's cache in layer l: keys[s * layers + l], values[...] point at its
 * row, laid out (kv_heads, capacity[s * layers + l], head_dim), bf16 or float32 (cache_f32).
 * out_rows (n_out): the tokens whose output is wanted. out: with a head, float32 logits (n_out, vocab); without,
 * float32 (n_out, hidden): the final norm of each such token's hidden state (the head's input).
 * Returns 0, or -1 for bad arguments (nothing written) or no memory. */
int native_forward(native_ctx *ctx, int n, const int64_t *tokens, const int64_t *positions, const int32_t *segment,
                   const int64_t *column, const int64_t *start, int segments, void **keys, void **values,
                   const int64_t *capacity, int n_out, const int32_t *out_rows, float *out) {
    const native_model *m = &ctx->m;
    const int L = m->layers;
    if (n < 1 || segments < 1 || n_out < 0 || n_out > n || m->head_dim % 8) return -1;
    int64_t columns = 1;
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= m->vocab || segment[t] < 0 || segment[t] >= segments) return -1;
        if (start[t] < 0 || start[t] > column[t]) return -1;
        for (int l = 0; l < L; l++) {
            if (column[t] >= capacity[(size_t)segment[t] * L + l]) return -1;
        }
        if (column[t] + 1 > columns) columns = column[t] + 1;
    }
    for (int i = 0; i < n_out; i++) {
        if (out_rows[i] < 0 || out_rows[i] >= n) return -1;
    }
    if (reserve_scratch(ctx, n)) return -1;
    const int H = m->hidden, hd = m->head_dim, half = hd / 2, nq = m->heads, nkv = m->kv_heads;
    const int groups = nq / nkv, qkv_out = (nq + 2 * nkv) * hd, I = m->inter, f32 = m->cache_f32;
    float *scores = malloc(sizeof(float) * (size_t)columns * groups * m->threads);
    if (!scores) return -1;

    spin_barrier barrier = {0, 0};
#pragma omp parallel num_threads(m->threads)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        float *score = scores + (size_t)ith * columns * groups;
        int first, last;
        split(n, ith, nth, &first, &last);
        for (int t = first; t < last; t++) { /* embedding, rotary tables, the first norm */
            float *x = ctx->x + (size_t)t * H;
            if (m->embedding_f32) {
                memcpy(x, (const float *)m->embedding + (size_t)tokens[t] * H, sizeof(float) * H);
            } else {
                const uint16_t *e = (const uint16_t *)m->embedding + (size_t)tokens[t] * H;
                for (int i = 0; i < H; i++) x[i] = bf16_to_f32(e[i]);
            }
            for (int i = 0; i < half; i++) {
                const float angle = (float)positions[t] * m->inv_freq[i];
                ctx->cos_[(size_t)t * half + i] = cosf(angle) * m->rope_scaling;
                ctx->sin_[(size_t)t * half + i] = sinf(angle) * m->rope_scaling;
            }
            rms_norm(x, m->norm1[0], m->eps1[0], ctx->xn + (size_t)t * H, H);
            quantize_q8_1(ctx->xn + (size_t)t * H, ctx->xq + (size_t)t * (H / QK), H);
        }
        sync_threads(&barrier, nth);
        for (int l = 0; l < L; l++) {
            matmul(m->qkv[l], qkv_out, H / QK, ctx->xq, n, ctx->qkv, ith, nth, 0);
            sync_threads(&barrier, nth);
            split(n, ith, nth, &first, &last);
            for (int t = first; t < last; t++) { /* rotary on queries and keys; the new key and value into the cache */
                float *q = ctx->qkv + (size_t)t * qkv_out;
                for (int h = 0; h < nq + nkv; h++) rotate(q + h * hd, ctx->cos_ + (size_t)t * half, ctx->sin_ + (size_t)t * half, half);
                const size_t s = (size_t)segment[t] * L + l;
                for (int h = 0; h < nkv; h++) {
                    const size_t at = ((size_t)h * capacity[s] + column[t]) * hd;
                    const float *k = q + (nq + h) * hd, *v = q + (nq + nkv + h) * hd;
                    for (int i = 0; i < hd; i++) {
                        store_kv(keys[s], at + i, k[i], f32);
                        store_kv(values[s], at + i, v[i], f32);
                    }
                }
            }
            sync_threads(&barrier, nth);
            split(n * nkv, ith, nth, &first, &last); /* each token's query heads, by the key/value head they share */
            for (int tk = first; tk < last; tk++) {
                const int t = tk / nkv, kvh = tk % nkv;
                const size_t s = (size_t)segment[t] * L + l, head = (size_t)kvh * capacity[s] * hd;
                const float *q = ctx->qkv + (size_t)t * qkv_out + kvh * groups * hd;
                float *o = ctx->att + (size_t)t * nq * hd + kvh * groups * hd;
                if (f32) {
                    attend(q, (const float *)keys[s] + head, (const float *)values[s] + head, (int)start[t],
                           (int)column[t], hd, groups, m->attn_scale, score, (int)columns, o, 1);
                } else {
                    attend(q, (const uint16_t *)keys[s] + head, (const uint16_t *)values[s] + head, (int)start[t],
                           (int)column[t], hd, groups, m->attn_scale, score, (int)columns, o, 0);
                }
            }
            sync_threads(&barrier, nth);
            split(n * (nq * hd / QK), ith, nth, &first, &last); /* the attention output's blocks, quantised */
            for (int k = first; k < last; k++) {
                const int t = k / (nq * hd / QK), b = k % (nq * hd / QK);
                quantize_q8_1(ctx->att + (size_t)t * nq * hd + b * QK, ctx->xq + (size_t)t * (nq * hd / QK) + b, QK);
            }
            sync_threads(&barrier, nth);
            matmul(m->o[l], H, nq * hd / QK, ctx->xq, n, ctx->xn, ith, nth, 0);
            sync_threads(&barrier, nth);
            split(n, ith, nth, &first, &last);
            for (int t = first; t < last; t++) {
                float *x = ctx->x + (size_t)t * H, *xn = ctx->xn + (size_t)t * H;
                for (int i = 0; i < H; i++) x[i] += xn[i];
                rms_norm(x, m->norm2[l], m->eps2[l], xn, H);
                quantize_q8_1(xn, ctx->xq + (size_t)t * (H / QK), H);
            }
            sync_threads(&barrier, nth);
            matmul(m->gate_up[l], 2 * I, H / QK, ctx->xq, n, ctx->qkv, ith, nth, 0);
            sync_threads(&barrier, nth);
            split(n * (I / QK), ith, nth, &first, &last); /* silu(gate) * up, block by block, quantised */
            for (int k = first; k < last; k++) {
                const int t = k / (I / QK), b = k % (I / QK);
                const float *g = ctx->qkv + (size_t)t * 2 * I + b * QK, *u = g + I;
                float *a = ctx->act + (size_t)t * I + b * QK;
#pragma omp simd
                for (int i = 0; i < QK; i++) a[i] = g[i] / (1.0f + fast_expf(-g[i])) * u[i];
                quantize_q8_1(a, ctx->xq + (size_t)t * (I / QK) + b, QK);
            }
            sync_threads(&barrier, nth);
            matmul(m->down[l], H, I / QK, ctx->xq, n, ctx->xn, ith, nth, 0);
            sync_threads(&barrier, nth);
            if (l + 1 < L) { /* the residual, and the next layer's input norm */
                split(n, ith, nth, &first, &last);
                for (int t = first; t < last; t++) {
                    float *x = ctx->x + (size_t)t * H, *xn = ctx->xn + (size_t)t * H;
                    for (int i = 0; i < H; i++) x[i] += xn[i];
                    rms_norm(x, m->norm1[l + 1], m->eps1[l + 1], xn, H);
                    quantize_q8_1(xn, ctx->xq + (size_t)t * (H / QK), H);
                }
                sync_threads(&barrier, nth);
            }
        }
        split(n_out, ith, nth, &first, &last);
        for (int i = first; i < last; i++) { /* the last residual and the final norm, for the wanted tokens only */
            const int t = out_rows[i];
            float *x = ctx->x + (size_t)t * H, *xn = ctx->xn + (size_t)t * H;
            for (int j = 0; j < H; j++) x[j] += xn[j];
            if (m->head) {
                float normed[H];
                rms_norm(x, m->final_norm, m->final_eps, normed, H);
                quantize_q8_1(normed, ctx->xq + (size_t)i * (H / QK), H);
            } else {
                rms_norm(x, m->final_norm, m->final_eps, out + (size_t)i * H, H);
            }
        }
        sync_threads(&barrier, nth);
        if (m->head && n_out) matmul(m->head, m->vocab, H / QK, ctx->xq, n_out, out, ith, nth, 1);
    }
    free(scores);
    return 0;
}
