/* Row-wise passes of the CPU model, each one pass over memory: around the int8 and int4
 * matmuls (activation quantization, rescale, int4 tile dequantization) and between the
 * matmuls (RMSNorm with its residual add, SiLU-and-multiply, rotary embeddings).
 *
 * Built and loaded by engine/kernels/row_passes.py (plain C, no Python or torch headers).
 * torch spells each of these as several whole-tensor ops (a float32 temporary per op, a
 * thread barrier per op), which cost as much as the int8 GEMM they surround; here each
 * is one loop the compiler vectorizes for -march=native, rows split over threads.
 *
 * The quantized passes and the rotary embedding are bit-identical to the torch
 * expression named in their comment: the same float32 operations in the same order,
 * IEEE division, round-half-to-even
 * (nearbyintf in the default rounding mode), bfloat16 rounded to nearest even. The norm
 * and activation compute in float32 as torch does but sum and exponentiate in their own
 * order, so a bfloat16 result can differ from torch's by one rounding step.
 * All tensors are contiguous; bfloat16 travels as uint16_t.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "cpu_math.h"

enum { MAX_THREADS = 64 };
/* Below this many elements per call one thread is faster than starting others. */
enum { MIN_ELEMENTS_PER_THREAD = 1 << 18 };

typedef struct Task Task;
typedef void (*RowsFn)(const Task *task, int64_t first_row, int64_t end_row);

struct Task {
    RowsFn fn;
    int64_t rows, cols;
    const void *a, *b, *c;
    void *out, *out2;
    int64_t group_size;
    int64_t stride; /* elements between rows of a strided operand (see each pass) */
    int64_t rows_per_position; /* rope: heads, the rows of one token */
    int out_f32;
    float eps;
};

typedef struct {
    const Task *task;
    int64_t first_row, end_row;
} Slice;

static void *run_slice(void *arg) {
    const Slice *slice = (const Slice *)arg;
    slice->task->fn(slice->task, slice->first_row, slice->end_row);
    return NULL;
}

/* task->fn over all rows, in contiguous slices of rows, one per thread. */
static void run_rows(Task *task, int num_threads) {
    int64_t work = task->rows * task->cols / MIN_ELEMENTS_PER_THREAD;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (num_threads > work) num_threads = work < 1 ? 1 : (int)work;
    if (num_threads > task->rows) num_threads = (int)task->rows;
    if (num_threads < 1) num_threads = 1;
    pthread_t threads[MAX_THREADS];
    Slice slices[MAX_THREADS];
    const int64_t step = (task->rows + num_threads - 1) / num_threads;
    int started = 0;
    for (int t = 1; t < num_threads; t++) {
        slices[t] = (Slice){task, t * step, (t + 1) * step < task->rows ? (t + 1) * step : task->rows};
        if (slices[t].first_row >= slices[t].end_row) break;
        if (pthread_create(&threads[started], NULL, run_slice, &slices[t]) != 0) {
            /* No thread: this one does the slice after its own. */
            task->fn(task, slices[t].first_row, slices[t].end_row);
            continue;
        }
        started++;
    }
    task->fn(task, 0, step < task->rows ? step : task->rows);
    for (int t = 0; t < started; t++) pthread_join(threads[t], NULL);
}

/* torch: absmax = x.float().abs().amax(1); scale = (absmax / 127).clamp_min(FLT_MIN);
 *        q = (x.float() * scale.reciprocal()).round().to(int8)
 * a: bf16 [rows, cols] -> out: int8 [rows, cols], out2: float32 scale [rows]. */
static void quantize_rows(const Task *task, int64_t first_row, int64_t end_row) {
    const int64_t cols = task->cols;
    for (int64_t r = first_row; r < end_row; r++) {
        const uint16_t *x = (const uint16_t *)task->a + r * cols;
        int8_t *q = (int8_t *)task->out + r * cols;
        /* Sixteen running maxima: a single one is a chain gcc does not vectorize. */
        float lanes[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= cols; i += 16)
            for (int l = 0; l < 16; l++) {
                const float v = fabsf(bf16_to_f32(x[i + l]));
                lanes[l] = v > lanes[l] ? v : lanes[l];
            }
        float absmax = 0.0f;
        for (; i < cols; i++) {
            const float v = fabsf(bf16_to_f32(x[i]));
            absmax = v > absmax ? v : absmax;
        }
        for (int l = 0; l < 16; l++) absmax = lanes[l] > absmax ? lanes[l] : absmax;
        float scale = absmax / 127.0f;
        scale = scale < 1.17549435e-38f ? 1.17549435e-38f : scale;
        const float inverse = 1.0f / scale; /* a multiply per element, not a division */
        for (i = 0; i < cols; i++) q[i] = (int8_t)nearbyintf(bf16_to_f32(x[i]) * inverse);
        ((float *)task->out2)[r] = scale;
    }
}

/* torch: ((acc * row_scale[:, None]) * col_scale[None, :]), then .to(bfloat16) unless
 * out_f32. a: int32 [rows, cols]; b: float32 row_scale [rows]; c: float32 col_scale [cols];
 * out rows `stride` elements apart (a column slice of a wider output). */
static void scale_int32(const Task *task, int64_t first_row, int64_t end_row) {
    const int64_t cols = task->cols, out_stride = task->stride;
    const float *col_scale = (const float *)task->c;
    for (int64_t r = first_row; r < end_row; r++) {
        const int32_t *acc = (const int32_t *)task->a + r * cols;
        const float row_scale = ((const float *)task->b)[r];
        if (task->out_f32) {
            float *y = (float *)task->out + r * out_stride;
            for (int64_t i = 0; i < cols; i++) y[i] = ((float)acc[i] * row_scale) * col_scale[i];
        } else {
            uint16_t *y = (uint16_t *)task->out + r * out_stride;
            for (int64_t i = 0; i < cols; i++)
                y[i] = f32_to_bf16(((float)acc[i] * row_scale) * col_scale[i]);
        }
    }
}

/* The two int4 codes of a packed byte, two's complement (arithmetic shifts of int8). */
static inline float low_code(int8_t byte) { return (float)((int8_t)(byte << 4) >> 4); }
static inline float high_code(int8_t byte) { return (float)(byte >> 4); }

/* int4 codes to weights, one output feature per row (engine/quant/int4_tiles.py packs
 * them): per group of g inputs, byte j holds input j in its low nibble and input j + g/2
 * in its high one, two's complement. torch: W = codes.to(dtype) * scales[row, group]
 * in the tile's dtype (bf16: the float32 product of a 4-bit code and a bf16 scale is
 * exact, so rounding it once matches torch's bf16 multiply).
 * a: int8 packed [rows, cols / 2]; b: scales [rows, cols / g] in the tile's dtype;
 * out: [rows, cols] bf16, or float32 if out_f32. */
static void dequantize_int4(const Task *task, int64_t first_row, int64_t end_row) {
    const int64_t cols = task->cols, g = task->group_size, half = g / 2, groups = cols / g;
    for (int64_t r = first_row; r < end_row; r++) {
        const int8_t *packed = (const int8_t *)task->a + r * (cols / 2);
        for (int64_t group = 0; group < groups; group++) {
            const int8_t *bytes = packed + group * half;
            const int64_t first = r * cols + group * g;
            if (task->out_f32) {
                const float scale = ((const float *)task->b)[r * groups + group];
                float *w = (float *)task->out + first;
                for (int64_t j = 0; j < half; j++) {
                    w[j] = low_code(bytes[j]) * scale;
                    w[j + half] = high_code(bytes[j]) * scale;
                }
            } else {
                const float scale = bf16_to_f32(((const uint16_t *)task->b)[r * groups + group]);
                uint16_t *w = (uint16_t *)task->out + first;
                for (int64_t j = 0; j < half; j++) {
                    w[j] = f32_to_bf16(low_code(bytes[j]) * scale);
                    w[j + half] = f32_to_bf16(high_code(bytes[j]) * scale);
                }
            }
        }
    }
}

/* Hugging Face's LlamaRMSNorm in bfloat16: h = x (or x + delta, rounded to bf16 and
 * written back to x: the residual stream), then weight * bf16(h * rsqrt(mean(h^2) + eps)).
 * a: x bf16 [rows, cols] (updated in place when b is given); b: delta bf16 or NULL;
 * c: weight bf16 [cols]; out: bf16 [rows, cols]. */
static void rms_norm(const Task *task, int64_t first_row, int64_t end_row) {
    const int64_t cols = task->cols;
    const uint16_t *weight = (const uint16_t *)task->c;
    enum { SUM_LANES = 16 };
    for (int64_t r = first_row; r < end_row; r++) {
        uint16_t *x = (uint16_t *)task->a + r * cols;
        uint16_t *y = (uint16_t *)task->out + r * cols;
        if (task->b != NULL) {
            const uint16_t *delta = (const uint16_t *)task->b + r * cols;
            for (int64_t i = 0; i < cols; i++)
                x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(delta[i]));
        }
        float lanes[SUM_LANES] = {0};
        int64_t i = 0;
        for (; i + SUM_LANES <= cols; i += SUM_LANES)
            for (int l = 0; l < SUM_LANES; l++) {
                const float v = bf16_to_f32(x[i + l]);
                lanes[l] += v * v;
            }
        float sum = 0.0f;
        for (; i < cols; i++) sum += bf16_to_f32(x[i]) * bf16_to_f32(x[i]);
        for (int l = 0; l < SUM_LANES; l++) sum += lanes[l];
        const float inv_rms = 1.0f / sqrtf(sum / (float)cols + task->eps);
        for (int64_t j = 0; j < cols; j++) {
            const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[j]) * inv_rms));
            y[j] = f32_to_bf16(bf16_to_f32(weight[j]) * normed);
        }
    }
}

/* torch: F.silu(gate) * up in bfloat16, silu rounded to bf16 before the product as torch
 * rounds it. a: gate, b: up, bf16 rows `stride` elements apart (the two halves of one
 * fused projection's rows, or two tensors); out: bf16 [rows, cols]. */
static void silu_mul_row(const uint16_t *restrict gate, const uint16_t *restrict up,
                         uint16_t *restrict y, int64_t cols) {
    for (int64_t i = 0; i < cols; i++) {
        const float g = bf16_to_f32(gate[i]);
        const float silu = bf16_to_f32(f32_to_bf16(g / (1.0f + exp_clamped(-g))));
        y[i] = f32_to_bf16(silu * bf16_to_f32(up[i]));
    }
}

static void silu_mul(const Task *task, int64_t first_row, int64_t end_row) {
    const int64_t cols = task->cols, stride = task->stride;
    for (int64_t r = first_row; r < end_row; r++)
        silu_mul_row((const uint16_t *)task->a + r * stride, (const uint16_t *)task->b + r * stride,
                     (uint16_t *)task->out + r * cols, cols);
}

/* torch (engine/rope.py), in bfloat16 and in place: x = x * cos + rotate_half(x) * sin
 * with cos and sin the float32 table rows of each row's position rounded to bf16, and
 * every product and the sum rounded to bf16 as torch rounds each op. a: positions int64
 * [rows / rows_per_position]; b, c: cos, sin float32 [max_position, cols]; out: x bf16
 * [rows, cols], rows_per_position rows (heads) per position. */
static void rope(const Task *task, int64_t first_row, int64_t end_row) {
    const int64_t cols = task->cols, half = cols / 2;
    for (int64_t r = first_row; r < end_row; r++) {
        const int64_t position = ((const int64_t *)task->a)[r / task->rows_per_position];
        const float *cos_row = (const float *)task->b + position * cols;
        const float *sin_row = (const float *)task->c + position * cols;
        uint16_t *x = (uint16_t *)task->out + r * cols;
        for (int64_t i = 0; i < half; i++) {
            const float low = bf16_to_f32(x[i]), high = bf16_to_f32(x[i + half]);
            const float cos_low = bf16_to_f32(f32_to_bf16(cos_row[i]));
            const float sin_low = bf16_to_f32(f32_to_bf16(sin_row[i]));
            const float cos_high = bf16_to_f32(f32_to_bf16(cos_row[i + half]));
            const float sin_high = bf16_to_f32(f32_to_bf16(sin_row[i + half]));
            x[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(low * cos_low))
                               + bf16_to_f32(f32_to_bf16(-high * sin_low)));
            x[i + half] = f32_to_bf16(bf16_to_f32(f32_to_bf16(high * cos_high))
                                      + bf16_to_f32(f32_to_bf16(low * sin_high)));
        }
    }
}

/* int4 codes (packed as for dequantize_int4) to int8 codes of one scale per output
 * feature: q8 = clamp(round((code * scale + offset) * inverse_channel_scale), -127, 127),
 * the int4 weight the bf16 kernels compute (bf16 scale and offset) requantized per row.
 * a: packed int8 [rows, cols / 2]; b: scales bf16 [rows, cols / g]; c: offsets bf16
 * [rows, cols / g] or NULL; out2: inverse channel scales float32 [rows]; out: int8. */
static void requantize_int4(const Task *task, int64_t first_row, int64_t end_row) {
    const int64_t cols = task->cols, g = task->group_size, half = g / 2, groups = cols / g;
    for (int64_t r = first_row; r < end_row; r++) {
        const int8_t *packed = (const int8_t *)task->a + r * (cols / 2);
        const float inverse = ((const float *)task->out2)[r];
        for (int64_t group = 0; group < groups; group++) {
            const int8_t *bytes = packed + group * half;
            const float scale = bf16_to_f32(((const uint16_t *)task->b)[r * groups + group]);
            const float offset = task->c == NULL
                ? 0.0f : bf16_to_f32(((const uint16_t *)task->c)[r * groups + group]);
            int8_t *q = (int8_t *)task->out + r * cols + group * g;
            for (int64_t j = 0; j < half; j++) {
                float low = nearbyintf((low_code(bytes[j]) * scale + offset) * inverse);
                float high = nearbyintf((high_code(bytes[j]) * scale + offset) * inverse);
                low = low > 127.0f ? 127.0f : (low < -127.0f ? -127.0f : low);
                high = high > 127.0f ? 127.0f : (high < -127.0f ? -127.0f : high);
                q[j] = (int8_t)low;
                q[j + half] = (int8_t)high;
            }
        }
    }
}

void batchinfer_requantize_int4(const void *packed, int64_t rows, int64_t cols,
                                int64_t group_size, const void *scales, const void *offsets,
                                const void *inverse_channel_scales, void *out, int num_threads) {
    Task task = {.fn = requantize_int4, .rows = rows, .cols = cols, .a = packed, .b = scales,
                 .c = offsets, .out = out, .out2 = (void *)inverse_channel_scales,
                 .group_size = group_size};
    run_rows(&task, num_threads);
}

void batchinfer_rms_norm(void *x, const void *delta, const void *weight, int64_t rows,
                         int64_t cols, float eps, void *out, int num_threads) {
    Task task = {.fn = rms_norm, .rows = rows, .cols = cols, .a = x, .b = delta, .c = weight,
                 .out = out, .eps = eps};
    run_rows(&task, num_threads);
}

void batchinfer_silu_mul(const void *gate, const void *up, int64_t rows, int64_t cols,
                         int64_t row_stride, void *out, int num_threads) {
    Task task = {.fn = silu_mul, .rows = rows, .cols = cols, .a = gate, .b = up, .out = out,
                 .stride = row_stride};
    run_rows(&task, num_threads);
}
void batchinfer_quantize_rows(const void *x, int64_t rows, int64_t cols, void *q, void *scale,
                              int num_threads) {
    Task task = {.fn = quantize_rows, .rows = rows, .cols = cols, .a = x, .out = q, .out2 = scale};
    run_rows(&task, num_threads);
}

void batchinfer_scale_int32(const void *acc, int64_t rows, int64_t cols, const void *row_scale,
                            const void *col_scale, void *out, int64_t out_stride, int out_f32,
                            int num_threads) {
    Task task = {.fn = scale_int32, .rows = rows, .cols = cols, .a = acc, .b = row_scale,
                 .c = col_scale, .out = out, .stride = out_stride, .out_f32 = out_f32};
    run_rows(&task, num_threads);
}

void batchinfer_dequantize_int4(const void *packed, int64_t rows, int64_t cols,
                                int64_t group_size, const void *scales, void *out, int out_f32,
                                int num_threads) {
    Task task = {.fn = dequantize_int4, .rows = rows, .cols = cols, .a = packed, .b = scales,
                 .out = out, .group_size = group_size, .out_f32 = out_f32};
    run_rows(&task, num_threads);
}

void batchinfer_rope(void *x, int64_t rows, int64_t cols, int64_t rows_per_position,
                     const int64_t *positions, const float *cos, const float *sin,
                     int num_threads) {
    Task task = {.fn = rope, .rows = rows, .cols = cols, .a = positions, .b = cos, .c = sin,
                 .out = x, .rows_per_position = rows_per_position};
    run_rows(&task, num_threads);
}
