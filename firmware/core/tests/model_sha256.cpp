// Prints what a board built with embed_model.py's model_data.cpp reports for its model:
// "<name> <bytes> <sha256> <address mod 16>", for tests/test_firmware_core.py to compare with
// the .tflite file itself.
#include <cstdint>
#include <cstdio>

#include "lb_model_data.h"
#include "lb_sha256.h"

int main()
{
    char hex[65];
    lb_sha256_hex(lb_model_data, lb_model_data_bytes, hex);
    std::printf("%s %u %s %u\n", lb_model_name, lb_model_data_bytes, hex,
                static_cast<unsigned>(reinterpret_cast<std::uintptr_t>(lb_model_data) % 16u));
    return 0;
}
