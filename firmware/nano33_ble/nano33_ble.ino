// labbench DUT firmware for the Arduino Nano 33 BLE (Sense): the MLPerf Tiny DUT protocol of
// firmware/core on the USB serial port, inference with TFLite Micro (Arduino_TensorFlowLite).
// The model comes from model_data.cpp, which firmware/tools/embed_model.py writes next to this
// sketch. Build and flash: firmware/README.md.
#include <TensorFlowLite.h>
#include <lb_dut.h>
#include <lb_hooks.h>
#include <lb_model_data.h>

namespace {

// TFLM working memory: VWW, the largest MLPerf Tiny model, needs about 100 KiB; with the core's
// 27 KiB input buffer this leaves mbed OS about 100 KiB of the nRF52840's 256 KiB.
constexpr size_t kArenaBytes = 120 * 1024;
alignas(16) uint8_t arena[kArenaBytes];

// name% answers with the board family (devices/*.yaml), as the simulated board does.
const lb_dut_config config = {
    "nano33_ble_sense", lb_model_name, lb_model_data, lb_model_data_bytes, arena, kArenaBytes,
};

}  // namespace

int lb_platform_getchar(void)
{
    while (Serial.available() <= 0) {
    }
    return Serial.read();
}

void lb_platform_write(const char *data, size_t n)
{
    Serial.write(reinterpret_cast<const uint8_t *>(data), n);
}

uint32_t lb_platform_timestamp_us(void)
{
    return micros();
}

// The `hi` extension's network hooks: this firmware has no network link (the board's BLE radio
// would need a host-side bridge to TCP, which the bench does not have), so every offload fails
// with this reason and `hi` passes that accept every sample still run.
const char *lb_net_exchange(const char *, uint16_t, const uint8_t *, size_t, uint8_t *, size_t,
                            size_t *reply_n)
{
    *reply_n = 0;
    return "no network link in this firmware";
}

void lb_net_close(void) {}

void setup()
{
    Serial.begin(115200);  // USB CDC: the rate is nominal
    while (!Serial) {
        // Wait for the host to open the port, or the boot banner is lost.
    }
    lb_dut_init(&config);
}

void loop()
{
    lb_dut_run();  // returns only if the input ends, which a serial port never reports
}
