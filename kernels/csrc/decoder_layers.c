/* A step's Llama-family decoder layers in one call: the native kernels that
 * engine/models/llama.py's DecoderLayer.forward calls one at a time from Python (about eleven
 * a layer), called here in the same order with the same arguments, so the results are the
 * same bits. Why: at decode sizes the Python around those calls (views, allocations, checks,
 * ctypes) took about a third of a batch-1 step on a 2-core CPU, time in which the other core
 * waits. kernels/decoder_layers.py decides when a step qualifies and fills these structs.
 *
 * Per layer, with x the residual stream [T, hidden] (updated in place) and `pending` the
 * previous layer's MLP output not yet added to it:
 *   normed = rms_norm(x += pending); qkv = normed . Wqkv (+ LoRA); [q/k norms]; RoPE and
 *   K/V write; attn = paged attention; o = attn . Wo (+ LoRA); normed = rms_norm(x += o);
 *   gate_up = normed . Wgu (+ LoRA); act = silu(gate) * up; mlp = act . Wdown (+ LoRA).
 * The last layer's mlp is left pending for the final norm (in Python). bf16 throughout.
 */
#include <stddef.h>
#include <stdint.h>

/* The kernels this composes (paged_attention.c, pointwise.c, lora.c, the two GEMMs). */
int rms_norm(void *x, const void *delta, const void *w, void *out, int64_t rows, int width, float eps,
             int is_bf16, int num_threads, int fp32_weight);
int rms_norm_heads(void *qkv, int64_t row_stride, int64_t rows, int heads, int kv_heads, int d, const void *q_w,
                   const void *k_w, float eps, int is_bf16, int fp32_weight, int num_threads);
int rope_write_kv(void *qkv, int64_t row_stride, int64_t rows, const int64_t *positions, const void *cos_table,
                  const void *sin_table, int heads, int kv_heads, int d, int rot, const int64_t *slot_mapping,
                  void *k_cache, void *v_cache, int block_size, int is_bf16, int num_threads);
int paged_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                    void *out, int64_t out_stride, int num_requests,
                    const int64_t *query_start, const int64_t *query_len, const int64_t *context_len,
                    const int64_t *block_table, int64_t max_blocks, int heads, int kv_heads, int d,
                    int block_size, float scale, int is_bf16, int num_threads, int window, float softcap);
int silu_mul(const void *gate_up, void *out, int64_t rows, int width, int is_bf16, int num_threads);
int lora_add(const void *x, int64_t x_stride, int in, void *y, int64_t y_stride, int num_modules,
             const int64_t *table, int rank, int num_segments, const int64_t *seg_start, const int64_t *seg_len,
             const int64_t *seg_slot, const void *row_scale, const void *row_shift, int64_t term_stride,
             const int64_t *seg_term_row, int is_bf16, int use_amx, int num_threads);
int amx_gemm_bf16(const uint16_t *x, int64_t x_stride, int64_t M, int K, const uint16_t *w, int N,
                  const uint16_t *bias, uint16_t *y, int64_t y_stride, int num_threads);
int avx512_bf16_gemm(const uint16_t *x, int64_t x_stride, int64_t M, int K, const uint16_t *w, int N,
                     const uint16_t *bias, uint16_t *y, int64_t y_stride, int num_threads);

/* The structs below mirror kernels/decoder_layers.py's ctypes Structures field for field. */

struct projection {
    const uint16_t *tiles, *bias; /* tile-packed weight (kernels/dense.py, TiledWeight); bias or NULL */
    int64_t out_features, in_features;
    const int64_t *lora_table; /* kernels/lora.py LoraModules.table; NULL: no adapter of the step targets it */
    int64_t lora_modules, lora_amx;
};

/* One group of layers' attention metadata (kernels/attention.py, AttentionMetadata). */
struct attention_group {
    int64_t requests, max_blocks, block_size;
    const int64_t *slot_mapping, *query_start, *query_len, *context_len, *block_table;
};

struct layer_spec {
    const void *input_norm, *post_norm, *q_norm, *k_norm; /* q_norm NULL: no q/k norms */
    const void *rope_cos, *rope_sin;
    void *k_cache, *v_cache;
    int64_t rope_dim, window, group; /* window 0: none; group: its attention_group */
    int64_t cache_block_size;        /* the caches' (RoPE's K/V write reads it, as in Python) */
    float norm_eps, qk_norm_eps, scale, softcap;
    struct projection qkv, o, gate_up, down;
};

struct step_spec {
    int64_t tokens, hidden, heads, kv_heads, head_dim, intermediate, threads, amx_gemm;
    uint16_t *x, *normed, *qkv, *attn, *o, *gate_up, *act, *mlp; /* x: residual stream; the rest scratch */
    const uint16_t *pending;                                     /* the first layer's (NULL: none) */
    const int64_t *positions;
    const struct attention_group *groups;
    int64_t lora_rank;
    /* LoRA segments: all of them (the AMX kernel's), and the short ones (the other kernel's,
     * which the caller checked are all of them) */
    int64_t lora_segments, short_segments;
    const int64_t *lora_start, *lora_len, *lora_slot, *short_start, *short_len, *short_slot;
};

/* y = x . W^T (+ bias) (+ the step's LoRA); x [T, in] and y [T, out] contiguous. */
static int project(const struct step_spec *s, const struct projection *p, const uint16_t *x, uint16_t *y) {
    const int in = (int)p->in_features, out = (int)p->out_features, t = (int)s->threads;
    int rc = s->amx_gemm ? amx_gemm_bf16(x, in, s->tokens, in, p->tiles, out, p->bias, y, out, t)
                         : avx512_bf16_gemm(x, in, s->tokens, in, p->tiles, out, p->bias, y, out, t);
    if (rc || !p->lora_table) return rc;
    const int64_t n = p->lora_amx ? s->lora_segments : s->short_segments;
    if (n == 0) return 0;
    return p->lora_amx
        ? lora_add(x, in, in, y, out, (int)p->lora_modules, p->lora_table, (int)s->lora_rank, (int)n, s->lora_start,
                   s->lora_len, s->lora_slot, NULL, NULL, 0, NULL, 1, 1, t)
        : lora_add(x, in, in, y, out, (int)p->lora_modules, p->lora_table, (int)s->lora_rank, (int)n, s->short_start,
                   s->short_len, s->short_slot, NULL, NULL, 0, NULL, 1, 0, t);
}

/* Returns 0, or -1 where a kernel refused its arguments (the layers from there on not run). */
int decoder_layers(const struct layer_spec *layers, int64_t num_layers, const struct step_spec *s) {
    const int64_t T = s->tokens, hidden = s->hidden;
    const int heads = (int)s->heads, kv = (int)s->kv_heads, d = (int)s->head_dim, t = (int)s->threads;
    const int64_t qkv_width = (int64_t)(heads + 2 * kv) * d;
    const uint16_t *pending = s->pending;
    for (int64_t i = 0; i < num_layers; i++) {
        const struct layer_spec *L = &layers[i];
        const struct attention_group *g = &s->groups[L->group];
        if (rms_norm(s->x, pending, L->input_norm, s->normed, T, (int)hidden, L->norm_eps, 1, t, 0)
            || project(s, &L->qkv, s->normed, s->qkv)
            || (L->q_norm && rms_norm_heads(s->qkv, qkv_width, T, heads, kv, d, L->q_norm, L->k_norm, L->qk_norm_eps,
                                            1, 0, t))
            || rope_write_kv(s->qkv, qkv_width, T, s->positions, L->rope_cos, L->rope_sin, heads, kv, d,
                             (int)L->rope_dim, g->slot_mapping, L->k_cache, L->v_cache, (int)L->cache_block_size, 1, t)
            || paged_attention(s->qkv, qkv_width, L->k_cache, L->v_cache, s->attn, (int64_t)heads * d,
                               (int)g->requests, g->query_start, g->query_len, g->context_len, g->block_table,
                               g->max_blocks, heads, kv, d, (int)g->block_size, L->scale, 1, t, (int)L->window,
                               L->softcap)
            || project(s, &L->o, s->attn, s->o)
            || rms_norm(s->x, s->o, L->post_norm, s->normed, T, (int)hidden, L->norm_eps, 1, t, 0)
            || project(s, &L->gate_up, s->normed, s->gate_up)
            || silu_mul(s->gate_up, s->act, T, (int)s->intermediate, 1, t)
            || project(s, &L->down, s->act, s->mlp))
            return -1;
        pending = s->mlp;
    }
    return 0;
}
