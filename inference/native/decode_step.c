/* One decoding step of a Llama model for up to 32 rows, from the GGUF's own blocks, in one call.
 *
 * Used by inference/native_step.py (see there for why and what was measured). The linear layers and the head are
 * matmul.h's integer kernels over the Q4_1 / Q8_0 blocks; norms, rotary embedding, attention and the residual
 * stream are float32; keys and values are read from and written to the caller's bf16 cache. The whole step is one
 * OpenMP parallel region: the matrix products and attention are split across the threads, the small vector work
 * between them runs on one thread, and the threads meet at spin barriers (sync_threads).
 *
 * Built by native_step.py with the system C compiler (-O3 -march=native -fopenmp): AVX2, FMA and F16C, and
 * AVX-512 VNNI's dot product where the CPU has it.
 */
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "matmul.h"

#define MAX_ROWS 32


typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, inter, threads;
    float rope_scaling, attn_scale;
    const float *inv_freq; /* head_dim / 2 */
    const uint16_t *embedding; /* bf16 (vocab, hidden) */
    const uint16_t *final_norm;
    float final_eps;
    const uint16_t **norm1, **norm2; /* bf16 (hidden) per layer */
    const float *eps1, *eps2;
    const uint8_t **qkv, **o, **gate_up, **down; /* Q4_1 blocks in groups of 8 rows (see gemv_q4_1) */
    const uint8_t *head; /* the output head's Q8_0 blocks in groups of 8 rows (see gemv_q8_0), or NULL */
    int vocab;
} native_model;

typedef struct {
    native_model m;
    float *x, *xn, *qkv, *att, *gu, *act, *cos_, *sin_; /* per row */
    block_q8_1 *xq;
} native_ctx;

static void split(int n, int ith, int nth, int *first, int *last) {
    const int per = (n + nth - 1) / nth;
    *first = ith * per < n ? ith * per : n;
    *last = *first + per < n ? *first + per : n;
}

static void rms_norm(const float *x, const uint16_t *weight, float eps, float *out, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    const float scale = 1.0f / sqrtf(sum / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * bf16_to_f32(weight[i]);
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
 * threads than CPUs (libgomp's throttled spinning; e.g. a second thread that ran torch code), and a step has ~300
 * of them: measured ~7 ms a step that way. Only the step's own threads wait here, for each other. */
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

void native_free(native_ctx *ctx);

native_ctx *native_new(const native_model *model) {
    native_ctx *ctx = calloc(1, sizeof(native_ctx));
    if (!ctx) return NULL;
    ctx->m = *model;
    const int h = model->hidden, qkv = (model->heads + 2 * model->kv_heads) * model->head_dim;
    const int widest = 2 * model->inter > qkv ? 2 * model->inter : qkv;
    ctx->x = malloc(sizeof(float) * MAX_ROWS * h);
    ctx->xn = malloc(sizeof(float) * MAX_ROWS * h);
    ctx->qkv = malloc(sizeof(float) * MAX_ROWS * widest);
    ctx->att = malloc(sizeof(float) * MAX_ROWS * model->heads * model->head_dim);
    ctx->gu = ctx->qkv;
    ctx->act = malloc(sizeof(float) * MAX_ROWS * model->inter);
    ctx->cos_ = malloc(sizeof(float) * MAX_ROWS * model->head_dim);
    ctx->sin_ = malloc(sizeof(float) * MAX_ROWS * model->head_dim);
    const int longest = model->inter > h ? model->inter : h;
    ctx->xq = malloc(sizeof(block_q8_1) * MAX_ROWS * (longest / QK));
    if (!ctx->x || !ctx->xn || !ctx->qkv || !ctx->att || !ctx->act || !ctx->xq || !ctx->cos_ || !ctx->sin_) {
        native_free(ctx);
        return NULL;
    }
    return ctx;
}

void native_free(native_ctx *ctx) {
    if (!ctx) return;
    free(ctx->x); free(ctx->xn); free(ctx->qkv); free(ctx->att); free(ctx->act); free(ctx->xq);
    free(ctx->cos_); free(ctx->sin_);
    free(ctx);
}

/* One token for each of `rows` rows.
 * tokens, positions: (rows). Layer l's keys and values: bf16 buffers (rows, kv_heads, capacity[l], head_dim) at
 * keys[l], values[l]; each holds `length` columns, the new token's key and value are written at column `length`.
 * Row r attends to columns [starts[r], length] (the columns before starts[r] are its left padding).
 * out: with a head, float32 logits (rows, vocab); without, bf16 (rows, hidden): the final norm of each row's last
 * hidden state (the head's input).
 * Returns 0, or -1 for bad arguments. */
int native_step(native_ctx *ctx, int rows, const int64_t *tokens, const int64_t *positions, uint16_t **keys,
                uint16_t **values, const int64_t *capacity, int64_t length, const int64_t *starts, void *out) {
    const native_model *m = &ctx->m;
    if (rows < 1 || rows > MAX_ROWS || length < 0) return -1;
    for (int r = 0; r < rows; r++) {
        if (tokens[r] < 0 || tokens[r] >= m->vocab || starts[r] < 0 || starts[r] > length) return -1;
    }
    for (int l = 0; l < m->layers; l++) {
        if (capacity[l] <= length) return -1;
    }
    const int H = m->hidden, hd = m->head_dim, half = hd / 2, nq = m->heads, nkv = m->kv_heads;
    const int groups = nq / nkv, qkv_out = (nq + 2 * nkv) * hd, I = m->inter;
    for (int r = 0; r < rows; r++) {
        const uint16_t *e = m->embedding + (size_t)tokens[r] * H;
        for (int i = 0; i < H; i++) ctx->x[r * H + i] = bf16_to_f32(e[i]);
        for (int i = 0; i < half; i++) {
            const float angle = (float)positions[r] * m->inv_freq[i];
            ctx->cos_[r * half + i] = cosf(angle) * m->rope_scaling;
            ctx->sin_[r * half + i] = sinf(angle) * m->rope_scaling;
        }
    }
    const int columns = (int)length + 1;
    float *scores = malloc(sizeof(float) * (size_t)columns * m->threads * 1);
    if (!scores) return -1;

    spin_barrier barrier = {0, 0};
#pragma omp parallel num_threads(m->threads)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        float *score = scores + (size_t)ith * columns;
        int first, last;
        if (ith == 0) {
            for (int r = 0; r < rows; r++) {
                rms_norm(ctx->x + r * H, m->norm1[0], m->eps1[0], ctx->xn + r * H, H);
                quantize_q8_1(ctx->xn + r * H, ctx->xq + r * (H / QK), H);
            }
        }
        sync_threads(&barrier, nth);
        for (int l = 0; l < m->layers; l++) {
            split(qkv_out / GROUP, ith, nth, &first, &last);
            gemv_q4_1(m->qkv[l], qkv_out, H / QK, ctx->xq, rows, ctx->qkv, first, last);
            sync_threads(&barrier, nth);
            if (ith == 0) {
                for (int r = 0; r < rows; r++) { /* rotary on queries and keys; the new key and value into the cache */
                    float *q = ctx->qkv + (size_t)r * qkv_out;
                    for (int h = 0; h < nq + nkv; h++) rotate(q + h * hd, ctx->cos_ + r * half, ctx->sin_ + r * half, half);
                    for (int h = 0; h < nkv; h++) {
                        const size_t at = (((size_t)r * nkv + h) * capacity[l] + length) * hd;
                        const float *k = q + (nq + h) * hd, *v = q + (nq + nkv + h) * hd;
                        for (int i = 0; i < hd; i++) {
                            keys[l][at + i] = f32_to_bf16(k[i]);
                            values[l][at + i] = f32_to_bf16(v[i]);
                        }
                    }
                }
            }
            sync_threads(&barrier, nth);
            split(rows * nq, ith, nth, &first, &last);
            for (int rh = first; rh < last; rh++) {
                const int r = rh / nq, h = rh % nq, kvh = h / groups;
                const float *q = ctx->qkv + (size_t)r * qkv_out + h * hd;
                const uint16_t *kb = keys[l] + ((size_t)r * nkv + kvh) * capacity[l] * hd;
                const uint16_t *vb = values[l] + ((size_t)r * nkv + kvh) * capacity[l] * hd;
                float top = -INFINITY;
                for (int t = (int)starts[r]; t < columns; t++) {
                    float dot = 0.0f;
                    const uint16_t *k = kb + (size_t)t * hd;
#pragma omp simd reduction(+ : dot)
                    for (int i = 0; i < hd; i++) dot += q[i] * bf16_to_f32(k[i]);
                    score[t] = dot * m->attn_scale;
                    top = fmaxf(top, score[t]);
                }
                float total = 0.0f;
#pragma omp simd reduction(+ : total)
                for (int t = (int)starts[r]; t < columns; t++) {
                    score[t] = fast_expf(score[t] - top);
                    total += score[t];
                }
                float *o = ctx->att + (size_t)r * nq * hd + h * hd;
                for (int i = 0; i < hd; i++) o[i] = 0.0f;
                for (int t = (int)starts[r]; t < columns; t++) {
                    const float p = score[t] / total;
                    const uint16_t *v = vb + (size_t)t * hd;
#pragma omp simd
                    for (int i = 0; i < hd; i++) o[i] += p * bf16_to_f32(v[i]);
                }
            }
            sync_threads(&barrier, nth);
            split(rows * (nq * hd / QK), ith, nth, &first, &last); /* the attention output's blocks, quantised */
            for (int k = first; k < last; k++) {
                const int r = k / (nq * hd / QK), b = k % (nq * hd / QK);
                quantize_q8_1(ctx->att + (size_t)r * nq * hd + b * QK, ctx->xq + r * (nq * hd / QK) + b, QK);
            }
            sync_threads(&barrier, nth);
            split(H / GROUP, ith, nth, &first, &last);
            gemv_q4_1(m->o[l], H, nq * hd / QK, ctx->xq, rows, ctx->xn, first, last);
            sync_threads(&barrier, nth);
            if (ith == 0) {
                for (int r = 0; r < rows; r++) {
                    float *x = ctx->x + r * H, *xn = ctx->xn + r * H;
                    for (int i = 0; i < H; i++) x[i] += xn[i];
                    rms_norm(x, m->norm2[l], m->eps2[l], xn, H);
                    quantize_q8_1(xn, ctx->xq + r * (H / QK), H);
                }
            }
            sync_threads(&barrier, nth);
            split(2 * I / GROUP, ith, nth, &first, &last);
            gemv_q4_1(m->gate_up[l], 2 * I, H / QK, ctx->xq, rows, ctx->gu, first, last);
            sync_threads(&barrier, nth);
            split(rows * (I / QK), ith, nth, &first, &last); /* silu(gate) * up, block by block, quantised */
            for (int k = first; k < last; k++) {
                const int r = k / (I / QK), b = k % (I / QK);
                const float *g = ctx->gu + (size_t)r * 2 * I + b * QK, *u = g + I;
                float *a = ctx->act + (size_t)r * I + b * QK;
#pragma omp simd
                for (int i = 0; i < QK; i++) a[i] = g[i] / (1.0f + fast_expf(-g[i])) * u[i];
                quantize_q8_1(a, ctx->xq + r * (I / QK) + b, QK);
            }
            sync_threads(&barrier, nth);
            split(H / GROUP, ith, nth, &first, &last);
            gemv_q4_1(m->down[l], H, I / QK, ctx->xq, rows, ctx->xn, first, last);
            sync_threads(&barrier, nth);
            if (ith == 0) { /* the residual, and the next layer's input norm (or the final one) */
                const int next = l + 1 < m->layers;
                for (int r = 0; r < rows; r++) {
                    float *x = ctx->x + r * H, *xn = ctx->xn + r * H;
                    for (int i = 0; i < H; i++) x[i] += xn[i];
                    if (next) {
                        rms_norm(x, m->norm1[l + 1], m->eps1[l + 1], xn, H);
                        quantize_q8_1(xn, ctx->xq + r * (H / QK), H);
                    } else {
                        rms_norm(x, m->final_norm, m->final_eps, xn, H);
                        if (m->head) {
                            quantize_q8_1(xn, ctx->xq + r * (H / QK), H);
                        } else {
                            for (int i = 0; i < H; i++) ((uint16_t *)out)[r * H + i] = f32_to_bf16(xn[i]);
                        }
                    }
                }
            }
            sync_threads(&barrier, nth);
        }
        if (m->head) {
            split(m->vocab / GROUP, ith, nth, &first, &last);
            gemv_q8_0(m->head, m->vocab, H / QK, ctx->xq, rows, (float *)out, first, last);
        }
    }
    free(scores);
    return 0;
}
