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

static inline __attribute__((always_inline)) void gptq_tile(
    const float *block, int64_t rows, int64_t width, const float *relative, const float *diagonal, float *values,
    float *errors, float limit, uint32_t shift, int32_t lowest, int64_t start, int64_t n) {
    float tile[rows][TILE]; /* the tile's errors, contiguous: rows `width` apart share cache sets */
    for (int64_t j = 0; j < rows; j++) {
        float column[TILE];
        const float *source = block + j * width + start;
        for (int64_t t = 0; t < n; t++) column[t] = source[t];
        for (int64_t i = 0; i < j; i++) {
            const float weight = relative[i * rows + j];
            for (int64_t t = 0; t < n; t++) column[t] -= weight * tile[i][t];
        }
        float *value = values + j * width + start, *error = errors + j * width + start;
        for (int64_t t = 0; t < n; t++) {
            value[t] = grid_round(column[t], limit, shift, lowest);
            tile[j][t] = column[t] - value[t];
            error[t] = tile[j][t] / diagonal[j];
        }
    }
}

/* GPTQ's rounding of a block (gptq._BlockRounding): column j is rounded after the errors of the
 * columns i < j reached it through relative[i][j] (the block's part of the Cholesky factor of
 * H^-1, rows divided by their diagonal). Writes the grid values and the errors divided by
 * `diagonal`; `block` is not changed. */
void gptq_block(const float *block, int64_t rows, int64_t width, const float *relative, const float *diagonal,
                float *values, float *errors, float limit, uint32_t shift, int32_t lowest) {
    int64_t start = 0;
    for (; start + TILE <= width; start += TILE)
        gptq_tile(block, rows, width, relative, diagonal, values, errors, limit, shift, lowest, start, TILE);
    if (start < width)
        gptq_tile(block, rows, width, relative, diagonal, values, errors, limit, shift, lowest, start, width - start);
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
