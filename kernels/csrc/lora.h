/* Segmented LoRA: what lora.c (the entry point, AVX-512 / plain kernel) and lora_amx.c share. */
#pragma once
#include <stdint.h>

/* One row of the module table: the module's first column in y, its output width, and its
 * pool stacks' addresses and strides (A [slots, R, in] contiguous per slot, B [slots, out, R]). */
struct lora_module {
    int64_t y_col, out, a, a_slot_stride, b, b_slot_stride, b_row_stride;
};

/* Per-row terms of some segments' adapters (DoRA, lora_bias: engine/models/slot_rows.py),
 * applied as the delta is added: y = (y + delta) * s + t. s and t come from the projection's
 * tables [rows][stride] (y's dtype; NULL: no scale, or no shift), row seg_row[i] for segment i
 * (-1: none), columns as in y. */
struct row_terms {
    const void *scale, *shift;
    int64_t stride;
    const int64_t *seg_row;
};

/* Segment i's scale or shift from column col on (NULL: none to apply). */
static inline const void *term_at(const struct row_terms *rt, const void *table, int64_t i, int64_t col,
                                  size_t es) {
    if (!rt || !table || rt->seg_row[i] < 0) return NULL;
    return (const char *)table + (size_t)(rt->seg_row[i] * rt->stride + col) * es;
}

/* bf16 x and y; returns -1 (nothing written) where AMX or the shapes do not allow it. */
int lora_group_amx(const void *x, int64_t x_stride, int in, void *y, int64_t y_stride, int num_modules,
                   const struct lora_module *mods, int rank, int num_segments, const int64_t *seg_start,
                   const int64_t *seg_len, const int64_t *seg_slot, const struct row_terms *rt, int num_threads);
