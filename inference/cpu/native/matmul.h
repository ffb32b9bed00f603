/* The matrix-vector kernels of decode_step.c over the GGUF's blocks, and the small conversions they share.
 *
 * Activations are quantised per block of 32 to 8 bits (scale d, sum s: ggml's Q8_1); a Q4_1 weight block (w = d*q + m)
 * or a Q8_0 one (w = d*q) is multiplied by them in integers, as llama.cpp does for this file. The weights come
 * regrouped 8 output rows at a time (native_forward.py `interleave`, `interleave_q8_0`), so one AVX2 dot-product
 * instruction against 4 broadcast activations advances 8 rows at once and no horizontal sums are needed.
 */
#ifndef NATIVE_MATMUL_H
#define NATIVE_MATMUL_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(__AVX2__) || !defined(__F16C__) || !defined(__FMA__)
#error "the native decoding step needs AVX2, FMA and F16C (native_forward.py checks the CPU before building it)"
#endif

#define QK 32
#define CHUNK 8 /* rows multiplied together: their accumulators stay in registers */

typedef struct {
    float d, s; /* scale, and d * sum(qs) */
    int32_t sum; /* sum(qs) */
    int8_t qs[QK];
} block_q8_1;

static inline float bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* e^x to ~2 ulp (Cephes' expf polynomial), inlined so loops over it vectorise (glibc's expf is a call per value:
 * the MLP's activation took ~0.3 ms a step that way). */
static inline float fast_expf(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    const float n = nearbyintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static void quantize_q8_1(const float *x, block_q8_1 *y, int n) {
    for (int b = 0; b < n / QK; b++) {
        const float *v = x + b * QK;
        float amax = 0.0f;
#pragma omp simd reduction(max : amax)
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < QK; j++) {
            const int q = (int)nearbyintf(v[j] * id);
            y[b].qs[j] = (int8_t)q;
            sum += q;
        }
        y[b].d = d;
        y[b].s = d * (float)sum;
        y[b].sum = sum;
    }
}

/* The weights come repacked by groups of 8 output rows (native_forward.py `interleave`): for each block of 32 inputs a
 * group holds the 8 rows' fp16 scales d, their fp16 minimums m, then 4 chunks of 32 bytes; byte 4j+i of chunk c holds
 * row j's code 8c+i in its low nibble and 8c+4+i in its high nibble. So one vector holds 4 codes of each of the 8 rows
 * and a dot-product instruction against 4 broadcast activations sums them per row: no horizontal sums, 8 rows at once. */
#define GROUP 8
#define GROUP_BYTES (GROUP * 20)
#define HEAD_GROUP_BYTES (GROUP * 34)

static inline __m256i dot_acc(__m256i acc, __m256i u, __m256i s) { /* acc + 4-product sums of u8 x s8, per int32 */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* acc + the 4-product sums of signed codes stored + 128 (u) by activations (s), per int32: VNNI takes u as it is
 * and the caller takes off 128 * sum(s) (head_offset); AVX2's maddubs would overflow int16 on 255 * 127 * 2, so
 * there the codes get their sign back and the products are |w| * (sign(w) s), as ggml does. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HEAD_OFFSET 1
static inline __m256i head_dot(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#else
#define HEAD_OFFSET 0
static inline __m256i head_dot(__m256i acc, __m256i u, __m256i s) {
    const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8((char)0x80));
    const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(products, _mm256_set1_epi16(1)));
}
#endif

/* The head's Q8_0 blocks (w = d*q, q signed) in groups of 8 rows: per block the 8 fp16 scales, then 8 chunks of 32
 * bytes, byte 4j+i of chunk k row j's code 4k+i stored as q + 128 (unsigned for the dot instruction; the 128 * sum(x)
 * it adds is taken off). One group g: its 8 logits for each of `rows` rows. */
/* One group g of 8 outputs: y[r][8g..8g+7] for each of `rows` rows, from Q4_1 blocks (`q4_1`: + the minimums)
 * or the head's Q8_0 ones. Both flags are constants where it is called, so each case compiles to its own loop. */
static inline __attribute__((always_inline)) void group_kernel(const uint8_t *w, int outputs, int blocks,
                                                               const block_q8_1 *x, const int rows, float *y, int g,
                                                               const int q4_1) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    const int bytes = q4_1 ? GROUP_BYTES : HEAD_GROUP_BYTES;
    const uint8_t *group = w + (size_t)g * blocks * bytes;
    __m256 acc[CHUNK];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        const uint8_t *p = group + (size_t)b * bytes;
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        const __m256 mw = q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16))) : _mm256_setzero_ps();
        __m256i codes[8];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            if (q4_1) {
                const __m256i chunk = _mm256_loadu_si256((const __m256i *)(p + 32 + 32 * c));
                codes[2 * c] = _mm256_and_si256(chunk, low);
                codes[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(chunk, 4), low);
            } else {
                codes[2 * c] = _mm256_loadu_si256((const __m256i *)(p + 16 + 64 * c));
                codes[2 * c + 1] = _mm256_loadu_si256((const __m256i *)(p + 48 + 64 * c));
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            const block_q8_1 *xb = x + (size_t)r * blocks + b;
            const int32_t *xq = (const int32_t *)xb->qs;
            __m256i s0 = _mm256_set1_epi32(!q4_1 && HEAD_OFFSET ? -128 * xb->sum : 0), s1 = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int k = 0; k < 8; k += 2) {
                const __m256i x0 = _mm256_set1_epi32(xq[k]), x1 = _mm256_set1_epi32(xq[k + 1]);
                s0 = q4_1 ? dot_acc(s0, codes[k], x0) : head_dot(s0, codes[k], x0);
                s1 = q4_1 ? dot_acc(s1, codes[k + 1], x1) : head_dot(s1, codes[k + 1], x1);
            }
            const __m256 sums = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xb->d)), sums, acc[r]);
            if (q4_1) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xb->s), acc[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) _mm256_storeu_ps(y + (size_t)r * outputs + g * GROUP, acc[r]);
}

#define q4_1_group(w, outputs, blocks, x, rows, y, g) group_kernel(w, outputs, blocks, x, rows, y, g, 1)
#define q8_0_group(w, outputs, blocks, x, rows, y, g) group_kernel(w, outputs, blocks, x, rows, y, g, 0)

/* For each group of 8 outputs in [first, last), its rows CHUNK by CHUNK (a group's blocks stay in L1 between
 * chunks, so the weights are read once), calling `kernel` with the chunk's row count as a constant: each kernel is
 * compiled once per count, its accumulators in registers. */
#define FOR_EACH_GROUP_AND_CHUNK(kernel)                                                                        \
    for (int g = first; g < last; g++) {                                                                        \
        for (int r0 = 0; r0 < rows; r0 += CHUNK) {                                                              \
            const block_q8_1 *xc = x + (size_t)r0 * blocks;                                                     \
            float *yc = y + (size_t)r0 * outputs;                                                               \
            switch (rows - r0 < CHUNK ? rows - r0 : CHUNK) {                                                    \
                case 1: kernel(w, outputs, blocks, xc, 1, yc, g); break;                                        \
                case 2: kernel(w, outputs, blocks, xc, 2, yc, g); break;                                        \
                case 3: kernel(w, outputs, blocks, xc, 3, yc, g); break;                                        \
                case 4: kernel(w, outputs, blocks, xc, 4, yc, g); break;                                        \
                case 5: kernel(w, outputs, blocks, xc, 5, yc, g); break;                                        \
                case 6: kernel(w, outputs, blocks, xc, 6, yc, g); break;                                        \
                case 7: kernel(w, outputs, blocks, xc, 7, yc, g); break;                                        \
                default: kernel(w, outputs, blocks, xc, 8, yc, g); break;                                       \
            }                                                                                                   \
        }                                                                                                       \
    }

/* y[r][o] = sum_b d_w d_x[r] (q_w . q_x[r]) + m_w s_x[r], for the groups of 8 outputs [first, last). */
static void gemv_q4_1(const uint8_t *w, int outputs, int blocks, const block_q8_1 *x, int rows, float *y, int first,
                      int last) {
    FOR_EACH_GROUP_AND_CHUNK(q4_1_group)
}

/* y[r][o] = sum_b d_w d_x[r] (q_w . q_x[r]), the head's logits, for the groups of 8 outputs [first, last). */
static void gemv_q8_0(const uint8_t *w, int outputs, int blocks, const block_q8_1 *x, int rows, float *y, int first,
                      int last) {
    FOR_EACH_GROUP_AND_CHUNK(q8_0_group)
}

#endif
