// A weight as the products take it (C ABI, shared by cpu.cpp, decode.cpp and llama/kernels/decode.py).

#pragma once

#include <cstdint>

extern "C" {

// A weight in one of the products' formats: n output rows of k columns.
struct LlkLinear {
    int64_t format;  // 0: fp32 w; 1: int8 w, float scale (n, groups); 2: 4-bit w, fp16 scale and min (n, groups)
    const void* w;
    const void* scale;
    const void* min;
    int64_t groups, n, k;
};

}  // extern "C"
