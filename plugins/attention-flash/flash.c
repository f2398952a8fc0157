/*
 * attention 'flash': the same result as 'reference' computed the FlashAttention way (Dao et
 * al. 2022): keys in tiles of `tile` entries, the softmax online, each K/V tile read once for
 * all the query heads of its KV head and a block of queries. The computation is
 * <tessera/sdk_flash.h>'s (described there), shared with plugins that must give flash's bits.
 */
#include <tessera/sdk_flash.h>

static tsr_status flash_forward(void *self, const tsr_attention_call *call) {
    return tsr_flash_run(self, call, NULL);
}

static tsr_status flash_create(const tsr_host *host, const tsr_params *params,
                               const tsr_attention_init *init, void **out) {
    tsr_status st = tsr_attention_check_init(host, init, 0);
    if (st < 0) return st;
    int64_t tile = tsr_param_int(params, "tile");
    if (tile < 8 || tile > 1024) {
        host->set_error(host->ctx, "tile %lld: expected an integer in [8, 1024]", (long long)tile);
        return TSR_E_INVALID;
    }
    tsr_flash *a = tsr_attention_new(host, init, sizeof *a);
    if (!a) return TSR_E_NOMEM;
    a->tile = (int32_t)tile;
    *out = a;
    return TSR_OK;
}

static const tsr_param_def flash_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "tile", .type = TSR_PARAM_INT, .default_value = "64",
     .min = 8, .max = 1024, .unit = "entries",
     .doc = "keys read per step of the online softmax"},
};

static const tsr_attention_vtable flash_vtable = {
    TSR_SIZED(tsr_attention_vtable),
    .create = flash_create,
    .destroy = tsr_attention_destroy,
    .forward = flash_forward,
};

static const tsr_plugin_desc flash_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ATTENTION, ATTENTION),
    .name = "flash",
    .version = "1.0",
    .description = "tiled attention with an online softmax (FlashAttention-style), f32",
    TSR_PARAMS(flash_params),
    .vtable = &flash_vtable,
};

TSR_PLUGIN_EXPORT(&flash_desc)
