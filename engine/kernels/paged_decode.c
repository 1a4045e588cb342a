/* Paged decode attention for CPUs: one query token per sequence against its KV blocks,
 * read in place from the pool (no gather), with an online softmax in float32.
 *
 * Built and loaded by engine/kernels/cpu.py (plain C, no Python or torch headers, so it
 * compiles quickly on first use). Layouts, all contiguous:
 *   q, out        [batch, heads, head_dim]
 *   k/v pool      [num_blocks, kv_heads, block_size, head_dim]
 *   block_tables  [batch, table_width] int64, context_lens [batch] int64 (0: a padding
 *                 row, written as zeros)
 * Query heads h*group .. h*group+group-1 share KV head h, so each KV row is read once per
 * group. A work item is a sequence and a run of its KV heads (all of them unless the
 * batch is too small to keep every thread busy), block by block, the heads inside a
 * block: a block's heads lie side by side in the pool, so each block is one contiguous
 * stream the hardware prefetcher follows (per head, it would be a 2 KiB jump into a
 * random block each time, about 1.5x slower). Items are handed out to threads from an
 * atomic counter: contexts differ in length, so static splits would leave threads idle.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#include "cpu_math.h"

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };
enum { MAX_HEAD_DIM = 256, MAX_GROUP = 16, MAX_BLOCK_SIZE = 128, MAX_THREADS = 64 };
/* Query heads one item holds state for (a multiple of MAX_GROUP). */
enum { MAX_ITEM_ROWS = 64 };

typedef struct {
    const void *q, *k_pool, *v_pool;
    const int64_t *block_tables, *context_lens;
    void *out;
    int64_t batch, heads, kv_heads, head_dim, block_size, table_width, window;
    float scale;
    int dtype;
    int64_t heads_per_item; /* KV heads per work item */
    int64_t next_item;
} Job;

int batchinfer_kernel_limits(int64_t *head_dim, int64_t *group, int64_t *block_size) {
    *head_dim = MAX_HEAD_DIM;
    *group = MAX_GROUP;
    *block_size = MAX_BLOCK_SIZE;
#ifdef __FLT16_MAX__
    return 1; /* float16 supported */
#else
    return 0;
#endif
}

/* Element i of a pool or query tensor as float32. dtype is a constant at every call site
 * (see attend_item), so the branches fold away and the loops below vectorize. */
static inline __attribute__((always_inline)) float load_f32(const void *src, int64_t i,
                                                            int dtype) {
    if (dtype == DTYPE_BF16) return bf16_to_f32(((const uint16_t *)src)[i]);
#ifdef __FLT16_MAX__
    if (dtype == DTYPE_F16) return (float)((const _Float16 *)src)[i];
#endif
    return ((const float *)src)[i];
}

static inline __attribute__((always_inline)) void store_f32(void *dst, int64_t i, float value,
                                                            int dtype) {
    if (dtype == DTYPE_BF16) ((uint16_t *)dst)[i] = f32_to_bf16(value);
#ifdef __FLT16_MAX__
    else if (dtype == DTYPE_F16) ((_Float16 *)dst)[i] = (_Float16)value;
#endif
    else ((float *)dst)[i] = value;
}

/* q . pool[key : key + D]. Eight explicit lanes instead of a reduction loop: gcc
 * vectorizes them with the bf16/fp16 conversion in registers, which it does not do for
 * a reduction over mixed widths. */
static inline __attribute__((always_inline)) float dot(const float *q, const void *pool,
                                                       int64_t key, const int64_t D,
                                                       int dtype) {
    float lanes[8] = {0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
        for (int l = 0; l < 8; l++) lanes[l] += q[d + l] * load_f32(pool, key + d + l, dtype);
    float s = 0.0f;
    for (; d < D; d++) s += q[d] * load_f32(pool, key + d, dtype);
    for (int l = 0; l < 8; l++) s += lanes[l];
    return s;
}

#ifdef __AVX512BF16__
/* Scores of bfloat16 keys [lo, hi) of one block (rows D apart, D a multiple of 32)
 * against the query's bfloat16 row, times scale, where the CPU has AVX512-BF16: one
 * instruction multiplies and adds 32 element pairs. A product of two bfloat16 values is
 * exact in float32, so this equals the portable path up to the order of the additions. */
static inline __attribute__((always_inline)) void bf16_block_scores(
    const uint16_t *q, const uint16_t *keys, int64_t lo, int64_t hi, const int64_t D,
    float scale, float *scores) {
    __m512bh query[MAX_HEAD_DIM / 32];
    for (int64_t c = 0; c < D / 32; c++) query[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
    for (int64_t j = lo; j < hi; j++) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < D / 32; c++)
            sum = _mm512_dpbf16_ps(sum, query[c],
                                   (__m512bh)_mm512_loadu_si512(keys + j * D + 32 * c));
        scores[j] = _mm512_reduce_add_ps(sum) * scale;
    }
}
#endif

/* Asks for elements [start, start + n) of both pools ahead of their use. Blocks lie at
 * random in the pool, so the hardware prefetcher only finds each block's stream after
 * its first misses; named a block ahead, the next block's keys and values arrive while
 * this one is computed (about 1.3x on contexts read from memory). */
static inline __attribute__((always_inline)) void prefetch_rows(const Job *job, int64_t start,
                                                                int64_t n, int dtype) {
    const int64_t size = dtype == DTYPE_F32 ? 4 : 2;
    const char *keys = (const char *)job->k_pool + start * size;
    const char *values = (const char *)job->v_pool + start * size;
    for (int64_t offset = 0; offset < n * size; offset += 64) {
        __builtin_prefetch(keys + offset);
        __builtin_prefetch(values + offset);
    }
}

/* One work item: heads [first, first + count) of one sequence. Inlined with constant D
 * and dtype for the common head sizes, so the dot products and value sums compile to
 * straight vector code that converts bf16/fp16 in registers. */
static inline __attribute__((always_inline)) void attend_item(const Job *job, int64_t item,
                                                              const int64_t D, const int dtype) {
    const int64_t BS = job->block_size;
    const int64_t group = job->heads / job->kv_heads;
    const int64_t runs = (job->kv_heads + job->heads_per_item - 1) / job->heads_per_item;
    const int64_t seq = item / runs, first = (item % runs) * job->heads_per_item;
    const int64_t count = job->kv_heads - first < job->heads_per_item ? job->kv_heads - first
                                                                      : job->heads_per_item;
    const int64_t rows = count * group; /* query heads of the item, from out row first_row */
    const int64_t first_row = (seq * job->heads + first * group) * D;
    const int64_t context = job->context_lens[seq];
    if (context <= 0) { /* a padding row of a fixed-size batch */
        for (int64_t i = 0; i < rows * D; i++) store_f32(job->out, first_row + i, 0.0f, dtype);
        return;
    }
    const int64_t query_pos = context - 1;
    int64_t first_key = 0;
    if (job->window > 0 && query_pos - job->window + 1 > 0) first_key = query_pos - job->window + 1;

    float q[MAX_ITEM_ROWS][MAX_HEAD_DIM], acc[MAX_ITEM_ROWS][MAX_HEAD_DIM];
    float running_max[MAX_ITEM_ROWS], denom[MAX_ITEM_ROWS], scores[MAX_BLOCK_SIZE];
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t d = 0; d < D; d++)
            q[r][d] = load_f32(job->q, first_row + r * D + d, dtype) * job->scale;
        for (int64_t d = 0; d < D; d++) acc[r][d] = 0.0f;
        running_max[r] = -INFINITY;
        denom[r] = 0.0f;
    }

    const int64_t *table = job->block_tables + seq * job->table_width;
    for (int64_t b = first_key / BS; b <= query_pos / BS; b++) {
        const int64_t block_start = b * BS;
        const int64_t lo = first_key > block_start ? first_key - block_start : 0;
        const int64_t hi = context - block_start < BS ? context - block_start : BS;
        for (int64_t h = 0; h < count; h++) {
            const int64_t base = (table[b] * job->kv_heads + first + h) * BS * D;
            if (b < query_pos / BS) /* the next block's rows of this head */
                prefetch_rows(job, (table[b + 1] * job->kv_heads + first + h) * BS * D, BS * D,
                              dtype);
            for (int64_t r = h * group; r < (h + 1) * group; r++) {
                const float *qr = q[r];
                float block_max = -INFINITY;
#ifdef __AVX512BF16__
                if (dtype == DTYPE_BF16 && D % 32 == 0) {
                    bf16_block_scores((const uint16_t *)job->q + first_row + r * D,
                                      (const uint16_t *)job->k_pool + base, lo, hi, D,
                                      job->scale, scores);
                    for (int64_t j = lo; j < hi; j++)
                        if (scores[j] > block_max) block_max = scores[j];
                } else
#endif
                for (int64_t j = lo; j < hi; j++) {
                    const float s = dot(qr, job->k_pool, base + j * D, D, dtype);
                    scores[j] = s;
                    if (s > block_max) block_max = s;
                }
                const float new_max = block_max > running_max[r] ? block_max : running_max[r];
                const float rescale = expf(running_max[r] - new_max); /* 0 on the first block */
                float *a = acc[r];
                denom[r] *= rescale;
                for (int64_t d = 0; d < D; d++) a[d] *= rescale;
                for (int64_t j = lo; j < hi; j++) scores[j] = exp_clamped(scores[j] - new_max);
                for (int64_t j = lo; j < hi; j++) {
                    const float p = scores[j];
                    const int64_t value = base + j * D;
                    denom[r] += p;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) a[d] += p * load_f32(job->v_pool, value + d, dtype);
                }
                running_max[r] = new_max;
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const float inv = 1.0f / denom[r];
        for (int64_t d = 0; d < D; d++) store_f32(job->out, first_row + r * D + d, acc[r][d] * inv, dtype);
    }
}

#define ATTEND_WITH_DIM(DTYPE)                                                      \
    switch (job->head_dim) {                                                        \
    case 64: attend_item(job, item, 64, DTYPE); break;                              \
    case 128: attend_item(job, item, 128, DTYPE); break;                            \
    default: attend_item(job, item, job->head_dim, DTYPE);                          \
    }

static void attend_one(const Job *job, int64_t item) {
    if (job->dtype == DTYPE_BF16) {
        ATTEND_WITH_DIM(DTYPE_BF16)
    } else if (job->dtype == DTYPE_F16) {
        ATTEND_WITH_DIM(DTYPE_F16)
    } else {
        ATTEND_WITH_DIM(DTYPE_F32)
    }
}

static int64_t num_items(const Job *job) {
    return job->batch * ((job->kv_heads + job->heads_per_item - 1) / job->heads_per_item);
}

static void *worker(void *arg) {
    Job *job = (Job *)arg;
    const int64_t items = num_items(job);
    for (;;) {
        const int64_t item = __atomic_fetch_add(&job->next_item, 1, __ATOMIC_RELAXED);
        if (item >= items) return NULL;
        attend_one(job, item);
    }
}

void batchinfer_paged_decode(const void *q, const void *k_pool, const void *v_pool,
                             const int64_t *block_tables, const int64_t *context_lens, void *out,
                             int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                             int64_t block_size, int64_t table_width, int64_t window, float scale,
                             int dtype, int num_threads) {
    Job job = {q, k_pool, v_pool, block_tables, context_lens, out, batch, heads, kv_heads,
               head_dim, block_size, table_width, window, scale, dtype, kv_heads, 0};
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    /* Whole sequences where there are enough of them to share out (four items a thread);
     * else halve the heads per item until there are. */
    const int64_t group = heads / kv_heads;
    while (job.heads_per_item * group > MAX_ITEM_ROWS) job.heads_per_item = (job.heads_per_item + 1) / 2;
    while (job.heads_per_item > 1 && num_items(&job) < 4 * (int64_t)num_threads)
        job.heads_per_item = (job.heads_per_item + 1) / 2;
    if (num_threads > num_items(&job)) num_threads = (int)num_items(&job);
    pthread_t threads[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < num_threads; t++) {
        if (pthread_create(&threads[started], NULL, worker, &job) != 0) break;
        started++;
    }
    worker(&job); /* the calling thread works too; fewer threads only means slower */
    for (int t = 0; t < started; t++) pthread_join(threads[t], NULL);
}
