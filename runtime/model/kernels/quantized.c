/* Block-quantized matrix kernels: dense and neuron-sparse, 1..B activation rows.
 *
 * Weight rows are sequences of 32-element blocks along the input dimension, in ggml's layouts:
 *   Q8_0: fp16 d, int8 q[32]                        (34 bytes)  w = d * q
 *   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles       (20 bytes)  w = d * q + m, q in 0..15;
 *         byte i holds element i (low nibble) and element i + 16 (high nibble).
 * Activations are quantized once per call to XBlock (fp32 d, s = d * sum(q), int8 q[32]), so a weight
 * block's dot product is one integer multiply-add of 32 pairs:
 *   Q8_0 . x = d_w d_x sum(q_w q_x)          Q4_1 . x = d_w d_x sum(q_w q_x) + m_w s_x
 *
 * Paths: AVX2 (+FMA, F16C) when the compiler targets it (this file is built on the machine that runs it,
 * with -march=native), AVX-512 (F, BW, VL and VNNI) on top of it, and a portable scalar one; pinfer_set_isa()
 * selects between the compiled paths (tests compare them). The AVX-512 path computes the block dot products
 * two blocks to a register with VNNI's one-instruction multiply-add of bytes (the rest is AVX2's): its sums are
 * AVX2's bit for bit; for a batch it reads the activation rows from a layout packed once per call (xpack_build),
 * 8 rows to a weight row's pass. The scalar path differs from them only in the order of float sums.
 *
 * FFN neurons are neuron-major: row j of the gate, up and down matrices (each d/32 blocks; down_j = column j of
 * W_down) belong to neuron j; gate/up share one format and down has its own. y_r += a_j(x_r) * down_j over the
 * listed neurons; threads split the list and each sums into its own buffer, reduced at the end.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "activation.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif
#if HAVE_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
#endif

/* Float expressions as written (no a*b+c fused by the compiler) where two functions must give the same sums. */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif

enum { FMT_Q8_0 = 0, FMT_Q4_1 = 1 };
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
#define QK 32
#define TILE 4  /* activation rows sharing one unpacked weight block */
#define PTILE 8 /* the same from packed rows (AVX-512: twice the registers) */

typedef struct { float d, s; int8_t q[QK]; } XBlock;
/* Activation rows packed for a batch (AVX-512 path; see xpack_build); q NULL: none. */
typedef struct { uint8_t *q; float *d; int64_t npair; } XPack;

#define BEST_ISA (HAVE_AVX512 ? ISA_AVX512 : HAVE_AVX2 ? ISA_AVX2 : ISA_SCALAR)
static int g_isa = BEST_ISA;

int pinfer_best_isa(void) { return BEST_ISA; }
int pinfer_set_isa(int isa) {
    if (isa < 0 || isa > pinfer_best_isa()) return -1;
    g_isa = isa;
    return 0;
}
int pinfer_xblock_bytes(void) { return (int)sizeof(XBlock); }
int pinfer_block_bytes(int fmt) { return fmt == FMT_Q8_0 ? 34 : fmt == FMT_Q4_1 ? 20 : -1; }

static inline float fp16_to_f32(uint16_t h) {
#if HAVE_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {                                          /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float half_at(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return fp16_to_f32(h); }

/* One block of 32 activations -> 8-bit levels with d = amax / 127, rounded half to even (as rintf). */
static void quantize_block_scalar(const float *v, XBlock *out) {
    float amax = 0.f;
    for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(v[i]));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int i = 0; i < QK; i++) {
        const int q = (int)rintf(v[i] * inv);
        out->q[i] = (int8_t)q;
        sum += q;
    }
    out->d = d;
    out->s = d * (float)sum;
}

#if HAVE_AVX2
static void quantize_block_avx2(const float *v, XBlock *out) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(v));
    for (int i = 8; i < QK; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    const __m256 vi = _mm256_set1_ps(inv);
    __m256i q32[4];
    for (int i = 0; i < 4; i++)
        q32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * i), vi),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i q16a = _mm256_packs_epi32(q32[0], q32[1]), q16b = _mm256_packs_epi32(q32[2], q32[3]);
    _mm256_storeu_si256((__m256i *)out->q, _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b),
                                                                        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(q32[0], q32[1]), _mm256_add_epi32(q32[2], q32[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    out->d = d;
    out->s = d * (float)_mm_cvtsi128_si32(s4);
}
#endif

/* x [n_rows, k] fp32 -> xq [n_rows, k/32] blocks; k % 32 == 0. */
void pinfer_quantize_x(const float *x, int64_t n_rows, int64_t k, XBlock *xq) {
    const int64_t n = n_rows * (k / QK);
#if HAVE_AVX2
    if (g_isa >= ISA_AVX2) {
        for (int64_t b = 0; b < n; b++) quantize_block_avx2(x + b * QK, xq + b);
        return;
    }
#endif
    for (int64_t b = 0; b < n; b++) quantize_block_scalar(x + b * QK, xq + b);
}

/* ---- dot products of one weight row with nr (<= TILE) activation rows ------------------------------ */

static void dot_rows_scalar(const uint8_t *w, int fmt, int64_t nb, const XBlock *const *x, int nr, float *out) {
    for (int r = 0; r < nr; r++) out[r] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        if (fmt == FMT_Q8_0) {
            const uint8_t *blk = w + b * 34;
            const float d = half_at(blk);
            const int8_t *q = (const int8_t *)(blk + 2);
            for (int r = 0; r < nr; r++) {
                const XBlock *xb = x[r] + b;
                int s = 0;
                for (int i = 0; i < QK; i++) s += q[i] * xb->q[i];
                out[r] += d * xb->d * (float)s;
            }
        } else {
            const uint8_t *blk = w + b * 20;
            const float d = half_at(blk), m = half_at(blk + 2);
            const uint8_t *q = blk + 4;
            for (int r = 0; r < nr; r++) {
                const XBlock *xb = x[r] + b;
                int s = 0;
                for (int i = 0; i < QK / 2; i++) s += (q[i] & 0xF) * xb->q[i] + (q[i] >> 4) * xb->q[i + 16];
                out[r] += d * xb->d * (float)s + m * xb->s;
            }
        }
    }
}

#if HAVE_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* A weight block as the unsigned factor of maddubs: Q8_0 as |q_w| (*sgn = q_w, whose signs go onto the
 * activations), Q4_1 as its levels 0..15 in element order. */
static inline __m256i w_u8(const uint8_t *blk, int q8, __m256i *sgn) {
    if (q8) {
        *sgn = _mm256_loadu_si256((const __m256i *)(blk + 2));
        return _mm256_sign_epi8(*sgn, *sgn);
    }
    const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0xF));
}
/* 8 int32 partial sums of one weight block (w_u8's) with one activation block's levels. */
static inline __m256i x_dot(__m256i wu, __m256i sgn, int q8, const int8_t *xq) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)xq);
    if (q8) xv = _mm256_sign_epi8(xv, sgn);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xv), _mm256_set1_epi16(1));
}
#define ALWAYS_INLINE inline __attribute__((always_inline))
/* Block `bi` (weights at blk) into accumulator chain ACC of each of the nr rows. */
#define ROWS_BLOCK(ACC, blk, bi)                                                                           \
    {                                                                                                      \
        __m256i sgn = _mm256_setzero_si256();                                                              \
        const __m256i wu = w_u8(blk, q8, &sgn);                                                            \
        const float d = half_at(blk);                                                                      \
        for (int r = 0; r < nr; r++) {                                                                     \
            const XBlock *xb = x[r] + (bi);                                                                \
            ACC[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb->d), _mm256_cvtepi32_ps(x_dot(wu, sgn, q8, xb->q)), \
                                     ACC[r]);                                                              \
        }                                                                                                  \
    }

/* One weight row against nr activation rows, nr and fmt constants where inlined (the accumulators stay in
 * registers). Same sums in the same order as dot2 (even blocks in one chain, odd in another, added at the end;
 * Q4_1's minimum terms added a pair at a time), so that a row's result does not depend on the rows batched
 * with it. */
static ALWAYS_INLINE NO_CONTRACT void dot_rows_avx2_n(const uint8_t *w, const int fmt, int64_t nb,
                                                      const XBlock *const *x, const int nr, float *out) {
    const int q8 = fmt == FMT_Q8_0;
    const int64_t bs = q8 ? 34 : 20;
    __m256 even[TILE], odd[TILE];
    float mins[TILE];
    for (int r = 0; r < nr; r++) even[r] = odd[r] = _mm256_setzero_ps(), mins[r] = 0.f;
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *p0 = w + b * bs, *p1 = p0 + bs;
        ROWS_BLOCK(even, p0, b)
        ROWS_BLOCK(odd, p1, b + 1)
        if (!q8)
            for (int r = 0; r < nr; r++) mins[r] += half_at(p0 + 2) * x[r][b].s + half_at(p1 + 2) * x[r][b + 1].s;
    }
    if (b < nb) {
        const uint8_t *p0 = w + b * bs;
        ROWS_BLOCK(even, p0, b)
        if (!q8)
            for (int r = 0; r < nr; r++) mins[r] += half_at(p0 + 2) * x[r][b].s;
    }
    for (int r = 0; r < nr; r++) out[r] = hsum(_mm256_add_ps(even[r], odd[r])) + mins[r];
}

/* Specialized per format and row count (1..TILE). */
#define DISPATCH_ROWS(KERNEL)                                                                              \
    if (fmt == FMT_Q8_0) {                                                                                 \
        switch (nr) {                                                                                      \
        case 1: KERNEL(w, FMT_Q8_0, nb, x, 1, out); break;                                                 \
        case 2: KERNEL(w, FMT_Q8_0, nb, x, 2, out); break;                                                 \
        case 3: KERNEL(w, FMT_Q8_0, nb, x, 3, out); break;                                                 \
        default: KERNEL(w, FMT_Q8_0, nb, x, TILE, out);                                                    \
        }                                                                                                  \
    } else {                                                                                               \
        switch (nr) {                                                                                      \
        case 1: KERNEL(w, FMT_Q4_1, nb, x, 1, out); break;                                                 \
        case 2: KERNEL(w, FMT_Q4_1, nb, x, 2, out); break;                                                 \
        case 3: KERNEL(w, FMT_Q4_1, nb, x, 3, out); break;                                                 \
        default: KERNEL(w, FMT_Q4_1, nb, x, TILE, out);                                                    \
        }                                                                                                  \
    }

static NO_CONTRACT void dot_rows_avx2(const uint8_t *w, int fmt, int64_t nb, const XBlock *const *x, int nr,
                                      float *out) {
    DISPATCH_ROWS(dot_rows_avx2_n)
}
#endif

#if HAVE_AVX2
/* Integer dot products of one block, as 8 int32 partial sums. */
static inline __m256i idot_q8(const uint8_t *blk, const __m256i xq) {
    const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xq, q)),
                             _mm256_set1_epi16(1));
}
static inline __m256i idot_q41(const uint8_t *blk, const __m256i xq) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));
    const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0xF));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), _mm256_set1_epi16(1));
}
#define PREFETCH 2048 /* bytes ahead in each weight stream: DRAM latency outlasts a row's compute (Zen 1: 768 -> 2048 B
                       * took a streamed Q8_0 block from 4.0 to 3.6 ns) */
#define SCALED(blk, xb, p, acc) _mm256_fmadd_ps(_mm256_set1_ps(half_at(blk) * (xb)->d), _mm256_cvtepi32_ps(p), acc)

/* Two weight rows of one format against one activation row; each row keeps two accumulator chains. */
#define DOT2_LOOP(BS, IDOT, MINS)                                                                          \
    for (; b + 1 < nb; b += 2) {                                                                           \
        const XBlock *x0 = x + b, *x1 = x + b + 1;                                                         \
        const __m256i xa = _mm256_loadu_si256((const __m256i *)x0->q);                                    \
        const __m256i xb = _mm256_loadu_si256((const __m256i *)x1->q);                                    \
        const uint8_t *p0 = w0 + b * BS, *p1 = w1 + b * BS;                                                \
        _mm_prefetch((const char *)(p0 + PREFETCH), _MM_HINT_T0);                                          \
        _mm_prefetch((const char *)(p1 + PREFETCH), _MM_HINT_T0);                                          \
        a0 = SCALED(p0, x0, IDOT(p0, xa), a0);                                                             \
        b0 = SCALED(p1, x0, IDOT(p1, xa), b0);                                                             \
        a1 = SCALED(p0 + BS, x1, IDOT(p0 + BS, xb), a1);                                                   \
        b1 = SCALED(p1 + BS, x1, IDOT(p1 + BS, xb), b1);                                                   \
        if (MINS) {                                                                                        \
            m0 += half_at(p0 + 2) * x0->s + half_at(p0 + BS + 2) * x1->s;                                  \
            m1 += half_at(p1 + 2) * x0->s + half_at(p1 + BS + 2) * x1->s;                                  \
        }                                                                                                  \
    }                                                                                                      \
    if (b < nb) {                                                                                          \
        const __m256i xa = _mm256_loadu_si256((const __m256i *)x[b].q);                                   \
        const uint8_t *p0 = w0 + b * BS, *p1 = w1 + b * BS;                                                \
        a0 = SCALED(p0, x + b, IDOT(p0, xa), a0);                                                          \
        b0 = SCALED(p1, x + b, IDOT(p1, xa), b0);                                                          \
        if (MINS) {                                                                                        \
            m0 += half_at(p0 + 2) * x[b].s;                                                                \
            m1 += half_at(p1 + 2) * x[b].s;                                                                \
        }                                                                                                  \
    }
#endif

#if HAVE_AVX512
static inline __m256 lo256(__m512 v) { return _mm512_castps512_ps256(v); }
static inline __m256 hi256(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
/* Two 32-byte runs as one vector (a low, b high). */
static inline __m512i join256(const void *a, const void *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}
/* Weight blocks b and b + 1 as the unsigned factor of VNNI's byte multiply-add: Q8_0 as |q_w| (its signs in *neg,
 * moved onto the activations, as idot_q8 does), Q4_1 as its levels 0..15 in element order. */
static inline __m512i wq8_pair(const uint8_t *blk, __mmask64 *neg) {
    const __m512i q = join256(blk + 2, blk + 34 + 2);
    *neg = _mm512_movepi8_mask(q);
    return _mm512_abs_epi8(q);
}
static inline __m512i wq41_pair(const uint8_t *blk) {
    const __m128i r0 = _mm_loadu_si128((const __m128i *)(blk + 4)), r1 = _mm_loadu_si128((const __m128i *)(blk + 24));
    __m512i v = _mm512_castsi128_si512(r0);
    v = _mm512_inserti32x4(v, _mm_srli_epi16(r0, 4), 1);
    v = _mm512_inserti32x4(v, r1, 2);
    v = _mm512_inserti32x4(v, _mm_srli_epi16(r1, 4), 3);
    return _mm512_and_si512(v, _mm512_set1_epi8(0xF));
}
/* 16 int32 sums of 4 byte products, lanes 0-7 block b's and 8-15 block b + 1's: lane for lane idot_q8/idot_q41's
 * (integer sums, exact either way). xq: the activation levels of the two blocks. */
static inline __m512i idot_pair(__m512i w_u8, __mmask64 neg, __m512i xq) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w_u8, _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq));
}
/* The two blocks' scales d_w d_x, each over its half (the products SCALED forms). */
static inline __m512 scale_pair(const uint8_t *blk, int64_t bs, const XBlock *x) {
    return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(half_at(blk) * x[0].d), _mm512_set1_ps(half_at(blk + bs) * x[1].d));
}
/* DOT2_LOOP's block pairs, two blocks to a register: the low half of a (c) is row 0's (row 1's) even-block chain, the
 * high half its odd-block chain; an odd last block is left to DOT2_LOOP. */
#define DOT2_PAIRS512(BS, Q8, MINS)                                                                       \
    for (; b + 1 < nb; b += 2) {                                                                           \
        const XBlock *x0 = x + b;                                                                          \
        const __m512i xq = join256(x0[0].q, x0[1].q);                                                      \
        const uint8_t *p0 = w0 + b * BS, *p1 = w1 + b * BS;                                                \
        __mmask64 n0 = 0, n1 = 0;                                                                          \
        _mm_prefetch((const char *)(p0 + PREFETCH), _MM_HINT_T0);                                          \
        _mm_prefetch((const char *)(p1 + PREFETCH), _MM_HINT_T0);                                          \
        const __m512i u0 = Q8 ? wq8_pair(p0, &n0) : wq41_pair(p0), u1 = Q8 ? wq8_pair(p1, &n1) : wq41_pair(p1);  \
        a = _mm512_fmadd_ps(scale_pair(p0, BS, x0), _mm512_cvtepi32_ps(idot_pair(u0, n0, xq)), a);          \
        c = _mm512_fmadd_ps(scale_pair(p1, BS, x0), _mm512_cvtepi32_ps(idot_pair(u1, n1, xq)), c);          \
        if (MINS) {                                                                                        \
            m0 += half_at(p0 + 2) * x0[0].s + half_at(p0 + BS + 2) * x0[1].s;                              \
            m1 += half_at(p1 + 2) * x0[0].s + half_at(p1 + BS + 2) * x0[1].s;                              \
        }                                                                                                  \
    }

/* The end of a batched row sum: an odd last block b (if any) joins each row's even chain, then the chains and the
 * Q4_1 minimum terms are added. */
static NO_CONTRACT void finish_rows512(const uint8_t *w, int q8, int64_t bs, int64_t nb, int64_t b,
                                       const XBlock *const *x, int nr, const __m512 *acc, float *mins, float *out) {
    for (int r = 0; r < nr; r++) {
        __m256 even = lo256(acc[r]);
        if (b < nb) {
            const uint8_t *blk = w + b * bs;
            const XBlock *xb = x[r] + b;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)xb->q);
            even = SCALED(blk, xb, q8 ? idot_q8(blk, xq) : idot_q41(blk, xq), even);
            if (!q8) mins[r] += half_at(blk + 2) * xb->s;
        }
        out[r] = hsum(_mm256_add_ps(even, hi256(acc[r]))) + mins[r];
    }
}

/* dot_rows_avx2's sums, two blocks to a register (halves as in DOT2_PAIRS512). */
static NO_CONTRACT void dot_rows_avx512(const uint8_t *w, int fmt, int64_t nb, const XBlock *const *x, int nr,
                                        float *out) {
    const int q8 = fmt == FMT_Q8_0;
    const int64_t bs = q8 ? 34 : 20;
    __m512 acc[TILE];
    float mins[TILE] = {0};
    for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *blk = w + b * bs;
        __mmask64 neg = 0;
        const __m512i u = q8 ? wq8_pair(blk, &neg) : wq41_pair(blk);
        for (int r = 0; r < nr; r++) {
            const XBlock *xb = x[r] + b;
            const __m512i p = idot_pair(u, neg, join256(xb[0].q, xb[1].q));
            acc[r] = _mm512_fmadd_ps(scale_pair(blk, bs, xb), _mm512_cvtepi32_ps(p), acc[r]);
            if (!q8) mins[r] += half_at(blk + 2) * xb[0].s + half_at(blk + bs + 2) * xb[1].s;
        }
    }
    finish_rows512(w, q8, bs, nb, b, x, nr, acc, mins, out);
}

/* Activation rows laid out for many weight rows (a batch): per row, each block pair's levels as one 64-byte run
 * (Q8_0: q + 128, the unsigned factor of VNNI's multiply-add, the weights being the signed one; Q4_1: q as it
 * is) and its scales d as 16 floats (block b's in lanes 0-7, b + 1's in 8-15). Built once per call, it leaves
 * a weight pair's per-row work at one load, one multiply-add, one conversion and two float products. Returns 0,
 * or -1 (pk left empty: callers take the unpacked path) when memory cannot be allocated. */
static int xpack_build(const XBlock *xq, int n_rows, int64_t nb, int fmt, XPack *pk) {
    const int64_t np = nb / 2, n = (int64_t)n_rows * np;
    pk->npair = np;
    pk->q = aligned_alloc(64, (size_t)(n > 0 ? n : 1) * 64);
    pk->d = aligned_alloc(64, (size_t)(n > 0 ? n : 1) * 64);
    if (!pk->q || !pk->d) { free(pk->q), free(pk->d), pk->q = NULL, pk->d = NULL; return -1; }
    const __m512i flip = _mm512_set1_epi8(fmt == FMT_Q8_0 ? (char)0x80 : 0);
    for (int r = 0; r < n_rows; r++)
        for (int64_t p = 0; p < np; p++) {
            const XBlock *xb = xq + (int64_t)r * nb + 2 * p;
            const int64_t o = (int64_t)r * np + p;
            _mm512_store_si512(pk->q + o * 64, _mm512_xor_si512(join256(xb[0].q, xb[1].q), flip));
            _mm512_store_ps(pk->d + o * 16, _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xb[0].d), _mm512_set1_ps(xb[1].d)));
        }
    return 0;
}

/* dot_rows_avx512's sums from packed rows pk (rows r0..r0 + nr - 1), bit for bit: the integer sums are the same
 * (Q8_0: sum((q_x + 128) q_w) - 128 sum(q_w), the correction taken once per weight pair), and each block's scale
 * is the same product d_w d_x. */
static ALWAYS_INLINE NO_CONTRACT void dot_rows_packed_n(const uint8_t *w, const int fmt, int64_t nb, const XBlock *const *x,
                                                        const XPack *pk, int r0, const int nr, float *out) {
    const int q8 = fmt == FMT_Q8_0;
    const int64_t bs = q8 ? 34 : 20, np = pk->npair;
    const uint8_t *xq[PTILE];
    const float *xd[PTILE];
    __m512 acc[PTILE];
    float mins[PTILE] = {0};
    for (int r = 0; r < nr; r++) {
        acc[r] = _mm512_setzero_ps();
        xq[r] = pk->q + (int64_t)(r0 + r) * np * 64;
        xd[r] = pk->d + (int64_t)(r0 + r) * np * 16;
    }
    int64_t b = 0;
    for (int64_t p = 0; p < np; p++, b += 2) {
        const uint8_t *blk = w + b * bs;
        __m512i wv, init = _mm512_setzero_si512();
        if (q8) {
            wv = join256(blk + 2, blk + bs + 2);
            init = _mm512_sub_epi32(init, _mm512_dpbusd_epi32(init, _mm512_set1_epi8((char)0x80), wv));
        } else {
            wv = wq41_pair(blk);
        }
        const __m512 wd = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(half_at(blk)), _mm512_set1_ps(half_at(blk + bs)));
        const float m0 = q8 ? 0.f : half_at(blk + 2), m1 = q8 ? 0.f : half_at(blk + bs + 2);
        for (int r = 0; r < nr; r++) {
            const __m512i xv = _mm512_load_si512(xq[r] + p * 64);
            const __m512i s = q8 ? _mm512_dpbusd_epi32(init, xv, wv) : _mm512_dpbusd_epi32(init, wv, xv);
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(wd, _mm512_load_ps(xd[r] + p * 16)), _mm512_cvtepi32_ps(s), acc[r]);
            if (!q8) mins[r] += m0 * x[r][b].s + m1 * x[r][b + 1].s;
        }
    }
    finish_rows512(w, q8, bs, nb, b, x, nr, acc, mins, out);
}

/* A whole tile with its row count a constant (the accumulators stay in registers), a partial one as it comes. */
static NO_CONTRACT void dot_rows_packed(const uint8_t *w, int fmt, int64_t nb, const XBlock *const *x, const XPack *pk,
                                        int r0, int nr, float *out) {
    if (nr == PTILE && fmt == FMT_Q8_0) dot_rows_packed_n(w, FMT_Q8_0, nb, x, pk, r0, PTILE, out);
    else if (nr == PTILE) dot_rows_packed_n(w, FMT_Q4_1, nb, x, pk, r0, PTILE, out);
    else dot_rows_packed_n(w, fmt, nb, x, pk, r0, nr, out);
}

#endif

/* Two weight rows against one activation row (decode): independent accumulator chains hide FMA latency. */
static NO_CONTRACT void dot2(const uint8_t *w0, const uint8_t *w1, int fmt, int64_t nb, const XBlock *x,
                             float *o0, float *o1) {
#if HAVE_AVX2
    if (g_isa >= ISA_AVX2) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        float m0 = 0.f, m1 = 0.f;
        int64_t b = 0;
#if HAVE_AVX512
        if (g_isa == ISA_AVX512) {
            __m512 a = _mm512_setzero_ps(), c = a;
            if (fmt == FMT_Q8_0) {
                DOT2_PAIRS512(34, 1, 0)
            } else {
                DOT2_PAIRS512(20, 0, 1)
            }
            a0 = lo256(a), a1 = hi256(a), b0 = lo256(c), b1 = hi256(c);
        }
#endif
        if (fmt == FMT_Q8_0) {
            DOT2_LOOP(34, idot_q8, 0)
        } else {
            DOT2_LOOP(20, idot_q41, 1)
        }
        *o0 = hsum(_mm256_add_ps(a0, a1)) + m0;
        *o1 = hsum(_mm256_add_ps(b0, b1)) + m1;
        return;
    }
#endif
    dot_rows_scalar(w0, fmt, nb, &x, 1, o0);
    dot_rows_scalar(w1, fmt, nb, &x, 1, o1);
}

static inline void dot_rows(const uint8_t *w, int fmt, int64_t nb, const XBlock *const *x, int nr, float *out) {
#if HAVE_AVX2
    if (g_isa == ISA_AVX2) { dot_rows_avx2(w, fmt, nb, x, nr, out); return; }
#endif
#if HAVE_AVX512
    if (g_isa == ISA_AVX512) { dot_rows_avx512(w, fmt, nb, x, nr, out); return; }
#endif
    dot_rows_scalar(w, fmt, nb, x, nr, out);
}

static void xpack_free(XPack *pk) { free(pk->q), free(pk->d), pk->q = NULL, pk->d = NULL; }

/* The packed layout of n_rows activation rows when the batched kernel uses one (AVX-512, more than one row);
 * otherwise, or without memory for it, none (pk->q NULL) and the rows are read as they are. */
static XPack xpack_for(const XBlock *xq, int n_rows, int64_t nb, int fmt) {
    XPack pk = {NULL, NULL, 0};
#if HAVE_AVX512
    if (g_isa == ISA_AVX512 && n_rows > 1) xpack_build(xq, n_rows, nb, fmt, &pk);
#else
    (void)xq, (void)n_rows, (void)nb, (void)fmt;
#endif
    return pk;
}

/* Activation rows a weight row's pass reads at once. */
static inline int tile_of(const XPack *pk) { return pk->q ? PTILE : TILE; }

/* Weight row w against activation rows r0..r0 + nr - 1 of xq [n_rows, nb] (nr <= tile_of(pk)), from pk when
 * packed. */
static inline void dot_tile(const uint8_t *w, int fmt, int64_t nb, const XBlock *xq, const XPack *pk, int r0, int nr,
                            float *out) {
    const XBlock *xs[PTILE];
    for (int r = 0; r < nr; r++) xs[r] = xq + (int64_t)(r0 + r) * nb;
#if HAVE_AVX512
    if (pk->q) { dot_rows_packed(w, fmt, nb, xs, pk, r0, nr, out); return; }
#endif
    dot_rows(w, fmt, nb, xs, nr, out);
}

/* ---- y += a * row (dequantized), one row of k values ---------------------------------------------- */

#if HAVE_AVX2
/* Quarter i of a Q8_0 block (weights 8i..8i+7) as floats (a sign-extending load: no shuffles). */
static inline __m256 q8_quarter(const uint8_t *blk, int i) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * i))));
}
#endif
#if HAVE_AVX512
/* Half i of a Q8_0 block (weights 16i..16i+15) as floats. The AVX-512 additions below are the AVX2 ones 16
 * elements to an instruction: each element's fused multiply-adds are the same, so are the sums. */
static inline __m512 q8_half(const uint8_t *blk, int i) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2 + 16 * i))));
}
#endif

static void axpy_row(const uint8_t *w, int fmt, int64_t nb, float a, float *y) {
#if HAVE_AVX512
    if (g_isa == ISA_AVX512 && fmt == FMT_Q8_0) {
        for (int64_t b = 0; b < nb; b++, y += QK) {
            const uint8_t *blk = w + b * 34;
            const __m512 ad = _mm512_set1_ps(a * half_at(blk));
            _mm512_storeu_ps(y, _mm512_fmadd_ps(ad, q8_half(blk, 0), _mm512_loadu_ps(y)));
            _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(ad, q8_half(blk, 1), _mm512_loadu_ps(y + 16)));
        }
        return;
    }
#endif
#if HAVE_AVX2
    if (g_isa >= ISA_AVX2) {
        for (int64_t b = 0; b < nb; b++, y += QK) {
            __m256 v[4];
            if (fmt == FMT_Q8_0) {
                const uint8_t *blk = w + b * 34;
                const __m256 ad = _mm256_set1_ps(a * half_at(blk));
                for (int i = 0; i < 4; i++) v[i] = _mm256_fmadd_ps(ad, q8_quarter(blk, i), _mm256_loadu_ps(y + 8 * i));
            } else {
                const uint8_t *blk = w + b * 20;
                const __m256 ad = _mm256_set1_ps(a * half_at(blk)), am = _mm256_set1_ps(a * half_at(blk + 2));
                const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));
                const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0xF));
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0xF));
                const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
                for (int i = 0; i < 4; i++) {
                    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
                    v[i] = _mm256_add_ps(_mm256_fmadd_ps(ad, q, _mm256_loadu_ps(y + 8 * i)), am);
                }
            }
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(y + 8 * i, v[i]);
        }
        return;
    }
#endif
    for (int64_t b = 0; b < nb; b++, y += QK) {
        if (fmt == FMT_Q8_0) {
            const uint8_t *blk = w + b * 34;
            const float ad = a * half_at(blk);
            const int8_t *q = (const int8_t *)(blk + 2);
            for (int i = 0; i < QK; i++) y[i] += ad * (float)q[i];
        } else {
            const uint8_t *blk = w + b * 20;
            const float ad = a * half_at(blk), am = a * half_at(blk + 2);
            const uint8_t *q = blk + 4;
            for (int i = 0; i < QK / 2; i++) {
                y[i] += ad * (float)(q[i] & 0xF) + am;
                y[i + 16] += ad * (float)(q[i] >> 4) + am;
            }
        }
    }
}

static int clamp_threads(int n_threads, int64_t work, int64_t min_per_thread) {
    int64_t t = n_threads < 1 ? 1 : n_threads;
    if (t > work / min_per_thread) t = work / min_per_thread;
    return t < 1 ? 1 : (int)t;
}

static inline uint16_t bf16_of(float f) {           /* round to nearest even (weights are finite) */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* out [n, k] = the rows idx (all rows when idx is NULL) of a matrix with row stride ld_w bytes, dequantized: fp32,
 * or bfloat16 (rounded to nearest even) when bf16. k may be a block-aligned part of a row (w then points at its
 * first block). Returns 0, or -1 when a per-thread buffer cannot be allocated. */
int pinfer_dequantize_rows(const uint8_t *w, int fmt, int64_t ld_w, int64_t k, const int64_t *idx, int64_t n,
                           void *out, int bf16, int n_threads) {
    const int T = clamp_threads(n_threads, n, 16);
    int failed = 0;
#pragma omp parallel num_threads(T) if (T > 1) reduction(| : failed)
    {
        float *tmp = bf16 ? malloc(sizeof(float) * k) : NULL;
        failed = bf16 && !tmp;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            if (failed) continue;
            float *o = bf16 ? tmp : (float *)out + i * k;
            memset(o, 0, k * sizeof(float));
            axpy_row(w + (idx ? idx[i] : i) * ld_w, fmt, k / QK, 1.f, o);
            if (bf16) {
                uint16_t *ob = (uint16_t *)out + i * k;
                for (int64_t j = 0; j < k; j++) ob[j] = bf16_of(tmp[j]);
            }
        }
        free(tmp);
    }
    return failed ? -1 : 0;
}

/* y[r, i] = W_{rows[i]} . x_r for i < n (rows = idx, or 0..n-1 when idx is NULL); W rows ld_w bytes apart,
 * k inputs each; xq [n_rows, k/32]; y row stride ld_y floats. */
void pinfer_gemv(const uint8_t *w, int fmt, int64_t ld_w, int64_t k, const int64_t *idx, int64_t n,
                 const XBlock *xq, int n_rows, float *y, int64_t ld_y, int n_threads) {
    const int64_t nb = k / QK;
    const int T = clamp_threads(n_threads, n, 64);
    if (n_rows == 1) {                                  /* decode: two weight rows at a time */
        const int64_t pairs = (n + 1) / 2;
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
        for (int64_t p = 0; p < pairs; p++) {
            const int64_t i = 2 * p, i1 = i + 1 < n ? i + 1 : i;
            float o0, o1;
            dot2(w + (idx ? idx[i] : i) * ld_w, w + (idx ? idx[i1] : i1) * ld_w, fmt, nb, xq, &o0, &o1);
            y[i] = o0;
            y[i1] = o1;
        }
        return;
    }
    XPack pk = xpack_for(xq, n_rows, nb, fmt);
    const int tile = tile_of(&pk);
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = w + (idx ? idx[i] : i) * ld_w;
        for (int r0 = 0; r0 < n_rows; r0 += tile) {
            const int nr = n_rows - r0 < tile ? n_rows - r0 : tile;
            float out[PTILE];
            dot_tile(row, fmt, nb, xq, &pk, r0, nr, out);
            for (int r = 0; r < nr; r++) y[(int64_t)(r0 + r) * ld_y + i] = out[r];
        }
    }
    xpack_free(&pk);
}

/* Ask for the cache lines of [p, p + bytes): neurons picked by a mask are scattered, so the hardware
 * prefetchers cannot guess the next one. */
static inline void prefetch_span(const uint8_t *p, int64_t bytes) {
#if HAVE_AVX2
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(p + o), _MM_HINT_T0);
#else
    (void)p, (void)bytes;
#endif
}

/* y += sum over n neurons of a[t] * down[t] (rows of nb blocks): y stays in registers across a group. */
#define GROUP 16
static void axpy_group(const uint8_t *const *down, const float *a, int n, int fmt, int64_t nb, float *y) {
#if HAVE_AVX512
    if (g_isa == ISA_AVX512 && fmt == FMT_Q8_0) {         /* two blocks at a time: four independent chains */
        int64_t b = 0;
        for (; b + 1 < nb; b += 2) {
            float *yb = y + b * QK;
            __m512 v0 = _mm512_loadu_ps(yb), v1 = _mm512_loadu_ps(yb + 16), v2 = _mm512_loadu_ps(yb + 32),
                   v3 = _mm512_loadu_ps(yb + 48);
            for (int t = 0; t < n; t++) {
                const uint8_t *blk = down[t] + b * 34;
                const __m512 a0 = _mm512_set1_ps(a[t] * half_at(blk)), a1 = _mm512_set1_ps(a[t] * half_at(blk + 34));
                v0 = _mm512_fmadd_ps(a0, q8_half(blk, 0), v0);
                v1 = _mm512_fmadd_ps(a0, q8_half(blk, 1), v1);
                v2 = _mm512_fmadd_ps(a1, q8_half(blk + 34, 0), v2);
                v3 = _mm512_fmadd_ps(a1, q8_half(blk + 34, 1), v3);
            }
            _mm512_storeu_ps(yb, v0);
            _mm512_storeu_ps(yb + 16, v1);
            _mm512_storeu_ps(yb + 32, v2);
            _mm512_storeu_ps(yb + 48, v3);
        }
        for (; b < nb; b++) {
            float *yb = y + b * QK;
            __m512 v0 = _mm512_loadu_ps(yb), v1 = _mm512_loadu_ps(yb + 16);
            for (int t = 0; t < n; t++) {
                const uint8_t *blk = down[t] + b * 34;
                const __m512 a0 = _mm512_set1_ps(a[t] * half_at(blk));
                v0 = _mm512_fmadd_ps(a0, q8_half(blk, 0), v0);
                v1 = _mm512_fmadd_ps(a0, q8_half(blk, 1), v1);
            }
            _mm512_storeu_ps(yb, v0);
            _mm512_storeu_ps(yb + 16, v1);
        }
        return;
    }
#endif
#if HAVE_AVX2
    if (g_isa >= ISA_AVX2 && fmt == FMT_Q8_0) {
        for (int64_t b = 0; b < nb; b++) {
            float *yb = y + b * QK;
            __m256 v0 = _mm256_loadu_ps(yb), v1 = _mm256_loadu_ps(yb + 8), v2 = _mm256_loadu_ps(yb + 16),
                   v3 = _mm256_loadu_ps(yb + 24);
            for (int t = 0; t < n; t++) {
                const uint8_t *blk = down[t] + b * 34;
                const __m256 ad = _mm256_set1_ps(a[t] * half_at(blk));
                v0 = _mm256_fmadd_ps(ad, q8_quarter(blk, 0), v0);
                v1 = _mm256_fmadd_ps(ad, q8_quarter(blk, 1), v1);
                v2 = _mm256_fmadd_ps(ad, q8_quarter(blk, 2), v2);
                v3 = _mm256_fmadd_ps(ad, q8_quarter(blk, 3), v3);
            }
            _mm256_storeu_ps(yb, v0);
            _mm256_storeu_ps(yb + 8, v1);
            _mm256_storeu_ps(yb + 16, v2);
            _mm256_storeu_ps(yb + 24, v3);
        }
        return;
    }
#endif
    for (int t = 0; t < n; t++) axpy_row(down[t], fmt, nb, a[t], y);
}

/* Prefetch rows ids[t] (t in [from, from + 2), < n) of a matrix of consecutive ld-byte rows, skipping rows
 * that follow the one before (the hardware prefetchers stream those). */
static inline void prefetch_rows_ahead(const uint8_t *base, int64_t ld, const int64_t *ids, int from, int n) {
    for (int t = from; t < from + 2 && t < n; t++)
        if (t == 0 || ids[t] != ids[t - 1] + 1) prefetch_span(base + ids[t] * ld, ld);
}

/* Whether neuron activation passes a threshold: tau < 0 is "no threshold". */
static inline int above(float v, float tau) { return tau < 0.f || fabsf(v) > tau; }

/* The down-row threshold of row j: its own (tau_each[j], e.g. WINA's tau / ||W_down[:, j]||) or the shared one. */
static inline float tau_of(const float *tau_each, int64_t j, float tau) { return tau_each ? tau_each[j] : tau; }

/* One group (<= GROUP) of a thread's neurons at decode (one activation row): the gates of all of them, then
 * the up rows of those whose |act(gate)| passes tau_gate, then the down rows of those whose |a| passes tau_a
 * (or their own tau_each[j]).
 * Rows are read two at a time (two independent dot products) and the next rows are prefetched where they
 * do not follow the previous one: neurons a threshold picks are scattered, and the hardware prefetchers
 * cannot guess them (consecutive rows they stream on their own). The down rows that will be added are
 * prefetched while the up rows are read: the group adds them a block column at a time, up to 16 streams. */
static int64_t ffn_group_decode(const XBlock *xq, int64_t nb, const uint8_t *wu, int64_t ld_u, const uint8_t *wd,
                                int64_t ld_d, const uint8_t *wg, int64_t ld_g, int fmt_gu, int fmt_down,
                                const int64_t *js, int n, int act, float tau_gate, float tau_a,
                                const float *tau_each, float *y) {
    int64_t live[GROUP];
    float g[GROUP], a[GROUP];
    const uint8_t *down[GROUP];
    int m = 0;
    if (wg) {                                            /* gates, in pairs; survivors kept with act(gate) */
        for (int t = 0; t < n; t += 2) {
            const int t1 = t + 1 < n ? t + 1 : t;
            prefetch_rows_ahead(wg, ld_g, js, t + 2, n);
            float g0, g1;
            dot2(wg + js[t] * ld_g, wg + js[t1] * ld_g, fmt_gu, nb, xq, &g0, &g1);
            g[t] = actf(g0, act);
            g[t1] = actf(g1, act);
        }
        for (int t = 0; t < n; t++)
            if (above(g[t], tau_gate)) { live[m] = js[t]; g[m++] = g[t]; }
    } else {
        for (int t = 0; t < n; t++) live[m++] = js[t];
    }
    int k = 0;
    for (int t = 0; t < m; t += 2) {                     /* up rows of the survivors, in pairs */
        const int t1 = t + 1 < m ? t + 1 : t;
        if (t == 0) prefetch_rows_ahead(wu, ld_u, live, 0, m);
        prefetch_rows_ahead(wu, ld_u, live, t + 2, m);
        float u[2];
        dot2(wu + live[t] * ld_u, wu + live[t1] * ld_u, fmt_gu, nb, xq, &u[0], &u[1]);
        for (int e = 0; e < (t1 > t ? 2 : 1); e++) {
            const float av = wg ? g[t + e] * u[e] : actf(u[e], act);
            if (!above(av, tau_of(tau_each, live[t + e], tau_a))) continue;
            down[k] = wd + live[t + e] * ld_d;
            prefetch_span(down[k], ld_d);
            a[k++] = av;
        }
    }
    axpy_group(down, a, k, fmt_down, nb, y);
    return k;
}

/* Neuron-sparse FFN: y [n_rows, d] = sum over the listed neurons j that a row needs of a_j(x_r) * down_j.
 * wu, wd, wg: the up, down and gate rows of the neurons (consecutive rows of ld_u, ld_d, ld_g bytes; wg NULL: not
 * gated);
 * idx [k] neuron ids. Which neurons a row needs: row_mask [n_rows, ld_mask] (optional; the predictor's:
 * row r uses idx[jj] only where row_mask[r, jj]), then |act(gate)| > tau_gate (gate mode, CATS) and
 * |a_j| > tau_a (down rows only of the large activations; tau_each [rows], optional: row j's own threshold
 * instead); a negative tau is no threshold. A batch reads a
 * neuron's rows once for every row of a tile that needs it. *n_used (optional) receives the number of
 * (row, neuron) pairs whose down row was applied. Returns 0, or -1 when a per-thread buffer cannot be
 * allocated. */
int pinfer_qffn(const XBlock *xq, int n_rows, int64_t d, const uint8_t *wu, int64_t ld_u, const uint8_t *wd,
                int64_t ld_d, const uint8_t *wg, int64_t ld_g, int fmt_gu, int fmt_down, const int64_t *idx, int64_t k,
                const uint8_t *row_mask, int64_t ld_mask, float tau_gate, float tau_a, const float *tau_each, int act,
                float *y, int64_t *n_used, int n_threads) {
    const int64_t nb = d / QK, nd = (int64_t)n_rows * d;
    memset(y, 0, nd * sizeof(float));
    const int T = clamp_threads(n_threads, k, 16);
    float *part = T > 1 ? calloc((size_t)(T - 1) * nd, sizeof(float)) : NULL;
    if (T > 1 && !part) return -1;
    XPack pk = xpack_for(xq, n_rows, nb, fmt_gu);
    const int tile = tile_of(&pk);
    int64_t used = 0;
#pragma omp parallel num_threads(T) if (T > 1) reduction(+ : used)
    {
        const int t = omp_get_thread_num();
        float *yt = t == 0 ? y : part + (int64_t)(t - 1) * nd;
        const int nt = omp_get_num_threads();          /* a thread's share of the list: the same at any batch size, */
        const int64_t lo = k * t / nt, hi = k * (t + 1) / nt;  /* so are a row's sums */
        if (n_rows == 1) {                              /* decode: in groups */
            for (int64_t g0 = lo; g0 < hi; g0 += GROUP) {
                int64_t js[GROUP];
                int n = 0;
                for (int64_t jj = g0; jj < hi && jj < g0 + GROUP; jj++)
                    if (!row_mask || row_mask[jj]) js[n++] = idx[jj];
                used += ffn_group_decode(xq, nb, wu, ld_u, wd, ld_d, wg, ld_g, fmt_gu, fmt_down, js, n, act, tau_gate,
                                         tau_a, tau_each, yt);
            }
        } else
        for (int64_t jj = lo; jj < hi; jj++) {
            for (int r0 = 0; r0 < n_rows; r0 += tile) {
                const int nr = n_rows - r0 < tile ? n_rows - r0 : tile;
                float g[PTILE], u[PTILE];
                int need[PTILE], any = 0;
                for (int r = 0; r < nr; r++) {
                    need[r] = !row_mask || row_mask[(int64_t)(r0 + r) * ld_mask + jj];
                    any |= need[r];
                }
                if (!any) continue;
                if (wg) {
                    dot_tile(wg + idx[jj] * ld_g, fmt_gu, nb, xq, &pk, r0, nr, g);
                    any = 0;
                    for (int r = 0; r < nr; r++) {
                        g[r] = actf(g[r], act);
                        need[r] = need[r] && above(g[r], tau_gate);
                        any |= need[r];
                    }
                    if (!any) continue;
                }
                dot_tile(wu + idx[jj] * ld_u, fmt_gu, nb, xq, &pk, r0, nr, u);
                for (int r = 0; r < nr; r++) {
                    const float a = wg ? g[r] * u[r] : actf(u[r], act);
                    if (!need[r] || !above(a, tau_of(tau_each, idx[jj], tau_a))) continue;
                    axpy_row(wd + idx[jj] * ld_d, fmt_down, nb, a, yt + (int64_t)(r0 + r) * d);
                    used++;
                }
            }
        }
    }
    for (int t = 1; t < T; t++) {
        const float *p = part + (int64_t)(t - 1) * nd;
        for (int64_t i = 0; i < nd; i++) y[i] += p[i];
    }
    free(part);
    xpack_free(&pk);
    if (n_used) *n_used = used;
    return 0;
}

/* Every neuron, densely: a [n_rows, n_ff] = act(W_gate x) * (W_up x) (ungated: act(W_up x)), rounded to 8-bit
 * blocks, then y = W_down a with W_down [d, n_ff] as it is (rows of n_ff inputs, ld_dt bytes apart): one
 * matrix-vector product instead of n_ff down-row additions (a dot product of a block costs ~2/3 of an axpy of
 * it). n_ff % 32 == 0. Returns 0, or -1 when the activation buffers cannot be allocated. */
int pinfer_ffn_dense(const XBlock *xq, int n_rows, int64_t d, const uint8_t *wu, int64_t ld_u, const uint8_t *wg,
                     int64_t ld_g, int fmt_gu, const uint8_t *wdt, int64_t ld_dt, int fmt_dt, int64_t n_ff, int act,
                     float *y, int n_threads) {
    const int64_t na = (int64_t)n_rows * n_ff;
    float *u = malloc(sizeof(float) * na), *g = wg ? malloc(sizeof(float) * na) : NULL;
    XBlock *aq = malloc(sizeof(XBlock) * (na / QK));
    int rc = 0;
    if (!u || (wg && !g) || !aq) { rc = -1; goto done; }
    pinfer_gemv(wu, fmt_gu, ld_u, d, NULL, n_ff, xq, n_rows, u, n_ff, n_threads);
    if (wg) pinfer_gemv(wg, fmt_gu, ld_g, d, NULL, n_ff, xq, n_rows, g, n_ff, n_threads);
    const int T = clamp_threads(n_threads, na / QK, 8);
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t b = 0; b < na / QK; b++) {
        float *ub = u + b * QK;
        for (int i = 0; i < QK; i++) ub[i] = wg ? actf(g[b * QK + i], act) * ub[i] : actf(ub[i], act);
        pinfer_quantize_x(ub, 1, QK, aq + b);
    }
    pinfer_gemv(wdt, fmt_dt, ld_dt, n_ff, NULL, d, aq, n_rows, y, d, n_threads);
done:
    free(u), free(g), free(aq);
    return rc;
}

/* ---- one decode step's attention block, fused ------------------------------------------------------ */

static void rms_norm_rows(const float *x, const float *w, int n_rows, int64_t d, float eps, float *out) {
    for (int r = 0; r < n_rows; r++) {
        const float *xr = x + r * d;
        float ss = 0.f;
        for (int64_t i = 0; i < d; i++) ss += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) out[r * d + i] = w[i] * (xr[i] * inv);
    }
}

/* v[hd] <- v * cos + rotate_half(v) * sin, rotate_half(v) = (-v[half:], v[:half]). */
static void rope(float *v, const float *c, const float *s, int hd) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
    }
}

/* B rows, one new token each, in place on the residual stream x [B, d]:
 *   x_r += W_o . attention_r(rope(W_qkv . norm1(x_r) + b_qkv));   h_r = norm2(x_r)  (the FFN's input)
 * Row r writes its key/value at position pos[r] of cache slot slots[r] ([S, KV, max_len, hd] fp32 caches) and
 * attends over positions 0..pos[r]; query head i reads key/value head i / (H / KV). cos/sin [B, hd].
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int pinfer_attn_decode(float *x, float *h, int B, int64_t d, const float *norm1, const float *norm2, float eps,
                       const uint8_t *wqkv, int fmt_qkv, const float *bqkv, const uint8_t *wo, int fmt_o, int H,
                       int KV, int hd, const float *cos_, const float *sin_, float *kc, float *vc, int64_t max_len,
                       const int64_t *slots, const int64_t *pos, int n_threads) {
    const int64_t nq = (int64_t)H * hd, nkv = (int64_t)KV * hd, nout = nq + 2 * nkv;
    int64_t ctx = 0;
    for (int r = 0; r < B; r++) ctx = pos[r] + 1 > ctx ? pos[r] + 1 : ctx;
    const int64_t kmax = d > nq ? d : nq;
    float *xn = calloc((size_t)B * kmax, sizeof(float)), *qkv = malloc(sizeof(float) * B * nout);
    float *att = malloc(sizeof(float) * B * nq), *scores = malloc(sizeof(float) * B * H * ctx);
    XBlock *xq = malloc(sizeof(XBlock) * B * (kmax / QK));
    int rc = 0;
    if (!xn || !qkv || !att || !scores || !xq) { rc = -1; goto done; }

    rms_norm_rows(x, norm1, B, d, eps, xn);
    pinfer_quantize_x(xn, B, d, xq);
    pinfer_gemv(wqkv, fmt_qkv, d / QK * pinfer_block_bytes(fmt_qkv), d, NULL, nout, xq, B, qkv, nout, n_threads);
    for (int r = 0; r < B; r++) {
        float *qr = qkv + r * nout;
        if (bqkv)
            for (int64_t i = 0; i < nout; i++) qr[i] += bqkv[i];
        for (int i = 0; i < H + KV; i++) rope(qr + (int64_t)i * hd, cos_ + (int64_t)r * hd, sin_ + (int64_t)r * hd, hd);
        for (int g = 0; g < KV; g++) {
            const int64_t at = ((slots[r] * KV + g) * max_len + pos[r]) * hd;
            memcpy(kc + at, qr + nq + (int64_t)g * hd, sizeof(float) * hd);
            memcpy(vc + at, qr + nq + nkv + (int64_t)g * hd, sizeof(float) * hd);
        }
    }
    const float scale = 1.f / sqrtf((float)hd);
    const int T = clamp_threads(n_threads, (int64_t)B * H * ctx, 4096);
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t rh = 0; rh < (int64_t)B * H; rh++) {
        const int r = (int)(rh / H), i = (int)(rh % H), g = i / (H / KV);
        const float *q = qkv + r * nout + (int64_t)i * hd;
        const float *keys = kc + (slots[r] * KV + g) * max_len * hd, *vals = vc + (slots[r] * KV + g) * max_len * hd;
        float *s = scores + rh * ctx, *out = att + r * nq + (int64_t)i * hd;
        const int64_t n = pos[r] + 1;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < n; t++) {
            float dot = 0.f;
            for (int e = 0; e < hd; e++) dot += q[e] * keys[t * hd + e];
            s[t] = dot * scale;
            mx = s[t] > mx ? s[t] : mx;
        }
        for (int64_t t = 0; t < n; t++) sum += (s[t] = expf(s[t] - mx));
        for (int e = 0; e < hd; e++) out[e] = 0.f;
        for (int64_t t = 0; t < n; t++) {
            const float p = s[t] / sum;
            for (int e = 0; e < hd; e++) out[e] += p * vals[t * hd + e];
        }
    }
    pinfer_quantize_x(att, B, nq, xq);
    pinfer_gemv(wo, fmt_o, nq / QK * pinfer_block_bytes(fmt_o), nq, NULL, d, xq, B, xn, d, n_threads);
    for (int64_t i = 0; i < (int64_t)B * d; i++) x[i] += xn[i];
    rms_norm_rows(x, norm2, B, d, eps, h);
done:
    free(xn), free(qkv), free(att), free(scores), free(xq);
    return rc;
}

/* ---- the activation predictor's scores, fused ---------------------------------------------------- */

/* e^x for x in [-87, 88], ~1 ulp: 2^(x log2 e) as 2^i * 2^f, f in [-1/2, 1/2] (Taylor to f^6, error < 2e-7),
 * written so that the compiler vectorizes a loop of it (no call, no branch; NaN is not expected). */
static inline float exp_approx(float x) {
    x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;
    const float t = x * 1.44269504f, fi = (t + 12582912.f) - 12582912.f, f = t - fi;   /* fi: t rounded (1.5 2^23) */
    const float p = 1.f + f * (0.693147181f + f * (0.240226507f + f * (0.0555041087f + f * (0.00961812911f +
                    f * (0.00133335581f + f * 0.000154035304f)))));
    const int32_t bits = ((int32_t)fi + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* out[j] = E[act(g)^2] for g ~ N(g^_j, (sigma_j s)^2) by the K-node rule (z, wz), j < n; the loop over neurons
 * is the inner one (it vectorizes for SiLU, act a constant once inlined). */
static inline void mean_sq(const float *g, const float *sigma, int64_t n, const float *z, const float *wz, int K,
                           float s, int act, float *out) {
    for (int64_t j = 0; j < n; j++) out[j] = 0.f;
    for (int k = 0; k < K; k++) {
        const float c = z[k] * s, w = wz[k];
        for (int64_t j = 0; j < n; j++) {
            const float v = g[j] + sigma[j] * c;
            const float a = act == 0 ? v / (1.f + exp_approx(-v)) : actf(v, act);
            out[j] += w * (a * a);
        }
    }
}

/* The predictor of one layer (runtime/sparsity/predictor.py) on n_rows inputs x [n_rows, d]:
 *   h = P x (rows of wp: the rank directions, then the sketch's), spread2 = |h[rank:]|^2 (1 without a sketch),
 *   est = Q h[:rank] (rows of we: the n gate estimates, then, gated, the n up estimates),
 *   score_j = sum_k wz_k act(g^_j + sigma_j z_k sqrt(spread2))^2  [* (u^_j^2 + up_var_j spread2)] [* weight_j]
 * into scores [n_rows, n]. P and Q are block-quantized rows; the Gauss-Hermite sum runs K nodes per neuron,
 * vectorized over neurons for SiLU. Returns 0, or -1 when scratch memory cannot be allocated. */
int pinfer_predictor_scores(const float *x, int n_rows, int64_t d, const uint8_t *wp, int fmt_p, int64_t ld_p,
                            int64_t n_p, int64_t rank, const uint8_t *we, int fmt_e, int64_t ld_e, int64_t n,
                            const float *sigma, const float *z, const float *wz, int K, const float *up_var,
                            const float *weight, int act, float *scores, int n_threads) {
    const int64_t n_e = up_var ? 2 * n : n;
    XBlock *xq = malloc(sizeof(XBlock) * n_rows * (d / QK)), *hq = malloc(sizeof(XBlock) * n_rows * (rank / QK));
    float *h = malloc(sizeof(float) * n_rows * n_p), *est = malloc(sizeof(float) * n_rows * n_e);
    int rc = 0;
    if (!xq || !hq || !h || !est) { rc = -1; goto done; }
    pinfer_quantize_x(x, n_rows, d, xq);
    pinfer_gemv(wp, fmt_p, ld_p, d, NULL, n_p, xq, n_rows, h, n_p, n_threads);
    for (int r = 0; r < n_rows; r++) pinfer_quantize_x(h + r * n_p, 1, rank, hq + r * (rank / QK));
    pinfer_gemv(we, fmt_e, ld_e, rank, NULL, n_e, hq, n_rows, est, n_e, n_threads);
    const int T = clamp_threads(n_threads, n, 256);
    for (int r = 0; r < n_rows; r++) {
        const float *hr = h + r * n_p, *g = est + r * n_e, *u = g + n;
        float spread2 = n_p > rank ? 0.f : 1.f;
        for (int64_t i = rank; i < n_p; i++) spread2 += hr[i] * hr[i];
        const float s = sqrtf(spread2);
        float *out = scores + r * n;
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
        for (int64_t j0 = 0; j0 < n; j0 += 64) {
            const int64_t m = n - j0 < 64 ? n - j0 : 64;
            if (act == 0) mean_sq(g + j0, sigma + j0, m, z, wz, K, s, 0, out + j0);
            else mean_sq(g + j0, sigma + j0, m, z, wz, K, s, act, out + j0);
        }
        for (int64_t j = 0; j < n; j++) {
            if (up_var) out[j] *= u[j] * u[j] + up_var[j] * spread2;
            if (weight) out[j] *= weight[j];
        }
    }
done:
    free(xq), free(hq), free(h), free(est);
    return rc;
}
