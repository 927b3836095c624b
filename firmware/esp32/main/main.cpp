// labbench DUT firmware for the ESP32 DevKitC: the MLPerf Tiny DUT protocol of firmware/core on
// UART0 (the board's USB-UART bridge), inference with esp-tflite-micro, and the `hi` extension's
// offload over Wi-Fi (station mode, the network set in menuconfig: labbench DUT) with lwIP's BSD
// sockets. Build: firmware/README.md.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <unistd.h>

#include "driver/uart.h"
#include "esp_err.h"
#include "esp_event.h"
#include "esp_heap_caps.h"
#include "esp_log.h"
#include "esp_netif.h"
#include "esp_timer.h"
#include "esp_wifi.h"
#include "freertos/FreeRTOS.h"
#include "freertos/event_groups.h"
#include "lwip/netdb.h"
#include "lwip/sockets.h"
#include "nvs_flash.h"

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
constexpr int kNetTimeoutS = 5;  // connect, send and each receive
constexpr EventBits_t kGotIp = BIT0;

EventGroupHandle_t wifi_events;
int net_fd = -1;
char net_to[32];  // "ip:port" of the open connection

void on_wifi_event(void *, esp_event_base_t base, int32_t id, void *)
{
    if (base == WIFI_EVENT && (id == WIFI_EVENT_STA_START || id == WIFI_EVENT_STA_DISCONNECTED)) {
        xEventGroupClearBits(wifi_events, kGotIp);
        esp_wifi_connect();  // and again after every disconnection
    } else if (base == IP_EVENT && id == IP_EVENT_STA_GOT_IP) {
        xEventGroupSetBits(wifi_events, kGotIp);
    }
}

// Station mode on the menuconfig network; boot goes on without waiting for it (the DUT protocol
// answers whether or not the network is up).
void start_wifi()
{
    if (std::strlen(CONFIG_LB_WIFI_SSID) == 0) {
        return;
    }
    esp_err_t err = nvs_flash_init();
    if (err == ESP_ERR_NVS_NO_FREE_PAGES || err == ESP_ERR_NVS_NEW_VERSION_FOUND) {
        ESP_ERROR_CHECK(nvs_flash_erase());
        err = nvs_flash_init();
    }
    ESP_ERROR_CHECK(err);
    wifi_events = xEventGroupCreate();
    ESP_ERROR_CHECK(esp_netif_init());
    ESP_ERROR_CHECK(esp_event_loop_create_default());
    esp_netif_create_default_wifi_sta();
    wifi_init_config_t init = WIFI_INIT_CONFIG_DEFAULT();
    ESP_ERROR_CHECK(esp_wifi_init(&init));
    ESP_ERROR_CHECK(esp_event_handler_register(WIFI_EVENT, ESP_EVENT_ANY_ID, on_wifi_event, nullptr));
    ESP_ERROR_CHECK(esp_event_handler_register(IP_EVENT, IP_EVENT_STA_GOT_IP, on_wifi_event, nullptr));
    wifi_config_t config = {};
    std::strncpy(reinterpret_cast<char *>(config.sta.ssid), CONFIG_LB_WIFI_SSID, sizeof config.sta.ssid);
    std::strncpy(reinterpret_cast<char *>(config.sta.password), CONFIG_LB_WIFI_PASSWORD,
                 sizeof config.sta.password);
    ESP_ERROR_CHECK(esp_wifi_set_mode(WIFI_MODE_STA));
    ESP_ERROR_CHECK(esp_wifi_set_config(WIFI_IF_STA, &config));
    ESP_ERROR_CHECK(esp_wifi_start());
    esp_wifi_set_ps(WIFI_PS_NONE);  // modem sleep would add its DTIM wait to every reply
}

// A connection to ip:port, opened when none is open to it; nullptr or why not.
const char *net_connect(const char *ip, uint16_t port)
{
    char to[sizeof net_to];
    std::snprintf(to, sizeof to, "%s:%u", ip, static_cast<unsigned>(port));
    if (net_fd >= 0 && std::strcmp(to, net_to) == 0) {
        return nullptr;
    }
    lb_net_close();
    if (wifi_events == nullptr) {
        return "no Wi-Fi network configured (menuconfig: labbench DUT)";
    }
    if (!(xEventGroupWaitBits(wifi_events, kGotIp, pdFALSE, pdTRUE, pdMS_TO_TICKS(kNetTimeoutS * 1000)) &
          kGotIp)) {
        return "Wi-Fi not connected";
    }
    sockaddr_in addr = {};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    if (inet_pton(AF_INET, ip, &addr.sin_addr) != 1 || (net_fd = socket(AF_INET, SOCK_STREAM, 0)) < 0) {
        return "no socket";
    }
    timeval timeout = {kNetTimeoutS, 0};
    int one = 1;
    setsockopt(net_fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(net_fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    setsockopt(net_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(net_fd, reinterpret_cast<sockaddr *>(&addr), sizeof addr) != 0) {
        const char *why = errno == ECONNREFUSED ? "connection refused" : "connect failed";
        lb_net_close();
        return why;
    }
    std::strcpy(net_to, to);
    return nullptr;
}

}  // namespace

void lb_net_close(void)
{
    if (net_fd >= 0) {
        close(net_fd);
        net_fd = -1;
    }
}

const char *lb_net_exchange(const char *ip, uint16_t port, const uint8_t *data, size_t n,
                            uint8_t *reply, size_t reply_cap, size_t *reply_n)
{
    const char *err = net_connect(ip, port);
    *reply_n = 0;
    while (err == nullptr && n > 0) {
        int k = send(net_fd, data, n, 0);
        if (k <= 0) {
            err = "send failed";
        } else {
            data += k;
            n -= static_cast<size_t>(k);
        }
    }
    while (err == nullptr && *reply_n < reply_cap) {
        int k = recv(net_fd, reply + *reply_n, reply_cap - *reply_n, 0);
        if (k < 0) {
            err = errno == EAGAIN || errno == EWOULDBLOCK ? "no reply within 5 s"
                  : errno == ECONNRESET                  ? "connection reset by the server"
                                                         : "receive failed";
        } else if (k == 0) {
            err = "connection closed by the server";
        } else {
            *reply_n += static_cast<size_t>(k);
        }
    }
    if (err != nullptr) {
        lb_net_close();
    }
    return err;
}

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
    start_wifi();  // before the arena takes the largest free block: Wi-Fi needs its own heap

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
