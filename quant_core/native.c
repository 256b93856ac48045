/* The column loops of GPTQ and of its polish (quant_core/gptq.py), compiled by quant_core/native.py.
 *
 * Both loops go over a block of weight columns one column at a time, and each column's decision
 * depends on the columns before it; every output row, though, is its own problem. So a tile of
 * TILE outputs is taken through all the block's columns before the next tile: a column's value is
 * its input plus the corrections of the columns before it ("left-looking"), summed in registers
 * from the tile's earlier errors or steps (rows x TILE floats, which stay in the L1 cache). The
 * torch code does the same arithmetic as a handful of whole-row operations per column, each one
 * pass over memory plus its dispatch.
 *
 * Arrays are row-major float32: a block holds one weight column per row, `width` outputs long.
 */
#include <stdint.h>
#include <string.h>

#define TILE 64

/* Round-to-nearest-even onto an fp8 grid, saturating at +-limit, as fp8.GridRounding does: a value
 * with 2^e <= |v| < 2^(e+1) lies on a grid of spacing s = 2^(e - mantissa) (at least the
 * subnormals'), and (v + m) - m with m = 1.5 * 2^23 * s rounds it there in two exact additions.
 * `shift` and `lowest` are GridRounding's constants for m's bits. */
static inline float grid_round(float v, float limit, uint32_t shift, int32_t lowest) {
    float clamped = v > limit ? limit : (v < -limit ? -limit : v);
    uint32_t bits;
    memcpy(&bits, &clamped, sizeof bits);
    int32_t magic = (int32_t)((bits & 0x7F800000u) + shift);
    magic = magic < lowest ? lowest : magic;
    float m;
    memcpy(&m, &magic, sizeof m);
    float rounded = (clamped + m) - m;
    uint32_t sign, out;
    memcpy(&sign, &v, sizeof sign);
    memcpy(&out, &rounded, sizeof out);
    out = (out & 0x7FFFFFFFu) | (sign & 0x80000000u); /* a value that rounds to zero keeps its sign */
    memcpy(&rounded, &out, sizeof rounded);
    return rounded;
}

/* The fp8 code (bits) of a value on the grid of a format with `mantissa` bits and smallest normal
 * exponent `lowest_exponent` (its bias is 1 - lowest_exponent): the exponent and mantissa bits of a
 * normal value are float32's, moved; a subnormal one is an integer multiple of the spacing. */
static inline uint8_t fp8_code(float value, int32_t mantissa, int32_t lowest_exponent) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    const uint32_t sign = (bits >> 24) & 0x80u, magnitude = bits & 0x7FFFFFFFu;
    const int32_t exponent = (int32_t)(magnitude >> 23) - 127;
    float multiple;
    memcpy(&multiple, &magnitude, sizeof multiple);
    const uint32_t normal = (uint32_t)(exponent + 1 - lowest_exponent) << mantissa | (magnitude & 0x7FFFFFu) >> (23 - mantissa);
    const uint32_t subnormal = (uint32_t)(multiple * (float)(1u << (mantissa - lowest_exponent)));
    const uint32_t code = exponent >= lowest_exponent ? normal : subnormal; /* both made: no branch, so it vectorises */
    return (uint8_t)(sign | code);
}

typedef float lanes __attribute__((vector_size(64))); /* 16 floats: one AVX-512 register, or several narrower */
#define LANES 16
#define VECTORS (TILE / LANES)

/* One tile of `n` <= TILE outputs through a GPTQ block; the tile is padded with zeros to TILE.
 * Inlined twice: with n = TILE for whole tiles (every loop a constant count), and for the last. */
static inline __attribute__((always_inline)) void gptq_tile(const float *work, const void *product, int32_t product_is_bf16, int64_t rows, int64_t width,
                      const float *relative, const float *diagonal, uint8_t *codes, float *errors, float limit,
                      uint32_t shift, int32_t lowest, int32_t mantissa, int32_t lowest_exponent, int64_t start,
                      int64_t n) {
    lanes tile[rows][VECTORS]; /* the tile's errors, contiguous: rows `width` apart share cache sets */
    for (int64_t j = 0; j < rows; j++) {
        float column[TILE] __attribute__((aligned(64))) = {0};
        const int64_t at = j * width + start;
        for (int64_t t = 0; t < n; t++) column[t] = work[at + t];
        if (product_is_bf16) {
            const uint16_t *p = (const uint16_t *)product + at;
            for (int64_t t = 0; t < n; t++) {
                const uint32_t bits = (uint32_t)p[t] << 16;
                float value;
                memcpy(&value, &bits, sizeof value);
                column[t] -= value;
            }
        } else if (product) {
            for (int64_t t = 0; t < n; t++) column[t] -= ((const float *)product)[at + t];
        }
        lanes sum[VECTORS];
        memcpy(sum, column, sizeof sum);
        for (int64_t i = 0; i < j; i++) { /* the corrections of the earlier columns, in registers */
            const float weight = relative[i * rows + j];
            for (int v = 0; v < VECTORS; v++) sum[v] -= weight * tile[i][v];
        }
        memcpy(column, sum, sizeof sum);
        float error[TILE] __attribute__((aligned(64)));
        for (int64_t t = 0; t < TILE; t++) {
            const float value = grid_round(column[t], limit, shift, lowest);
            error[t] = column[t] - value;
            column[t] = value;
        }
        memcpy(tile[j], error, sizeof error);
        for (int64_t t = 0; t < n; t++) {
            codes[at + t] = fp8_code(column[t], mantissa, lowest_exponent);
            errors[at + t] = error[t] / diagonal[j];
        }
    }
}

/* GPTQ's rounding of a block (gptq._BlockRounding): column j, its `work` row minus its `product` row
 * (the compensation from earlier blocks: bfloat16, float32 or none), is rounded after the errors
 * of the columns i < j reached it through relative[i][j] (the block's part of the Cholesky factor
 * of H^-1, rows divided by their diagonal). Writes the fp8 codes and the errors divided by
 * `diagonal`; `work` and `product` are not changed. */
void gptq_block(const float *work, const void *product, int32_t product_is_bf16, int64_t rows, int64_t width,
                const float *relative, const float *diagonal, uint8_t *codes, float *errors, float limit,
                uint32_t shift, int32_t lowest, int32_t mantissa, int32_t lowest_exponent) {
    int64_t start = 0;
    for (; start + TILE <= width; start += TILE)
        gptq_tile(work, product, product_is_bf16, rows, width, relative, diagonal, codes, errors, limit, shift,
                  lowest, mantissa, lowest_exponent, start, TILE);
    if (start < width)
        gptq_tile(work, product, product_is_bf16, rows, width, relative, diagonal, codes, errors, limit, shift,
                  lowest, mantissa, lowest_exponent, start, width - start);
}

static inline __attribute__((always_inline)) void polish_tile(
    uint8_t *codes, const float *gradient, int64_t rows, int64_t width, const float *local, const float *inverse,
    float *steps, const float *up, const float *down, const uint8_t *up_code, const uint8_t *down_code,
    const uint8_t *same_code, int64_t start, int64_t n) {
    float tile[rows][TILE]; /* the tile's steps, contiguous: rows `width` apart share cache sets */
    for (int64_t i = 0; i < rows; i++) {
        float slope[TILE];
        const float *source = gradient + i * width + start;
        for (int64_t t = 0; t < n; t++) slope[t] = source[t];
        for (int64_t k = 0; k < i; k++) {
            const float weight = local[k * rows + i];
            for (int64_t t = 0; t < n; t++) slope[t] += weight * tile[k][t];
        }
        uint8_t *code = codes + i * width + start;
        float *step = steps + i * width + start;
        for (int64_t t = 0; t < n; t++) {
            const float s = slope[t] * inverse[i];
            const float high = up[code[t]], low = down[code[t]];
            const float clamped = s > high ? high : (s < low ? low : s);
            tile[i][t] = step[t] = s != clamped ? clamped : 0.0f;
            code[t] = step[t] > 0.0f ? up_code[code[t]] : (step[t] < 0.0f ? down_code[code[t]] : same_code[code[t]]);
        }
    }
}

/* One sweep of the polish's coordinate descent over a block (gptq._Descent.sweep): column i's
 * gradient is its (H D)_i plus local[k][i] times the steps of the columns k < i; its slope
 * inverse[i] * gradient (inverse = -2 / H_ii, 0 for a dead input) is clamped to each weight's
 * grid neighbour steps (up >= 0 >= down, by code), and a weight steps where it had to be clamped.
 * Writes the steps and moves `codes` (fp8 bits) to their new grid values through the tables of
 * neighbour codes (same_code maps -0 to +0, as the torch sweep's `+ 0`). */
void polish_sweep(uint8_t *codes, const float *gradient, int64_t rows, int64_t width, const float *local,
                  const float *inverse, float *steps, const float *up, const float *down, const uint8_t *up_code,
                  const uint8_t *down_code, const uint8_t *same_code) {
    int64_t start = 0;
    for (; start + TILE <= width; start += TILE)
        polish_tile(codes, gradient, rows, width, local, inverse, steps, up, down, up_code, down_code, same_code,
                    start, TILE);
    if (start < width)
        polish_tile(codes, gradient, rows, width, local, inverse, steps, up, down, up_code, down_code, same_code,
                    start, width - start);
}

/* ---- Layout: a weight's columns as rows, in GPTQ's order, and back. */

/* dst[position[c]][o] = weight[o][c] / scale, for a weight of `outputs` x `inputs` (bfloat16 or
 * float32): GPTQ's working rows in act order, in units of the scale. A tile of TILE weight rows is
 * read along its columns in turn (each cache line of them read once), and each column lands as a
 * contiguous piece of its destination row. */
void scaled_columns(const void *weight, int32_t is_bf16, int64_t outputs, int64_t inputs, const int64_t *position,
                    float scale, float *dst) {
    for (int64_t start = 0; start < outputs; start += TILE) {
        const int64_t n = outputs - start < TILE ? outputs - start : TILE;
        for (int64_t c = 0; c < inputs; c++) {
            float *row = dst + position[c] * outputs + start;
            if (is_bf16) {
                const uint16_t *source = (const uint16_t *)weight + start * inputs + c;
                for (int64_t t = 0; t < n; t++) {
                    const uint32_t bits = (uint32_t)source[t * inputs] << 16;
                    float value;
                    memcpy(&value, &bits, sizeof value);
                    row[t] = value / scale;
                }
            } else {
                const float *source = (const float *)weight + start * inputs + c;
                for (int64_t t = 0; t < n; t++) row[t] = source[t * inputs] / scale;
            }
        }
    }
}

/* dst[o][c] = rows[position[c]][o] for one-byte codes: GPTQ's rows (one per weight column, in act
 * order) back to the weight's layout. `scratch` (16 x count bytes) takes 16 outputs at a time from
 * every row (16 adjacent bytes each), so that each output row is then written in one sequential
 * pass, gathering from the scratch in the L1 cache. */
void unpermute_rows(const uint8_t *rows, int64_t count, int64_t width, const int64_t *position, uint8_t *scratch,
                    uint8_t *dst) {
    enum { AT_ONCE = 16 };
    for (int64_t start = 0; start < width; start += AT_ONCE) {
        const int64_t n = width - start < AT_ONCE ? width - start : AT_ONCE;
        for (int64_t r = 0; r < count; r++)
            for (int64_t t = 0; t < n; t++) scratch[t * count + r] = rows[r * width + start + t];
        for (int64_t t = 0; t < n; t++) {
            const uint8_t *gathered = scratch + t * count;
            uint8_t *row = dst + (start + t) * count;
            for (int64_t c = 0; c < count; c++) row[c] = gathered[position[c]];
        }
    }
}
/* ---- Learned rounding's element-wise step (quant_core/rounding.py, _optimise_block) ----
 *
 * Between its two matrix products an iteration of the optimiser is a dozen element-wise passes in
 * ATen (the regulariser's log and exp, the gradient's scaling, the chain rule, Adam, the sigmoid
 * and the next delta), each streaming a few of the block's ~12 MB of tensors from the L3 cache.
 * Here one pass reads each weight's state once, does all of it in registers and writes it back.
 * The arithmetic follows the torch code's operations in their order; exp and log are polynomials
 * (below), since gcc vectorises libm's only under -ffast-math. */

/* 512-bit vectors where the CPU has them: gcc's tuning for some of those CPUs (Intel's server parts
 * among them) prefers 256 bits, and this code is bound by its arithmetic (1.4 against 2.4 ns per
 * regularised element on an AMD Zen 5). Undone at the end of the file. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
#endif

#define LEARNED_TILE 256 /* elements per tile: its few stack arrays stay in the L1 cache */
#define RECTIFIED_SPAN 1.2f /* u = 1 - 2 gamma - 2 (zeta - gamma) s = 1.2 - 2.4 s (zeta 1.1, gamma -0.1) */
#define RECTIFIED_SLOPE -2.4f
#define TINY 1e-30f /* rounding._TINY: floor of |u| under the logarithm */
#define LOWEST_EXPONENT -80.0f /* rounding._LOWEST_EXPONENT: exp() of less is float32-subnormal */

static inline float bits_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint32_t float_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* e^x for x in [-87, 88] (callers clamp), within ~1 ulp: Cephes' expf, x = n ln2 + r with
 * |r| <= ln2 / 2, a degree-6 polynomial for e^r and 2^n through the exponent bits. */
static inline float exp_poly(float x) {
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * bits_float((uint32_t)((int32_t)n + 127) << 23);
}

/* log(x) for a normal x > 0, within ~1 ulp: Cephes' logf, x = m 2^e with m in [sqrt(1/2), sqrt(2)),
 * a degree-9 polynomial for log(m). */
static inline float log_poly(float x) {
    const uint32_t bits = float_bits(x);
    float e = (float)((int32_t)(bits >> 23) - 126);
    float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u); /* in [0.5, 1) */
    const int low = m < 0.707106781186547524f; /* then m 2^e = (2m) 2^(e-1): selects, not branches */
    const float doubled = m + m;
    e = e - (low ? 1.0f : 0.0f);
    m = (low ? doubled : m) - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y = y + e * -2.12194440e-4f;
    y = y - 0.5f * z;
    return m + y + e * 0.693359375f;
}

static inline float sigmoid_poly(float x) {
    const float t = -x;
    return 1.0f / (1.0f + exp_poly(t < -87.0f ? -87.0f : (t > 88.0f ? 88.0f : t)));
}

/* u = 1 - 2 rectified_sigmoid = clamp(1.2 - 2.4 s, -1, 1) (rounding._soften) */
static inline float centred_of(float s) {
    const float u = RECTIFIED_SPAN + RECTIFIED_SLOPE * s;
    const uint32_t bits = float_bits(u), magnitude = bits & 0x7FFFFFFFu, one = 0x3F800000u;
    return bits_float((magnitude < one ? magnitude : one) | (bits & 0x80000000u));
}

static inline float bf16_float(uint16_t bits) { return bits_float((uint32_t)bits << 16); }

/* round to nearest even, as torch's float -> bfloat16 (NaN stays a quiet NaN) */
static inline uint16_t float_bf16(float value) {
    const uint32_t bits = float_bits(value);
    const uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return value != value ? (uint16_t)((bits >> 16) | 0x40u) : rounded;
}

/* delta = middle - u step / 2, the soft rounding error in fp8 units (rounding._Workspace.soften) */
static inline void store_delta(void *delta, int delta_bf16, int64_t i, float value) {
    if (delta_bf16)
        ((uint16_t *)delta)[i] = float_bf16(value);
    else
        ((float *)delta)[i] = value;
}

static inline __attribute__((always_inline)) void soften_all(int64_t n, const float *restrict logits,
                                                             const float *restrict step, const float *restrict middle,
                                                             float *restrict sigmoid, void *restrict delta,
                                                             int delta_bf16) {
    for (int64_t i = 0; i < n; i++) {
        sigmoid[i] = sigmoid_poly(logits[i]);
        store_delta(delta, delta_bf16, i, middle[i] + (-0.5f * centred_of(sigmoid[i])) * step[i]);
    }
}

/* The sigmoid of the logits and the delta they give (rounding._Workspace.soften), before the first
 * iteration; a loop per delta dtype. */
void learned_soften(int64_t n, const float *logits, const float *step, const float *middle, float *sigmoid,
                    void *delta, int32_t delta_bf16) {
    if (delta_bf16)
        soften_all(n, logits, step, middle, sigmoid, delta, 1);
    else
        soften_all(n, logits, step, middle, sigmoid, delta, 0);
}

/* What the step's arithmetic needs besides the arrays; see learned_step. */
struct learned_constants {
    float coefficient;                 /* of step * product in the gradient */
    float log_coefficient, exponent;   /* the regulariser's log c and beta - 2 */
    float step_size, bias_root, eps;   /* Adam's lr / (1 - beta1^t), sqrt(1 - beta2^t), eps */
};

/* One tile of learned_step, in three loops over it: a single loop held every transcendental
 * function of an element in one dependency chain longer than the CPU could overlap between
 * elements (2.2 ns per element against 1.2 as three). */
static inline __attribute__((always_inline)) float learned_span(
    int64_t start, int64_t n, const void *restrict product, int product_bf16, const float *restrict step,
    const float *restrict middle, float *restrict logits, float *restrict exp_avg, float *restrict exp_avg_sq,
    float *restrict sigmoid, void *restrict delta, int delta_bf16, int regularise,
    const struct learned_constants *k) {
    float power[LEARNED_TILE], terms[LEARNED_TILE];
    if (regularise) { /* rounding._regulariser_gradient: c u |u|^(beta - 2) as one exp */
        const uint32_t tiny = float_bits(TINY);
        for (int64_t t = 0; t < n; t++) {
            /* |u| >= TINY compared as integers: a float select there became a branch */
            const uint32_t a = float_bits(centred_of(sigmoid[start + t])) & 0x7FFFFFFFu;
            power[t] = k->log_coefficient + k->exponent * log_poly(bits_float(a > tiny ? a : tiny));
        }
        for (int64_t t = 0; t < n; t++) {
            const float e = power[t] < LOWEST_EXPONENT ? LOWEST_EXPONENT : power[t], u = centred_of(sigmoid[start + t]);
            power[t] = exp_poly(e > 88.0f ? 88.0f : e) * u;
            terms[t] = power[t] * u;
        }
    }
    for (int64_t t = 0; t < n; t++) {
        const int64_t i = start + t;
        const float s = sigmoid[i];
        const float p = product_bf16 ? bf16_float(((const uint16_t *)product)[i]) : ((const float *)product)[i];
        float g = k->coefficient * p * step[i];
        g = regularise ? power[t] + g : g;
        /* rounding._chain_sigmoid: the clamp holds soft at 0 or 1 where |u| = 1 */
        g = __builtin_fabsf(RECTIFIED_SPAN + RECTIFIED_SLOPE * s) < 1.0f ? g : 0.0f;
        g = g * (1.0f - s) * s;
        /* torch._fused_adam_'s float arithmetic (betas 0.9, 0.999, no weight decay) */
        const float m = exp_avg[i] + 0.1f * (g - exp_avg[i]);
        const float v = exp_avg_sq[i] * 0.999f + 0.001f * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        logits[i] = logits[i] + -k->step_size * m / (__builtin_sqrtf(v) / k->bias_root + k->eps);
    }
    soften_all(n, logits + start, step + start, middle + start, sigmoid + start,
               (char *)delta + start * (delta_bf16 ? 2 : 4), delta_bf16);
    if (!regularise) return 0.0f;
    float lanes[16] = {0}; /* a plain float sum would not vectorise without -ffast-math */
    int64_t t = 0;
    for (; t + 16 <= n; t += 16)
        for (int l = 0; l < 16; l++) lanes[l] += terms[t + l];
    for (; t < n; t++) lanes[0] += terms[t];
    float sum = 0.0f;
    for (int l = 0; l < 16; l++) sum += lanes[l];
    return sum;
}

static inline __attribute__((always_inline)) double learned_tiles(
    int64_t n, const void *product, int product_bf16, const float *step, const float *middle, float *logits,
    float *exp_avg, float *exp_avg_sq, float *sigmoid, void *delta, int delta_bf16, int regularise,
    const struct learned_constants *k) {
    double sum = 0.0;
    for (int64_t start = 0; start < n; start += LEARNED_TILE) {
        const int64_t size = n - start < LEARNED_TILE ? n - start : LEARNED_TILE;
        sum += learned_span(start, size, product, product_bf16, step, middle, logits, exp_avg, exp_avg_sq, sigmoid,
                            delta, delta_bf16, regularise, k);
    }
    return sum;
}

/* One iteration of learned rounding's optimiser after its products, in one pass over n weights:
 * the gradient coefficient * step * product (+ the regulariser's, where `regularise`), through the
 * rectified sigmoid's chain rule, an Adam update of `logits` and its moments, and the sigmoid and
 * delta of the new logits for the next iteration's products. `product` and `delta` are bfloat16
 * bits where their flags say so, else float32 (a bfloat16 product comes with a bfloat16 delta: the
 * products' dtype, or float32 sums of them). Returns the regulariser's sum of power * u (0 without
 * it), whose loss term the caller adds. Each flag combination is its own loop, so none of them
 * tests a flag per element. */
double learned_step(int64_t n, const void *product, int32_t product_bf16, const float *step, const float *middle,
                    float *logits, float *exp_avg, float *exp_avg_sq, float *sigmoid, void *delta, int32_t delta_bf16,
                    int32_t regularise, float coefficient, float log_coefficient, float exponent, float step_size,
                    float bias_root, float eps) {
    const struct learned_constants k = {coefficient, log_coefficient, exponent, step_size, bias_root, eps};
#define LEARNED_CASE(P, D, R) \
    if (!!product_bf16 == P && !!delta_bf16 == D && !!regularise == R) \
        return learned_tiles(n, product, P, step, middle, logits, exp_avg, exp_avg_sq, sigmoid, delta, D, R, &k);
    LEARNED_CASE(1, 1, 1)
    LEARNED_CASE(1, 1, 0)
    LEARNED_CASE(0, 1, 1)
    LEARNED_CASE(0, 1, 0)
    LEARNED_CASE(0, 0, 1)
    LEARNED_CASE(0, 0, 0)
#undef LEARNED_CASE
    return 0.0;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC pop_options
#endif
