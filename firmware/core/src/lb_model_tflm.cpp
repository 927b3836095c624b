// The model hooks of lb_hooks.h on TensorFlow Lite Micro, shared by the Nano 33 BLE
// (Arduino_TensorFlowLite), ESP32 (esp-tflite-micro) and Coral Micro (coralmicro's TFLM) builds.
// The host has no TFLM, so `make test` leaves this file out and links a fake model instead.
#if defined(ARDUINO)
#include <TensorFlowLite.h>  // lets the Arduino builder find the Arduino_TensorFlowLite library
#endif

#include "lb_hooks.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace {

// The builtin ops used by the MLPerf Tiny reference models (ic01, kws01, vww01, ad01) and the
// bench's fixture models. A model needing another one fails AllocateTensors at boot.
constexpr unsigned kOpCount = 10;

tflite::MicroInterpreter *interpreter = nullptr;

size_t element_count(const TfLiteTensor *tensor)
{
    size_t n = 1;
    for (int i = 0; i < tensor->dims->size; i++) {
        n *= static_cast<size_t>(tensor->dims->data[i]);
    }
    return n;
}

}  // namespace

const char *lb_model_init(const uint8_t *model, size_t model_bytes, uint8_t *arena,
                          size_t arena_bytes)
{
    if (model_bytes < 8 || !tflite::ModelBufferHasIdentifier(model)) {
        return "not a TFLite model";
    }
    if (arena == nullptr || arena_bytes == 0) {
        return "no tensor arena";
    }
    const tflite::Model *parsed = tflite::GetModel(model);
    if (parsed->version() != TFLITE_SCHEMA_VERSION) {
        return "unsupported TFLite schema version";
    }

    static tflite::MicroMutableOpResolver<kOpCount> resolver;
    resolver.AddAdd();
    resolver.AddAveragePool2D();
    resolver.AddConv2D();
    resolver.AddDepthwiseConv2D();
    resolver.AddDequantize();
    resolver.AddFullyConnected();
    resolver.AddMaxPool2D();
    resolver.AddQuantize();
    resolver.AddReshape();
    resolver.AddSoftmax();

    static tflite::MicroInterpreter instance(parsed, resolver, arena, arena_bytes);
    if (instance.AllocateTensors() != kTfLiteOk) {
        return "AllocateTensors failed (arena too small, or an op not registered)";
    }
    if (instance.inputs_size() != 1 || instance.outputs_size() != 1) {
        return "the model must have one input and one output";
    }
    switch (instance.output(0)->type) {
    case kTfLiteInt8:
    case kTfLiteUInt8:
    case kTfLiteInt16:
    case kTfLiteFloat32:
        break;
    default:
        return "output type is not int8, uint8, int16 or float32";
    }
    interpreter = &instance;
    return nullptr;
}

uint8_t *lb_model_input(void)
{
    // The core writes the input here before every run: the memory planner reuses the input
    // tensor's arena space for later layers, so a run may overwrite it (tflite-micro#2290).
    return reinterpret_cast<uint8_t *>(interpreter->input(0)->data.raw);
}

size_t lb_model_input_bytes(void)
{
    return interpreter->input(0)->bytes;
}

int lb_model_input_int8(float *scale, int32_t *zero_point)
{
    const TfLiteTensor *in = interpreter->input(0);
    if (in->type != kTfLiteInt8) {
        return 0;
    }
    *scale = in->params.scale;
    *zero_point = in->params.zero_point;
    return 1;
}

const char *lb_model_invoke(void)
{
    return interpreter->Invoke() == kTfLiteOk ? nullptr : "Invoke failed";
}

size_t lb_model_output_count(void)
{
    return element_count(interpreter->output(0));
}

float lb_model_output(size_t index)
{
    const TfLiteTensor *out = interpreter->output(0);
    const float scale = out->params.scale;
    const int32_t zero_point = out->params.zero_point;
    switch (out->type) {
    case kTfLiteInt8:
        return static_cast<float>(out->data.int8[index] - zero_point) * scale;
    case kTfLiteUInt8:
        return static_cast<float>(out->data.uint8[index] - zero_point) * scale;
    case kTfLiteInt16:
        return static_cast<float>(out->data.i16[index] - zero_point) * scale;
    default:  // kTfLiteFloat32, the only other type lb_model_init accepts
        return out->data.f[index];
    }
}

size_t lb_model_arena_used_bytes(void)
{
    return interpreter->arena_used_bytes();
}
