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
 *
 * Also here, each in a section of its own below: the held-out check's weight errors, the layout
 * of a weight's columns in GPTQ's order and back, and learned rounding's element-wise step.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TILE 64

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

/* bfloat16 is the top half of a float32; a float32 becomes the nearest one, ties to even, and a
 * NaN stays a quiet NaN, as torch's conversion makes them. */
static inline float bf16_float(uint16_t bits) { return bits_float((uint32_t)bits << 16); }
static inline uint16_t bf16_bits(float value) {
    const uint32_t bits = float_bits(value);
    const uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return value != value ? (uint16_t)((bits >> 16) | 0x40u) : rounded;
}

/* Round-to-nearest-even onto an fp8 grid, saturating at +-limit, as fp8.GridRounding does: a value
 * with 2^e <= |v| < 2^(e+1) lies on a grid of spacing s = 2^(e - mantissa) (at least the
 * subnormals'), and (v + m) - m with m = 1.5 * 2^23 * s rounds it there in two exact additions.
 * `shift` and `lowest` are GridRounding's constants for m's bits. */
static inline float grid_round(float v, float limit, uint32_t shift, int32_t lowest) {
    const float clamped = v > limit ? limit : (v < -limit ? -limit : v);
    int32_t magic = (int32_t)((float_bits(clamped) & 0x7F800000u) + shift);
    magic = magic < lowest ? lowest : magic;
    const float m = bits_float((uint32_t)magic);
    const float rounded = (clamped + m) - m;
    /* a value that rounds to zero keeps its sign */
    return bits_float((float_bits(rounded) & 0x7FFFFFFFu) | (float_bits(v) & 0x80000000u));
}

/* The fp8 code (bits) of a value on the grid of a format with `mantissa` bits and smallest normal
 * exponent `lowest_exponent` (its bias is 1 - lowest_exponent): the exponent and mantissa bits of a
 * normal value are float32's, moved; a subnormal one is an integer multiple of the spacing. */
static inline uint8_t fp8_code(float value, int32_t mantissa, int32_t lowest_exponent) {
    const uint32_t bits = float_bits(value), sign = (bits >> 24) & 0x80u, magnitude = bits & 0x7FFFFFFFu;
    const int32_t exponent = (int32_t)(magnitude >> 23) - 127;
    const float multiple = bits_float(magnitude);
    const uint32_t normal = (uint32_t)(exponent + 1 - lowest_exponent) << mantissa | (magnitude & 0x7FFFFFu) >> (23 - mantissa);
    const uint32_t subnormal = (uint32_t)(multiple * (float)(1u << (mantissa - lowest_exponent)));
    const uint32_t code = exponent >= lowest_exponent ? normal : subnormal; /* both made: no branch, so it vectorises */
    return (uint8_t)(sign | code);
}

/* Vectors of LANES values (GCC/Clang vector extensions: one AVX-512 register, or split into
 * narrower ones where the CPU has none that wide). */
#define LANES 16
typedef float floats __attribute__((vector_size(4 * LANES)));
typedef int32_t ints __attribute__((vector_size(4 * LANES)));
typedef uint8_t bytes __attribute__((vector_size(LANES)));
typedef uint16_t halves __attribute__((vector_size(2 * LANES)));
#define GPTQ_VECTORS (TILE / LANES)

/* One tile of `n` <= TILE outputs through a GPTQ block; the tile is padded with zeros to TILE.
 * Inlined twice: with n = TILE for whole tiles (every loop a constant count), and for the last. */
static inline __attribute__((always_inline)) void gptq_tile(float *work, const void *product, int32_t product_is_bf16, int64_t rows, int64_t width,
                      const float *spread, const float *diagonal, uint8_t *codes, void *errors,
                      int32_t errors_is_bf16, int32_t polish_start, float limit, uint32_t shift, int32_t lowest,
                      int32_t mantissa, int32_t lowest_exponent, int64_t start, int64_t n) {
    floats tile[rows][GPTQ_VECTORS]; /* the tile's errors, contiguous: rows `width` apart share cache sets */
    for (int64_t j = 0; j < rows; j++) {
        float column[TILE] __attribute__((aligned(64))) = {0};
        const int64_t at = j * width + start;
        for (int64_t t = 0; t < n; t++) column[t] = work[at + t];
        if (product_is_bf16) {
            for (int64_t t = 0; t < n; t++) column[t] -= bf16_float(((const uint16_t *)product)[at + t]);
        } else if (product) {
            for (int64_t t = 0; t < n; t++) column[t] -= ((const float *)product)[at + t];
        }
        /* the corrections of the earlier columns, in registers: two sums over alternate columns,
         * twice the chains of dependent additions, which the CPU's two FMA units need to stay busy */
        floats sum[GPTQ_VECTORS], odd[GPTQ_VECTORS] = {0};
        memcpy(sum, column, sizeof sum);
        const float *reaching = spread + j * rows; /* what reaches column j from each earlier column */
        int64_t i = 0;
        for (; i + 1 < j; i += 2)
            for (int v = 0; v < GPTQ_VECTORS; v++) {
                sum[v] -= reaching[i] * tile[i][v];
                odd[v] -= reaching[i + 1] * tile[i + 1][v];
            }
        if (i < j)
            for (int v = 0; v < GPTQ_VECTORS; v++) sum[v] -= reaching[i] * tile[i][v];
        if (j > 1) /* only then has `odd` a term: + 0 would turn a -0 into +0 */
            for (int v = 0; v < GPTQ_VECTORS; v++) sum[v] += odd[v];
        memcpy(column, sum, sizeof sum);
        float error[TILE] __attribute__((aligned(64)));
        for (int64_t t = 0; t < TILE; t++) {
            const float value = grid_round(column[t], limit, shift, lowest);
            error[t] = column[t] - value;
            column[t] = value;
        }
        memcpy(tile[j], error, sizeof error);
        for (int64_t t = 0; t < n; t++) codes[at + t] = fp8_code(column[t], mantissa, lowest_exponent);
        if (polish_start) /* D = value - weight, while the row is in the cache */
            for (int64_t t = 0; t < n; t++) work[at + t] = column[t] - work[at + t];
        if (errors_is_bf16) /* the operand of the next product: written in its dtype, no cast of its own */
            for (int64_t t = 0; t < n; t++) ((uint16_t *)errors)[at + t] = bf16_bits(error[t] / diagonal[j]);
        else
            for (int64_t t = 0; t < n; t++) ((float *)errors)[at + t] = error[t] / diagonal[j];
    }
}

/* GPTQ's rounding of a block (gptq._BlockRounding): column j, its `work` row minus its `product` row
 * (the compensation from earlier blocks: bfloat16, float32 or none), is rounded after the errors
 * of the columns i < j reached it through spread[j][i] (the transpose of the block's part of the
 * Cholesky factor of H^-1, rows divided by their diagonal: what reaches column j, contiguous).
 * Writes the fp8 codes and the errors divided by `diagonal` (float32, or rounded once to bfloat16:
 * within the block they stay float32); `product` is not changed, nor `work` unless `polish_start`:
 * then each of its weights becomes its value minus it (as polish_errors makes it). */
void gptq_block(float *work, const void *product, int32_t product_is_bf16, int64_t rows, int64_t width,
                const float *spread, const float *diagonal, uint8_t *codes, void *errors, int32_t errors_is_bf16,
                int32_t polish_start, float limit, uint32_t shift, int32_t lowest, int32_t mantissa,
                int32_t lowest_exponent) {
    int64_t start = 0;
    for (; start + TILE <= width; start += TILE)
        gptq_tile(work, product, product_is_bf16, rows, width, spread, diagonal, codes, errors, errors_is_bf16,
                  polish_start, limit, shift, lowest, mantissa, lowest_exponent, start, TILE);
    if (start < width)
        gptq_tile(work, product, product_is_bf16, rows, width, spread, diagonal, codes, errors, errors_is_bf16,
                  polish_start, limit, shift, lowest, mantissa, lowest_exponent, start, width - start);
}

/* The polish works on whole vectors of outputs (GCC/Clang vector extensions: 16 floats, split into
 * narrower registers where the CPU has none that wide). Looking a weight's grid neighbours up in
 * tables by its fp8 code was three scalar loads per weight and kept the loop from vectorising;
 * here they come from the code's bits by integer arithmetic. */
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

/* `n` lanes of `value` to out[at], as bfloat16 (rounded) or float32. */
static inline __attribute__((always_inline)) void store_either(void *out, int32_t out_is_bfloat16, int64_t at, floats value, int n) {
    if (out_is_bfloat16) {
        const halves half = to_bfloat16(value);
        STORE((uint16_t *)out + at, half, n);
    } else {
        STORE((float *)out + at, value, n);
    }
}

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
 * `residual` is given, residual[i] * error[i]; or, where `base_stride` is not 0, `base` holds them by
 * outputs (float32, element (i, o) at base[o * base_stride + i]: an exact layer's (H D)^T, see
 * gptq._Coupling). The steps go to `steps` where it is given, and where `factor` is given (rows x
 * rank: the block's rows of a sketch's F, or of an exact H) straight into the state, `state`
 * (width x rank, one row per output: F^T D transposed, or (H D)^T) and, where given, its bfloat16
 * copy `operand` (see onward). */
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
    const float *factor;
    float *state;
    uint16_t *operand;
    int64_t rank, base_stride;
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
        if (!b->base_stride && line < SWEEP_TILE * base_size) __builtin_prefetch((const char *)b->base + at * base_size + line, 0, level);
        if (b->steps && line < SWEEP_TILE * step_size) __builtin_prefetch((char *)b->steps + at * step_size + line, 1, level);
        if (line < SWEEP_TILE) __builtin_prefetch(b->codes + at + line, 1, level);
    }
}

/* Which of a vector's lanes are not zero, as bits: one instruction with AVX-512. */
static inline uint32_t nonzero_lanes(ints v) {
#if defined(__AVX512F__) && LANES == 16
    return _mm512_test_epi32_mask((__m512i)v, (__m512i)v);
#else
    uint32_t bits = 0;
    for (int l = 0; l < LANES; l++) bits |= (uint32_t)(v[l] != 0) << l;
    return bits;
#endif
}

/* A tile's steps into the state: state[o] += step[j][o] * factor[j] for every step taken (a tenth
 * of the weights or fewer move in a sketched layer's sweep), then the tile's rows of the bfloat16
 * operand. As a product F_J^T (steps) this was as long as the block's gradient product and took a
 * pass over the whole state besides (with an exact H, H_J^T (steps) was most of an exact layer's
 * time); here only the moved weights cost work. Output by output: its row of the state is summed
 * in registers over the columns it moved in, found as set bits (a loop that tested each weight's
 * step cost as much as the product it replaces). */
#define RANK_CHUNK (8 * LANES)
static inline __attribute__((always_inline)) void onward_chunk(float *state, uint16_t *operand, const float *factor,
                                                                int64_t rank, const uint64_t *moved, int64_t words,
                                                                const float *steps, int64_t left) {
    floats sum[8];
    for (int u = 0; u < 8; u++) sum[u] = LOAD(floats, state + u * LANES, lanes(left, u));
    for (int64_t w = 0; w < words; w++)
        for (uint64_t bits = moved[w]; bits; bits &= bits - 1) {
            const int64_t j = w * 64 + __builtin_ctzll(bits);
            const float step = steps[j * SWEEP_TILE];
            for (int u = 0; u < 8; u++) sum[u] += step * LOAD(floats, factor + j * rank + u * LANES, lanes(left, u));
        }
    for (int u = 0; u < 8; u++) {
        STORE(state + u * LANES, sum[u], lanes(left, u));
        if (operand) {
            const halves half = to_bfloat16(sum[u]);
            STORE(operand + u * LANES, half, lanes(left, u));
        }
    }
}

/* The outputs ahead whose rows of the state are fetched while one is summed: the state (11 MB at
 * 21504 outputs) is read and written whole in every block, from memory, and a tile's rows came in
 * only as each was reached (a fifth of the sweep's samples sat on their loads). */
#define STATE_AHEAD 4
static inline __attribute__((always_inline)) void prefetch_state(const struct sweep *b, int64_t output) {
    for (int64_t line = 0; line < b->rank * 4; line += 64) {
        __builtin_prefetch((const char *)(b->state + output * b->rank) + line, 1, 3);
        if (b->operand && line < b->rank * 2) __builtin_prefetch((const char *)(b->operand + output * b->rank) + line, 1, 3);
    }
}

static void onward(const struct sweep *b, floats tile[][VECTORS], int64_t start, int64_t n) {
    const int64_t rank = b->rank, rows = b->rows, words = (rows + 63) / 64;
    /* Which columns each output moved in, as bits: first each vector's moved lanes (a step is
     * nonzero where its bits are: +-0 never comes out of the sweep), then, LANES columns at a
     * time, an output's lane of them; with no branch that depends on the steps, which cost more
     * than the sums when they mispredicted. */
    uint32_t lanes_moved[VECTORS][words * 64];
    memset(lanes_moved, 0, sizeof lanes_moved);
    for (int64_t j = 0; j < rows; j++)
        for (int v = 0; v < VECTORS; v++) lanes_moved[v][j] = nonzero_lanes((ints)tile[j][v]);
    uint64_t moved[SWEEP_TILE][words];
    for (int64_t o = 0; o < n; o++) {
        const ints lane = splat(1 << (o % LANES));
        for (int64_t w = 0; w < words; w++) {
            uint64_t bits = 0;
            for (int k = 0; k < 64; k += LANES)
                bits |= (uint64_t)nonzero_lanes(LOAD(ints, &lanes_moved[o / LANES][w * 64 + k], LANES) & lane) << k;
            moved[o][w] = bits;
        }
    }
    for (int64_t o = 0; o < n; o++) {
        if (o + STATE_AHEAD < n) prefetch_state(b, start + o + STATE_AHEAD);
        float *state = b->state + (start + o) * rank;
        uint16_t *operand = b->operand ? b->operand + (start + o) * rank : NULL;
        const float *steps = (const float *)tile + o;
        int64_t c = 0;
        for (; c + RANK_CHUNK <= rank; c += RANK_CHUNK) /* whole vectors */
            onward_chunk(state + c, operand ? operand + c : NULL, b->factor + c, rank, moved[o], words, steps, RANK_CHUNK);
        if (c < rank)
            onward_chunk(state + c, operand ? operand + c : NULL, b->factor + c, rank, moved[o], words, steps, rank - c);
    }
}

/* `n` outputs from `start` through all the block's columns. */
static void polish_tile(const struct sweep *b, int64_t start, int64_t n) {
    const int64_t rows = b->rows;
    floats tile[rows][VECTORS]; /* the tile's steps, contiguous: rows `width` apart share cache sets */
    float by_columns[b->base_stride ? rows : 1][SWEEP_TILE]; /* a base by outputs, turned to columns */
    if (b->base_stride)
        for (int64_t o = 0; o < n; o++) {
            const float *row = (const float *)b->base + (start + o) * b->base_stride;
            for (int64_t i = 0; i < rows; i++) by_columns[i][o] = row[i];
        }
    for (int64_t i = 0; i < rows; i++) {
        floats slope[VECTORS], error[VECTORS], odd[VECTORS] = {0};
        const int64_t ahead = i + AHEAD; /* the row AHEAD rows on, in this tile or the next */
        if (ahead < rows) prefetch_row(b, ahead * b->width + start, 3);
        prefetch_row(b, i * b->width + start + SWEEP_TILE, 1);
        for (int v = 0; v < VECTORS; v++) {
            const int64_t at = i * b->width + start + v * LANES;
            const int count = lanes(n, v);
            error[v] = LOAD(floats, b->error + at, count);
            slope[v] = b->base_stride ? LOAD(floats, by_columns[i] + v * LANES, count)
                                      : load_gradient(b, at, count, error[v], b->residual ? b->residual[i] : 0.0f);
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
            if (b->steps) store_either(b->steps, b->steps_are_bfloat16, at, step, count); /* exact: powers of two */
        }
    }
    if (b->factor) onward(b, tile, start, n);
}

/* One sweep of the polish's coordinate descent over a block (gptq._Descent.sweep): column i's
 * gradient (see struct sweep) plus local[k][i] times the steps of the columns k < i, times
 * inverse[i] (-2 / H_ii, 0 for a dead input), is the slope; a weight takes the step to the grid
 * neighbour its slope passes (up >= 0 >= down). Moves `codes` (fp8 bits), adds the steps to
 * `error` and writes them to `steps` (float32, or bfloat16 if `steps_are_bfloat16`; or nowhere if
 * NULL) and, where `factor` is given, adds them to a sketch's state (struct sweep, onward). */
void polish_sweep(uint8_t *codes, int64_t rows, int64_t width, const void *base, int32_t base_is_bfloat16,
                  const float *residual, float *error, const float *local, const float *inverse, void *steps,
                  int32_t steps_are_bfloat16, int32_t mantissa, int32_t offset, int32_t top, const float *factor,
                  float *state, uint16_t *operand, int64_t rank, int64_t base_stride) {
    const struct sweep block = {codes, base, residual, error, steps, rows, width, local, inverse,
                                base_is_bfloat16, steps_are_bfloat16, {mantissa, offset, top},
                                factor, state, operand, rank, base_stride};
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

/* state += update (bfloat16), and `rounded` = state as bfloat16: a float32 sum of products and its
 * operand for the next product, in one pass (gptq._Sum.add). */
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

/* The held-out check's operand for a block of `count` weights (gptq._Operand), into bfloat16 or
 * float32 `out`: the weights themselves (bfloat16, or float32 if not `weight_is_bfloat16`), then for
 * each of the `candidates` its errors value * scale - weight, `count` values each, one after the
 * other, so that one product takes them all. A candidate's value is its fp8 code's where `codes[c]`
 * is given, else the weight's round-to-nearest (grid_round of weight / scale, as
 * fp8.quantize_nearest), made once for all such candidates, so round-to-nearest needs no pass of its
 * own; the weights and codes are read once. By chunks that stay in the first-level cache:
 * grid_round vectorises in a plain loop over an array. */
#define CHUNK 1024
struct operand {
    const void *weight;
    int32_t weight_is_bfloat16;
    int64_t count;
    float scale;
    const uint8_t *const *codes;
    int32_t candidates, nearest;
    void *out;
    int32_t out_is_bfloat16;
    struct fp8_grid grid;
    float limit;
    uint32_t shift;
    int32_t lowest;
};

/* Inlined for whole chunks, so that every vector's loads and stores are whole (LOAD and STORE lose
 * their branch and their memcpy call); the tail takes a copy of its own. A quarter less time. */
static inline __attribute__((always_inline)) void operand_chunk(const struct operand *o, int64_t start, int64_t size) {
    float weights[CHUNK] __attribute__((aligned(64))), rounded[CHUNK] __attribute__((aligned(64)));
    for (int64_t at = 0; at < size; at += LANES) {
        const int n = size - at < LANES ? (int)(size - at) : LANES;
        const floats w = o->weight_is_bfloat16 ? from_bfloat16(LOAD(halves, (const uint16_t *)o->weight + start + at, n))
                                               : LOAD(floats, (const float *)o->weight + start + at, n);
        memcpy(weights + at, &w, sizeof w);
        store_either(o->out, o->out_is_bfloat16, start + at, w, n);
    }
    if (o->nearest)
        for (int64_t t = 0; t < size; t++) rounded[t] = grid_round(weights[t] / o->scale, o->limit, o->shift, o->lowest);
    for (int32_t c = 0; c < o->candidates; c++) {
        const uint8_t *const code = o->codes[c] ? o->codes[c] + start : NULL;
        const int64_t part = (1 + (int64_t)c) * o->count + start;
        for (int64_t at = 0; at < size; at += LANES) {
            const int n = size - at < LANES ? (int)(size - at) : LANES;
            floats value, w;
            if (code)
                value = code_values(LOAD(bytes, code + at, n), o->grid);
            else
                memcpy(&value, rounded + at, sizeof value);
            memcpy(&w, weights + at, sizeof w);
            store_either(o->out, o->out_is_bfloat16, part + at, value * o->scale - w, n);
        }
    }
}

void heldout_operand(const void *weight, int32_t weight_is_bfloat16, int64_t count, float scale,
                     const uint8_t *const *codes, int32_t candidates, void *out, int32_t out_is_bfloat16,
                     int32_t mantissa, int32_t offset, int32_t top, float limit, uint32_t shift, int32_t lowest) {
    struct operand o = {weight, weight_is_bfloat16, count, scale, codes, candidates, 0, out, out_is_bfloat16,
                        {mantissa, offset, top}, limit, shift, lowest};
    for (int32_t c = 0; c < candidates; c++) o.nearest |= codes[c] == NULL;
    int64_t start = 0;
    for (; start + CHUNK <= count; start += CHUNK) operand_chunk(&o, start, CHUNK);
    if (start < count) operand_chunk(&o, start, count - start);
}

/* ---- Layout: a weight's columns as rows, in GPTQ's order, and back.
 *
 * Both are transposes of arrays far larger than the caches, so what they cost is how they meet
 * memory. They go by tiles of 16 or 64 rows, each row's piece of a tile a cache line, read whole
 * and written whole. A tile's rows lie a weight row apart: widths like 3072 put them all in one
 * or two of the L1 cache's sets, and rows taken in GPTQ's order are in no order the hardware
 * prefetcher can follow, so the next lines are prefetched by hand. Each new row of a tile is also
 * a new page: a block of a few KB of each row is taken before the next (the TLB holds its pages).
 * Where the CPU has AVX-512 a tile is transposed in registers and its whole lines are written
 * with streaming stores, which skip reading the lines they overwrite (half the traffic of the
 * writes, and nothing is read back from an output this large while it is still in the cache);
 * elsewhere the tile goes through a small array in plain C. Without the streaming stores these
 * loops took up to twice as long, without the prefetches up to four times. */
/* The tiles' functions are inlined into the two loops below: as functions of their own, the
 * compiler placed them ahead of gptq_block, whose loops then took twice as long at their new
 * alignment (0.09 -> 0.19 CPU-s at 21504 x 3072, the same instructions). */
#define COLUMNS_BLOCK 512 /* outputs of a weight taken across all its columns */
#define ROWS_BLOCK 2048 /* bytes of each of GPTQ's rows taken across all of them */

static inline int64_t upto(int64_t n, int64_t most) { return n < most ? n : most; }

#if defined(__AVX512F__) && defined(__AVX512BW__)

static inline __mmask16 first16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
static inline __mmask64 first64(int64_t n) { return n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1); }

/* Whether a tile's output rows are whole, aligned cache lines (a streaming store needs that). */
static inline int whole_lines(const void *dst, int64_t row_bytes, int64_t n_bytes) {
    return n_bytes == 64 && ((uintptr_t)dst & 63) == 0 && row_bytes % 64 == 0;
}

/* r[i][j] becomes r[j][i]: pairs of rows interleaved by floats, then by pairs of floats (within
 * each 128-bit lane), then the lanes gathered across registers; 64 shuffles. */
static inline __attribute__((always_inline)) void transpose_floats(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    /* now lane l of r[4g + e] holds element 4l + e of rows 4g .. 4g + 3 */
    for (int e = 0; e < 4; e++) {
        const __m512 a = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88), b = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xDD);
        const __m512 c = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
        const __m512 d = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xDD);
        t[e] = _mm512_shuffle_f32x4(a, c, 0x88);
        t[4 + e] = _mm512_shuffle_f32x4(b, d, 0x88);
        t[8 + e] = _mm512_shuffle_f32x4(a, c, 0xDD);
        t[12 + e] = _mm512_shuffle_f32x4(b, d, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Outputs o .. o + n of weight columns c .. c + m (n, m <= 16), divided by the scale. */
static inline __attribute__((always_inline)) void scaled_tile(const void *weight, int32_t is_bf16, int64_t outputs,
                                                               int64_t inputs, const int64_t *position, float scale,
                                                               float *dst, int64_t o, int64_t n, int64_t c, int64_t m) {
    __m512 r[16];
    for (int i = 0; i < 16; i++) {
        if (i >= n) {
            r[i] = _mm512_setzero_ps();
        } else if (is_bf16) {
            const __m256i h = _mm256_maskz_loadu_epi16(first16(m), (const uint16_t *)weight + (o + i) * inputs + c);
            r[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        } else {
            r[i] = _mm512_maskz_loadu_ps(first16(m), (const float *)weight + (o + i) * inputs + c);
        }
    }
    transpose_floats(r);
    const __m512 divisor = _mm512_set1_ps(scale);
    const int stream = whole_lines(dst, 4 * outputs, 4 * n);
    for (int j = 0; j < m; j++) {
        float *row = dst + position[c + j] * outputs + o;
        const __m512 value = _mm512_div_ps(r[j], divisor);
        if (stream) _mm512_stream_ps(row, value);
        else _mm512_mask_storeu_ps(row, first16(n), value);
    }
}

/* 16 x 16 bytes in each 128-bit lane transposed: four rounds of interleaving row i with row i + 8. */
static inline __attribute__((always_inline)) void transpose_bytes(__m512i r[16]) {
    for (int round = 0; round < 4; round++) {
        __m512i t[16];
        for (int i = 0; i < 8; i++) {
            t[2 * i] = _mm512_unpacklo_epi8(r[i], r[i + 8]);
            t[2 * i + 1] = _mm512_unpackhi_epi8(r[i], r[i + 8]);
        }
        for (int i = 0; i < 16; i++) r[i] = t[i];
    }
}

/* Outputs o .. o + n of weight columns c .. c + m (n, m <= 64): four pieces of 16 columns
 * transposed into an array in the L1 cache, then written as whole lines of the outputs' rows. */
static inline __attribute__((always_inline)) void unpermute_tile(const uint8_t *rows, int64_t count, int64_t width,
                                                                  const int64_t *position, uint8_t *dst, int64_t o,
                                                                  int64_t n, int64_t c, int64_t m) {
    uint8_t tile[64][64] __attribute__((aligned(64)));
    for (int g = 0; g < m; g += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; i++)
            r[i] = g + i < m ? _mm512_maskz_loadu_epi8(first64(n), rows + position[c + g + i] * width + o)
                             : _mm512_setzero_si512();
        transpose_bytes(r);
        for (int j = 0; j < 16; j++) { /* lane l of r[j] is output o + 16 l + j */
            _mm_store_si128((__m128i *)&tile[j][g], _mm512_extracti32x4_epi32(r[j], 0));
            _mm_store_si128((__m128i *)&tile[16 + j][g], _mm512_extracti32x4_epi32(r[j], 1));
            _mm_store_si128((__m128i *)&tile[32 + j][g], _mm512_extracti32x4_epi32(r[j], 2));
            _mm_store_si128((__m128i *)&tile[48 + j][g], _mm512_extracti32x4_epi32(r[j], 3));
        }
    }
    const int stream = whole_lines(dst, count, m);
    for (int i = 0; i < n; i++) {
        uint8_t *row = dst + (o + i) * count + c;
        if (stream) _mm512_stream_si512((__m512i *)row, _mm512_load_si512(tile[i]));
        else _mm512_mask_storeu_epi8(row, first64(m), _mm512_load_si512(tile[i]));
    }
}

/* Streaming stores are weakly ordered: made visible before the caller reads the output. */
static inline void stores_done(void) { _mm_sfence(); }
#else
static inline __attribute__((always_inline)) void scaled_tile(const void *weight, int32_t is_bf16, int64_t outputs,
                                                               int64_t inputs, const int64_t *position, float scale,
                                                               float *dst, int64_t o, int64_t n, int64_t c, int64_t m) {
    float tile[16][16];
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < m; j++)
            tile[j][i] = is_bf16 ? bf16_float(((const uint16_t *)weight)[(o + i) * inputs + c + j])
                                 : ((const float *)weight)[(o + i) * inputs + c + j];
    for (int64_t j = 0; j < m; j++)
        for (int64_t i = 0; i < n; i++) dst[position[c + j] * outputs + o + i] = tile[j][i] / scale;
}

/* 8 x 8 bytes transposed as eight 64-bit words: single bytes, then pairs, then quads swapped
 * between rows 1, 2 and 4 apart. A big-endian word holds its bytes the other way round, which
 * reverses both indices: there the rows go in and out in reverse (`flip`). */
static inline int flip(int k) { return __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__ ? 7 - k : k; }

static inline void transpose_words(uint64_t x[8]) {
    static const uint64_t masks[3] = {0x00FF00FF00FF00FFull, 0x0000FFFF0000FFFFull, 0x00000000FFFFFFFFull};
    for (int round = 0; round < 3; round++) {
        const int step = 1 << round, shift = 8 << round;
        for (int j = 0; j < 8; j++) {
            if (j & step) continue;
            const uint64_t t = ((x[j] >> shift) ^ x[j + step]) & masks[round];
            x[j + step] ^= t;
            x[j] ^= t << shift;
        }
    }
}

static inline __attribute__((always_inline)) void unpermute_tile(const uint8_t *rows, int64_t count, int64_t width,
                                                                  const int64_t *position, uint8_t *dst, int64_t o,
                                                                  int64_t n, int64_t c, int64_t m) {
    uint8_t in[64][64], tile[64][64];
    if (n < 64 || m < 64) memset(in, 0, sizeof in); /* what is not copied in is transposed too */
    for (int64_t j = 0; j < m; j++) memcpy(in[j], rows + position[c + j] * width + o, (size_t)n);
    for (int jb = 0; jb < 64; jb += 8)
        for (int ib = 0; ib < 64; ib += 8) {
            uint64_t x[8];
            for (int k = 0; k < 8; k++) memcpy(&x[k], &in[jb + flip(k)][ib], 8);
            transpose_words(x);
            for (int k = 0; k < 8; k++) memcpy(&tile[ib + flip(k)][jb], &x[k], 8);
        }
    for (int64_t i = 0; i < n; i++) memcpy(dst + (o + i) * count + c, tile[i], (size_t)m);
}

static inline void stores_done(void) {}
#endif

/* dst[position[c]][o] = weight[o][c] / scale, for a weight of `outputs` x `inputs` (bfloat16 or
 * float32): GPTQ's working rows in act order, in units of the scale. A block of outputs goes
 * across all the columns, a cache line of its rows at a time (32 bfloat16 or 16 float32 columns),
 * in tiles of 16 rows, each prefetching its rows' next line. */
void scaled_columns(const void *weight, int32_t is_bf16, int64_t outputs, int64_t inputs, const int64_t *position,
                    float scale, float *dst) {
    const int64_t size = is_bf16 ? 2 : 4, line = 64 / size;
    for (int64_t block = 0; block < outputs; block += COLUMNS_BLOCK)
        for (int64_t c = 0; c < inputs; c += line)
            for (int64_t o = block; o < upto(outputs, block + COLUMNS_BLOCK); o += 16) {
                for (int64_t i = o; i < upto(outputs, o + 16) && c + line < inputs; i++)
                    __builtin_prefetch((const char *)weight + (i * inputs + c + line) * size);
                for (int64_t piece = c; piece < upto(inputs, c + line); piece += 16)
                    scaled_tile(weight, is_bf16, outputs, inputs, position, scale, dst, o, upto(outputs - o, 16),
                                piece, upto(inputs - piece, 16));
            }
    stores_done();
}

/* dst[o][c] = rows[position[c]][o] for one-byte codes: GPTQ's rows (one per weight column, in act
 * order) back to the weight's layout. A block of each row goes across all the rows, 64 rows at a
 * time, in tiles of 64 x 64 codes, each prefetching the next 64 rows' line. */
void unpermute_rows(const uint8_t *rows, int64_t count, int64_t width, const int64_t *position, uint8_t *dst) {
    for (int64_t block = 0; block < width; block += ROWS_BLOCK)
        for (int64_t c = 0; c < count; c += 64)
            for (int64_t o = block; o < upto(width, block + ROWS_BLOCK); o += 64) {
                for (int64_t r = c + 64; r < upto(count, c + 128); r++)
                    __builtin_prefetch(rows + position[r] * width + o);
                unpermute_tile(rows, count, width, position, dst, o, upto(width - o, 64), c, upto(count - c, 64));
            }
    stores_done();
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

/* delta = middle - u step / 2, the soft rounding error in fp8 units (rounding._Workspace.soften) */
static inline void store_delta(void *delta, int delta_bf16, int64_t i, float value) {
    if (delta_bf16)
        ((uint16_t *)delta)[i] = bf16_bits(value);
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
