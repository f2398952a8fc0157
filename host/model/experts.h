/* The host's hold on the experts' weights, handed to routers (tsr_expert_access,
 * <tessera/router.h>): how many bytes each expert is, whether it is in memory, reading it in
 * (now, or on a thread of its own while the forward goes on), letting it go, and its matrices.
 * Page-level work applies to the weights a backend computing on host memory reads in place
 * from the model file's mapping; the others (converted by the quantizer, or uploaded to a
 * backend with memory of its own) count as always in memory. */
#ifndef TSR_HOST_EXPERTS_H
#define TSR_HOST_EXPERTS_H

#include <stdbool.h>

#include <tessera/router.h>

#include "base/error.h"
#include "model/model.h"
#include "model/weights.h"

typedef struct tsr_experts tsr_experts;

/* For the experts of `weights` (a model with experts). `in_place`: the backend multiplies the
 * prepared weights where they are (it computes on host memory). Borrows model and weights,
 * which must outlive it. */
tsr_status tsr_experts_create(const tsr_model *model, const tsr_model_weights *weights,
                              bool in_place, tsr_experts **out, tsr_error *err);

/* The table routers receive; valid until tsr_experts_free. */
const tsr_expert_access *tsr_experts_access(const tsr_experts *x);

/* Stops the prefetch thread (waiting for the expert it reads) and frees. NULL is allowed. */
void tsr_experts_free(tsr_experts *x);

#endif
