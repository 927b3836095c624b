/* A fake model for the host: see fake_model.h. */
#include "fake_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lb_dut.h"
#include "lb_hooks.h"

const char *fake_init_error;
size_t fake_input_bytes;
int fake_input_int8;
float fake_input_scale;
int32_t fake_input_zero_point;
size_t fake_output_count;
size_t fake_arena_used_bytes;
uint32_t fake_invoke_us;
uint32_t fake_init_us;
unsigned long fake_fail_on_run;
unsigned long fake_runs;
uint8_t fake_seen_input[LB_DB_CAPACITY_BYTES];

static uint8_t tensor[LB_DB_CAPACITY_BYTES];
static float fixed_outputs[FAKE_OUTPUTS];
static size_t fixed_count;
static int use_fixed;

void fake_set_outputs(const float *values, size_t n)
{
    if (n > FAKE_OUTPUTS) {
        fprintf(stderr, "fake_set_outputs: at most %d values\n", FAKE_OUTPUTS);
        abort();
    }
    memcpy(fixed_outputs, values, n * sizeof *values);
    fixed_count = n;
    use_fixed = 1;
}

void fake_model_reset(void)
{
    fake_init_error = NULL;
    fake_input_bytes = 4;
    fake_input_int8 = 1;
    fake_input_scale = 1.0f;
    fake_input_zero_point = 0;
    fake_output_count = 0;
    fake_arena_used_bytes = 2256;
    fake_invoke_us = 0;
    fake_init_us = 0;
    fake_fail_on_run = 0;
    fake_runs = 0;
    use_fixed = 0;
    memset(fake_seen_input, 0, sizeof fake_seen_input);
    memset(tensor, 0, sizeof tensor);
}

const char *lb_model_init(const uint8_t *model, size_t model_bytes, uint8_t *arena,
                          size_t arena_bytes)
{
    (void)model, (void)model_bytes, (void)arena, (void)arena_bytes;
    fake_spend_us(fake_init_us);
    return fake_init_error;
}

uint8_t *lb_model_input(void)
{
    return tensor;
}

size_t lb_model_input_bytes(void)
{
    return fake_input_bytes;
}

int lb_model_input_int8(float *scale, int32_t *zero_point)
{
    *scale = fake_input_scale;
    *zero_point = fake_input_zero_point;
    return fake_input_int8;
}

/* A run consumes its input tensor: the core must fill it again before the next run. */
const char *lb_model_invoke(void)
{
    fake_runs++;
    fake_spend_us(fake_invoke_us);
    if (fake_runs == fake_fail_on_run) {
        return "fake failure";
    }
    memcpy(fake_seen_input, tensor, fake_input_bytes);
    memset(tensor, 0xee, fake_input_bytes);
    return NULL;
}

size_t lb_model_output_count(void)
{
    if (use_fixed) {
        return fixed_count;
    }
    if (fake_output_count != 0) {
        return fake_output_count;
    }
    return fake_input_bytes < FAKE_OUTPUTS ? fake_input_bytes : FAKE_OUTPUTS;
}

float lb_model_output(size_t index)
{
    return use_fixed ? fixed_outputs[index] : (float)fake_seen_input[index] / 4.0f;
}

size_t lb_model_arena_used_bytes(void)
{
    return fake_arena_used_bytes;
}
