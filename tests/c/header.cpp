// The header compiles as C++17 (with -Wall -Wextra -Werror -pedantic) and links: a short decode
// through the C ABI from C++, with RAII owners for the handles.
#include "kvtier.h"

#include <cstdio>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

static_assert(std::is_same<std::underlying_type<kvtier_status>::type, uint32_t>::value,
              "kvtier_status is a uint32_t enum");
static_assert(std::is_standard_layout<kvtier_memory_report>::value, "plain C struct");

struct ConfigFree {
    void operator()(kvtier_config *c) const { kvtier_config_free(c); }
};
struct CacheFree {
    void operator()(kvtier_cache *c) const { kvtier_cache_free(c); }
};

#define CHECK(call)                                                                                \
    do {                                                                                           \
        kvtier_status st_ = (call);                                                                \
        if (st_ != KVTIER_STATUS_OK) {                                                             \
            char msg[256];                                                                         \
            kvtier_last_error(msg, sizeof msg, nullptr);                                           \
            std::fprintf(stderr, "%s: %s (%s)\n", #call, kvtier_status_name(st_), msg);            \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

int main() {
    if (kvtier_abi_version() != KVTIER_ABI_VERSION) return 1;
    kvtier_config *raw_cfg = nullptr;
    CHECK(kvtier_config_new_preset(KVTIER_PRESET_COMPACT, 2, 4, 2, 32, &raw_cfg));
    std::unique_ptr<kvtier_config, ConfigFree> cfg(raw_cfg);
    CHECK(kvtier_config_set_hot_dtype(cfg.get(), KVTIER_HOT_DTYPE_BF16));
    kvtier_cache *raw_cache = nullptr;
    CHECK(kvtier_cache_new(cfg.get(), &raw_cache));
    std::unique_ptr<kvtier_cache, CacheFree> cache(raw_cache);
    kvtier_shape shape{};
    CHECK(kvtier_cache_shape(cache.get(), &shape));
    uint64_t seq = 0;
    CHECK(kvtier_cache_sequence_add(cache.get(), &seq));
    const size_t row_kv = shape.num_kv_heads * shape.head_dim;
    const size_t row_q = shape.num_q_heads * shape.head_dim;
    std::vector<float> k(row_kv, 0.25f), v(row_kv, 0.5f), q(row_q, 1.0f), out(row_q);
    std::vector<kvtier_head_stats> heads(shape.num_q_heads);
    for (int t = 0; t < 100; t++) {
        CHECK(kvtier_cache_append(cache.get(), seq, 0, k.data(), k.size(), v.data(), v.size()));
        kvtier_attention_stats stats{heads.data(), heads.size(), nullptr, 0, nullptr, 0};
        CHECK(kvtier_cache_attend(cache.get(), 0, &seq, 1, q.data(), q.size(), out.data(),
                                  out.size(), &stats));
    }
    kvtier_memory_report report{};
    CHECK(kvtier_cache_memory_report(cache.get(), &report));
    std::printf("c++17: ok (%zu tokens, %zu warm pages, out[0] = %g)\n", report.tokens,
                report.warm_pages, static_cast<double>(out[0]));
    return report.tokens == 100 ? 0 : 1;
}
