// labbench DUT firmware for the Coral Dev Board Micro: the MLPerf Tiny DUT protocol of
// firmware/core on the USB serial console, inference with TFLite Micro on the Cortex-M7 (the
// CPU, not the Edge TPU: the MLPerf Tiny models are not compiled for it). Build:
// firmware/README.md.
#include "libs/base/console_m7.h"
#include "libs/base/timer.h"
#include "libs/tensorflow/utils.h"
#include "third_party/freertos_kernel/include/FreeRTOS.h"
#include "third_party/freertos_kernel/include/task.h"

#include "lb_dut.h"
#include "lb_hooks.h"
#include "lb_model_data.h"

namespace {

// TFLM working memory in on-chip RAM (faster than the 64 MB SDRAM); the MLPerf Tiny models
// need at most about 100 KiB.
constexpr size_t kArenaBytes = 256 * 1024;
STATIC_TENSOR_ARENA_IN_OCRAM(arena, kArenaBytes);

}  // namespace

int lb_platform_getchar(void)
{
    char c;
    while (coralmicro::ConsoleM7::GetSingleton()->Read(&c, 1) != 1) {
        taskYIELD();
    }
    return static_cast<unsigned char>(c);
}

void lb_platform_write(const char *data, size_t n)
{
    // Write copies the bytes before it returns; it only lacks the const.
    coralmicro::ConsoleM7::GetSingleton()->Write(const_cast<char *>(data), static_cast<int>(n));
}

uint32_t lb_platform_timestamp_us(void)
{
    return static_cast<uint32_t>(coralmicro::TimerMicros());
}

// The `hi` extension's network hooks: this firmware has no network link (the Wi-Fi/BLE and PoE
// add-on boards are not supported here), so every offload fails
// with this reason and `hi` passes that accept every sample still run.
const char *lb_net_exchange(const char *, uint16_t, const uint8_t *, size_t, uint8_t *, size_t,
                            size_t *reply_n)
{
    *reply_n = 0;
    return "no network link in this firmware";
}

void lb_net_close(void) {}

extern "C" [[noreturn]] void app_main(void *param)
{
    (void)param;
    // name% answers with the board family (devices/*.yaml), as the simulated board does.
    static const lb_dut_config config = {
        "coral_dev_board_micro", lb_model_name, lb_model_data, lb_model_data_bytes,
        arena, kArenaBytes,
    };
    lb_dut_init(&config);
    lb_dut_run();
    vTaskSuspend(nullptr);  // not reached (getchar waits for every byte); app_main must not return
}
