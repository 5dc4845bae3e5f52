/* Segmented LoRA: what lora.c (the entry point, AVX-512 / plain kernel) and lora_amx.c share. */
#pragma once
#include <stdint.h>

/* One row of the module table: the module's first column in y, its output width, and its
 * pool stacks' addresses and strides (A [slots, R, in] contiguous per slot, B [slots, out, R]). */
struct lora_module {
    int64_t y_col, out, a, a_slot_stride, b, b_slot_stride, b_row_stride;
};

/* bf16 x and y; returns -1 (nothing written) where AMX or the shapes do not allow it. */
int lora_group_amx(const void *x, int64_t x_stride, int in, void *y, int64_t y_stride, int num_modules,
                   const struct lora_module *mods, int rank, int num_segments, const int64_t *seg_start,
                   const int64_t *seg_len, const int64_t *seg_slot, int num_threads);
