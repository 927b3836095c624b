// labbench DUT firmware for the ESP32 DevKitC: the MLPerf Tiny DUT protocol of firmware/core on
// UART0 (the board's USB-UART bridge), inference with esp-tflite-micro. Build: firmware/README.md.
#include "driver/uart.h"
#include "esp_err.h"
#include "esp_heap_caps.h"
#include "esp_log.h"
#include "esp_timer.h"
#include "freertos/FreeRTOS.h"

#include "lb_dut.h"
#include "lb_hooks.h"
#include "lb_model_data.h"

namespace {

constexpr uart_port_t kUart = UART_NUM_0;
constexpr int kUartRxBufferBytes = 2048;
// Slack for the 16-byte alignment when the tensor arena takes the largest free block (the
// IDF's own later allocations come from the other heap regions).
constexpr size_t kHeapReserveBytes = 1024;
constexpr uint32_t kArenaCaps = MALLOC_CAP_8BIT | MALLOC_CAP_INTERNAL;

}  // namespace

int lb_platform_getchar(void)
{
    uint8_t c;
    while (uart_read_bytes(kUart, &c, 1, portMAX_DELAY) != 1) {
    }
    return c;
}

void lb_platform_write(const char *data, size_t n)
{
    uart_write_bytes(kUart, data, n);
}

uint32_t lb_platform_timestamp_us(void)
{
    return static_cast<uint32_t>(esp_timer_get_time());
}

extern "C" void app_main(void)
{
    esp_log_level_set("*", ESP_LOG_NONE);  // a log line would land in the middle of a reply
    ESP_ERROR_CHECK(uart_driver_install(kUart, kUartRxBufferBytes, 0, 0, nullptr, 0));

    // The arena comes from the heap, not .bss: the ESP32 caps static DRAM at about 160 KiB,
    // shared with the core's 27 KiB input buffer and the IDF, and VWW needs about 100 KiB.
    size_t arena_bytes = heap_caps_get_largest_free_block(kArenaCaps);
    arena_bytes = arena_bytes > kHeapReserveBytes ? arena_bytes - kHeapReserveBytes : 0;
    auto *arena = static_cast<uint8_t *>(heap_caps_aligned_alloc(16, arena_bytes, kArenaCaps));

    // name% answers with the board family (devices/*.yaml), as the simulated board does.
    static lb_dut_config config = {
        "esp32_devkitc", lb_model_name, lb_model_data, lb_model_data_bytes,
        arena, arena != nullptr ? arena_bytes : 0,
    };
    lb_dut_init(&config);  // with no arena, reports the model as failed and still answers
    lb_dut_run();
}
