/* Per-channel batch moments in one pass over the data, for the recalibration statistics loop.
 *
 * x is a contiguous float32 tensor viewed as (n, c, hw): n*c rows of hw values, row r belonging to
 * channel r % c. For every channel the kernel adds sum(x) and sum(x^2) to float64 accumulators and
 * can write the batch mean and biased variance as float32 (what a BN layer normalizes this batch
 * with). PyTorch needs two reductions, two reads of x, for the same sums; this reads x once.
 *
 * Shifted sums: the float32 partial sums are taken of x - k, k the mean of the channel's first
 * SHIFT_VALUES values in the batch (samples, then positions, in order: an estimate of its mean), and
 * turned back into sums of x in double. Unshifted, sum(x^2) of activations with mean m and spread s
 * carries a relative error ~1e-7 that E[x^2] - E[x]^2 multiplies by (m/s)^2: 20% at m = 1000 s.
 * Shifted, the factor is ((k - m)/s)^2, about 1/SHIFT_VALUES.
 *
 * x is walked in memory order (a channel-by-channel walk jumps c*hw floats between rows, which
 * defeats the hardware prefetcher on small maps). The rows are split into one contiguous range per
 * OpenMP thread; each thread sums its rows into its own per-channel double partials, which are then
 * added in thread order (deterministic for a given thread count). Values go into float lanes (8 per
 * channel for short rows, so a row needs no horizontal sum; 16 within a long row) that are added to
 * double before any float partial holds more than LANE_MAX values: ~1e-7 relative or better.
 *
 * Built and loaded at run time by normsurgeon/native/build.py; the torch path is the fallback.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANE_MAX 512        /* values a float partial holds before it is added in double */
#define LONG 512            /* rows this long get a horizontal sum each; shorter ones per-channel lanes */
#define MIN_PARALLEL 65536  /* below this many values one thread is faster than a parallel region */
#define SHIFT_VALUES 16     /* values per channel averaged into its shift k */

typedef float v8f __attribute__((vector_size(32)));

static inline double hsum(v8f a) {
    return (double)((a[0] + a[4]) + (a[1] + a[5])) + (double)((a[2] + a[6]) + (a[3] + a[7]));
}

/* sums of (x - k) and (x - k)^2 over one contiguous row, added to *s, *s2 */
static inline void row_sums(const float *x, int64_t len, float k, double *s, double *s2) {
    const v8f kv = {k, k, k, k, k, k, k, k};
    double ds = 0.0, ds2 = 0.0;
    int64_t i = 0;
    while (len - i >= 8) {
        v8f a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0}, u, w;
        int64_t stop = len - i > 16 * LANE_MAX ? i + 16 * LANE_MAX : len;
        for (; i + 16 <= stop; i += 16) {
            __builtin_memcpy(&u, x + i, sizeof u);
            __builtin_memcpy(&w, x + i + 8, sizeof w);
            u -= kv;
            w -= kv;
            a0 += u;
            b0 += u * u;
            a1 += w;
            b1 += w * w;
        }
        if (i + 8 <= stop) {
            __builtin_memcpy(&u, x + i, sizeof u);
            u -= kv;
            a0 += u;
            b0 += u * u;
            i += 8;
        }
        ds += hsum(a0 + a1);
        ds2 += hsum(b0 + b1);
    }
    for (; i < len; i++) {
        double v = (double)x[i] - k;
        ds += v;
        ds2 += v * v;
    }
    *s += ds;
    *s2 += ds2;
}

/* float partials per channel for rows shorter than LONG: a row is added to its channel's lanes
 * without a horizontal sum (its last hw % 8 values to ta/tb); all channels are flushed to double
 * every `every` rows, before any partial holds LANE_MAX values, and at the end */
typedef struct {
    v8f a, b;
    float ta, tb;
} chan_lanes;

static void flush_lanes(chan_lanes *l, int64_t c, double *part_s, double *part_s2) {
    for (int64_t ch = 0; ch < c; ch++) {
        part_s[ch] += hsum(l[ch].a) + l[ch].ta;
        part_s2[ch] += hsum(l[ch].b) + l[ch].tb;
        l[ch] = (chan_lanes){{0}, {0}, 0.0f, 0.0f};
    }
}

static int short_rows(const float *x, int64_t lo, int64_t hi, int64_t c, int64_t hw, const float *k,
                      double *part_s, double *part_s2) {
    size_t bytes = ((size_t)c * sizeof(chan_lanes) + 63) & ~(size_t)63;
    chan_lanes *l = aligned_alloc(64, bytes); /* v8f members need 32-byte alignment; calloc gives 16 */
    if (!l) return 1;
    memset(l, 0, bytes);
    int64_t full = hw & ~(int64_t)7, per_row = hw / 8 > hw - full ? hw / 8 : hw - full;
    int64_t rows_per_flush = LANE_MAX / per_row > 1 ? LANE_MAX / per_row : 1;
    int64_t every = rows_per_flush * c, since = 0, ch = lo % c;
    for (int64_t r = lo; r < hi; r++) {
        const float *row = x + r * hw;
        const float kc = k[ch];
        const v8f kv = {kc, kc, kc, kc, kc, kc, kc, kc};
        v8f a = l[ch].a, b = l[ch].b, u;
        for (int64_t j = 0; j < full; j += 8) {
            __builtin_memcpy(&u, row + j, sizeof u);
            u -= kv;
            a += u;
            b += u * u;
        }
        l[ch].a = a;
        l[ch].b = b;
        for (int64_t j = full; j < hw; j++) {
            float v = row[j] - kc;
            l[ch].ta += v;
            l[ch].tb += v * v;
        }
        if (++ch == c) ch = 0;
        if (++since == every) {
            flush_lanes(l, c, part_s, part_s2);
            since = 0;
        }
    }
    flush_lanes(l, c, part_s, part_s2);
    free(l);
    return 0;
}

/* rows [lo, hi) into part_s/part_s2 (per channel, shifted by k); 0, or 1 when memory ran out */
static int sum_rows(const float *x, int64_t lo, int64_t hi, int64_t c, int64_t hw, const float *k,
                    double *part_s, double *part_s2) {
    if (hw == 1) { /* BN1d on (n, c): one value per row; whole samples go channel-vectorized */
        int64_t r = lo, ch = lo % c;
        while (r < hi) {
            if (ch == 0 && hi - r >= c) {
                for (int64_t j = 0; j < c; j++) {
                    double v = (double)x[r + j] - k[j];
                    part_s[j] += v;
                    part_s2[j] += v * v;
                }
                r += c;
                continue;
            }
            double v = (double)x[r++] - k[ch];
            part_s[ch] += v;
            part_s2[ch] += v * v;
            if (++ch == c) ch = 0;
        }
        return 0;
    }
    if (hw < LONG) return short_rows(x, lo, hi, c, hw, k, part_s, part_s2);
    int64_t ch = lo % c;
    for (int64_t r = lo; r < hi; r++) {
        row_sums(x + r * hw, hw, k[ch], part_s + ch, part_s2 + ch);
        if (++ch == c) ch = 0;
    }
    return 0;
}

/* threads for a pass over rows * hw values: one below MIN_PARALLEL, never more than rows */
static int team_size(int64_t rows, int64_t hw, int threads) {
    if (threads < 1 || rows * hw < MIN_PARALLEL) return 1;
    return threads > rows ? (int)rows : threads;
}

/* inside a parallel region: this thread's contiguous share [*lo, *hi) of rows; returns its number */
static int64_t my_rows(int64_t rows, int64_t *lo, int64_t *hi) {
    int64_t t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    *lo = rows * t / nt;
    *hi = rows * (t + 1) / nt;
    return t;
}

/* Add per-channel sum(x), sum(x^2) of x (n, c, hw) to acc_s/acc_s2 (float64, length c). When not
 * NULL, mean_out/var_out (float32, length c) receive this batch's mean and biased variance (NaN/Inf
 * in a channel's data give NaN/Inf there, as in the sums). Returns 0, or 1 when memory ran out
 * (nothing was added then). */
int ns_moments_f32(const float *x, int64_t n, int64_t c, int64_t hw, double *acc_s, double *acc_s2,
                   float *mean_out, float *var_out, int threads) {
    if (n <= 0 || c <= 0 || hw <= 0) return 0;
    int64_t rows = n * c;
    threads = team_size(rows, hw, threads);
    double *part = calloc((size_t)threads * 2 * (size_t)c, sizeof(double));
    float *k = calloc((size_t)c, sizeof(float)); /* the shift per channel (0 if not finite) */
    if (!part || !k) {
        free(part);
        free(k);
        return 1;
    }
    /* shift sums sample-major, like the data (contiguous across channels when hw is 1); the first
     * thread's partials are free until the parallel region starts */
    double *ka = part;
    int64_t got = 0;
    for (int64_t i = 0; i < n && got < SHIFT_VALUES; i++) {
        int64_t take = hw < SHIFT_VALUES - got ? hw : SHIFT_VALUES - got;
        for (int64_t ch = 0; ch < c; ch++)
            for (int64_t j = 0; j < take; j++) ka[ch] += x[(i * c + ch) * hw + j];
        got += take;
    }
    for (int64_t ch = 0; ch < c; ch++) {
        float v = (float)(ka[ch] / (double)got);
        k[ch] = v - v == 0.0f ? v : 0.0f; /* false for NaN and +-Inf */
        ka[ch] = 0.0;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t lo, hi, t = my_rows(rows, &lo, &hi);
        double *ps = part + t * 2 * c;
        if (sum_rows(x, lo, hi, c, hw, k, ps, ps + c)) {
#pragma omp atomic write
            failed = 1;
        }
    }
    if (!failed) {
        double count = (double)n * (double)hw;
        for (int64_t ch = 0; ch < c; ch++) {
            double d = 0.0, d2 = 0.0, kc = k[ch]; /* sums of x - kc and (x - kc)^2 */
            for (int t = 0; t < threads; t++) {
                d += part[t * 2 * c + ch];
                d2 += part[t * 2 * c + c + ch];
            }
            acc_s[ch] += kc != 0.0 ? d + count * kc : d;
            acc_s2[ch] += kc != 0.0 ? d2 + kc * (2.0 * d + count * kc) : d2;
            double dm = d / count, v = d2 / count - dm * dm;
            if (mean_out) mean_out[ch] = (float)(kc + dm);
            if (var_out) var_out[ch] = (float)(v < 0.0 ? 0.0 : v); /* NaN stays NaN */
        }
    }
    free(part);
    free(k);
    return failed;
}

/* x = x * scale + shift in place, per channel, with scale = weight / sqrt(var + eps) and shift =
 * bias - mean * scale (weight / bias NULL: 1 / 0), computed in float as torch's CPU BN computes
 * them: a BN's eval-mode normalization with (mean, var), for the statistics pass of a layer whose
 * input is used by nothing else (normsurgeon/calibrate/inplace.py decides that). Rows are split
 * across threads like the sums. Returns 0, or 1 when memory ran out (x untouched then). */
int ns_normalize_f32(float *x, int64_t n, int64_t c, int64_t hw, const float *mean, const float *var,
                     const float *weight, const float *bias, double eps, int threads) {
    if (n <= 0 || c <= 0 || hw <= 0) return 0;
    float *scale = malloc(2 * (size_t)c * sizeof(float));
    if (!scale) return 1;
    float *shift = scale + c;
    for (int64_t ch = 0; ch < c; ch++) {
        float inv = 1.0f / sqrtf(var[ch] + (float)eps);
        scale[ch] = weight ? inv * weight[ch] : inv;
        shift[ch] = (bias ? bias[ch] : 0.0f) - mean[ch] * scale[ch];
    }
    int64_t rows = n * c;
    threads = team_size(rows, hw, threads);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t lo, hi;
        my_rows(rows, &lo, &hi);
        for (int64_t r = lo, ch = lo % c; r < hi; r++) {
            float *row = x + r * hw;
            const float a = scale[ch], b = shift[ch];
            for (int64_t j = 0; j < hw; j++) row[j] = row[j] * a + b;
            if (++ch == c) ch = 0;
        }
    }
    free(scale);
    return 0;
}

/* The ABI version the Python binding (moments.py) checks against its own argument lists. */
int ns_moments_abi(void) { return 6; }
