/* FFN activation functions by code (runtime/model/activations.py: ACT_CODES). */
#pragma once
#include <math.h>

static inline float actf(float v, int act) {
    switch (act) {
    case 0: return v / (1.f + expf(-v));                                         /* silu */
    case 1: return v > 0.f ? v : 0.f;                                             /* relu */
    case 2: return 0.5f * v * (1.f + erff(v * 0.70710678f));                      /* gelu */
    default: return 0.5f * v * (1.f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));
    }
}
