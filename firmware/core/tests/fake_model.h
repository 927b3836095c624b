/* A fake model for the host: its outputs are input[i] / 4 for the first FAKE_OUTPUTS input
 * bytes of its last run (or values a test sets), and each run takes fake_invoke_us on the
 * board's clock (fake_spend_us, which the board side defines). */
#ifndef FAKE_MODEL_H
#define FAKE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#define FAKE_OUTPUTS 4

extern const char *fake_init_error;     /* lb_model_init's answer (NULL: success) */
extern size_t fake_input_bytes;         /* the model's input tensor size */
extern size_t fake_arena_used_bytes;    /* lb_model_arena_used_bytes */
extern uint32_t fake_invoke_us;         /* how long one run takes */
extern unsigned long fake_fail_on_run;  /* 1-based run that fails (0: none) */
extern unsigned long fake_runs;         /* runs so far */
extern unsigned long fake_bad_runs;     /* runs that were given other than fake_input_bytes */
extern uint8_t fake_seen_input[];       /* the input of the last run, as received */

/* Make the model's outputs `values` instead of the input-derived ones. */
void fake_set_outputs(const float *values, size_t n);

/* Back to the defaults: 4 input bytes, input-derived outputs, no failures, no runs. */
void fake_model_reset(void);

/* Let `us` microseconds pass on the board's clock (defined by the board side). */
void fake_spend_us(uint32_t us);

#endif /* FAKE_MODEL_H */
