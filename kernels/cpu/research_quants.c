/* Kernels of the research quantizers (<tessera/kernels_research.h>). */
#include <tessera/kernels_research.h>

#include <math.h>
#include <pthread.h>
#include <string.h>

#include <tessera/kernels_cpu.h>

#include "internal.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RQ_X86 1
#endif

/* ---- bit streams ----------------------------------------------------------------------- */

/* Groups of 8, 16 and 32 (the products' small groups), and their chunks of group steps. */
static int small_group(int64_t group) {
    return group < 64 && 64 % group == 0;
}

static int steps_chunk(int bits, int64_t group) {
    return 8 * group * bits <= 512 ? 8 : 4 * group * bits <= 512 ? 4 : 2;
}

size_t tsr_rq_packed_bytes(int64_t n, int bits) {
    return (size_t)((n * bits + 7) / 8);
}

void tsr_rq_pack(uint8_t *dst, const uint8_t *codes, int64_t n, int bits) {
    memset(dst, 0, tsr_rq_packed_bytes(n, bits));
    uint32_t mask = (1u << bits) - 1;
    for (int64_t i = 0; i < n; i++) {
        int64_t bit = i * bits;
        uint32_t v = (codes[i] & mask) << (bit & 7);
        dst[bit >> 3] |= (uint8_t)v;
        if ((bit & 7) + bits > 8) dst[(bit >> 3) + 1] |= (uint8_t)(v >> 8);
    }
}

/* Eight codes fill exactly `bits` bytes: one 64-bit word, shifted. */
static void unpack_words(uint8_t *codes, const uint8_t *src, int64_t n, int bits) {
    const uint64_t mask = (1u << bits) - 1;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const uint8_t *p = src + i / 8 * bits;
        uint64_t v = 0;
        for (int j = 0; j < bits; j++) v |= (uint64_t)p[j] << (8 * j);
        for (int k = 0; k < 8; k++) codes[i + k] = (uint8_t)((v >> (k * bits)) & mask);
    }
    for (; i < n; i++) codes[i] = tsr_rq_code_at(src, i, bits);
}

#ifdef RQ_X86
/* 64 codes per step: vpermb puts each group of eight codes' `bits` bytes in a 64-bit lane of
 * its own, vpmultishiftqb takes code k from bit k * bits of the lane. The loads and stores are
 * masked to the stream, so nothing past it is touched. */
static uint8_t g_vbmi_perm[9][64], g_vbmi_shift[9][64];
/* The narrow form of the fused f32 products (narrow_codes below): for codes of 1-4 bits, the
 * bit offset of code k at byte 4k, and the value of each 4-bit index. */
static uint8_t g_narrow_shift[5][64];
static float g_narrow_value[5][16];
/* The group steps' vpermb index of the first step of a chunk, for groups of 8 << k: qword q
 * of the step takes the bytes of codes 8 s.. of the chunk's group i (q = i * 8 / C + s). */
static uint8_t g_steps_idx[3][9][64];
static pthread_once_t g_vbmi_once = PTHREAD_ONCE_INIT;

static void vbmi_tables(void) {
    for (int bits = 1; bits <= 8; bits++)
        for (int g = 0; g < 8; g++)
            for (int j = 0; j < 8; j++) {
                g_vbmi_perm[bits][8 * g + j] = (uint8_t)(g * bits + (j < bits ? j : 0));
                g_vbmi_shift[bits][8 * g + j] = (uint8_t)(j * bits);
            }
    for (int k = 0; k < 3; k++)
        for (int bits = 1; bits <= 8; bits++) {
            const int group = 8 << k, per_group = 8 / steps_chunk(bits, group);
            for (int q = 0; q < 8; q++)
                for (int j = 0; j < 8; j++)
                    g_steps_idx[k][bits][8 * q + j] =
                        (uint8_t)(q / per_group * group * bits / 8 + q % per_group * bits +
                                  (j < bits ? j : 0));
        }
    for (int bits = 1; bits <= 4; bits++)
        for (int k = 0; k < 16; k++) {
            g_narrow_shift[bits][4 * k] = (uint8_t)(k * bits);
            g_narrow_value[bits][k] = (float)(k & ((1 << bits) - 1));
        }
}

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static void
unpack_vbmi(uint8_t *codes, const uint8_t *src, int64_t n, int bits) {
    pthread_once(&g_vbmi_once, vbmi_tables);
    const __m512i idx = _mm512_loadu_si512(g_vbmi_perm[bits]);
    const __m512i ctl = _mm512_loadu_si512(g_vbmi_shift[bits]);
    const __m512i mask = _mm512_set1_epi8((char)((1u << bits) - 1));
    for (int64_t i = 0; i < n; i += 64) {
        int64_t m = n - i < 64 ? n - i : 64;
        int64_t nbytes = (m * bits + 7) / 8;
        __mmask64 lm = nbytes == 64 ? ~(__mmask64)0 : ((__mmask64)1 << nbytes) - 1;
        __mmask64 sm = m == 64 ? ~(__mmask64)0 : ((__mmask64)1 << m) - 1;
        __m512i in = _mm512_maskz_loadu_epi8(lm, src + i / 8 * bits);
        __m512i v = _mm512_multishift_epi64_epi8(ctl, _mm512_permutexvar_epi8(idx, in));
        _mm512_mask_storeu_epi8(codes + i, sm, _mm512_and_si512(v, mask));
    }
}

#define RQ_VBMI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")))

/* The fused products' unpacker: the codes of a group 64 per step, in registers, the loads
 * masked to the group (its last step may be short: a group is a multiple of 8 codes). */
typedef struct vbmi_codes {
    __m512i idx, ctl, mask;
    __mmask64 full_bytes, tail_bytes, tail_codes;
    int bits;
} vbmi_codes;

RQ_VBMI_TARGET static inline vbmi_codes vbmi_codes_of(int bits, int64_t group) {
    pthread_once(&g_vbmi_once, vbmi_tables);
    int64_t tail = group % 64;
    return (vbmi_codes){_mm512_loadu_si512(g_vbmi_perm[bits]),
                        _mm512_loadu_si512(g_vbmi_shift[bits]),
                        _mm512_set1_epi8((char)((1u << bits) - 1)),
                        bits == 8 ? ~(__mmask64)0 : ((__mmask64)1 << (8 * bits)) - 1,
                        ((__mmask64)1 << (tail * bits / 8)) - 1, ((__mmask64)1 << tail) - 1,
                        bits};
}

/* The codes whose bytes at p the mask `bytes` keeps, one per byte (zeros past them). */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline __m512i
vbmi_codes_masked(const vbmi_codes *u, const uint8_t *p, __mmask64 bytes) {
    __m512i in = _mm512_maskz_loadu_epi8(bytes, p);
    return _mm512_and_si512(
        _mm512_multishift_epi64_epi8(u->ctl, _mm512_permutexvar_epi8(u->idx, in)), u->mask);
}

/* The 64 codes of a step that starts at byte p, one per byte, zeros past the group's end
 * (whole = 0: the step is the group's short last one). */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline __m512i
vbmi_codes_at(const vbmi_codes *u, const uint8_t *p, int whole) {
    return vbmi_codes_masked(u, p, whole ? u->full_bytes : u->tail_bytes);
}

/* The activations of that step, zeros past the group's end. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline __m512i
vbmi_acts_at(const vbmi_codes *u, const int8_t *a, int64_t i, int whole) {
    return _mm512_maskz_loadu_epi8(whole ? ~(__mmask64)0 : u->tail_codes, a + i);
}
#endif

void tsr_rq_unpack(uint8_t *codes, const uint8_t *src, int64_t n, int bits) {
#ifdef RQ_X86
    if (tsr_cpu_avx512_vbmi()) {
        unpack_vbmi(codes, src, n, bits);
        return;
    }
#endif
    unpack_words(codes, src, n, bits);
}

/* ---- integer dot ----------------------------------------------------------------------- */

static int32_t dot_u8s8_scalar(const uint8_t *u, const int8_t *s, int64_t n) {
    int32_t sum = 0;
    for (int64_t i = 0; i < n; i++) sum += (int32_t)u[i] * (int32_t)s[i];
    return sum;
}

#ifdef RQ_X86
__attribute__((target("avx2"))) static int32_t dot_u8s8_avx2(const uint8_t *u, const int8_t *s,
                                                               int64_t n) {
    __m256i acc = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(u + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(s + i));
        /* u <= 127 and |s| <= 127 keep each 16-bit pair sum below 2^15. */
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    return _mm_cvtsi128_si32(h) + dot_u8s8_scalar(u + i, s + i, n - i);
}

__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni"))) static int32_t
dot_u8s8_vnni(const uint8_t *u, const int8_t *s, int64_t n) {
    __m512i acc = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(u + i), _mm512_loadu_si512(s + i));
    __m256i acc8 = _mm256_add_epi32(_mm512_castsi512_si256(acc),
                                    _mm512_extracti64x4_epi64(acc, 1));
    for (; i + 32 <= n; i += 32)
        acc8 = _mm256_dpbusd_epi32(acc8, _mm256_loadu_si256((const __m256i *)(u + i)),
                                   _mm256_loadu_si256((const __m256i *)(s + i)));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc8), _mm256_extracti128_si256(acc8, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    return _mm_cvtsi128_si32(h) + dot_u8s8_scalar(u + i, s + i, n - i);
}
#endif

int32_t tsr_rq_dot_u8s8(const uint8_t *u, const int8_t *s, int64_t n) {
#ifdef RQ_X86
    switch (tsr_cpu_level_get()) {
    case TSR_CPU_LEVEL_AVX512: return dot_u8s8_vnni(u, s, n);
    case TSR_CPU_LEVEL_AVX2: return dot_u8s8_avx2(u, s, n);
    default: break;
    }
#endif
    return dot_u8s8_scalar(u, s, n);
}

/* ---- integer dots on packed codes ------------------------------------------------------ */

/* The portable form: a chunk of at most 64 codes unpacked to the stack at a time. */
static void dot_packed_groups_unpacked(int32_t *dots, const uint8_t *codes, int bits,
                                       const int8_t *a, int64_t group, int64_t n_g) {
    uint8_t buf[64];
    for (int64_t g = 0; g < n_g; g++) {
        int32_t sum = 0;
        for (int64_t i = 0; i < group; i += 64) {
            int64_t m = group - i < 64 ? group - i : 64;
            unpack_words(buf, codes + (g * group + i) / 8 * bits, m, bits);
            /* tsr_rq_dot_u8s8's AVX2 form needs codes below 128 */
            sum += bits < 8 ? tsr_rq_dot_u8s8(buf, a + g * group + i, m)
                            : dot_u8s8_scalar(buf, a + g * group + i, m);
        }
        dots[g] = sum;
    }
}

#ifdef RQ_X86
/* 64 codes per step, unpacked in registers as unpack_vbmi does and multiplied with vpdpbusd
 * (unsigned codes of all 8 bits, no saturation). */
RQ_VBMI_TARGET static void dot_packed_groups_vbmi(int32_t *dots, const uint8_t *codes, int bits,
                                                  const int8_t *a, int64_t group, int64_t n_g) {
    const vbmi_codes u = vbmi_codes_of(bits, group);
    for (int64_t g = 0; g < n_g; g++) {
        const uint8_t *src = codes + g * group * bits / 8;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t i = 0; i < group; i += 64) {
            int whole = i + 64 <= group;
            acc = _mm512_dpbusd_epi32(acc, vbmi_codes_at(&u, src + i / 8 * bits, whole),
                                      vbmi_acts_at(&u, a + g * group, i, whole));
        }
        dots[g] = _mm512_reduce_add_epi32(acc);
    }
}
#endif

void tsr_rq_dot_packed_groups(int32_t *dots, const uint8_t *codes, int bits, const int8_t *a,
                              int64_t group, int64_t n_g) {
#ifdef RQ_X86
    if (tsr_cpu_avx512_vbmi()) {
        dot_packed_groups_vbmi(dots, codes, bits, a, group, n_g);
        return;
    }
#endif
    dot_packed_groups_unpacked(dots, codes, bits, a, group, n_g);
}

/* The portable form of tsr_rq_dot_packed_int_scaled: the group dots, then the sum. */
static int64_t dot_packed_int_scaled_groups(const uint8_t *codes, int bits, const uint8_t *sz,
                                            const int8_t *a, const int32_t *asum, int64_t group,
                                            int64_t n_g, int32_t *dots) {
    tsr_rq_dot_packed_groups(dots, codes, bits, a, group, n_g);
    int64_t acc = 0;
    for (int64_t g = 0; g < n_g; g++)
        acc += (int64_t)sz[2 * g] * (dots[g] - (int64_t)sz[2 * g + 1] * asum[g]);
    return acc;
}

#ifdef RQ_X86
/* acc64 + the 32-bit lanes of acc32, widened. */
static inline __attribute__((target("avx512f"))) __m512i add_lanes_epi64(__m512i acc64,
                                                                         __m512i acc32) {
    acc64 = _mm512_add_epi64(acc64, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc32)));
    return _mm512_add_epi64(acc64, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc32, 1)));
}

/* A lane's term of one group is at most 255 * 255 * 127 * 4 * (group / 64) in size; 32-bit
 * lanes take 16 groups of 256 (2^31 / (255^2 * 127 * 16) > 16) before they move to 64 bits. */
#define RQ_INT_FLUSH 16

RQ_VBMI_TARGET static int64_t dot_packed_int_scaled_vbmi(const uint8_t *codes, int bits,
                                                         const uint8_t *sz, const int8_t *a,
                                                         int64_t group, int64_t n_g) {
    const vbmi_codes u = vbmi_codes_of(bits, group);
    const int64_t steps = group / 64, step_bytes = 8 * bits, tail = group % 64;
    const uint8_t *src = codes;
    __m512i acc64 = _mm512_setzero_si512(), acc32 = _mm512_setzero_si512();
    for (int64_t g = 0; g < n_g; g++) {
        const __m512i zv = _mm512_set1_epi8((char)sz[2 * g + 1]);
        __m512i ac = _mm512_setzero_si512(), az = _mm512_setzero_si512();
        _mm_prefetch((const char *)src + TSR_STREAM_PREFETCH, _MM_HINT_T0);
        for (int64_t i = 0; i < steps; i++, src += step_bytes, a += 64) {
            __m512i av = _mm512_loadu_si512(a);
            ac = _mm512_dpbusd_epi32(ac, vbmi_codes_at(&u, src, 1), av);
            az = _mm512_dpbusd_epi32(az, zv, av);
        }
        if (tail) {
            __m512i av = vbmi_acts_at(&u, a, 0, 0);
            ac = _mm512_dpbusd_epi32(ac, vbmi_codes_at(&u, src, 0), av);
            az = _mm512_dpbusd_epi32(az, zv, av);
            src += tail / 8 * bits;
            a += tail;
        }
        acc32 = _mm512_add_epi32(acc32, _mm512_mullo_epi32(_mm512_sub_epi32(ac, az),
                                                           _mm512_set1_epi32(sz[2 * g])));
        if ((g + 1) % RQ_INT_FLUSH == 0 || g + 1 == n_g) {
            acc64 = add_lanes_epi64(acc64, acc32);
            acc32 = _mm512_setzero_si512();
        }
    }
    return _mm512_reduce_add_epi64(acc64);
}

/* A lane's term of one step is at most 255 * 8 * 15 * 127 (its scale times eight products):
 * 32-bit lanes take 256 steps before they move to 64 bits. */
#define RQ_NIBBLE_FLUSH 256
#define RQ_NIBBLE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
/* Tokens per tile of the fused products: each step's codes are taken once for all of them. */
#define RQ_TILE_TOKS 4

/* sum_g s_g * z_g * asum[g], 16 groups at a time in 64-bit lanes (the scalar loop, which the
 * compiler vectorises with emulated 64-bit products, cost as much as a short row's codes). */
RQ_NIBBLE_TARGET static int64_t zero_terms(const uint8_t *sz, const int32_t *asum, int64_t n_g) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t g = 0; g < n_g; g += 16) {
        __mmask16 m = n_g - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n_g - g)) - 1);
        __m512i pairs = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi16(m, sz + 2 * g));
        __m512i s_z = _mm512_mullo_epi32(_mm512_and_si512(pairs, _mm512_set1_epi32(0xffff)),
                                         _mm512_srli_epi32(pairs, 16));
        __m512i sums = _mm512_maskz_loadu_epi32(m, asum + g);
        for (int h = 0; h < 2; h++) {
            __m256i s_z8 = h ? _mm512_extracti64x4_epi64(s_z, 1) : _mm512_castsi512_si256(s_z);
            __m256i sums8 = h ? _mm512_extracti64x4_epi64(sums, 1) : _mm512_castsi512_si256(sums);
            acc = _mm512_add_epi64(acc, _mm512_mul_epi32(_mm512_cvtepu32_epi64(s_z8),
                                                         _mm512_cvtepi32_epi64(sums8)));
        }
    }
    return _mm512_reduce_add_epi64(acc);
}

/* The codes of one step of 128 from 64 bytes (half: the bytes, 64 but in a short last step):
 * the low nibbles (even codes) and the high nibbles (odd codes), zeros past the step. */
typedef struct nibble_codes {
    __m512i lo, hi;
} nibble_codes;

RQ_NIBBLE_TARGET __attribute__((always_inline)) static inline nibble_codes
nibble_codes_at(const uint8_t *codes, int64_t half) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    _mm_prefetch((const char *)codes + TSR_STREAM_PREFETCH, _MM_HINT_T0);
    __m512i w = half == 64 ? _mm512_loadu_si512(codes)
                           : _mm512_maskz_loadu_epi8(((__mmask64)1 << half) - 1, codes);
    return (nibble_codes){_mm512_and_si512(w, low4),
                          _mm512_and_si512(_mm512_srli_epi16(w, 4), low4)};
}

/* Those codes less `zero` (zv: its bytes; zero 0: none) times the step's activations in
 * nibble order (a_nib): lane j sums codes 8j..8j+7 of the step (four low nibbles, four high),
 * so it stays inside one group. */
RQ_NIBBLE_TARGET __attribute__((always_inline)) static inline __m512i
nibble_dot(nibble_codes c, const int8_t *a_nib, int64_t half, int zero, __m512i zv) {
    __m512i lo, hi;
    if (half == 64) {
        lo = _mm512_loadu_si512(a_nib);
        hi = _mm512_loadu_si512(a_nib + 64);
    } else {
        __mmask64 m = ((__mmask64)1 << half) - 1;
        lo = _mm512_maskz_loadu_epi8(m, a_nib);
        hi = _mm512_maskz_loadu_epi8(m, a_nib + half);
    }
    __m512i dot =
        _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c.lo, lo), c.hi, hi);
    if (!zero) return dot;
    return _mm512_sub_epi32(
        dot, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), zv, lo), zv, hi));
}

/* Steps of whole groups (128 % group == 0, group a power of two): lane l's group within the
 * step, l * 8 / group, is l >> nibble_lane_shift(group) (31 for groups of whole steps). */
static inline int nibble_lane_shift(int64_t group) {
    return group < 128 ? __builtin_ctzll((unsigned long long)group / 8) : 31;
}

/* Lane l's group within a step of whole groups, l >> shift (shift: log2 of lanes per group). */
RQ_NIBBLE_TARGET __attribute__((always_inline)) static inline __m512i
lane_groups_of(int shift) {
    return _mm512_srl_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm_cvtsi32_si128(shift));
}

RQ_NIBBLE_TARGET __attribute__((always_inline)) static inline __m512i
nibble_lane_groups(int64_t group) {
    return lane_groups_of(nibble_lane_shift(group));
}

/* Tokens [t0, t0 + NT) (NT a constant in each inlined copy): each step's codes are taken once
 * for the NT tokens, and its lanes times their groups' scales (in the low 16 bits of each
 * lane: |lane| <= 8 * 15 * 127 fits 16 bits, so vpmaddwd gives the exact product), then the
 * zeros. Groups of whole steps (the default 128 and 256) take one broadcast scale, steps of
 * whole groups one vpermd of their pairs; other groups set each lane's by masked moves. */
RQ_NIBBLE_TARGET __attribute__((always_inline)) static inline void
nibbles_int_scaled_tile(int64_t *out, const uint8_t *codes, const uint8_t *sz,
                        const tsr_rq_act *act, int64_t t0, int64_t n_g, const int NT) {
    const int64_t group = act->group, n = group * n_g;
    const int8_t *a_nib = act->q_ord + t0 * act->n_pad;
    __m512i acc64[RQ_TILE_TOKS], acc32[RQ_TILE_TOKS];
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) acc64[j] = acc32[j] = _mm512_setzero_si512();
    const __m512i lane_groups = nibble_lane_groups(group);
    __m512i scale = _mm512_setzero_si512();
    for (int64_t b = 0, g0 = 0, step = 1; b < n; b += 128, step++) { /* g0: code b's group */
        int64_t half = (n - b < 128 ? n - b : 128) / 2;
        if (group % 128 == 0) {
            if (b == g0 * group) scale = _mm512_set1_epi32(sz[2 * g0++]);
        } else if (128 % group == 0) {
            /* the step's (s, z) pairs as 32-bit lanes, each lane's own taken, s kept */
            int64_t ng = n_g - g0 < 128 / group ? n_g - g0 : 128 / group;
            __m512i pairs = _mm512_cvtepu8_epi16(
                _mm256_maskz_loadu_epi16((__mmask16)((1u << ng) - 1), sz + 2 * g0));
            scale = _mm512_and_si512(_mm512_permutexvar_epi32(lane_groups, pairs),
                                     _mm512_set1_epi32(0xffff));
            g0 += ng;
        } else {
            scale = _mm512_set1_epi32(sz[2 * g0]);
            for (g0++; g0 < n_g && g0 * group < b + 128; g0++)
                scale = _mm512_mask_mov_epi32(
                    scale, (__mmask16)(0xffffu << ((g0 * group - b) / 8)),
                    _mm512_set1_epi32(sz[2 * g0]));
            if (g0 * group > b + 128) g0--; /* the last group goes on into the next step */
        }
        nibble_codes c = nibble_codes_at(codes + b / 2, half);
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++)
            acc32[j] = _mm512_add_epi32(
                acc32[j], _mm512_madd_epi16(nibble_dot(c, a_nib + j * act->n_pad + b, half, 0,
                                                       _mm512_setzero_si512()),
                                            scale));
        if (step % RQ_NIBBLE_FLUSH == 0) {
#pragma GCC unroll 4
            for (int j = 0; j < NT; j++) {
                acc64[j] = add_lanes_epi64(acc64[j], acc32[j]);
                acc32[j] = _mm512_setzero_si512();
            }
        }
    }
    const int64_t gs = act->n_pad / group;
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++)
        out[t0 + j] = _mm512_reduce_add_epi64(add_lanes_epi64(acc64[j], acc32[j])) -
                      zero_terms(sz, act->gsum + (t0 + j) * gs, n_g);
}

RQ_NIBBLE_TARGET static void dot_nibbles_int_scaled(int64_t *out, const uint8_t *codes,
                                                    const uint8_t *sz, const tsr_rq_act *act,
                                                    int64_t n_tok, int64_t n_g) {
    int64_t t = 0;
    for (; t + RQ_TILE_TOKS <= n_tok; t += RQ_TILE_TOKS)
        nibbles_int_scaled_tile(out, codes, sz, act, t, n_g, RQ_TILE_TOKS);
    switch (n_tok - t) {
    case 3: nibbles_int_scaled_tile(out, codes, sz, act, t, n_g, 3); break;
    case 2: nibbles_int_scaled_tile(out, codes, sz, act, t, n_g, 2); break;
    case 1: nibbles_int_scaled_tile(out, codes, sz, act, t, n_g, 1); break;
    default: break;
    }
}
#endif

void tsr_rq_dot_packed_int_scaled(int64_t *out, const uint8_t *codes, int bits,
                                  const uint8_t *sz, const tsr_rq_act *act, int64_t n_tok,
                                  int64_t n_g, int32_t *scratch) {
    const int64_t gs = act->n_pad / act->group;
#ifdef RQ_X86
    if (bits == 4 && act->order == TSR_RQ_ORDER_NIBBLES &&
        tsr_cpu_level_get() == TSR_CPU_LEVEL_AVX512) {
        dot_nibbles_int_scaled(out, codes, sz, act, n_tok, n_g);
        return;
    }
    if (tsr_cpu_avx512_vbmi()) {
        for (int64_t t = 0; t < n_tok; t++)
            out[t] = dot_packed_int_scaled_vbmi(codes, bits, sz, act->q + t * act->n_pad,
                                                act->group, n_g);
        return;
    }
#endif
    for (int64_t t = 0; t < n_tok; t++)
        out[t] = dot_packed_int_scaled_groups(codes, bits, sz, act->q + t * act->n_pad,
                                              act->gsum + t * gs, act->group, n_g, scratch);
}

/* ---- scaled products on packed codes ---------------------------------------------------- */

static float gscale_d(const tsr_rq_gscales *s, int64_t g) {
    return s->d16 ? tsr_rq_load_f16(s->d16 + 2 * g) : s->d[g];
}

/* The scaled products' m_g (tsr_rq_gscales), and whether there is one. */
static int gscales_min(const tsr_rq_gscales *s) {
    return s->d16 ? s->m16 != NULL : s->b != NULL;
}

static float gscale_min(const tsr_rq_gscales *s, int64_t g) {
    return s->d16 ? tsr_rq_load_f16(s->m16 + 2 * g) : s->b[g];
}

/* The order of tsr_rq_dot_packed_scaled, which every level keeps: 16 f32 lanes, lane l of
 * group g taking the exact integer sum of (c - zero) * a over the positions p of the group
 * with p % 64 / 4 == l (a vpdpbusd lane; for 4-bit codes, the positions P of the row with
 * P % 128 / 8 == l, a lane of the two vpdpbusd of nibble pairs; for the other widths in groups
 * of 8, 16 and 32, all of the group's positions in lane g % 16, its lanes added in integers),
 * times P_g = da_g * d_g by one fma; the minimum's term da_g * m_g * sum a into lane g % 16
 * of a second set; then the two sets added lane by lane and the 16 lanes added as a tree
 * (l + l + 8, then + 4, + 2, + 1). A SIMD form may take one fma for the lanes of several
 * groups, each with its own P_g: the reference's fma(0, P_g, acc) on a lane outside group g
 * leaves it as it is (acc is never -0). */
static float lanes16_sum(const float s[16]) {
    float t[8];
    for (int l = 0; l < 8; l++) t[l] = s[l] + s[l + 8];
    for (int l = 0; l < 4; l++) t[l] = t[l] + t[l + 4];
    for (int l = 0; l < 2; l++) t[l] = t[l] + t[l + 2];
    return t[0] + t[1];
}

static float dot_packed_scaled_ref(const uint8_t *codes, int bits, const tsr_rq_gscales *s,
                                   const int8_t *a, const int32_t *asum, const float *da,
                                   int64_t da_stride, int64_t group, int64_t n_g) {
    float acc[16] = {0}, macc[16] = {0};
    uint8_t buf[64];
    for (int64_t g = 0; g < n_g; g++) {
        float dag = da[g * da_stride];
        float P = dag * gscale_d(s, g);
        int32_t lane[16] = {0};
        for (int64_t i = 0; i < group; i += 64) {
            int64_t m = group - i < 64 ? group - i : 64;
            unpack_words(buf, codes + (g * group + i) / 8 * bits, m, bits);
            for (int64_t p = 0; p < m; p++) {
                int64_t pos = g * group + i + p;
                lane[bits == 4 ? pos % 128 / 8 : small_group(group) ? g % 16 : p / 4] +=
                    ((int32_t)buf[p] - s->zero) * a[pos];
            }
        }
        for (int l = 0; l < 16; l++) acc[l] = fmaf((float)lane[l], P, acc[l]);
        if (gscales_min(s))
            macc[g % 16] = fmaf((float)asum[g], dag * gscale_min(s, g), macc[g % 16]);
    }
    for (int l = 0; l < 16; l++) acc[l] = acc[l] + macc[l];
    return lanes16_sum(acc);
}

#ifdef RQ_X86
/* The reference's order with AVX2: a ymm's 32-bit lane j after vpmaddubsw + vpmaddwd holds the
 * products 4j..4j+3 of its 32 bytes, so two ymm are the 16 lanes; the codes are unpacked to
 * the stack 64 at a time (a group that divides 64 at its place in the row's step). Codes
 * below 128 only (vpmaddubsw's 16-bit pair sums). */
__attribute__((target("avx2,fma,f16c"))) static float
dot_packed_scaled_avx2(const uint8_t *codes, int bits, const tsr_rq_gscales *s,
                       const int8_t *a, const int32_t *asum, const float *da,
                       int64_t da_stride, int64_t group, int64_t n_g) {
    const __m256i ones = _mm256_set1_epi16(1), zv = _mm256_set1_epi8((char)s->zero);
    const int small = small_group(group);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    float macc[16] = {0}, lanes[16], small_acc[16] = {0};
    uint8_t buf[64];
    int8_t abuf[64];
    for (int64_t g = 0; g < n_g; g++) {
        float dag = da[g * da_stride];
        __m256 P = _mm256_set1_ps(dag * gscale_d(s, g));
        __m256i sum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t i = 0; i < group; i += 64) {
            int64_t m = group - i < 64 ? group - i : 64, at = 64 % group ? 0 : g * group % 64;
            const int8_t *ai = a + g * group + i;
            if (m < 64) { /* zeros around the group, whose activations may end the array */
                memset(buf, 0, sizeof buf);
                memset(abuf, 0, sizeof abuf);
                memcpy(abuf + at, ai, (size_t)m);
                ai = abuf;
            }
            unpack_words(buf + at, codes + (g * group + i) / 8 * bits, m, bits);
            for (int h = 0; h < 2; h++) {
                __m256i c = _mm256_loadu_si256((const __m256i *)(buf + 32 * h));
                __m256i av = _mm256_loadu_si256((const __m256i *)(ai + 32 * h));
                __m256i ca = _mm256_madd_epi16(_mm256_maddubs_epi16(c, av), ones);
                __m256i za = _mm256_madd_epi16(_mm256_maddubs_epi16(zv, av), ones);
                sum[h] = _mm256_add_epi32(sum[h], _mm256_sub_epi32(ca, za));
            }
        }
        if (small) {
            int32_t part[8];
            _mm256_storeu_si256((__m256i *)part, _mm256_add_epi32(sum[0], sum[1]));
            int32_t total = 0;
            for (int l = 0; l < 8; l++) total += part[l];
            small_acc[g % 16] = fmaf((float)total, _mm256_cvtss_f32(P), small_acc[g % 16]);
        } else {
            for (int h = 0; h < 2; h++)
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[h]), P, acc[h]);
        }
        if (gscales_min(s))
            macc[g % 16] = fmaf((float)asum[g], dag * gscale_min(s, g), macc[g % 16]);
    }
    _mm256_storeu_ps(lanes, acc[0]);
    _mm256_storeu_ps(lanes + 8, acc[1]);
    for (int l = 0; l < 16; l++) lanes[l] = (small ? small_acc[l] : lanes[l]) + macc[l];
    return lanes16_sum(lanes);
}

/* 4-bit codes as nibble pairs in the reference's order with AVX2, one token: each run of 128
 * codes as two halves of 32 bytes, a ymm's lane j summing codes 8j..8j+7 of its half through
 * vpmaddubsw (15 * 127 and 127 * 127 pair sums do not saturate) and vpmaddwd, and the float
 * steps of nibbles_scaled_tile (groups of whole steps or steps of whole groups; P of 16
 * groups at a time, each half of a step reading the window of eight P its groups lie in). */
__attribute__((target("avx2,fma,f16c"))) static float
dot_nibbles_scaled_avx2(const uint8_t *codes, const tsr_rq_gscales *s, const int8_t *a_nib,
                        const int32_t *asum, const float *da, int64_t da_stride, int64_t group,
                        int64_t n_g) {
    const int32_t zero = s->zero;
    const __m256i ones = _mm256_set1_epi16(1), zv = _mm256_set1_epi8((char)zero),
                  low4 = _mm256_set1_epi8(0x0f);
    const int shift = nibble_lane_shift(group);
    const __m256i lane_groups[2] = {
        _mm256_srl_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm_cvtsi32_si128(shift)),
        _mm256_srl_epi32(_mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15),
                         _mm_cvtsi32_si128(shift))};
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    float macc[16] = {0}, lanes[16], P[16];
    uint8_t cbuf[64];
    int8_t abuf[128];
    for (int64_t g0 = 0; g0 < n_g; g0 += 16) {
        int64_t ng = n_g - g0 < 16 ? n_g - g0 : 16;
        for (int64_t k = 0; k < 16; k++) {
            float dag = k < ng ? da[(g0 + k) * da_stride] : 0.0f;
            P[k] = k < ng ? dag * gscale_d(s, g0 + k) : 0.0f;
            if (k < ng && gscales_min(s))
                macc[k] = fmaf((float)asum[g0 + k], dag * gscale_min(s, g0 + k), macc[k]);
        }
        const int64_t b0 = g0 * group, b1 = (g0 + ng) * group;
        __m256i sum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t b = b0, k0 = 0; b < b1; b += 128) {
            int64_t half = (b1 - b < 128 ? b1 - b : 128) / 2;
            const uint8_t *c = codes + b / 2;
            const int8_t *a = a_nib + b;
            if (half < 64) { /* zeros past the run, whose bytes may end the arrays */
                memset(cbuf, 0, sizeof cbuf);
                memset(abuf, 0, sizeof abuf);
                memcpy(cbuf, c, (size_t)half);
                memcpy(abuf, a, (size_t)half);
                memcpy(abuf + 64, a + half, (size_t)half);
                c = cbuf;
                a = abuf;
            }
            for (int h = 0; h < 2; h++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(c + 32 * h));
                __m256i lo = _mm256_loadu_si256((const __m256i *)(a + 32 * h));
                __m256i hi = _mm256_loadu_si256((const __m256i *)(a + 64 + 32 * h));
                __m256i pairs = _mm256_add_epi16(
                    _mm256_maddubs_epi16(_mm256_and_si256(w, low4), lo),
                    _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), low4), hi));
                __m256i d = _mm256_madd_epi16(pairs, ones);
                if (zero) {
                    __m256i zpairs = _mm256_add_epi16(_mm256_maddubs_epi16(zv, lo),
                                                      _mm256_maddubs_epi16(zv, hi));
                    d = _mm256_sub_epi32(d, _mm256_madd_epi16(zpairs, ones));
                }
                sum[h] = _mm256_add_epi32(sum[h], d);
            }
            if (group % 128 == 0) {
                if ((b + 128 - b0) % group) continue; /* the group goes on */
                __m256 Pg = _mm256_set1_ps(P[(b - b0) / group]);
                for (int h = 0; h < 2; h++)
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[h]), Pg, acc[h]);
            } else {
                for (int h = 0; h < 2; h++) {
                    int64_t base = (k0 + ((8 * h) >> shift)) & ~(int64_t)7;
                    __m256i k =
                        _mm256_add_epi32(lane_groups[h], _mm256_set1_epi32((int)(k0 - base)));
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[h]),
                                             _mm256_permutevar8x32_ps(_mm256_loadu_ps(P + base), k),
                                             acc[h]);
                }
                k0 += 16 >> shift;
            }
            sum[0] = sum[1] = _mm256_setzero_si256();
        }
    }
    _mm256_storeu_ps(lanes, acc[0]);
    _mm256_storeu_ps(lanes + 8, acc[1]);
    for (int l = 0; l < 16; l++) lanes[l] = lanes[l] + macc[l];
    return lanes16_sum(lanes);
}

/* Groups [g0, g0 + 16) of s (fewer at the end: mask gm, the rest 0), fp16 fields or f32. */
RQ_NIBBLE_TARGET __attribute__((always_inline)) static inline __m512
gscales_block(const uint8_t *f16, const float *f32, int64_t g0, __mmask16 gm) {
    return f16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, f16 + 2 * g0))
               : _mm512_maskz_loadu_ps(gm, f32 + g0);
}

/* Token t's scales and group sums for groups of `group` (act->group; a constant where the
 * caller knows it, so that the division is a shift), found once per call: the products'
 * blocks do not divide. */
typedef struct act_token {
    const float *d;
    const int32_t *gsum;
    int group_scales;
} act_token;

static inline act_token act_token_of(const tsr_rq_act *act, int64_t t, int64_t group) {
    return (act_token){act->d + t * act->n_scales, act->gsum + t * (act->n_pad / group),
                       act->n_scales > 1};
}

/* Groups [g0, g0 + 16) (fewer at the end: mask gm) of token a: P[k] = da_g * d_g, and the
 * minimum's terms added into macc, returned. */
RQ_NIBBLE_TARGET __attribute__((always_inline)) static inline __m512
scaled_block(float P[16], __m512 macc, const tsr_rq_gscales *s, const act_token *a, int64_t g0,
             __mmask16 gm) {
    __m512 dav = a->group_scales ? _mm512_maskz_loadu_ps(gm, a->d + g0) : _mm512_set1_ps(a->d[0]);
    _mm512_storeu_ps(P, _mm512_mul_ps(dav, gscales_block(s->d16, s->d, g0, gm)));
    if (!gscales_min(s)) return macc;
    __m512 mv = gscales_block(s->m16, s->b, g0, gm);
    __m512 as = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(gm, a->gsum + g0));
    return _mm512_fmadd_ps(as, _mm512_mul_ps(dav, mv), macc);
}

/* A tile of NT tokens from t0 starts with both sets of lanes at zero and each token's scales. */
RQ_NIBBLE_TARGET __attribute__((always_inline)) static inline void
scaled_tile_start(__m512 *acc, __m512 *macc, act_token *at, const tsr_rq_act *act, int64_t t0,
                  int64_t group, const int NT) {
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) {
        acc[j] = macc[j] = _mm512_setzero_ps();
        at[j] = act_token_of(act, t0 + j, group);
    }
}

/* The reference's last step: the two sets of lanes added, then the tree. */
RQ_NIBBLE_TARGET __attribute__((always_inline)) static inline float
lanes16_sum_zmm(__m512 acc, __m512 macc) {
    __m512 s = _mm512_add_ps(acc, macc);
    __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(s),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    return _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
}

/* Chunks of group steps (tsr_rq_act_steps_order) of C groups: the chunk's codes in one
 * register, each step's by one vpermb whose index moves on by the step's codes of a group,
 * 8 * bits / C bytes. */
typedef struct steps_codes {
    int64_t a_stride, group_bytes;
    __mmask64 chunk_bytes; /* the bytes of a whole chunk */
    __m512i idx, ctl, mask, advance;
} steps_codes;

/* Into v[j] (NT tokens): the lanes of chunk ch of a block of ng groups (16 but at the row's
 * end), the block's codes at src and token t0's activations at a, in S steps; lane 2 q + h
 * holds qword q's group q / (8 / C). The chunk has m = C groups but at the row's end (past
 * it, none: zeros). C, S and NT are constants in each inlined copy. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
steps_chunk_dots(__m512i *v, const steps_codes *u, const uint8_t *src, const int8_t *a,
                 int64_t ng, int ch, const int C, const int S, const int NT) {
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) v[j] = _mm512_setzero_si512();
    const int64_t m = ng - ch * C < C ? ng - ch * C : C;
    if (m <= 0) return;
    src += ch * C * u->group_bytes;
    a += ch * C * (64 * S / C);
    const int whole = m == C;
    const int64_t step = m * 64 / C;
    _mm_prefetch((const char *)src + TSR_STREAM_PREFETCH, _MM_HINT_T0);
    const __m512i w = _mm512_maskz_loadu_epi8(
        whole ? u->chunk_bytes : ((__mmask64)1 << (m * u->group_bytes)) - 1, src);
    const __mmask64 am = whole ? ~(__mmask64)0 : ((__mmask64)1 << step) - 1;
    __m512i idx = u->idx;
#pragma GCC unroll 4
    for (int k = 0; k < S; k++, a += step) {
        __m512i c = _mm512_and_si512(
            _mm512_multishift_epi64_epi8(u->ctl, _mm512_permutexvar_epi8(idx, w)), u->mask);
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++)
            v[j] = _mm512_dpbusd_epi32(v[j], c,
                                       _mm512_maskz_loadu_epi8(am, a + j * u->a_stride));
        idx = _mm512_add_epi8(idx, u->advance);
    }
}

/* Lanes 2 p and 2 p + 1 of x added into lane p, and of y into lane 8 + p. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline __m512i pair_sums(__m512i x,
                                                                           __m512i y) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    return _mm512_add_epi32(_mm512_permutex2var_epi32(x, even, y),
                            _mm512_permutex2var_epi32(
                                x, _mm512_add_epi32(even, _mm512_set1_epi32(1)), y));
}

/* Chunks ch and ch + 1 of a block (as steps_chunk_dots) added by pairs of lanes into v[j]
 * for NT tokens (chunk ch's lanes, then ch + 1's). The block's chunks go in pairs, pairs of
 * pairs (steps_chunks4) and pairs of those (steps_chunks8), in registers. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
steps_chunks2(__m512i *v, const steps_codes *u, const uint8_t *src, const int8_t *a, int64_t ng,
              int ch, const int C, const int S, const int NT) {
    __m512i x[RQ_TILE_TOKS], y[RQ_TILE_TOKS];
    steps_chunk_dots(x, u, src, a, ng, ch, C, S, NT);
    steps_chunk_dots(y, u, src, a, ng, ch + 1, C, S, NT);
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) v[j] = pair_sums(x[j], y[j]);
}

RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
steps_chunks4(__m512i *v, const steps_codes *u, const uint8_t *src, const int8_t *a, int64_t ng,
              int ch, const int C, const int S, const int NT) {
    __m512i x[RQ_TILE_TOKS], y[RQ_TILE_TOKS];
    steps_chunks2(x, u, src, a, ng, ch, C, S, NT);
    steps_chunks2(y, u, src, a, ng, ch + 2, C, S, NT);
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) v[j] = pair_sums(x[j], y[j]);
}

RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
steps_chunks8(__m512i *v, const steps_codes *u, const uint8_t *src, const int8_t *a, int64_t ng,
              const int C, const int S, const int NT) {
    __m512i x[RQ_TILE_TOKS], y[RQ_TILE_TOKS];
    steps_chunks4(x, u, src, a, ng, 0, C, S, NT);
    steps_chunks4(y, u, src, a, ng, 4, C, S, NT);
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) v[j] = pair_sums(x[j], y[j]);
}

/* A block's 16 / C chunks into one lane per group. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
steps_block(__m512i *d, const steps_codes *u, const uint8_t *src, const int8_t *a, int64_t ng,
            const int C, const int S, const int NT) {
    if (C == 8)
        steps_chunks2(d, u, src, a, ng, 0, C, S, NT);
    else if (C == 4)
        steps_chunks4(d, u, src, a, ng, 0, C, S, NT);
    else
        steps_chunks8(d, u, src, a, ng, C, S, NT);
}

/* Tokens [t0, t0 + NT) of tsr_rq_dot_packed_scaled for groups of 8, 16 and 32 in chunks of C
 * of S steps (groups of 64 S / C; C, S and NT constants in each inlined copy), with
 * act->q_ord in group steps: each 16 groups in one lane each, the zero point taken off
 * through the group sums, then one fma with the groups' P. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
steps_scaled_tile(float *y, int64_t ldy, const uint8_t *codes, int bits,
                  const tsr_rq_gscales *s, const tsr_rq_act *act, int64_t t0, int64_t n_g,
                  const int C, const int S, const int NT) {
    pthread_once(&g_vbmi_once, vbmi_tables);
    const int64_t group = 64 * S / C, group_bytes = group * bits / 8;
    const int64_t chunk_bytes = C * group_bytes;
    const steps_codes u = {
        act->n_pad,
        group_bytes,
        chunk_bytes == 64 ? ~(__mmask64)0 : ((__mmask64)1 << chunk_bytes) - 1,
        _mm512_loadu_si512(g_steps_idx[__builtin_ctz(group / 8)][bits]),
        _mm512_loadu_si512(g_vbmi_shift[bits]),
        _mm512_set1_epi8((char)((1u << bits) - 1)),
        _mm512_set1_epi8((char)(8 * bits / C))};
    const __m512i zv = _mm512_set1_epi32(s->zero);
    const uint8_t *src = codes;
    const int8_t *a = act->q_ord + t0 * act->n_pad;
    __m512 acc[RQ_TILE_TOKS], macc[RQ_TILE_TOKS];
    float P[RQ_TILE_TOKS][16];
    act_token at[RQ_TILE_TOKS];
    scaled_tile_start(acc, macc, at, act, t0, group, NT);
    for (int64_t g0 = 0; g0 < n_g; g0 += 16, src += 16 * group_bytes, a += 16 * group) {
        int64_t ng = n_g - g0 < 16 ? n_g - g0 : 16;
        __mmask16 gm = (__mmask16)((1u << ng) - 1);
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) macc[j] = scaled_block(P[j], macc[j], s, &at[j], g0, gm);
        __m512i d[RQ_TILE_TOKS];
        if (ng == 16) /* a copy whose chunks are whole: no masks to compute */
            steps_block(d, &u, src, a, 16, C, S, NT);
        else
            steps_block(d, &u, src, a, ng, C, S, NT);
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            if (s->zero)
                d[j] = _mm512_sub_epi32(
                    d[j], _mm512_mullo_epi32(zv, _mm512_maskz_loadu_epi32(gm, at[j].gsum + g0)));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[j]), _mm512_loadu_ps(P[j]), acc[j]);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) y[(t0 + j) * ldy] = lanes16_sum_zmm(acc[j], macc[j]);
}

/* Tokens [t0, t0 + NT) of tsr_rq_dot_packed_scaled for groups other than 8, 16 and 32: each
 * chunk of codes is unpacked once for the NT tokens, and each token keeps its own
 * accumulators, so a value does not depend on the tile; one group at a time. NT is a
 * constant in each inlined copy. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
dot_packed_scaled_tile(float *y, int64_t ldy, const uint8_t *codes, int bits,
                       const tsr_rq_gscales *s, const tsr_rq_act *act, int64_t t0, int64_t n_g,
                       const int NT) {
    const int64_t group = act->group;
    const vbmi_codes u = vbmi_codes_of(bits, group);
    const int32_t zero = s->zero;
    const __m512i zv = _mm512_set1_epi8((char)zero);
    __m512 acc[RQ_TILE_TOKS], macc[RQ_TILE_TOKS];
    float P[RQ_TILE_TOKS][16];
    act_token at[RQ_TILE_TOKS];
    scaled_tile_start(acc, macc, at, act, t0, group, NT);
    for (int64_t g0 = 0; g0 < n_g; g0 += 16) {
        int64_t ng = n_g - g0 < 16 ? n_g - g0 : 16;
        __mmask16 gm = (__mmask16)((1u << ng) - 1);
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) macc[j] = scaled_block(P[j], macc[j], s, &at[j], g0, gm);
        for (int64_t k = 0; k < ng; k++) {
            const uint8_t *src = codes + (g0 + k) * group * bits / 8;
            const int8_t *ag = act->q + t0 * act->n_pad + (g0 + k) * group;
            __m512i ac[RQ_TILE_TOKS], az[RQ_TILE_TOKS];
#pragma GCC unroll 4
            for (int j = 0; j < NT; j++) ac[j] = az[j] = _mm512_setzero_si512();
            for (int64_t i = 0; i < group; i += 64) {
                int whole = i + 64 <= group;
                __m512i c = vbmi_codes_at(&u, src + i / 8 * bits, whole);
#pragma GCC unroll 4
                for (int j = 0; j < NT; j++) {
                    __m512i av = vbmi_acts_at(&u, ag + j * act->n_pad, i, whole);
                    ac[j] = _mm512_dpbusd_epi32(ac[j], c, av);
                    az[j] = _mm512_dpbusd_epi32(az[j], zv, av);
                }
            }
#pragma GCC unroll 4
            for (int j = 0; j < NT; j++)
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ac[j], az[j])),
                                         _mm512_set1_ps(P[j][k]), acc[j]);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) y[(t0 + j) * ldy] = lanes16_sum_zmm(acc[j], macc[j]);
}

/* One token when the groups are whole 64-code steps (decode's case): the tile's operations in
 * the same order, so the same bits, in a loop of its own with running pointers, which the
 * compiler keeps in registers where the tile's copies juggle them. */
RQ_VBMI_TARGET __attribute__((noinline)) static float
dot_packed_scaled_token(const uint8_t *codes, int bits, const tsr_rq_gscales *s,
                        const tsr_rq_act *act, int64_t t, int64_t n_g) {
    const int64_t steps = act->group / 64, step_bytes = 8 * bits;
    const int32_t zero = s->zero;
    const vbmi_codes u = vbmi_codes_of(bits, act->group);
    const __m512i zv = _mm512_set1_epi8((char)zero);
    const uint8_t *src = codes;
    const int8_t *ag = act->q + t * act->n_pad;
    __m512 acc = _mm512_setzero_ps(), macc = _mm512_setzero_ps();
    float P[16];
    const act_token at = act_token_of(act, t, act->group);
    for (int64_t g0 = 0; g0 < n_g; g0 += 16) {
        int64_t ng = n_g - g0 < 16 ? n_g - g0 : 16;
        macc = scaled_block(P, macc, s, &at, g0, (__mmask16)((1u << ng) - 1));
        for (int64_t k = 0; k < ng; k++) {
            __m512i ac = _mm512_setzero_si512(), az = _mm512_setzero_si512();
            /* decode reads each row once: the prefetchers need help, as in tsr_matmul */
            _mm_prefetch((const char *)src + TSR_STREAM_PREFETCH, _MM_HINT_T0);
            for (int64_t i = 0; i < steps; i++, src += step_bytes, ag += 64) {
                __m512i av = _mm512_loadu_si512(ag);
                ac = _mm512_dpbusd_epi32(ac, vbmi_codes_at(&u, src, 1), av);
                if (zero) az = _mm512_dpbusd_epi32(az, zv, av);
            }
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ac, az)),
                                  _mm512_set1_ps(P[k]), acc);
        }
    }
    return lanes16_sum_zmm(acc, macc);
}

/* 4-bit codes as nibble pairs, tokens [t0, t0 + NT) (NT a constant in each inlined copy), in
 * the reference's order for them (lane l: the positions P of the row with P % 128 / 8 == l).
 * Groups of whole steps (group % 128 == 0) sum their steps' lanes, then take one fma with P_g;
 * steps of whole groups (128 % group == 0) take one fma with each lane's own P_g, the same
 * bits: a lane outside group g takes fma(0, P_g, acc) in the reference, which leaves it as it
 * is (acc is never -0). */
RQ_NIBBLE_TARGET __attribute__((always_inline)) static inline void
nibbles_scaled_tile(float *y, int64_t ldy, const uint8_t *codes, const tsr_rq_gscales *s,
                    const tsr_rq_act *act, int64_t t0, int64_t n_g, const int NT) {
    const int64_t group = act->group;
    const int32_t zero = s->zero;
    const __m512i zv = _mm512_set1_epi8((char)zero);
    const __m512i lane_groups = nibble_lane_groups(group);
    const int8_t *a_nib = act->q_ord + t0 * act->n_pad;
    __m512 acc[RQ_TILE_TOKS], macc[RQ_TILE_TOKS];
    float P[RQ_TILE_TOKS][16];
    act_token at[RQ_TILE_TOKS];
    scaled_tile_start(acc, macc, at, act, t0, group, NT);
    for (int64_t g0 = 0; g0 < n_g; g0 += 16) {
        int64_t ng = n_g - g0 < 16 ? n_g - g0 : 16;
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++)
            macc[j] = scaled_block(P[j], macc[j], s, &at[j], g0,
                                   (__mmask16)((1u << ng) - 1));
        const int64_t b0 = g0 * group, b1 = (g0 + ng) * group;
        if (group % 128 == 0) {
            for (int64_t k = 0; k < ng; k++) {
                __m512i lanes[RQ_TILE_TOKS];
#pragma GCC unroll 4
                for (int j = 0; j < NT; j++) lanes[j] = _mm512_setzero_si512();
                for (int64_t b = b0 + k * group; b < b0 + (k + 1) * group; b += 128) {
                    nibble_codes c = nibble_codes_at(codes + b / 2, 64);
#pragma GCC unroll 4
                    for (int j = 0; j < NT; j++)
                        lanes[j] = _mm512_add_epi32(
                            lanes[j], nibble_dot(c, a_nib + j * act->n_pad + b, 64, zero, zv));
                }
#pragma GCC unroll 4
                for (int j = 0; j < NT; j++)
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes[j]),
                                             _mm512_set1_ps(P[j][k]), acc[j]);
            }
        } else {
            const int per_step = (int)(128 / group);
            for (int64_t b = b0, k0 = 0; b < b1; b += 128, k0 += per_step) {
                int64_t half = (b1 - b < 128 ? b1 - b : 128) / 2;
                nibble_codes c = nibble_codes_at(codes + b / 2, half);
                __m512i k = _mm512_add_epi32(lane_groups, _mm512_set1_epi32((int)k0));
#pragma GCC unroll 4
                for (int j = 0; j < NT; j++) {
                    __m512i dot = nibble_dot(c, a_nib + j * act->n_pad + b, half, zero, zv);
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                             _mm512_permutexvar_ps(k, _mm512_loadu_ps(P[j])),
                                             acc[j]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) y[(t0 + j) * ldy] = lanes16_sum_zmm(acc[j], macc[j]);
}

RQ_NIBBLE_TARGET static void dot_nibbles_scaled(float *y, int64_t ldy, const uint8_t *codes,
                                                const tsr_rq_gscales *s, const tsr_rq_act *act,
                                                int64_t n_tok, int64_t n_g) {
    int64_t t = 0;
    for (; t + RQ_TILE_TOKS <= n_tok; t += RQ_TILE_TOKS)
        nibbles_scaled_tile(y, ldy, codes, s, act, t, n_g, RQ_TILE_TOKS);
    switch (n_tok - t) {
    case 3: nibbles_scaled_tile(y, ldy, codes, s, act, t, n_g, 3); break;
    case 2: nibbles_scaled_tile(y, ldy, codes, s, act, t, n_g, 2); break;
    case 1: nibbles_scaled_tile(y, ldy, codes, s, act, t, n_g, 1); break;
    default: break;
    }
}

RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
dot_steps_scaled_chunks(float *y, int64_t ldy, const uint8_t *codes, int bits,
                        const tsr_rq_gscales *s, const tsr_rq_act *act, int64_t n_tok,
                        int64_t n_g, const int C, const int S) {
    int64_t t = 0;
    if (C == 2) /* three levels of pending sums: four tokens' would not fit the registers */
        for (; t + 2 <= n_tok; t += 2)
            steps_scaled_tile(y, ldy, codes, bits, s, act, t, n_g, C, S, 2);
    else
        for (; t + RQ_TILE_TOKS <= n_tok; t += RQ_TILE_TOKS)
            steps_scaled_tile(y, ldy, codes, bits, s, act, t, n_g, C, S, RQ_TILE_TOKS);
    switch (n_tok - t) {
    case 3: steps_scaled_tile(y, ldy, codes, bits, s, act, t, n_g, C, S, 3); break;
    case 2: steps_scaled_tile(y, ldy, codes, bits, s, act, t, n_g, C, S, 2); break;
    case 1: steps_scaled_tile(y, ldy, codes, bits, s, act, t, n_g, C, S, 1); break;
    default: break;
    }
}

/* One function per chunk (C groups) and steps a chunk (C * group / 64) that groups of 8, 16
 * and 32 can take, each with registers of its own. */
#define RQ_STEPS_COPY(C, S)                                                                   \
    RQ_VBMI_TARGET __attribute__((noinline)) static void steps_scaled_##C##x##S(              \
        float *y, int64_t ldy, const uint8_t *codes, int bits, const tsr_rq_gscales *s,       \
        const tsr_rq_act *act, int64_t n_tok, int64_t n_g) {                                  \
        dot_steps_scaled_chunks(y, ldy, codes, bits, s, act, n_tok, n_g, C, S);               \
    }
RQ_STEPS_COPY(8, 1)
RQ_STEPS_COPY(8, 2)
RQ_STEPS_COPY(8, 4)
RQ_STEPS_COPY(4, 1)
RQ_STEPS_COPY(4, 2)
RQ_STEPS_COPY(2, 1)
#undef RQ_STEPS_COPY

RQ_VBMI_TARGET static void dot_steps_scaled(float *y, int64_t ldy, const uint8_t *codes,
                                            int bits, const tsr_rq_gscales *s,
                                            const tsr_rq_act *act, int64_t n_tok, int64_t n_g) {
    const int C = steps_chunk(bits, act->group);
    switch (C * 8 + (int)(C * act->group / 64)) {
    case 8 * 8 + 1: steps_scaled_8x1(y, ldy, codes, bits, s, act, n_tok, n_g); break;
    case 8 * 8 + 2: steps_scaled_8x2(y, ldy, codes, bits, s, act, n_tok, n_g); break;
    case 8 * 8 + 4: steps_scaled_8x4(y, ldy, codes, bits, s, act, n_tok, n_g); break;
    case 4 * 8 + 1: steps_scaled_4x1(y, ldy, codes, bits, s, act, n_tok, n_g); break;
    case 4 * 8 + 2: steps_scaled_4x2(y, ldy, codes, bits, s, act, n_tok, n_g); break;
    default: steps_scaled_2x1(y, ldy, codes, bits, s, act, n_tok, n_g); break;
    }
}

RQ_VBMI_TARGET static void dot_packed_scaled_vbmi(float *y, int64_t ldy, const uint8_t *codes,
                                                  int bits, const tsr_rq_gscales *s,
                                                  const tsr_rq_act *act, int64_t n_tok,
                                                  int64_t n_g) {
    int64_t t = 0;
    for (; t + RQ_TILE_TOKS <= n_tok; t += RQ_TILE_TOKS)
        dot_packed_scaled_tile(y, ldy, codes, bits, s, act, t, n_g, RQ_TILE_TOKS);
    switch (n_tok - t) {
    case 3: dot_packed_scaled_tile(y, ldy, codes, bits, s, act, t, n_g, 3); break;
    case 2: dot_packed_scaled_tile(y, ldy, codes, bits, s, act, t, n_g, 2); break;
    case 1:
        if (act->group % 64 == 0)
            y[t * ldy] = dot_packed_scaled_token(codes, bits, s, act, t, n_g);
        else
            dot_packed_scaled_tile(y, ldy, codes, bits, s, act, t, n_g, 1);
        break;
    default: break;
    }
}
#endif

void tsr_rq_dot_packed_scaled(float *y, int64_t ldy, const uint8_t *codes, int bits,
                              const tsr_rq_gscales *s, const tsr_rq_act *act, int64_t n_tok,
                              int64_t n_g) {
#ifdef RQ_X86
    if (bits == 4 && act->order == TSR_RQ_ORDER_NIBBLES &&
        tsr_cpu_level_get() == TSR_CPU_LEVEL_AVX512 &&
        (act->group % 128 == 0 || 128 % act->group == 0)) {
        dot_nibbles_scaled(y, ldy, codes, s, act, n_tok, n_g);
        return;
    }
    if (tsr_cpu_avx512_vbmi() && small_group(act->group) &&
        act->order == TSR_RQ_ORDER_STEPS(bits)) {
        dot_steps_scaled(y, ldy, codes, bits, s, act, n_tok, n_g);
        return;
    }
    if (tsr_cpu_avx512_vbmi() && !small_group(act->group) && bits != 4) {
        dot_packed_scaled_vbmi(y, ldy, codes, bits, s, act, n_tok, n_g);
        return;
    }
#endif
    float (*dot)(const uint8_t *, int, const tsr_rq_gscales *, const int8_t *, const int32_t *,
                 const float *, int64_t, int64_t, int64_t) = dot_packed_scaled_ref;
    int64_t gs = act->n_pad / act->group;
#ifdef RQ_X86
    if (bits == 4 && act->order == TSR_RQ_ORDER_NIBBLES &&
        tsr_cpu_level_get() >= TSR_CPU_LEVEL_AVX2 &&
        (act->group % 128 == 0 || 128 % act->group == 0)) {
        for (int64_t t = 0; t < n_tok; t++)
            y[t * ldy] = dot_nibbles_scaled_avx2(codes, s, act->q_ord + t * act->n_pad,
                                                 act->gsum + t * gs, act->d + t * act->n_scales,
                                                 act->n_scales > 1, act->group, n_g);
        return;
    }
    if (bits < 8 && bits != 4 && tsr_cpu_level_get() >= TSR_CPU_LEVEL_AVX2)
        dot = dot_packed_scaled_avx2;
#endif
    for (int64_t t = 0; t < n_tok; t++)
        y[t * ldy] = dot(codes, bits, s, act->q + t * act->n_pad, act->gsum + t * gs,
                         act->d + t * act->n_scales, act->n_scales > 1, act->group, n_g);
}

/* ---- fused products with f32 activations ------------------------------------------------ */

/* The order of tsr_rq_dot_packed_f32, which every level keeps. For each group g in turn, 16
 * f32 lanes S start at +0 and lane p % 16 takes fma(c_p, x_p, S) for the group's positions p
 * in order (x_p = 0 past the row); then the 16 lanes of accumulator set g % 4 take
 * fma(S, d_g, acc) (the scale, once per group; four sets, so that small groups do not wait
 * on one fma's latency each), and lane g % 16 of the offsets' set takes
 * fma(xsum_g, b_g, bacc) (once per group). At the end, lane by lane,
 * ((acc0 + acc1) + (acc2 + acc3)) + bacc, and the 16 lanes added as a tree (lanes16_sum). A
 * lane that a short chunk does not reach may take fma(0, 0, S) in a SIMD form: S is never -0
 * (it starts at +0 and a sum is -0 only when both terms are), so that leaves it unchanged. */
#define RQ_F32_SETS 4
static int gscales_offset(const tsr_rq_gscales *s) {
    return s->d16 ? s->zero != 0 || s->m16 : s->b != NULL;
}

static float gscale_b(const tsr_rq_gscales *s, int64_t g, float d) {
    if (!s->d16) return s->b[g];
    float nz = (float)-s->zero;
    return s->m16 ? fmaf(nz, d, tsr_rq_load_f16(s->m16 + 2 * g)) : nz * d;
}

void tsr_rq_act_f32_sums(float *xsum, const float *x, int64_t n_tok, int64_t n, int64_t group) {
    int64_t n_g = tsr_rq_groups(n, group);
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t g = 0; g < n_g; g++) {
            const float *xg = x + t * n + g * group;
            int64_t len = tsr_rq_group_len(g, group, n), p = 0;
            float lane[16] = {0};
            for (; p + 16 <= len; p += 16)
                for (int l = 0; l < 16; l++) lane[l] += xg[p + l];
            for (; p < len; p++) lane[p % 16] += xg[p];
            xsum[t * n_g + g] = lanes16_sum(lane);
        }
}

/* The end of the order: the four sets and the offsets' lanes, then the tree. */
static float f32_sets_sum(float acc[RQ_F32_SETS][16], const float bacc[16]) {
    float lanes[16];
    for (int l = 0; l < 16; l++)
        lanes[l] = ((acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l])) + bacc[l];
    return lanes16_sum(lanes);
}

static float dot_packed_f32_ref(const uint8_t *codes, int bits, const tsr_rq_gscales *s,
                                const float *x, const float *xsum, int64_t n, int64_t group,
                                int64_t n_g) {
    float acc[RQ_F32_SETS][16] = {{0}}, bacc[16] = {0};
    int offset = gscales_offset(s);
    uint8_t buf[64];
    for (int64_t g = 0; g < n_g; g++) {
        float S[16] = {0}, *a = acc[g % RQ_F32_SETS];
        for (int64_t i = 0; i < group; i += 64) {
            int64_t m = group - i < 64 ? group - i : 64, at = g * group + i;
            unpack_words(buf, codes + at / 8 * bits, m, bits);
            for (int64_t p = 0; p < m; p++)
                S[p % 16] = fmaf((float)buf[p], at + p < n ? x[at + p] : 0.0f, S[p % 16]);
        }
        float d = gscale_d(s, g);
        for (int l = 0; l < 16; l++) a[l] = fmaf(S[l], d, a[l]);
        if (offset) bacc[g % 16] = fmaf(xsum[g], gscale_b(s, g, d), bacc[g % 16]);
    }
    return f32_sets_sum(acc, bacc);
}

#ifdef RQ_X86
/* The reference's order with AVX2: lanes 0-7 in one ymm, 8-15 in the other; the codes of a
 * group unpacked to the stack 64 at a time, a chunk that the group or the row cuts short
 * padded with zeros on the stack. */
__attribute__((target("avx2,fma,f16c"))) static float
dot_packed_f32_avx2(const uint8_t *codes, int bits, const tsr_rq_gscales *s, const float *x,
                    const float *xsum, int64_t n, int64_t group, int64_t n_g) {
    __m256 acc[RQ_F32_SETS][2];
    float bacc[16] = {0}, sets[RQ_F32_SETS][16], xbuf[16];
    int offset = gscales_offset(s);
    uint8_t buf[64 + 16];
    for (int k = 0; k < RQ_F32_SETS; k++) acc[k][0] = acc[k][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_g; g++) {
        __m256 S[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t i = 0; i < group; i += 64) {
            int64_t m = group - i < 64 ? group - i : 64, at = g * group + i;
            unpack_words(buf, codes + at / 8 * bits, m, bits);
            memset(buf + m, 0, 16);
            for (int64_t p = 0; p < m; p += 16) {
                int64_t valid = m - p < n - at - p ? m - p : n - at - p;
                const float *xp = x + at + p;
                if (valid < 16) {
                    memset(xbuf, 0, sizeof xbuf);
                    if (valid > 0) memcpy(xbuf, xp, (size_t)valid * sizeof(float));
                    xp = xbuf;
                }
                for (int h = 0; h < 2; h++) {
                    __m128i c8 = _mm_loadl_epi64((const __m128i *)(buf + p + 8 * h));
                    __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c8));
                    S[h] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xp + 8 * h), S[h]);
                }
            }
        }
        float d = gscale_d(s, g);
        __m256 *a = acc[g % RQ_F32_SETS];
        for (int h = 0; h < 2; h++) a[h] = _mm256_fmadd_ps(S[h], _mm256_set1_ps(d), a[h]);
        if (offset) bacc[g % 16] = fmaf(xsum[g], gscale_b(s, g, d), bacc[g % 16]);
    }
    for (int k = 0; k < RQ_F32_SETS; k++) {
        _mm256_storeu_ps(sets[k], acc[k][0]);
        _mm256_storeu_ps(sets[k] + 8, acc[k][1]);
    }
    return f32_sets_sum(sets, bacc);
}

/* Chunk q (codes 16q..16q+15) of a 64-code step, one code per 32-bit lane, by one vpermb:
 * byte 4k of the index is 16q + k, the other bytes are zeroed by the mask. */
#define RQ_SPREAD_MASK ((__mmask64)0x1111111111111111ull)

RQ_VBMI_TARGET __attribute__((always_inline)) static inline __m512
vbmi_chunk_f32(__m512i codes64, int q) {
    const __m512i idx = _mm512_add_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(16 * q));
    return _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(RQ_SPREAD_MASK, idx, codes64));
}

/* Decode's loops take codes of 4 bits or fewer 16 (2 * bits bytes) at a time, with fewer
 * operations than the unpacking above: one 64-bit word broadcast from memory, vpmultishiftqb
 * moving code k's bits to the bottom of 32-bit lane k, and vpermps reading its value from a
 * table of 16 floats, table[i] = i mod 2^bits (the index's upper bits, the next codes' bits,
 * are ignored). The word is 8 bytes whatever the width: the caller keeps 8 bytes of the row
 * ahead of a step's start plus its 8 * bits. */
typedef struct narrow_codes {
    __m512i ctl;
    __m512 table;
} narrow_codes;

/* bits <= 4 (others get the tables of 4 bits, unused). */
RQ_VBMI_TARGET static inline narrow_codes narrow_codes_of(int bits) {
    pthread_once(&g_vbmi_once, vbmi_tables);
    int b = bits <= 4 ? bits : 4;
    return (narrow_codes){_mm512_loadu_si512(g_narrow_shift[b]),
                          _mm512_loadu_ps(g_narrow_value[b])};
}

RQ_VBMI_TARGET __attribute__((always_inline)) static inline __m512
narrow_chunk_f32(const narrow_codes *nc, const uint8_t *p) {
    long long w;
    memcpy(&w, p, sizeof w);
    return _mm512_permutexvar_ps(_mm512_multishift_epi64_epi8(nc->ctl, _mm512_set1_epi64(w)),
                                 nc->table);
}

/* The four chunks of the 64-code step at src as floats: narrow (above) or unpacked. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
step_codes_f32(__m512 cf[4], const vbmi_codes *u, const narrow_codes *nc, const uint8_t *src,
               int narrow) {
    if (narrow) {
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) cf[q] = narrow_chunk_f32(nc, src + 2 * u->bits * q);
        return;
    }
    __m512i c = vbmi_codes_at(u, src, 1);
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) cf[q] = vbmi_chunk_f32(c, q);
}

/* Groups [g0, g0 + 16) (mask gm): their d_g into P, and their b_g (zeros without offsets). */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline __m512
f32_block(float P[16], const tsr_rq_gscales *s, int64_t g0, __mmask16 gm) {
    __m512 d = gscales_block(s->d16, s->d, g0, gm);
    _mm512_storeu_ps(P, d);
    if (!s->d16) return s->b ? gscales_block(NULL, s->b, g0, gm) : _mm512_setzero_ps();
    __m512 nz = _mm512_set1_ps((float)-s->zero);
    return s->m16 ? _mm512_fmadd_ps(nz, d, gscales_block(s->m16, NULL, g0, gm))
                  : _mm512_mul_ps(nz, d);
}

/* The end of the order in registers: the four sets, the offsets' lanes, the tree. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline float
f32_sets_sum_zmm(const __m512 acc[RQ_F32_SETS], __m512 bacc) {
    return lanes16_sum_zmm(
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])), bacc);
}

/* Tokens [t0, t0 + NT) of tsr_rq_dot_packed_f32, any group and row length: each 64 codes are
 * unpacked and each chunk converted once for the NT tokens, whose activations are loaded
 * masked to the group and the row. NT is a constant in each inlined copy, and so is each
 * group's set (the groups of a block of 16 taken four at a time). */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
dot_packed_f32_tile(float *y, int64_t ldy, const uint8_t *codes, int bits,
                    const tsr_rq_gscales *s, const tsr_rq_act_f32 *x, int64_t t0, int64_t n_g,
                    const int NT) {
    const int64_t group = x->group, n = x->n;
    const vbmi_codes u = vbmi_codes_of(bits, group);
    const int offset = gscales_offset(s);
    __m512 acc[RQ_TILE_TOKS][RQ_F32_SETS], bacc[RQ_TILE_TOKS];
    float P[16];
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) {
        bacc[j] = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int r = 0; r < RQ_F32_SETS; r++) acc[j][r] = _mm512_setzero_ps();
    }
    for (int64_t g0 = 0; g0 < n_g; g0 += 16) {
        int64_t ng = n_g - g0 < 16 ? n_g - g0 : 16;
        __mmask16 gm = (__mmask16)((1u << ng) - 1);
        __m512 b = f32_block(P, s, g0, gm);
        if (offset) {
#pragma GCC unroll 4
            for (int j = 0; j < NT; j++)
                bacc[j] = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(gm, x->xsum + (t0 + j) * n_g + g0), b, bacc[j]);
        }
        for (int64_t k = 0; k < ng; k += RQ_F32_SETS) {
#pragma GCC unroll 4
            for (int r = 0; r < RQ_F32_SETS; r++) {
                if (k + r >= ng) break;
                const int64_t g = g0 + k + r;
                const uint8_t *src = codes + g * group * bits / 8;
                __m512 S[RQ_TILE_TOKS];
#pragma GCC unroll 4
                for (int j = 0; j < NT; j++) S[j] = _mm512_setzero_ps();
                for (int64_t i = 0; i < group; i += 64) {
                    __m512i c = vbmi_codes_at(&u, src + i / 8 * bits, i + 64 <= group);
                    for (int q = 0; q < 4 && i + 16 * q < group; q++) {
                        int64_t p = i + 16 * q, at = g * group + p;
                        int64_t valid = group - p < n - at ? group - p : n - at;
                        __mmask16 xm = valid >= 16 ? (__mmask16)0xffff
                                       : valid > 0 ? (__mmask16)((1u << valid) - 1)
                                                   : (__mmask16)0;
                        __m512 cf = vbmi_chunk_f32(c, q);
#pragma GCC unroll 4
                        for (int j = 0; j < NT; j++)
                            S[j] = _mm512_fmadd_ps(
                                cf, _mm512_maskz_loadu_ps(xm, x->x + (t0 + j) * n + at), S[j]);
                    }
                }
                __m512 d = _mm512_set1_ps(P[k + r]);
#pragma GCC unroll 4
                for (int j = 0; j < NT; j++) acc[j][r] = _mm512_fmadd_ps(S[j], d, acc[j][r]);
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) y[(t0 + j) * ldy] = f32_sets_sum_zmm(acc[j], bacc[j]);
}

/* Groups of 16 or 32 codes (PER chunks of 16) in decode's single-token loop: the groups of a
 * 64-code step share its unpacking, four groups (one per set) every PER steps. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline const uint8_t *
f32_token_small(__m512 acc[RQ_F32_SETS], const vbmi_codes *u, const narrow_codes *nc,
                const uint8_t *src, const uint8_t *narrow_end, const float **xp,
                const float *P, int64_t ng, const int PER) {
    const int64_t step_bytes = 8 * u->bits;
    const float *x = *xp;
    for (int64_t k = 0; k < ng; k += RQ_F32_SETS) {
#pragma GCC unroll 2
        for (int st = 0; st < PER; st++) {
            if (k + st * (4 / PER) >= ng) break;
            _mm_prefetch((const char *)src + TSR_STREAM_PREFETCH, _MM_HINT_T0);
            __m512 cf[4], S = _mm512_setzero_ps();
            step_codes_f32(cf, u, nc, src, src < narrow_end);
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) {
                S = _mm512_fmadd_ps(cf[q], _mm512_loadu_ps(x + 16 * q), S);
                if ((q + 1) % PER == 0) {
                    const int r = st * (4 / PER) + q / PER;
                    acc[r] = _mm512_fmadd_ps(S, _mm512_set1_ps(P[k + r]), acc[r]);
                    S = _mm512_setzero_ps();
                }
            }
            src += step_bytes;
            x += 64;
        }
    }
    *xp = x;
    return src;
}

/* One token of a row of whole groups, decode's case, with running pointers and no masks: a
 * group of 64 codes or more is whole 64-code steps; groups of 16 or 32 share a step (the row
 * then a multiple of 64 codes). The tile's operations in the same order, so the same bits. */
RQ_VBMI_TARGET __attribute__((noinline)) static float
dot_packed_f32_token(const uint8_t *codes, int bits, const tsr_rq_gscales *s, const float *x,
                     const float *xsum, int64_t group, int64_t n_g) {
    const vbmi_codes u = vbmi_codes_of(bits, 64);
    const narrow_codes nc = narrow_codes_of(bits);
    const int64_t step_bytes = 8 * bits;
    const int offset = gscales_offset(s);
    const uint8_t *src = codes;
    /* steps that start before it may read narrow words (which end up to 8 bytes past a step) */
    const uint8_t *narrow_end = bits <= 4 ? codes + n_g * group * bits / 8 - step_bytes - 8
                                          : codes;
    __m512 acc[RQ_F32_SETS], bacc = _mm512_setzero_ps();
    float P[16];
#pragma GCC unroll 4
    for (int r = 0; r < RQ_F32_SETS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < n_g; g0 += 16) {
        int64_t ng = n_g - g0 < 16 ? n_g - g0 : 16;
        __mmask16 gm = (__mmask16)((1u << ng) - 1);
        __m512 b = f32_block(P, s, g0, gm);
        if (offset) bacc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(gm, xsum + g0), b, bacc);
        if (group == 16) {
            src = f32_token_small(acc, &u, &nc, src, narrow_end, &x, P, ng, 1);
            continue;
        }
        if (group == 32) {
            src = f32_token_small(acc, &u, &nc, src, narrow_end, &x, P, ng, 2);
            continue;
        }
        for (int64_t k = 0; k < ng; k += RQ_F32_SETS) {
#pragma GCC unroll 4
            for (int r = 0; r < RQ_F32_SETS; r++) {
                if (k + r >= ng) break;
                __m512 S = _mm512_setzero_ps();
                /* decode reads each row once: the prefetchers need help, as in tsr_matmul */
                _mm_prefetch((const char *)src + TSR_STREAM_PREFETCH, _MM_HINT_T0);
                for (int64_t i = 0; i < group; i += 64, src += step_bytes, x += 64) {
                    __m512 cf[4];
                    step_codes_f32(cf, &u, &nc, src, src < narrow_end);
#pragma GCC unroll 4
                    for (int q = 0; q < 4; q++)
                        S = _mm512_fmadd_ps(cf[q], _mm512_loadu_ps(x + 16 * q), S);
                }
                acc[r] = _mm512_fmadd_ps(S, _mm512_set1_ps(P[k + r]), acc[r]);
            }
        }
    }
    return f32_sets_sum_zmm(acc, bacc);
}

RQ_VBMI_TARGET static void dot_packed_f32_vbmi(float *y, int64_t ldy, const uint8_t *codes,
                                               int bits, const tsr_rq_gscales *s,
                                               const tsr_rq_act_f32 *x, int64_t n_tok,
                                               int64_t n_g) {
    const int64_t group = x->group;
    int64_t t = 0;
    for (; t + RQ_TILE_TOKS <= n_tok; t += RQ_TILE_TOKS)
        dot_packed_f32_tile(y, ldy, codes, bits, s, x, t, n_g, RQ_TILE_TOKS);
    int whole = x->n == n_g * group &&
                (group % 64 == 0 || ((group == 16 || group == 32) && x->n % 64 == 0));
    switch (n_tok - t) {
    case 3: dot_packed_f32_tile(y, ldy, codes, bits, s, x, t, n_g, 3); break;
    case 2: dot_packed_f32_tile(y, ldy, codes, bits, s, x, t, n_g, 2); break;
    case 1:
        if (whole)
            y[t * ldy] = dot_packed_f32_token(codes, bits, s, x->x + t * x->n,
                                              x->xsum + t * n_g, group, n_g);
        else
            dot_packed_f32_tile(y, ldy, codes, bits, s, x, t, n_g, 1);
        break;
    default: break;
    }
}
#endif

void tsr_rq_dot_packed_f32(float *y, int64_t ldy, const uint8_t *codes, int bits,
                           const tsr_rq_gscales *s, const tsr_rq_act_f32 *x, int64_t n_tok,
                           int64_t n_g) {
#ifdef RQ_X86
    if (tsr_cpu_avx512_vbmi()) {
        dot_packed_f32_vbmi(y, ldy, codes, bits, s, x, n_tok, n_g);
        return;
    }
#endif
    float (*dot)(const uint8_t *, int, const tsr_rq_gscales *, const float *, const float *,
                 int64_t, int64_t, int64_t) = dot_packed_f32_ref;
#ifdef RQ_X86
    if (tsr_cpu_level_get() >= TSR_CPU_LEVEL_AVX2) dot = dot_packed_f32_avx2;
#endif
    for (int64_t t = 0; t < n_tok; t++)
        y[t * ldy] = dot(codes, bits, s, x->x + t * x->n, x->xsum + t * n_g, x->n, x->group,
                         n_g);
}

/* q = rne(x * 127 / amax), clamped (NaN, where amax is infinite, to -127 as the vector form's
 * conversion gives); returns the scale amax / 127 (0 and zeros for amax 0). */
static float act_quantize_span_scalar(int8_t *q, const float *x, int64_t n) {
    float amax = 0.0f;
    for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = nearbyintf(x[i] * id);
        q[i] = (int8_t)(v > 127.0f ? 127 : v >= -127.0f ? (int)v : -127);
    }
    return amax / 127.0f;
}

#ifdef RQ_X86
/* The same bits: the maximum ignores NaN as fmaxf does, and vcvtps2dq rounds to nearest even
 * under the default MXCSR as nearbyintf does. */
__attribute__((target("avx512f,avx512bw"))) static float
act_quantize_span_avx512(int8_t *q, const float *x, int64_t n) {
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i)), vmax);
    }
    float amax = _mm512_reduce_max_ps(vmax);
    const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), id));
        v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)),
                             _mm512_set1_epi32(-127));
        _mm512_mask_cvtepi32_storeu_epi8(q + i, m, v);
    }
    return amax / 127.0f;
}
#endif

static float act_quantize_span(int8_t *q, const float *x, int64_t n) {
#ifdef RQ_X86
    if (tsr_cpu_level_get() == TSR_CPU_LEVEL_AVX512) return act_quantize_span_avx512(q, x, n);
#endif
    return act_quantize_span_scalar(q, x, n);
}

static void act_group_sums(int32_t *gsum, const int8_t *q, int64_t n_pad, int64_t group) {
    for (int64_t g = 0; g < n_pad / group; g++) {
        int32_t s = 0;
        for (int64_t i = 0; i < group; i++) s += q[g * group + i];
        gsum[g] = s;
    }
}

void tsr_rq_act_quantize_row(int8_t *q, int32_t *gsum, float *d, const float *x, int64_t n,
                             int64_t n_pad, int64_t group) {
    *d = act_quantize_span(q, x, n);
    memset(q + n, 0, (size_t)(n_pad - n));
    act_group_sums(gsum, q, n_pad, group);
}

void tsr_rq_act_quantize_groups_row(int8_t *q, int32_t *gsum, float *d, const float *x,
                                    int64_t n, int64_t n_pad, int64_t group) {
    for (int64_t g = 0; g < n_pad / group; g++)
        d[g] = act_quantize_span(q + g * group, x + g * group, tsr_rq_group_len(g, group, n));
    memset(q + n, 0, (size_t)(n_pad - n));
    act_group_sums(gsum, q, n_pad, group);
}

void tsr_rq_act_nibble_order(int8_t *dst, const int8_t *q, int64_t n) {
    for (int64_t b = 0; b < n; b += 128) {
        int64_t half = (n - b < 128 ? n - b : 128) / 2;
        for (int64_t k = 0; k < half; k++) {
            dst[b + k] = q[b + 2 * k];
            dst[b + half + k] = q[b + 2 * k + 1];
        }
    }
}

int32_t tsr_rq_scaled_order(int bits, int64_t group) {
    if (bits == 4)
        return group % 128 == 0 || 128 % group == 0 ? TSR_RQ_ORDER_NIBBLES : TSR_RQ_ORDER_NONE;
    return small_group(group) ? TSR_RQ_ORDER_STEPS(bits) : TSR_RQ_ORDER_NONE;
}

void tsr_rq_act_steps_order(int8_t *dst, const int8_t *q, int64_t n_pad, int64_t group,
                            int bits) {
    const int64_t n_g = n_pad / group, C = steps_chunk(bits, group), span = 64 / C;
    for (int64_t c0 = 0; c0 < n_g; c0 += C) {
        const int64_t m = n_g - c0 < C ? n_g - c0 : C;
        int8_t *out = dst + c0 * group;
        for (int64_t k = 0; k < group / span; k++)
            for (int64_t i = 0; i < m; i++, out += span)
                memcpy(out, q + (c0 + i) * group + k * span, (size_t)span);
    }
}

void tsr_rq_act_reorder(int8_t *dst, const int8_t *q, int64_t n_pad, int64_t group,
                        int32_t order) {
    if (order == TSR_RQ_ORDER_NIBBLES)
        tsr_rq_act_nibble_order(dst, q, n_pad);
    else if (order != TSR_RQ_ORDER_NONE)
        tsr_rq_act_steps_order(dst, q, n_pad, group, order - TSR_RQ_ORDER_STEPS(0));
}

void tsr_rq_act_quantize(int8_t *q, int8_t *q_ord, int32_t order, int32_t *gsum, float *d,
                         const float *x, int64_t n_tok, int64_t n, int64_t n_pad, int64_t group,
                         int group_scales, int ith, int nth) {
    int64_t t0, t1, n_g = n_pad / group, n_d = group_scales ? n_g : 1;
    tsr_thread_slice(&t0, &t1, n_tok, 1, ith, nth);
    for (int64_t t = t0; t < t1; t++) {
        (group_scales ? tsr_rq_act_quantize_groups_row : tsr_rq_act_quantize_row)(
            q + t * n_pad, gsum + t * n_g, d + t * n_d, x + t * n, n, n_pad, group);
        tsr_rq_act_reorder(q_ord + t * n_pad, q + t * n_pad, n_pad, group, order);
    }
}

/* ---- quantized group statistics ------------------------------------------------------- */

/* The reference's arithmetic for groups [g0, g1): s = lo + step * c, unfused. */
static void stats_affine_ref(float *d, float *b, const uint8_t *sc, const uint8_t *zc, int bits,
                             const uint8_t *lo_step16, int64_t g0, int64_t g1, int64_t run) {
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *q = lo_step16 + 8 * (g / run);
        float s = tsr_rq_load_f16(q) + tsr_rq_load_f16(q + 2) * (float)tsr_rq_code_at(sc, g, bits);
        float z = tsr_rq_load_f16(q + 4) +
                  tsr_rq_load_f16(q + 6) * (float)tsr_rq_code_at(zc, g, bits);
        d[g] = s;
        b[g] = -(s * z);
    }
}

#ifdef RQ_X86
/* Runs of whole 16-group blocks: 64 codes of each stream unpacked in registers at a time,
 * then 16 groups per vector (vbmi_chunk_f32) with their run's minimum and step broadcast. */
RQ_VBMI_TARGET static void stats_affine_vbmi(float *d, float *b, const uint8_t *sc,
                                             const uint8_t *zc, int bits,
                                             const uint8_t *lo_step16, int64_t n_g,
                                             int64_t run) {
    const vbmi_codes u = vbmi_codes_of(bits, 64);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, z0 = s0, z1 = s0;
    const uint8_t *next_run = lo_step16;
    int64_t g = 0, in_run = 0; /* in_run: groups of the current run done */
    for (int64_t g0 = 0; g0 + 16 <= n_g; g0 += 64) {
        int64_t nb = ((n_g - g0 < 64 ? n_g - g0 : 64) * bits + 7) / 8;
        __mmask64 bm = nb == 64 ? ~(__mmask64)0 : ((__mmask64)1 << nb) - 1;
        __m512i cs = vbmi_codes_masked(&u, sc + g0 / 8 * bits, bm);
        __m512i cz = vbmi_codes_masked(&u, zc + g0 / 8 * bits, bm);
        for (int q = 0; q < 4 && g + 16 <= n_g; q++, g += 16) {
            if (in_run == 0) { /* s min, s step, z min, z step of the run */
                __m512 st = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(0xf, next_run));
                next_run += 8;
                s0 = _mm512_permutexvar_ps(_mm512_set1_epi32(0), st);
                s1 = _mm512_permutexvar_ps(_mm512_set1_epi32(1), st);
                z0 = _mm512_permutexvar_ps(_mm512_set1_epi32(2), st);
                z1 = _mm512_permutexvar_ps(_mm512_set1_epi32(3), st);
            }
            in_run = in_run + 16 == run ? 0 : in_run + 16;
            __m512 s = _mm512_add_ps(s0, _mm512_mul_ps(s1, vbmi_chunk_f32(cs, q)));
            __m512 z = _mm512_add_ps(z0, _mm512_mul_ps(z1, vbmi_chunk_f32(cz, q)));
            _mm512_storeu_ps(d + g, s);
            _mm512_storeu_ps(b + g, _mm512_castsi512_ps(_mm512_xor_si512(
                                        _mm512_castps_si512(_mm512_mul_ps(s, z)), sign)));
        }
    }
    stats_affine_ref(d, b, sc, zc, bits, lo_step16, g, n_g, run);
}
#endif

void tsr_rq_stats_affine(float *d, float *b, const uint8_t *sc, const uint8_t *zc, int bits,
                         const uint8_t *lo_step16, int64_t n_g, int64_t run) {
#ifdef RQ_X86
    if (run % 16 == 0 && tsr_cpu_avx512_vbmi()) {
        stats_affine_vbmi(d, b, sc, zc, bits, lo_step16, n_g, run);
        return;
    }
#endif
    stats_affine_ref(d, b, sc, zc, bits, lo_step16, 0, n_g, run);
}

/* ---- uniform codecs interleaved by 16 rows ---------------------------------------------- */

/* Token t's activation scale for group g (its one scale, or the group's). */
static inline float act_scale(const tsr_rq_act *act, int64_t t, int64_t g) {
    return act->d[t * act->n_scales + (act->n_scales > 1 ? g : 0)];
}

/* What a walk over an x16 matrix needs: groups per row and per run, units (four codes of 16
 * rows) per group, and the bytes of a unit, of a run's head, of a group's statistics, of a
 * group (statistics and units), of a whole run and of a block. */
typedef struct x16_dims {
    int64_t n_g, run, units;
    size_t unit_bytes, head_bytes, stat_bytes, group_bytes, run_bytes, block_bytes;
} x16_dims;

static x16_dims x16_dims_of(const tsr_rq_uniform *u, int64_t n_in) {
    x16_dims x;
    x.n_g = tsr_rq_groups(n_in, u->group);
    x.run = u->stats_bits ? u->stats_run : 1;
    x.units = u->group / 4;
    x.unit_bytes = 8 * (size_t)u->bits;
    x.head_bytes = (u->stats_bits ? 4 : u->has_min ? 2 : 1) * 16 * sizeof(uint16_t);
    x.stat_bytes = 4 * (size_t)u->stats_bits;
    x.group_bytes = x.stat_bytes + (size_t)x.units * x.unit_bytes;
    x.run_bytes = x.head_bytes + (size_t)x.run * x.group_bytes;
    int64_t rest = x.n_g % x.run;
    x.block_bytes = (size_t)(x.n_g / x.run) * x.run_bytes +
                    (rest ? x.head_bytes + (size_t)rest * x.group_bytes : 0);
    return x;
}

/* A walk over a block's groups in order: where in the block group g starts (its statistics,
 * then its units) and where its run's head does, without a division per group. */
typedef struct x16_walk {
    size_t head, at;
    int64_t in_run;
} x16_walk;

static inline x16_walk x16_walk_start(const x16_dims *x) {
    return (x16_walk){0, x->head_bytes, 0};
}

static inline void x16_walk_next(x16_walk *w, const x16_dims *x) {
    w->at += x->group_bytes;
    if (++w->in_run == x->run) {
        w->in_run = 0;
        w->head = w->at;
        w->at += x->head_bytes;
    }
}

/* Past the blocks, room for a 64-bit read from the last unit's last word. */
#define X16_SLACK 8

size_t tsr_rq_x16_bytes(const tsr_rq_uniform *u, int64_t n_in, int64_t n_out) {
    return (size_t)((n_out + 15) / 16) * x16_dims_of(u, n_in).block_bytes + X16_SLACK;
}

/* Group g's head (at its run's first group) and statistics for the n_r rows from `rows`. */
static void x16_pack_affine(uint8_t *blk, const x16_walk *w, const uint8_t *rows,
                            size_t row_bytes, int n_r, int64_t g, const tsr_rq_uniform *u,
                            const x16_dims *x) {
    uint8_t *head = blk + w->head, *gp = blk + w->at;
    if (w->in_run == 0)
        for (int r = 0; r < n_r; r++) {
            const uint8_t *row = rows + (size_t)r * row_bytes;
            if (u->stats_bits)
                for (int f = 0; f < 4; f++)
                    memcpy(head + 32 * f + 2 * r, row + u->d_at + 8 * (size_t)(g / x->run) + 2 * f,
                           2);
            else {
                memcpy(head + 2 * r, row + u->d_at + 2 * g, 2);
                if (u->has_min) memcpy(head + 32 + 2 * r, row + u->m_at + 2 * g, 2);
            }
        }
    if (u->stats_bits) {
        uint8_t codes[32] = {0};
        for (int r = 0; r < n_r; r++) {
            const uint8_t *row = rows + (size_t)r * row_bytes;
            codes[r] = tsr_rq_code_at(row + u->sc_at, g, u->stats_bits);
            codes[16 + r] = tsr_rq_code_at(row + u->zc_at, g, u->stats_bits);
        }
        tsr_rq_pack(gp, codes, 32, u->stats_bits);
    }
}

void tsr_rq_x16_pack(uint8_t *dst, const tsr_rq_matrix *m, const tsr_rq_uniform *u, int ith,
                     int nth) {
    x16_dims x = x16_dims_of(u, m->n_in);
    int64_t nb = (m->n_out + 15) / 16, b0, b1;
    tsr_thread_slice(&b0, &b1, nb, 1, ith, nth);
    if (b1 == nb && b0 < b1) memset(dst + (size_t)nb * x.block_bytes, 0, X16_SLACK);
    uint8_t unit[64];
    for (int64_t b = b0; b < b1; b++) {
        uint8_t *blk = dst + (size_t)b * x.block_bytes;
        const uint8_t *rows = m->rows + (size_t)(16 * b) * m->row_bytes;
        int n_r = m->n_out - 16 * b < 16 ? (int)(m->n_out - 16 * b) : 16;
        memset(blk, 0, x.block_bytes);
        x16_walk w = x16_walk_start(&x);
        for (int64_t g = 0; g < x.n_g; g++, x16_walk_next(&w, &x)) {
            x16_pack_affine(blk, &w, rows, m->row_bytes, n_r, g, u, &x);
            uint8_t *units = blk + w.at + x.stat_bytes;
            for (int64_t k = 0; k < x.units; k++) {
                memset(unit, 0, sizeof unit);
                for (int r = 0; r < n_r; r++) {
                    const uint8_t *codes = rows + (size_t)r * m->row_bytes + u->codes_at;
                    for (int i = 0; i < 4; i++)
                        unit[4 * r + i] = tsr_rq_code_at(codes, g * u->group + 4 * k + i, u->bits);
                }
                tsr_rq_pack(units + (size_t)k * x.unit_bytes, unit, 64, u->bits);
            }
        }
    }
}

/* Group g's affine map for rows [r0, r1) of a block: the product's d and m (inner = d (S - zero
 * A), then fma(m, A, inner) when m is used) and, with statistics, the zero z of the value
 * s (c - z). */
typedef struct x16_affine {
    float d[16], m[16], z[16];
} x16_affine;

static void x16_affine_ref(x16_affine *a, const uint8_t *blk, const x16_walk *w,
                           const tsr_rq_uniform *u, int r0, int r1) {
    const uint8_t *head = blk + w->head, *gp = blk + w->at;
    for (int r = r0; r < r1; r++) {
        if (u->stats_bits) {
            float sc = (float)tsr_rq_code_at(gp, r, u->stats_bits);
            float zc = (float)tsr_rq_code_at(gp, 16 + r, u->stats_bits);
            float s = tsr_rq_load_f16(head + 2 * r) + tsr_rq_load_f16(head + 32 + 2 * r) * sc;
            float z = tsr_rq_load_f16(head + 64 + 2 * r) + tsr_rq_load_f16(head + 96 + 2 * r) * zc;
            a->d[r] = s, a->m[r] = -(s * z), a->z[r] = z;
        } else {
            a->d[r] = tsr_rq_load_f16(head + 2 * r);
            a->m[r] = u->has_min ? tsr_rq_load_f16(head + 32 + 2 * r) : 0.0f;
            a->z[r] = 0.0f;
        }
    }
}

/* Whether the product takes m (a minimum, or the statistics' offset). */
static int x16_has_m(const tsr_rq_uniform *u) {
    return u->has_min || u->stats_bits;
}

/* Row r of block blk as f32, by tsr_rq_uniform's formula. */
static void x16_dequantize_row(float *y, const uint8_t *blk, int r, const tsr_rq_uniform *u,
                               const x16_dims *x, int64_t n_in) {
    x16_affine a;
    x16_walk w = x16_walk_start(x);
    for (int64_t g = 0; g < x->n_g; g++, x16_walk_next(&w, x)) {
        x16_affine_ref(&a, blk, &w, u, r, r + 1);
        const uint8_t *units = blk + w.at + x->stat_bytes;
        int64_t len = tsr_rq_group_len(g, u->group, n_in);
        for (int64_t i = 0; i < len; i++) {
            int32_t c = tsr_rq_code_at(units + (size_t)(i / 4) * x->unit_bytes, 4 * r + i % 4,
                                       u->bits);
            float v = u->stats_bits ? a.d[r] * ((float)c - a.z[r])
                                    : a.d[r] * (float)(c - u->zero);
            y[g * u->group + i] = u->has_min ? a.m[r] + v : v;
        }
    }
}

void tsr_rq_x16_deltas(uint32_t *count, tsr_rq_delta *deltas, const uint32_t *delta_off,
                       const tsr_rq_matrix *m, const tsr_rq_uniform *u, float *scratch, int ith,
                       int nth) {
    x16_dims x = x16_dims_of(u, m->n_in);
    float *full = scratch, *dense = scratch + m->n_in;
    int64_t r0, r1;
    tsr_thread_slice(&r0, &r1, m->n_out, 1, ith, nth);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *tail = m->tails + m->tail_off[r];
        m->codec->dequantize_row(m->cfg, full, m->rows + (size_t)r * m->row_bytes, tail,
                                 m->tail_off[r + 1] - m->tail_off[r], m->n_in);
        x16_dequantize_row(dense, m->x16 + (size_t)(r / 16) * x.block_bytes, (int)(r % 16), u,
                           &x, m->n_in);
        uint32_t n = 0;
        for (int64_t i = 0; i < m->n_in; i++) {
            if (full[i] == dense[i]) continue;
            if (deltas) deltas[delta_off[r] + n] = (tsr_rq_delta){(uint32_t)i, full[i],
                                                                  full[i] - dense[i]};
            n++;
        }
        if (count) count[r] = n;
    }
}

/* The reference product of block blk (its first n_r rows) with tokens [t0, t1): the order
 * of tsr_rq_matrix_mul's contract. */
static void x16_block_ref(float *y, int64_t ldy, const uint8_t *blk, int n_r,
                          const tsr_rq_uniform *u, const x16_dims *x, const tsr_rq_act *act,
                          int64_t t0, int64_t t1) {
    uint8_t c[64];
    x16_affine af;
    for (int64_t t = t0; t < t1; t++) {
        const int8_t *a = act->q + t * act->n_pad;
        float acc[16] = {0};
        x16_walk w = x16_walk_start(x);
        for (int64_t g = 0; g < x->n_g; g++, x16_walk_next(&w, x)) {
            const uint8_t *units = blk + w.at + x->stat_bytes;
            int32_t s[16] = {0};
            for (int64_t k = 0; k < x->units; k++) {
                unpack_words(c, units + (size_t)k * x->unit_bytes, 64, u->bits);
                const int8_t *ak = a + g * u->group + 4 * k;
                for (int r = 0; r < 16; r++)
                    for (int i = 0; i < 4; i++) s[r] += c[4 * r + i] * ak[i];
            }
            x16_affine_ref(&af, blk, &w, u, 0, 16);
            int32_t sum_a = act->gsum[t * x->n_g + g];
            float da = act_scale(act, t, g);
            for (int r = 0; r < 16; r++) {
                float inner = af.d[r] * (float)(s[r] - u->zero * sum_a);
                if (x16_has_m(u)) inner = fmaf(af.m[r], (float)sum_a, inner);
                acc[r] = fmaf(da, inner, acc[r]);
            }
        }
        for (int r = 0; r < n_r; r++) y[t * ldy + r] = acc[r];
    }
}

#ifdef RQ_X86
#define X16_TOK 8
/* The largest group whose unpacked codes (16 rows) the AVX2 product keeps on the stack. */
#define RQ_X16_GROUP_MAX 256

/* The head of a run as f32 vectors: d (and m), or s_min, s_step, z_min, z_step. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
x16_head_vbmi(__m512 h[4], const uint8_t *head, const tsr_rq_uniform *u) {
    const int n = u->stats_bits ? 4 : u->has_min ? 2 : 1;
    for (int f = 0; f < 4; f++)
        h[f] = f < n ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(head + 32 * f)))
                     : _mm512_setzero_ps();
}

/* x16_affine_ref's d and m of the group at p (its statistics, 32 codes unpacked by sc) from
 * its run's head h. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
x16_affine_vbmi(__m512 *d, __m512 *m, const __m512 h[4], const uint8_t *p,
                const tsr_rq_uniform *u, const vbmi_codes *sc) {
    if (!u->stats_bits) {
        *d = h[0], *m = h[1];
        return;
    }
    __m512i codes = vbmi_codes_masked(sc, p, sc->full_bytes);
    __m512 scf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(codes)));
    __m512 zcf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 1)));
    __m512 s = _mm512_add_ps(h[0], _mm512_mul_ps(h[1], scf));
    __m512 z = _mm512_add_ps(h[2], _mm512_mul_ps(h[3], zcf));
    *d = s;
    *m = _mm512_sub_ps(_mm512_set1_ps(-0.0f), _mm512_mul_ps(s, z));
}

/* nt tokens from t0 times n_blk blocks (both constants in each caller, so that the arrays
 * live in registers): each unit unpacked once, then one vpdpbusd per token. Decode takes two
 * blocks side by side, block i and block i + h of the slice, so that each is the next block of
 * a sequential stream (as tsr_stream_row_pairs does for rows), prefetched
 * TSR_STREAM_PREFETCH bytes ahead; with fewer than four products per unit the units alternate
 * between chains, so that no vpdpbusd waits on the one before. */
RQ_VBMI_TARGET __attribute__((always_inline)) static inline void
x16_blocks_vbmi(float *const *y, int64_t ldy, const uint8_t *const *blk, const __mmask16 *rows,
                const tsr_rq_uniform *u, const x16_dims *x, const vbmi_codes *vc,
                const vbmi_codes *sc, const tsr_rq_act *act, int64_t t0, const int nt,
                const int n_blk) {
    const int chains = nt * n_blk >= 4 ? 1 : 4 / (nt * n_blk), n_acc = nt * n_blk;
    __m512 acc[X16_TOK];
    __m512i s[X16_TOK];
    const int8_t *a = act->q + t0 * act->n_pad;
#pragma GCC unroll 8
    for (int j = 0; j < n_acc; j++) acc[j] = _mm512_setzero_ps();
    __m512 head[2][4];
    x16_walk w = x16_walk_start(x);
    for (int64_t g = 0; g < x->n_g; g++, x16_walk_next(&w, x)) {
        const size_t at = w.at + x->stat_bytes;
        const int8_t *ag = a + g * u->group;
        if (w.in_run == 0)
#pragma GCC unroll 2
            for (int bi = 0; bi < n_blk; bi++) x16_head_vbmi(head[bi], blk[bi] + w.head, u);
        if (n_blk == 2) {
            /* the group, and at a run's start its head */
            const size_t from = w.in_run ? w.at : w.head;
            for (int bi = 0; bi < 2; bi++)
                for (size_t o = from; o < at + x->group_bytes - x->stat_bytes; o += 64)
                    __builtin_prefetch(blk[bi] + o + TSR_STREAM_PREFETCH, 0, 3);
        }
#pragma GCC unroll 8
        for (int j = 0; j < n_acc * chains; j++) s[j] = _mm512_setzero_si512();
        for (int64_t k = 0; k < x->units; k += chains)
#pragma GCC unroll 4
            for (int c = 0; c < chains; c++) {
                if (k + c >= x->units) break;
                int32_t a4[X16_TOK];
#pragma GCC unroll 8
                for (int j = 0; j < nt; j++)
                    memcpy(&a4[j], ag + j * act->n_pad + 4 * (k + c), sizeof a4[j]);
#pragma GCC unroll 2
                for (int bi = 0; bi < n_blk; bi++) {
                    const uint8_t *unit = blk[bi] + at + (size_t)(k + c) * x->unit_bytes;
                    __m512i v = vbmi_codes_masked(vc, unit, vc->full_bytes);
#pragma GCC unroll 8
                    for (int j = 0; j < nt; j++) {
                        const int i = (bi * nt + j) * chains + c;
                        s[i] = _mm512_dpbusd_epi32(s[i], v, _mm512_set1_epi32(a4[j]));
                    }
                }
            }
#pragma GCC unroll 2
        for (int bi = 0; bi < n_blk; bi++) {
            __m512 d, m;
            x16_affine_vbmi(&d, &m, head[bi], blk[bi] + w.at, u, sc);
#pragma GCC unroll 8
            for (int j = 0; j < nt; j++) {
                const int i = bi * nt + j;
                int64_t t = t0 + j;
                __m512i sj = s[i * chains];
#pragma GCC unroll 4
                for (int c = 1; c < chains; c++) sj = _mm512_add_epi32(sj, s[i * chains + c]);
                int32_t sum_a = act->gsum[t * x->n_g + g];
                float da = act_scale(act, t, g);
                if (u->zero) sj = _mm512_sub_epi32(sj, _mm512_set1_epi32(u->zero * sum_a));
                __m512 inner = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sj));
                if (x16_has_m(u)) inner = _mm512_fmadd_ps(m, _mm512_set1_ps((float)sum_a), inner);
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(da), inner, acc[i]);
            }
        }
    }
#pragma GCC unroll 2
    for (int bi = 0; bi < n_blk; bi++)
#pragma GCC unroll 8
        for (int j = 0; j < nt; j++)
            _mm512_mask_storeu_ps(y[bi] + j * ldy, rows[bi], acc[bi * nt + j]);
}

RQ_VBMI_TARGET static void x16_mul_vbmi(float *y, int64_t ldy, const uint8_t *x16,
                                        int64_t n_out, const tsr_rq_uniform *u,
                                        const x16_dims *x, const tsr_rq_act *act,
                                        int64_t n_tok, int64_t b0, int64_t b1) {
    vbmi_codes vc = vbmi_codes_of(u->bits, 64);
    vbmi_codes sc = vbmi_codes_of(u->stats_bits ? u->stats_bits : 8, 64);
    sc.full_bytes = ((__mmask64)1 << x->stat_bytes) - 1;
    const uint8_t *blk[2];
    float *yb[2];
    __mmask16 rows[2];
    /* decode: blocks i and i + h side by side; else one block, tokens by tiles of 8 */
    const int pair = n_tok <= 2;
    const int64_t h = pair ? (b1 - b0 + 1) / 2 : b1 - b0;
    for (int64_t i = 0; i < h; i++) {
        int n_blk = 0;
        for (int64_t b = b0 + i; b < b1 && n_blk < 1 + pair; b += h, n_blk++) {
            int64_t n_r = n_out - 16 * b < 16 ? n_out - 16 * b : 16;
            blk[n_blk] = x16 + (size_t)b * x->block_bytes;
            yb[n_blk] = y + 16 * b;
            rows[n_blk] = (__mmask16)((1u << n_r) - 1);
        }
        if (pair && n_blk == 2) {
            if (n_tok == 1) x16_blocks_vbmi(yb, ldy, blk, rows, u, x, &vc, &sc, act, 0, 1, 2);
            else x16_blocks_vbmi(yb, ldy, blk, rows, u, x, &vc, &sc, act, 0, 2, 2);
            continue;
        }
        for (int64_t t0 = 0; t0 < n_tok; t0 += X16_TOK) {
            float *yt[1] = {yb[0] + t0 * ldy};
            switch (n_tok - t0 < X16_TOK ? n_tok - t0 : X16_TOK) {
            case 1: x16_blocks_vbmi(yt, ldy, blk, rows, u, x, &vc, &sc, act, t0, 1, 1); break;
            case 2: x16_blocks_vbmi(yt, ldy, blk, rows, u, x, &vc, &sc, act, t0, 2, 1); break;
            case 3: x16_blocks_vbmi(yt, ldy, blk, rows, u, x, &vc, &sc, act, t0, 3, 1); break;
            case 4: x16_blocks_vbmi(yt, ldy, blk, rows, u, x, &vc, &sc, act, t0, 4, 1); break;
            case 5: x16_blocks_vbmi(yt, ldy, blk, rows, u, x, &vc, &sc, act, t0, 5, 1); break;
            case 6: x16_blocks_vbmi(yt, ldy, blk, rows, u, x, &vc, &sc, act, t0, 6, 1); break;
            case 7: x16_blocks_vbmi(yt, ldy, blk, rows, u, x, &vc, &sc, act, t0, 7, 1); break;
            default: x16_blocks_vbmi(yt, ldy, blk, rows, u, x, &vc, &sc, act, t0, 8, 1); break;
            }
        }
    }
}

/* A unit's 64 codes, one per byte: each 64-bit word of eight codes spread by one pdep (the
 * word read whole: tsr_rq_x16_bytes leaves room past the last unit). */
__attribute__((target("bmi2"))) static inline void x16_unit_bmi2(uint8_t *c, const uint8_t *p,
                                                                 int bits) {
    const uint64_t spread = 0x0101010101010101ull * ((1u << bits) - 1);
    for (int w = 0; w < 8; w++) {
        uint64_t v;
        memcpy(&v, p + w * bits, sizeof v);
        v = _pdep_u64(v, spread);
        memcpy(c + 8 * w, &v, sizeof v);
    }
}

/* Without VBMI: a group's units unpacked once to the stack (x16_unit_bmi2), then for each
 * token of a tile of 8 the codes widened to 16 bits and multiplied by vpmaddwd with the four
 * activations, whose pairs of 32-bit lanes (a row's two pairs) one vphaddd folds; the float
 * steps are the reference's, eight rows a vector (statistics decoded by the reference). */
__attribute__((target("avx2,fma,f16c,bmi2"))) static void
x16_block_avx2(float *y, int64_t ldy, const uint8_t *blk, int n_r, const tsr_rq_uniform *u,
               const x16_dims *x, const tsr_rq_act *act, int64_t n_tok) {
    uint8_t c[16 * RQ_X16_GROUP_MAX];
    float acc[X16_TOK][16];
    for (int64_t t0 = 0; t0 < n_tok; t0 += X16_TOK) {
        const int64_t nt = n_tok - t0 < X16_TOK ? n_tok - t0 : X16_TOK;
        memset(acc, 0, sizeof acc);
        x16_walk w = x16_walk_start(x);
        for (int64_t g = 0; g < x->n_g; g++, x16_walk_next(&w, x)) {
            const uint8_t *units = blk + w.at + x->stat_bytes;
            const uint8_t *head = blk + w.head;
            for (int64_t k = 0; k < x->units; k++)
                x16_unit_bmi2(c + 64 * k, units + (size_t)k * x->unit_bytes, u->bits);
            __m256 d[2], m[2];
            x16_affine af;
            if (u->stats_bits) x16_affine_ref(&af, blk, &w, u, 0, 16);
            for (int h = 0; h < 2; h++) {
                if (u->stats_bits) {
                    d[h] = _mm256_loadu_ps(af.d + 8 * h);
                    m[h] = _mm256_loadu_ps(af.m + 8 * h);
                    continue;
                }
                d[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(head + 16 * h)));
                m[h] = u->has_min ? _mm256_cvtph_ps(
                                        _mm_loadu_si128((const __m128i *)(head + 32 + 16 * h)))
                                  : _mm256_setzero_ps();
            }
            for (int64_t j = 0; j < nt; j++) {
                const int64_t t = t0 + j;
                const int8_t *ag = act->q + t * act->n_pad + g * u->group;
                __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(),
                                _mm256_setzero_si256(), _mm256_setzero_si256()};
                for (int64_t k = 0; k < x->units; k++) {
                    int32_t a4;
                    memcpy(&a4, ag + 4 * k, sizeof a4);
                    const __m256i av = _mm256_cvtepi8_epi16(_mm_set1_epi32(a4));
                    for (int q = 0; q < 4; q++) {
                        __m256i cw = _mm256_cvtepu8_epi16(
                            _mm_loadu_si128((const __m128i *)(c + 64 * k + 16 * q)));
                        s[q] = _mm256_add_epi32(s[q], _mm256_madd_epi16(cw, av));
                    }
                }
                int32_t sum_a = act->gsum[t * x->n_g + g];
                float da = act_scale(act, t, g);
                for (int h = 0; h < 2; h++) {
                    /* rows 8h..8h+7 in order: vphaddd interleaves the 128-bit halves */
                    __m256i rows8 = _mm256_permute4x64_epi64(
                        _mm256_hadd_epi32(s[2 * h], s[2 * h + 1]), 0xd8);
                    __m256 inner = _mm256_mul_ps(
                        d[h], _mm256_cvtepi32_ps(_mm256_sub_epi32(
                                  rows8, _mm256_set1_epi32(u->zero * sum_a))));
                    if (x16_has_m(u))
                        inner = _mm256_fmadd_ps(m[h], _mm256_set1_ps((float)sum_a), inner);
                    _mm256_storeu_ps(acc[j] + 8 * h,
                                     _mm256_fmadd_ps(_mm256_set1_ps(da), inner,
                                                     _mm256_loadu_ps(acc[j] + 8 * h)));
                }
            }
        }
        for (int64_t j = 0; j < nt; j++)
            memcpy(y + (t0 + j) * ldy, acc[j], (size_t)n_r * sizeof(float));
    }
}
#endif

/* The int8 product of blocks [b0, b1) of m->x16. */
static void x16_mul(float *y, const tsr_rq_matrix *m, const tsr_rq_uniform *u,
                    const tsr_rq_act *act, int64_t n_tok, int64_t b0, int64_t b1) {
    x16_dims x = x16_dims_of(u, m->n_in);
#ifdef RQ_X86
    if (tsr_cpu_avx512_vbmi()) {
        x16_mul_vbmi(y, m->n_out, m->x16, m->n_out, u, &x, act, n_tok, b0, b1);
        return;
    }
    const int avx2 = tsr_cpu_level_get() >= TSR_CPU_LEVEL_AVX2 && u->group <= RQ_X16_GROUP_MAX;
#endif
    for (int64_t b = b0; b < b1; b++) {
        int n_r = m->n_out - 16 * b < 16 ? (int)(m->n_out - 16 * b) : 16;
        const uint8_t *blk = m->x16 + (size_t)b * x.block_bytes;
#ifdef RQ_X86
        if (avx2) {
            x16_block_avx2(y + 16 * b, m->n_out, blk, n_r, u, &x, act, n_tok);
            continue;
        }
#endif
        x16_block_ref(y + 16 * b, m->n_out, blk, n_r, u, &x, act, 0, n_tok);
    }
}

/* The deltas of rows [r0, r1) times n_tok tokens' int8 activations, into y. */
static void x16_add_deltas(float *y, const tsr_rq_matrix *m, const tsr_rq_act *act,
                           int64_t n_tok, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (uint32_t k = m->delta_off[r]; k < m->delta_off[r + 1]; k++) {
            const tsr_rq_delta e = m->deltas[k];
            const int64_t g = e.col / act->group;
            for (int64_t t = 0; t < n_tok; t++) {
                float a = act_scale(act, t, g) *
                          (float)act->q[t * act->n_pad + e.col];
                y[t * m->n_out + r] = fmaf(e.delta, a, y[t * m->n_out + r]);
            }
        }
}

/* ---- matrices of a row codec ------------------------------------------------------------ */

typedef struct rq_row {
    uint8_t *row, *tail;
    size_t tail_bytes;
} rq_row;

static rq_row row_at(const tsr_rq_matrix *m, int64_t r) {
    rq_row out = {m->rows + (size_t)r * m->row_bytes, NULL, 0};
    if (m->tail_off) {
        out.tail = m->tails + m->tail_off[r];
        out.tail_bytes = m->tail_off[r + 1] - m->tail_off[r];
    }
    return out;
}

static const uint8_t *src_row(const void *src, size_t src_row_bytes, int64_t r) {
    return (const uint8_t *)src + (size_t)r * src_row_bytes;
}

void tsr_rq_matrix_tail_sizes(uint32_t *tail_len, const tsr_rq_matrix *m, const void *src,
                              int32_t src_dtype, size_t src_row_bytes, float *scratch, int ith,
                              int nth) {
    int64_t r0, r1;
    tsr_thread_slice(&r0, &r1, m->n_out, 1, ith, nth);
    for (int64_t r = r0; r < r1; r++) {
        tsr_row_to_f32(scratch, src_dtype, src_row(src, src_row_bytes, r), m->n_in);
        tail_len[r] = (uint32_t)m->codec->tail_bytes(m->cfg, scratch, m->n_in);
    }
}

void tsr_rq_matrix_quantize(const tsr_rq_matrix *m, double *err, double *norm, const void *src,
                            int32_t src_dtype, size_t src_row_bytes, float *scratch, int ith,
                            int nth) {
    int64_t n_in = m->n_in, r0, r1;
    tsr_thread_slice(&r0, &r1, m->n_out, 1, ith, nth);
    float *w = scratch, *back = scratch + n_in;
    for (int64_t r = r0; r < r1; r++) {
        tsr_row_to_f32(w, src_dtype, src_row(src, src_row_bytes, r), n_in);
        rq_row q = row_at(m, r);
        m->codec->quantize_row(m->cfg, q.row, q.tail, w, n_in);
        m->codec->dequantize_row(m->cfg, back, q.row, q.tail, q.tail_bytes, n_in);
        double e = 0, s = 0;
        for (int64_t i = 0; i < n_in; i++) {
            double dv = (double)w[i] - (double)back[i];
            e += dv * dv;
            s += (double)w[i] * (double)w[i];
        }
        err[r] = e;
        norm[r] = s;
    }
}

static tsr_rq_uniform uniform_of(const tsr_rq_matrix *m) {
    tsr_rq_uniform u;
    m->codec->uniform(m->cfg, m->n_in, &u);
    return u;
}

static void dequantize_row_at(float *y, const tsr_rq_matrix *m, int64_t r) {
    if (m->x16) {
        tsr_rq_uniform u = uniform_of(m);
        x16_dims x = x16_dims_of(&u, m->n_in);
        x16_dequantize_row(y, m->x16 + (size_t)(r / 16) * x.block_bytes, (int)(r % 16), &u, &x,
                           m->n_in);
        if (m->delta_off)
            for (uint32_t k = m->delta_off[r]; k < m->delta_off[r + 1]; k++)
                y[m->deltas[k].col] = m->deltas[k].value;
        return;
    }
    rq_row q = row_at(m, r);
    m->codec->dequantize_row(m->cfg, y, q.row, q.tail, q.tail_bytes, m->n_in);
}

void tsr_rq_matrix_dequantize(float *y, const tsr_rq_matrix *m, int64_t row0, int64_t n_rows) {
    for (int64_t r = 0; r < n_rows; r++) dequantize_row_at(y + r * m->n_in, m, row0 + r);
}

/* One token's product of a row with the codec's fused product: int8 (act) or f32 (xf). */
typedef struct rq_pair {
    const tsr_rq_matrix *m;
    const tsr_rq_act *act;
    const tsr_rq_act_f32 *xf;
    uint8_t *scratch;
} rq_pair;

static void rq_pair_run(void *ctx, float v[2], const char *w, size_t partner, int n_r) {
    const rq_pair *p = ctx;
    const tsr_rq_matrix *m = p->m;
    for (int k = 0; k < n_r; k++) {
        const uint8_t *row = (const uint8_t *)w + k * partner;
        /* the row's index, for its tail (a division per row only for codecs with tails) */
        rq_row q = m->tail_off ? row_at(m, (int64_t)(row - m->rows) / (int64_t)m->row_bytes)
                               : (rq_row){(uint8_t *)row, NULL, 0};
        if (p->act)
            m->codec->dot_q8(m->cfg, v + k, 1, q.row, q.tail, q.tail_bytes, p->act, 1, m->n_in,
                             p->scratch);
        else
            m->codec->dot_f32(m->cfg, v + k, 1, q.row, q.tail, q.tail_bytes, p->xf, 1, m->n_in,
                              (float *)p->scratch);
    }
}

/* The f32 row scratch, then (with dot_f32) the activations' group sums. */
static size_t f32_row_scratch(int64_t n_in) {
    return ((size_t)n_in * sizeof(float) + 63) & ~(size_t)63;
}

size_t tsr_rq_matrix_mul_scratch(const tsr_rq_matrix *m, int64_t n_tok, int64_t act_n_pad) {
    if (act_n_pad > 0) return ((size_t)act_n_pad + 63) & ~(size_t)63;
    size_t sums = 0;
    if (m->codec->dot_f32)
        sums = (size_t)(n_tok * tsr_rq_groups(m->n_in, m->codec->f32_group(m->cfg))) *
               sizeof(float);
    return f32_row_scratch(m->n_in) + ((sums + 63) & ~(size_t)63);
}

void tsr_rq_matrix_mul(float *y, const tsr_rq_matrix *m, const float *x, const tsr_rq_act *act,
                       int64_t n_tok, uint8_t *scratch, int ith, int nth) {
    int64_t n_in = m->n_in, n_out = m->n_out, r0, r1;
    tsr_thread_slice(&r0, &r1, n_out, 16, ith, nth);
    if (m->x16 && act) {
        tsr_rq_uniform u = uniform_of(m);
        x16_mul(y, m, &u, act, n_tok, r0 / 16, (r1 + 15) / 16);
        if (m->delta_off) x16_add_deltas(y, m, act, n_tok, r0, r1);
        return;
    }
    tsr_rq_act_f32 xf = {x, NULL, n_in, 0};
    int fused_f32 = !act && m->codec->dot_f32 && !m->x16;
    if (fused_f32) { /* every thread sums the few activations itself: no second pass to wait for */
        xf.group = m->codec->f32_group(m->cfg);
        float *xsum = (float *)(scratch + f32_row_scratch(n_in));
        tsr_rq_act_f32_sums(xsum, x, n_tok, n_in, xf.group);
        xf.xsum = xsum;
    }
    if ((act || fused_f32) && n_tok == 1) { /* decode: two streams */
        rq_pair p = {m, act, &xf, scratch};
        tsr_stream_row_pairs(rq_pair_run, &p, y, m->rows, m->row_bytes, r0, r1);
        return;
    }
    float *row = (float *)scratch;
    for (int64_t r = r0; r < r1; r++) {
        if (act || fused_f32) {
            rq_row q = row_at(m, r);
            if (act)
                m->codec->dot_q8(m->cfg, y + r, n_out, q.row, q.tail, q.tail_bytes, act, n_tok,
                                 n_in, scratch);
            else
                m->codec->dot_f32(m->cfg, y + r, n_out, q.row, q.tail, q.tail_bytes, &xf, n_tok,
                                  n_in, row);
        } else {
            dequantize_row_at(row, m, r);
            for (int64_t t = 0; t < n_tok; t++)
                y[t * n_out + r] = tsr_dot_f32(row, x + t * n_in, n_in);
        }
    }
}
