/* Neuron-aware sparse FFN: y[N, d] = sum over the listed neurons j of a_j(x) * down_j.
 *
 * Weights are neuron-major, one neuron = consecutive rows (gate, up, down) of length d, so the
 * kernel reads exactly the active neurons' bytes once. a_j(x) = act(x.gate_j) * (x.up_j) (gated),
 * act(x.up_j) (not gated), or gate_act[r, j] * (x.up_j) when the gate was already computed (CATS).
 * row_mask (optional, [N, ld_mask] bytes over the shard's neurons) keeps a_j(x_r) only where row r
 * needs neuron j: a batch reads the union of its rows' neurons once, each row keeps its own.
 * Threads split the neuron list; each sums into its own buffer, reduced at the end.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "activation.h"

static inline float dotf(const float *a, const float *b, int d) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < d; i++) s += a[i] * b[i];
    return s;
}

int pinfer_sparse_ffn(const float *x, int n_rows, int d, const float *w, int rows_per_neuron,
                      const int64_t *idx, int64_t k, const float *gate_act, int64_t ld_gate,
                      const uint8_t *row_mask, int64_t ld_mask, int act, float *y, int n_threads) {
    const int64_t nd = (int64_t)n_rows * d;
    memset(y, 0, nd * sizeof(float));
    int T = n_threads < 1 ? 1 : n_threads;
    if (T > k / 16) T = k / 16 > 1 ? (int)(k / 16) : 1;
    float *part = T > 1 ? calloc((size_t)(T - 1) * nd, sizeof(float)) : NULL;
    if (T > 1 && !part) return -1;
#pragma omp parallel num_threads(T)
    {
        int t = omp_get_thread_num();
        float *yt = t == 0 ? y : part + (int64_t)(t - 1) * nd;
#pragma omp for schedule(static)
        for (int64_t jj = 0; jj < k; jj++) {
            const int64_t j = idx[jj];
            const float *row = w + j * rows_per_neuron * (int64_t)d;
            const float *up = rows_per_neuron == 3 ? row + d : row;
            const float *down = up + d;
            for (int r = 0; r < n_rows; r++) {
                if (row_mask && !row_mask[r * ld_mask + j]) continue;
                const float *xr = x + (int64_t)r * d;
                float a;
                if (gate_act) a = gate_act[r * ld_gate + j] * dotf(xr, up, d);
                else if (rows_per_neuron == 3) a = actf(dotf(xr, row, d), act) * dotf(xr, up, d);
                else a = actf(dotf(xr, up, d), act);
                float *yr = yt + (int64_t)r * d;
#pragma omp simd
                for (int i = 0; i < d; i++) yr[i] += a * down[i];
            }
        }
    }
    for (int t = 1; t < T; t++) {
        const float *p = part + (int64_t)(t - 1) * nd;
        for (int64_t i = 0; i < nd; i++) y[i] += p[i];
    }
    free(part);
    return 0;
}
