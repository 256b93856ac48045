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
