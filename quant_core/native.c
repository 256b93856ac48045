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

/* The polish works on whole vectors of outputs (GCC/Clang vector extensions: 16 floats, split into
 * narrower registers where the CPU has none that wide). Looking a weight's grid neighbours up in
 * tables by its fp8 code was three scalar loads per weight and kept the loop from vectorising;
 * here they come from the code's bits by integer arithmetic. */
#define LANES 16
typedef float floats __attribute__((vector_size(4 * LANES)));
typedef int32_t ints __attribute__((vector_size(4 * LANES)));
typedef uint8_t bytes __attribute__((vector_size(LANES)));
typedef uint16_t halves __attribute__((vector_size(2 * LANES)));
#define SWEEP_TILE 64 /* outputs a sweep takes through a block at once: 4 vectors, its steps 32 KB */
#define VECTORS (SWEEP_TILE / LANES)

static inline ints pick(ints mask, ints a, ints b) { return (mask & a) | (~mask & b); }
static inline ints splat(int32_t value) { return (ints){0} + value; }

/* How many of vector v's lanes lie within a tile's `n` outputs. */
static inline int lanes(int64_t n, int v) { return n - v * LANES < 0 ? 0 : (n - v * LANES > LANES ? LANES : (int)(n - v * LANES)); }

/* bfloat16 is the top half of a float32; a float32 becomes the nearest bfloat16, ties to even, as
 * torch's conversion makes it (for finite values: the polish has no others). */
static inline floats from_bfloat16(halves h) { return (floats)(__builtin_convertvector(h, ints) << 16); }

static inline halves to_bfloat16(floats f) {
    ints bits = (ints)f;
    return __builtin_convertvector((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, halves);
}

/* Loads and stores of `count` lanes (a tile's last vectors may be partial; missing lanes read as 0). */
#define LOAD(type, pointer, count)                                              \
    ({                                                                          \
        type value_ = {0};                                                      \
        if ((count) == LANES)                                                   \
            memcpy(&value_, (pointer), sizeof value_);                          \
        else                                                                    \
            memcpy(&value_, (pointer), (count) * sizeof(value_[0]));            \
        value_;                                                                 \
    })
#define STORE(pointer, value, count)                                            \
    do {                                                                        \
        if ((count) == LANES)                                                   \
            memcpy((pointer), &(value), sizeof(value));                         \
        else                                                                    \
            memcpy((pointer), &(value), (count) * sizeof((value)[0]));          \
    } while (0)

/* An fp8 format's grid: a magnitude code c (the low 7 bits) has exponent field c >> mantissa and
 * lies on a grid of spacing 2^(max(field, 1) - bias - mantissa); `offset` is 127 - bias - mantissa
 * (float32's exponent bias folded in) and `top` the largest finite magnitude code. */
struct fp8_grid {
    int32_t mantissa, offset, top;
};

/* The float32 grid spacing of the magnitude codes `magnitude` (as bits). Codes are consecutive
 * grid values, so the step to the next magnitude is the spacing of the code itself and the step
 * to the previous one the spacing of code - 1 (of code 1 for code 0: the same, the subnormals'). */
static inline ints spacing(ints magnitude, struct fp8_grid grid) {
    ints field = magnitude >> grid.mantissa;
    field = pick(field < 1, splat(1), field);
    return (field + grid.offset) << 23;
}

/* One vector of weights: their codes move by the step their slope asks for, if it passes a grid
 * neighbour (see polish_sweep). Non-finite codes count as zero and -0 becomes +0, as in the torch
 * sweep's tables and its `+ 0`. Returns the steps. */
static inline floats step_codes(bytes *codes, floats slope, struct fp8_grid grid) {
    ints magnitude = __builtin_convertvector(*codes, ints) & 0x7F;
    ints negative = __builtin_convertvector(*codes, ints) & 0x80;
    ints zero = (magnitude == 0) | (magnitude > grid.top);
    magnitude = pick(zero, splat(0), magnitude);
    negative = pick(zero, splat(0), negative);
    ints grow = pick(magnitude == grid.top, splat(0), spacing(magnitude, grid)); /* away from zero */
    ints shrink = spacing(magnitude - 1, grid);                                       /* towards zero */
    ints is_negative = negative != 0;
    floats up = (floats)pick(is_negative, shrink, grow);
    floats down = 0.0f - (floats)pick(is_negative, grow, shrink);
    floats step = (floats)(((slope > up) & (ints)up) | ((slope < down) & (ints)down));
    ints rises = step > 0.0f, falls = step < 0.0f; /* a clamp at either end of the grid is no step */
    ints away = (rises & ~is_negative) | (falls & (is_negative | (magnitude == 0)));
    ints towards = (rises | falls) & ~away;
    ints moved = magnitude - away + towards; /* masks are -1 */
    ints sign = pick(falls & (magnitude == 0), splat(0x80), negative);
    sign = pick(moved == 0, splat(0), sign);
    *codes = __builtin_convertvector(moved | sign, bytes);
    return step;
}

/* A block of the polish (gptq._Descent.sweep), `rows` weight columns of `width` outputs each: the
 * columns' gradients (H D)_J are `base` (float32, or bfloat16 if `base_is_bfloat16`) plus, where
 * `residual` is given, residual[i] * error[i]. */
struct sweep {
    uint8_t *codes;
    const void *base;
    const float *residual;
    float *error;
    void *steps;
    int64_t rows, width;
    const float *local, *inverse;
    int32_t base_is_bfloat16, steps_are_bfloat16;
    struct fp8_grid grid;
};

static inline floats load_gradient(const struct sweep *b, int64_t at, int count, floats error, float residual) {
    floats base = b->base_is_bfloat16 ? from_bfloat16(LOAD(halves, (const uint16_t *)b->base + at, count))
                                      : LOAD(floats, (const float *)b->base + at, count);
    return b->residual ? base + residual * error : base;
}

/* A tile's part of a row, fetched ahead: rows are `width` apart, so each tile reads `rows` short
 * pieces of every array, which the CPU's own prefetching does not foresee (a bfloat16 base read
 * from memory doubled the sweep's time). The next tile's row goes to the outer caches (`level` 1)
 * and the row AHEAD rows on to the first (3): fetched a tile ahead into the first, the rows, all
 * mapping to a few of its sets, were evicted again before their turn. Prefetches never fault. */
#define AHEAD 8
static inline __attribute__((always_inline)) void prefetch_row(const struct sweep *b, int64_t at, const int level) {
    const int64_t base_size = b->base_is_bfloat16 ? 2 : 4, step_size = b->steps_are_bfloat16 ? 2 : 4;
    for (int64_t line = 0; line < SWEEP_TILE * 4; line += 64) {
        __builtin_prefetch((const char *)b->error + at * 4 + line, 1, level);
        if (line < SWEEP_TILE * base_size) __builtin_prefetch((const char *)b->base + at * base_size + line, 0, level);
        if (line < SWEEP_TILE * step_size) __builtin_prefetch((char *)b->steps + at * step_size + line, 1, level);
        if (line < SWEEP_TILE) __builtin_prefetch(b->codes + at + line, 1, level);
    }
}

/* `n` outputs from `start` through all the block's columns. */
static void polish_tile(const struct sweep *b, int64_t start, int64_t n) {
    const int64_t rows = b->rows;
    floats tile[rows][VECTORS]; /* the tile's steps, contiguous: rows `width` apart share cache sets */
    for (int64_t i = 0; i < rows; i++) {
        floats slope[VECTORS], error[VECTORS], odd[VECTORS] = {0};
        const int64_t ahead = i + AHEAD; /* the row AHEAD rows on, in this tile or the next */
        if (ahead < rows) prefetch_row(b, ahead * b->width + start, 3);
        prefetch_row(b, i * b->width + start + SWEEP_TILE, 1);
        for (int v = 0; v < VECTORS; v++) {
            const int64_t at = i * b->width + start + v * LANES;
            const int count = lanes(n, v);
            error[v] = LOAD(floats, b->error + at, count);
            slope[v] = load_gradient(b, at, count, error[v], b->residual ? b->residual[i] : 0.0f);
        }
        const float *local = b->local + i * rows; /* H_JJ is symmetric: its row i is its column i */
        /* two sums over alternate columns: twice the chains of dependent additions, which the
         * CPU's two FMA units need to stay busy */
        int64_t k = 0;
        for (; k + 1 < i; k += 2) {
            const float even_weight = local[k], odd_weight = local[k + 1];
            for (int v = 0; v < VECTORS; v++) {
                slope[v] += even_weight * tile[k][v];
                odd[v] += odd_weight * tile[k + 1][v];
            }
        }
        if (k < i)
            for (int v = 0; v < VECTORS; v++) slope[v] += local[k] * tile[k][v];
        for (int v = 0; v < VECTORS; v++) {
            const int64_t at = i * b->width + start + v * LANES;
            const int count = lanes(n, v);
            bytes codes = LOAD(bytes, b->codes + at, count);
            const floats step = step_codes(&codes, (slope[v] + odd[v]) * b->inverse[i], b->grid);
            const floats moved = error[v] + step;
            tile[i][v] = step;
            STORE(b->codes + at, codes, count);
            STORE(b->error + at, moved, count);
            if (b->steps_are_bfloat16) {
                const halves half = to_bfloat16(step); /* exact: steps are powers of two */
                STORE((uint16_t *)b->steps + at, half, count);
            } else {
                STORE((float *)b->steps + at, step, count);
            }
        }
    }
}

/* One sweep of the polish's coordinate descent over a block (gptq._Descent.sweep): column i's
 * gradient (see struct sweep) plus local[k][i] times the steps of the columns k < i, times
 * inverse[i] (-2 / H_ii, 0 for a dead input), is the slope; a weight takes the step to the grid
 * neighbour its slope passes (up >= 0 >= down). Moves `codes` (fp8 bits), adds the steps to
 * `error` and writes them to `steps` (float32, or bfloat16 if `steps_are_bfloat16`). */
void polish_sweep(uint8_t *codes, int64_t rows, int64_t width, const void *base, int32_t base_is_bfloat16,
                  const float *residual, float *error, const float *local, const float *inverse, void *steps,
                  int32_t steps_are_bfloat16, int32_t mantissa, int32_t offset, int32_t top) {
    const struct sweep block = {codes, base, residual, error, steps, rows, width, local, inverse,
                                base_is_bfloat16, steps_are_bfloat16, {mantissa, offset, top}};
    for (int64_t start = 0; start < width; start += SWEEP_TILE)
        polish_tile(&block, start, width - start < SWEEP_TILE ? width - start : SWEEP_TILE);
}

/* The float32 values of fp8 codes (non-finite codes count as zero, -0 as +0, as in the torch
 * polish's tables): a normal code's exponent and mantissa bits move to float32's places and its
 * exponent is rebased; a subnormal code is its mantissa times the subnormals' spacing. */
static inline floats code_values(bytes codes, struct fp8_grid grid) {
    ints magnitude = __builtin_convertvector(codes, ints) & 0x7F;
    ints sign = (__builtin_convertvector(codes, ints) & 0x80) << 24;
    ints normal = (magnitude << (23 - grid.mantissa)) + ((grid.offset + grid.mantissa) << 23);
    floats subnormal = __builtin_convertvector(magnitude, floats) * (floats)splat((grid.offset + 1) << 23);
    ints value = pick((magnitude >> grid.mantissa) == 0, (ints)subnormal, normal);
    ints zero = (magnitude == 0) | (magnitude > grid.top);
    return (floats)pick(zero, splat(0), value | sign);
}

/* The polish's start (gptq._polish): `scaled` (count floats) becomes the codes' values minus it. */
void polish_errors(const uint8_t *codes, float *scaled, int64_t count, int32_t mantissa, int32_t offset, int32_t top) {
    const struct fp8_grid grid = {mantissa, offset, top};
    for (int64_t at = 0; at < count; at += LANES) {
        const int n = count - at < LANES ? (int)(count - at) : LANES;
        const floats error = code_values(LOAD(bytes, codes + at, n), grid) - LOAD(floats, scaled + at, n);
        STORE(scaled + at, error, n);
    }
}

/* state += update (bfloat16), and `rounded` = state as bfloat16: the sketch's state after a block's
 * steps, and its operand for the next block's product, in one pass (gptq._Coupling.update). */
void add_and_round(float *state, const uint16_t *update, uint16_t *rounded, int64_t count) {
    int64_t at = 0;
    for (; at < count; at += LANES) {
        const int n = count - at < LANES ? (int)(count - at) : LANES;
        const floats sum = LOAD(floats, state + at, n) + from_bfloat16(LOAD(halves, update + at, n));
        const halves half = to_bfloat16(sum);
        STORE(state + at, sum, n);
        STORE(rounded + at, half, n);
    }
}

/* The held-out check's weight errors (gptq._Deltas): value * scale - weight for `count` weights
 * (bfloat16, or float32 if not `weight_is_bfloat16`), into bfloat16 or float32 `out`; the value is
 * the fp8 code's where `codes` are given, else the weight's round-to-nearest (grid_round of
 * weight / scale, as fp8.quantize_nearest), so round-to-nearest needs no pass of its own. By
 * chunks that stay in the first-level cache: grid_round vectorises in a plain loop over an array. */
#define CHUNK 1024
void heldout_deltas(const void *weight, int32_t weight_is_bfloat16, int64_t count, float scale, const uint8_t *codes,
                    void *out, int32_t out_is_bfloat16, int32_t mantissa, int32_t offset, int32_t top, float limit,
                    uint32_t shift, int32_t lowest) {
    const struct fp8_grid grid = {mantissa, offset, top};
    float weights[CHUNK] __attribute__((aligned(64))), values[CHUNK] __attribute__((aligned(64)));
    for (int64_t start = 0; start < count; start += CHUNK) {
        const int64_t size = count - start < CHUNK ? count - start : CHUNK;
        for (int64_t at = 0; at < size; at += LANES) {
            const int n = size - at < LANES ? (int)(size - at) : LANES;
            const floats w = weight_is_bfloat16 ? from_bfloat16(LOAD(halves, (const uint16_t *)weight + start + at, n))
                                                : LOAD(floats, (const float *)weight + start + at, n);
            memcpy(weights + at, &w, sizeof w);
            if (codes) {
                const floats value = code_values(LOAD(bytes, codes + start + at, n), grid);
                memcpy(values + at, &value, sizeof value);
            }
        }
        if (!codes)
            for (int64_t t = 0; t < size; t++) values[t] = grid_round(weights[t] / scale, limit, shift, lowest);
        for (int64_t at = 0; at < size; at += LANES) {
            const int n = size - at < LANES ? (int)(size - at) : LANES;
            floats value, w;
            memcpy(&value, values + at, sizeof value);
            memcpy(&w, weights + at, sizeof w);
            const floats delta = value * scale - w;
            if (out_is_bfloat16) {
                const halves half = to_bfloat16(delta);
                STORE((uint16_t *)out + start + at, half, n);
            } else {
                STORE((float *)out + start + at, delta, n);
            }
        }
    }
}

/* out[o][i] = rows[rank[i]][o]: GPTQ's codes (one row per weight column, in act order) back into
 * the weight's layout (gptq._round_and_check). By squares of SQUARE x SQUARE bytes, transposed in
 * a local copy so that reads and writes are whole pieces of rows; torch's byte transpose moved 1 GB/s. */
#define SQUARE 64
void unpermute_columns(const uint8_t *rows, int64_t columns, int64_t width, const int64_t *rank, uint8_t *out) {
    for (int64_t i0 = 0; i0 < columns; i0 += SQUARE) {
        const int64_t i1 = i0 + SQUARE < columns ? i0 + SQUARE : columns;
        for (int64_t o0 = 0; o0 < width; o0 += SQUARE) { /* along SQUARE rows at once: streams the CPU prefetches */
            const int64_t o1 = o0 + SQUARE < width ? o0 + SQUARE : width;
            uint8_t square[SQUARE][SQUARE]; /* written whole rows at a time: rows `columns` apart share cache sets */
            for (int64_t i = i0; i < i1; i++) {
                const uint8_t *source = rows + rank[i] * width;
                __builtin_prefetch(source + o0 + 2 * SQUARE); /* rows in act order: no pattern the CPU sees */
                for (int64_t o = o0; o < o1; o++) square[o - o0][i - i0] = source[o];
            }
            for (int64_t o = o0; o < o1; o++) memcpy(out + o * columns + i0, square[o - o0], i1 - i0);
        }
    }
}
